#include "common.hpp"
#include "dispatch.hpp"
#include "ops.hpp"

namespace py = pybind11;
using namespace fastdropout;

void bind::register_runtime(py::module_& m) {
  m.def("backend", [] { return std::string(active_kernels().name); },
        "Name of the kernel backend in use.");
  m.def("available_backends", &available_backends,
        "Backends this CPU can run, slowest first.");
  m.def("compiled_backends", &compiled_backends, "Backends compiled into this build.");
  m.def("set_backend", &set_backend, py::arg("name"),
        "Force a backend for this process (ValueError if unknown or unsupported).");
  m.def("cpu_features", &cpu_features, "Instruction sets of this CPU relevant to the kernels.");
  m.def("has_openmp", &has_openmp, "Whether this build runs kernels on several threads.");
  m.def("get_num_threads", &get_num_threads, "Threads the kernels use.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Set the threads the kernels use.");
  m.def("cpu_id", [] {
          const CpuId& c = cpu_id();
          return py::make_tuple(c.vendor, c.family, c.model);
        }, "(vendor, family, model) as cpuid reports them.");
  m.def("gemm_path", [] {
          const GemmPathChoice c = gemm_path();
          return py::make_tuple(c.sparse, c.why);
        }, "(whether sparse masks take the sparse GEMM path on the active backend, why).");
  m.def("set_gemm_path", &set_gemm_path, py::arg("setting"),
        "Force the GEMM path: 'auto' (by CPU), 'dense' or 'sparse' (ValueError otherwise).");
  m.def("decide_gemm_path", [](const std::string& vendor, unsigned family, unsigned model,
                               bool backend_has_sparse, const std::string& setting) {
          const GemmPathChoice c = decide_gemm_path(CpuId{vendor, family, model}, backend_has_sparse, setting);
          return py::make_tuple(c.sparse, c.why);
        }, py::arg("vendor"), py::arg("family"), py::arg("model"), py::arg("backend_has_sparse"),
        py::arg("setting"), "The GEMM path rule for a given CPU (for tests).");
  m.def("bf16_gemm", [] {
          const Bf16GemmChoice c = bf16_gemm();
          return py::make_tuple(c.dot, c.why);
        }, "(whether bfloat16 GEMM operands take the dot-product kernel on the active backend, why).");
  m.def("set_bf16_gemm", &set_bf16_gemm, py::arg("setting"),
        "Force the bfloat16 GEMM kernel: 'auto' (by CPU), 'dot' or 'float32' (ValueError otherwise).");
  m.def("_bf16_dot_blocks", [] { return bf16_dot_blocks.load(); },
        "Blocks the bfloat16 dot-product kernel has computed in this process (for tests).");
  m.def("decide_bf16_gemm", [](const std::string& vendor, unsigned family, unsigned model, bool has_dot,
                               const std::string& setting) {
          const Bf16GemmChoice c = decide_bf16_gemm(CpuId{vendor, family, model}, has_dot, setting);
          return py::make_tuple(c.dot, c.why);
        }, py::arg("vendor"), py::arg("family"), py::arg("model"), py::arg("has_dot"), py::arg("setting"),
        "The bfloat16 GEMM rule for a given CPU (for tests).");
  m.def("neighbours", [] {
          const ops::NeighbourState st = ops::neighbour_state();
          py::dict d;
          d["adapting"] = st.adapting;
          d["one_thread_ns_left"] = st.one_thread_ns_left;
          d["lost_ns"] = st.lost_ns;
          d["backoff_ns"] = st.backoff_ns;
          d["unit_ns_elements"] = st.unit_ns_elements;
          d["unit_ns_flops"] = st.unit_ns_flops;
          return d;
        }, "What the kernels' parallel regions have seen of other libraries' threads on their cores.");
  m.def("_note_neighbour", &ops::note_neighbour, py::arg("lost_ns"),
        "For tests: record a neighbour as a parallel region that lost lost_ns of a core would (0: forget them).");
  m.def("_gemm_threads", &ops::gemm_threads, py::arg("flops"),
        "For tests: the threads a GEMM of this many FLOPs would get now.");
  m.def("openmp_runtime", &openmp_runtime,
        "Path of the OpenMP runtime library the kernels call ('' when unknown or without OpenMP).");
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastdropout native core (private: use the fastdropout package)";
  bind::register_runtime(m);
  bind::register_rng(m);
  bind::register_dense(m);
  bind::register_attention(m);
  bind::register_family(m);
  bind::register_engine_abi(m);
  // Choose the backend now, so a bad FASTDROPOUT_BACKEND fails the import clearly.
  active_kernels();
  gemm_path();  // a bad FASTDROPOUT_GEMM_PATH too
  bf16_gemm();  // and FASTDROPOUT_BF16_GEMM
  // Initialise the OpenMP runtime now, while the environment fastdropout._runtime set
  // for the import holds (libgomp reads it when loaded, LLVM's libomp at first use).
  get_num_threads();
}
