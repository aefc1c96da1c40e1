// float16 and bfloat16 conversions, branch-free, and the 16-bit dropout built on them.
// Included by kernels_impl.hpp inside each backend's namespace (no includes here), so
// every backend compiles its own copy.  The conversions are plain integer and float
// arithmetic; a backend whose primitives define FD_ISA_HALF (half_x86.hpp, F16C) does
// whole 64-element blocks with select_scale64_h16 instead, bit-identical to these.

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// IEEE binary16 -> float32, exact (subnormals, infinities; NaN keeps its payload, quieted).
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  // normal: rebias the exponent (15 -> 127)
  const uint32_t normal = sign | ((exp + 112u) << 23) | (man << 13);
  // subnormal: man * 2**-24, exact in float32
  const float sub = static_cast<float>(man) * 5.9604644775390625e-8f;
  const uint32_t subnormal = sign | f32_bits(sub);
  const uint32_t special = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u);
  return bits_f32(exp == 0 ? subnormal : exp == 0x1f ? special : normal);
}

/// float32 -> IEEE binary16, rounding to nearest even (overflow to inf; NaN stays NaN, quieted).
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal half (2**-14 <= |f| < 65520): round the 13 dropped bits to even; a carry
  // may step into the exponent, or up to inf
  const uint32_t normal = (a + 0xfffu + ((a >> 13) & 1u) - (112u << 23)) >> 13;
  // subnormal half or zero: adding 0.5 (whose ulp is 2**-24, the half subnormal step)
  // rounds to even in the float unit
  const uint32_t sub = f32_bits(bits_f32(a) + 0.5f) - 0x3f000000u;
  const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
  const uint32_t out = a > 0x7f800000u ? nan : a >= 0x47800000u ? 0x7c00u : a >= 0x38800000u ? normal : sub;
  return static_cast<uint16_t>(sign | out);
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

/// float32 -> bfloat16, rounding to nearest even (NaN stays NaN, quieted).
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(nan ? (u >> 16) | 0x40u : rounded);
}

/// Dropout of 16-bit floats (the contract's half-precision rule): kept x as float32, times s (float32),
/// rounded once to the format; dropped +0.
template <bool BF16>
void dropout_h16_impl(const uint16_t* x, uint16_t* y, int64_t n, uint64_t j0, PhiloxKey key,
                      uint64_t t, float s) {
  if (t >= kDropAll) {
    for (int64_t i = 0; i < n; ++i) y[i] = 0;
    return;
  }
  BitStream bits(j0, key, t);
  alignas(64) uint8_t keep[64];
  for (int64_t i = 0; i < n; i += 64) {
#if defined(FD_ISA_HALF)
    if (i + 64 <= n) {
      select_scale64_h16<BF16>(x + i, y + i, bits.next(n - i), s);
      continue;
    }
#endif
    bits_to_bytes64(bits.next(n - i), keep);
    const int64_t m = min64(64, n - i);
    for (int64_t k = 0; k < m; ++k) {
      const float v = (BF16 ? bf16_to_f32(x[i + k]) : f16_to_f32(x[i + k])) * s;
      const uint16_t h = BF16 ? f32_to_bf16(v) : f32_to_f16(v);
      y[i + k] = keep[k] ? h : uint16_t{0};
    }
  }
}

void dropout_h16(const uint16_t* x, uint16_t* y, int64_t n, uint64_t j0, PhiloxKey key,
                 uint64_t t, float s, bool bf16) {
  if (bf16)
    dropout_h16_impl<true>(x, y, n, j0, key, t, s);
  else
    dropout_h16_impl<false>(x, y, n, j0, key, t, s);
}
