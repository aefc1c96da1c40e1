// An experiment, not part of the package: can an output-masked GEMM compute
// grad_x = mask * (dz @ weight) faster than the dense kernel, by computing only the
// kept elements?  (The README's "Measured" section quotes its figure.)
//
// One core, one (n-block, k-block) tile in L1: out[i, k] (+)= keep(i, k) *
// sum_n dz[i, n] * wt[k, n] for rows i, columns k < KB, n < NB.  dz[i, 0:NB] sits in
// 16 registers; each kept column is a 16-FMA dot product with its packed weight row,
// four columns at a time (two accumulators each), reduced across lanes; the kept sums
// of a row are expanded into its 16 columns with the keep mask.  Useful GFLOP/s
// counts kept elements only.  It is timed next to the same code computing every
// element; at p = 0.5 a dense computation's useful rate is half its GFLOP/s (the
// package's dense kernel: about 50 per core on this machine, bench/results/bench.txt).
//
// Build and run (AVX-512), from the repository root:
//   g++ -O3 -mavx512f -mavx512dq -mavx512bw -mavx512vl -mbmi -mbmi2 -mfma bench/experiments/output_masked_grad_x.cpp -o /tmp/omg
//   /tmp/omg
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr int kNB = 256, kKB = 16, kNV = kNB / 16;

/// Lane sums of a0 .. a3 in lanes 0 .. 3.
inline __m128 sums4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 y = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23))));
  const __m512 z = _mm512_add_ps(y, _mm512_shuffle_f32x4(y, y, 0x4E));
  return _mm512_castps512_ps128(_mm512_add_ps(z, _mm512_shuffle_f32x4(z, z, 0xB1)));
}

void tile(int rows, const float* dz, const float* wt, const uint16_t* keep, float* out) {
  for (int i = 0; i < rows; ++i) {
    __m512 d[kNV];
    for (int c = 0; c < kNV; ++c) d[c] = _mm512_loadu_ps(dz + i * kNB + 16 * c);
    alignas(64) float kept[16 + 4];
    uint32_t m = keep[i];
    int count = 0;
    while (m != 0) {
      int k[4], g = 0;
      for (; g < 4 && m != 0; ++g) {
        k[g] = static_cast<int>(_tzcnt_u32(m));
        m = _blsr_u32(m);
      }
      for (int q = g; q < 4; ++q) k[q] = k[0];  // padding: a valid row, result unused
      const float *w0 = wt + k[0] * kNB, *w1 = wt + k[1] * kNB, *w2 = wt + k[2] * kNB, *w3 = wt + k[3] * kNB;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int c = 0; c < kNV; c += 2) {
        a0 = _mm512_fmadd_ps(d[c], _mm512_loadu_ps(w0 + 16 * c), a0);
        a1 = _mm512_fmadd_ps(d[c], _mm512_loadu_ps(w1 + 16 * c), a1);
        a2 = _mm512_fmadd_ps(d[c], _mm512_loadu_ps(w2 + 16 * c), a2);
        a3 = _mm512_fmadd_ps(d[c], _mm512_loadu_ps(w3 + 16 * c), a3);
        b0 = _mm512_fmadd_ps(d[c + 1], _mm512_loadu_ps(w0 + 16 * c + 16), b0);
        b1 = _mm512_fmadd_ps(d[c + 1], _mm512_loadu_ps(w1 + 16 * c + 16), b1);
        b2 = _mm512_fmadd_ps(d[c + 1], _mm512_loadu_ps(w2 + 16 * c + 16), b2);
        b3 = _mm512_fmadd_ps(d[c + 1], _mm512_loadu_ps(w3 + 16 * c + 16), b3);
      }
      _mm_storeu_ps(kept + count, sums4(_mm512_add_ps(a0, b0), _mm512_add_ps(a1, b1),
                                         _mm512_add_ps(a2, b2), _mm512_add_ps(a3, b3)));
      count += g;
    }
    const __m512 sums = _mm512_maskz_expand_ps(keep[i], _mm512_loadu_ps(kept));
    _mm512_storeu_ps(out + i * kKB, _mm512_add_ps(_mm512_loadu_ps(out + i * kKB), sums));
  }
}

}  // namespace

int main() {
  const int rows = 256, reps = 20, passes = 64;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> dz(rows * kNB), wt(kKB * kNB), out(rows * kKB, 0.0f);
  for (float& v : dz) v = u(rng);
  for (float& v : wt) v = u(rng);
  std::vector<uint16_t> keep(rows);
  int64_t kept = 0;
  for (int i = 0; i < rows; ++i) {
    keep[i] = static_cast<uint16_t>(rng());  // p = 0.5
    kept += __builtin_popcount(keep[i]);
  }
  // correctness: one pass against a float64 reference
  tile(rows, dz.data(), wt.data(), keep.data(), out.data());
  double err = 0.0, scale = 0.0;
  for (int i = 0; i < rows; ++i)
    for (int k = 0; k < kKB; ++k) {
      double want = 0.0;
      if (keep[i] >> k & 1)
        for (int n = 0; n < kNB; ++n) want += static_cast<double>(dz[i * kNB + n]) * wt[k * kNB + n];
      err = std::max(err, std::fabs(out[i * kKB + k] - want));
      scale = std::max(scale, std::fabs(want));
    }
  std::printf("max|out - ref| / max|ref| = %.2e\n", err / scale);
  if (err / scale > 1e-5) return 1;
  auto time = [&](const std::vector<uint16_t>& mask) {
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int p = 0; p < passes; ++p) tile(rows, dz.data(), wt.data(), mask.data(), out.data());
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  const double masked = time(keep), all = time(std::vector<uint16_t>(rows, 0xFFFF));
  const double useful = 2.0 * kept * kNB * passes / masked * 1e-9;
  const double dense = 2.0 * rows * kKB * kNB * passes / all * 1e-9;
  std::printf("p = 0.5, kept only: %.1f useful GFLOP/s on one core (%ld kept of %d, best of %d)\n",
              useful, static_cast<long>(kept), rows * kKB, reps);
  std::printf("every element:      %.1f GFLOP/s, i.e. %.1f useful at p = 0.5; kept-only / every = %.2fx\n",
              dense, dense / 2, useful / (dense / 2));
  return 0;
}
