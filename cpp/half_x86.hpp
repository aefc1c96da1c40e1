// 16-bit float dropout on 8 lanes (AVX2 + F16C), for the avx2 and avx512 backends.
// Included by their isa_*.hpp inside the backend's namespace, after <immintrin.h>.
// Bit-identical to half_impl.hpp's portable conversions: F16C rounds to nearest even
// like IEEE, quiets a NaN and truncates its payload exactly as f32_to_f16 does, and a
// NaN read from float16 is quieted by the multiply whichever way it was widened.
#define FD_ISA_HALF 1

/// y[0..63] = keep bit ? round(x * s) : +0 for float16 (BF16 false) or bfloat16 bits.
template <bool BF16>
inline void select_scale64_h16(const uint16_t* x, uint16_t* y, uint64_t bits, float s) {
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int q = 0; q < 8; ++q) {
    const __m256i b = _mm256_set1_epi32(static_cast<int>((bits >> (8 * q)) & 0xFFu));
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel);  // 32-bit lanes
    const __m128i in = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * q));
    __m128i out;
    if (BF16) {
      const __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(in), 16)), sv);
      const __m256i u = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
      const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256i h = _mm256_and_si256(_mm256_blendv_epi8(rounded, quiet, nan), keep);
      out = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    } else {
      const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(in), sv);
      const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m128i k16 = _mm_packs_epi32(_mm256_castsi256_si128(keep), _mm256_extracti128_si256(keep, 1));
      out = _mm_and_si128(h, k16);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + 8 * q), out);
  }
}
