// What this core's instructions allow, measured apart from the kernels: the ceilings that
// decided what the avx512 backend does.  One thread, every operand in L1 or in
// registers, the cases timed in turn in a new order each round, medians.
//
// Build and run (AVX-512 CPUs; part 2 only where the CPU has AVX512_BF16, part 3 only on
// Linux where it has AMX-BF16):
//   g++ -O3 bench/experiments/core_rates.cpp -o /tmp/core_rates && /tmp/core_rates [rounds]
//
// 1. The sparse path's step against the dense micro-kernel's: the ceiling of what skipping
//    dropped inputs can gain, before any of the mask's bookkeeping.
//      dense form   : the 8 x 32 tile of the dense micro-kernel: per depth, two B vectors
//                     loaded and eight A values broadcast, 16 FMAs (10 loads).
//      sparse form  : the sparse path's 4 x 64 tile: per step, each of four rows multiplies
//                     its own kept value by the B row of its own depth, read at an offset
//                     loaded from a list (16 FMAs that each load a different B vector, and 8
//                     more loads).
//      shared B row : the same, but all four rows read one B row per step (what the loads
//                     would cost if the rows shared their depths: they do not).
//    On a core with two 512-bit FMA pipes the sparse form needs two vector loads a cycle
//    besides its scalar loads; where it runs at a fraction f of the dense form's rate, the
//    sparse path at p = 0.5 (11% of its steps padding: four rows in lockstep) takes at least
//    0.5 * 1.11 / f of the dense kernel's time.  Measured on an Intel Xeon, family 6 model
//    0xa7 (167), 2 vCPUs, 2026-12-01, medians of 15: f = 0.68-0.81 in four runs (sparse form
//    72-98 GFLOP/s, dense form 89-138), so at p = 0.5 the sparse path needs at least
//    0.69-0.82x the dense kernel's time in its steps alone; measured whole it ran at
//    0.83-0.95x the dense path's speed (bench/experiments/gemm_paths.py): the dense path is
//    chosen there.
//
// 2. vdpbf16ps against vfmadd231ps: the ceiling of a bfloat16 dot-product GEMM.  On a 512-bit
//    register vfmadd231ps does 16 multiply-adds and vdpbf16ps 32 (two bfloat16 products per
//    float32 lane), so a vdpbf16ps kernel gains only where the core issues vdpbf16ps at more
//    than half the FMA's rate; sixteen independent accumulators, so that latency does not
//    set the pace.  Measured on the same Xeon (AMX-BF16 present): vdpbf16ps 1.04-1.15 G
//    instructions/s (67-74 GFLOP/s), vfmadd231ps 4.2-4.3 G/s (133-138 GFLOP/s): half the
//    float32 rate.  A vdpbf16ps GEMM on the float32 path's blocking (pairs along the depth,
//    the even depth in the high half, which the instruction adds first: bit-identical to the
//    float32 path on normal numbers) ran at 88 GFLOP/s against 166 for float32 at
//    1024x4096x4096, 2 threads, and was not kept.  torch's bfloat16 F.linear reaches 450-530
//    GFLOP/s on the same 2 cores (oneDNN, on the AMX tiles): on this CPU a bfloat16 engine
//    needs AMX (TDPBF16PS).
//
// 3. AMX: TDPBF16PS on tiles loaded from L1 (four 16 x 16 float32 accumulator tiles, two A
//    and two B tiles of 16 x 32 bfloat16 loaded each step: a 32 x 32 block of C).  Measured on
//    the same Xeon: 510-573 GFLOP/s on one thread (four runs), about 4x the float32 FMA's
//    132-140.  Unlike vdpbf16ps, a tile's 32-term dot
//    products are not the sequential chain of roundings: over 51200 outputs of random
//    bfloat16 data, 86% equal the float32 FMA chain in depth order (either order within a
//    pair) and 86% equal the float64 sum rounded once, so an AMX path would be deterministic
//    (the same blocking for any thread count) but not bit-identical to the float32 path.
//
// 4. Philox4x32-10, the mask stream's generator, in the avx512 backend's own rounds
//    (philox_sets: 8 blocks in the 64-bit lanes of a vector, vpmuludq, shift, three-way xor),
//    with 1, 2, 4 and 6 independent sets of 8 blocks in flight.  A round is a chain (a 5-cycle
//    multiply, a shift, an xor), so the number of independent chains sets the pace until the
//    ports do.  Measured on the same Xeon (2026-12-02, four runs): two sets, the backend's form
//    until then, 0.62-0.72 ns a word; four sets 0.49-0.60; six 0.53-0.62: the backend now draws
//    128 keep bits (32 blocks, four sets) at a time where the caller wants them
//    (kernels_impl.hpp, BitStream).
#include <immintrin.h>
// The avx512 backend's own primitives (part 4 times its Philox rounds), compiled here for
// AVX-512 as kernels_avx512.cpp is.  (GCC 12's vpmuludq intrinsic passes an undefined vector
// through, which -Wall reports as uninitialized where AVX-512 comes from a target pragma.)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,bmi2,fma")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "../../cpp/isa_avx512.hpp"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

#define FD_AVX512 __attribute__((target("avx512f,fma")))
#define FD_AVX512_BF16 __attribute__((target("avx512f,avx512bf16")))

constexpr int kDepth = 64;                  // one 64-depth chunk of a B panel, 64 columns (16 KB)
alignas(64) float g_b[kDepth * 64];
alignas(64) float g_a[4][kDepth * 4];       // kept values of four rows
alignas(64) uint16_t g_off[4][kDepth * 4];  // their B rows' offsets (floats)

FD_AVX512 float hsum(const __m512* v, int n) {
  __m512 s = v[0];
  for (int i = 1; i < n; ++i) s = _mm512_add_ps(s, v[i]);
  alignas(64) float f[16];
  _mm512_store_ps(f, s);
  float t = 0.0f;
  for (float x : f) t += x;
  return t;
}

FD_AVX512 __attribute__((noinline)) float sparse_form(long passes, bool shared) {
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
  return hsum(&acc[0][0], 16);
}

FD_AVX512 __attribute__((noinline)) float dense_form(long passes) {
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
  return hsum(&c[0][0], 16);
}

/// n rounds of 16 independent vdpbf16ps (bf16) or vfmadd231ps on registers.
FD_AVX512_BF16 __attribute__((noinline)) float dot_bf16(long n) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_setzero_si512();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, y);
  }
  return hsum(acc, 16);
}

FD_AVX512 __attribute__((noinline)) float fma_f32(long n) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512 x = _mm512_set1_ps(1.0f), y = _mm512_setzero_ps();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (auto& a : acc) a = _mm512_fmadd_ps(x, y, a);
  }
  return hsum(acc, 16);
}

#if defined(__linux__)
/// Asks Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
bool amx_permitted() { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

struct alignas(64) TileConfig {  // palette 1: colsb and rows per tile
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
alignas(64) uint16_t g_ta[2][16 * 32], g_tb[2][16 * 32];
alignas(64) float g_tc[4][16 * 16];

/// n steps of: load two A and two B tiles, four TDPBF16PS into a 32 x 32 block of C.
__attribute__((target("amx-tile,amx-bf16"), noinline)) float amx_steps(long n) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (long i = 0; i < n; ++i) {
    _tile_loadd(4, g_ta[0], 64);
    _tile_loadd(5, g_ta[1], 64);
    _tile_loadd(6, g_tb[0], 64);
    _tile_loadd(7, g_tb[1], 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, g_tc[0], 64);
  _tile_stored(1, g_tc[1], 64);
  _tile_stored(2, g_tc[2], 64);
  _tile_stored(3, g_tc[3], 64);
  _tile_release();
  return g_tc[0][0] + g_tc[3][255];
}
#endif

/// `words` Philox words (a multiple of 32 * S) drawn by the avx512 backend's own rounds
/// (philox_sets), S sets of 8 blocks in flight; returns a fold of the words.
template <int S>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,bmi2,fma"), noinline)) float philox_chains(long words) {
  namespace be = fastdropout::avx512;
  const fastdropout::PhiloxKey key{1, 2};
  __m512i fold = _mm512_setzero_si512();
  for (long block = 0; block < words / 4; block += 8 * S) {
    __m512i s[S][4];
    for (int h = 0; 2 * h + 1 < S; ++h) be::philox_start(s, h, static_cast<uint64_t>(block + 16 * h));
    if (S % 2) {  // the odd set: 8 more blocks
      s[S - 1][0] = _mm512_add_epi64(_mm512_set1_epi64(block + 8 * (S - 1)), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
      s[S - 1][1] = s[S - 1][2] = s[S - 1][3] = _mm512_setzero_si512();
    }
    be::philox_sets(s, key, 10);
    for (int q = 0; q < S; ++q)
      fold = _mm512_ternarylogic_epi64(fold, _mm512_xor_si512(s[q][0], s[q][1]), _mm512_xor_si512(s[q][2], s[q][3]),
                                       0x96);
  }
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, fold);
  return static_cast<float>(lanes[0] & 1);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Times each case (returns GFLOP/s of one run) `rounds` times, in a new order each round;
/// the medians.
template <class Case>
std::vector<double> interleaved(int rounds, const std::vector<Case>& cases, float& sink) {
  std::vector<std::vector<double>> rate(cases.size());
  for (int round = 0; round < rounds; ++round)
    for (size_t k = 0; k < cases.size(); ++k) {
      const size_t c = (k + static_cast<size_t>(round)) % cases.size();
      const auto t0 = std::chrono::steady_clock::now();
      const double flops = cases[c](sink);
      rate[c].push_back(flops / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9);
    }
  std::vector<double> out;
  for (auto& r : rate) out.push_back(median(r));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) {
    std::fprintf(stderr, "core_rates: this CPU has no AVX-512F\n");
    return 2;
  }
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  if (rounds < 1) {
    std::fprintf(stderr, "usage: core_rates [rounds >= 1]\n");
    return 2;
  }
  std::srand(1);
  for (float& v : g_b) v = 1e-3f;
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < kDepth * 4; ++i) {
      g_a[r][i] = 1e-3f;
      g_off[r][i] = static_cast<uint16_t>((std::rand() % kDepth) * 64);
    }
  float sink = 0.0f;
  using Case = double (*)(float&);
  const long passes = 100000;
  static const double step_flops = 2.0 * 16 * 16 * kDepth * passes;  // 16 FMAs of 16 lanes per step
  const std::vector<Case> steps = {
      [](float& s) { s += dense_form(passes); return step_flops; },
      [](float& s) { s += sparse_form(passes, false); return step_flops; },
      [](float& s) { s += sparse_form(passes, true); return step_flops; },
  };
  const std::vector<double> g = interleaved(rounds, steps, sink);
  std::printf("1. one thread, L1-resident operands, medians of %d (GFLOP/s): dense form %.1f, sparse form %.1f "
              "(%.2fx the dense form), shared B row %.1f (%.2fx)\n",
              rounds, g[0], g[1], g[1] / g[0], g[2], g[2] / g[0]);
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("2. this CPU has no AVX512_BF16\n");
  } else {
    const long n = 10000000;
    static const double dot_flops = 64.0 * 16 * n, fma_flops = 32.0 * 16 * n;  // per instruction: 64 and 32
    const std::vector<Case> dots = {
        [](float& s) { s += dot_bf16(n); return dot_flops; },
        [](float& s) { s += fma_f32(n); return fma_flops; },
    };
    const std::vector<double> d = interleaved(rounds, dots, sink);
    std::printf("2. one thread, medians of %d: vdpbf16ps %.2f G instructions/s (%.0f GFLOP/s), vfmadd231ps %.2f G/s "
                "(%.0f GFLOP/s): bfloat16 at %.2fx the float32 FLOP rate\n",
                rounds, d[0] / 64, d[0], d[1] / 32, d[1], d[0] / d[1]);
  }
#if defined(__linux__)
  if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) {
    std::printf("3. this CPU has no AMX-BF16\n");
  } else if (!amx_permitted()) {
    std::printf("3. Linux refused the AMX tile state (arch_prctl)\n");
  } else {
    for (int i = 0; i < 16 * 32; ++i) {
      g_ta[0][i] = g_ta[1][i] = 0x3f80;  // bfloat16 1.0
      g_tb[0][i] = g_tb[1][i] = 0;
    }
    const long n = 500000;
    static const double tile_flops = 4.0 * 16 * 16 * 32 * 2 * n;  // four 16 x 16 x 32 products a step
    const std::vector<Case> tiles = {[](float& s) { s += amx_steps(n); return tile_flops; }};
    std::printf("3. one thread, medians of %d: TDPBF16PS %.0f GFLOP/s\n", rounds, interleaved(rounds, tiles, sink)[0]);
  }
#endif
  {
    static const long words = 32L * 3 * 4 * 100000;  // a multiple of 32 * S for each S
    const std::vector<Case> chains = {
        [](float& s) { s += philox_chains<1>(words); return static_cast<double>(words); },
        [](float& s) { s += philox_chains<2>(words); return static_cast<double>(words); },
        [](float& s) { s += philox_chains<4>(words); return static_cast<double>(words); },
        [](float& s) { s += philox_chains<6>(words); return static_cast<double>(words); },
    };
    const std::vector<double> c = interleaved(rounds, chains, sink);  // G words/s
    std::printf("4. one thread, medians of %d: Philox4x32-10 with 1, 2, 4, 6 sets of 8 blocks in flight: "
                "%.3f, %.3f, %.3f, %.3f ns a word\n", rounds, 1 / c[0], 1 / c[1], 1 / c[2], 1 / c[3]);
  }
  return sink == 12345.0f ? 1 : 0;  // (keeps the sums alive)
}
