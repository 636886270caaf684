// argmax over each row of the logits, for greedy sampling: one vector pass over the row in its own
// dtype (bf16 widened on load, which keeps every value exactly), instead of widening the whole
// [rows, vocab] matrix to float32 first. Ties go to the first index, a NaN wins (the first NaN),
// as torch.argmax.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_vec.h"
#include "ops.h"

namespace tokenmill {
namespace {

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t i = 0;
  int64_t best = 0;
  float best_val = -std::numeric_limits<float>::infinity();
  if (n >= kLanes) {
    vfloat m = load(x);
    vint at{};  // per lane: the first index where it saw its maximum, less the lane's own offset
    vint nan = m != m;
    for (i = kLanes; i + kLanes <= n; i += kLanes) {
      const vfloat v = load(x + i);
      const vint gt = v > m;
      m = gt ? v : m;
      at = gt ? vint{} + static_cast<int32_t>(i) : at;
      nan |= v != v;
    }
    bool any_nan = false;
    for (int l = 0; l < kLanes; ++l) any_nan |= nan[l] != 0;
    if (any_nan) {
      for (int64_t j = 0; j < n; ++j)
        if (std::isnan(to_float(x[j]))) return j;
    }
    best_val = reduce_max(m);
    best = n;
    for (int l = 0; l < kLanes; ++l)
      if (m[l] == best_val) best = std::min<int64_t>(best, static_cast<int64_t>(at[l]) + l);
  }
  for (; i < n; ++i) {  // the tail (or a row shorter than a vector)
    const float v = to_float(x[i]);
    if (std::isnan(v)) {
      for (int64_t j = 0; j < n; ++j)
        if (std::isnan(to_float(x[j]))) return j;
    }
    if (v > best_val || i == 0) {
      best_val = v;
      best = i;
    }
  }
  return best;
}

}  // namespace

torch::Tensor argmax(const torch::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be a non-empty 2-d CPU tensor with a contiguous last dimension");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31), "rows longer than 2^31 are not supported");
  const int64_t rows = logits.size(0), n = logits.size(1), st = logits.stride(0);
  auto out = torch::empty({rows}, torch::kInt64);
  int64_t* o = out.data_ptr<int64_t>();
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = logits.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) o[r] = argmax_row(x + r * st, n);
    });
  };
  if (logits.scalar_type() == torch::kFloat32) run(static_cast<float*>(nullptr));
  else if (logits.scalar_type() == torch::kBFloat16) run(static_cast<bf16*>(nullptr));
  else TORCH_CHECK(false, "logits must be float32 or bfloat16");
  return out;
}

}  // namespace tokenmill
