// Paged attention for the CPU over one step's ragged batch, reading K/V straight from the paged
// cache through the block tables (no per-request gather, no padding).
//
// Layouts (element strides; the last dimension of q is contiguous):
//   q           [T, H, D]                        the step's new tokens, all requests concatenated
//   kv_cache    [2, num_blocks, KVH, BS * D]     per block and KV head, 0 = keys stored transposed
//                                                ([D][BS]: dim d of the block's BS keys adjacent),
//                                                1 = values ([BS][D]: one row per key)
//   block_tables[R, max_blocks]  int32 or int64  physical block of each logical block
//   query_start_loc [R + 1], seq_lens [R]  int32 request i owns rows qsl[i]:qsl[i+1]; seq_lens[i]
//                                                is its context length after this step
//   out         [T, H, D]
// Query j of request i sits at position seq_lens[i] - q_len + j and attends to keys 0..position.
// GQA: query head h reads KV head h / group (H = KVH * group), like SDPA's enable_gqa.
//
// Why keys are transposed: a decode row's scores for a block are then a vector over the block's
// keys, sum_d q[d] * K^T[d][keys], one broadcast-FMA per dimension with no horizontal sum, and
// the values a vector over dimensions, sum_key p[key] * V[key][dims]. Both passes read every K/V
// byte of the block once for all the query heads of a KV head, contiguously (a block's K for one
// head is D * BS elements in a row, its V the same). The row path prefetches a few (block, KV
// head) units ahead of the one it computes, each unit's lines spread over the previous unit's
// score loop: one burst of a whole block's lines would stall on the core's few miss buffers, a
// line every few FMAs keeps memory busy under the compute.
//
// Work split. plan() cuts the batch into work items (request, first query, query count, first KV
// head, KV heads). A decode token or a short chunk (at most kRowPathMax query rows per KV head) is
// one item, covering all KV heads when the batch has enough such items to keep the threads busy,
// else one item per KV head. A longer chunk is cut into query tiles of about kTileRows rows
// (tokens x the group's query heads), one item per KV head. The items are sorted by estimated
// cost (rows x keys), longest first, and the threads of one at::parallel_for take them one at a
// time from an atomic counter, so the load stays balanced whatever mix of decodes and prompt
// chunks the step holds. Every item owns its output rows: no synchronisation besides the
// counter. The plan depends only on the step, so the backend builds it once per step and every
// layer reuses it.
//
// Inside an item the keys are walked block by block with an online (flash-style) softmax in
// float32: running max m, running sum l, accumulator acc, rescaled by exp(m_old - m_new) per block.
// Two inner kernels, by the number of query rows of the item:
//   * row path (decode tokens, very short chunks): as above, the query rows packed and pre-scaled
//     in float32, scores and values in registers, K/V read in place from the cache (bf16 widened on
//     load). For bf16 on a CPU with AVX512-BF16 both passes instead run vdpbf16ps on bf16 pairs
//     (queries and keys as dimension pairs, probabilities rounded to bf16 as key pairs): no
//     widening, half the multiply-adds.
//   * tile path (prompt chunks): GEMM-like, with the query rows along the vector lanes: Q is
//     packed transposed and pre-scaled once per item (Q^T [D][M]); the block's keys are widened
//     to float rows ([key][D], from the transposed layout) and its values ([key][D]); the scores
//     S^T[key][row] come from a 4-key x 3-vector register block (broadcast K, load Q^T); the
//     softmax is then purely vertical (row-wise max and sum run across the key rows of S^T: no
//     horizontal reductions; the causal mask, a vector compare of positions, only on blocks that
//     cross the diagonal); the value pass O^T[d][row] += V[key][d] P^T[key][row] uses the same
//     register block. Keys past a row's position are never computed beyond the diagonal block.
// Shared prefixes (cascade attention). When consecutive requests hold the same first blocks (a
// prefix-cache hit: one system prompt, many users) and all their queries sit after those blocks,
// plan() also returns a prefix plan: items that attend the shared blocks once for the queries of
// the whole group, stacked as the rows of one tile-path item per KV head (no mask: every shared
// key precedes every query), leaving unnormalised (m, l, acc) per row in a float32 state buffer.
// Each request's own items then start at the first key after the prefix and continue from that
// state. The shared blocks are thus read once per group, not once per request, and at GEMM
// (tile-path) rather than GEMV (row-path) arithmetic intensity.
// Per-layer options (arguments, not copies of the kernel): a sliding window (query at position p
// sees keys p - window + 1 .. p; blocks wholly before an item's first window are not read, and a
// windowed layer is planned without a shared-prefix pass) and logit soft-capping (scores become
// cap * tanh(score / cap) before masking and softmax, in both paths, the prefix pass included).
// Both are written on cpu_vec.h's vector type, so they are AVX-512 code on an AVX-512 machine
// and AVX2 code on an AVX2 one. A plain scalar reference implementation (same online softmax, one
// row and one key at a time) is exposed to the tests through simd=False.
//
// int8 KV cache (opt-in, kv_cache_dtype="int8"). kv_cache is int8 [2, num_blocks, KVH, BS * (D + 4)]:
// each (block, KV head) unit holds its BS * D int8s as above (keys transposed, values as rows),
// then BS float32 scales, one per key (per value row). A row of D elements is stored as
// round(x / scale), scale = max |x| / 127, when it is written (write_kv_rows): per token and
// head, so a block filled one decode step at a time never needs requantizing. The kernel reads
// half the bytes of a bf16 cache. The row path on a CPU with AVX512-VNNI multiplies int16 queries
// and probabilities by the int8s sign-extended to int16 (vpdpwssd, see row_scores_i8); elsewhere,
// and in the tile path, the int8s are widened to float32 exactly. A block's scores are multiplied
// by its key scales, and its probabilities by its value scales before the value pass (the softmax
// sum uses the unscaled ones), so the dequantized cache is never materialised. The queries and
// outputs keep their dtype; the bf16-pair (vdpbf16ps) paths are for a bf16 cache only.
// Numerics: float32 accumulation everywhere (bf16 inputs are widened exactly, outputs rounded to
// nearest even once); exp is a Cephes-style polynomial with ~1-2 ulp error. Float32 outputs match
// SDPA to float32 rounding (~1e-6 relative), not bitwise (summation order differs).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "ops.h"

#define TM_UNROLL _Pragma("GCC unroll 16")

namespace tokenmill {
namespace {

constexpr int kRowPathMax = 8;   // items with at most this many query rows per KV head take the row path
constexpr int kTileKeys = 64;    // row path: keys per online-softmax step (whole blocks, at least one)
constexpr int kMaxTileBlocks = kTileKeys;
constexpr int kTileRows = 48;    // target query rows (tokens x group) of a tile-path item
constexpr int kPrefixTileRows = 96;  // target query rows of a shared-prefix item
constexpr int kPrefixMinRows = 16;   // a shared prefix is attended once for at least this many query rows
constexpr int kPlanCols = 6, kPrefixCols = 5;  // columns of the two plans (see plan())
constexpr int kPrefetchUnits = 3;  // row path: (block, KV head) units the prefetch runs ahead
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Blocks the row path takes per softmax step: kTileKeys keys' worth, at least one block.
inline int blocks_per_tile(int64_t block_size) { return static_cast<int>(std::max<int64_t>(1, kTileKeys / block_size)); }

// ---- the problem, as raw pointers and strides ------------------------------------------------

// T: the queries' and outputs' dtype; I: the block tables' index type; C: the cache's element
// type, T itself or int8_t (an 8-bit cache: see "int8 KV cache" at the top).
template <typename T, typename I, typename C>
struct Problem {
  static constexpr bool kQuant = std::is_same_v<C, int8_t>;
  const T* q;
  int64_t q_st, q_sh;  // token and head strides of q
  const C* k_cache;    // kv_cache[0]
  const C* v_cache;    // kv_cache[1]
  int64_t blk_st;      // block stride = KVH * head_st
  int64_t head_st;     // KV head stride within a block: BS * D (int8: BS * (D + 4), the scales after the data)
  const I* tables;
  int64_t table_st;
  const int32_t* qsl;
  const int32_t* seq_lens;
  T* out;
  int64_t o_st, o_sh;
  // Shared-prefix state (float32, per flat token t and query head hq at t * H + hq): the running
  // max, sum and unnormalised output of the prefix pass, which the request's own items continue.
  float* state_m;
  float* state_l;
  float* state_acc;  // [T * H][D]
  int num_heads, num_kv_heads, group, head_dim, block_size;
  float scale;
  int window;     // > 0: a query at position p sees keys p - window + 1 .. p only (sliding window)
  float softcap;  // > 0: scores become softcap * tanh(score / softcap) before the softmax

  // The first key the row at position pos sees.
  int first_key(int pos) const { return window > 0 ? std::max(0, pos - window + 1) : 0; }

  const C* keys(int64_t block, int h) const { return k_cache + block * blk_st + h * head_st; }  // [D][BS]
  const C* values(int64_t block, int h) const { return v_cache + block * blk_st + h * head_st; }  // [BS][D]
  // int8: the float32 scale of each of the block's BS keys (values), after its BS * D int8s.
  const float* key_scales(int64_t block, int h) const { return scales_of(keys(block, h)); }
  const float* value_scales(int64_t block, int h) const { return scales_of(values(block, h)); }
  const float* scales_of(const C* unit) const {
    return reinterpret_cast<const float*>(unit + static_cast<int64_t>(block_size) * head_dim);
  }
  // The bytes of one (block, KV head) unit of K (or V), its scales included.
  int64_t unit_bytes() const { return head_st * static_cast<int64_t>(sizeof(C)); }
};

// One item's geometry: query tokens j0 .. j0 + qn of request req, KV heads h0 .. h0 + nh, keys
// from block kb0 on. Row m (per head) = j * group + g is query token j (flat row t0 + j, position
// pos0 + j) and query head h * group + g. state_in: the rows continue the shared-prefix pass's
// state (kb0 > 0); state_out: the item is that pass, and leaves its state unnormalised.
struct Item {
  int req, t0, pos0, qn, h0, nh, rows, key_end, kb0;
  bool state_in, state_out;
};

// An item of the plan: (request, first query, query count, first KV head, KV heads, first key).
template <typename T, typename I, typename C>
inline Item make_item(const Problem<T, I, C>& p, const int32_t* it) {
  Item x;
  x.req = it[0];
  int j0 = it[1];
  x.qn = it[2];
  x.h0 = it[3];
  x.nh = it[4];
  int q_len = p.qsl[x.req + 1] - p.qsl[x.req];
  x.t0 = p.qsl[x.req] + j0;
  x.pos0 = p.seq_lens[x.req] - q_len + j0;
  x.rows = x.qn * p.group;
  x.key_end = x.pos0 + x.qn;  // keys [kb0 * BS, key_end)
  x.kb0 = it[5] / p.block_size;
  x.state_in = it[5] > 0;
  x.state_out = false;
  return x;
}

// An item of the shared-prefix plan: (a request of the group, first flat token, token count, KV
// head, prefix keys). Its tokens, of consecutive requests that all hold the same first blocks and
// sit after them, attend to those keys with no mask (every key precedes every query).
template <typename T, typename I, typename C>
inline Item make_prefix_item(const Problem<T, I, C>& p, const int32_t* it) {
  Item x;
  x.req = it[0];
  x.t0 = it[1];
  x.qn = it[2];
  x.h0 = it[3];
  x.nh = 1;
  x.pos0 = it[4];  // (the rows' real positions lie further on; only pos >= key_end matters)
  x.rows = x.qn * p.group;
  x.key_end = it[4];
  x.kb0 = 0;
  x.state_in = false;
  x.state_out = true;
  return x;
}

// The state slot of row m of KV head h (item rows numbered as in Item).
template <typename T, typename I, typename C>
inline int64_t state_index(const Problem<T, I, C>& p, const Item& x, int h, int m) {
  return static_cast<int64_t>(x.t0 + m / p.group) * p.num_heads + h * p.group + m % p.group;
}

template <typename T, typename I, typename C>
inline const T* q_row(const Problem<T, I, C>& p, const Item& x, int h, int m) {
  int j = m / p.group, g = m % p.group;
  return p.q + (x.t0 + j) * p.q_st + (h * p.group + g) * p.q_sh;
}

template <typename T, typename I, typename C>
inline T* out_row(const Problem<T, I, C>& p, const Item& x, int h, int m) {
  int j = m / p.group, g = m % p.group;
  return p.out + (x.t0 + j) * p.o_st + (h * p.group + g) * p.o_sh;
}

template <typename T, typename I, typename C>
inline int64_t block_of(const Problem<T, I, C>& p, const Item& x, int kb) {
  return static_cast<int64_t>(p.tables[x.req * p.table_st + kb]);
}

// Prefetch bytes [p, p + n) into the L2 cache, one line at a time. To L2, not L1 (locality 1,
// prefetcht2): L1 prefetches hold one of the core's few L1 miss buffers each until their line
// arrives, and with a few (block, head) units in flight they ran out; cold decode attention on
// one thread went from ~7 to ~10.5 GB/s with the same distance.
inline void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(c + i, 0, 1);
}

// Prefetches n bytes at k and at v spread over `steps` calls of step(), a few lines a call: a burst
// of hundreds of prefetches would stall on the core's few miss buffers, while one every few
// vector FMAs keeps memory busy under the compute. finish() issues whatever is left.
struct SpreadPrefetch {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t n = 0, i = 0, per = 0;
  SpreadPrefetch() = default;
  SpreadPrefetch(const void* k_, const void* v_, int64_t n_, int64_t per_)
      : k(static_cast<const char*>(k_)), v(static_cast<const char*>(v_)), n(n_), per(per_) {}
  // The bytes per step() that spread n bytes over `steps` calls: whole lines, at least one.
  static int64_t bytes_per_step(int64_t n, int64_t steps) {
    return 64 * std::max<int64_t>(1, (n / 64 + steps - 1) / std::max<int64_t>(steps, 1));
  }
  inline void step() {
    for (const int64_t end = std::min(n, i + per); i < end; i += 64) {
      __builtin_prefetch(k + i, 0, 1);
      __builtin_prefetch(v + i, 0, 1);
    }
  }
  inline void finish() {
    for (; i < n; i += 64) {
      __builtin_prefetch(k + i, 0, 1);
      __builtin_prefetch(v + i, 0, 1);
    }
  }
};

// Logit soft-capping in place: s = cap * tanh(s / cap) for n scores (cap > 0). std::tanh, not a
// polynomial: the capped scores must stay within float32 rounding of torch.tanh's.
inline void soft_cap(float* s, int64_t n, float cap) {
  const float inv = 1.f / cap;
  for (int64_t i = 0; i < n; ++i) s[i] = cap * std::tanh(s[i] * inv);
}

// Per-thread scratch, grown on demand (sizes in floats).
struct Scratch {
  std::vector<float> a, b, s, m, l, corr, tsum, ones, kpack, vpack, qsc, psc;
  std::vector<int32_t> pos;
  std::vector<uint16_t> pbf;  // row path, bf16 pairs: the probabilities rounded to bf16
  void reserve(int64_t rows, int64_t d, int64_t bs) {
    const int64_t rp = round_up(std::max<int64_t>(rows, 1), kLanes), dp = round_up(d, kLanes);
    const int64_t bp = round_up(bs, kLanes);
    auto grow = [](std::vector<float>& v, int64_t n) { if ((int64_t)v.size() < n) v.resize(n); };
    grow(a, rp * dp);
    grow(b, rp * dp);
    grow(s, rp * bp * blocks_per_tile(bs));
    grow(m, rp);
    if ((int64_t)ones.size() < rp) ones.assign(rp, 1.f);
    grow(l, rp);
    grow(corr, rp);
    grow(tsum, rp);
    grow(qsc, rp);
    grow(psc, rp);
    grow(kpack, bp * dp);
    grow(vpack, bp * dp);
    if ((int64_t)pos.size() < rp) pos.resize(rp);
    if ((int64_t)pbf.size() < rp * bp * blocks_per_tile(bs)) pbf.resize(rp * bp * blocks_per_tile(bs));
  }
};

// ---- bfloat16 pairs (CPUs with AVX512-BF16) ----------------------------------------------------

#if defined(__AVX512F__)
// A row of D floats (D a multiple of 32) from natural order into pair order and back: per chunk of
// 32 dimensions, quarters (4 dims) 0 2 4 6 then 1 3 5 7. The bf16- and int16-pair value passes keep
// their accumulators in this order.
inline void to_pair_order(float* a, int D) {
  for (int d = 0; d < D; d += 32) {
    const __m512 a0 = _mm512_loadu_ps(a + d), a1 = _mm512_loadu_ps(a + d + 16);
    _mm512_storeu_ps(a + d, _mm512_shuffle_f32x4(a0, a1, 0x88));
    _mm512_storeu_ps(a + d + 16, _mm512_shuffle_f32x4(a0, a1, 0xDD));
  }
}

inline void from_pair_order(float* a, int D) {
  for (int d = 0; d < D; d += 32) {
    const __m512 lo = _mm512_loadu_ps(a + d), hi = _mm512_loadu_ps(a + d + 16);
    const __m512 t0 = _mm512_shuffle_f32x4(lo, hi, 0x44), t1 = _mm512_shuffle_f32x4(lo, hi, 0xEE);
    _mm512_storeu_ps(a + d, _mm512_shuffle_f32x4(t0, t0, 0xD8));
    _mm512_storeu_ps(a + d + 16, _mm512_shuffle_f32x4(t1, t1, 0xD8));
  }
}
#endif

// vdpbf16ps multiplies bf16 pairs exactly and adds both products to a float32 lane: one
// instruction does two dimensions (scores) or two keys (values) of 16 lanes, with no widening.
// Both paths use it for bf16 where the CPU has it; elsewhere they widen bf16 to float32.
#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;

// Row path scores: s[r * s_st + c] = scale * q_r . k_c for R rows and the block's keys c < BS
// (BS a multiple of 16), the queries packed as dimension pairs, qp[j * R + r] = (q_r[2j],
// q_r[2j + 1]), unscaled. Dimensions 2j and 2j + 1 of 16 keys are two adjacent 32-byte runs of
// the transposed keys; one vpermw interleaves them into the 16 (dim 2j, dim 2j + 1) pairs.
template <int R>
inline void row_scores_bf16(const uint32_t* qp, int DH, const bf16* kt, int BS, int s_st, float scale, float* s,
                            SpreadPrefetch& pf) {
  constexpr int NA = R <= 2 ? 4 : 2;  // accumulators per row over alternate pairs (DH % NA == 0)
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i il = _mm512_load_si512(kInterleave);
  const uint16_t* k16 = reinterpret_cast<const uint16_t*>(kt);
  for (int c0 = 0; c0 < BS; c0 += 16) {
    __m512 acc[NA][R];
    TM_UNROLL
    for (int a = 0; a < NA; ++a)
      TM_UNROLL
      for (int r = 0; r < R; ++r) acc[a][r] = _mm512_setzero_ps();
    for (int j = 0; j < DH; j += NA) {
      pf.step();
      TM_UNROLL
      for (int a = 0; a < NA; ++a) {
        const uint16_t* lo = k16 + 2 * (j + a) * BS + c0;
        const __m512i both = BS == 16 ? _mm512_loadu_si512(lo)
            : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + BS)), 1);
        const __m512bh kv = (__m512bh)_mm512_permutexvar_epi16(il, both);
        TM_UNROLL
        for (int r = 0; r < R; ++r)
          acc[a][r] = _mm512_dpbf16_ps(acc[a][r], (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[(j + a) * R + r])), kv);
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    TM_UNROLL
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[0][r];
      TM_UNROLL
      for (int a = 1; a < NA; ++a) sum = _mm512_add_ps(sum, acc[a][r]);
      _mm512_storeu_ps(s + r * s_st + c0, _mm512_mul_ps(sum, sc));
    }
  }
}

// Row path values: acc_r = acc_r * corr_r + sum_{c < n} p_r[c] v_c over NC chunks of 32 dimensions
// from d0, the probabilities as bf16 pairs of adjacent keys, pp[r * PP + c / 2] = (p_r[c],
// p_r[c + 1]) (zero past n). vpunpck{l,h}wd of the value rows of keys c and c + 1 give the (key c,
// key c + 1) pairs of dimensions 0-3, 8-11, 16-19, 24-27 and 4-7, 12-15, 20-23, 28-31 of a chunk:
// the accumulators keep that "pair order" ([lo 16][hi 16] per chunk, see to_pair_order) for the
// whole item.
template <int R, int NC>
inline void row_values_bf16(float* acc, int DP, int D, const bf16* v, int d0, int n, const uint32_t* pp, int PP,
                            const float* corr) {
  __m512 lo[R][NC], hi[R][NC];
  TM_UNROLL
  for (int r = 0; r < R; ++r) {
    const __m512 c = _mm512_set1_ps(corr[r]);
    TM_UNROLL
    for (int k = 0; k < NC; ++k) {
      lo[r][k] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * DP + d0 + 32 * k), c);
      hi[r][k] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * DP + d0 + 32 * k + 16), c);
    }
  }
  const uint16_t* v16 = reinterpret_cast<const uint16_t*>(v) + d0;
  for (int c = 0; c < n; c += 2) {
    __m512bh vl[NC], vh[NC];
    TM_UNROLL
    for (int k = 0; k < NC; ++k) {
      const __m512i a = _mm512_loadu_si512(v16 + c * D + 32 * k);
      const __m512i b = c + 1 < n ? _mm512_loadu_si512(v16 + (c + 1) * D + 32 * k) : _mm512_setzero_si512();
      vl[k] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      vh[k] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    TM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[r * PP + c / 2]));
      TM_UNROLL
      for (int k = 0; k < NC; ++k) {
        lo[r][k] = _mm512_dpbf16_ps(lo[r][k], vl[k], pb);
        hi[r][k] = _mm512_dpbf16_ps(hi[r][k], vh[k], pb);
      }
    }
  }
  TM_UNROLL
  for (int r = 0; r < R; ++r)
    TM_UNROLL
    for (int k = 0; k < NC; ++k) {
      _mm512_storeu_ps(acc + r * DP + d0 + 32 * k, lo[r][k]);
      _mm512_storeu_ps(acc + r * DP + d0 + 32 * k + 16, hi[r][k]);
    }
}

// n floats (a multiple of 16) rounded to bf16, to nearest even.
inline void round_to_bf16(const float* src, int n, uint16_t* dst) {
  for (int i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
}
#else
constexpr bool kBf16Dot = false;
#endif

// ---- int8 cache, int16 pairs (CPUs with AVX512-VNNI) ---------------------------------------------

// vpdpwssd multiplies int16 pairs exactly and adds both products to an int32 lane. For an int8
// cache the row path quantizes each query row to int16 (its own scale, max |q| / 32767) and each
// row's probabilities over a softmax step (times the value scales) likewise, sign-extends the
// cache's int8s to int16, and multiplies in integers: exact products and sums (|sum| < 2^31 for
// head_dim <= 256), float32 only per block. The int16 roundings (2^-15 of the row's largest
// element) are far below the int8 cache's own. Same data movement as the bf16 pairs above.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kInt8Dot = true;

// Row path scores from an int8 block: s[r * s_st + c] = qs[r] * (q16_r . k8_c) for R rows and keys
// c < BS (BS a multiple of 16), the int16 queries packed as dimension pairs like row_scores_bf16's.
// The key scales are applied after (scale_columns).
template <int R>
inline void row_scores_i8(const uint32_t* qp, int DH, const int8_t* kt, int BS, int s_st, const float* qs, float* s,
                          SpreadPrefetch& pf) {
  constexpr int NA = R <= 2 ? 4 : 2;
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i il = _mm512_load_si512(kInterleave);
  for (int c0 = 0; c0 < BS; c0 += 16) {
    __m512i acc[NA][R];
    TM_UNROLL
    for (int a = 0; a < NA; ++a)
      TM_UNROLL
      for (int r = 0; r < R; ++r) acc[a][r] = _mm512_setzero_si512();
    for (int j = 0; j < DH; j += NA) {
      pf.step();
      TM_UNROLL
      for (int a = 0; a < NA; ++a) {
        const int8_t* lo = kt + 2 * (j + a) * BS + c0;  // dim 2j's 16 keys, then (BS on) dim 2j + 1's
        const __m256i both = BS == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))
            : _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + BS)), 1);
        const __m512i kv = _mm512_permutexvar_epi16(il, _mm512_cvtepi8_epi16(both));
        TM_UNROLL
        for (int r = 0; r < R; ++r)
          acc[a][r] = _mm512_dpwssd_epi32(acc[a][r], _mm512_set1_epi32(static_cast<int>(qp[(j + a) * R + r])), kv);
      }
    }
    TM_UNROLL
    for (int r = 0; r < R; ++r) {
      __m512i sum = acc[0][r];
      TM_UNROLL
      for (int a = 1; a < NA; ++a) sum = _mm512_add_epi32(sum, acc[a][r]);
      _mm512_storeu_ps(s + r * s_st + c0, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(qs[r])));
    }
  }
}

// Row path values from an int8 block: acc_r = acc_r * corr_r + ps_r * sum_{c < n} p16_r[c] v8_c
// over NC chunks of 32 dimensions from d0, the int16 probabilities as pairs of adjacent keys
// (pp[r * PP + c / 2], zero past n), in row_values_bf16's pair order.
template <int R, int NC>
inline void row_values_i8(float* acc, int DP, int D, const int8_t* v, int d0, int n, const uint32_t* pp, int PP,
                          const float* corr, const float* ps) {
  __m512i lo[R][NC], hi[R][NC];
  TM_UNROLL
  for (int r = 0; r < R; ++r)
    TM_UNROLL
    for (int k = 0; k < NC; ++k) lo[r][k] = hi[r][k] = _mm512_setzero_si512();
  const int8_t* v8 = v + d0;
  for (int c = 0; c < n; c += 2) {
    __m512i vl[NC], vh[NC];
    TM_UNROLL
    for (int k = 0; k < NC; ++k) {
      const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v8 + c * D + 32 * k)));
      const __m512i b = c + 1 < n
          ? _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v8 + (c + 1) * D + 32 * k)))
          : _mm512_setzero_si512();
      vl[k] = _mm512_unpacklo_epi16(a, b);
      vh[k] = _mm512_unpackhi_epi16(a, b);
    }
    TM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512i pb = _mm512_set1_epi32(static_cast<int>(pp[r * PP + c / 2]));
      TM_UNROLL
      for (int k = 0; k < NC; ++k) {
        lo[r][k] = _mm512_dpwssd_epi32(lo[r][k], vl[k], pb);
        hi[r][k] = _mm512_dpwssd_epi32(hi[r][k], vh[k], pb);
      }
    }
  }
  TM_UNROLL
  for (int r = 0; r < R; ++r) {
    const __m512 c = _mm512_set1_ps(corr[r]), sc = _mm512_set1_ps(ps[r]);
    TM_UNROLL
    for (int k = 0; k < NC; ++k) {
      float* a = acc + r * DP + d0 + 32 * k;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[r][k]), sc, _mm512_mul_ps(_mm512_loadu_ps(a), c)));
      _mm512_storeu_ps(a + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[r][k]), sc,
                                               _mm512_mul_ps(_mm512_loadu_ps(a + 16), c)));
    }
  }
}

// n floats (a multiple of 16) to int16 with one scale, max |x| / 32767 (returned; 0 and zeros for
// an all-zero row), x * (32767 / max) rounded to nearest even: an int8 cache's queries and
// probabilities for the int16-pair row path.
inline float quantize_int16(const float* x, int n, int16_t* dst) {
  __m512 amax = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  const float m = _mm512_reduce_max_ps(amax);
  const __m512 inv = _mm512_set1_ps(m > 0.f ? 32767.f / m : 0.f);
  for (int i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv))));
  return m / 32767.f;
}
#else
constexpr bool kInt8Dot = false;
#endif

// ---- scalar reference (the tests' second opinion) ------------------------------------------

template <typename T, typename I, typename C>
void run_item_scalar(const Problem<T, I, C>& p, const Item& x, Scratch& sc) {
  const int D = p.head_dim, BS = p.block_size;
  float* acc = sc.a.data();
  for (int h = x.h0; h < x.h0 + x.nh; ++h) {
    for (int m = 0; m < x.rows; ++m) {
      const T* q = q_row(p, x, h, m);
      const int pos = x.pos0 + m / p.group;
      float mx = kNegInf, l = 0.f;
      std::fill(acc, acc + D, 0.f);
      for (int key = p.first_key(pos); key <= pos; ++key) {
        const int64_t blk = block_of(p, x, key / BS);
        const C* kt = p.keys(blk, h) + key % BS;
        const C* v = p.values(blk, h) + (key % BS) * D;
        float ks = 1.f, vs = 1.f;  // int8: the key's and the value's scales
        if constexpr (Problem<T, I, C>::kQuant) {
          ks = p.key_scales(blk, h)[key % BS];
          vs = p.value_scales(blk, h)[key % BS];
        }
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += to_float(q[d]) * (to_float(kt[d * BS]) * ks);
        s *= p.scale;
        if (p.softcap > 0.f) s = p.softcap * std::tanh(s / p.softcap);
        const float mnew = std::max(mx, s);
        const float corr = std::exp(mx - mnew), e = std::exp(s - mnew);
        l = l * corr + e;
        for (int d = 0; d < D; ++d) acc[d] = acc[d] * corr + e * (to_float(v[d]) * vs);
        mx = mnew;
      }
      T* o = out_row(p, x, h, m);
      for (int d = 0; d < D; ++d) o[d] = from_float<T>(acc[d] / l);
    }
  }
}

// ---- row path: few query rows (decode tokens, tiny chunks) -----------------------------------

// s[r * s_st + c] = q_r . k_c for R rows (packed float, pre-scaled, dimension-major: q[d * R + r])
// and the block's keys c < BS, from the block's transposed keys kt [D][BS]. NA accumulators per
// row, over alternate dimensions, so that the FMA latency does not bound the loop (R * NA
// independent chains).
template <int R, bool kFull, typename T>
inline void row_scores(const float* q, int D, const T* kt, int BS, int s_st, float* s, SpreadPrefetch& pf) {
  constexpr int NA = kLanes >= 16 ? (R <= 2 ? 4 : 2) : (R <= 2 ? 2 : 1);
  for (int c0 = 0; c0 < BS; c0 += kLanes) {
    const int w = kFull ? kLanes : std::min(kLanes, BS - c0);
    vfloat acc[NA][R];
    TM_UNROLL
    for (int a = 0; a < NA; ++a)
      TM_UNROLL
      for (int r = 0; r < R; ++r) acc[a][r] = vfloat{};
    const T* k = kt + c0;
    int d = 0;
    for (; d + NA <= D; d += NA) {
      pf.step();
      TM_UNROLL
      for (int a = 0; a < NA; ++a) {
        const vfloat kv = kFull ? load(k + (d + a) * BS) : ld(k + (d + a) * BS, w);
        TM_UNROLL
        for (int r = 0; r < R; ++r) acc[a][r] += q[(d + a) * R + r] * kv;
      }
    }
    for (; d < D; ++d) {
      const vfloat kv = ld(k + d * BS, w);
      TM_UNROLL
      for (int r = 0; r < R; ++r) acc[0][r] += q[d * R + r] * kv;
    }
    TM_UNROLL
    for (int r = 0; r < R; ++r) {
      vfloat sum = acc[0][r];
      TM_UNROLL
      for (int a = 1; a < NA; ++a) sum += acc[a][r];
      store(s + r * s_st + c0, sum);
    }
  }
}

// acc_r = acc_r * corr_r + sum_{c < n} p[r * SP + c] * v_c for R rows (stride DP), from the
// block's value rows v [BS][D]; NV vectors of dimensions at a time, held in registers.
template <int R, typename T>
inline void row_values(float* acc, int DP, int D, const T* v, int n, const float* p, int SP, const float* corr) {
  constexpr int NV = R >= 4 ? 3 : 4;
  const bool full = D % kLanes == 0;
  for (int d0 = 0; d0 < D; d0 += NV * kLanes) {
    const int nv = std::min<int>(NV, (D - d0 + kLanes - 1) / kLanes);
    if (full && nv == NV) {
      vfloat a[R][NV];
      TM_UNROLL
      for (int r = 0; r < R; ++r)
        TM_UNROLL
        for (int i = 0; i < NV; ++i) a[r][i] = load(acc + r * DP + d0 + i * kLanes) * corr[r];
      const T* vr = v + d0;
      for (int c = 0; c < n; ++c, vr += D) {
        vfloat vv[NV];
        TM_UNROLL
        for (int i = 0; i < NV; ++i) vv[i] = load(vr + i * kLanes);
        TM_UNROLL
        for (int r = 0; r < R; ++r) {
          const float pr = p[r * SP + c];
          TM_UNROLL
          for (int i = 0; i < NV; ++i) a[r][i] += pr * vv[i];
        }
      }
      TM_UNROLL
      for (int r = 0; r < R; ++r)
        TM_UNROLL
        for (int i = 0; i < NV; ++i) store(acc + r * DP + d0 + i * kLanes, a[r][i]);
    } else {  // the last, partial group of dimensions (or a head_dim that is not whole vectors)
      for (int i = 0; i < nv; ++i) {
        const int d = d0 + i * kLanes, w = std::min(kLanes, D - d);
        vfloat a[R];
        TM_UNROLL
        for (int r = 0; r < R; ++r) a[r] = load(acc + r * DP + d) * corr[r];
        for (int c = 0; c < n; ++c) {
          const vfloat vv = ld(v + c * D + d, w);
          TM_UNROLL
          for (int r = 0; r < R; ++r) a[r] += p[r * SP + c] * vv;
        }
        TM_UNROLL
        for (int r = 0; r < R; ++r) store(acc + r * DP + d, a[r]);
      }
    }
  }
}

// a[r * st + c] *= scale[c] for rows r < rows and columns c < n: an int8 cache's per-key scales
// applied to a block's scores (key scales) or to its probabilities (value scales).
inline void scale_columns(float* a, int rows, int stride, const float* scale, int n) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < n; c += kLanes) {
      const int w = std::min(kLanes, n - c);
      st(a + r * stride + c, ld(a + r * stride + c, w) * ld(scale + c, w), w);
    }
}

template <typename Fn>
inline void for_row_groups(int rows, Fn&& fn) {
  // Groups of up to 4 rows: 4 score accumulators, or 4 x 3 value accumulators, in registers.
  int r = 0;
  for (; r + 4 <= rows; r += 4) fn(std::integral_constant<int, 4>(), r);
  switch (rows - r) {
    case 3: fn(std::integral_constant<int, 3>(), r); break;
    case 2: fn(std::integral_constant<int, 2>(), r); break;
    case 1: fn(std::integral_constant<int, 1>(), r); break;
    default: break;
  }
}

// The (block, KV head) units of a row-path item in the order it visits them: tile by tile, within
// a tile head by head, block by block. The prefetch runs a few units ahead of the computation.
struct UnitCursor {
  int t0, h, b, tile_blocks, heads, num_blocks;
  bool valid() const { return t0 < num_blocks; }
  int block() const { return t0 + b; }
  void advance() {
    if (++b == std::min(tile_blocks, num_blocks - t0)) {
      b = 0;
      if (++h == heads) {
        h = 0;
        t0 += tile_blocks;
      }
    }
  }
};

template <typename T, typename I, typename C>
void run_item_rows(const Problem<T, I, C>& p, const Item& x, Scratch& sc) {
  const int D = p.head_dim, BS = p.block_size, M = x.rows * x.nh;  // rows of head h0 + i are rows i * x.rows ...
  const int DP = static_cast<int>(round_up(D, kLanes)), SP = static_cast<int>(round_up(BS, kLanes));
  const int TB = blocks_per_tile(BS), TS = TB * SP;  // a softmax step covers TB blocks; block b's scores at b * SP
  float* q = sc.a.data();    // [M][DP] packed query rows, pre-scaled
  float* acc = sc.b.data();  // [M][DP]
  float* s = sc.s.data();    // [M][TS] scores, then probabilities
  float* mx = sc.m.data();
  float* l = sc.l.data();
  float* corr = sc.corr.data();
  float* tsum = sc.tsum.data();
  float* ones = sc.ones.data();
  // bf16 on a CPU with AVX512-BF16 (whole 16-key groups, whole 32-dim chunks): scores and values
  // by vdpbf16ps on bf16 pairs (see row_scores_bf16, row_values_bf16); the probabilities are
  // rounded to bf16 for the value pass, as torch's bf16 attention does. Elsewhere K/V are widened.
  constexpr bool kPairs = kBf16Dot && std::is_same_v<T, bf16> && std::is_same_v<C, bf16>;
  constexpr bool kQuant = Problem<T, I, C>::kQuant;
  const bool pairs = kPairs && BS % 16 == 0 && D % 32 == 0;
  // An int8 cache on a CPU with AVX512-VNNI: int16 queries and probabilities times the int8s
  // sign-extended to int16, by vpdpwssd (see row_scores_i8); elsewhere the int8s are widened.
  constexpr bool kI16 = kInt8Dot && kQuant;
  const bool i16 = kI16 && BS % 16 == 0 && D % 32 == 0 && D <= 256;
  float* qsc = sc.qsc.data();  // i16: each row's query scale (times the softmax scale)
  float* psc = sc.psc.data();  // i16: each row's probability scale over the current softmax step
  uint16_t* pbf = sc.pbf.data();  // [M][TS] the probabilities in bf16 (pairs)
  const int64_t head_bytes = p.unit_bytes();  // K (or V) of one head of a block, an int8 cache's scales included
  const int num_blocks = (x.key_end + BS - 1) / BS;
  // pf.step() calls per block's score pass: one per 16 keys and NA dimensions (pairs: 2 pairs).
  const int64_t pf_per_step = SpreadPrefetch::bytes_per_step(
      head_bytes, (BS + kLanes - 1) / kLanes * (pairs || i16 ? D / 4 : D / 2));
  // Blocks wholly before the first row's window are never read (a windowed item has no prefix state).
  const int kb_first = std::max(x.kb0, p.first_key(x.pos0) / BS);
  // The prefetch runs kPrefetchUnits (block, head) units ahead: the first ones at once, while the
  // queries are packed, then one unit spread over each unit's score pass.
  UnitCursor ahead{kb_first, 0, 0, TB, x.nh, num_blocks};
  for (int i = 0; i < kPrefetchUnits && ahead.valid(); ++i, ahead.advance()) {
    const int64_t first = block_of(p, x, ahead.block());
    prefetch(p.keys(first, x.h0 + ahead.h), head_bytes);
    prefetch(p.values(first, x.h0 + ahead.h), head_bytes);
  }
  // Each group of R rows (as for_row_groups cuts them) is packed dimension-major, [D][R] at the
  // group's first row: row_scores then reads the R queries of a dimension from one pointer.
  for (int h = 0; h < x.nh; ++h)
    for_row_groups(x.rows, [&](auto R, int r) {
      constexpr int kR = decltype(R)::value;
      float* dst = q + (h * x.rows + r) * DP;
      for (int i = 0; i < kR; ++i) {
        const T* src = q_row(p, x, x.h0 + h, r + i);
        if (pairs) {  // (dim 2j, dim 2j + 1) of each row, unscaled
          for (int j = 0; j < D / 2; ++j) std::memcpy(reinterpret_cast<uint32_t*>(dst) + j * kR + i, src + 2 * j, 4);
        } else if (i16) {  // the same pairs of the row quantized to int16 (D <= 256)
          if constexpr (kI16) {
            float row[256];
            int16_t row16[256];
            for (int d = 0; d < D; ++d) row[d] = to_float(src[d]);
            qsc[h * x.rows + r + i] = quantize_int16(row, D, row16) * p.scale;
            for (int j = 0; j < D / 2; ++j)
              std::memcpy(reinterpret_cast<uint32_t*>(dst) + j * kR + i, row16 + 2 * j, 4);
          }
        } else
          for (int d = 0; d < D; ++d) dst[d * kR + i] = to_float(src[d]) * p.scale;
      }
    });
  if (x.state_in) {
    for (int h = 0; h < x.nh; ++h)
      for (int m = 0; m < x.rows; ++m) {
        const int64_t s_i = state_index(p, x, x.h0 + h, m);
        const int r = h * x.rows + m;
        mx[r] = p.state_m[s_i];
        l[r] = p.state_l[s_i];
        std::copy(p.state_acc + s_i * D, p.state_acc + (s_i + 1) * D, acc + r * DP);
        if constexpr (kPairs || kI16)
          if (pairs || i16) to_pair_order(acc + r * DP, D);
      }
  } else {
    std::fill(mx, mx + M, kNegInf);
    std::fill(l, l + M, 0.f);
    std::fill(acc, acc + M * DP, 0.f);
  }
  const vfloat lane = lane_index();
  int64_t blk[kMaxTileBlocks];
  for (int t0 = kb_first; t0 < num_blocks; t0 += TB) {
    const int nb = std::min(TB, num_blocks - t0);
    for (int b = 0; b < nb; ++b) blk[b] = block_of(p, x, t0 + b);
    for (int h = 0; h < x.nh; ++h) {
      const int r0 = h * x.rows;
      for (int b = 0; b < nb; ++b) {
        // The unit kPrefetchUnits ahead, spread over this block's score pass (BS/lanes x D/2 steps).
        SpreadPrefetch pf;
        if (ahead.valid()) {
          const int64_t next = block_of(p, x, ahead.block());
          pf = SpreadPrefetch(p.keys(next, x.h0 + ahead.h), p.values(next, x.h0 + ahead.h), head_bytes,
                              pf_per_step);
          ahead.advance();
        }
        const C* kt = p.keys(blk[b], x.h0 + h);
        for_row_groups(x.rows, [&](auto R, int r) {
          constexpr int kR = decltype(R)::value;
          float* out = s + (r0 + r) * TS + b * SP;
          if constexpr (kPairs)
            if (pairs) {
              row_scores_bf16<kR>(reinterpret_cast<const uint32_t*>(q + (r0 + r) * DP), D / 2, kt, BS, TS, p.scale,
                                  out, pf);
              return;
            }
          if constexpr (kI16)
            if (i16) {
              row_scores_i8<kR>(reinterpret_cast<const uint32_t*>(q + (r0 + r) * DP), D / 2, kt, BS, TS, qsc + r0 + r,
                                out, pf);
              return;
            }
          if (BS % kLanes == 0) row_scores<kR, true>(q + (r0 + r) * DP, D, kt, BS, TS, out, pf);
          else row_scores<kR, false>(q + (r0 + r) * DP, D, kt, BS, TS, out, pf);
        });
        if constexpr (kQuant) scale_columns(s + r0 * TS + b * SP, x.rows, TS, p.key_scales(blk[b], x.h0 + h), BS);
        pf.finish();
      }
      // The softmax step of each row over the tile: key k of block b is visible iff it exists and
      // lies at or before the row's position and, with a window, within it (keys lo .. hi - 1 of
      // the block; only blocks with fewer than SP visible keys are masked). corr holds exponents
      // until the vector exp below.
      for (int m = r0; m < r0 + x.rows; ++m) {
        const int last = x.pos0 + (m - r0) / p.group;  // the row's position
        float* sm = s + m * TS;
        if (p.softcap > 0.f) soft_cap(sm, nb * SP, p.softcap);
        vfloat tmax = splat(kNegInf);
        bool any = false;
        for (int b = 0; b < nb; ++b) {
          const int k0 = (t0 + b) * BS;
          const int hi = std::min(std::min(BS, x.key_end - k0), last + 1 - k0);
          const int lo = p.first_key(last) - k0;
          any |= hi > std::max(lo, 0);
          if (lo <= 0 && hi == SP) {
            for (int c0 = 0; c0 < SP; c0 += kLanes) tmax = vmax(tmax, load(sm + b * SP + c0));
            continue;
          }
          for (int c0 = 0; c0 < SP; c0 += kLanes) {  // masked lanes become 0 after the exp
            const vfloat v = (lane < static_cast<float>(hi - c0)) & (lane >= static_cast<float>(lo - c0))
                                 ? load(sm + b * SP + c0) : splat(kNegInf);
            store(sm + b * SP + c0, v);
            tmax = vmax(tmax, v);
          }
        }
        if (!any) {  // the whole tile lies after this row's position: the row keeps its state
          std::fill(sm, sm + nb * SP, 0.f);
          corr[m] = 0.f;
          tsum[m] = 0.f;
          continue;
        }
        const float mnew = std::max(mx[m], reduce_max(tmax));
        vfloat sum{};
        for (int c0 = 0; c0 < nb * SP; c0 += kLanes) {
          const vfloat e = vexp(load(sm + c0) - mnew);
          store(sm + c0, e);
          sum += e;
        }
        corr[m] = mx[m] - mnew;  // -inf on the first tile (mx = -inf): exp gives 0
        tsum[m] = reduce_add(sum);
        mx[m] = mnew;
      }
      for (int m = r0; m < r0 + x.rows; m += kLanes) {
        const int w = std::min(kLanes, r0 + x.rows - m);
        const vfloat c = vexp(ld(corr + m, w));
        st(corr + m, c, w);
        st(l + m, ld(l + m, w) * c + ld(tsum + m, w), w);
      }
      if constexpr (kPairs)
        if (pairs)
          for (int m = r0; m < r0 + x.rows; ++m) round_to_bf16(s + m * TS, nb * SP, pbf + m * TS);
      if constexpr (kI16)
        if (i16) {  // the probabilities times the value scales, then to int16 per row over the step
          for (int b = 0; b < nb; ++b)
            scale_columns(s + r0 * TS + b * SP, x.rows, TS, p.value_scales(blk[b], x.h0 + h),
                          std::min(BS, x.key_end - (t0 + b) * BS));
          for (int m = r0; m < r0 + x.rows; ++m)
            psc[m] = quantize_int16(s + m * TS, nb * SP, reinterpret_cast<int16_t*>(pbf + m * TS));
        }
      for (int b = 0; b < nb; ++b) {
        const C* vb = p.values(blk[b], x.h0 + h);
        const int n = std::min(BS, x.key_end - (t0 + b) * BS);
        // int8: each key's probability times its value's scale (l has the unscaled sum already).
        if constexpr (kQuant)
          if (!i16) scale_columns(s + r0 * TS + b * SP, x.rows, TS, p.value_scales(blk[b], x.h0 + h), n);
        for_row_groups(x.rows, [&](auto R, int r) {  // the rescale by corr once per tile, with the first block
          constexpr int kR = decltype(R)::value;
          const float* cr = b == 0 ? corr + r0 + r : ones;
          if constexpr (kI16)
            if (i16) {
              const uint32_t* pp = reinterpret_cast<const uint32_t*>(pbf + (r0 + r) * TS + b * SP);
              int d0 = 0;
              for (; d0 + 64 <= D; d0 += 64)
                row_values_i8<kR, 2>(acc + (r0 + r) * DP, DP, D, vb, d0, n, pp, TS / 2, cr, psc + r0 + r);
              if (d0 < D) row_values_i8<kR, 1>(acc + (r0 + r) * DP, DP, D, vb, d0, n, pp, TS / 2, cr, psc + r0 + r);
              return;
            }
          if constexpr (kPairs)
            if (pairs) {
              const uint32_t* pp = reinterpret_cast<const uint32_t*>(pbf + (r0 + r) * TS + b * SP);
              int d0 = 0;
              for (; d0 + 64 <= D; d0 += 64)
                row_values_bf16<kR, 2>(acc + (r0 + r) * DP, DP, D, vb, d0, n, pp, TS / 2, cr);
              if (d0 < D) row_values_bf16<kR, 1>(acc + (r0 + r) * DP, DP, D, vb, d0, n, pp, TS / 2, cr);
              return;
            }
          row_values<kR>(acc + (r0 + r) * DP, DP, D, vb, n, s + (r0 + r) * TS + b * SP, TS, cr);
        });
      }
    }
  }
  for (int h = 0; h < x.nh; ++h)
    for (int m = 0; m < x.rows; ++m) {
      T* o = out_row(p, x, x.h0 + h, m);
      float* a = acc + (h * x.rows + m) * DP;
      if constexpr (kPairs || kI16)
        if (pairs || i16) from_pair_order(a, D);
      const float inv = 1.f / l[h * x.rows + m];
      for (int d = 0; d < D; d += kLanes) st(o + d, load(a + d) * inv, std::min(kLanes, D - d));
    }
}

// ---- tile path: prompt chunks, query rows along the vector lanes -----------------------------

// st[c * MP + r] = sum_d k_c[d] * qt[d * MP + r] for keys c0 .. c0 + 4 (rows of kf, stride DP;
// the ones past the block's end repeat its last key), rows r .. r + kLanes * NV.
template <int NV>
inline void tile_scores_block(const float* qt, int MP, int D, const float* const* k, int c0, float* st, int r) {
  vfloat a[4][NV];
  TM_UNROLL
  for (int i = 0; i < 4; ++i)
    TM_UNROLL
    for (int v = 0; v < NV; ++v) a[i][v] = vfloat{};
  const float* qd = qt + r;
  for (int d = 0; d < D; ++d, qd += MP) {
    vfloat qv[NV];
    TM_UNROLL
    for (int v = 0; v < NV; ++v) qv[v] = load(qd + kLanes * v);
    TM_UNROLL
    for (int i = 0; i < 4; ++i) {
      const float kb = k[i][d];
      TM_UNROLL
      for (int v = 0; v < NV; ++v) a[i][v] += kb * qv[v];
    }
  }
  // All 4 rows, the padding ones too (the buffer has room).
  TM_UNROLL
  for (int i = 0; i < 4; ++i)
    TM_UNROLL
    for (int v = 0; v < NV; ++v) store(st + (c0 + i) * MP + r + kLanes * v, a[i][v]);
}

#if defined(__AVX512BF16__)
// The bf16 tile scores: one vdpbf16ps does two dimensions of 16 rows. Queries and keys are packed
// as pairs of adjacent dimensions (one uint32: dim 2j in the low half, 2j + 1 in the high), the
// queries unscaled (their bf16 values are exact; the scale is applied to the float32 scores).

// st[c * MP + r] = scale * sum_j qp[j * MP + r] . kp[j * BS + c] for keys c0 .. c0 + 4 (the
// ones past the block's end repeat its last key), rows r .. r + 16 * NV.
template <int NV>
inline void tile_scores_block_bf16(const uint32_t* qp, int MP, int DH, const uint32_t* const* k, int BS, int c0,
                                   float scale, float* st, int r) {
  __m512 a[4][NV];
  TM_UNROLL
  for (int i = 0; i < 4; ++i)
    TM_UNROLL
    for (int v = 0; v < NV; ++v) a[i][v] = _mm512_setzero_ps();
  const uint32_t* qj = qp + r;
  for (int j = 0; j < DH; ++j, qj += MP) {
    __m512bh qv[NV];
    TM_UNROLL
    for (int v = 0; v < NV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(qj + kLanes * v);
    TM_UNROLL
    for (int i = 0; i < 4; ++i) {
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(static_cast<int>(k[i][j * BS]));
      TM_UNROLL
      for (int v = 0; v < NV; ++v) a[i][v] = _mm512_dpbf16_ps(a[i][v], qv[v], kb);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  TM_UNROLL
  for (int i = 0; i < 4; ++i)
    TM_UNROLL
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(st + (c0 + i) * MP + r + kLanes * v, _mm512_mul_ps(a[i][v], sc));
}
#endif

// Row blocks of 3 vectors, then one of 2 or 1: MP is a multiple of kLanes.
template <typename Fn>
inline void for_vector_blocks(int MP, Fn&& fn) {
  int r = 0;
  for (; r + 3 * kLanes <= MP; r += 3 * kLanes) fn(std::integral_constant<int, 3>(), r);
  if (MP - r == 2 * kLanes) fn(std::integral_constant<int, 2>(), r);
  else if (MP - r == kLanes) fn(std::integral_constant<int, 1>(), r);
}

// st[c * MP + r] = sum_d kf[c][d] * qt[d * MP + r]  for keys c < n, rows r < MP.
inline void tile_scores(const float* qt, int MP, int D, const float* kf, int DP, int n, float* st) {
  for (int c0 = 0; c0 < n; c0 += 4) {
    const float* k[4];
    TM_UNROLL
    for (int i = 0; i < 4; ++i) k[i] = kf + std::min(c0 + i, n - 1) * DP;
    for_vector_blocks(MP, [&](auto NV, int r) { tile_scores_block<decltype(NV)::value>(qt, MP, D, k, c0, st, r); });
  }
}

// ot[d * MP + r] = ot[d * MP + r] * corr[r] + sum_c vf[c][d] * pt[c * MP + r], rows r .. r + kLanes * NV.
template <int NV>
inline void tile_values_block(float* ot, int MP, int D, const float* vf, int DP, int n, const float* pt,
                              const float* corr, int r) {
  vfloat cr[NV];
  TM_UNROLL
  for (int v = 0; v < NV; ++v) cr[v] = load(corr + r + kLanes * v);
  int d = 0;
  for (; d + 4 <= D; d += 4) {
    vfloat a[4][NV];
    TM_UNROLL
    for (int i = 0; i < 4; ++i)
      TM_UNROLL
      for (int v = 0; v < NV; ++v) a[i][v] = load(ot + (d + i) * MP + r + kLanes * v) * cr[v];
    const float* pc = pt + r;
    const float* vc = vf + d;
    for (int c = 0; c < n; ++c, pc += MP, vc += DP) {
      vfloat pv[NV];
      TM_UNROLL
      for (int v = 0; v < NV; ++v) pv[v] = load(pc + kLanes * v);
      TM_UNROLL
      for (int i = 0; i < 4; ++i) {
        const float vb = vc[i];
        TM_UNROLL
        for (int v = 0; v < NV; ++v) a[i][v] += vb * pv[v];
      }
    }
    TM_UNROLL
    for (int i = 0; i < 4; ++i)
      TM_UNROLL
      for (int v = 0; v < NV; ++v) store(ot + (d + i) * MP + r + kLanes * v, a[i][v]);
  }
  for (; d < D; ++d) {
    vfloat a[NV];
    TM_UNROLL
    for (int v = 0; v < NV; ++v) a[v] = load(ot + d * MP + r + kLanes * v) * cr[v];
    for (int c = 0; c < n; ++c) {
      const float vb = vf[c * DP + d];
      TM_UNROLL
      for (int v = 0; v < NV; ++v) a[v] += vb * load(pt + c * MP + r + kLanes * v);
    }
    TM_UNROLL
    for (int v = 0; v < NV; ++v) store(ot + d * MP + r + kLanes * v, a[v]);
  }
}

inline void tile_values(float* ot, int MP, int D, const float* vf, int DP, int n, const float* pt,
                        const float* corr) {
  for_vector_blocks(MP, [&](auto NV, int r) { tile_values_block<decltype(NV)::value>(ot, MP, D, vf, DP, n, pt, corr, r); });
}

#if defined(__AVX512BF16__)
// st[c * MP + r] = scale * Q K^T for keys c < n, rows r < MP, from the packed pairs (see above).
inline void tile_scores_bf16(const uint32_t* qp, int MP, int DH, const uint32_t* kp, int BS, int n, float scale,
                             float* st) {
  for (int c0 = 0; c0 < n; c0 += 4) {
    const uint32_t* k[4];
    TM_UNROLL
    for (int i = 0; i < 4; ++i) k[i] = kp + std::min(c0 + i, n - 1);
    for_vector_blocks(MP, [&](auto NV, int r) {
      tile_scores_block_bf16<decltype(NV)::value>(qp, MP, DH, k, BS, c0, scale, st, r);
    });
  }
}
#endif

// The block's keys as pairs of adjacent dimensions, kp[j * BS + c] = (kt[2j][c], kt[2j + 1][c]),
// from the transposed kt [D][BS] (D even): two rows of kt interleaved, contiguous on both sides.
inline void pair_keys(const bf16* kt, int BS, int D, uint32_t* kp) {
  const uint16_t* k = reinterpret_cast<const uint16_t*>(kt);
  for (int j = 0; j < D / 2; ++j) {
    const uint16_t* lo = k + 2 * j * BS;
    const uint16_t* hi = lo + BS;
    uint32_t* out = kp + j * BS;
    for (int c = 0; c < BS; ++c) out[c] = static_cast<uint32_t>(lo[c]) | static_cast<uint32_t>(hi[c]) << 16;
  }
}

// The block's first n keys as float rows kf[c][d] (stride DP), from the transposed kt [D][BS];
// an int8 cache's keys times their scales (scale: BS floats, null otherwise).
template <typename T>
inline void widen_keys(const T* kt, int BS, int D, int n, int DP, float* kf, const float* scale) {
  for (int d = 0; d < D; ++d)
    for (int c = 0; c < n; ++c) kf[c * DP + d] = to_float(kt[d * BS + c]) * (scale ? scale[c] : 1.f);
}

// The block's first n value rows as float rows vf[c][d] (stride DP); int8: times their scales.
template <typename T>
inline void widen_values(const T* v, int D, int n, int DP, float* vf, const float* scale) {
  for (int c = 0; c < n; ++c) {
    const float sc = scale ? scale[c] : 1.f;
    for (int d = 0; d < D; d += kLanes) {
      const int w = std::min(kLanes, D - d);
      store(vf + c * DP + d, ld(v + c * D + d, w) * sc);
    }
  }
}

template <typename T, typename I, typename C>
void run_item_tile(const Problem<T, I, C>& p, const Item& x, Scratch& sc) {
  const int D = p.head_dim, M = x.rows, BS = p.block_size;
  const int MP = static_cast<int>(round_up(M, kLanes)), DP = static_cast<int>(round_up(D, kLanes));
  float* qt = sc.a.data();  // Q^T [D][MP], pre-scaled
  float* ot = sc.b.data();  // O^T [D][MP]
  float* st = sc.s.data();  // S^T / P^T [BS][MP]
  float* mx = sc.m.data();
  float* l = sc.l.data();
  float* corr = sc.corr.data();
  float* kf = sc.kpack.data();
  float* vf = sc.vpack.data();
  int32_t* pos = sc.pos.data();
  // bf16 on a CPU with AVX512-BF16: scores from bf16 pairs (Q packed [D/2][MP], K per block
  // [D/2][BS]) instead of widened floats; the values stay float32.
  constexpr bool kPairs = kBf16Dot && std::is_same_v<T, bf16> && std::is_same_v<C, bf16>;
  const bool pairs = kPairs && D % 2 == 0;
  uint32_t* qp = reinterpret_cast<uint32_t*>(qt);
  uint32_t* kp = reinterpret_cast<uint32_t*>(kf);
  for (int m = 0; m < MP; ++m) {
    if (m < M) {
      const T* src = q_row(p, x, x.h0, m);
      if (pairs)
        for (int j = 0; j < D / 2; ++j) std::memcpy(qp + j * MP + m, src + 2 * j, sizeof(uint32_t));
      else
        for (int d = 0; d < D; ++d) qt[d * MP + m] = to_float(src[d]) * p.scale;
      pos[m] = x.pos0 + m / p.group;
    } else {  // padding rows: zero queries at the first row's position (finite, never NaN)
      if (pairs)
        for (int j = 0; j < D / 2; ++j) qp[j * MP + m] = 0;
      else
        for (int d = 0; d < D; ++d) qt[d * MP + m] = 0.f;
      pos[m] = x.pos0;
    }
    mx[m] = kNegInf;
    l[m] = 0.f;
  }
  std::fill(ot, ot + D * MP, 0.f);
  if (x.state_in) {
    for (int m = 0; m < M; ++m) {
      const int64_t s_i = state_index(p, x, x.h0, m);
      mx[m] = p.state_m[s_i];
      l[m] = p.state_l[s_i];
      for (int d = 0; d < D; ++d) ot[d * MP + m] = p.state_acc[s_i * D + d];
    }
  }
  const int num_blocks = (x.key_end + BS - 1) / BS;
  const int last_pos = x.pos0 + (M - 1) / p.group;  // the last row's position
  // Blocks wholly before the first row's window are never read (a windowed item has no prefix state).
  const int kb_first = std::max(x.kb0, p.first_key(x.pos0) / BS);
  for (int kb = kb_first; kb < num_blocks; ++kb) {
    const int k0 = kb * BS, n = std::min(BS, x.key_end - k0);
    const int64_t blk = block_of(p, x, kb);
    if constexpr (kPairs) {
      if (pairs) {
        pair_keys(p.keys(blk, x.h0), BS, D, kp);
#if defined(__AVX512BF16__)
        tile_scores_bf16(qp, MP, D / 2, kp, BS, n, p.scale, st);
#endif
      }
    }
    if (!pairs) {
      widen_keys(p.keys(blk, x.h0), BS, D, n, DP, kf, Problem<T, I, C>::kQuant ? p.key_scales(blk, x.h0) : nullptr);
      tile_scores(qt, MP, D, kf, DP, n, st);
    }
    widen_values(p.values(blk, x.h0), D, n, DP, vf, Problem<T, I, C>::kQuant ? p.value_scales(blk, x.h0) : nullptr);
    if (p.softcap > 0.f) soft_cap(st, static_cast<int64_t>(n) * MP, p.softcap);
    // Some key lies after some row's position, or before some row's window.
    const bool diagonal = k0 + n - 1 > x.pos0 || k0 < p.first_key(last_pos);
    const int window = p.window > 0 ? p.window : std::numeric_limits<int>::max() / 2;
    for (int r = 0; r < MP; r += kLanes) {
      const vfloat mold = load(mx + r);
      vfloat mnew = mold;
      if (diagonal) {
        vint rpos;
        std::memcpy(&rpos, pos + r, sizeof rpos);
        for (int c = 0; c < n; ++c) {
          // visible iff row position - window < key position k0 + c <= row position
          const vfloat v = (rpos >= k0 + c) & (rpos < k0 + c + window) ? load(st + c * MP + r) : splat(kNegInf);
          store(st + c * MP + r, v);
          mnew = vmax(mnew, v);
        }
      } else {
        for (int c = 0; c < n; ++c) mnew = vmax(mnew, load(st + c * MP + r));
      }
      // A row that sees none of the block's keys (only with a window) and none before keeps
      // mnew = -inf: subtract 0 instead, so its exps are 0, not NaN.
      const vfloat msub = mnew == splat(kNegInf) ? vfloat{} : mnew;
      vfloat sum{};
      for (int c = 0; c < n; ++c) {
        const vfloat e = vexp(load(st + c * MP + r) - msub);
        store(st + c * MP + r, e);
        sum += e;
      }
      // mold = -inf on a row's first visible block gives corr = 0.
      const vfloat cr = vexp(mold - msub);
      store(corr + r, cr);
      store(l + r, load(l + r) * cr + sum);
      store(mx + r, mnew);
    }
    tile_values(ot, MP, D, vf, DP, n, st, corr);
  }
  if (x.state_out) {
    for (int m = 0; m < M; ++m) {
      const int64_t s_i = state_index(p, x, x.h0, m);
      p.state_m[s_i] = mx[m];
      p.state_l[s_i] = l[m];
      for (int d = 0; d < D; ++d) p.state_acc[s_i * D + d] = ot[d * MP + m];
    }
    return;
  }
  for (int m = 0; m < M; ++m) {
    T* o = out_row(p, x, x.h0, m);
    const float inv = 1.f / l[m];
    for (int d = 0; d < D; ++d) o[d] = from_float<T>(ot[d * MP + m] * inv);
  }
}

// ---- driver ------------------------------------------------------------------------------------

// Runs work(scratch, i) for i < n on the torch threads, each taking the next item from a counter.
template <typename Fn>
void for_each_item(int64_t n, int64_t max_rows, int64_t head_dim, int64_t block_size, Fn&& work) {
  const int threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1) {
    Scratch sc;
    sc.reserve(max_rows, head_dim, block_size);
    for (int64_t i = 0; i < n; ++i) work(sc, i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch sc;
    sc.reserve(max_rows, head_dim, block_size);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed))
      work(sc, i);
  });
}

// The shared-prefix items first (their state is what the requests' own items continue from), then
// the plan's items. The scalar reference ignores the prefix plan: it attends every key itself.
template <typename T, typename I, typename C>
void run(const Problem<T, I, C>& p, const int32_t* plan, int64_t num_items, const int32_t* prefix_plan,
         int64_t num_prefix_items, bool simd) {
  int64_t max_rows = 1;
  for (int64_t i = 0; i < num_items; ++i) max_rows = std::max<int64_t>(max_rows, plan[i * kPlanCols + 2] * plan[i * kPlanCols + 4]);
  for (int64_t i = 0; i < num_prefix_items; ++i) max_rows = std::max<int64_t>(max_rows, prefix_plan[i * kPrefixCols + 2]);
  max_rows *= p.group;
  if (simd && num_prefix_items > 0)
    for_each_item(num_prefix_items, max_rows, p.head_dim, p.block_size, [&](Scratch& sc, int64_t i) {
      run_item_tile(p, make_prefix_item(p, prefix_plan + i * kPrefixCols), sc);
    });
  for_each_item(num_items, max_rows, p.head_dim, p.block_size, [&](Scratch& sc, int64_t i) {
    Item x = make_item(p, plan + i * kPlanCols);
    if (!simd) {
      x.kb0 = 0;
      x.state_in = false;
      run_item_scalar(p, x, sc);
    } else if (x.rows <= kRowPathMax) {
      run_item_rows(p, x, sc);
    } else {
      run_item_tile(p, x, sc);
    }
  });
}

// One (token, KV head) row of D elements to int8 with its own scale, absmax / 127: q[d] =
// round-half-even(x[d] / scale) (|q| <= 127; an all-zero row has scale 0 and zeros). dst[d * step]
// takes element d (keys transposed: step BS; values: step 1).
template <typename T>
inline float quantize_row(const T* x, int64_t D, int8_t* dst, int64_t step) {
  vfloat amax{};
  for (int64_t d = 0; d < D; d += kLanes) {
    const vfloat v = ld(x + d, std::min<int64_t>(kLanes, D - d));
    amax = vmax(amax, vmax(v, -v));
  }
  const float scale = reduce_max(amax) / 127.f;
  const vfloat magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds |q| < 2^22 to nearest even
  for (int64_t d = 0; d < D; d += kLanes) {
    const int64_t w = std::min<int64_t>(kLanes, D - d);
    const vfloat q = scale > 0.f ? (ld(x + d, w) / splat(scale) + magic) - magic : vfloat{};
    for (int64_t i = 0; i < w; ++i) dst[(d + i) * step] = static_cast<int8_t>(q[i]);
  }
  return scale;
}

// k, v [T, KVH, D] into their slots: keys transposed (dim d of slot s at kt[d * BS + s % BS] of its
// block and head), values as rows. An int8 cache (C = int8_t): each row quantized (quantize_row),
// its scale stored at the slot's index among the BS floats after its block's and head's BS * D int8s.
template <typename T, typename C>
void write_kv_rows(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& kv_cache,
                   const torch::Tensor& slot_mapping, int64_t BS) {
  const int64_t T_ = k.size(0), KVH = k.size(1), D = k.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  C* kc = kv_cache.data_ptr<C>();
  C* vc = kc + kv_cache.stride(0);
  const int64_t blk_st = kv_cache.stride(1), head_st = kv_cache.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  at::parallel_for(0, T_, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t base = slots[t] / BS * blk_st, off = slots[t] % BS;
      for (int64_t h = 0; h < KVH; ++h) {
        C* ku = kc + base + h * head_st;
        C* vu = vc + base + h * head_st;
        const T* ks = kd + t * ks0 + h * ks1;
        const T* vs = vd + t * vs0 + h * vs1;
        if constexpr (std::is_same_v<C, int8_t>) {
          const float k_scale = quantize_row(ks, D, ku + off, BS), v_scale = quantize_row(vs, D, vu + off * D, 1);
          std::memcpy(ku + BS * D + off * 4, &k_scale, 4);
          std::memcpy(vu + BS * D + off * 4, &v_scale, 4);
        } else {
          for (int64_t d = 0; d < D; ++d) ku[off + d * BS] = ks[d];
          std::memcpy(vu + off * D, vs, D * sizeof(T));
        }
      }
    }
  });
}

void check_int_vector(const torch::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kInt32 && t.dim() == 1 && t.is_contiguous(),
              name, " must be a contiguous 1-d int32 CPU tensor");
  TORCH_CHECK(t.size(0) == size, name, " must have ", size, " entries, got ", t.size(0));
}

}  // namespace

// Consecutive requests that share their first blocks (the same physical ids: a cached prompt
// prefix) and whose query tokens all lie after them: the prefix is attended once, by one tile
// pass over all their query rows, instead of once per request. Greedy over the batch order: a
// group grows while the blocks it saves, (requests - 1) x shared blocks, do not shrink.
// Returns (first request, end request, shared blocks) per group.
template <typename I>
std::vector<std::array<int64_t, 3>> shared_prefix_groups(const int32_t* qsl, const int32_t* sl, int64_t R,
                                                          const I* tables, int64_t table_st, int64_t block_size,
                                                          int64_t group, int64_t min_blocks, int64_t sdpa_min_chunk) {
  std::vector<std::array<int64_t, 3>> groups;
  auto limit = [&](int64_t i) -> int64_t {  // whole blocks before the request's first query
    const int64_t q_len = qsl[i + 1] - qsl[i];
    if (q_len == 0 || (sdpa_min_chunk > 0 && q_len >= sdpa_min_chunk)) return 0;  // no rows of the kernel's
    return (sl[i] - q_len) / block_size;
  };
  auto common = [&](int64_t a, int64_t b, int64_t cap) {  // leading blocks a and b share, at most cap
    cap = std::min({cap, limit(a), limit(b)});
    int64_t n = 0;
    while (n < cap && tables[a * table_st + n] == tables[b * table_st + n]) ++n;
    return n;
  };
  for (int64_t i = 0; i < R;) {
    int64_t shared = limit(i), j = i + 1;
    // A request that shares less with the next one than the next shares with its own next starts
    // no group: it would cut the longer prefix of the requests after it.
    if (j + 1 < R && common(i, j, shared) < common(j, j + 1, limit(j))) shared = 0;
    for (; j < R && shared >= min_blocks; ++j) {
      const int64_t b = common(i, j, shared);
      if (b < min_blocks || (j - i) * b < (j - i - 1) * shared) break;
      shared = b;
    }
    if (j - i >= 2 && shared >= min_blocks && (qsl[j] - qsl[i]) * group >= kPrefixMinRows)
      groups.push_back({i, j, shared});
    i = std::max(j, i + 1);
  }
  return groups;
}

// The work items of one step, shared by every layer with the same head counts:
//   items   int32 [n, 6]: (request, first query of the request's chunk, query count, first KV head,
//           KV heads, first key), longest first. First key > 0: the rows continue the state the
//           shared-prefix pass left for keys before it.
//   prefix  int32 [m, 5]: (a request of the group, first flat token, token count, KV head, prefix
//           keys): the shared-prefix pass, run before the items.
// min_shared_tokens: the shortest prefix worth a shared pass (0: none). sdpa_min_chunk > 0: the
// chunks of at least that many tokens are left out (torch's SDPA attends them).
std::tuple<torch::Tensor, torch::Tensor> plan(const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                                              const torch::Tensor& block_tables, int64_t num_kv_heads, int64_t group,
                                              int64_t block_size, int64_t min_shared_tokens, int64_t sdpa_min_chunk) {
  TORCH_CHECK(num_kv_heads > 0 && group > 0 && block_size > 0, "num_kv_heads, group and block_size must be positive");
  const int64_t R = seq_lens.numel();
  check_int_vector(query_start_loc, "query_start_loc", R + 1);
  check_int_vector(seq_lens, "seq_lens", R);
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.dim() == 2 && block_tables.size(0) == R &&
                  block_tables.stride(1) == 1 &&
                  (block_tables.scalar_type() == torch::kInt32 || block_tables.scalar_type() == torch::kInt64),
              "block_tables must be a CPU [R, max_blocks] int32/int64 tensor with a contiguous last dim");
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < R; ++i) {
    const int32_t q_len = qsl[i + 1] - qsl[i];
    TORCH_CHECK(q_len >= 0 && sl[i] >= q_len, "request ", i, ": query length ", q_len,
                " and seq_len ", sl[i], " are inconsistent");
    TORCH_CHECK((sl[i] + block_size - 1) / block_size <= block_tables.size(1), "request ", i, ": seq_len ", sl[i],
                " needs more blocks than block_tables has");
  }
  std::vector<std::array<int64_t, 3>> groups;
  if (min_shared_tokens > 0) {
    const int64_t min_blocks = (min_shared_tokens + block_size - 1) / block_size;
    groups = block_tables.scalar_type() == torch::kInt64
                 ? shared_prefix_groups(qsl, sl, R, block_tables.data_ptr<int64_t>(), block_tables.stride(0),
                                        block_size, group, min_blocks, sdpa_min_chunk)
                 : shared_prefix_groups(qsl, sl, R, block_tables.data_ptr<int32_t>(), block_tables.stride(0),
                                        block_size, group, min_blocks, sdpa_min_chunk);
  }
  std::vector<int32_t> first_key(R, 0);
  std::vector<int32_t> prefix;
  const int64_t prefix_tokens = std::max<int64_t>(1, kPrefixTileRows / group);
  for (const auto& [g0, g1, shared] : groups) {
    const int32_t keys = static_cast<int32_t>(shared * block_size);
    for (int64_t i = g0; i < g1; ++i) first_key[i] = keys;
    for (int32_t t = qsl[g0]; t < qsl[g1]; t += prefix_tokens) {
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(prefix_tokens, qsl[g1] - t));
      for (int32_t h = 0; h < num_kv_heads; ++h)
        prefix.insert(prefix.end(), {static_cast<int32_t>(g0), t, n, h, keys});
    }
  }
  // A chunk whose rows fit the row path stays whole; a longer one is cut into tiles of about
  // kTileRows rows (at least one token per tile), one item per KV head. A row-path item takes all
  // the KV heads of its tokens when there are enough of them to keep the threads busy: a token's
  // K/V rows for all heads are contiguous in the cache, so this reads whole lines in order (~10%
  // faster on decode batches than one item per head).
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / group);
  auto kernel_rows = [&](int64_t i) {  // whether the kernel attends request i's rows
    const int32_t q_len = qsl[i + 1] - qsl[i];
    return q_len > 0 && !(sdpa_min_chunk > 0 && q_len >= sdpa_min_chunk);
  };
  int64_t n_row_items = 0;
  for (int64_t i = 0; i < R; ++i) n_row_items += kernel_rows(i) && (qsl[i + 1] - qsl[i]) * group <= kRowPathMax;
  const int64_t row_heads = n_row_items >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  struct Row { int32_t req, j0, qn, h0, nh, k0; int64_t cost; };
  std::vector<Row> rows;
  rows.reserve(R * num_kv_heads);
  for (int64_t i = 0; i < R; ++i) {
    if (!kernel_rows(i)) continue;
    const int32_t q_len = qsl[i + 1] - qsl[i];
    const int32_t ctx = sl[i] - q_len;
    const bool row_path = q_len * group <= kRowPathMax;
    const int64_t step = row_path ? q_len : tile_tokens;
    const int64_t heads = row_path ? row_heads : 1;
    for (int32_t j0 = 0; j0 < q_len; j0 += step) {
      const int32_t qn = static_cast<int32_t>(std::min<int64_t>(step, q_len - j0));
      for (int64_t h0 = 0; h0 < num_kv_heads; h0 += heads) {
        const int32_t nh = static_cast<int32_t>(std::min(heads, num_kv_heads - h0));
        rows.push_back({static_cast<int32_t>(i), j0, qn, static_cast<int32_t>(h0), nh, first_key[i],
                        static_cast<int64_t>(qn) * group * nh * (ctx + j0 + qn - first_key[i])});
      }
    }
  }
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.cost > b.cost; });
  auto items = torch::empty({static_cast<int64_t>(rows.size()), kPlanCols}, torch::kInt32);
  int32_t* o = items.data_ptr<int32_t>();
  for (const Row& r : rows) {
    for (int32_t v : {r.req, r.j0, r.qn, r.h0, r.nh, r.k0}) *o++ = v;
  }
  auto prefix_items = torch::empty({static_cast<int64_t>(prefix.size() / kPrefixCols), kPrefixCols}, torch::kInt32);
  std::copy(prefix.begin(), prefix.end(), prefix_items.data_ptr<int32_t>());
  return {items, prefix_items};
}

// Writes k, v (when given) into their cache slots, then attends. Returns [T, H, D].
torch::Tensor forward(const torch::Tensor& q, const std::optional<torch::Tensor>& k,
                      const std::optional<torch::Tensor>& v, torch::Tensor kv_cache,
                      const std::optional<torch::Tensor>& slot_mapping, const torch::Tensor& block_tables,
                      const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                      const torch::Tensor& work_plan, const torch::Tensor& prefix_plan, double scale,
                      int64_t window, double softcap, bool simd) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "tensors must be on the CPU");
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap must be >= 0 (0: none)");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [T, H, D] with a contiguous last dim");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, num_blocks, KVH, block_size * D (int8: * (D + 4))] tensor");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "only float32 and bfloat16 are supported");
  const bool quant = kv_cache.scalar_type() == torch::kInt8;
  TORCH_CHECK(quant || kv_cache.scalar_type() == dtype, "kv_cache must have q's dtype, or be int8");
  const int64_t T_ = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = kv_cache.size(1), KVH = kv_cache.size(2);
  const int64_t per_key = quant ? D + 4 : D;  // an int8 cache's keys carry a float32 scale each
  TORCH_CHECK(D > 0 && kv_cache.size(3) % per_key == 0, "kv_cache's last dimension (", kv_cache.size(3),
              ") is not block_size x ", quant ? "(head_dim + 4)" : "head_dim", " of q (head_dim ", D, ")");
  const int64_t BS = kv_cache.size(3) / per_key;
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "num_heads (", H, ") must be a multiple of num_kv_heads (", KVH, ")");
  const int64_t R = seq_lens.numel();
  check_int_vector(query_start_loc, "query_start_loc", R + 1);
  check_int_vector(seq_lens, "seq_lens", R);
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.dim() == 2 && block_tables.size(0) == R &&
                  block_tables.stride(1) == 1 &&
                  (block_tables.scalar_type() == torch::kInt32 || block_tables.scalar_type() == torch::kInt64),
              "block_tables must be a CPU [R, max_blocks] int32/int64 tensor with a contiguous last dim");
  for (const torch::Tensor* t : {&work_plan, &prefix_plan})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kInt32 && t->dim() == 2 &&
                    t->size(1) == (t == &work_plan ? kPlanCols : kPrefixCols) && t->is_contiguous(),
                "work_plan and prefix_plan must be the int32 [n, 6] and [m, 5] tensors from plan()");
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[R] == T_, "query_start_loc must run from 0 to the number of tokens (", T_, ")");

  if (k.has_value() || v.has_value()) {
    TORCH_CHECK(k.has_value() && v.has_value() && slot_mapping.has_value(), "k, v and slot_mapping go together");
    for (const torch::Tensor* t : {&*k, &*v}) {
      TORCH_CHECK(t->device().is_cpu() && t->dim() == 3 && t->size(0) == T_ && t->size(1) == KVH &&
                      t->size(2) == D && t->stride(2) == 1 && t->scalar_type() == dtype,
                  "k and v must be CPU [T, KVH, D] tensors of q's dtype, with a contiguous last dim");
    }
    const torch::Tensor& sm = *slot_mapping;
    TORCH_CHECK(sm.device().is_cpu() && sm.scalar_type() == torch::kInt64 && sm.dim() == 1 && sm.numel() == T_ &&
                    sm.is_contiguous(),
                "slot_mapping must be a contiguous CPU int64 [T] tensor");
    const int64_t* s = sm.data_ptr<int64_t>();
    for (int64_t t = 0; t < T_; ++t)
      TORCH_CHECK(s[t] >= 0 && s[t] < num_blocks * BS, "slot_mapping[", t, "] = ", s[t], " is out of range");
    if (quant && dtype == torch::kFloat32) write_kv_rows<float, int8_t>(*k, *v, kv_cache, sm, BS);
    else if (quant) write_kv_rows<bf16, int8_t>(*k, *v, kv_cache, sm, BS);
    else if (dtype == torch::kFloat32) write_kv_rows<float, float>(*k, *v, kv_cache, sm, BS);
    else write_kv_rows<bf16, bf16>(*k, *v, kv_cache, sm, BS);
  }

  // Every block a request will read must exist: a bad table would read outside the cache.
  const int64_t max_blocks = block_tables.size(1);
  auto check_tables = [&](auto* tab) {
    for (int64_t i = 0; i < R; ++i) {
      const int64_t q_len = qsl[i + 1] - qsl[i];
      TORCH_CHECK(q_len >= 0 && sl[i] >= q_len, "request ", i, ": seq_len ", sl[i], " < query length ", q_len);
      const int64_t need = (sl[i] + BS - 1) / BS;
      TORCH_CHECK(need <= max_blocks, "request ", i, ": seq_len ", sl[i], " needs ", need,
                  " blocks, block_tables has ", max_blocks);
      const auto* row = tab + i * block_tables.stride(0);
      for (int64_t b = 0; b < need; ++b)
        TORCH_CHECK(row[b] >= 0 && row[b] < num_blocks, "block_tables[", i, "][", b, "] = ", row[b],
                    " is out of range");
    }
  };
  const int64_t group = H / KVH;
  const int64_t n_items = work_plan.size(0);
  const int32_t* pl = work_plan.data_ptr<int32_t>();
  for (int64_t i = 0; i < n_items; ++i) {
    const int32_t* it = pl + kPlanCols * i;
    TORCH_CHECK(it[0] >= 0 && it[0] < R && it[1] >= 0 && it[2] > 0 && it[1] + it[2] <= qsl[it[0] + 1] - qsl[it[0]] &&
                    it[3] >= 0 && it[4] > 0 && it[3] + it[4] <= KVH && (it[4] == 1 || it[2] * group <= kRowPathMax) &&
                    it[5] >= 0 && it[5] % BS == 0 && it[5] <= sl[it[0]] - (qsl[it[0] + 1] - qsl[it[0]]),
                "work_plan row ", i, " does not fit this batch (was it planned for these heads and block size?)");
  }
  const int64_t n_prefix = prefix_plan.size(0);
  TORCH_CHECK(window == 0 || n_prefix == 0, "a sliding-window layer takes no shared-prefix pass (plan it with "
              "min_shared_tokens=0)");
  const int32_t* pp = prefix_plan.data_ptr<int32_t>();
  for (int64_t i = 0; i < n_prefix; ++i) {
    const int32_t* it = pp + kPrefixCols * i;
    TORCH_CHECK(it[0] >= 0 && it[0] < R && it[1] >= 0 && it[2] > 0 && it[1] + it[2] <= T_ && it[3] >= 0 &&
                    it[3] < KVH && it[4] > 0 && it[4] % BS == 0 && it[4] <= sl[it[0]],
                "prefix_plan row ", i, " does not fit this batch (was it planned for these heads and block size?)");
  }
  // An item that starts after key 0 continues the shared-prefix pass's state: every one of its
  // (token, KV head) rows must have been given exactly those prefix keys by the prefix plan.
  bool continues = false;
  for (int64_t i = 0; i < n_items; ++i) continues |= pl[kPlanCols * i + 5] > 0;
  if (simd && continues) {
    std::vector<int32_t> covered(T_ * KVH, 0);
    for (int64_t i = 0; i < n_prefix; ++i) {
      const int32_t* it = pp + kPrefixCols * i;
      for (int32_t t = it[1]; t < it[1] + it[2]; ++t) covered[t * KVH + it[3]] = it[4];
    }
    for (int64_t i = 0; i < n_items; ++i) {
      const int32_t* it = pl + kPlanCols * i;
      if (it[5] == 0) continue;
      const int32_t t0 = qsl[it[0]] + it[1];
      for (int32_t t = t0; t < t0 + it[2]; ++t)
        for (int32_t h = it[3]; h < it[3] + it[4]; ++h)
          TORCH_CHECK(covered[t * KVH + h] == it[5], "work_plan row ", i, " starts at key ", it[5],
                      " but prefix_plan does not cover its rows with those keys");
    }
  }

  auto out = torch::empty({T_, H, D}, q.options());
  if (T_ == 0 || n_items == 0) return out;
  // The shared-prefix pass's running max, sum and output per (token, query head), float32.
  torch::Tensor state;
  if (n_prefix > 0 && simd) state = torch::empty({T_ * H * (D + 2)}, q.options().dtype(torch::kFloat32));
  auto launch = [&](auto* tag_t, auto* tag_i, auto* tag_c) {
    using TT = std::remove_pointer_t<decltype(tag_t)>;
    using II = std::remove_pointer_t<decltype(tag_i)>;
    using CC = std::remove_pointer_t<decltype(tag_c)>;
    const II* tables = block_tables.data_ptr<II>();
    check_tables(tables);
    Problem<TT, II, CC> p;
    p.q = q.data_ptr<TT>();
    p.q_st = q.stride(0);
    p.q_sh = q.stride(1);
    p.k_cache = kv_cache.data_ptr<CC>();
    p.v_cache = p.k_cache + kv_cache.stride(0);
    p.blk_st = kv_cache.stride(1);
    p.head_st = kv_cache.stride(2);
    p.tables = tables;
    p.table_st = block_tables.stride(0);
    p.qsl = qsl;
    p.seq_lens = sl;
    p.out = out.data_ptr<TT>();
    p.o_st = out.stride(0);
    p.o_sh = out.stride(1);
    p.state_m = state.defined() ? state.data_ptr<float>() : nullptr;
    p.state_l = state.defined() ? p.state_m + T_ * H : nullptr;
    p.state_acc = state.defined() ? p.state_l + T_ * H : nullptr;
    p.num_heads = static_cast<int>(H);
    p.num_kv_heads = static_cast<int>(KVH);
    p.group = static_cast<int>(group);
    p.head_dim = static_cast<int>(D);
    p.block_size = static_cast<int>(BS);
    p.scale = static_cast<float>(scale);
    p.window = static_cast<int>(window);
    p.softcap = static_cast<float>(softcap);
    run(p, pl, n_items, pp, n_prefix, simd);
  };
  // (queries, tables, cache) element types: the cache is q's dtype or int8.
  auto with_cache = [&](auto* tag_t, auto* tag_i) {
    if (quant) launch(tag_t, tag_i, static_cast<int8_t*>(nullptr));
    else launch(tag_t, tag_i, tag_t);
  };
  auto with_tables = [&](auto* tag_t) {
    if (block_tables.scalar_type() == torch::kInt64) with_cache(tag_t, static_cast<int64_t*>(nullptr));
    else with_cache(tag_t, static_cast<int32_t*>(nullptr));
  };
  if (dtype == torch::kFloat32) with_tables(static_cast<float*>(nullptr));
  else with_tables(static_cast<bf16*>(nullptr));
  return out;
}

int64_t vector_lanes() { return kLanes; }

}  // namespace tokenmill
