// fastdropout_bench: times the native kernels directly, without Python.
//
//   cmake -S . -B build/bench -DCMAKE_BUILD_TYPE=Release -DFASTDROPOUT_BUILD_BENCH=ON \
//         -DFASTDROPOUT_BUILD_PYTHON=OFF
//   cmake --build build/bench -j 2
//   build/bench/fastdropout_bench [--quick] [--json PATH] [--repeats R]
//                                 [--threads N] [--backend NAME]
//
// For every backend this CPU supports and every thread count 1..N it measures
// Philox word generation, packed and bool masks, dropout forward and backward
// (float32), and the fused dropout->dense forward and backward.  Each figure is
// the median of R timed repeats (each repeat loops until it lasts >= 5 ms), with
// the min and max beside it.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.hpp"
#include "ops.hpp"

namespace fd = fastdropout;

namespace {

struct Options {
  bool quick = false;
  int repeats = 0;  // 0: the default (7, or 3 with --quick)
  int max_threads = 0;  // 0: all
  std::string backend;  // empty: every available one
  std::string json;
};

struct Row {
  std::string backend, kernel, size;
  int threads;
  double median_s, min_s, max_s;
  double work;       // elements or flops per call
  double bytes;      // memory traffic per call (0 for dense)
  std::string unit;  // "Gelem/s" or "GFLOP/s"
};

double now() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

void measure(const std::function<void()>& fn, int repeats, double& med, double& lo, double& hi) {
  fn();  // warm up
  double t0 = now();
  fn();
  const double once = std::max(now() - t0, 1e-9);
  const int inner = static_cast<int>(std::clamp(0.005 / once, 1.0, 10000.0));
  std::vector<double> samples;
  for (int r = 0; r < repeats; ++r) {
    t0 = now();
    for (int i = 0; i < inner; ++i) fn();
    samples.push_back((now() - t0) / inner);
  }
  std::sort(samples.begin(), samples.end());
  const size_t n = samples.size();
  med = n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]);
  lo = samples.front();
  hi = samples.back();
}

std::vector<float> random_floats(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

/// A whole number >= 1 from an option's value; std::invalid_argument otherwise.
int positive(const std::string& name, const std::string& v) {
  size_t used = 0;
  long n = 0;
  try {
    n = std::stol(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size() || n < 1 || n > 1000000)
    throw std::invalid_argument(name + " needs a whole number >= 1, got '" + v + "'");
  return static_cast<int>(n);
}

const char* kUsage =
    "usage: fastdropout_bench [--quick] [--json PATH] [--repeats R] [--threads N] [--backend NAME]\n"
    "  --quick       2**22 elements instead of 2**24, no 1024x4096x4096 shape, 3 repeats by default\n"
    "  --json PATH   also write the rows to PATH (checked before the run)\n"
    "  --repeats R   timed repeats per row (default 7; 3 with --quick); median, min and max\n"
    "  --threads N   run each kernel on 1, 2, ..., N threads (default: all the runtime's)\n"
    "  --backend B   one backend (scalar, avx2, avx512 or neon, where the CPU runs it); default: each\n";

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(std::string(name) + " needs a value");
      return argv[++i];
    };
    if (a == "--quick")
      o.quick = true;
    else if (a == "--json")
      o.json = value("--json");
    else if (a == "--repeats")
      o.repeats = positive("--repeats", value("--repeats"));
    else if (a == "--threads")
      o.max_threads = positive("--threads", value("--threads"));
    else if (a == "--backend")
      o.backend = value("--backend");
    else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option " + a);
    }
  }
  if (o.repeats == 0) o.repeats = o.quick ? 3 : 7;
  return o;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fastdropout_bench: %s\n", e.what());
    return 2;
  }
  const std::vector<std::string> backends =
      opt.backend.empty() ? fd::available_backends() : std::vector<std::string>{opt.backend};
  for (const auto& b : backends) {  // a backend this CPU cannot run: refused before any output
    try {
      fd::set_backend(b);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fastdropout_bench: %s\n", e.what());
      return 2;
    }
  }
  FILE* json_file = nullptr;  // opened now: a path that cannot be written fails before the run
  if (!opt.json.empty() && !(json_file = std::fopen(opt.json.c_str(), "w"))) {
    std::fprintf(stderr, "fastdropout_bench: cannot write %s\n", opt.json.c_str());
    return 1;
  }
  const int all_threads = fd::get_num_threads();
  const int max_threads = opt.max_threads ? opt.max_threads : all_threads;
  if (max_threads > all_threads)
    std::fprintf(stderr, "fastdropout_bench: --threads %d is more than the %d threads the runtime offers here; "
                 "rows past %d share cores\n", max_threads, all_threads, all_threads);

  const int64_t n = opt.quick ? (int64_t{1} << 22) : (int64_t{1} << 24);
  struct Shape {
    int64_t m, k, n;
  };
  std::vector<Shape> shapes = {{64, 784, 512}, {256, 1024, 1024}};
  if (!opt.quick) shapes.push_back({1024, 4096, 4096});

  const std::vector<float> x = random_floats(static_cast<size_t>(n), 1);
  std::vector<float> y(static_cast<size_t>(n));
  std::vector<uint32_t> words(static_cast<size_t>(n));
  std::vector<uint8_t> packed(static_cast<size_t>((n + 7) / 8)), bytes(static_cast<size_t>(n));
  const uint64_t seed = 1234, threshold = 1ull << 31;  // p = 0.5
  const float scale = 2.0f;

  std::printf("fastdropout_bench: cpu: %s; features: %s; OpenMP: %s; repeats: %d\n",
              fd::cpu_description(fd::cpu_id()).c_str(), fd::cpu_features().c_str(),
              fd::has_openmp() ? "yes" : "no", opt.repeats);
  std::printf("p = 0.5, float32; times per call; rate: elements or FLOPs per second; GB/s: the bytes the call\n"
              "reads and writes per second (elementwise kernels; '-' for the GEMMs, which are compute-bound);\n"
              "dropout_dense's FLOPs are the dense product's (2*M*K*N) also where the sparse path skips\n"
              "dropped inputs (each backend's '#' line says which path its masks take)\n");
  std::printf("%-8s %-24s %-16s %7s %12s %12s %12s %10s %9s\n", "backend", "kernel", "size",
              "threads", "median", "min", "max", "rate", "GB/s");
  std::vector<Row> rows;
  auto record = [&](const std::string& b, const std::string& kernel, const std::string& size, int t,
                    const std::function<void()>& fn, double work, double traffic, const char* unit) {
    Row r{b, kernel, size, t, 0, 0, 0, work, traffic, unit};
    measure(fn, opt.repeats, r.median_s, r.min_s, r.max_s);
    rows.push_back(r);
    char gbs[32] = "      -";
    if (traffic > 0) std::snprintf(gbs, sizeof gbs, "%7.1f", traffic / r.median_s / 1e9);
    std::printf("%-8s %-24s %-16s %7d %10.3f ms %10.3f ms %10.3f ms %8.2f %s %s\n", b.c_str(),
                kernel.c_str(), size.c_str(), t, r.median_s * 1e3, r.min_s * 1e3, r.max_s * 1e3,
                work / r.median_s / 1e9, unit, gbs);
    std::fflush(stdout);
  };

  for (const auto& b : backends) {
    fd::set_backend(b);  // (each was tried before the header)
    std::printf("# %s: GEMM path %s\n", b.c_str(), fd::gemm_path().why.c_str());
    for (int t = 1; t <= max_threads; ++t) {
      fd::set_num_threads(t);
      const std::string sz = std::to_string(n);
      const double fn = static_cast<double>(n);
      record(b, "philox words", sz, t, [&] { fd::ops::random_words(words.data(), n, seed, 0); }, fn, 4 * fn, "Gelem/s");
      record(b, "mask packed", sz, t, [&] { fd::ops::mask_packed(packed.data(), n, seed, 0, threshold); }, fn, fn / 8, "Gelem/s");
      record(b, "mask bool", sz, t, [&] { fd::ops::mask_bool(bytes.data(), n, seed, 0, threshold); }, fn, fn, "Gelem/s");
      record(b, "dropout forward", sz, t, [&] { fd::ops::dropout(x.data(), y.data(), n, seed, 0, threshold, scale); }, fn, 8 * fn, "Gelem/s");
      // the backward is the same pass over the incoming gradient, mask regenerated
      record(b, "dropout backward", sz, t, [&] { fd::ops::dropout(y.data(), y.data(), n, seed, 0, threshold, scale); }, fn, 8 * fn, "Gelem/s");
      for (const Shape& s : shapes) {
        const std::string dims = std::to_string(s.m) + "x" + std::to_string(s.k) + "x" + std::to_string(s.n);
        std::vector<float> dx(static_cast<size_t>(s.m * s.k)), w(static_cast<size_t>(s.n * s.k)),
            bias(static_cast<size_t>(s.n), 0.1f), out(static_cast<size_t>(s.m * s.n)),
            dy(static_cast<size_t>(s.m * s.n), 1.0f), gx(dx.size()), gw(w.size()), gb(bias.size());
        std::copy(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(std::min<size_t>(dx.size(), x.size())), dx.begin());
        std::copy(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(std::min<size_t>(w.size(), x.size())), w.begin());
        fd::ops::DenseForward f;
        f.x = dx.data();
        f.w = w.data();
        f.bias = bias.data();
        f.y = out.data();
        f.M = s.m;
        f.K = s.k;
        f.N = s.n;
        f.mask = fd::ops::make_mask(true, seed, 0, threshold, scale);
        fd::ops::DenseBackward g;
        g.dy = dy.data();
        g.x = dx.data();
        g.w = w.data();
        g.grad_x = gx.data();
        g.grad_w = gw.data();
        g.grad_b = gb.data();
        g.M = s.m;
        g.K = s.k;
        g.N = s.n;
        g.mask = f.mask;
        const double flops = 2.0 * static_cast<double>(s.m * s.k * s.n);
        record(b, "dropout_dense forward", dims, t, [&] { fd::ops::dense_forward(f); }, flops, 0, "GFLOP/s");
        record(b, "dropout_dense backward", dims, t, [&] { fd::ops::dense_backward(g); }, 2 * flops, 0, "GFLOP/s");
      }
    }
  }
  fd::set_num_threads(all_threads);

  if (FILE* fh = json_file) {
    std::fprintf(fh, "{\"schema\": 1, \"cpu\": \"%s\", \"cpu_features\": \"%s\", \"repeats\": %d, \"results\": [\n",
                 json_escape(fd::cpu_description(fd::cpu_id())).c_str(), json_escape(fd::cpu_features()).c_str(),
                 opt.repeats);
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::fprintf(fh,
                   " {\"backend\": \"%s\", \"kernel\": \"%s\", \"size\": \"%s\", \"threads\": %d, "
                   "\"median_s\": %.9g, \"min_s\": %.9g, \"max_s\": %.9g, \"rate\": %.6g, "
                   "\"unit\": \"%s\", \"gbytes_per_s\": %.6g}%s\n",
                   r.backend.c_str(), r.kernel.c_str(), r.size.c_str(), r.threads, r.median_s, r.min_s,
                   r.max_s, r.work / r.median_s / 1e9, r.unit.c_str(), r.bytes / r.median_s / 1e9,
                   i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(fh, "]}\n");
    std::fclose(fh);
    std::printf("wrote %s\n", opt.json.c_str());
  }
  return 0;
}
