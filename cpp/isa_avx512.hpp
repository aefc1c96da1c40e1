// AVX-512 primitives (F, BW, DQ, VL, BMI2).  Included only by kernels_avx512.cpp,
// which is compiled with the matching flags.  No namespace-scope SIMD constants.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "philox.hpp"

namespace fastdropout {
namespace avx512 {
namespace {

constexpr int kLanes = 16;  // Philox blocks per vector
// Depth x column block 512 x 256 (measured against 256 x 512: 1-4% faster at
// 1024x4096x4096 and 256x1024x1024, on both paths, whose sums close at kKC).
constexpr int64_t kMR = 8, kNR = 32, kMC = 1024, kKC = 512, kNC = 256;
constexpr int64_t kSNR = 64;  // panel width of the sparse path: 4 rows x 4 vectors of sums
// Its depth and column blocking (measured): a block deeper than the dense path's
// makes fewer passes over C, which cost more next to the sparse path's halved
// arithmetic; one panel per column block (64 columns measured 2-3% faster for the
// forward at 1024x4096x4096 than 128, 256 5% slower).
// Rows per block (measured: 512 and 768 alike, 1024 6-12% slower and less steady at
// 1024x4096x4096, 256 4-6% slower): the block's rows, about 4 MB, stay in L3.
constexpr int64_t kSKC = 1024, kSNC = 64, kSMC = 512;
#define FD_ISA_SPARSE 1        // this backend has sparse_rows (the sparse path)
// Masks that drop at least this fraction of the elements (p >= 0.3) take the sparse
// path: at p = 0.3 the sparse forward measured 6-12% faster than the dense kernel from
// 32x512x512 to 1024x2048x2048 (Zen 4), at p = 0.25 between 6% faster and 1% slower.
constexpr uint64_t kSparseMin = 1288490189;  // round(0.3 * 2**32)
// grad_weight's sparse form (its depth is the batch) from p >= 0.375: at p = 0.3 it
// measured 5% slower than the dense kernel at 256x1024x1024, at 0.35 as fast.
constexpr uint64_t kSparseGradMin = uint64_t{3} << 29;  // 0.375 * 2**32
// Any number of output columns; a thread's columns are whole panels (its edge tiles go
// through part at the panel's full width).
constexpr int64_t kSparseMinN = 0, kSparseSplit = kSNR;

/// Philox rounds on S independent sets of 8 blocks, each held in 64-bit lanes
/// (value in the low half).  vpmuludq reads only the low halves, so the high
/// halves may carry garbage: it never reaches a low half.  A round is a chain of
/// multiply (5 cycles), shift and xor, so one set alone leaves the core idle:
/// with two sets Philox gave 0.62-0.72 ns a word on one core of a Xeon (family 6
/// model 167), with four 0.49-0.60 (bench/experiments/core_rates.cpp, part 4).
template <int S>
inline void philox_sets(__m512i (&s)[S][4], PhiloxKey key, int rounds) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < rounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const __m512i kv0 = _mm512_set1_epi64(k0), kv1 = _mm512_set1_epi64(k1);
    for (int q = 0; q < S; ++q) {
      const __m512i p0 = _mm512_mul_epu32(s[q][0], m0), p1 = _mm512_mul_epu32(s[q][2], m1);
      // 0x96: three-way xor
      s[q][0] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), s[q][1], kv0, 0x96);
      s[q][2] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), s[q][3], kv1, 0x96);
      s[q][1] = p1;
      s[q][3] = p0;
    }
  }
}

/// Sets 2h and 2h + 1 of philox_sets' state for blocks block .. block + 15 (mod 2**62):
/// the even blocks in set 2h, the odd ones in set 2h + 1.
template <int S>
inline void philox_start(__m512i (&s)[S][4], int h, uint64_t block) {
  const __m512i mask = _mm512_set1_epi64(static_cast<long long>(kBlockMask));
  const __m512i even = _mm512_and_si512(
      _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(block)),
                       _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14)),
      mask);
  const __m512i odd = _mm512_and_si512(_mm512_add_epi64(even, _mm512_set1_epi64(1)), mask);
  s[2 * h][0] = even;
  s[2 * h][1] = _mm512_srli_epi64(even, 32);
  s[2 * h + 1][0] = odd;
  s[2 * h + 1][1] = _mm512_srli_epi64(odd, 32);
  for (int q = 2 * h; q < 2 * h + 2; ++q) s[q][2] = s[q][3] = _mm512_setzero_si512();
}

/// The four output words of the 16 blocks in sets 2h and 2h + 1: lane l of w[k] is
/// word k of the h-th first block + l.
template <int S>
inline void philox_words(const __m512i (&s)[S][4], int h, __m512i w[4]) {
  for (int k = 0; k < 4; ++k) w[k] = _mm512_mask_blend_epi32(0xAAAA, s[2 * h][k], _mm512_slli_epi64(s[2 * h + 1][k], 32));
}

/// The four output words of blocks block .. block + 15 (mod 2**62): lane l of
/// w[k] is word k of block block + l.
inline void philox16(uint64_t block, PhiloxKey key, __m512i w[4]) {
  __m512i s[2][4];
  philox_start(s, 0, block);
  philox_sets(s, key, 10);
  philox_words(s, 0, w);
}

inline void philox_soa(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, PhiloxKey key,
                       int rounds) {
  uint32_t* rows[4] = {c0, c1, c2, c3};
  __m512i s[2][4];
  for (int k = 0; k < 4; ++k) {
    s[0][k] = _mm512_loadu_si512(rows[k]);  // even lanes sit in the low halves already
    s[1][k] = _mm512_srli_epi64(s[0][k], 32);
  }
  philox_sets(s, key, rounds);
  __m512i w[4];
  philox_words(s, 0, w);
  for (int k = 0; k < 4; ++k) _mm512_storeu_si512(rows[k], w[k]);
}

/// Keep bits of the 64 elements whose words are w (philox16's layout); t < 2**32.
inline uint64_t keep_bits_of(const __m512i w[4], uint32_t t) {
  const __m512i tv = _mm512_set1_epi32(static_cast<int>(t));
  // Word w of block b is element 4b + w: interleave the four 16-bit lane masks.
  const uint64_t k0 = _mm512_cmpge_epu32_mask(w[0], tv);
  const uint64_t k1 = _mm512_cmpge_epu32_mask(w[1], tv);
  const uint64_t k2 = _mm512_cmpge_epu32_mask(w[2], tv);
  const uint64_t k3 = _mm512_cmpge_epu32_mask(w[3], tv);
  return _pdep_u64(k0, 0x1111111111111111ull) | _pdep_u64(k1, 0x2222222222222222ull) |
         _pdep_u64(k2, 0x4444444444444444ull) | _pdep_u64(k3, 0x8888888888888888ull);
}

/// Keep bits of the 64 elements of blocks block .. block + 15; t < 2**32.
inline uint64_t keep_bits64(uint64_t block, PhiloxKey key, uint32_t t) {
  __m512i c[4];
  philox16(block, key, c);
  return keep_bits_of(c, t);
}

/// Blocks block .. block + 31 (mod 2**62) in four Philox chains (see philox_sets): w[h] holds
/// the words of blocks block + 16 h .. block + 16 h + 15 in philox16's layout.
inline void philox32(uint64_t block, PhiloxKey key, __m512i w[2][4]) {
  __m512i s[4][4];
  philox_start(s, 0, block);
  philox_start(s, 1, block + 16);
  philox_sets(s, key, 10);
  philox_words(s, 0, w[0]);
  philox_words(s, 1, w[1]);
}

/// Keep bits of the 128 elements of blocks block .. block + 31 (mod 2**62), 64 to a word.
#define FD_ISA_KEEP_BITS128 1
inline void keep_bits128(uint64_t block, PhiloxKey key, uint32_t t, uint64_t out[2]) {
  __m512i w[2][4];
  philox32(block, key, w);
  out[0] = keep_bits_of(w[0], t);
  out[1] = keep_bits_of(w[1], t);
}

/// The 64 words whose vectors are c (philox16's layout), stored in element order.
inline void store_words(const __m512i c[4], uint32_t* out) {
  const __m512i c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  // 4x4 transpose inside each 128-bit lane, then of the 128-bit lanes.
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i s0 = _mm512_shuffle_i32x4(u0, u1, 0x44), s1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
  const __m512i s2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), s3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  _mm512_storeu_si512(out, _mm512_shuffle_i32x4(s0, s1, 0x88));
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(s0, s1, 0xDD));
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(s2, s3, 0x88));
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(s2, s3, 0xDD));
}

/// The 64 random words of blocks block .. block + 15, in element order.
inline void words64(uint64_t block, PhiloxKey key, uint32_t* out) {
  __m512i c[4];
  philox16(block, key, c);
  store_words(c, out);
}

/// The 128 random words of blocks block .. block + 31 (mod 2**62), in element order.
#define FD_ISA_WORDS128 1
inline void words128(uint64_t block, PhiloxKey key, uint32_t* out) {
  __m512i w[2][4];
  philox32(block, key, w);
  store_words(w[0], out);
  store_words(w[1], out + 64);
}

/// y[0:64] = keep ? x * s : +0.  Stream: y is 64-byte aligned, bypass the caches.
template <bool Stream>
inline void select_scale64(const float* x, float* y, uint64_t bits, float s) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int q = 0; q < 4; ++q) {
    const __mmask16 m = static_cast<__mmask16>(bits >> (16 * q));
    const __m512 v = _mm512_maskz_mul_ps(m, _mm512_loadu_ps(x + 16 * q), sv);
    if (Stream)
      _mm512_stream_ps(y + 16 * q, v);
    else
      _mm512_storeu_ps(y + 16 * q, v);
  }
}

template <bool Stream>
inline void select_scale64(const double* x, double* y, uint64_t bits, double s) {
  const __m512d sv = _mm512_set1_pd(s);
  for (int q = 0; q < 8; ++q) {
    const __mmask8 m = static_cast<__mmask8>(bits >> (8 * q));
    const __m512d v = _mm512_maskz_mul_pd(m, _mm512_loadu_pd(x + 8 * q), sv);
    if (Stream)
      _mm512_stream_pd(y + 8 * q, v);
    else
      _mm512_storeu_pd(y + 8 * q, v);
  }
}

/// e**x for 16 floats, exp_approx's method (kernels_impl.hpp): 0 below -87.
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
}

/// The largest of x[0:n] (n a multiple of 16; -inf when all are).
#define FD_ISA_ROWS 1
inline float row_max(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + j));
  return _mm512_reduce_max_ps(m);
}

/// x = e**(x - m) over n (a multiple of 16); returns the sum.
inline float row_exp(float* x, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), mv));
    _mm512_storeu_ps(x + j, e);
    s = _mm512_add_ps(s, e);
  }
  return _mm512_reduce_add_ps(s);
}

/// y[0:64] = keep ? x * a + b_keep : b_drop (alpha dropout; the multiply and the add rounded
/// separately).
#define FD_ISA_AFFINE 1
inline void affine_select64(const float* x, float* y, uint64_t bits, float a, float bk, float bd) {
  const __m512 av = _mm512_set1_ps(a), bkv = _mm512_set1_ps(bk), bdv = _mm512_set1_ps(bd);
  for (int q = 0; q < 4; ++q) {
    const __mmask16 m = static_cast<__mmask16>(bits >> (16 * q));
    const __m512 kept = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * q), av), bkv);
    _mm512_storeu_ps(y + 16 * q, _mm512_mask_blend_ps(m, bdv, kept));
  }
}

inline void affine_select64(const double* x, double* y, uint64_t bits, double a, double bk, double bd) {
  const __m512d av = _mm512_set1_pd(a), bkv = _mm512_set1_pd(bk), bdv = _mm512_set1_pd(bd);
  for (int q = 0; q < 8; ++q) {
    const __mmask8 m = static_cast<__mmask8>(bits >> (8 * q));
    const __m512d kept = _mm512_add_pd(_mm512_mul_pd(_mm512_loadu_pd(x + 8 * q), av), bkv);
    _mm512_storeu_pd(y + 8 * q, _mm512_mask_blend_pd(m, bdv, kept));
  }
}

inline void stream_fence() { _mm_sfence(); }

inline void bits_to_bytes64(uint64_t bits, uint8_t* out) {
  _mm512_storeu_si512(out, _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(1)));
}

/// dst[j * ldd + i] = src[i * lds + j] for i, j < 16.
#define FD_ISA_TRANSPOSE 1
constexpr int64_t kT = 16;
inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  // 32-bit, then 64-bit interleaves within 128-bit lanes, then 128-bit lane shuffles
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4a + b] holds, in 128-bit lane q, rows 4a .. 4a + 3 of column 4q + b
  for (int a = 0; a < 4; a += 2)
    for (int b = 0; b < 4; ++b) {
      t[4 * a + b] = _mm512_shuffle_f32x4(r[4 * a + b], r[4 * a + 4 + b], 0x88);      // lanes 0, 2 | 0, 2
      t[4 * a + 4 + b] = _mm512_shuffle_f32x4(r[4 * a + b], r[4 * a + 4 + b], 0xdd);  // lanes 1, 3 | 1, 3
    }
  // t[b] / t[8 + b]: rows 0-7 / 8-15 for columns (b, 8 + b) and (4 + b, 12 + b)
  for (int b = 0; b < 4; ++b) {
    const __m512 lo0 = t[b], hi0 = t[8 + b], lo1 = t[4 + b], hi1 = t[12 + b];
    _mm512_storeu_ps(dst + b * ldd, _mm512_shuffle_f32x4(lo0, hi0, 0x88));
    _mm512_storeu_ps(dst + (8 + b) * ldd, _mm512_shuffle_f32x4(lo0, hi0, 0xdd));
    _mm512_storeu_ps(dst + (4 + b) * ldd, _mm512_shuffle_f32x4(lo1, hi1, 0x88));
    _mm512_storeu_ps(dst + (12 + b) * ldd, _mm512_shuffle_f32x4(lo1, hi1, 0xdd));
  }
}

/// Row r of the 8 x 32 tile at c: (lo, hi) stored, or added to what is there.
inline void store_tile_row(float* c, int64_t ldc, bool accumulate, int r, __m512 lo, __m512 hi) {
  float* cr = c + r * ldc;
  if (accumulate) {
    lo = _mm512_add_ps(_mm512_loadu_ps(cr), lo);
    hi = _mm512_add_ps(_mm512_loadu_ps(cr + 16), hi);
  }
  _mm512_storeu_ps(cr, lo);
  _mm512_storeu_ps(cr + 16, hi);
}

/// A micro-kernel's 8 x 32 sums, row by row (two vectors a row), to C.
inline void store_tile(float* c, int64_t ldc, bool accumulate, __m512 c00, __m512 c01, __m512 c10, __m512 c11,
                       __m512 c20, __m512 c21, __m512 c30, __m512 c31, __m512 c40, __m512 c41, __m512 c50,
                       __m512 c51, __m512 c60, __m512 c61, __m512 c70, __m512 c71) {
  store_tile_row(c, ldc, accumulate, 0, c00, c01);
  store_tile_row(c, ldc, accumulate, 1, c10, c11);
  store_tile_row(c, ldc, accumulate, 2, c20, c21);
  store_tile_row(c, ldc, accumulate, 3, c30, c31);
  store_tile_row(c, ldc, accumulate, 4, c40, c41);
  store_tile_row(c, ldc, accumulate, 5, c50, c51);
  store_tile_row(c, ldc, accumulate, 6, c60, c61);
  store_tile_row(c, ldc, accumulate, 7, c70, c71);
}

/// C[0:MR, 0:NR] (+)= A_panel (kc x MR) * B_panel (kc x NR).
/// The 8 x 32 register tile.  Sixteen named accumulators rather than an array: compiled
/// out of line, GCC kept an array's rows on the stack and stored them every step.
inline void microkernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                        bool accumulate) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  __m512 c60 = c00, c61 = c00, c70 = c00, c71 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b + k * kNR);
    const __m512 b1 = _mm512_load_ps(b + k * kNR + 16);
    const float* ak = a + k * kMR;
    __m512 av = _mm512_set1_ps(ak[0]);
    c00 = _mm512_fmadd_ps(av, b0, c00);
    c01 = _mm512_fmadd_ps(av, b1, c01);
    av = _mm512_set1_ps(ak[1]);
    c10 = _mm512_fmadd_ps(av, b0, c10);
    c11 = _mm512_fmadd_ps(av, b1, c11);
    av = _mm512_set1_ps(ak[2]);
    c20 = _mm512_fmadd_ps(av, b0, c20);
    c21 = _mm512_fmadd_ps(av, b1, c21);
    av = _mm512_set1_ps(ak[3]);
    c30 = _mm512_fmadd_ps(av, b0, c30);
    c31 = _mm512_fmadd_ps(av, b1, c31);
    av = _mm512_set1_ps(ak[4]);
    c40 = _mm512_fmadd_ps(av, b0, c40);
    c41 = _mm512_fmadd_ps(av, b1, c41);
    av = _mm512_set1_ps(ak[5]);
    c50 = _mm512_fmadd_ps(av, b0, c50);
    c51 = _mm512_fmadd_ps(av, b1, c51);
    av = _mm512_set1_ps(ak[6]);
    c60 = _mm512_fmadd_ps(av, b0, c60);
    c61 = _mm512_fmadd_ps(av, b1, c61);
    av = _mm512_set1_ps(ak[7]);
    c70 = _mm512_fmadd_ps(av, b0, c70);
    c71 = _mm512_fmadd_ps(av, b1, c71);
  }
  store_tile(c, ldc, accumulate, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, c60, c61, c70, c71);
}

/// Bit j set where v[j] != 0 (NaN included), for j < 64.
inline uint64_t nonzero_bits64(const float* v) {
  uint64_t m = 0;
  for (int q = 0; q < 4; ++q)
    m |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(v + 16 * q), _mm512_setzero_ps(), _CMP_NEQ_UQ))
         << (16 * q);
  return m;
}

/// Set bits of a 16-bit mask (portable: no compiler builtin or POPCNT needed).
inline int64_t popcount16(uint32_t m) {
  m = m - ((m >> 1) & 0x5555u);
  m = (m & 0x3333u) + ((m >> 2) & 0x3333u);
  m = (m + (m >> 4)) & 0x0f0fu;
  return static_cast<int64_t>((m + (m >> 8)) & 0x1fu);
}

/// out[0 : popcount(m)] = v[d] for the set bits d < 64 of m, in order of d, and
/// out[popcount(m) : 64] = 0.  out is 64-byte aligned.
inline void compact64(const float* v, uint64_t m, float* out) {
  for (int q = 0; q < 4; ++q) _mm512_store_ps(out + 16 * q, _mm512_setzero_ps());
  int64_t at = 0;
  for (int q = 0; q < 4; ++q) {
    const __mmask16 k = static_cast<__mmask16>(m >> (16 * q));
    _mm512_storeu_ps(out + at, _mm512_maskz_compress_ps(k, _mm512_loadu_ps(v + 16 * q)));
    at += popcount16(k);
  }
}

/// Four rows of a sparse-operand GEMM over the 64-depth chunks w0 .. w1 - 1: for r < 4,
///   c[r * ldc + 0 : SNR] (+)= sum over the depths d in them whose bit is set of A(r, d) * b[d * SNR + 0 : SNR],
/// where b is a packed B panel and bit d % 64 of bits[r * bld + d / 64] is row r's bit
/// for depth d.  The n-th step of a chunk multiplies row r's n-th value of that chunk,
/// kept[r * kld + w * 64 + n]: the kept values compacted (compact64), or, with every
/// bit set, the values by depth.  A permute picks it out of a register loaded once per
/// 16 steps (measured 3-5% faster at 1024x4096x4096 than a broadcast load per step).
/// Rows that run out of set bits before the others add 0 * (row 0 of the chunk):
/// tzcnt(0) = 64, and the compacted values end in zeros.  One FMA chain per output
/// element, in depth order, exactly as the dense micro-kernel sums: skipping a zero
/// term never changes a bit (the accumulator starts at +0, never becomes -0).
/// kept and kld are 64-byte aligned.
inline void sparse_rows(int64_t w0, int64_t w1, const float* kept, int64_t kld, const uint64_t* bits,
                        int64_t bld, const float* b, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t w = w0; w < w1; ++w) {
    uint64_t m[4];
    for (int r = 0; r < 4; ++r) m[r] = bits[r * bld + w];
    const float* bw = b + w * 64 * kSNR;
    for (const float* kv = kept + w * 64; (m[0] | m[1] | m[2] | m[3]) != 0; kv += 16) {
      __m512 vr[4];
      for (int r = 0; r < 4; ++r) vr[r] = _mm512_load_ps(kv + r * kld);
      __m512i at = _mm512_setzero_si512();
      for (int n = 0; n < 16 && (m[0] | m[1] | m[2] | m[3]) != 0; ++n) {
        for (int r = 0; r < 4; ++r) {
          const uint64_t d = _tzcnt_u64(m[r]);
          m[r] = _blsr_u64(m[r]);
          const __m512 u = _mm512_permutexvar_ps(at, vr[r]);
          const float* p = bw + static_cast<int64_t>(d & 63) * kSNR;
          for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(u, _mm512_load_ps(p + 16 * j), acc[r][j]);
        }
        at = _mm512_add_epi32(at, one);
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    float* cr = c + r * ldc;
    for (int j = 0; j < 4; ++j) {
      if (accumulate) acc[r][j] = _mm512_add_ps(_mm512_loadu_ps(cr + 16 * j), acc[r][j]);
      _mm512_storeu_ps(cr + 16 * j, acc[r][j]);
    }
  }
}

// The bfloat16 dot-product kernel (AVX512_BF16's vdpbf16ps), for CPUs that have it; the
// caller checks the CPU (dispatch.hpp's bf16_dot_enabled) before calling.  GCC from 10 and
// Clang from 9 (Apple's from 11) know the instruction; with an older compiler, or MSVC, the
// backend has no such kernel.
#if (defined(__clang__) && defined(__apple_build_version__) && __clang_major__ >= 11) || \
    (defined(__clang__) && !defined(__apple_build_version__) && __clang_major__ >= 9) ||  \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define FD_ISA_BF16_DOT 1

/// C[0:MR, 0:NR] (+)= the dense micro-kernel's product on depth pairs: a holds, per pair
/// of depths (2q, 2q + 1) and row, the two bfloat16 values in 32 bits (depth 2q in the
/// high half), b the same per column.  vdpbf16ps adds the high halves' product to the
/// accumulator, then the low halves' (two roundings, products exact: Intel's and AMD's
/// definition, checked on Zen 4 against the float32 FMA chain), so each output is the
/// dense micro-kernel's FMA chain in depth order, bit for bit, wherever no operand,
/// product or partial sum is subnormal (the instruction treats them as zero) and every
/// operand is finite: the caller's bf16_block_ok.  Out of line: its target is wider
/// than the rest of the backend's.
__attribute__((target("avx512bf16"), noinline)) void microkernel_bf16(int64_t kp, const uint32_t* a,
                                                                      const uint32_t* b, float* c, int64_t ldc,
                                                                      bool accumulate) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  __m512 c60 = c00, c61 = c00, c70 = c00, c71 = c00;
  for (int64_t q = 0; q < kp; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(b + q * kNR);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(b + q * kNR + 16);
    const uint32_t* aq = a + q * kMR;
    __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[0]));
    c00 = _mm512_dpbf16_ps(c00, av, b0);
    c01 = _mm512_dpbf16_ps(c01, av, b1);
    av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[1]));
    c10 = _mm512_dpbf16_ps(c10, av, b0);
    c11 = _mm512_dpbf16_ps(c11, av, b1);
    av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[2]));
    c20 = _mm512_dpbf16_ps(c20, av, b0);
    c21 = _mm512_dpbf16_ps(c21, av, b1);
    av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[3]));
    c30 = _mm512_dpbf16_ps(c30, av, b0);
    c31 = _mm512_dpbf16_ps(c31, av, b1);
    av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[4]));
    c40 = _mm512_dpbf16_ps(c40, av, b0);
    c41 = _mm512_dpbf16_ps(c41, av, b1);
    av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[5]));
    c50 = _mm512_dpbf16_ps(c50, av, b0);
    c51 = _mm512_dpbf16_ps(c51, av, b1);
    av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[6]));
    c60 = _mm512_dpbf16_ps(c60, av, b0);
    c61 = _mm512_dpbf16_ps(c61, av, b1);
    av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aq[7]));
    c70 = _mm512_dpbf16_ps(c70, av, b0);
    c71 = _mm512_dpbf16_ps(c71, av, b1);
  }
  store_tile(c, ldc, accumulate, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, c60, c61, c70, c71);
}

/// What the dot-product kernel needs to know of a packed block's values: whether each is a
/// bfloat16 value (its low 16 bits zero), finite, and zero or normal, and the smallest
/// exponent field among the nonzero ones (255 where there are none).
struct PairScan {
  __m512i low = _mm512_setzero_si512(), max_e = _mm512_setzero_si512(), min_e = _mm512_set1_epi32(255);
  void add(__m512i v, __mmask16 k) {
    low = _mm512_or_si512(low, _mm512_and_si512(v, _mm512_set1_epi32(0xffff)));
    const __m512i e = _mm512_and_si512(_mm512_srli_epi32(v, 23), _mm512_set1_epi32(0xff));
    max_e = _mm512_max_epu32(max_e, e);
    const __mmask16 nonzero = _mm512_mask_test_epi32_mask(k, v, _mm512_set1_epi32(0x7fffffff));
    min_e = _mm512_mask_min_epu32(min_e, nonzero, min_e, e);
  }
  /// The same for words that are pairs already (two bfloat16 values each).
  void add_pairs(__m512i v, __mmask16 k) {
    const __m512i ff = _mm512_set1_epi32(0xff);
    const __m512i e_hi = _mm512_and_si512(_mm512_srli_epi32(v, 23), ff), e_lo = _mm512_and_si512(_mm512_srli_epi32(v, 7), ff);
    max_e = _mm512_max_epu32(max_e, _mm512_max_epu32(e_hi, e_lo));
    min_e = _mm512_mask_min_epu32(min_e, _mm512_mask_test_epi32_mask(k, v, _mm512_set1_epi32(0x7fff0000)), min_e, e_hi);
    min_e = _mm512_mask_min_epu32(min_e, _mm512_mask_test_epi32_mask(k, v, _mm512_set1_epi32(0x7fff)), min_e, e_lo);
  }
  /// false where a value is not bfloat16, not finite or subnormal; else its smallest exponent.
  bool finish(uint32_t* min_exp) const {
    const uint32_t lo = static_cast<uint32_t>(_mm512_reduce_or_epi32(low));
    const uint32_t hi = static_cast<uint32_t>(_mm512_reduce_max_epu32(max_e));
    *min_exp = static_cast<uint32_t>(_mm512_reduce_min_epu32(min_e));
    return lo == 0 && hi < 255 && *min_exp >= 1;
  }
};

/// scan.add_pairs over n words of pairs.
inline void scan_pairs(const uint32_t* p, int64_t n, PairScan& scan) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) scan.add_pairs(_mm512_loadu_si512(p + i), 0xffff);
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    scan.add_pairs(_mm512_maskz_loadu_epi32(k, p + i), k);
  }
}

/// out[l] = the high halves of a[l] << 16 | b[l] >> 16 for l < n (n <= 16; b may be null: 0),
/// from float32 values, which `scan` sees.
inline void pair_float_rows(const float* a, const float* b, uint32_t* out, int64_t n, PairScan& scan) {
  const __mmask16 k = n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
  const __m512i va = _mm512_castps_si512(_mm512_maskz_loadu_ps(k, a));
  const __m512i vb = b ? _mm512_castps_si512(_mm512_maskz_loadu_ps(k, b)) : _mm512_setzero_si512();
  scan.add(va, k);
  scan.add(vb, k);
  const __m512i pair = _mm512_or_si512(_mm512_and_si512(va, _mm512_set1_epi32(static_cast<int>(0xffff0000u))),
                                       _mm512_srli_epi32(vb, 16));
  _mm512_mask_storeu_epi32(out, k, pair);
}

/// out[q] = the pair of depths (2q, 2q + 1) of a bfloat16 row h, for q < 16 (both depths
/// inside the row): the 32-bit word at h + 2q holds depth 2q in its low half, so rotated.
inline void row_pairs16(const uint16_t* h, uint32_t* out) {
  _mm512_store_si512(out, _mm512_rol_epi32(_mm512_loadu_si512(h), 16));
}

/// Packed panels of W lanes (panels x kc x W floats, as pack writes them) to depth pairs:
/// out[p kp W + q W + l] = high half of in[p, 2q, l] << 16 | high half of in[p, 2q + 1, l]
/// (0 past kc; kp = ceil(kc / 2)), scanning the values into `scan`.  W is 8 or a multiple of 16.
template <int64_t W>
void to_pairs(const float* in, int64_t panels, int64_t kc, uint32_t* out, PairScan& scan) {
  static_assert(W == 8 || W % 16 == 0, "whole vectors or one half");
  constexpr int64_t V = W < 16 ? 1 : W / 16;
  constexpr __mmask16 kLanesUsed = W < 16 ? static_cast<__mmask16>((1u << W) - 1) : static_cast<__mmask16>(0xffff);
  const int64_t kp = (kc + 1) / 2;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t p = 0; p < panels; ++p) {
    const float* src = in + p * kc * W;
    uint32_t* dst = out + p * kp * W;
    for (int64_t q = 0; q < kp; ++q) {
      const bool second = 2 * q + 1 < kc;
      for (int64_t v = 0; v < V; ++v) {
        const float* r0 = src + 2 * q * W + 16 * v;
        const __m512i a = _mm512_castps_si512(_mm512_maskz_loadu_ps(kLanesUsed, r0));
        const __m512i b = second ? _mm512_castps_si512(_mm512_maskz_loadu_ps(kLanesUsed, r0 + W)) : _mm512_setzero_si512();
        scan.add(a, kLanesUsed);
        scan.add(b, kLanesUsed);
        const __m512i pair = _mm512_or_si512(_mm512_and_si512(a, high), _mm512_srli_epi32(b, 16));
        _mm512_mask_storeu_epi32(dst + q * W + 16 * v, kLanesUsed, pair);
      }
    }
  }
}
#endif

#include "half_x86.hpp"

}  // namespace
}  // namespace avx512
}  // namespace fastdropout
