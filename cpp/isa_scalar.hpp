// Portable primitives: plain C++ that any compiler and CPU can run.
#pragma once
#include <cstdint>

#include "philox.hpp"

namespace fastdropout {
namespace scalar {
namespace {

constexpr int kLanes = 4;
constexpr int64_t kMR = 4, kNR = 8, kMC = 512, kKC = 256, kNC = 512;

inline void philox_soa(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, PhiloxKey key,
                       int rounds) {
  for (int l = 0; l < kLanes; ++l) {
    uint32_t c[4] = {c0[l], c1[l], c2[l], c3[l]};
    philox4x32(c, key, rounds);
    c0[l] = c[0];
    c1[l] = c[1];
    c2[l] = c[2];
    c3[l] = c[3];
  }
}

inline void words64(uint64_t block, PhiloxKey key, uint32_t* out) {
  for (uint64_t b = 0; b < 16; ++b) philox_block_words((block + b) & kBlockMask, key, out + 4 * b);
}

inline uint64_t keep_bits64(uint64_t block, PhiloxKey key, uint32_t t) {
  uint64_t bits = 0;
  for (uint64_t b = 0; b < 16; ++b) {
    uint32_t w[4];
    philox_block_words((block + b) & kBlockMask, key, w);
    for (int l = 0; l < 4; ++l) bits |= uint64_t{w[l] >= t} << (4 * b + static_cast<uint64_t>(l));
  }
  return bits;
}

template <bool Stream, class T>
inline void select_scale64(const T* x, T* y, uint64_t bits, T s) {
  for (int i = 0; i < 64; ++i) y[i] = ((bits >> i) & 1) ? x[i] * s : T(0);
}

inline void stream_fence() {}

inline void bits_to_bytes64(uint64_t bits, uint8_t* out) {
  for (int i = 0; i < 64; ++i) out[i] = static_cast<uint8_t>((bits >> i) & 1);
}

inline void microkernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                        bool accumulate) {
  float acc[kMR][kNR] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int r = 0; r < kMR; ++r)
      for (int n = 0; n < kNR; ++n) acc[r][n] += a[k * kMR + r] * b[k * kNR + n];
  for (int r = 0; r < kMR; ++r)
    for (int n = 0; n < kNR; ++n) c[r * ldc + n] = accumulate ? c[r * ldc + n] + acc[r][n] : acc[r][n];
}

}  // namespace
}  // namespace scalar
}  // namespace fastdropout
