// Paged attention for the CPU over one step's ragged batch, reading K/V straight from the paged
// cache through the block tables (no per-request gather, no padding).
//
// Layouts (element strides; the last dimension of every tensor is contiguous):
//   q           [T, H, D]                         the step's new tokens, all requests concatenated
//   kv_cache    [2, num_blocks, block_size, KVH, D]  0 = keys, 1 = values
//   block_tables[R, max_blocks]  int32 or int64   physical block of each logical block
//   query_start_loc [R + 1], seq_lens [R]  int32  request i owns rows qsl[i]:qsl[i+1]; seq_lens[i]
//                                                 is its context length after this step
//   out         [T, H, D]
// Query j of request i sits at position seq_lens[i] - q_len + j and attends to keys 0..position.
// GQA: query head h reads KV head h / group (H = KVH * group), like SDPA's enable_gqa.
//
// Work split. plan() cuts the batch into work items (request, first query, query count, first KV
// head, KV heads). A decode token or a short chunk (at most kRowPathMax query rows per KV head) is
// one item, covering all KV heads when the batch has enough such items to keep the threads busy
// (a token's rows for all heads are contiguous in the cache), else one item per KV head. A longer
// chunk is cut into query tiles of about kTileRows rows (tokens x the group's query heads), one
// item per KV head. The items are sorted by estimated cost (rows x keys), longest first, and the
// threads of one at::parallel_for take them one at a time from an atomic counter, so the load
// stays balanced whatever mix of decodes and prompt chunks the step holds. Every item owns its
// output rows: no synchronisation besides the counter. The plan depends only on the step, so
// the backend builds it once per step and every layer reuses it.
//
// Inside an item the keys are walked in tiles of kKeyTile positions (a tile may straddle blocks:
// each key's row pointer comes from the block table) with an online (flash-style) softmax in
// float32: running max m, running sum l, accumulator acc, rescaled by exp(m_old - m_new) per tile.
// All the query heads of a KV head are processed together, so a K/V row loaded once serves
// `group` query rows (decode) or the whole query tile (prefill).
//
// Two inner kernels, by the number of query rows of the item:
//   * row path (decode tokens, very short chunks). Scores are dot products: 3 query rows x 4 keys
//     in 12 AVX2 accumulators over D, reduced with a hadd tree; the value pass keeps 3 rows x 24
//     output lanes (or 2 x 32) in registers while it streams the V rows. K and V are read in
//     place from the cache (bf16 widened on load). This path is bound by memory traffic: every
//     K/V row is read once per step and layer, against the torch backend's gather (read + write)
//     and SDPA (read again).
//   * tile path (prompt chunks). GEMM-like, with the query rows along the vector lanes: Q is
//     packed transposed and pre-scaled once per item (Q^T [D][M]); the scores S^T[key][row] =
//     sum_d K[key][d] Q^T[d][row] come from a 4-key x 24-row register block (broadcast K, load
//     Q^T: 12 accumulators); the softmax is then purely vertical (row-wise max and sum run across
//     the key rows of S^T: no horizontal reductions; the causal mask, a vector compare of
//     positions, only on tiles that cross the diagonal); the value pass O^T[d][row] += V[key][d]
//     P^T[key][row] uses the same 4 x 24 block. Only Q^T and the output change layout, once per
//     item; keys past a row's position are never computed beyond the diagonal tile.
//     SDPA is not used for long chunks: measured on SmolLM2's shapes (1 thread, float32) the
//     tile path was faster than the torch backend for every chunk size tried -- 4 x 256 fresh
//     tokens 6.5 ms vs 12 ms, 1 x 1024 22.5 vs 41, 4 x 256 after 256 cached 17.5 vs 22 --
//     because it skips the masked half of a causal chunk that SDPA with an explicit mask
//     computes, and needs no gather.
// Both are written with AVX2 + FMA intrinsics (compiled with -march=native); a plain scalar
// reference implementation (same online softmax, one row and one key at a time) is used when the
// compiler has no AVX2/FMA, and is exposed to the tests through simd=False.
//
// Numerics: float32 accumulation everywhere (bf16 inputs are widened exactly, outputs rounded to
// nearest even once); exp is a Cephes-style polynomial with ~1-2 ulp error. Float32 outputs match
// SDPA to float32 rounding (~1e-6 relative), not bitwise (summation order differs).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu_vec.h"
#include "ops.h"

#define TM_UNROLL _Pragma("GCC unroll 16")

namespace tokenmill {
namespace {

// Sizes chosen by measurement on a 2-core Zen 3 (AVX2), SmolLM2-135M shapes (9 heads, 3 KV heads,
// head_dim 64): a key tile of 32 was no faster than 16 in either path; tile-path items of 48 query
// rows beat 24, 64, 72 and 96 (Q^T and O^T, 12 KB each, stay in L1 beside the K/V rows).
constexpr int kKeyTile = 16;     // keys per online-softmax step (a multiple of 4)
constexpr int kRowPathMax = 8;   // items with at most this many query rows per KV head take the row path
constexpr int kTileRows = 48;    // target query rows (tokens x group) of a tile-path item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- the problem, as raw pointers and strides ------------------------------------------------

template <typename T, typename I>
struct Problem {
  const T* q;
  int64_t q_st, q_sh;  // token and head strides of q
  const T* k_cache;    // kv_cache[0]
  const T* v_cache;    // kv_cache[1]
  int64_t blk_st;      // block stride  = block_size * KVH * D
  int64_t tok_st;      // token stride  = KVH * D
  const I* tables;
  int64_t table_st;
  const int32_t* qsl;
  const int32_t* seq_lens;
  T* out;
  int64_t o_st, o_sh;
  int num_heads, num_kv_heads, group, head_dim, block_size;
  float scale;
};

// One item's geometry: query tokens j0 .. j0 + qn of request req, KV heads h0 .. h0 + nh. Row m
// (per head) = j * group + g is query token j (flat row t0 + j, position pos0 + j) and query head
// h * group + g.
struct Item {
  int req, t0, pos0, qn, h0, nh, rows, key_end;
};

template <typename T, typename I>
inline Item make_item(const Problem<T, I>& p, const int32_t* it) {
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
  x.key_end = x.pos0 + x.qn;  // keys [0, key_end)
  return x;
}

template <typename T, typename I>
inline const T* q_row(const Problem<T, I>& p, const Item& x, int h, int m) {
  int j = m / p.group, g = m % p.group;
  return p.q + (x.t0 + j) * p.q_st + (h * p.group + g) * p.q_sh;
}

template <typename T, typename I>
inline T* out_row(const Problem<T, I>& p, const Item& x, int h, int m) {
  int j = m / p.group, g = m % p.group;
  return p.out + (x.t0 + j) * p.o_st + (h * p.group + g) * p.o_sh;
}

// Row pointers of keys [k0, k0 + n) of the item's request at its first KV head h0 (head h0 + i is
// D * i further), walking the block table (one table lookup per block, no division per key).
template <typename T, typename I>
inline void key_rows(const Problem<T, I>& p, const Item& x, int k0, int n, const T** kp, const T** vp) {
  const I* table = p.tables + x.req * p.table_st;
  int blk = k0 / p.block_size, off = k0 % p.block_size;
  int64_t base = static_cast<int64_t>(table[blk]) * p.blk_st + x.h0 * p.head_dim;
  for (int c = 0; c < n; ++c) {
    if (off == p.block_size) {
      off = 0;
      base = static_cast<int64_t>(table[++blk]) * p.blk_st + x.h0 * p.head_dim;
    }
    const int64_t row = base + off * p.tok_st;
    kp[c] = p.k_cache + row;
    vp[c] = p.v_cache + row;
    ++off;
  }
}

// Per-thread scratch, grown on demand (sizes in floats).
struct Scratch {
  std::vector<float> a, b, s, m, l, corr, lsum, kpack, vpack;
  std::vector<int32_t> pos;
  void reserve(int64_t rows, int64_t d) {
    int64_t rp = round_up(std::max<int64_t>(rows, 1), 16);
    auto grow = [](std::vector<float>& v, int64_t n) { if ((int64_t)v.size() < n) v.resize(n); };
    grow(a, rp * d);
    grow(b, rp * d);
    grow(s, rp * kKeyTile);
    grow(m, rp);
    grow(l, rp);
    grow(corr, rp);
    grow(lsum, rp);
    grow(kpack, kKeyTile * d);
    grow(vpack, kKeyTile * d);
    if ((int64_t)pos.size() < rp) pos.resize(rp);
  }
};

// ---- scalar reference (portable fallback, and the tests' second opinion) ---------------------

template <typename T, typename I>
void run_item_scalar(const Problem<T, I>& p, const Item& x, Scratch& sc) {
  const int D = p.head_dim;
  const T* kp[kKeyTile];
  const T* vp[kKeyTile];
  float* acc = sc.a.data();
  for (int h = x.h0; h < x.h0 + x.nh; ++h) {
    const int64_t off = (h - x.h0) * D;
    for (int m = 0; m < x.rows; ++m) {
      const T* q = q_row(p, x, h, m);
      const int pos = x.pos0 + m / p.group;
      float mx = kNegInf, l = 0.f;
      std::fill(acc, acc + D, 0.f);
      for (int k0 = 0; k0 <= pos; k0 += kKeyTile) {
        const int n = std::min(kKeyTile, pos + 1 - k0);
        key_rows(p, x, k0, n, kp, vp);
        for (int c = 0; c < n; ++c) {
          float s = 0.f;
          for (int d = 0; d < D; ++d) s += to_float(q[d]) * to_float(kp[c][off + d]);
          s *= p.scale;
          const float mnew = std::max(mx, s);
          const float corr = std::exp(mx - mnew), e = std::exp(s - mnew);
          l = l * corr + e;
          for (int d = 0; d < D; ++d) acc[d] = acc[d] * corr + e * to_float(vp[c][off + d]);
          mx = mnew;
        }
      }
      T* o = out_row(p, x, h, m);
      for (int d = 0; d < D; ++d) o[d] = from_float<T>(acc[d] / l);
    }
  }
}

#if TM_HAVE_AVX2

// ---- AVX2 helpers ----------------------------------------------------------------------------

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// [sum(a), sum(b), sum(c), sum(d)]
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// ---- row path: few query rows (decode tokens, tiny chunks) -----------------------------------

// s[r * kKeyTile + c] = q_r . k_c for R rows (packed float, stride D) and keys c < n; the key rows
// are kp[c] + off.
template <int R, typename T>
inline void row_scores(const float* q, int D, const T* const* kp, int64_t off, int n, float* s) {
  const int D8 = D & ~7;
  for (int c0 = 0; c0 < n; c0 += 4) {
    const T* k[4];
    for (int i = 0; i < 4; ++i) k[i] = kp[std::min(c0 + i, n - 1)] + off;  // pad with a repeat
    // Every loop over the accumulators is unrolled: an index the compiler cannot resolve makes
    // it keep the whole array in memory (a store per FMA).
    __m256 acc[R][4];
    TM_UNROLL
    for (int r = 0; r < R; ++r)
      TM_UNROLL
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_ps();
    for (int d = 0; d < D8; d += 8) {
      __m256 kv[4];
      TM_UNROLL
      for (int i = 0; i < 4; ++i) kv[i] = load8(k[i] + d);
      TM_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m256 qv = _mm256_loadu_ps(q + r * D + d);
        TM_UNROLL
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(qv, kv[i], acc[r][i]);
      }
    }
    TM_UNROLL
    for (int r = 0; r < R; ++r) {
      // 4 scores (the padding ones too: kKeyTile % 4 == 0 leaves room for them)
      float* out = s + r * kKeyTile + c0;
      _mm_storeu_ps(out, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
      for (int d = D8; d < D; ++d)  // tail of a head_dim that is not a multiple of 8
        for (int i = 0; i < 4; ++i) out[i] += q[r * D + d] * to_float(k[i][d]);
    }
  }
}

// Columns d .. d + 8 * NC of row_values.
template <int R, int NC, typename T>
inline void row_values_block(float* acc, int D, const T* const* vp, int64_t off, int n, const float* p,
                             const float* corr, int d) {
  __m256 a[R][NC];
  TM_UNROLL
  for (int r = 0; r < R; ++r) {
    const __m256 cr = _mm256_set1_ps(corr[r]);
    TM_UNROLL
    for (int i = 0; i < NC; ++i) a[r][i] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + d + 8 * i), cr);
  }
  for (int c = 0; c < n; ++c) {
    __m256 v[NC];
    TM_UNROLL
    for (int i = 0; i < NC; ++i) v[i] = load8(vp[c] + off + d + 8 * i);
    TM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * kKeyTile + c);
      TM_UNROLL
      for (int i = 0; i < NC; ++i) a[r][i] = _mm256_fmadd_ps(pr, v[i], a[r][i]);
    }
  }
  TM_UNROLL
  for (int r = 0; r < R; ++r)
    TM_UNROLL
    for (int i = 0; i < NC; ++i) _mm256_storeu_ps(acc + r * D + d + 8 * i, a[r][i]);
}

// acc_r = acc_r * corr_r + sum_c p[r * kKeyTile + c] * v_c for R rows (stride D), keys c < n; the
// value rows are vp[c] + off. Register blocks of R rows x NC vectors: R * NC accumulators + NC
// value vectors + 1 broadcast within the 16 ymm registers.
template <int R, typename T>
inline void row_values(float* acc, int D, const T* const* vp, int64_t off, int n, const float* p,
                       const float* corr) {
  constexpr int NC = R == 3 ? 3 : 4;
  int d = 0;
  for (; d + 8 * NC <= D; d += 8 * NC) row_values_block<R, NC>(acc, D, vp, off, n, p, corr, d);
  switch ((D - d) / 8) {  // fewer than NC vectors left
    case 3: row_values_block<R, 3>(acc, D, vp, off, n, p, corr, d); d += 24; break;
    case 2: row_values_block<R, 2>(acc, D, vp, off, n, p, corr, d); d += 16; break;
    case 1: row_values_block<R, 1>(acc, D, vp, off, n, p, corr, d); d += 8; break;
    default: break;
  }
  for (; d < D; ++d) {  // tail of a head_dim that is not a multiple of 8
    for (int r = 0; r < R; ++r) {
      float a = acc[r * D + d] * corr[r];
      for (int c = 0; c < n; ++c) a += p[r * kKeyTile + c] * to_float(vp[c][off + d]);
      acc[r * D + d] = a;
    }
  }
}

template <typename Fn>
inline void for_row_groups(int rows, Fn&& fn) {
  // Groups of 3 rows (12 score accumulators + 4 key registers fill the 16 ymm registers).
  int r = 0;
  for (; r + 3 <= rows; r += 3) fn(std::integral_constant<int, 3>(), r);
  if (rows - r == 2) fn(std::integral_constant<int, 2>(), r);
  else if (rows - r == 1) fn(std::integral_constant<int, 1>(), r);
}

template <typename T, typename I>
void run_item_rows(const Problem<T, I>& p, const Item& x, Scratch& sc) {
  const int D = p.head_dim, M = x.rows * x.nh;  // rows of head h0 + i are rows i * x.rows ...
  float* q = sc.a.data();    // [M][D] packed query rows
  float* acc = sc.b.data();  // [M][D]
  float* s = sc.s.data();    // [M][kKeyTile] scores, then probabilities
  float* mx = sc.m.data();
  float* l = sc.l.data();
  float* corr = sc.corr.data();
  float* lsum = sc.lsum.data();
  for (int h = 0; h < x.nh; ++h)
    for (int m = 0; m < x.rows; ++m) {
      const T* src = q_row(p, x, x.h0 + h, m);
      float* dst = q + (h * x.rows + m) * D;
      for (int d = 0; d < D; ++d) dst[d] = to_float(src[d]);
    }
  std::fill(mx, mx + M, kNegInf);
  std::fill(l, l + round_up(M, 8), 0.f);  // vector updates run over whole groups of 8 rows
  std::fill(acc, acc + M * D, 0.f);
  const T* kp[kKeyTile];
  const T* vp[kKeyTile];
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int k0 = 0; k0 < x.key_end; k0 += kKeyTile) {
    const int n = std::min(kKeyTile, x.key_end - k0);
    key_rows(p, x, k0, n, kp, vp);
    // Scores of every head's rows, then the softmax step of every row, then the values. (Software
    // prefetching of the next tile's rows, and walking the tile key group by key group across the
    // heads, were both measured: neither helped, the hardware prefetcher follows the blocks.)
    for (int h = 0; h < x.nh; ++h) {
      const int r0 = h * x.rows;
      for_row_groups(x.rows, [&](auto R, int r) {
        row_scores<decltype(R)::value>(q + (r0 + r) * D, D, kp, h * D, n, s + (r0 + r) * kKeyTile);
      });
    }
    for (int m = 0; m < M; ++m) {
      // Keys k0 + c with c < valid are visible to this row (causal limit and tile end).
      const int valid = std::min(n, x.pos0 + (m % x.rows) / p.group + 1 - k0);
      float* sm = s + m * kKeyTile;
      if (valid <= 0) {  // the whole tile lies after this row's position
        std::fill(sm, sm + kKeyTile, 0.f);
        corr[m] = 0.f;  // exp(0) below: the row keeps its state
        lsum[m] = 0.f;
        continue;
      }
      static_assert(kKeyTile == 16, "the row path's softmax step holds a tile in two 8-lane vectors");
      __m256 v[2], tmax = neg_inf;
      for (int h = 0; h < 2; ++h) {
        __m256 keep = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(8.f * h)),
                                    _mm256_set1_ps(static_cast<float>(valid)), _CMP_LT_OQ);
        v[h] = _mm256_blendv_ps(neg_inf, _mm256_mul_ps(_mm256_loadu_ps(sm + 8 * h), _mm256_set1_ps(p.scale)), keep);
        tmax = _mm256_max_ps(tmax, v[h]);
      }
      const float mnew = std::max(mx[m], hmax(tmax));
      const __m256 mv = _mm256_set1_ps(mnew);
      __m256 e0 = exp8(_mm256_sub_ps(v[0], mv)), e1 = exp8(_mm256_sub_ps(v[1], mv));
      _mm256_storeu_ps(sm, e0);
      _mm256_storeu_ps(sm + 8, e1);
      corr[m] = mx[m] - mnew;  // exponentiated below, 8 rows at a time; -inf on the first tile
      lsum[m] = hsum(_mm256_add_ps(e0, e1));
      mx[m] = mnew;
    }
    for (int m = 0; m < M; m += 8) {  // the buffers are padded to a multiple of 16 rows
      const __m256 cr = exp8(_mm256_loadu_ps(corr + m));  // exp(-inf) = 0
      _mm256_storeu_ps(corr + m, cr);
      _mm256_storeu_ps(l + m, _mm256_fmadd_ps(_mm256_loadu_ps(l + m), cr, _mm256_loadu_ps(lsum + m)));
    }
    for (int h = 0; h < x.nh; ++h) {
      const int r0 = h * x.rows;
      for_row_groups(x.rows, [&](auto R, int r) {
        row_values<decltype(R)::value>(acc + (r0 + r) * D, D, vp, h * D, n, s + (r0 + r) * kKeyTile, corr + r0 + r);
      });
    }
  }
  for (int h = 0; h < x.nh; ++h)
    for (int m = 0; m < x.rows; ++m) {
      T* o = out_row(p, x, x.h0 + h, m);
      const float* a = acc + (h * x.rows + m) * D;
      const float inv = 1.f / l[h * x.rows + m];
      for (int d = 0; d < D; ++d) o[d] = from_float<T>(a[d] * inv);
    }
}

// ---- tile path: prompt chunks, query rows along the vector lanes -----------------------------

// st[c * MP + r] = sum_d k_c[d] * qt[d * MP + r] for keys c0 .. c0 + 4 (k has 4 pointers, the
// ones past the tile's end repeat its last key), rows r .. r + 8 * NV.
template <int NV>
inline void tile_scores_block(const float* qt, int MP, int D, const float* const* k, int c0, float* st, int r) {
  __m256 a[4][NV];
  TM_UNROLL
  for (int i = 0; i < 4; ++i)
    TM_UNROLL
    for (int v = 0; v < NV; ++v) a[i][v] = _mm256_setzero_ps();
  const float* qd = qt + r;
  for (int d = 0; d < D; ++d, qd += MP) {
    __m256 qv[NV];
    TM_UNROLL
    for (int v = 0; v < NV; ++v) qv[v] = _mm256_loadu_ps(qd + 8 * v);
    TM_UNROLL
    for (int i = 0; i < 4; ++i) {
      const __m256 kb = _mm256_broadcast_ss(k[i] + d);
      TM_UNROLL
      for (int v = 0; v < NV; ++v) a[i][v] = _mm256_fmadd_ps(kb, qv[v], a[i][v]);
    }
  }
  // All 4 rows, the padding ones too (the buffer has room): a store loop bounded by nc would
  // make the compiler keep the accumulators in memory.
  TM_UNROLL
  for (int i = 0; i < 4; ++i)
    TM_UNROLL
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(st + (c0 + i) * MP + r + 8 * v, a[i][v]);
}

// Row blocks of 24 (12 accumulators), then one of 16 or 8: MP is a multiple of 8.
template <typename Fn>
inline void for_vector_blocks(int MP, Fn&& fn) {
  int r = 0;
  for (; r + 24 <= MP; r += 24) fn(std::integral_constant<int, 3>(), r);
  if (MP - r == 16) fn(std::integral_constant<int, 2>(), r);
  else if (MP - r == 8) fn(std::integral_constant<int, 1>(), r);
}

// st[c * MP + r] = sum_d k_c[d] * qt[d * MP + r]  for keys c < n, rows r < MP.
inline void tile_scores(const float* qt, int MP, int D, const float* const* kp, int n, float* st) {
  for (int c0 = 0; c0 < n; c0 += 4) {
    const float* k[4];
    TM_UNROLL
    for (int i = 0; i < 4; ++i) k[i] = kp[std::min(c0 + i, n - 1)];
    for_vector_blocks(MP, [&](auto NV, int r) { tile_scores_block<decltype(NV)::value>(qt, MP, D, k, c0, st, r); });
  }
}

// ot[d * MP + r] = ot[d * MP + r] * corr[r] + sum_c v_c[d] * pt[c * MP + r], rows r .. r + 8 * NV.
template <int NV>
inline void tile_values_block(float* ot, int MP, int D, const float* const* vp, int n, const float* pt,
                              const float* corr, int r) {
  __m256 cr[NV];
  TM_UNROLL
  for (int v = 0; v < NV; ++v) cr[v] = _mm256_loadu_ps(corr + r + 8 * v);
  int d = 0;
  for (; d + 4 <= D; d += 4) {
    __m256 a[4][NV];
    TM_UNROLL
    for (int i = 0; i < 4; ++i)
      TM_UNROLL
      for (int v = 0; v < NV; ++v) a[i][v] = _mm256_mul_ps(_mm256_loadu_ps(ot + (d + i) * MP + r + 8 * v), cr[v]);
    const float* pc = pt + r;
    for (int c = 0; c < n; ++c, pc += MP) {
      __m256 pv[NV];
      TM_UNROLL
      for (int v = 0; v < NV; ++v) pv[v] = _mm256_loadu_ps(pc + 8 * v);
      TM_UNROLL
      for (int i = 0; i < 4; ++i) {
        const __m256 vb = _mm256_broadcast_ss(vp[c] + d + i);
        TM_UNROLL
        for (int v = 0; v < NV; ++v) a[i][v] = _mm256_fmadd_ps(vb, pv[v], a[i][v]);
      }
    }
    TM_UNROLL
    for (int i = 0; i < 4; ++i)
      TM_UNROLL
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(ot + (d + i) * MP + r + 8 * v, a[i][v]);
  }
  for (; d < D; ++d) {
    __m256 a[NV];
    TM_UNROLL
    for (int v = 0; v < NV; ++v) a[v] = _mm256_mul_ps(_mm256_loadu_ps(ot + d * MP + r + 8 * v), cr[v]);
    for (int c = 0; c < n; ++c) {
      const __m256 vb = _mm256_broadcast_ss(vp[c] + d);
      TM_UNROLL
      for (int v = 0; v < NV; ++v) a[v] = _mm256_fmadd_ps(vb, _mm256_loadu_ps(pt + c * MP + r + 8 * v), a[v]);
    }
    TM_UNROLL
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(ot + d * MP + r + 8 * v, a[v]);
  }
}

inline void tile_values(float* ot, int MP, int D, const float* const* vp, int n, const float* pt,
                        const float* corr) {
  for_vector_blocks(MP, [&](auto NV, int r) { tile_values_block<decltype(NV)::value>(ot, MP, D, vp, n, pt, corr, r); });
}

inline void widen_rows(const float* const* src, int n, int D, float* dst, const float** rows) {
  for (int c = 0; c < n; ++c) rows[c] = src[c];  // float rows are read in place
  (void)D;
  (void)dst;
}

inline void widen_rows(const bf16* const* src, int n, int D, float* dst, const float** rows) {
  for (int c = 0; c < n; ++c) {
    float* o = dst + c * D;
    int d = 0;
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, load8(src[c] + d));
    for (; d < D; ++d) o[d] = to_float(src[c][d]);
    rows[c] = o;
  }
}

template <typename T, typename I>
void run_item_tile(const Problem<T, I>& p, const Item& x, Scratch& sc) {
  const int D = p.head_dim, M = x.rows, KT = kKeyTile;
  const int MP = static_cast<int>(round_up(M, 8));
  float* qt = sc.a.data();  // Q^T [D][MP], pre-scaled
  float* ot = sc.b.data();  // O^T [D][MP]
  float* st = sc.s.data();  // S^T / P^T [KT][MP]
  float* mx = sc.m.data();
  float* l = sc.l.data();
  float* corr = sc.corr.data();
  int32_t* pos = sc.pos.data();
  for (int m = 0; m < MP; ++m) {
    if (m < M) {
      const T* src = q_row(p, x, x.h0, m);
      for (int d = 0; d < D; ++d) qt[d * MP + m] = to_float(src[d]) * p.scale;
      pos[m] = x.pos0 + m / p.group;
    } else {  // padding rows: zero queries at the first row's position (finite, never NaN)
      for (int d = 0; d < D; ++d) qt[d * MP + m] = 0.f;
      pos[m] = x.pos0;
    }
    mx[m] = kNegInf;
    l[m] = 0.f;
  }
  std::fill(ot, ot + D * MP, 0.f);
  const T* kp[kKeyTile];
  const T* vp[kKeyTile];
  const float* kf[kKeyTile];
  const float* vf[kKeyTile];
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int k0 = 0; k0 < x.key_end; k0 += KT) {
    const int n = std::min(KT, x.key_end - k0);
    key_rows(p, x, k0, n, kp, vp);
    widen_rows(kp, n, D, sc.kpack.data(), kf);
    widen_rows(vp, n, D, sc.vpack.data(), vf);
    tile_scores(qt, MP, D, kf, n, st);
    const bool diagonal = k0 + n - 1 > x.pos0;  // some key lies after some row's position
    for (int r = 0; r < MP; r += 8) {
      const __m256 mold = _mm256_loadu_ps(mx + r);
      __m256 mnew = mold;
      if (diagonal) {
        const __m256i rpos = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + r));
        for (int c = 0; c < n; ++c) {
          // visible iff key position k0 + c <= row position
          __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(rpos, _mm256_set1_epi32(k0 + c - 1)));
          __m256 v = _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(st + c * MP + r), keep);
          _mm256_storeu_ps(st + c * MP + r, v);
          mnew = _mm256_max_ps(mnew, v);
        }
      } else {
        for (int c = 0; c < n; ++c) mnew = _mm256_max_ps(mnew, _mm256_loadu_ps(st + c * MP + r));
      }
      __m256 sum = _mm256_setzero_ps();
      for (int c = 0; c < n; ++c) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(st + c * MP + r), mnew));
        _mm256_storeu_ps(st + c * MP + r, e);
        sum = _mm256_add_ps(sum, e);
      }
      // mold = -inf on the first tile gives corr = 0; mnew is finite there (key 0 is visible).
      const __m256 cr = exp8(_mm256_sub_ps(mold, mnew));
      _mm256_storeu_ps(corr + r, cr);
      _mm256_storeu_ps(l + r, _mm256_fmadd_ps(_mm256_loadu_ps(l + r), cr, sum));
      _mm256_storeu_ps(mx + r, mnew);
    }
    tile_values(ot, MP, D, vf, n, st, corr);
  }
  for (int m = 0; m < M; ++m) {
    T* o = out_row(p, x, x.h0, m);
    const float inv = 1.f / l[m];
    for (int d = 0; d < D; ++d) o[d] = from_float<T>(ot[d * MP + m] * inv);
  }
}

#endif  // TM_HAVE_AVX2

// ---- driver ------------------------------------------------------------------------------------

template <typename T, typename I>
void run(const Problem<T, I>& p, const int32_t* plan, int64_t num_items, bool simd) {
  const int64_t max_rows = [&] {
    int64_t r = 1;
    for (int64_t i = 0; i < num_items; ++i) r = std::max<int64_t>(r, plan[i * 5 + 2] * plan[i * 5 + 4]);
    return r * p.group;
  }();
  auto work = [&](Scratch& sc, int64_t i) {
    Item x = make_item(p, plan + i * 5);
#if TM_HAVE_AVX2
    if (simd) {
      if (x.rows <= kRowPathMax) run_item_rows(p, x, sc);
      else run_item_tile(p, x, sc);
      return;
    }
#endif
    (void)simd;
    run_item_scalar(p, x, sc);
  };
  const int threads = std::min<int64_t>(at::get_num_threads(), num_items);
  if (threads <= 1) {
    Scratch sc;
    sc.reserve(max_rows, p.head_dim);
    for (int64_t i = 0; i < num_items; ++i) work(sc, i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch sc;
    sc.reserve(max_rows, p.head_dim);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < num_items;
         i = next.fetch_add(1, std::memory_order_relaxed))
      work(sc, i);
  });
}

template <typename T>
void write_kv_rows(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& kv_cache,
                   const torch::Tensor& slot_mapping) {
  const int64_t T_ = k.size(0), KVH = k.size(1), D = k.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  T* kc = kv_cache.data_ptr<T>();
  T* vc = kc + kv_cache.stride(0);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  const int64_t slot_st = KVH * D;
  at::parallel_for(0, T_, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t dst = slots[t] * slot_st;
      for (int64_t h = 0; h < KVH; ++h) {
        std::memcpy(kc + dst + h * D, kd + t * ks0 + h * ks1, D * sizeof(T));
        std::memcpy(vc + dst + h * D, vd + t * vs0 + h * vs1, D * sizeof(T));
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

// The work items of one step: int32 [num_items, 5] rows (request, first query of the request's
// chunk, query count, first KV head, KV heads), longest first. Shared by every layer with the same
// head counts.
torch::Tensor plan(const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens, int64_t num_kv_heads,
                   int64_t group) {
  TORCH_CHECK(num_kv_heads > 0 && group > 0, "num_kv_heads and group must be positive");
  const int64_t R = seq_lens.numel();
  check_int_vector(query_start_loc, "query_start_loc", R + 1);
  check_int_vector(seq_lens, "seq_lens", R);
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  // A chunk whose rows fit the row path stays whole; a longer one is cut into tiles of about
  // kTileRows rows (at least one token per tile), one item per KV head. A row-path item takes all
  // the KV heads of its tokens when there are enough of them to keep the threads busy: a token's
  // K/V rows for all heads are contiguous in the cache, so this reads whole lines in order (~10%
  // faster on decode batches than one item per head).
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / group);
  int64_t n_row_items = 0;
  for (int64_t i = 0; i < R; ++i) n_row_items += (qsl[i + 1] - qsl[i]) * group <= kRowPathMax;
  const int64_t row_heads = n_row_items >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  struct Row { int32_t req, j0, qn, h0, nh; int64_t cost; };
  std::vector<Row> rows;
  rows.reserve(R * num_kv_heads);
  for (int64_t i = 0; i < R; ++i) {
    const int32_t q_len = qsl[i + 1] - qsl[i];
    TORCH_CHECK(q_len >= 0 && sl[i] >= q_len, "request ", i, ": query length ", q_len,
                " and seq_len ", sl[i], " are inconsistent");
    const int32_t ctx = sl[i] - q_len;
    const bool row_path = q_len * group <= kRowPathMax;
    const int64_t step = row_path ? std::max<int32_t>(q_len, 1) : tile_tokens;
    const int64_t heads = row_path ? row_heads : 1;
    for (int32_t j0 = 0; j0 < q_len; j0 += step) {
      const int32_t qn = static_cast<int32_t>(std::min<int64_t>(step, q_len - j0));
      for (int64_t h0 = 0; h0 < num_kv_heads; h0 += heads) {
        const int32_t nh = static_cast<int32_t>(std::min(heads, num_kv_heads - h0));
        rows.push_back({static_cast<int32_t>(i), j0, qn, static_cast<int32_t>(h0), nh,
                        static_cast<int64_t>(qn) * group * nh * (ctx + j0 + qn)});
      }
    }
  }
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.cost > b.cost; });
  auto out = torch::empty({static_cast<int64_t>(rows.size()), 5}, torch::kInt32);
  int32_t* o = out.data_ptr<int32_t>();
  for (const Row& r : rows) {
    o[0] = r.req;
    o[1] = r.j0;
    o[2] = r.qn;
    o[3] = r.h0;
    o[4] = r.nh;
    o += 5;
  }
  return out;
}

// Writes k, v (when given) into their cache slots, then attends. Returns [T, H, D].
torch::Tensor forward(const torch::Tensor& q, const std::optional<torch::Tensor>& k,
                      const std::optional<torch::Tensor>& v, torch::Tensor kv_cache,
                      const std::optional<torch::Tensor>& slot_mapping, const torch::Tensor& block_tables,
                      const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                      const torch::Tensor& work_plan, double scale, bool simd) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [T, H, D] with a contiguous last dim");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, num_blocks, block_size, KVH, D] tensor");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "only float32 and bfloat16 are supported");
  TORCH_CHECK(kv_cache.scalar_type() == dtype, "q and kv_cache must have the same dtype");
  const int64_t T_ = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = kv_cache.size(1), BS = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D, "head_dim of q (", D, ") and kv_cache (", kv_cache.size(4), ") differ");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "num_heads (", H, ") must be a multiple of num_kv_heads (", KVH, ")");
  const int64_t R = seq_lens.numel();
  check_int_vector(query_start_loc, "query_start_loc", R + 1);
  check_int_vector(seq_lens, "seq_lens", R);
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.dim() == 2 && block_tables.size(0) == R &&
                  block_tables.stride(1) == 1 &&
                  (block_tables.scalar_type() == torch::kInt32 || block_tables.scalar_type() == torch::kInt64),
              "block_tables must be a CPU [R, max_blocks] int32/int64 tensor with a contiguous last dim");
  TORCH_CHECK(work_plan.device().is_cpu() && work_plan.scalar_type() == torch::kInt32 && work_plan.dim() == 2 &&
                  work_plan.size(1) == 5 && work_plan.is_contiguous(),
              "work_plan must be the int32 [n, 5] tensor from plan()");
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[R] == T_, "query_start_loc must run from 0 to the number of tokens (", T_, ")");

  if (k.has_value() || v.has_value()) {
    TORCH_CHECK(k.has_value() && v.has_value() && slot_mapping.has_value(), "k, v and slot_mapping go together");
    for (const torch::Tensor* t : {&*k, &*v}) {
      TORCH_CHECK(t->device().is_cpu() && t->dim() == 3 && t->size(0) == T_ && t->size(1) == KVH &&
                      t->size(2) == D && t->stride(2) == 1 && t->scalar_type() == dtype,
                  "k and v must be CPU [T, KVH, D] tensors of the cache's dtype, with a contiguous last dim");
    }
    const torch::Tensor& sm = *slot_mapping;
    TORCH_CHECK(sm.device().is_cpu() && sm.scalar_type() == torch::kInt64 && sm.dim() == 1 && sm.numel() == T_ &&
                    sm.is_contiguous(),
                "slot_mapping must be a contiguous CPU int64 [T] tensor");
    const int64_t* s = sm.data_ptr<int64_t>();
    for (int64_t t = 0; t < T_; ++t)
      TORCH_CHECK(s[t] >= 0 && s[t] < num_blocks * BS, "slot_mapping[", t, "] = ", s[t], " is out of range");
    if (dtype == torch::kFloat32) write_kv_rows<float>(*k, *v, kv_cache, sm);
    else write_kv_rows<bf16>(*k, *v, kv_cache, sm);
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
    const int32_t* it = pl + 5 * i;
    TORCH_CHECK(it[0] >= 0 && it[0] < R && it[1] >= 0 && it[2] > 0 && it[1] + it[2] <= qsl[it[0] + 1] - qsl[it[0]] &&
                    it[3] >= 0 && it[4] > 0 && it[3] + it[4] <= KVH && (it[4] == 1 || it[2] * group <= kRowPathMax),
                "work_plan row ", i, " does not fit this batch (was it planned for these heads?)");
  }

  auto out = torch::empty({T_, H, D}, q.options());
  if (T_ == 0 || n_items == 0) return out;
  auto launch = [&](auto* tag_t, auto* tag_i) {
    using TT = std::remove_pointer_t<decltype(tag_t)>;
    using II = std::remove_pointer_t<decltype(tag_i)>;
    const II* tables = block_tables.data_ptr<II>();
    check_tables(tables);
    Problem<TT, II> p;
    p.q = q.data_ptr<TT>();
    p.q_st = q.stride(0);
    p.q_sh = q.stride(1);
    p.k_cache = kv_cache.data_ptr<TT>();
    p.v_cache = p.k_cache + kv_cache.stride(0);
    p.blk_st = kv_cache.stride(1);
    p.tok_st = kv_cache.stride(2);
    p.tables = tables;
    p.table_st = block_tables.stride(0);
    p.qsl = qsl;
    p.seq_lens = sl;
    p.out = out.data_ptr<TT>();
    p.o_st = out.stride(0);
    p.o_sh = out.stride(1);
    p.num_heads = static_cast<int>(H);
    p.num_kv_heads = static_cast<int>(KVH);
    p.group = static_cast<int>(group);
    p.head_dim = static_cast<int>(D);
    p.block_size = static_cast<int>(BS);
    p.scale = static_cast<float>(scale);
    run(p, pl, n_items, simd);
  };
  const bool i64 = block_tables.scalar_type() == torch::kInt64;
  if (dtype == torch::kFloat32) {
    if (i64) launch(static_cast<float*>(nullptr), static_cast<int64_t*>(nullptr));
    else launch(static_cast<float*>(nullptr), static_cast<int32_t*>(nullptr));
  } else {
    if (i64) launch(static_cast<bf16*>(nullptr), static_cast<int64_t*>(nullptr));
    else launch(static_cast<bf16*>(nullptr), static_cast<int32_t*>(nullptr));
  }
  return out;
}

bool has_simd() { return TM_HAVE_AVX2; }

}  // namespace tokenmill
