// How fast the sparse path's inner step can run on this core, against the dense
// micro-kernel's, with every operand in L1: the ceiling of what skipping dropped inputs
// can gain on a CPU, before any of the mask's bookkeeping.
//
//   dense form   : the 8 x 32 tile of the dense micro-kernel: per depth, two B vectors
//                  loaded and eight A values broadcast, 16 FMAs (10 loads).
//   sparse form  : the sparse path's 4 x 64 tile: per step, each of four rows multiplies its
//                  own kept value by the B row of its own depth, read at an offset loaded
//                  from a list (16 FMAs that each load a different B vector, 8 more loads).
//   shared B row : the same, but all four rows read one B row per step (what the loads
//                  would cost if the rows shared their depths: they do not).
//
// On a core with two 512-bit FMA pipes the sparse form needs two vector loads a cycle
// besides its scalar loads; where it runs at a fraction f of the dense form's rate, the
// sparse path at p = 0.5 (11% of its steps padding, the lockstep of four rows) takes at
// least 0.5 * 1.11 / f of the dense kernel's time.  Measured (2 vCPUs, medians of 15):
// Intel Xeon family 6 model 0xa7 (167), 2026-12-01: f = 0.68-0.81 in four runs (sparse form
// 72-98 GFLOP/s, dense form 89-138), so at p = 0.5 the sparse path needs at least 0.69-0.82x
// the dense kernel's time in its steps alone; measured whole, it ran at 0.83-0.95x the dense
// path's speed (bench/experiments/gemm_paths.py), and the dense path is chosen there.
//
// Build and run (AVX-512 CPUs; rounds interleaved, medians):
//   g++ -O3 -mavx512f -mfma bench/experiments/sparse_fma_rate.cpp -o /tmp/sparse_fma_rate
//   /tmp/sparse_fma_rate [rounds]
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

constexpr int kDepth = 64;                // one 64-depth chunk of a B panel, 64 columns (16 KB)
alignas(64) float g_b[kDepth * 64];
alignas(64) float g_a[4][kDepth * 4];     // kept values of four rows
alignas(64) uint16_t g_off[4][kDepth * 4];  // their B rows' offsets (floats)

float hsum(__m512 v) {  // (GCC 12 warns falsely inside _mm512_reduce_add_ps)
  alignas(64) float f[16];
  _mm512_store_ps(f, v);
  float s = 0.0f;
  for (float x : f) s += x;
  return s;
}

__attribute__((noinline)) float sparse_form(long passes, bool shared) {
  __m512 acc[4][4];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (long it = 0; it < passes; ++it)
    for (int n = 0; n < kDepth; ++n)
      for (int r = 0; r < 4; ++r) {
        const __m512 u = _mm512_set1_ps(g_a[r][n]);
        const float* p = g_b + (shared ? g_off[0][n] : g_off[r][n]);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(u, _mm512_load_ps(p + 16 * j), acc[r][j]);
      }
  __m512 s = _mm512_setzero_ps();
  for (auto& row : acc)
    for (auto& v : row) s = _mm512_add_ps(s, v);
  return hsum(s);
}

__attribute__((noinline)) float dense_form(long passes) {
  __m512 c[8][2];
  for (auto& row : c)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (long it = 0; it < passes; ++it)
    for (int n = 0; n < kDepth; ++n) {  // 16 FMAs per depth, as one sparse step
      const float* bp = g_b + n * 32;
      const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
      for (int r = 0; r < 8; ++r) {
        const __m512 a = _mm512_set1_ps(g_a[r & 3][n + 64 * (r >> 2)]);
        c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
        c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
      }
    }
  __m512 s = _mm512_setzero_ps();
  for (auto& row : c)
    for (auto& v : row) s = _mm512_add_ps(s, v);
  return hsum(s);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f")) {
    std::fprintf(stderr, "sparse_fma_rate: this CPU has no AVX-512F\n");
    return 2;
  }
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  if (rounds < 1) {
    std::fprintf(stderr, "usage: sparse_fma_rate [rounds >= 1]\n");
    return 2;
  }
  std::srand(1);
  for (float& v : g_b) v = 1e-3f;
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < kDepth * 4; ++i) {
      g_a[r][i] = 1e-3f;
      g_off[r][i] = static_cast<uint16_t>((std::rand() % kDepth) * 64);
    }
  const long passes = 100000;
  const double flops = 2.0 * 16 * 16 * kDepth * passes;  // 16 FMAs of 16 lanes per step
  std::vector<double> rate[3];
  float sink = 0.0f;
  for (int round = 0; round < rounds; ++round)
    for (int k = 0; k < 3; ++k) {
      const int form = (k + round) % 3;  // a new order each round
      const auto t0 = std::chrono::steady_clock::now();
      sink += form == 0 ? dense_form(passes) : sparse_form(passes, form == 2);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      rate[form].push_back(flops / s / 1e9);
    }
  const double d = median(rate[0]), sp = median(rate[1]), sh = median(rate[2]);
  std::printf("one thread, L1-resident operands, medians of %d (GFLOP/s): dense form %.1f, sparse form %.1f "
              "(%.2fx the dense form), shared B row %.1f (%.2fx)\n",
              rounds, d, sp, sp / d, sh, sh / d);
  return sink == 12345.0f ? 1 : 0;  // (keeps the sums alive)
}
