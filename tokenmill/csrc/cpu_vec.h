// The CPU kernels' one vector type, as wide as the CPU the extension is compiled for.
//
// `vfloat` is a GCC/Clang vector extension of kLanes float32 lanes: 16 (one zmm register) where
// the compiler targets AVX-512, 8 (ymm) with AVX2 or AVX, 4 otherwise (SSE / NEON, or scalar code
// where there is no SIMD at all). The extension is built with -march=native, so the same source
// becomes AVX-512 code on an AVX-512 machine and AVX2 code on an AVX2-only one, and every path
// runs, and is tested, on whichever machine runs the tests. Arithmetic, comparisons and `?:` work
// lane-wise on these types; this header adds loads and stores (bfloat16 widened with a shift and
// narrowed with round-to-nearest-even, exactly as c10::BFloat16 does), exp, and reductions.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tokenmill {

using bf16 = c10::BFloat16;

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }
template <typename T> inline T from_float(float x) { return static_cast<T>(x); }

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float vfloat __attribute__((vector_size(kLanes * 4)));
typedef int32_t vint __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vuint __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vhalf __attribute__((vector_size(kLanes * 2)));

inline vfloat splat(float x) { return vfloat{} + x; }

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vfloat load(const bf16* p) {
#if defined(__AVX512F__)
  // One vpmovzxwd: in register-tight loops GCC 12 turns the generic form below into two 8-lane
  // widenings plus an insert, even with -mprefer-vector-width=512.
  return reinterpret_cast<vfloat>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16));
#else
  vhalf h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vfloat>(__builtin_convertvector(h, vuint) << 16);
#endif
}

// int8 (an 8-bit KV cache) widened exactly: one sign extension (vpmovsxbd) and one conversion
// per vector. GCC 12 scalarises __builtin_convertvector from an int8 vector (16 vcvtsi2ss), so the
// AVX-512 and AVX2 forms are spelled out; the generic one is for the other targets.
inline vfloat load(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  return reinterpret_cast<vfloat>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p)))));
#else
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// The bf16 bits of each lane: round to nearest even, NaN to the quiet NaN 0x7FC0 (c10::BFloat16's
// float -> bf16 conversion).
inline vuint bf16_bits(vfloat v) {
  const vuint u = reinterpret_cast<vuint>(v);
  const vuint rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return v != v ? vuint{} + 0x7FC0u : rounded;
}

inline void store(bf16* p, vfloat v) {
  const vhalf h = __builtin_convertvector(bf16_bits(v), vhalf);
  std::memcpy(p, &h, sizeof h);
}

// The value a store to T keeps, as float: lane-wise rounding to T's precision.
inline vfloat round_to(const float*, vfloat v) { return v; }
inline vfloat round_to(const bf16*, vfloat v) { return reinterpret_cast<vfloat>(bf16_bits(v) << 16); }

// The first n < kLanes elements of p (the rest 0), and their store: the tails of rows whose
// length is not a multiple of kLanes run through the same vector code as the rest.
template <typename T>
inline vfloat load_partial(const T* p, int64_t n) {
  T tmp[kLanes] = {};
  std::memcpy(tmp, p, n * sizeof(T));
  return load(tmp);
}

template <typename T>
inline void store_partial(T* p, vfloat v, int64_t n) {
  T tmp[kLanes];
  store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}

// The first n <= kLanes elements of p: a whole vector when n == kLanes, else through load_partial.
template <typename T>
inline vfloat ld(const T* p, int64_t n) { return n == kLanes ? load(p) : load_partial(p, n); }

template <typename T>
inline void st(T* p, vfloat v, int64_t n) {
  if (n == kLanes) store(p, v);
  else store_partial(p, v, n);
}

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline vfloat vmin(vfloat a, vfloat b) { return a < b ? a : b; }

// The lanes' indices 0, 1, ..., kLanes - 1.
inline vfloat lane_index() {
  vfloat v{};
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(i);
  return v;
}

// Lane-wise op(v, v rotated by half the lanes), halving the distinct lanes each time, so a
// reduction is log2(kLanes) vector steps rather than kLanes scalar ones.
template <typename Op>
inline float reduce(vfloat v, Op op) {
  for (int half = kLanes / 2; half >= 1; half /= 2) {
    vint idx{};
    for (int i = 0; i < kLanes; ++i) idx[i] = (i + half) % kLanes;
    v = op(v, __builtin_shuffle(v, idx));
  }
  return v[0];
}

#if defined(__AVX512F__)
// GCC 12 does not fold reduce()'s index vectors into constant permutes in every loop it is
// inlined in; these are the same halving steps with immediate shuffles.
inline float reduce_add(vfloat v) { return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v)); }
inline float reduce_max(vfloat v) { return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v)); }
#else
inline float reduce_add(vfloat v) { return reduce(v, [](vfloat a, vfloat b) { return a + b; }); }
inline float reduce_max(vfloat v) { return reduce(v, [](vfloat a, vfloat b) { return vmax(a, b); }); }
#endif

// exp(x) lane-wise for x <= 88: Cephes expf (range reduction by ln 2, degree-6 polynomial),
// ~1-2 ulp. Inputs below ln(FLT_MIN), -inf included, give exactly 0; above 88.38, exp(88.38).
inline vfloat vexp(vfloat x) {
  const vint underflow = x < -87.33654475f;
  x = vmin(vmax(x, splat(-87.33654475f)), splat(88.3762626647949f));
  // Round x / ln 2 to the nearest integer: adding 1.5 * 2^23 leaves no fraction bits.
  const vfloat magic = splat(12582912.f);
  const vfloat fx = (x * 1.44269504088896341f + magic) - magic;
  x = x - fx * 0.693359375f;
  x = x - fx * -2.12194440e-4f;
  vfloat y = splat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * (x * x) + (x + 1.f);
  const vint e = (__builtin_convertvector(fx, vint) + 127) << 23;
  y = y * reinterpret_cast<vfloat>(e);
  return underflow ? vfloat{} : y;
}

}  // namespace tokenmill
