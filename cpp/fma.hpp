// a * b + c rounded once in float32 without an FMA instruction, exactly: what the portable
// backend's fma_f32 (family_impl.hpp) runs where the target has none.  The self-test checks it
// against std::fma.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "fma_f32_emulated needs float and double arithmetic in their own precision (SSE2, not x87)"
#endif

namespace fastdropout {

/// a * b + c rounded once, from doubles: the product of two floats is exact in double; the
/// sum is rounded to odd (TwoSum gives the sum's exact error, which decides the sticky last
/// bit), and rounding that to float is the correctly rounded result, double having more than
/// 2 * 24 + 2 bits (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums: proved
/// algorithms using rounding to odd", IEEE Trans. Computers 57(4), 2008).  Needs the build's
/// -ffp-contract=off (no fused TwoSum).
inline float fma_f32_emulated(float a, float b, float c) {
  const double p = static_cast<double>(a) * static_cast<double>(b), cd = static_cast<double>(c);
  const double s = p + cd, bp = s - p;
  const double err = (p - (s - bp)) + (cd - bp);  // s + err = p + c exactly
  uint64_t u, e;
  std::memcpy(&u, &s, sizeof u);
  std::memcpy(&e, &err, sizeof e);
  // inexact and even: the neighbour of s toward the exact sum, whose last bit is odd
  const bool adjust = err != 0.0 && (u & 1) == 0;
  const uint64_t toward = ((u ^ e) >> 63) ? ~uint64_t{0} : uint64_t{1};  // +1: away from zero
  u += adjust ? toward : 0;
  double r;
  std::memcpy(&r, &u, sizeof r);
  return static_cast<float>(r);
}

}  // namespace fastdropout
