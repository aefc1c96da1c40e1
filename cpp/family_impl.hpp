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

/// s = residual + dropout(x) for one row, in the dtype, widened into `s`.
template <class T>
void add_dropped_row(const AddNormProblem& a, int64_t r, double* s) {
  const T* x = static_cast<const T*>(a.x) + r * a.D;
  const T* res = static_cast<const T*>(a.residual) + r * a.D;
  const T scale = static_cast<T>(a.keep_scale);
  if (!a.mask.enabled) {
    for (int64_t c = 0; c < a.D; ++c) s[c] = static_cast<double>(T(res[c] + x[c]));
    return;
  }
  BitStream bits(a.mask.offset + static_cast<uint64_t>(r * a.D), a.mask.key, a.mask.threshold);
  for (int64_t c0 = 0; c0 < a.D; c0 += 64) {
    const uint64_t w = bits.next(a.D - c0);
    const int64_t len = min64(64, a.D - c0);
    for (int64_t k = 0; k < len; ++k) {
      const T dropped = ((w >> k) & 1) ? T(x[c0 + k] * scale) : T(0);
      s[c0 + k] = static_cast<double>(T(res[c0 + k] + dropped));
    }
  }
}

/// Mean (0 for RMSNorm) and 1 / sqrt(variance + eps) of a row.
inline void row_stats(const double* s, int64_t D, bool rms, double eps, double& mean, double& rstd) {
  double m = 0.0;
  if (!rms) {
    for (int64_t c = 0; c < D; ++c) m += s[c];
    m /= static_cast<double>(D);
  }
  double v = 0.0;
  for (int64_t c = 0; c < D; ++c) v += (s[c] - m) * (s[c] - m);
  mean = m;
  rstd = 1.0 / std::sqrt(v / static_cast<double>(D) + eps);
}

template <class T>
void add_norm(const AddNormProblem& a, int64_t r0, int64_t r1) {
  std::unique_ptr<double[]> s(new double[static_cast<size_t>(a.D > 0 ? a.D : 1)]);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t r = r0; r < r1; ++r) {
    add_dropped_row<T>(a, r, s.get());
    double mean, rstd;
    row_stats(s.get(), a.D, a.rms, a.eps, mean, rstd);
    T* y = static_cast<T*>(a.y) + r * a.D;
    for (int64_t c = 0; c < a.D; ++c) {
      double v = (s[c] - mean) * rstd;
      if (w) v *= static_cast<double>(w[c]);
      if (b) v += static_cast<double>(b[c]);
      y[c] = static_cast<T>(v);
    }
    if (a.sum) {
      T* out = static_cast<T*>(a.sum) + r * a.D;
      for (int64_t c = 0; c < a.D; ++c) out[c] = static_cast<T>(s[c]);
    }
  }
}

template <class T>
void add_norm_backward(const AddNormProblem& a, int64_t r0, int64_t r1, double* wsum, double* bsum) {
  std::unique_ptr<double[]> buf(new double[static_cast<size_t>(2 * (a.D > 0 ? a.D : 1))]);
  double* s = buf.get();
  double* g = s + a.D;
  const T* w = static_cast<const T*>(a.weight);
  const T scale = static_cast<T>(a.keep_scale);
  for (int64_t r = r0; r < r1; ++r) {
    add_dropped_row<T>(a, r, s);
    double mean, rstd;
    row_stats(s, a.D, a.rms, a.eps, mean, rstd);
    const T* dy = static_cast<const T*>(a.grad_out) + r * a.D;
    double mg = 0.0, mgx = 0.0;
    for (int64_t c = 0; c < a.D; ++c) {
      const double xhat = (s[c] - mean) * rstd;
      const double d = static_cast<double>(dy[c]);
      g[c] = w ? d * static_cast<double>(w[c]) : d;
      mg += g[c];
      mgx += g[c] * xhat;
      if (wsum) wsum[c] += d * xhat;
      if (bsum) bsum[c] += d;
    }
    mg = a.rms ? 0.0 : mg / static_cast<double>(a.D);
    mgx /= static_cast<double>(a.D);
    T* gr = static_cast<T*>(a.grad_residual) + r * a.D;
    T* gx = static_cast<T*>(a.grad_x) + r * a.D;
    for (int64_t c = 0; c < a.D; ++c) {
      const double xhat = (s[c] - mean) * rstd;
      g[c] = rstd * (g[c] - mg - xhat * mgx);  // dL/ds
      if (gr) gr[c] = static_cast<T>(g[c]);
    }
    if (!gx) continue;
    if (!a.mask.enabled) {
      for (int64_t c = 0; c < a.D; ++c) gx[c] = static_cast<T>(g[c]);
      continue;
    }
    BitStream bits(a.mask.offset + static_cast<uint64_t>(r * a.D), a.mask.key, a.mask.threshold);
    for (int64_t c0 = 0; c0 < a.D; c0 += 64) {
      const uint64_t word = bits.next(a.D - c0);
      const int64_t len = min64(64, a.D - c0);
      for (int64_t k = 0; k < len; ++k)
        gx[c0 + k] = ((word >> k) & 1) ? T(static_cast<T>(g[c0 + k]) * scale) : T(0);
    }
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

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

/// ln(x) for a positive normal float (Cephes' logf polynomial, about 1 ulp).
inline float log_poly(float x) {
  const uint32_t u = float_to_bits(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 127;
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float t = m - 1.0f;
  const float t2 = t * t;
  float p = 7.0376836292e-2f;
  p = p * t - 1.1514610310e-1f;
  p = p * t + 1.1676998740e-1f;
  p = p * t - 1.2420140846e-1f;
  p = p * t + 1.4249322787e-1f;
  p = p * t - 1.6668057665e-1f;
  p = p * t + 2.0000714765e-1f;
  p = p * t - 2.4999993993e-1f;
  p = p * t + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float r = t * t2 * p;
  r += fe * -2.12194440e-4f;
  r -= 0.5f * t2;
  return (t + r) + fe * 0.693359375f;
}

/// The two normal deviates (r cos theta, r sin theta) of words w1, w2 in float32.
inline void box_muller_f32(uint32_t w1, uint32_t w2, float& z_cos, float& z_sin) {
  // ln u1, u1 = (w1 + 0.5) 2**-32.  Below one half: ln((2 w1 + 1) 2**-33).  Above: ln(1 - t)
  // with t = (2 (2**32 - 1 - w1) + 1) 2**-33 exactly, as log1p: ln(v) - ((v - 1) + t) / v.
  const bool upper = w1 >= 0x80000000u;
  const float lo_arg = static_cast<float>(2.0 * static_cast<double>(w1) + 1.0) * 1.16415321826934814453125e-10f;  // 2**-33
  const float t = static_cast<float>(2.0 * static_cast<double>(0xffffffffu - w1) + 1.0) * 1.16415321826934814453125e-10f;
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
  float s = -1.9515295891e-4f;  // Cephes sinf / cosf on [-pi/4, pi/4]
  s = s * f2 + 8.3321608736e-3f;
  s = s * f2 - 1.6666654611e-1f;
  const float sin_f = f + f * f2 * s;
  float c = 2.443315711809948e-5f;
  c = c * f2 - 1.388731625493765e-3f;
  c = c * f2 + 4.166664568298827e-2f;
  const float cos_f = (1.0f - 0.5f * f2) + f2 * f2 * c;
  const float cos_t = q == 0 ? cos_f : (q == 1 ? -sin_f : (q == 2 ? -cos_f : sin_f));
  const float sin_t = q == 0 ? sin_f : (q == 1 ? cos_f : (q == 2 ? -sin_f : -cos_f));
  z_cos = r * cos_t;
  z_sin = r * sin_t;
}

constexpr int64_t kGaussChunk = 256;  // words (elements) per step

void gaussian_f32(const float* x, float* y, int64_t n, uint64_t j0, PhiloxKey key, float sigma) {
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
      const float g = 1.0f + sigma * z[skip + k];
      y[i + k] = x[i + k] * g;
    }
    i += take;
    start += static_cast<uint64_t>(words);
    skip = 0;
  }
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
