// The bfloat16 dot-product instruction against the float32 FMA on this core: the ceiling
// of a vdpbf16ps GEMM (issue "a bfloat16 engine") before any packing.
//
// Each instruction on a 512-bit register: vfmadd231ps does 16 multiply-adds, vdpbf16ps 32
// (two bfloat16 products per float32 lane), so a vdpbf16ps kernel gains over the float32
// one only where the core issues vdpbf16ps at more than half the FMA's rate.  Sixteen
// independent accumulators, so that latency does not set the pace; rounds interleaved,
// medians.
//
// Measured (2026-12-01), one thread:
//   Intel Xeon, family 6 model 0xa7 (Sapphire Rapids class, AMX-BF16 present), KVM guest:
//   vdpbf16ps 1.08-1.15 G instructions/s (69-74 GFLOP/s), vfmadd231ps 4.2-4.3 G/s (134-138
//   GFLOP/s): the bfloat16 instruction gives half the float32 rate here.  A vdpbf16ps GEMM
//   built on the float32 path's blocking (pairs along the depth, the even depth in the high
//   half, which the instruction adds first: bit-identical to the float32 path on normal
//   numbers) ran at 88 GFLOP/s against 166 for float32 at 1024x4096x4096, 2 threads, and was
//   not kept.  torch's bfloat16 F.linear reaches 450-530 GFLOP/s on the same 2 cores (oneDNN,
//   through the AMX tiles), so on this CPU a bfloat16 engine needs AMX (TDPBF16PS).
//
// Build and run (CPUs with AVX512_BF16):
//   g++ -O2 bench/experiments/bf16_dot_rate.cpp -o /tmp/bf16_dot_rate && /tmp/bf16_dot_rate [rounds]
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

__attribute__((target("avx512f"))) float hsum(__m512 v) {
  alignas(64) float f[16];
  _mm512_store_ps(f, v);
  float s = 0.0f;
  for (float x : f) s += x;
  return s;
}

__attribute__((target("avx512f,avx512bf16"), noinline)) float dot_bf16(long n) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_setzero_si512();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, y);
  }
  __m512 s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, acc[i]);
  return hsum(s);
}

__attribute__((target("avx512f,fma"), noinline)) float fma_f32(long n) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512 x = _mm512_set1_ps(1.0f), y = _mm512_setzero_ps();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (auto& a : acc) a = _mm512_fmadd_ps(x, y, a);
  }
  __m512 s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, acc[i]);
  return hsum(s);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::fprintf(stderr, "bf16_dot_rate: this CPU has no AVX512_BF16\n");
    return 2;
  }
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 9;
  if (rounds < 1) {
    std::fprintf(stderr, "usage: bf16_dot_rate [rounds >= 1]\n");
    return 2;
  }
  const long n = 10000000;
  std::vector<double> bf, fm;
  float sink = 0.0f;
  for (int r = 0; r < rounds; ++r)
    for (int k = 0; k < 2; ++k) {
      const bool bf16 = (k + r) % 2 == 0;  // a new order each round
      const auto t0 = std::chrono::steady_clock::now();
      sink += bf16 ? dot_bf16(n) : fma_f32(n);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      (bf16 ? bf : fm).push_back(16.0 * n / s / 1e9);
    }
  const double b = median(bf), f = median(fm);
  std::printf("one thread, medians of %d: vdpbf16ps %.2f G instructions/s (%.0f GFLOP/s), vfmadd231ps %.2f G/s "
              "(%.0f GFLOP/s): bfloat16 at %.2fx the float32 FLOP rate\n",
              rounds, b, 64 * b, f, 32 * f, (64 * b) / (32 * f));
  return sink == 12345.0f ? 1 : 0;  // (keeps the sums alive)
}
