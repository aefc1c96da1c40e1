// Run-time choice of the kernel table, and the thread count.
#pragma once
#include <string>
#include <vector>

#include "kernels.hpp"

namespace fastdropout {

/// Backends this build has and this CPU (and OS) can run, slowest first.
std::vector<std::string> available_backends();
/// Every backend compiled into this build, whether or not the CPU can run it.
std::vector<std::string> compiled_backends();
/// One line naming the CPU's relevant instruction sets, e.g. "avx2 fma bmi2 avx512f ...".
std::string cpu_features();

/// The table in use; chosen on first use (FASTDROPOUT_BACKEND, else the best available).
/// Throws std::invalid_argument when FASTDROPOUT_BACKEND names a backend that cannot run.
const Kernels& active_kernels();
/// Forces a backend; throws std::invalid_argument if unknown or unsupported here.
void set_backend(const std::string& name);

/// The CPU as cpuid reports it: vendor string ("GenuineIntel", "AuthenticAMD", ...),
/// display family and model, and the brand string ("AMD EPYC 7B13 ...", empty where the
/// CPU has none).
struct CpuId {
  std::string vendor;
  unsigned family = 0, model = 0;
  std::string brand;
};
/// "<brand> (<vendor> family 0x.. model 0x..)", or "unknown" without cpuid.
std::string cpu_description(const CpuId& cpu);
const CpuId& cpu_id();

/// Whether masks sparse enough may take the sparse GEMM path (on a backend that has
/// one), and why.  Both paths give bit-identical results: this is a speed choice only.
struct GemmPathChoice {
  bool sparse = false;
  std::string why;
};
/// The choice for this CPU, `backend_has_sparse` and a FASTDROPOUT_GEMM_PATH value
/// ("", "auto", "dense" or "sparse"; std::invalid_argument otherwise).
GemmPathChoice decide_gemm_path(const CpuId& cpu, bool backend_has_sparse, const std::string& setting);
/// decide_gemm_path for this CPU, the active backend and the environment (read once).
GemmPathChoice gemm_path();
/// Overrides FASTDROPOUT_GEMM_PATH: "auto", "dense" or "sparse" (std::invalid_argument otherwise).
void set_gemm_path(const std::string& setting);
/// gemm_path().sparse, cheaply, for the active backend.
bool sparse_path_enabled();

/// Whether bfloat16 GEMM operands take the dot-product kernel (AVX512_BF16's vdpbf16ps,
/// two products an instruction) rather than the float32 kernels on their widened values,
/// and why.  The kernel runs only where it gives the float32 kernels' bits (see
/// bf16_gemm_tile): a speed choice only.
struct Bf16GemmChoice {
  bool dot = false;
  std::string why;
};
/// The choice for this CPU, `has_dot` (the backend has the kernel and the CPU the
/// instruction) and a FASTDROPOUT_BF16_GEMM value ("", "auto", "dot" or "float32";
/// std::invalid_argument otherwise).
Bf16GemmChoice decide_bf16_gemm(const CpuId& cpu, bool has_dot, const std::string& setting);
/// decide_bf16_gemm for this CPU, the active backend and the environment (read once).
Bf16GemmChoice bf16_gemm();
/// Overrides FASTDROPOUT_BF16_GEMM: "auto", "dot" or "float32" (std::invalid_argument otherwise).
void set_bf16_gemm(const std::string& setting);
/// bf16_gemm().dot, cheaply, for the active backend.
bool bf16_dot_enabled();

int get_num_threads();
/// n >= 1; throws std::invalid_argument otherwise.
void set_num_threads(int n);
bool has_openmp();
/// The file of the OpenMP runtime whose functions this module calls ("" when
/// unknown or without OpenMP): another library's, when it was loaded first and shares it.
std::string openmp_runtime();

}  // namespace fastdropout
