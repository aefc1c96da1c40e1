#include "dispatch.hpp"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

#if defined(FD_HAVE_OPENMP)
#include <omp.h>
#endif
#if !defined(_WIN32)
#include <dlfcn.h>
#endif
#if defined(FD_HAVE_X86_BACKENDS)
#if defined(_MSC_VER)
#include <immintrin.h>
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace fastdropout {
namespace {

struct CpuFlags {
  bool avx2 = false, fma = false, f16c = false, bmi1 = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false, avx512bf16 = false;
  bool os_avx = false, os_avx512 = false;
};

#if defined(FD_HAVE_X86_BACKENDS)
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
#if defined(_MSC_VER)
  int regs[4];
  __cpuidex(regs, static_cast<int>(leaf), static_cast<int>(sub));
  for (int i = 0; i < 4; ++i) r[i] = static_cast<unsigned>(regs[i]);
#else
  if (!__get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3])) r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

uint64_t xgetbv0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t{hi} << 32) | lo;
#endif
}

CpuId detect_id() {
  CpuId id;
  unsigned r[4];
  cpuid(0, 0, r);
  char vendor[13] = {};
  std::memcpy(vendor, &r[1], 4);
  std::memcpy(vendor + 4, &r[3], 4);
  std::memcpy(vendor + 8, &r[2], 4);
  id.vendor = vendor;
  if (r[0] >= 1) {
    cpuid(1, 0, r);
    const unsigned base_family = (r[0] >> 8) & 0xf, base_model = (r[0] >> 4) & 0xf;
    id.family = base_family == 0xf ? base_family + ((r[0] >> 20) & 0xff) : base_family;
    id.model = base_family == 0x6 || base_family == 0xf ? (((r[0] >> 16) & 0xf) << 4) | base_model : base_model;
  }
  cpuid(0x80000000u, 0, r);
  if (r[0] >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned leaf = 0; leaf < 3; ++leaf) {
      cpuid(0x80000002u + leaf, 0, r);
      std::memcpy(brand + 16 * leaf, r, 16);
    }
    std::string b = brand;
    const size_t first = b.find_first_not_of(' '), last = b.find_last_not_of(' ');
    id.brand = first == std::string::npos ? "" : b.substr(first, last - first + 1);
  }
  return id;
}

CpuFlags detect() {
  CpuFlags f;
  unsigned r[4];
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  if (max_leaf < 1) return f;
  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1, avx = (r[2] >> 28) & 1;
  f.fma = (r[2] >> 12) & 1;
  f.f16c = (r[2] >> 29) & 1;
  if (osxsave && avx) {
    // The OS must save the YMM (and for AVX-512 the opmask and ZMM) state.
    const uint64_t xcr0 = xgetbv0();
    f.os_avx = (xcr0 & 0x6) == 0x6;
    f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;
  }
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    f.bmi1 = (r[1] >> 3) & 1;
    f.avx2 = (r[1] >> 5) & 1;
    f.bmi2 = (r[1] >> 8) & 1;
    f.avx512f = (r[1] >> 16) & 1;
    f.avx512dq = (r[1] >> 17) & 1;
    f.avx512bw = (r[1] >> 30) & 1;
    f.avx512vl = (r[1] >> 31) & 1;
    if (r[0] >= 1) {  // sub-leaf 1: AVX512_BF16 in EAX bit 5
      cpuid(7, 1, r);
      f.avx512bf16 = (r[0] >> 5) & 1;
    }
  }
  return f;
}
#else
CpuFlags detect() { return {}; }
CpuId detect_id() { return {}; }
#endif

const CpuFlags& cpu() {
  static const CpuFlags flags = detect();
  return flags;
}

#if defined(FD_HAVE_X86_BACKENDS)
bool can_run_avx2() {
  const CpuFlags& f = cpu();
  return f.os_avx && f.avx2 && f.fma && f.f16c;  // every AVX2 CPU has F16C (since Ivy Bridge)
}

bool can_run_avx512() {
  const CpuFlags& f = cpu();
  return can_run_avx2() && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl &&
         f.bmi1 && f.bmi2;
}
#endif

const Kernels* table_for(const std::string& name) {
  if (name == "scalar") return &scalar::kernels();
#if defined(FD_HAVE_X86_BACKENDS)
  if (name == "avx2" && can_run_avx2()) return &avx2::kernels();
  if (name == "avx512" && can_run_avx512()) return &avx512::kernels();
#endif
#if defined(FD_HAVE_NEON_BACKEND)
  if (name == "neon") return &neon::kernels();
#endif
  return nullptr;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

const Kernels* choose(const std::string& name) {
  if (const Kernels* t = table_for(name)) return t;
  bool known = false;
  for (const auto& c : compiled_backends()) known = known || c == name;
  if (known)
    throw std::invalid_argument("backend '" + name + "' is not supported by this CPU; available: " +
                                join(available_backends()));
  throw std::invalid_argument("unknown backend '" + name + "'; expected one of: " +
                              join(compiled_backends()));
}

const Kernels* initial_table() {
  if (const char* env = std::getenv("FASTDROPOUT_BACKEND"); env && *env) {
    try {
      return choose(env);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("FASTDROPOUT_BACKEND=") + env + ": " + e.what());
    }
  }
  return choose(available_backends().back());
}

std::atomic<const Kernels*> g_table{nullptr};
std::atomic<int> g_threads{0};

}  // namespace

std::vector<std::string> compiled_backends() {
#if defined(FD_HAVE_X86_BACKENDS)
  return {"scalar", "avx2", "avx512"};
#elif defined(FD_HAVE_NEON_BACKEND)
  return {"scalar", "neon"};
#else
  return {"scalar"};
#endif
}

std::vector<std::string> available_backends() {
  std::vector<std::string> out{"scalar"};
#if defined(FD_HAVE_X86_BACKENDS)
  if (can_run_avx2()) out.push_back("avx2");
  if (can_run_avx512()) out.push_back("avx512");
#endif
#if defined(FD_HAVE_NEON_BACKEND)
  out.push_back("neon");
#endif
  return out;
}

std::string cpu_features() {
  const CpuFlags& f = cpu();
  std::string s;
  auto add = [&s](bool on, const char* name) {
    if (on) s += (s.empty() ? "" : " ") + std::string(name);
  };
  add(f.avx2 && f.os_avx, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.bmi2, "bmi2");
  add(f.avx512f && f.os_avx512, "avx512f");
  add(f.avx512bw && f.os_avx512, "avx512bw");
  add(f.avx512dq && f.os_avx512, "avx512dq");
  add(f.avx512vl && f.os_avx512, "avx512vl");
  add(f.avx512bf16 && f.os_avx512, "avx512bf16");
  return s;
}

const CpuId& cpu_id() {
  static const CpuId id = detect_id();
  return id;
}

std::string cpu_description(const CpuId& cpu) {
  if (cpu.vendor.empty()) return "unknown";
  char ids[96];
  std::snprintf(ids, sizeof ids, "%s family 0x%x model 0x%x", cpu.vendor.c_str(), cpu.family, cpu.model);
  return cpu.brand.empty() ? std::string(ids) : cpu.brand + " (" + ids + ")";
}

GemmPathChoice decide_gemm_path(const CpuId& cpu, bool backend_has_sparse, const std::string& setting) {
  if (!setting.empty() && setting != "auto" && setting != "dense" && setting != "sparse")
    throw std::invalid_argument("GEMM path '" + setting + "' (FASTDROPOUT_GEMM_PATH): expected auto, dense or sparse");
  if (!backend_has_sparse) return {false, "dense: this backend has no sparse path"};
  if (setting == "dense") return {false, "dense: forced (FASTDROPOUT_GEMM_PATH)"};
  if (setting == "sparse") return {true, "sparse: forced (FASTDROPOUT_GEMM_PATH)"};
  // Measured, interleaved against the dense kernel: avx512 at p = 0.3-0.5 6-23% faster on
  // AMD Zen 4 (family 19h model 11h), 1.05-1.6x slower on Intel Xeons (family 6, models 207
  // and 167: 0.83-0.95x the dense path's speed at p = 0.5 on the latter); avx2 at p =
  // 0.35-0.6 6-53% faster on Zen 3 (family 19h model 1).  On model 167 a step in which
  // every FMA loads its own B vector runs at 0.68-0.81x the dense micro-kernel's FMA rate
  // even from L1 (bench/experiments/core_rates.cpp, part 1), so skipping half the FMAs cannot
  // pay for the mask's bookkeeping.  A CPU not measured gets the dense path, which is
  // never the slower one.
  if (cpu.vendor == "AuthenticAMD" && cpu.family >= 0x19)
    return {true, "sparse: AMD family 19h or later (measured faster on Zen 3 with avx2, Zen 4 with avx512)"};
  if (cpu.vendor == "GenuineIntel")
    return {false, "dense: Intel (the sparse path measured 1.05-1.6x slower on Xeons, family 6 models 0xcf and 0xa7)"};
  return {false, "dense: the sparse path was not measured faster on this CPU"};
}

namespace {
std::mutex g_path_lock;

std::string& gemm_path_slot() {
  static std::string setting = [] {
    const char* env = std::getenv("FASTDROPOUT_GEMM_PATH");
    const std::string v = env ? env : "";
    decide_gemm_path(CpuId{}, false, v);  // validate once, whatever the backend
    return v;
  }();
  return setting;
}

std::string gemm_path_setting() {
  std::lock_guard<std::mutex> g(g_path_lock);
  return gemm_path_slot();
}

/// The choice on a backend that has the sparse path (updated by set_gemm_path).
std::atomic<int> g_sparse_choice{-1};

bool sparse_choice() {
  int c = g_sparse_choice.load(std::memory_order_relaxed);
  if (c < 0) {
    c = decide_gemm_path(cpu_id(), true, gemm_path_setting()).sparse ? 1 : 0;
    g_sparse_choice.store(c, std::memory_order_relaxed);
  }
  return c == 1;
}
}  // namespace

GemmPathChoice gemm_path() {
  const Kernels& k = active_kernels();
  GemmPathChoice c = decide_gemm_path(cpu_id(), k.blocking.sparse, gemm_path_setting());
  if (c.sparse) {  // from which p, on this backend
    auto p = [](uint64_t t) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "p >= %.3g", static_cast<double>(t) / 4294967296.0);
      return std::string(buf);
    };
    const GemmBlocking& b = k.blocking;
    std::string where = "a batch of more than " + std::to_string(b.direct_rows) + " rows";
    if (b.sparse_min_n > 0) where += " and " + std::to_string(b.sparse_min_n) + " output columns or more";
    c.why += std::string("; on ") + k.name + " for masks with " + p(b.sparse_min) + " in the forward (" + where +
             "), " +
             (b.sparse_grad_min > kDropAll ? std::string("never for grad_weight")
                                           : p(b.sparse_grad_min) + " for grad_weight from a batch of 256");
  }
  return c;
}

void set_gemm_path(const std::string& setting) {
  if (setting.empty()) throw std::invalid_argument("GEMM path '': expected auto, dense or sparse");
  const bool sparse = decide_gemm_path(cpu_id(), true, setting).sparse;  // validates
  std::lock_guard<std::mutex> g(g_path_lock);
  gemm_path_slot() = setting;
  g_sparse_choice.store(sparse ? 1 : 0, std::memory_order_relaxed);
}

bool sparse_path_enabled() { return active_kernels().blocking.sparse && sparse_choice(); }

std::atomic<uint64_t> bf16_dot_blocks{0};

Bf16GemmChoice decide_bf16_gemm(const CpuId& cpu, bool has_dot, const std::string& setting) {
  if (!setting.empty() && setting != "auto" && setting != "dot" && setting != "float32")
    throw std::invalid_argument("bfloat16 GEMM '" + setting +
                                "' (FASTDROPOUT_BF16_GEMM): expected auto, dot or float32");
  if (!has_dot)
    return {false, "float32: this backend or CPU has no bfloat16 dot product (AVX512_BF16 with the avx512 backend)"};
  if (setting == "float32") return {false, "float32: forced (FASTDROPOUT_BF16_GEMM)"};
  if (setting == "dot") return {true, "dot: forced (FASTDROPOUT_BF16_GEMM)"};
  // vdpbf16ps does two products a lane where vfmadd231ps does one, so it gains only where
  // the core issues it at more than half the FMA's rate (bench/experiments/core_rates.cpp,
  // part 2): on AMD Zen 4 (family 19h model 11h) at the FMA's rate (3.53 against 3.55 G
  // instructions/s, one core: twice the float32 FLOP rate), on an Intel Xeon (family 6
  // model 0xa7) at a quarter of it (half the float32 rate; a GEMM on it measured 88 against
  // 166 GFLOP/s).  A CPU not measured keeps the float32 kernels, never the slower choice.
  if (cpu.vendor == "AuthenticAMD" && cpu.family >= 0x19)
    return {true, "dot: AMD family 19h or later (vdpbf16ps measured at the FMA's issue rate on Zen 4)"};
  if (cpu.vendor == "GenuineIntel")
    return {false, "float32: Intel (vdpbf16ps measured at a quarter of the FMA's issue rate on a Xeon, family 6 model 0xa7)"};
  return {false, "float32: the bfloat16 dot product was not measured faster on this CPU"};
}

namespace {
std::string& bf16_gemm_slot() {
  static std::string setting = [] {
    const char* env = std::getenv("FASTDROPOUT_BF16_GEMM");
    const std::string v = env ? env : "";
    decide_bf16_gemm(CpuId{}, false, v);  // validate once, whatever the backend
    return v;
  }();
  return setting;
}

/// Whether the active backend can run the dot-product kernel on this CPU.
bool has_bf16_dot() {
#if defined(FD_HAVE_X86_BACKENDS)
  return active_kernels().blocking.bf16_dot && cpu().avx512bf16 && cpu().os_avx512;
#else
  return false;
#endif
}

/// The choice where the kernel can run (updated by set_bf16_gemm).
std::atomic<int> g_bf16_choice{-1};
}  // namespace

Bf16GemmChoice bf16_gemm() {
  std::string setting;
  {
    std::lock_guard<std::mutex> g(g_path_lock);
    setting = bf16_gemm_slot();
  }
  return decide_bf16_gemm(cpu_id(), has_bf16_dot(), setting);
}

void set_bf16_gemm(const std::string& setting) {
  if (setting.empty()) throw std::invalid_argument("bfloat16 GEMM '': expected auto, dot or float32");
  const bool dot = decide_bf16_gemm(cpu_id(), true, setting).dot;  // validates
  std::lock_guard<std::mutex> g(g_path_lock);
  bf16_gemm_slot() = setting;
  g_bf16_choice.store(dot ? 1 : 0, std::memory_order_relaxed);
}

bool bf16_dot_enabled() {
  if (!has_bf16_dot()) return false;
  int c = g_bf16_choice.load(std::memory_order_relaxed);
  if (c < 0) {
    c = bf16_gemm().dot ? 1 : 0;
    g_bf16_choice.store(c, std::memory_order_relaxed);
  }
  return c == 1;
}

const Kernels& active_kernels() {
  const Kernels* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    const Kernels* chosen = initial_table();
    g_table.compare_exchange_strong(t, chosen, std::memory_order_acq_rel);
    t = g_table.load(std::memory_order_acquire);
  }
  return *t;
}

void set_backend(const std::string& name) { g_table.store(choose(name), std::memory_order_release); }

bool has_openmp() {
#if defined(FD_HAVE_OPENMP)
  return true;
#else
  return false;
#endif
}

std::string openmp_runtime() {
#if defined(FD_HAVE_OPENMP) && !defined(_WIN32)
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&omp_get_max_threads), &info) && info.dli_fname)
    return info.dli_fname;
#endif
  return "";
}

int get_num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
#if defined(FD_HAVE_OPENMP)
  n = omp_get_max_threads();
#else
  n = 1;
#endif
  return n > 0 ? n : 1;
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(n));
#if !defined(FD_HAVE_OPENMP)
  n = 1;  // built without OpenMP: one thread, whatever is asked
#endif
  g_threads.store(n, std::memory_order_relaxed);
}

}  // namespace fastdropout
