// Native self-test, no Python: on every backend this CPU runs, Random123's Philox known
// answers, the mask and dropout bit for bit against the scalar definition (philox.hpp), the
// family's alpha dropout bit for bit against the scalar backend, and the dense layer,
// Gaussian dropout and attention against plain double-precision loops.  It is what runs
// under emulation for a cross-compiled backend (AArch64 NEON under qemu).
//
// usage: fastdropout_selftest [KAT_FILE]   (default tests/data/philox4x32_kat.txt; exit 1 on failure)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dispatch.hpp"
#include "ops.hpp"
#include "philox.hpp"

using namespace fastdropout;

namespace {

int g_failures = 0, g_checks = 0;

void check(bool ok, const std::string& backend, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL [%s] %s\n", backend.c_str(), what.c_str());
  }
}

uint32_t reference_word(uint64_t j, PhiloxKey key) {
  uint32_t w[4];
  philox_block_words((j >> 2) & kBlockMask, key, w);
  return w[j & 3];
}

std::vector<float> normals(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

void test_kat(const std::string& b, const std::string& path) {
  std::ifstream in(path);
  check(static_cast<bool>(in), b, "known-answer file " + path + " readable");
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string name;
    int rounds;
    if (!(ss >> name) || name[0] == '#' || !(ss >> rounds)) continue;
    uint32_t v[10];
    for (auto& w : v) ss >> std::hex >> w;
    uint32_t out[4];
    ops::philox(v, out, 1, PhiloxKey{v[4], v[5]}, rounds);
    check(std::memcmp(out, v + 6, sizeof out) == 0, b, "Philox4x32-" + std::to_string(rounds) + " known answer");
    ++n;
  }
  check(n > 0, b, "known answers found");
}

void test_masks(const std::string& b) {
  const uint64_t seed = 0x243F6A8885A308D3ull;
  const PhiloxKey key = key_from_seed(seed);
  for (uint64_t offset : {uint64_t{0}, uint64_t{3}, uint64_t{1} << 40, ~uint64_t{0} - 5}) {
    const int64_t n = 1000 + static_cast<int64_t>(offset % 7);
    const uint64_t t = 1288490189;  // p = 0.3
    std::vector<uint8_t> keep(static_cast<size_t>(n));
    ops::mask_bool(keep.data(), n, seed, offset, t);
    std::vector<float> x = normals(static_cast<size_t>(n), 1), y(x.size());
    ops::dropout(x.data(), y.data(), n, seed, offset, t, 1.0f / 0.7f);
    bool ok = true, ok_y = true;
    for (int64_t i = 0; i < n; ++i) {
      const bool want = reference_word(offset + static_cast<uint64_t>(i), key) >= t;
      ok = ok && (keep[static_cast<size_t>(i)] != 0) == want;
      const float e = want ? x[static_cast<size_t>(i)] * (1.0f / 0.7f) : 0.0f;
      ok_y = ok_y && std::memcmp(&e, &y[static_cast<size_t>(i)], sizeof e) == 0;
    }
    check(ok, b, "mask bit for bit at offset " + std::to_string(offset));
    check(ok_y, b, "dropout bit for bit at offset " + std::to_string(offset));
  }
}

bool close(double a, double e, double tol) { return std::fabs(a - e) <= tol; }

void test_dense(const std::string& b) {
  const int64_t M = 37, K = 300, N = 41;
  std::vector<float> x = normals(M * K, 2), w = normals(N * K, 3), bias = normals(N, 4), y(M * N);
  const uint64_t seed = 5, t = 2147483648ull;  // p = 0.5
  ops::DenseForward a;
  a.x = x.data();
  a.w = w.data();
  a.bias = bias.data();
  a.y = y.data();
  a.M = M;
  a.N = N;
  a.K = K;
  a.mask = ops::make_mask(true, seed, 0, t, 2.0f);
  ops::dense_forward(a);
  const PhiloxKey key = key_from_seed(seed);
  bool ok = true;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = bias[static_cast<size_t>(j)], mag = std::fabs(s);
      for (int64_t k = 0; k < K; ++k) {
        const bool keep = reference_word(static_cast<uint64_t>(i * K + k), key) >= t;
        const double xv = keep ? 2.0 * x[static_cast<size_t>(i * K + k)] : 0.0;
        s += xv * w[static_cast<size_t>(j * K + k)];
        mag += std::fabs(xv * w[static_cast<size_t>(j * K + k)]);
      }
      ok = ok && close(y[static_cast<size_t>(i * N + j)], s, 4.0 * K * std::ldexp(1.0, -24) * mag);
    }
  check(ok, b, "fused dropout -> dense within float32 GEMM error");
}

/// bfloat16 operands: the dot-product kernel (where this backend and CPU have it) gives the
/// float32 kernels' bits, forward and both gradients.
void test_bf16_dot(const std::string& b) {
  const int64_t M = 70, K = 301, N = 45;
  auto bf16 = [](const std::vector<float>& v) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      uint32_t u;
      std::memcpy(&u, &v[i], sizeof u);
      h[i] = static_cast<uint16_t>(u >> 16);
    }
    return h;
  };
  const std::vector<uint16_t> x = bf16(normals(M * K, 6)), w = bf16(normals(N * K, 7)), dy = bf16(normals(M * N, 8));
  std::vector<float> y[2], gx[2], gw[2];
  const uint64_t before = bf16_dot_blocks.load();
  for (int run = 0; run < 2; ++run) {
    set_bf16_gemm(run == 0 ? "float32" : "dot");
    y[run].assign(static_cast<size_t>(M * N), 0.0f);
    gx[run].assign(static_cast<size_t>(M * K), 0.0f);
    gw[run].assign(static_cast<size_t>(N * K), 0.0f);
    ops::DenseForward a;
    a.xh = x.data();
    a.wh = w.data();
    a.y = y[run].data();
    a.M = M, a.N = N, a.K = K;
    a.mask = ops::make_mask(true, 3, 0, 1288490189ull, 1.0f / 0.7f);  // p = 0.3
    ops::dense_forward(a);
    ops::DenseBackward d;
    d.dyh = dy.data();
    d.xh = x.data();
    d.wh = w.data();
    d.grad_x = gx[run].data();
    d.grad_w = gw[run].data();
    d.M = M, d.N = N, d.K = K;
    d.mask = a.mask;
    ops::dense_backward(d);
  }
  set_bf16_gemm("auto");
  auto same = [](const std::vector<float>& u, const std::vector<float>& v) {
    return std::memcmp(u.data(), v.data(), u.size() * sizeof(float)) == 0;
  };
  check(same(y[0], y[1]) && same(gx[0], gx[1]) && same(gw[0], gw[1]), b,
        "bfloat16 dot-product kernel gives the float32 kernels' bits");
  set_bf16_gemm("dot");
  const bool runs = bf16_gemm().dot;
  set_bf16_gemm("auto");
  check((bf16_dot_blocks.load() > before) == runs, b, "bfloat16 dot-product kernel ran where it can");
}

void test_family(const std::string& b, const std::vector<float>& alpha_scalar, bool is_scalar,
                 std::vector<float>& alpha_out) {
  const int64_t n = 1000;
  std::vector<float> x = normals(n, 6), y(static_cast<size_t>(n));
  ElemOp op;
  op.a = 0.8;
  op.b_keep = 0.3;
  op.b_drop = -1.2;
  op.affine = true;
  ops::family(x.data(), y.data(), n, 9, 1, 1288490189, op);
  if (is_scalar)
    alpha_out = y;
  else
    check(std::memcmp(y.data(), alpha_scalar.data(), y.size() * sizeof(float)) == 0, b,
          "alpha dropout bit for bit against the scalar backend");
  // Gaussian dropout: within the contract's bound of the double computation from the same words
  const PhiloxKey key = key_from_seed(9);
  const double sigma = 1.0;
  ops::gaussian(x.data(), y.data(), n, 9, 3, static_cast<float>(sigma));
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t j = 3 + static_cast<uint64_t>(i), m = j >> 1;
    const double u1 = (reference_word(2 * m, key) + 0.5) * std::ldexp(1.0, -32);
    const double u2 = (reference_word(2 * m + 1, key) + 0.5) * std::ldexp(1.0, -32);
    const double r = std::sqrt(-2.0 * std::log(u1)), th = 6.283185307179586 * u2;
    const double z = (j & 1) ? r * std::sin(th) : r * std::cos(th);
    const double xv = x[static_cast<size_t>(i)];
    ok = ok && close(y[static_cast<size_t>(i)], xv * (1.0 + sigma * z),
                     8.0 * std::ldexp(1.0, -23) * std::fabs(xv) * (1.0 + sigma * std::fabs(z)));
  }
  check(ok, b, "Gaussian dropout within 8 eps |x| (1 + sigma |z|)");
}

void test_attention(const std::string& b) {
  const int64_t Lq = 70, Lk = 131, E = 16, Ev = 24;
  std::vector<float> q = normals(Lq * E, 7), k = normals(Lk * E, 8), v = normals(Lk * Ev, 9);
  std::vector<float> out(static_cast<size_t>(Lq * Ev)), lse(static_cast<size_t>(Lq));
  const int64_t zero = 0;
  AttentionProblem a;
  a.batch = 1;
  a.Lq = Lq;
  a.Lk = Lk;
  a.E = E;
  a.Ev = Ev;
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.q_off = a.k_off = a.v_off = &zero;
  a.causal = true;
  a.scale = 0.25f;
  const uint64_t t = 429496730;  // p = 0.1
  a.mask = ops::make_mask(true, 11, 2, t, 1.0f / 0.9f);
  a.out = out.data();
  a.lse = lse.data();
  ops::attention_forward(a);
  const PhiloxKey key = key_from_seed(11);
  bool ok = true;
  for (int64_t i = 0; i < Lq; ++i) {
    std::vector<double> s(static_cast<size_t>(Lk));
    double mx = -INFINITY;
    for (int64_t j = 0; j <= i && j < Lk; ++j) {
      double d = 0;
      for (int64_t e = 0; e < E; ++e) d += double(q[static_cast<size_t>(i * E + e)]) * k[static_cast<size_t>(j * E + e)];
      s[static_cast<size_t>(j)] = d * 0.25;
      mx = std::max(mx, s[static_cast<size_t>(j)]);
    }
    double l = 0;
    for (int64_t j = 0; j <= i && j < Lk; ++j) l += std::exp(s[static_cast<size_t>(j)] - mx);
    for (int64_t c = 0; c < Ev; ++c) {
      double o = 0, mag = 0;
      for (int64_t j = 0; j <= i && j < Lk; ++j) {
        const bool keep = reference_word(2 + static_cast<uint64_t>(i * Lk + j), key) >= t;
        const double p = keep ? std::exp(s[static_cast<size_t>(j)] - mx) / l / 0.9 : 0.0;
        o += p * v[static_cast<size_t>(j * Ev + c)];
        mag += std::fabs(p * v[static_cast<size_t>(j * Ev + c)]);
      }
      ok = ok && close(out[static_cast<size_t>(i * Ev + c)], o, 4.0 * (E + Lk) * std::ldexp(1.0, -24) * (mag + 1.0));
    }
  }
  check(ok, b, "attention with dropout against the plain loops");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string kat = argc > 1 ? argv[1] : "tests/data/philox4x32_kat.txt";
  std::vector<float> alpha_scalar;
  for (const std::string& b : available_backends()) {
    set_backend(b);
    for (int threads : {1, 3}) {
      set_num_threads(threads);
      const std::string tag = b + ", " + std::to_string(threads) + " thread" + (threads > 1 ? "s" : "");
      test_kat(tag, kat);
      test_masks(tag);
      test_dense(tag);
      test_bf16_dot(tag);
      std::vector<float> got;
      test_family(tag, alpha_scalar, b == "scalar" && threads == 1, got);
      if (b == "scalar" && threads == 1) alpha_scalar = got;
      test_attention(tag);
    }
  }
  std::string names;
  for (const std::string& b : available_backends()) names += (names.empty() ? "" : ", ") + b;
  std::printf("fastdropout_selftest: %d checks on backends %s: %s\n", g_checks, names.c_str(),
              g_failures ? "FAILED" : "all passed");
  return g_failures ? 1 : 0;
}
