// Functions here are static: each backend translation unit gets its own copy
// compiled with its own flags, so the linker can never hand AVX-512 code to the
// scalar path.
// Philox4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// the scalar definition every backend must reproduce bit for bit (SPEC section 1).
#pragma once
#include <cstdint>

namespace fastdropout {

inline constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

/// Blocks are 62-bit: element j (a 64-bit index) lives in block j >> 2.
inline constexpr uint64_t kBlockMask = (uint64_t{1} << 62) - 1;

/// Threshold for "drop everything": u >= 2**32 never holds for a 32-bit word.
inline constexpr uint64_t kDropAll = uint64_t{1} << 32;

struct PhiloxKey {
  uint32_t k0, k1;
};

static inline PhiloxKey key_from_seed(uint64_t seed) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

static inline void philox_round(uint32_t c[4], uint32_t k0, uint32_t k1) {
  const uint64_t p0 = uint64_t{kPhiloxM0} * c[0];
  const uint64_t p1 = uint64_t{kPhiloxM1} * c[2];
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  const uint32_t n0 = hi1 ^ c[1] ^ k0;
  const uint32_t n2 = hi0 ^ c[3] ^ k1;
  c[0] = n0;
  c[1] = lo1;
  c[2] = n2;
  c[3] = lo0;
}

/// Philox4x32 with `rounds` rounds on counter `c` (in place).
static inline void philox4x32(uint32_t c[4], PhiloxKey key, int rounds) {
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < rounds; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    philox_round(c, k0, k1);
  }
}

/// The four random words of block `block` (62-bit) under `key`.
static inline void philox_block_words(uint64_t block, PhiloxKey key, uint32_t out[4]) {
  out[0] = static_cast<uint32_t>(block);
  out[1] = static_cast<uint32_t>(block >> 32);
  out[2] = 0;
  out[3] = 0;
  philox4x32(out, key, 10);
}

}  // namespace fastdropout
