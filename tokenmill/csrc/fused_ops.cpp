// The decoder layer's elementwise steps, each one pass over memory instead of several torch ops:
//
//   rms_norm(x, w, eps)                 -> w * (x / sqrt(mean(x^2) + eps))
//   fused_add_rms_norm(x, res, w, eps)  res += x; x = rms_norm(res)          (both in place)
//   silu_and_mul(gu)                    -> silu(gu[:, :I]) * gu[:, I:]
//   rotary_embedding(x, pos, cos, sin)  x = x * cos[pos] + rotate_half(x) * sin[pos]  (in place)
//
// Each rounds where Hugging Face's Llama rounds, so outputs equal the torch code they replace up
// to the order of the float32 sum in RMSNorm and the last bit of exp in SiLU:
//   * RMSNorm: mean of squares and the scaling in float32, the scaled row rounded to the input
//     dtype, then multiplied by the weight in that dtype (HF: `weight * hidden.to(input_dtype)`).
//   * residual add, SiLU, the SiLU x up product and RoPE's two products and sum: each rounded to
//     the tensor dtype, as separate torch ops would. FMA contraction is off for this file (the
//     pragmas below), so the compiler does not fuse a product and a sum into one FMA (one
//     rounding instead of two). It stays on for the attention kernel's tile path, which it speeds up.
// Both dtypes run the same vector code (cpu_vec.h: as wide as the CPU the extension is built for):
// bf16 is widened to float32 on load and rounded to nearest even on store and at each rounding
// point above, so no loop on the hot path is scalar. Row tails that are not a whole vector go
// through the same code on a zero-padded copy.
//
// Rows are split over at::parallel_for threads in grains of at least kGrainElems elements: a
// decode step's rows (a few dozen x hidden size) stay on one thread, where waking the pool
// would cost more than the pass itself.

// FMA contraction off for this whole translation unit (before any include, so that every inline
// function it calls is compiled the same way and inlines).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "ops.h"

namespace tokenmill {
namespace {

constexpr int64_t kGrainElems = 1 << 15;

inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row_elems, 1)); }

// body(i, w) for the vectors of [0, n): w == kLanes, then one partial vector (w < kLanes) if any.
template <typename Body>
inline void for_vectors(int64_t n, Body&& body) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) body(i, kLanes);
  if (i < n) body(i, n - i);
}

// sum of squares of one row, in float32 (two vector accumulators, then across the lanes)
template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  vfloat acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const vfloat a = load(x + i), b = load(x + i + kLanes);
    acc0 += a * a;
    acc1 += b * b;
  }
  for_vectors(n - i, [&](int64_t j, int64_t w) {
    const vfloat a = ld(x + i + j, w);
    acc0 += a * a;
  });
  return reduce_add(acc0 + acc1);
}

// out = w * T(x * r), r = 1 / sqrt(mean(x^2) + eps)
template <typename T>
inline void norm_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  const float r = 1.f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + eps);
  for_vectors(n, [&](int64_t i, int64_t wd) {
    st(out + i, ld(w + i, wd) * round_to(x, ld(x + i, wd) * r), wd);
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1,
              name, " must be a 2-d CPU tensor with a contiguous last dimension");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16,
              name, " must be float32 or bfloat16");
}

void check_weight(const torch::Tensor& w, const torch::Tensor& x) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1) &&
                  w.scalar_type() == x.scalar_type(),
              "weight must be a contiguous 1-d CPU tensor of the input's dtype and hidden size (", x.size(1), ")");
}

// out = T(T(silu(g)) * u)
template <typename T>
void silu_mul_row(const T* g, const T* u, T* out, int64_t n) {
  for_vectors(n, [&](int64_t i, int64_t w) {
    const vfloat x = ld(g + i, w);
    const vfloat silu = round_to(g, x / (1.f + vexp(-x)));
    st(out + i, silu * ld(u + i, w), w);
  });
}

// One token's cos/sin rows rounded to T (HF casts the tables to the activations' dtype), once for
// all of the token's heads.
template <typename T>
inline void round_row(const T* tag, const float* src, float* dst, int64_t n) {
  for_vectors(n, [&](int64_t i, int64_t w) { st(dst + i, round_to(tag, ld(src + i, w)), w); });
}

// One head of one token: x[i], x[i + half] -> x * c - x2 * s, x2 * c' + x * s', each product and
// the sum rounded to T; c and s are the token's table rows already rounded to T.
template <typename T>
inline void rotate_head(T* x, const float* c, const float* s, int64_t half) {
  const T* tag = x;
  for_vectors(half, [&](int64_t i, int64_t w) {
    const vfloat x1 = ld(x + i, w), x2 = ld(x + half + i, w);
    const vfloat c1 = ld(c + i, w), s1 = ld(s + i, w);
    const vfloat c2 = ld(c + half + i, w), s2 = ld(s + half + i, w);
    const vfloat o1 = round_to(tag, x1 * c1) - round_to(tag, x2 * s1);
    const vfloat o2 = round_to(tag, x2 * c2) + round_to(tag, x1 * s2);
    st(x + i, o1, w);
    st(x + half + i, o2, w);
  });
}

template <typename Fn>
void dispatch_float_types(const torch::Tensor& t, Fn&& fn) {
  if (t.scalar_type() == torch::kFloat32) fn(static_cast<float*>(nullptr));
  else fn(static_cast<bf16*>(nullptr));
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  auto out = torch::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = x.size(0), n = x.size(1);
  dispatch_float_types(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t st = x.stride(0);
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) norm_row(xp + r * st, wp, op + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

void fused_add_rms_norm(torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  check_weight(weight, x);
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && x.sizes() == residual.sizes() &&
                  x.scalar_type() == residual.scalar_type(),
              "x and residual must be contiguous tensors of one shape and dtype");
  const int64_t rows = x.size(0), n = x.size(1);
  dispatch_float_types(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* xp = x.data_ptr<T>();
    T* rp = residual.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        T* xr = xp + r * n;
        T* rr = rp + r * n;
        for_vectors(n, [&](int64_t i, int64_t w) { st(rr + i, ld(rr + i, w) + ld(xr + i, w), w); });
        norm_row(rr, wp, xr, n, static_cast<float>(eps));
      }
    });
  });
}

torch::Tensor silu_and_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up's last dimension must be even, got ", gate_up.size(1));
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = torch::empty({rows, n}, gate_up.options());
  dispatch_float_types(gate_up, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* gp = gate_up.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t st = gate_up.stride(0);
    at::parallel_for(0, rows, grain_rows(2 * n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) silu_mul_row(gp + r * st, gp + r * st + n, op + r * n, n);
    });
  });
  return out;
}

void rotary_embedding(torch::Tensor& x, const torch::Tensor& positions, const torch::Tensor& cos,
                      const torch::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1,
              "x must be a [T, heads, head_dim] CPU tensor with a contiguous last dimension");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16");
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even, got ", D);
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == torch::kInt64 && positions.dim() == 1 &&
                  positions.is_contiguous() && positions.size(0) == T_,
              "positions must be a contiguous int64 [T] CPU tensor");
  for (const torch::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->dim() == 2 && t->is_contiguous() &&
                    t->size(1) == D && t->sizes() == cos.sizes(),
                "cos and sin must be contiguous float32 [max_positions, head_dim] CPU tensors");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t max_pos = cos.size(0);
  for (int64_t t = 0; t < T_; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "positions[", t, "] = ", pos[t], " is outside the rotary tables (",
                max_pos, " positions)");
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  dispatch_float_types(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* xp = x.data_ptr<T>();
    const int64_t st0 = x.stride(0), st1 = x.stride(1);
    at::parallel_for(0, T_, grain_rows(H * D), [&](int64_t b, int64_t e) {
      std::vector<float> rounded(std::is_same_v<T, float> ? 0 : 2 * D);
      for (int64_t t = b; t < e; ++t) {
        const float* c = cp + pos[t] * D;
        const float* s = sp + pos[t] * D;
        if constexpr (!std::is_same_v<T, float>) {  // (rounding float32 to float32 is the identity)
          round_row(xp, c, rounded.data(), D);
          round_row(xp, s, rounded.data() + D, D);
          c = rounded.data();
          s = rounded.data() + D;
        }
        for (int64_t h = 0; h < H; ++h) rotate_head(xp + t * st0 + h * st1, c, s, D / 2);
      }
    });
  });
}

}  // namespace tokenmill
