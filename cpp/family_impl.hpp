// The rest of the dropout family, written once: broadcast masks (the keep bits of a small
// noise array applied over a larger one), alpha dropout, and dropout + residual +
// LayerNorm/RMSNorm in one pass per row.  Included by kernels_impl.hpp inside
// fastdropout::FD_ISA::(anonymous).

#if !defined(FD_ISA_AFFINE)
template <class T>
inline void affine_select64(const T* x, T* y, uint64_t bits, T a, T bk, T bd) {
  for (int i = 0; i < 64; ++i) {
    const T kept = x[i] * a;
    y[i] = ((bits >> i) & 1) ? kept + bk : bd;
  }
}
#endif

/// 64 keep bits starting at bit `pos` of a packed array (16 readable bytes past the end).
inline uint64_t packed_bits_at(const uint8_t* bits, uint64_t pos) {
  const uint8_t* p = bits + (pos >> 3);
  const unsigned shift = static_cast<unsigned>(pos & 7);
  uint64_t lo;
  std::memcpy(&lo, p, sizeof lo);
  if (!shift) return lo;
  return (lo >> shift) | (uint64_t{p[8]} << (64 - shift));
}

template <class T>
inline T family_one(T x, bool keep, T a, T bk, T bd, bool affine) {
  if (!keep) return affine ? bd : T(0);
  const T kept = x * a;
  return affine ? kept + bk : kept;
}

template <class T>
void family(const T* x, T* y, int64_t n, const KeepSource& src, const ElemOp& op) {
  const T a = static_cast<T>(op.a), bk = static_cast<T>(op.b_keep), bd = static_cast<T>(op.b_drop);
  auto chunk = [&](int64_t i, uint64_t w) {
    if (op.affine)
      affine_select64(x + i, y + i, w, a, bk, bd);
    else
      select_scale64<false>(x + i, y + i, w, a);
  };
  if (src.kind == KeepSource::block) {
    if (!src.keep) {
      for (int64_t i = 0; i < n; ++i) y[i] = op.affine ? bd : T(0);
      return;
    }
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) chunk(i, ~uint64_t{0});
    for (; i < n; ++i) y[i] = family_one(x[i], true, a, bk, bd, op.affine);
    return;
  }
  if (src.kind == KeepSource::packed) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) chunk(i, packed_bits_at(src.bits, src.b0 + static_cast<uint64_t>(i)));
    if (i < n) {
      const uint64_t w = packed_bits_at(src.bits, src.b0 + static_cast<uint64_t>(i));
      for (int64_t k = 0; i + k < n; ++k) y[i + k] = family_one(x[i + k], (w >> k) & 1, a, bk, bd, op.affine);
    }
    return;
  }
  BitStream bits(src.j0, src.key, src.threshold);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) chunk(i, bits.next(n - i));
  if (i < n) {
    const uint64_t w = bits.next(n - i);
    for (int64_t k = 0; i + k < n; ++k) y[i + k] = family_one(x[i + k], (w >> k) & 1, a, bk, bd, op.affine);
  }
}

void family_f32(const float* x, float* y, int64_t n, const KeepSource& src, const ElemOp& op) {
  family<float>(x, y, n, src, op);
}
void family_f64(const double* x, double* y, int64_t n, const KeepSource& src, const ElemOp& op) {
  family<double>(x, y, n, src, op);
}

// ---------------------------------------------------------------------------
// Dropout + residual + LayerNorm / RMSNorm, one row at a time (statistics in double)
// ---------------------------------------------------------------------------

/// Lanes of the row sums: kSumLanes partial sums, added up in a fixed order at the end (the
/// compiler vectorizes these loops; the order never depends on threads).
constexpr int64_t kSumLanes = 8;

/// sum of v[0:n] over kSumLanes partial sums.
inline double lane_sum(const double* v, int64_t n) {
  double acc[kSumLanes] = {};
  int64_t c = 0;
  for (; c + kSumLanes <= n; c += kSumLanes)
    for (int64_t l = 0; l < kSumLanes; ++l) acc[l] += v[c + l];
  for (; c < n; ++c) acc[c % kSumLanes] += v[c];
  double s = 0.0;
  for (int64_t l = 0; l < kSumLanes; ++l) s += acc[l];
  return s;
}

/// s = residual + dropout(x) for one row, in the dtype (dropout's own select-and-scale into
/// `tmp`), widened into `s`.
template <class T>
void add_dropped_row(const AddNormProblem& a, int64_t r, double* s, T* tmp) {
  const T* x = static_cast<const T*>(a.x) + r * a.D;
  const T* res = static_cast<const T*>(a.residual) + r * a.D;
  if (a.mask.enabled) {
    dropout<T>(x, tmp, a.D, a.mask.offset + static_cast<uint64_t>(r * a.D), a.mask.key, a.mask.threshold,
               static_cast<T>(a.keep_scale));
    x = tmp;
  }
  for (int64_t c = 0; c < a.D; ++c) s[c] = static_cast<double>(T(res[c] + x[c]));
}

/// Mean (0 for RMSNorm) and 1 / sqrt(variance + eps) of a row; `work` holds D doubles.
inline void row_stats(const double* s, int64_t D, bool rms, double eps, double* work, double& mean, double& rstd) {
  const double m = rms ? 0.0 : lane_sum(s, D) / static_cast<double>(D);
  for (int64_t c = 0; c < D; ++c) work[c] = (s[c] - m) * (s[c] - m);
  mean = m;
  rstd = 1.0 / std::sqrt(lane_sum(work, D) / static_cast<double>(D) + eps);
}

template <class T>
void add_norm(const AddNormProblem& a, int64_t r0, int64_t r1) {
  const int64_t D = a.D > 0 ? a.D : 1;
  std::unique_ptr<double[]> buf(new double[static_cast<size_t>(2 * D)]);
  std::unique_ptr<T[]> tmp(new T[static_cast<size_t>(D)]);
  double *s = buf.get(), *work = s + D;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t r = r0; r < r1; ++r) {
    add_dropped_row<T>(a, r, s, tmp.get());
    double mean, rstd;
    row_stats(s, a.D, a.rms, a.eps, work, mean, rstd);
    T* y = static_cast<T*>(a.y) + r * a.D;
    for (int64_t c = 0; c < a.D; ++c) {
      const double v = (s[c] - mean) * rstd;
      const double scaled = w ? v * static_cast<double>(w[c]) : v;
      y[c] = static_cast<T>(b ? scaled + static_cast<double>(b[c]) : scaled);
    }
    if (a.sum) {
      T* out = static_cast<T*>(a.sum) + r * a.D;
      for (int64_t c = 0; c < a.D; ++c) out[c] = static_cast<T>(s[c]);
    }
  }
}

template <class T>
void add_norm_backward(const AddNormProblem& a, int64_t r0, int64_t r1, double* wsum, double* bsum) {
  const int64_t D = a.D > 0 ? a.D : 1;
  std::unique_ptr<double[]> buf(new double[static_cast<size_t>(4 * D)]);
  std::unique_ptr<T[]> tmp(new T[static_cast<size_t>(D)]);
  double *s = buf.get(), *g = s + D, *xhat = g + D, *work = xhat + D;
  const T* w = static_cast<const T*>(a.weight);
  for (int64_t r = r0; r < r1; ++r) {
    add_dropped_row<T>(a, r, s, tmp.get());
    double mean, rstd;
    row_stats(s, a.D, a.rms, a.eps, work, mean, rstd);
    const T* dy = static_cast<const T*>(a.grad_out) + r * a.D;
    for (int64_t c = 0; c < a.D; ++c) {
      xhat[c] = (s[c] - mean) * rstd;
      const double d = static_cast<double>(dy[c]);
      g[c] = w ? d * static_cast<double>(w[c]) : d;
      work[c] = g[c] * xhat[c];
    }
    const int64_t block = r / kNormRows * a.D;
    if (wsum)
      for (int64_t c = 0; c < a.D; ++c) wsum[block + c] += static_cast<double>(dy[c]) * xhat[c];
    if (bsum)
      for (int64_t c = 0; c < a.D; ++c) bsum[block + c] += static_cast<double>(dy[c]);
    const double mg = a.rms ? 0.0 : lane_sum(g, a.D) / static_cast<double>(a.D);
    const double mgx = lane_sum(work, a.D) / static_cast<double>(a.D);
    T* gr = static_cast<T*>(a.grad_residual) + r * a.D;
    for (int64_t c = 0; c < a.D; ++c) tmp[c] = static_cast<T>(rstd * (g[c] - mg - xhat[c] * mgx));  // dL/ds
    if (gr) std::memcpy(gr, tmp.get(), static_cast<size_t>(a.D) * sizeof(T));
    T* gx = static_cast<T*>(a.grad_x) + r * a.D;
    if (!gx) continue;
    if (a.mask.enabled)
      dropout<T>(tmp.get(), gx, a.D, a.mask.offset + static_cast<uint64_t>(r * a.D), a.mask.key, a.mask.threshold,
                 static_cast<T>(a.keep_scale));
    else
      std::memcpy(gx, tmp.get(), static_cast<size_t>(a.D) * sizeof(T));
  }
}

void add_norm_f32(const AddNormProblem& a, int64_t r0, int64_t r1) { add_norm<float>(a, r0, r1); }
void add_norm_f64(const AddNormProblem& a, int64_t r0, int64_t r1) { add_norm<double>(a, r0, r1); }
void add_norm_backward_f32(const AddNormProblem& a, int64_t r0, int64_t r1, double* wsum, double* bsum) {
  add_norm_backward<float>(a, r0, r1, wsum, bsum);
}
void add_norm_backward_f64(const AddNormProblem& a, int64_t r0, int64_t r1, double* wsum, double* bsum) {
  add_norm_backward<double>(a, r0, r1, wsum, bsum);
}

// ---------------------------------------------------------------------------
// Gaussian dropout (the contract's Gaussian section): y = x * (1 + sigma * z), z from the
// Box-Muller transform of the words (2m, 2m + 1) of element pair m.  float32 computes z in
// float32 with the reductions done on the integer words (so the error stays relative to z
// and to r), float64 in double with the C library.  Written branch-free so that the
// compiler vectorizes the float32 loop (-fno-trapping-math).
// ---------------------------------------------------------------------------

/// a * b + c rounded once, float32: the same bits on every backend (the FMA instruction where
/// this backend's file is compiled for one, else the C library's correctly rounded fmaf).
inline float fma_f32(float a, float b, float c) { return std::fma(a, b, c); }

/// ln(x) for a positive normal float (Cephes' logf reduction and polynomial, about 1 ulp).
inline float log_poly(float x) {
  const uint32_t u = f32_bits(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 127;
  float m = bits_f32((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float t = m - 1.0f;
  const float t2 = t * t, t4 = t2 * t2;
  // p(t) = a0 + a1 t + ... + a8 t**8 by Estrin's scheme (a chain of 4 multiply-adds where
  // Horner's has 8: the SIMD backends overlap fewer such chains than they have lanes for)
  const float q0 = fma_f32(-2.4999993993e-1f, t, 3.3333331174e-1f), q1 = fma_f32(-1.6668057665e-1f, t, 2.0000714765e-1f);
  const float q2 = fma_f32(-1.2420140846e-1f, t, 1.4249322787e-1f), q3 = fma_f32(-1.1514610310e-1f, t, 1.1676998740e-1f);
  const float r0 = fma_f32(q1, t2, q0), r1 = fma_f32(7.0376836292e-2f, t4, fma_f32(q3, t2, q2));
  const float p = fma_f32(r1, t4, r0);
  const float fe = static_cast<float>(e);
  float r = fma_f32(t * t2, p, fe * -2.12194440e-4f);
  r = fma_f32(-0.5f, t2, r);
  return fma_f32(fe, 0.693359375f, t + r);
}

/// The two normal deviates (r cos theta, r sin theta) of words w1, w2 in float32.
inline void box_muller_f32(uint32_t w1, uint32_t w2, float& z_cos, float& z_sin) {
  // ln u1, u1 = (w1 + 0.5) 2**-32.  Below one half: ln u1 directly.  Above: ln(1 - t) with
  // t = (2**32 - 1 - w1 + 0.5) 2**-32 (to a relative 2**-23), as log1p: ln(v) - ((v - 1) + t) / v.
  // (Signed conversions of 31-bit integers: AVX2 has no unsigned one.  n 2**-32 + 2**-33 rounded
  // once is (n + 0.5) 2**-32 rounded once: scaling by a power of two commutes with rounding.)
  const bool upper = w1 >= 0x80000000u;
  constexpr float k2m32 = 2.3283064365386962890625e-10f, k2m33 = 1.16415321826934814453125e-10f;
  const float lo_arg = fma_f32(static_cast<float>(static_cast<int32_t>(w1 & 0x7fffffffu)), k2m32, k2m33);
  const float t = fma_f32(static_cast<float>(static_cast<int32_t>((0xffffffffu - w1) & 0x7fffffffu)), k2m32, k2m33);
  const float v = upper ? 1.0f - t : lo_arg;
  const float corr = upper ? ((v - 1.0f) + t) / v : 0.0f;
  const float ln_u1 = log_poly(v) - corr;
  const float r = std::sqrt(-2.0f * ln_u1);
  // theta = 2 pi (w2 + 0.5) 2**-32: the nearest quarter turn q, then f = theta - q pi / 2 from the
  // exact integer remainder d = w2 - q 2**30, so |f| <= pi / 4.
  const uint32_t q = ((w2 + 0x20000000u) >> 30) & 3u;
  const int32_t d = static_cast<int32_t>(w2 - (q << 30));
  const float f = static_cast<float>(2 * d + 1) * 7.3145903963357984e-10f;  // pi / 2**32
  const float f2 = f * f;
  // Cephes sinf / cosf on [-pi/4, pi/4]
  const float s = fma_f32(fma_f32(-1.9515295891e-4f, f2, 8.3321608736e-3f), f2, -1.6666654611e-1f);
  const float sin_f = fma_f32(f * f2, s, f);
  const float c = fma_f32(fma_f32(2.443315711809948e-5f, f2, -1.388731625493765e-3f), f2, 4.166664568298827e-2f);
  const float cos_f = fma_f32(f2 * f2, c, fma_f32(-0.5f, f2, 1.0f));
  const float cos_t = q == 0 ? cos_f : (q == 1 ? -sin_f : (q == 2 ? -cos_f : sin_f));
  const float sin_t = q == 0 ? sin_f : (q == 1 ? cos_f : (q == 2 ? -sin_f : -cos_f));
  z_cos = r * cos_t;
  z_sin = r * sin_t;
}

constexpr int64_t kGaussChunk = 256;  // words (elements) per step

void gaussian_f32_any(const float* x, float* y, int64_t n, uint64_t j0, PhiloxKey key, float sigma) {
  alignas(64) uint32_t w[kGaussChunk + 2];
  alignas(64) float z[kGaussChunk + 2];
  uint64_t start = j0 & ~uint64_t{1};  // the pair of the first element
  int64_t skip = static_cast<int64_t>(j0 & 1), i = 0;
  while (i < n) {
    const int64_t take = min64(kGaussChunk - skip, n - i);
    const int64_t words = round_up(skip + take, 2);
    random_words(w, words, start, key);
#if defined(_OPENMP)
#pragma omp simd
#endif
    for (int64_t m = 0; m < words / 2; ++m) box_muller_f32(w[2 * m], w[2 * m + 1], z[2 * m], z[2 * m + 1]);
    for (int64_t k = 0; k < take; ++k) {
      const float g = fma_f32(sigma, z[skip + k], 1.0f);
      y[i + k] = x[i + k] * g;
    }
    i += take;
    start += static_cast<uint64_t>(words);
    skip = 0;
  }
}

void gaussian_f32(const float* x, float* y, int64_t n, uint64_t j0, PhiloxKey key, float sigma) {
#if defined(FD_ISA_GAUSS)
  // whole 64-element groups (16 Philox blocks) through the backend's own transform,
  // the unaligned head and the tail through the portable loop (the same results)
  const int64_t head = min64(n, static_cast<int64_t>((64 - (j0 & 63)) & 63));
  gaussian_f32_any(x, y, head, j0, key, sigma);
  const int64_t groups = (n - head) / 64, i = head + 64 * groups;
  gaussian_groups((j0 + static_cast<uint64_t>(head)) >> 2, groups, KeySchedule(key), x + head, y + head, sigma);
  gaussian_f32_any(x + i, y + i, n - i, j0 + static_cast<uint64_t>(i), key, sigma);
#else
  gaussian_f32_any(x, y, n, j0, key, sigma);
#endif
}

void normal_pairs_f32(const uint32_t* w, float* z, int64_t pairs) {
  int64_t m = 0;
#if defined(FD_ISA_GAUSS)
  for (; m + kLanes <= pairs; m += kLanes) {
    uint32_t w1[kLanes], w2[kLanes];
    float zc[kLanes], zs[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      w1[l] = w[2 * (m + l)];
      w2[l] = w[2 * (m + l) + 1];
    }
    box_muller_lanes(w1, w2, zc, zs);
    for (int l = 0; l < kLanes; ++l) {
      z[2 * (m + l)] = zc[l];
      z[2 * (m + l) + 1] = zs[l];
    }
  }
#endif
  for (; m < pairs; ++m) box_muller_f32(w[2 * m], w[2 * m + 1], z[2 * m], z[2 * m + 1]);
}

void gaussian_f64(const double* x, double* y, int64_t n, uint64_t j0, PhiloxKey key, double sigma) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  alignas(64) uint32_t w[kGaussChunk + 2];
  uint64_t start = j0 & ~uint64_t{1};
  int64_t skip = static_cast<int64_t>(j0 & 1), i = 0;
  while (i < n) {
    const int64_t take = min64(kGaussChunk - skip, n - i);
    const int64_t words = round_up(skip + take, 2);
    random_words(w, words, start, key);
    for (int64_t k = 0; k < take; ++k) {
      const int64_t at = skip + k, m = at / 2;
      const double w1 = static_cast<double>(w[2 * m]), u2 = (static_cast<double>(w[2 * m + 1]) + 0.5) * 0x1p-32;
      // ln u1 as log1p for u1 > 1/2, so that 1 - u1 keeps its bits
      const double ln_u1 = w1 >= 2147483648.0 ? std::log1p(-((4294967295.0 - w1) + 0.5) * 0x1p-32)
                                              : std::log((w1 + 0.5) * 0x1p-32);
      const double r = std::sqrt(-2.0 * ln_u1);
      const double zz = (at & 1) ? r * std::sin(kTwoPi * u2) : r * std::cos(kTwoPi * u2);
      y[i + k] = x[i + k] * (1.0 + sigma * zz);
    }
    i += take;
    start += static_cast<uint64_t>(words);
    skip = 0;
  }
}
