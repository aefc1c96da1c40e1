// AArch64 Advanced SIMD (NEON) primitives: 4 Philox blocks at once, the keep-bit compare,
// select-and-scale, and an 8 x 8 GEMM micro-kernel.  NEON is part of every AArch64 CPU, so
// this backend needs no run-time check there.  Included only by kernels_neon.cpp.
#pragma once
#include <arm_neon.h>

#include <cstdint>

#include "philox.hpp"

namespace fastdropout {
namespace neon {
namespace {

constexpr int kLanes = 4;
constexpr int64_t kMR = 8, kNR = 8, kMC = 512, kKC = 256, kNC = 512;

/// hi and lo halves of a * m for 4 lanes.
inline void mulhilo(uint32x4_t a, uint32_t m, uint32x4_t& hi, uint32x4_t& lo) {
  const uint32x4_t p0 = vreinterpretq_u32_u64(vmull_n_u32(vget_low_u32(a), m));
  const uint32x4_t p1 = vreinterpretq_u32_u64(vmull_high_n_u32(a, m));
  lo = vuzp1q_u32(p0, p1);
  hi = vuzp2q_u32(p0, p1);
}

inline void philox_rounds(uint32x4_t& c0, uint32x4_t& c1, uint32x4_t& c2, uint32x4_t& c3, PhiloxKey key,
                          int rounds) {
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < rounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32x4_t hi0, lo0, hi1, lo1;
    mulhilo(c0, kPhiloxM0, hi0, lo0);
    mulhilo(c2, kPhiloxM1, hi1, lo1);
    c0 = veorq_u32(veorq_u32(hi1, c1), vdupq_n_u32(k0));
    c1 = lo1;
    c2 = veorq_u32(veorq_u32(hi0, c3), vdupq_n_u32(k1));
    c3 = lo0;
  }
}

inline void philox_soa(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, PhiloxKey key, int rounds) {
  uint32x4_t v0 = vld1q_u32(c0), v1 = vld1q_u32(c1), v2 = vld1q_u32(c2), v3 = vld1q_u32(c3);
  philox_rounds(v0, v1, v2, v3, key, rounds);
  vst1q_u32(c0, v0);
  vst1q_u32(c1, v1);
  vst1q_u32(c2, v2);
  vst1q_u32(c3, v3);
}

/// The 16 words of blocks block .. block + 3 (62-bit, wrapping) in element order.
inline void words16(uint64_t block, PhiloxKey key, uint32_t* out) {
  uint32_t lo[4], hi[4];
  for (int l = 0; l < 4; ++l) {
    const uint64_t b = (block + static_cast<uint64_t>(l)) & kBlockMask;
    lo[l] = static_cast<uint32_t>(b);
    hi[l] = static_cast<uint32_t>(b >> 32);
  }
  uint32x4x4_t c;
  c.val[0] = vld1q_u32(lo);
  c.val[1] = vld1q_u32(hi);
  c.val[2] = vdupq_n_u32(0);
  c.val[3] = vdupq_n_u32(0);
  philox_rounds(c.val[0], c.val[1], c.val[2], c.val[3], key, 10);
  vst4q_u32(out, c);  // out[4 l + w] = word w of block l
}

inline void words64(uint64_t block, PhiloxKey key, uint32_t* out) {
  for (int q = 0; q < 4; ++q) words16(block + 4 * static_cast<uint64_t>(q), key, out + 16 * q);
}

inline uint64_t keep_bits64(uint64_t block, PhiloxKey key, uint32_t t) {
  alignas(16) uint32_t w[64];
  words64(block, key, w);
  const uint32x4_t tv = vdupq_n_u32(t);
  const uint32_t weights[4] = {1, 2, 4, 8};
  const uint32x4_t wv = vld1q_u32(weights);
  uint64_t bits = 0;
  for (int q = 0; q < 16; ++q) {
    const uint32x4_t ge = vcgeq_u32(vld1q_u32(w + 4 * q), tv);
    bits |= static_cast<uint64_t>(vaddvq_u32(vandq_u32(ge, wv))) << (4 * q);
  }
  return bits;
}

inline uint32x4_t lane_mask4(uint64_t nibble) {
  const uint32_t sel[4] = {1, 2, 4, 8};
  return vtstq_u32(vdupq_n_u32(static_cast<uint32_t>(nibble & 0xFu)), vld1q_u32(sel));
}

template <bool Stream>
inline void select_scale64(const float* x, float* y, uint64_t bits, float s) {
  const float32x4_t sv = vdupq_n_f32(s);
  for (int q = 0; q < 16; ++q) {
    const uint32x4_t m = lane_mask4(bits >> (4 * q));
    const float32x4_t v = vmulq_f32(vld1q_f32(x + 4 * q), sv);
    vst1q_f32(y + 4 * q, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), m)));
  }
}

template <bool Stream>
inline void select_scale64(const double* x, double* y, uint64_t bits, double s) {
  const float64x2_t sv = vdupq_n_f64(s);
  const uint64_t sel[2] = {1, 2};
  const uint64x2_t selv = vld1q_u64(sel);
  for (int q = 0; q < 32; ++q) {
    const uint64x2_t m = vtstq_u64(vdupq_n_u64((bits >> (2 * q)) & 3u), selv);
    const float64x2_t v = vmulq_f64(vld1q_f64(x + 2 * q), sv);
    vst1q_f64(y + 2 * q, vreinterpretq_f64_u64(vandq_u64(vreinterpretq_u64_f64(v), m)));
  }
}

inline void stream_fence() {}

inline void bits_to_bytes64(uint64_t bits, uint8_t* out) {
  for (int i = 0; i < 64; ++i) out[i] = static_cast<uint8_t>((bits >> i) & 1);
}

/// The 8 x 8 register tile: sixteen named accumulators, A broadcast by lane.
inline void microkernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, bool accumulate) {
  float32x4_t c00 = vdupq_n_f32(0.0f), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
              c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
  for (int64_t k = 0; k < kc; ++k) {
    const float32x4_t b0 = vld1q_f32(b + k * kNR), b1 = vld1q_f32(b + k * kNR + 4);
    const float32x4_t a0 = vld1q_f32(a + k * kMR), a1 = vld1q_f32(a + k * kMR + 4);
    c00 = vfmaq_laneq_f32(c00, b0, a0, 0);
    c01 = vfmaq_laneq_f32(c01, b1, a0, 0);
    c10 = vfmaq_laneq_f32(c10, b0, a0, 1);
    c11 = vfmaq_laneq_f32(c11, b1, a0, 1);
    c20 = vfmaq_laneq_f32(c20, b0, a0, 2);
    c21 = vfmaq_laneq_f32(c21, b1, a0, 2);
    c30 = vfmaq_laneq_f32(c30, b0, a0, 3);
    c31 = vfmaq_laneq_f32(c31, b1, a0, 3);
    c40 = vfmaq_laneq_f32(c40, b0, a1, 0);
    c41 = vfmaq_laneq_f32(c41, b1, a1, 0);
    c50 = vfmaq_laneq_f32(c50, b0, a1, 1);
    c51 = vfmaq_laneq_f32(c51, b1, a1, 1);
    c60 = vfmaq_laneq_f32(c60, b0, a1, 2);
    c61 = vfmaq_laneq_f32(c61, b1, a1, 2);
    c70 = vfmaq_laneq_f32(c70, b0, a1, 3);
    c71 = vfmaq_laneq_f32(c71, b1, a1, 3);
  }
  auto store = [c, ldc, accumulate](int r, float32x4_t lo, float32x4_t hi) {
    float* cr = c + r * ldc;
    if (accumulate) {
      lo = vaddq_f32(vld1q_f32(cr), lo);
      hi = vaddq_f32(vld1q_f32(cr + 4), hi);
    }
    vst1q_f32(cr, lo);
    vst1q_f32(cr + 4, hi);
  };
  store(0, c00, c01);
  store(1, c10, c11);
  store(2, c20, c21);
  store(3, c30, c31);
  store(4, c40, c41);
  store(5, c50, c51);
  store(6, c60, c61);
  store(7, c70, c71);
}

}  // namespace
}  // namespace neon
}  // namespace fastdropout
