// AVX2 + FMA primitives.  Included only by kernels_avx2.cpp, which is compiled
// with the matching flags.  No namespace-scope SIMD constants.  BMI2 is not used
// here on purpose: pdep is microcoded (slow) on AMD CPUs before Zen 3.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "philox.hpp"

namespace fastdropout {
namespace avx2 {
namespace {

// A short loop unrolled whole (GCC and Clang; MSVC has no such pragma and decides alone).
#if defined(__GNUC__)
#define FD_UNROLL_ALL _Pragma("GCC unroll 16")
#else
#define FD_UNROLL_ALL
#endif

constexpr int kLanes = 8;
constexpr int64_t kMR = 6, kNR = 16, kMC = 1020, kKC = 256, kNC = 512;

inline void mulhilo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline void philox_rounds(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, PhiloxKey key,
                          int rounds) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < rounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, hi0, lo0);
    mulhilo(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
  }
}

inline void block_counters(uint64_t block, __m256i& c0, __m256i& c1) {
  const __m256i base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block)));
  c0 = _mm256_add_epi32(base, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // unsigned c0 < base, by flipping the sign bits: the carry into the high word
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i carry =
      _mm256_cmpgt_epi32(_mm256_xor_si256(base, sign), _mm256_xor_si256(c0, sign));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block >> 32)));
  c1 = _mm256_and_si256(_mm256_sub_epi32(hi, carry), _mm256_set1_epi32(0x3FFFFFFF));
}

inline void philox_soa(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, PhiloxKey key,
                       int rounds) {
  auto ld = [](const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  auto st = [](uint32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); };
  __m256i v0 = ld(c0), v1 = ld(c1), v2 = ld(c2), v3 = ld(c3);
  philox_rounds(v0, v1, v2, v3, key, rounds);
  st(c0, v0);
  st(c1, v1);
  st(c2, v2);
  st(c3, v3);
}

/// The round keys of Philox4x32-10 as vectors: ks[2 r] = k0 + r W0, ks[2 r + 1] = k1 + r W1.
/// (kernels_impl.hpp: a backend without one uses the PhiloxKey itself.)
#define FD_ISA_KEY_SCHEDULE 1
struct KeySchedule {
  __m256i k[20];
  explicit KeySchedule(PhiloxKey key) {
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {
      k[2 * r] = _mm256_set1_epi32(static_cast<int>(k0));
      k[2 * r + 1] = _mm256_set1_epi32(static_cast<int>(k1));
    }
  }
};

/// One Philox round on two sets of 8 blocks (a, b: words 0-3 each).
inline void philox_round2(__m256i a[4], __m256i b[4], __m256i m0, __m256i m1, __m256i kv0, __m256i kv1) {
  __m256i ah0, al0, ah1, al1, bh0, bl0, bh1, bl1;
  mulhilo(a[0], m0, ah0, al0);
  mulhilo(b[0], m0, bh0, bl0);
  mulhilo(a[2], m1, ah1, al1);
  mulhilo(b[2], m1, bh1, bl1);
  a[0] = _mm256_xor_si256(_mm256_xor_si256(ah1, a[1]), kv0);
  b[0] = _mm256_xor_si256(_mm256_xor_si256(bh1, b[1]), kv0);
  a[1] = al1;
  b[1] = bl1;
  a[2] = _mm256_xor_si256(_mm256_xor_si256(ah0, a[3]), kv1);
  b[2] = _mm256_xor_si256(_mm256_xor_si256(bh0, b[3]), kv1);
  a[3] = al0;
  b[3] = bl0;
}

/// Philox's 10 rounds on blocks block .. block + 15, as two independent sets of 8
/// (a: block + l, b: block + 8 + l in lane l; word j of each block in a[j], b[j]):
/// two dependency chains for the out-of-order core, whose single chain of multiplies,
/// shifts and blends was latency-bound.  The round keys come from memory (a loop that
/// calls this many times builds the schedule once).  Round 0 skips the product of the
/// counter's words 2 and 3 (zero), and the rounds are unrolled: keep bits 1.2x faster on
/// Zen 3 than the rolled loop.  (Gaussian dropout, whose transform is interleaved with the
/// rounds, measured faster with philox16_rolled.)
/// The rounds run on local copies, stored to a and b once at the end: written through the
/// pointers, every round's words went to memory and back (the compiler cannot rule out
/// that a or b overlaps the key schedule it reads), where the compiler did not inline
/// this function; 1.5x faster so on Zen 3.
inline void philox16(uint64_t block, const KeySchedule& ks, __m256i a[4], __m256i b[4]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  __m256i la[4], lb[4], c0, c1;
  block_counters(block, c0, c1);
  mulhilo(c0, m0, la[2], la[3]);  // round 0 on (c0, c1, 0, 0)
  la[0] = _mm256_xor_si256(c1, ks.k[0]);
  la[1] = _mm256_setzero_si256();
  la[2] = _mm256_xor_si256(la[2], ks.k[1]);
  block_counters(block + 8, c0, c1);
  mulhilo(c0, m0, lb[2], lb[3]);
  lb[0] = _mm256_xor_si256(c1, ks.k[0]);
  lb[1] = la[1];
  lb[2] = _mm256_xor_si256(lb[2], ks.k[1]);
  FD_UNROLL_ALL
  for (int r = 1; r < 10; ++r) philox_round2(la, lb, m0, m1, ks.k[2 * r], ks.k[2 * r + 1]);
  FD_UNROLL_ALL
  for (int j = 0; j < 4; ++j) a[j] = la[j], b[j] = lb[j];
}

/// The same words by the plain rolled loop of 10 rounds (on local copies, as philox16).
inline void philox16_rolled(uint64_t block, const KeySchedule& ks, __m256i a[4], __m256i b[4]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  __m256i la[4], lb[4];
  block_counters(block, la[0], la[1]);
  block_counters(block + 8, lb[0], lb[1]);
  la[2] = la[3] = lb[2] = lb[3] = _mm256_setzero_si256();
  for (int r = 0; r < 10; ++r) philox_round2(la, lb, m0, m1, ks.k[2 * r], ks.k[2 * r + 1]);
  FD_UNROLL_ALL
  for (int j = 0; j < 4; ++j) a[j] = la[j], b[j] = lb[j];
}

/// The 32 words of one set of 8 blocks (philox16) in element order, as 4 vectors.
inline void to_elements(const __m256i c[4], __m256i w[4]) {
  const __m256i t0 = _mm256_unpacklo_epi32(c[0], c[1]), t1 = _mm256_unpackhi_epi32(c[0], c[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(c[2], c[3]), t3 = _mm256_unpackhi_epi32(c[2], c[3]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  // u_r holds block 4q + r in its 128-bit lane q
  w[0] = _mm256_permute2x128_si256(u0, u1, 0x20);
  w[1] = _mm256_permute2x128_si256(u2, u3, 0x20);
  w[2] = _mm256_permute2x128_si256(u0, u1, 0x31);
  w[3] = _mm256_permute2x128_si256(u2, u3, 0x31);
}

inline void words64(uint64_t block, const KeySchedule& ks, uint32_t* out) {
  __m256i a[4], b[4], w[4];
  philox16(block, ks, a, b);
  to_elements(a, w);
  for (int q = 0; q < 4; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * q), w[q]);
  to_elements(b, w);
  for (int q = 0; q < 4; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 + 8 * q), w[q]);
}

/// Keep bits (word >= t) of one set of 8 blocks, bit 4 l + j for word j of lane l:
/// compared where the words are, then packed to bytes and put in element order with
/// one in-lane byte shuffle (a 4 x 4 transpose of each lane's 16 bytes).
inline uint32_t keep_bits32(const __m256i c[4], __m256i tv) {
  auto ge = [tv](__m256i w) { return _mm256_cmpeq_epi32(_mm256_max_epu32(w, tv), w); };
  const __m256i p01 = _mm256_packs_epi32(ge(c[0]), ge(c[1]));  // lane q: word 0 of 4 blocks, word 1
  const __m256i p23 = _mm256_packs_epi32(ge(c[2]), ge(c[3]));
  const __m256i bytes = _mm256_packs_epi16(p01, p23);  // lane q: byte 4 j + l = word j of block 4 q + l
  const __m256i order = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12,
                                         1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_shuffle_epi8(bytes, order)));
}

inline uint64_t keep_bits64(uint64_t block, const KeySchedule& ks, uint32_t t) {
  const __m256i tv = _mm256_set1_epi32(static_cast<int>(t));
  __m256i a[4], b[4];
  philox16(block, ks, a, b);
  return uint64_t{keep_bits32(a, tv)} | uint64_t{keep_bits32(b, tv)} << 32;
}

inline __m256i lane_mask8(uint32_t byte) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), sel), sel);
}

template <bool Stream>
inline void select_scale64(const float* x, float* y, uint64_t bits, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  for (int q = 0; q < 8; ++q) {
    const __m256 m = _mm256_castsi256_ps(lane_mask8(static_cast<uint32_t>(bits >> (8 * q)) & 0xFFu));
    const __m256 v = _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * q), sv), m);
    if (Stream)
      _mm256_stream_ps(y + 8 * q, v);
    else
      _mm256_storeu_ps(y + 8 * q, v);
  }
}

/// y[0:64] = keep ? x * a + b_keep : b_drop (alpha dropout; the multiply and the add rounded
/// separately).
#define FD_ISA_AFFINE 1
inline void affine_select64(const float* x, float* y, uint64_t bits, float a, float bk, float bd) {
  const __m256 av = _mm256_set1_ps(a), bkv = _mm256_set1_ps(bk), bdv = _mm256_set1_ps(bd);
  for (int q = 0; q < 8; ++q) {
    const __m256 m = _mm256_castsi256_ps(lane_mask8(static_cast<uint32_t>(bits >> (8 * q)) & 0xFFu));
    const __m256 kept = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * q), av), bkv);
    _mm256_storeu_ps(y + 8 * q, _mm256_blendv_ps(bdv, kept, m));
  }
}

inline void affine_select64(const double* x, double* y, uint64_t bits, double a, double bk, double bd) {
  const __m256d av = _mm256_set1_pd(a), bkv = _mm256_set1_pd(bk), bdv = _mm256_set1_pd(bd);
  const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
  for (int q = 0; q < 16; ++q) {
    const __m256i b = _mm256_set1_epi64x(static_cast<int64_t>((bits >> (4 * q)) & 0xFu));
    const __m256d m = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(b, sel), sel));
    const __m256d kept = _mm256_add_pd(_mm256_mul_pd(_mm256_loadu_pd(x + 4 * q), av), bkv);
    _mm256_storeu_pd(y + 4 * q, _mm256_blendv_pd(bdv, kept, m));
  }
}

inline void stream_fence() { _mm_sfence(); }

/// The Box-Muller pairs of N sets of 8 word pairs (w1, w2): lane by lane the values of
/// family_impl.hpp's box_muller_f32, bit for bit (the same float operations in the same
/// order, its fma_f32 as FMA instructions and nothing else contracted; a few integer steps
/// reach the same bits by shorter routes, as noted).  The N sets go step by step side by
/// side: one set is a chain of about 90 cycles of latency, which one set at a time leaves the
/// core idle (as did Horner's rule for the logarithm's polynomial, 8 multiply-adds in series,
/// now Estrin's scheme in both).
template <int N>
inline void box_muller8(const __m256i* w1, const __m256i* w2, __m256* z_cos, __m256* z_sin) {
  auto f = [](float v) { return _mm256_set1_ps(v); };
  auto i = [](uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); };
  const __m256 half = f(0.5f), one = f(1.0f);
  __m256 upper[N], v[N], corr[N], tt[N], t2[N], p[N], fe[N];
#define FD_EACH FD_UNROLL_ALL for (int k = 0; k < N; ++k)
  FD_EACH {
    // below one half u1 = (w1 + 0.5) 2**-32 from the low 31 bits; above, t from those of
    // ~w1 (= 2**32 - 1 - w1): one xor with the sign mask picks the integer for each lane
    const __m256i up = _mm256_srai_epi32(w1[k], 31);
    const __m256i low = _mm256_and_si256(_mm256_xor_si256(w1[k], up), i(0x7fffffffu));
    const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(low), f(2.3283064365386962890625e-10f), f(1.16415321826934814453125e-10f));
    upper[k] = _mm256_castsi256_ps(up);
    v[k] = _mm256_blendv_ps(t, _mm256_sub_ps(one, t), upper[k]);
    corr[k] = _mm256_add_ps(_mm256_sub_ps(v[k], one), t);  // used above one half only
  }
  // log_poly(v): v = 2**e m with m in [sqrt(1/2), sqrt(2)), t = m - 1.  log_poly halves the
  // mantissa m0 in [1, 2) when m0 > 1.41421356f, i.e. when its bits are >= 0x3fb504f4; the
  // same split in integers: bits(v) - bits(0x3f3504f4) carries the exponent e (arithmetic
  // shift) and, masked, m's mantissa offset.
  FD_EACH {
    const __m256i u = _mm256_sub_epi32(_mm256_castps_si256(v[k]), i(0x3f3504f4u));
    fe[k] = _mm256_cvtepi32_ps(_mm256_srai_epi32(u, 23));
    const __m256 m = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(u, i(0x007fffffu)), i(0x3f3504f4u)));
    tt[k] = _mm256_sub_ps(m, one);
    t2[k] = _mm256_mul_ps(tt[k], tt[k]);
    p[k] = f(7.0376836292e-2f);
  }
  // p(t) = a0 + a1 t + ... + a8 t**8 by Estrin's scheme, as log_poly
  FD_EACH {
    const __m256 t = tt[k], s2 = t2[k], s4 = _mm256_mul_ps(s2, s2);
    auto lin = [&](float a, float b) { return _mm256_fmadd_ps(f(b), t, f(a)); };  // a + b t
    const __m256 q0 = lin(3.3333331174e-1f, -2.4999993993e-1f), q1 = lin(2.0000714765e-1f, -1.6668057665e-1f);
    const __m256 q2 = lin(1.4249322787e-1f, -1.2420140846e-1f), q3 = lin(1.1676998740e-1f, -1.1514610310e-1f);
    const __m256 r0 = _mm256_fmadd_ps(q1, s2, q0), r1 = _mm256_fmadd_ps(q3, s2, q2);
    const __m256 r1b = _mm256_fmadd_ps(f(7.0376836292e-2f), s4, r1);
    p[k] = _mm256_fmadd_ps(r1b, s4, r0);
  }
  __m256 rad[N];
  FD_EACH {
    __m256 r = _mm256_fmadd_ps(_mm256_mul_ps(tt[k], t2[k]), p[k], _mm256_mul_ps(fe[k], f(-2.12194440e-4f)));
    r = _mm256_fnmadd_ps(half, t2[k], r);  // fma(-0.5, t2, r)
    const __m256 ln = _mm256_fmadd_ps(fe[k], f(0.693359375f), _mm256_add_ps(tt[k], r));
    // ln u1 = log_poly(v) - ((v - 1) + t) / v above one half (log1p's correction), 0 below
    const __m256 cr = _mm256_and_ps(_mm256_div_ps(corr[k], v[k]), upper[k]);
    rad[k] = _mm256_sqrt_ps(_mm256_mul_ps(f(-2.0f), _mm256_sub_ps(ln, cr)));
  }
  // The angle: W = w2 + 2**29 has the quarter turn q in its top two bits, d = w2 - q 2**30,
  // a = (2 d + 1) pi 2**-32 in [-pi/4, pi/4].
  const __m256i sign = i(0x80000000u);
  FD_EACH {
    const __m256i W = _mm256_add_epi32(w2[k], i(0x20000000u));
    const __m256i d = _mm256_sub_epi32(w2[k], _mm256_and_si256(W, i(0xc0000000u)));
    const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(d, d), i(1u))),
                                   f(7.3145903963357984e-10f));
    const __m256 a2 = _mm256_mul_ps(a, a);
    const __m256 s = _mm256_fmadd_ps(_mm256_fmadd_ps(f(-1.9515295891e-4f), a2, f(8.3321608736e-3f)), a2,
                                     f(-1.6666654611e-1f));
    const __m256 sin_f = _mm256_fmadd_ps(_mm256_mul_ps(a, a2), s, a);
    const __m256 c = _mm256_fmadd_ps(_mm256_fmadd_ps(f(2.443315711809948e-5f), a2, f(-1.388731625493765e-3f)), a2,
                                     f(4.166664568298827e-2f));
    const __m256 cos_f = _mm256_fmadd_ps(_mm256_mul_ps(a2, a2), c, _mm256_fnmadd_ps(half, a2, one));
    // q = 0: (cos, sin); 1: (-sin, cos); 2: (-cos, -sin); 3: (sin, -cos).  Bit 31 of
    // W << 1 is q & 1 (swap), of W is q & 2 (negate the sine), of W + 2**30 is (q + 1) & 2
    // (negate the cosine).
    const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(W, 1));
    const __m256 cs = _mm256_blendv_ps(cos_f, sin_f, odd), sn = _mm256_blendv_ps(sin_f, cos_f, odd);
    const __m256 neg_c = _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(W, i(0x40000000u)), sign));
    const __m256 neg_s = _mm256_castsi256_ps(_mm256_and_si256(W, sign));
    z_cos[k] = _mm256_mul_ps(rad[k], _mm256_xor_ps(cs, neg_c));
    z_sin[k] = _mm256_mul_ps(rad[k], _mm256_xor_ps(sn, neg_s));
  }
#undef FD_EACH
}

/// box_muller8 on one set from memory (for normal_pairs_f32, which tests reach).
inline void box_muller_lanes(const uint32_t* w1, const uint32_t* w2, float* zc, float* zs) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w2));
  __m256 c, s;
  box_muller8<1>(&a, &b, &c, &s);
  _mm256_storeu_ps(zc, c);
  _mm256_storeu_ps(zs, s);
}


/// y[0:64 groups] = x * (1 + sigma z) for the elements of blocks block .. block + 16 groups
/// (Gaussian dropout): the pairs (word 0, word 1) and (word 2, word 3) of each block
/// transformed where philox16 leaves them, then put in element order.  (Generating the
/// next group's words before this group's transform, to overlap the two, measured slower:
/// registers spilled.)
#define FD_ISA_GAUSS 1
inline void gaussian_groups(uint64_t block, int64_t groups, const KeySchedule& ks, const float* x, float* y,
                            float sigma) {
  const __m256 sv = _mm256_set1_ps(sigma), one = _mm256_set1_ps(1.0f);
  for (int64_t g = 0; g < groups; ++g, x += 64, y += 64, block += 16) {
    __m256i a[4], b[4];
    philox16_rolled(block & kBlockMask, ks, a, b);
    // sets: words (0, 1) and (2, 3) of blocks block + l, then of blocks block + 8 + l
    const __m256i w1[4] = {a[0], a[2], b[0], b[2]}, w2[4] = {a[1], a[3], b[1], b[3]};
    __m256 zc[4], zs[4];
    box_muller8<4>(w1, w2, zc, zs);
    for (int h = 0; h < 2; ++h) {
      const __m256i zi[4] = {_mm256_castps_si256(zc[2 * h]), _mm256_castps_si256(zs[2 * h]),
                             _mm256_castps_si256(zc[2 * h + 1]), _mm256_castps_si256(zs[2 * h + 1])};
      __m256i w[4];
      to_elements(zi, w);
      for (int q = 0; q < 4; ++q) {
        const __m256 g8 = _mm256_fmadd_ps(sv, _mm256_castsi256_ps(w[q]), one);
        _mm256_storeu_ps(y + 32 * h + 8 * q, _mm256_mul_ps(_mm256_loadu_ps(x + 32 * h + 8 * q), g8));
      }
    }
  }
}

template <bool Stream>
inline void select_scale64(const double* x, double* y, uint64_t bits, double s) {
  const __m256d sv = _mm256_set1_pd(s);
  const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
  for (int q = 0; q < 16; ++q) {
    const __m256i b = _mm256_set1_epi64x(static_cast<int64_t>((bits >> (4 * q)) & 0xFu));
    const __m256d m = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(b, sel), sel));
    const __m256d v = _mm256_and_pd(_mm256_mul_pd(_mm256_loadu_pd(x + 4 * q), sv), m);
    if (Stream)
      _mm256_stream_pd(y + 4 * q, v);
    else
      _mm256_storeu_pd(y + 4 * q, v);
  }
}

inline void bits_to_bytes64(uint64_t bits, uint8_t* out) {
  // byte i of a 32-byte vector takes bit i of a 32-bit chunk: spread chunk byte i/8
  // to byte i, then test bit i % 8.
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                          2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(bits >> (32 * h))));
    const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(v, spread), sel);
    const __m256i one = _mm256_and_si256(_mm256_cmpeq_epi8(b, sel), _mm256_set1_epi8(1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * h), one);
  }
}
/// t[j] lane i = src[i * lds + j] for i, j < 8 (an 8 x 8 block transposed into registers).
/// Rows 0-3 and 4-7 are loaded as the two 128-bit halves of each register (the lane
/// exchange done by the loads), then interleaved in 32-bit and 64-bit steps within the
/// lanes: 8 shuffles for 64 values.
inline void transpose8(const float* src, int64_t lds, __m256 t[8]) {
  __m256 r[8];
  // r[i] = row i, columns 0-3 | row i + 4, columns 0-3 (i < 4); r[4 + i]: columns 4-7
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + i * lds)),
                                _mm_loadu_ps(src + (i + 4) * lds), 1);
    r[4 + i] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + i * lds + 4)),
                                    _mm_loadu_ps(src + (i + 4) * lds + 4), 1);
  }
  for (int h = 0; h < 8; h += 4) {  // columns h .. h + 3
    const __m256 t0 = _mm256_unpacklo_ps(r[h], r[h + 1]);      // (0,c0) (1,c0) (0,c1) (1,c1)
    const __m256 t1 = _mm256_unpackhi_ps(r[h], r[h + 1]);      // (0,c2) (1,c2) (0,c3) (1,c3)
    const __m256 t2 = _mm256_unpacklo_ps(r[h + 2], r[h + 3]);  // rows 2, 3
    const __m256 t3 = _mm256_unpackhi_ps(r[h + 2], r[h + 3]);
    t[h + 0] = _mm256_shuffle_ps(t0, t2, 0x44);
    t[h + 1] = _mm256_shuffle_ps(t0, t2, 0xee);
    t[h + 2] = _mm256_shuffle_ps(t1, t3, 0x44);
    t[h + 3] = _mm256_shuffle_ps(t1, t3, 0xee);
  }
}

/// dst[j * ldd + i] = src[i * lds + j] for i, j < 8: the weight's rows become the
/// forward GEMM's B panels this way.  The portable element-by-element copy it replaces
/// took 0.8 ms of a 0.84 ms 1x1024x1024 forward on Zen 3 (one thread), a third of the
/// time at batch 64.
#define FD_ISA_TRANSPOSE 1
constexpr int64_t kT = 8;
inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 t[8];
  transpose8(src, lds, t);
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + j * ldd, t[j]);
}

/// The direct path's micro-kernel (few rows of C, the weight read where it lies): for
/// r < R and n < 8 G,
///   c[r * ldc + n] (+)= sum over k < kc of a[k * kMR + r] * w[n * ldw + k],
/// a a packed A panel and w the rows of op(B)'s transpose (the weight's rows, in place).
/// Each 8 x 8 block of w is transposed in registers on its way to the FMAs, so nothing is
/// stored and read back.  The sums are the micro-kernel's, bit for bit: per output one FMA
/// chain from +0 in depth order, then added to C (or stored) as microkernel does.  G
/// groups of 8 columns give G x R independent chains.
#define FD_ISA_DIRECT 1

/// The direct micro-kernels' sums to C: c[r * ldc + 8 g ...] = acc[r][g], or += with
/// accumulate, as microkernel stores its tile.
template <int R, int G>
inline void store_direct(const __m256 (&acc)[R][G], float* c, int64_t ldc, bool accumulate) {
  FD_UNROLL_ALL for (int r = 0; r < R; ++r) FD_UNROLL_ALL for (int g = 0; g < G; ++g) {
    float* cr = c + r * ldc + 8 * g;
    _mm256_storeu_ps(cr, accumulate ? _mm256_add_ps(_mm256_loadu_ps(cr), acc[r][g]) : acc[r][g]);
  }
}

#if defined(__GNUC__)
#define FD_OPAQUE(v) __asm__("" : "+r"(v))  // the compiler forgets how v was computed
#else
#define FD_OPAQUE(v) ((void)0)
#endif
template <int R, int G>
inline void microkernel_direct(int64_t kc, const float* a, const float* w, int64_t ldw, float* c, int64_t ldc,
                               bool accumulate) {
  __m256 acc[R][G];
  FD_UNROLL_ALL for (int r = 0; r < R; ++r) FD_UNROLL_ALL for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_ps();
  int64_t k = 0;
  // 16 depths a step: each row's cache line used whole at once (rows whose stride is a
  // multiple of 4 KiB share one L1 set, and a line left for the next step is gone by then)
  for (; k + 16 <= kc; k += 16) {
    FD_UNROLL_ALL for (int g = 0; g < G; ++g) {
      // one pointer for the group and one for its A values, opaque to the compiler: else it
      // keeps 8 G row pointers and the broadcasts live across the loop, and spills
      const float* rows = w + g * 8 * ldw + k;
      const float* ak = a + k * kMR;
      FD_OPAQUE(rows);
      FD_OPAQUE(ak);
      FD_UNROLL_ALL for (int h = 0; h < 16; h += 8) {
        __m256 t[8];
        transpose8(rows + h, ldw, t);
        FD_UNROLL_ALL for (int q = 0; q < 8; ++q)
          FD_UNROLL_ALL for (int r = 0; r < R; ++r)
            acc[r][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + (h + q) * kMR + r), t[q], acc[r][g]);
      }
    }
  }
  for (; k < kc; ++k) {  // the depths past the last whole 16: each column of w gathered
    FD_UNROLL_ALL for (int g = 0; g < G; ++g) {
      const float* wk = w + g * 8 * ldw + k;
      const __m256 col = _mm256_setr_ps(wk[0], wk[ldw], wk[2 * ldw], wk[3 * ldw], wk[4 * ldw], wk[5 * ldw],
                                        wk[6 * ldw], wk[7 * ldw]);
      FD_UNROLL_ALL for (int r = 0; r < R; ++r)
        acc[r][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + k * kMR + r), col, acc[r][g]);
    }
  }
  store_direct<R, G>(acc, c, ldc, accumulate);
}

/// The direct path's micro-kernel for a weight read along its rows (op(B) the weight itself,
/// as in grad_x = dz @ weight): for r < R and n < 8 G,
///   c[r * ldc + n] (+)= sum over k < kc of a[k * kMR + r] * b[k * ldb + n],
/// the same FMA chains, from +0 in depth order, then added to C, as microkernel's.
template <int R, int G>
inline void microkernel_direct_rows(int64_t kc, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                                   bool accumulate) {
  __m256 acc[R][G];
  FD_UNROLL_ALL for (int r = 0; r < R; ++r) FD_UNROLL_ALL for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * ldb;
    FD_UNROLL_ALL for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + k * kMR + r);
      FD_UNROLL_ALL for (int g = 0; g < G; ++g) acc[r][g] = _mm256_fmadd_ps(av, _mm256_loadu_ps(bk + 8 * g), acc[r][g]);
    }
  }
  store_direct<R, G>(acc, c, ldc, accumulate);
}

/// e**x for 8 floats, exp_approx's method (kernels_impl.hpp): 0 below -87.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), shifter), shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/// The largest of x[0:n] (n a multiple of 8; -inf when all are).
#define FD_ISA_ROWS 1
inline float row_max(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = t[0];
  for (int l = 1; l < 8; ++l) r = t[l] > r ? t[l] : r;
  return r;
}

/// x = e**(x - m) over n (a multiple of 8); returns the sum.
inline float row_exp(float* x, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
    _mm256_storeu_ps(x + j, e);
    s = _mm256_add_ps(s, e);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, s);
  float r = 0.0f;
  for (int l = 0; l < 8; ++l) r += t[l];
  return r;
}

/// The 6 x 16 register tile.  Twelve named accumulators rather than an array: compiled
/// out of line, GCC kept an array's rows on the stack and stored them every step.
inline void microkernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                        bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kNR);
    const __m256 b1 = _mm256_load_ps(b + k * kNR + 8);
    const float* ak = a + k * kMR;
    __m256 av = _mm256_broadcast_ss(ak);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(ak + 1);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(ak + 2);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(ak + 3);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(ak + 4);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(ak + 5);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  auto store = [c, ldc, accumulate](int r, __m256 lo, __m256 hi) {
    float* cr = c + r * ldc;
    if (accumulate) {
      lo = _mm256_add_ps(_mm256_loadu_ps(cr), lo);
      hi = _mm256_add_ps(_mm256_loadu_ps(cr + 8), hi);
    }
    _mm256_storeu_ps(cr, lo);
    _mm256_storeu_ps(cr + 8, hi);
  };
  store(0, c00, c01);
  store(1, c10, c11);
  store(2, c20, c21);
  store(3, c30, c31);
  store(4, c40, c41);
  store(5, c50, c51);
}

// ---------------------------------------------------------------------------
// The sparse path (kernels_impl.hpp, FD_ISA_SPARSE_CHUNKS): one row at a time against
// one 64-deep chunk of a B panel kSNR wide.  With 16 ymm registers a row's twelve
// vectors of sums and its broadcast fill the file (the AVX-512 form's four rows in
// lockstep would need 32); each kept value costs one broadcast and twelve FMAs that
// read B from L1 (the chunk is 24 KiB), and the sums continue from `part` across the
// chunks of a depth block, so each output is still one FMA chain in depth order.
// Measured on Zen 3, one thread, everything in cache: at p = 0 (every step taken) it
// ran 95% as fast per FMA as the 6 x 16 dense micro-kernel; 64 columns ran 10-15% slower.
// ---------------------------------------------------------------------------
constexpr int64_t kSNR = 96;
// Depth, column and row blocking of the sparse path: one panel per column block.
constexpr int64_t kSKC = 512, kSNC = 96, kSMC = 512;
#define FD_ISA_SPARSE 1         // this backend has the sparse path
#define FD_ISA_SPARSE_CHUNKS 1  // in its one-row-per-chunk form (sparse_row_chunk)
// The forward form from p >= 0.375: against the dense kernel, one process, interleaved,
// 2 threads, medians of 15 (bench/experiments/gemm_paths.py) at 64x784x512, 256x1024x1024
// and 512x2048x2048 it measured 1.02x, 0.93x and 0.91x at p = 0.3, 1.09x, 1.06x and 1.09x
// at 0.35, 1.10-1.12x at 0.4; 1.20-1.28x at 0.5 and 1.36-1.53x at 0.6 (with 1024x4096x4096).
constexpr uint64_t kSparseMin = uint64_t{3} << 29;  // 0.375 * 2**32
// grad_weight's form never: its transposed rows and C measured 0.89-0.97x the dense
// kernel at p = 0.45-0.5 (batch 256 and 1024, 1024 x 1024).
constexpr uint64_t kSparseGradMin = ~uint64_t{0};
// From 64 output columns (at 256x1024xN, p = 0.5, against the dense kernel: 0.77x at 16
// columns, 0.90x at 32, 0.97x at 48, 1.08x at 64, 1.02-1.22x from 128 to 1024), each
// thread's columns a multiple of the dense tile's 16: an edge panel takes a narrower kernel.
constexpr int64_t kSparseMinN = 64, kSparseSplit = kNR;

/// Bit j set where v[j] != 0 (NaN included), for j < 64.
inline uint64_t nonzero_bits64(const float* v) {
  uint64_t m = 0;
  const __m256 zero = _mm256_setzero_ps();
  for (int q = 0; q < 8; ++q)
    m |= static_cast<uint64_t>(static_cast<uint32_t>(
             _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + 8 * q), zero, _CMP_NEQ_UQ))))
         << (8 * q);
  return m;
}

/// For each byte b: the lanes of its set bits in order (one byte each, the rest 0) and
/// how many there are.
struct CompactTable {
  uint64_t lanes[256];
  uint8_t count[256];
};
constexpr CompactTable make_compact_table() {
  CompactTable t{};
  for (unsigned b = 0; b < 256; ++b) {
    unsigned n = 0;
    uint64_t lanes = 0;
    for (unsigned l = 0; l < 8; ++l)
      if ((b >> l) & 1u) lanes |= uint64_t{l} << (8 * n++);
    t.lanes[b] = lanes;
    t.count[b] = static_cast<uint8_t>(n);
  }
  return t;
}

/// out[0 : popcount(m)] = v[d] for the set bits d < 64 of m, in order of d, and
/// out[popcount(m) : 64] = 0.  out is 32-byte aligned.
inline void compact64(const float* v, uint64_t m, float* out) {
  static constexpr CompactTable table = make_compact_table();
  const __m256 zero = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int q = 0; q < 8; ++q) _mm256_store_ps(out + 8 * q, zero);
  int64_t at = 0;
  for (int q = 0; q < 8; ++q) {
    const unsigned b = static_cast<unsigned>(m >> (8 * q)) & 0xFFu;
    if (b == 0) continue;
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(table.lanes[b])));
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(table.count[b]), lane);
    const __m256 x = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v + 8 * q), idx);
    _mm256_storeu_ps(out + at, _mm256_and_ps(x, _mm256_castsi256_ps(live)));  // at + 8 <= 64
    at += table.count[b];
  }
}

/// One row of a sparse-operand GEMM over one 64-depth chunk, V vectors (8 V columns) wide:
///   sums[0 : 8 V] = (carry ? sums : 0) + sum over the set bits d of m, in order, of kept[n] * b[d * kSNR + 0 : 8 V]
/// as one FMA chain per column, where kept[n] is the row's n-th kept value of the chunk
/// (compact64's output; the values by depth where every bit is set) and b the chunk of
/// a packed B panel.  Carrying the sums through memory between chunks never changes a
/// bit: the chain is the dense micro-kernel's, less its zero terms (the sums start at
/// +0 and never become -0, so adding a zero product changes nothing).  With c, the sums
/// go there instead, added to what it holds if add: c[0 : 8 V] (+)= sums, as the dense
/// micro-kernel ends a depth block.  sums is 32-byte aligned.  V = 12 fills a panel; an
/// edge panel takes the fewest vectors that cover its columns.
template <int V>
inline void sparse_row_chunk(uint64_t m, const float* kept, const float* b, float* sums, bool carry, float* c,
                             bool add) {
  static_assert(V >= 1 && 8 * V <= kSNR, "a panel holds the columns");
  __m256 s[V];
  FD_UNROLL_ALL for (int j = 0; j < V; ++j) s[j] = carry ? _mm256_load_ps(sums + 8 * j) : _mm256_setzero_ps();
  for (; m != 0; m = _blsr_u64(m)) {
    const float* p = b + static_cast<int64_t>(_tzcnt_u64(m)) * kSNR;
    const __m256 u = _mm256_broadcast_ss(kept++);
    FD_UNROLL_ALL for (int j = 0; j < V; ++j) s[j] = _mm256_fmadd_ps(u, _mm256_load_ps(p + 8 * j), s[j]);
  }
  if (c == nullptr) {
    FD_UNROLL_ALL for (int j = 0; j < V; ++j) _mm256_store_ps(sums + 8 * j, s[j]);
    return;
  }
  FD_UNROLL_ALL for (int j = 0; j < V; ++j)
    _mm256_storeu_ps(c + 8 * j, add ? _mm256_add_ps(_mm256_loadu_ps(c + 8 * j), s[j]) : s[j]);
}

/// sparse_row_chunk<V> for the V that covers nr columns (1 <= nr <= kSNR).
using SparseRowChunk = void (*)(uint64_t, const float*, const float*, float*, bool, float*, bool);
inline SparseRowChunk sparse_row_chunk_for(int64_t nr) {
  static constexpr SparseRowChunk table[12] = {
      sparse_row_chunk<1>, sparse_row_chunk<2>, sparse_row_chunk<3>,  sparse_row_chunk<4>,
      sparse_row_chunk<5>, sparse_row_chunk<6>, sparse_row_chunk<7>,  sparse_row_chunk<8>,
      sparse_row_chunk<9>, sparse_row_chunk<10>, sparse_row_chunk<11>, sparse_row_chunk<12>};
  return table[(nr + 7) / 8 - 1];
}

#include "half_x86.hpp"

}  // namespace
}  // namespace avx2
}  // namespace fastdropout
