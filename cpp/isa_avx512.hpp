// AVX-512 primitives (F, BW, DQ, VL, BMI2).  Included only by kernels_avx512.cpp,
// which is compiled with the matching flags.  No namespace-scope SIMD constants.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "philox.hpp"

namespace fastdropout {
namespace avx512 {
namespace {

constexpr int kLanes = 16;  // Philox blocks per vector
constexpr int64_t kMR = 8, kNR = 32, kMC = 1024, kKC = 256, kNC = 512;

/// Philox rounds on two independent sets of 8 blocks held in 64-bit lanes
/// (value in the low half).  vpmuludq reads only the low halves, so the high
/// halves may carry garbage: it never reaches a low half.  Two sets give the
/// out-of-order core two independent dependency chains.
inline void philox_pairs(__m512i a[4], __m512i b[4], PhiloxKey key, int rounds) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < rounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const __m512i kv0 = _mm512_set1_epi64(k0), kv1 = _mm512_set1_epi64(k1);
    const __m512i pa0 = _mm512_mul_epu32(a[0], m0), pa1 = _mm512_mul_epu32(a[2], m1);
    const __m512i pb0 = _mm512_mul_epu32(b[0], m0), pb1 = _mm512_mul_epu32(b[2], m1);
    // 0x96: three-way xor
    a[0] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa1, 32), a[1], kv0, 0x96);
    a[2] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa0, 32), a[3], kv1, 0x96);
    a[1] = pa1;
    a[3] = pa0;
    b[0] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb1, 32), b[1], kv0, 0x96);
    b[2] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb0, 32), b[3], kv1, 0x96);
    b[1] = pb1;
    b[3] = pb0;
  }
}

/// The four output words of blocks block .. block + 15 (mod 2**62): lane l of
/// w[k] is word k of block block + l.
inline void philox16(uint64_t block, PhiloxKey key, __m512i w[4]) {
  const __m512i mask = _mm512_set1_epi64(static_cast<long long>(kBlockMask));
  const __m512i even = _mm512_and_si512(
      _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(block)),
                       _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14)),
      mask);
  const __m512i odd = _mm512_and_si512(_mm512_add_epi64(even, _mm512_set1_epi64(1)), mask);
  __m512i a[4] = {even, _mm512_srli_epi64(even, 32), _mm512_setzero_si512(), _mm512_setzero_si512()};
  __m512i b[4] = {odd, _mm512_srli_epi64(odd, 32), _mm512_setzero_si512(), _mm512_setzero_si512()};
  philox_pairs(a, b, key, 10);
  for (int k = 0; k < 4; ++k) w[k] = _mm512_mask_blend_epi32(0xAAAA, a[k], _mm512_slli_epi64(b[k], 32));
}

inline void philox_soa(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, PhiloxKey key,
                       int rounds) {
  uint32_t* rows[4] = {c0, c1, c2, c3};
  __m512i a[4], b[4];
  for (int k = 0; k < 4; ++k) {
    a[k] = _mm512_loadu_si512(rows[k]);  // even lanes sit in the low halves already
    b[k] = _mm512_srli_epi64(a[k], 32);
  }
  philox_pairs(a, b, key, rounds);
  for (int k = 0; k < 4; ++k)
    _mm512_storeu_si512(rows[k], _mm512_mask_blend_epi32(0xAAAA, a[k], _mm512_slli_epi64(b[k], 32)));
}

/// Keep bits of the 64 elements of blocks block .. block + 15; t < 2**32.
inline uint64_t keep_bits64(uint64_t block, PhiloxKey key, uint32_t t) {
  __m512i c[4];
  philox16(block, key, c);
  const __m512i tv = _mm512_set1_epi32(static_cast<int>(t));
  // Word w of block b is element 4b + w: interleave the four 16-bit lane masks.
  const uint64_t k0 = _mm512_cmpge_epu32_mask(c[0], tv);
  const uint64_t k1 = _mm512_cmpge_epu32_mask(c[1], tv);
  const uint64_t k2 = _mm512_cmpge_epu32_mask(c[2], tv);
  const uint64_t k3 = _mm512_cmpge_epu32_mask(c[3], tv);
  return _pdep_u64(k0, 0x1111111111111111ull) | _pdep_u64(k1, 0x2222222222222222ull) |
         _pdep_u64(k2, 0x4444444444444444ull) | _pdep_u64(k3, 0x8888888888888888ull);
}

/// The 64 random words of blocks block .. block + 15, in element order.
inline void words64(uint64_t block, PhiloxKey key, uint32_t* out) {
  __m512i c[4];
  philox16(block, key, c);
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

inline void stream_fence() { _mm_sfence(); }

inline void bits_to_bytes64(uint64_t bits, uint8_t* out) {
  _mm512_storeu_si512(out, _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(1)));
}

/// C[0:MR, 0:NR] (+)= A_panel (kc x MR) * B_panel (kc x NR).
inline void microkernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                        bool accumulate) {
  __m512 acc[kMR][2];
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b + k * kNR);
    const __m512 b1 = _mm512_load_ps(b + k * kNR + 16);
    const float* ak = a + k * kMR;
    for (int r = 0; r < kMR; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < kMR; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      acc[r][0] = _mm512_add_ps(_mm512_loadu_ps(cr), acc[r][0]);
      acc[r][1] = _mm512_add_ps(_mm512_loadu_ps(cr + 16), acc[r][1]);
    }
    _mm512_storeu_ps(cr, acc[r][0]);
    _mm512_storeu_ps(cr + 16, acc[r][1]);
  }
}

}  // namespace
}  // namespace avx512
}  // namespace fastdropout
