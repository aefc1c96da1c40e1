// fastdropout's fused dropout -> linear layer as a PyTorch autograd function in C++, for
// plain eager calls of fastdropout.torch (float32 CPU tensors).  The same layer through the
// Python route (fastdropout/_torch_ops.py) costs ~100-250 us a call beside the kernels,
// most of it the interpreter reloading its code and data after the kernel has evicted them
// from the caches (bench/experiments/cold_overhead.py); here the call and the graph node
// are C++, and the kernels are the engine's, reached through _core's C interface
// (engine_abi.h).  Built at first use against the installed torch by
// torch.utils.cpp_extension (fastdropout/_torch_native.py): torch's C++ API has no stable
// ABI, so no build could serve every torch.
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>

#include "engine_abi.h"

namespace {

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const fastdropout_engine_v1* g_engine = nullptr;
// The Python backward for create_graph (differentiable pieces, so that second derivatives
// are right); a pointer that is never freed, as the interpreter may be gone at exit.
py::object* g_composite = nullptr;
// For tests: the operands the last forward handed to the engine, and which gradients the
// last backward computed.
const void* g_last_operands[3] = {nullptr, nullptr, nullptr};
bool g_last_wanted[3] = {false, false, false};

void check(int rc, const char* msg) { TORCH_CHECK(rc == 0, msg); }

// t (..., cols) as a C-contiguous (rows, cols) tensor (a view where it already is one).
at::Tensor rows_of(const at::Tensor& t, int64_t cols) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return t.resolve_neg().contiguous().reshape({rows, cols});
}

bool keeps_output_for_relu(int64_t activation) { return activation == 1; }

// A tensor's data for the engine: an empty tensor may have no storage, and the engine
// wants an address even where it reads nothing.
float g_none = 0.0f;
const float* in_ptr(const at::Tensor& t) { return t.numel() ? t.const_data_ptr<float>() : &g_none; }
float* out_ptr(at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<float>() : &g_none; }

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

class DropoutLinear : public torch::autograd::Function<DropoutLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, double p, uint64_t seed, uint64_t offset,
                            int64_t activation, bool train) {
    const int64_t K = x.size(-1), N = weight.size(0);
    at::Tensor x2 = rows_of(x, K), w = weight.resolve_neg().contiguous();
    at::Tensor b = bias.has_value() ? bias->resolve_neg().contiguous() : at::Tensor();
    const int64_t M = x2.size(0);
    // (allocated in the output's shape: a view made here could not take in-place changes)
    at::Tensor y = at::empty(out_shape(x, N), x.options());
    const bool keep_z = activation == 2;  // GELU's derivative reads z; ReLU's its output
    at::Tensor z = keep_z ? at::empty(out_shape(x, N), x.options()) : at::Tensor();
    fastdropout_linear_args a{};
    a.x = in_ptr(x2);
    a.w = in_ptr(w);
    a.bias = b.defined() ? in_ptr(b) : nullptr;
    a.y = out_ptr(y);
    a.z_out = keep_z ? out_ptr(z) : nullptr;
    a.M = M, a.N = N, a.K = K;
    a.activation = static_cast<int32_t>(activation);
    a.masked = train ? 1 : 0;
    a.seed = seed, a.offset = offset, a.p = p;
    g_last_operands[0] = a.x, g_last_operands[1] = a.w, g_last_operands[2] = a.bias;
    char msg[256] = {0};
    int rc;
    {
      py::gil_scoped_release nogil;
      rc = g_engine->linear_forward(&a, msg, sizeof msg);
    }
    check(rc, msg);
    at::Tensor& out = y;
    // x as the caller gave it (an inference tensor cannot be saved: a copy is)
    ctx->save_for_backward({x.is_inference() ? x.clone() : x, weight, bias.has_value() ? *bias : at::Tensor(),
                            keep_z ? z : (keeps_output_for_relu(activation) ? out : at::Tensor())});
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = static_cast<int64_t>(seed);
    ctx->saved_data["offset"] = static_cast<int64_t>(offset);
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["train"] = train;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &z = saved[3];
    const double p = ctx->saved_data["p"].toDouble();
    const uint64_t seed = static_cast<uint64_t>(ctx->saved_data["seed"].toInt());
    const uint64_t offset = static_cast<uint64_t>(ctx->saved_data["offset"].toInt());
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const bool train = ctx->saved_data["train"].toBool();
    const at::Tensor& grad_y = grads[0];
    variable_list out(8);
    if (at::GradMode::is_enabled()) {  // create_graph: the Python formula of differentiable pieces
      py::gil_scoped_acquire gil;
      py::tuple g = (*g_composite)(grad_y, x, weight, bias.defined() ? py::cast(bias) : py::none(), p, seed, offset,
                                   activation, train);
      for (int i = 0; i < 3; ++i)
        if (!g[i].is_none() && ctx->needs_input_grad(i)) out[i] = g[i].cast<at::Tensor>();
      return out;
    }
    const int64_t K = x.size(-1), N = weight.size(0);
    at::Tensor x2 = rows_of(x, K), w = weight.resolve_neg().contiguous();
    at::Tensor dy = rows_of(grad_y, N);
    at::Tensor z2 = z.defined() ? rows_of(z, N) : at::Tensor();
    const int64_t M = x2.size(0);
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    const bool want_b = bias.defined() && ctx->needs_input_grad(2);
    at::Tensor gx = want_x ? at::empty(x.sizes(), x.options()) : at::Tensor();
    at::Tensor gw = want_w ? at::empty({N, K}, weight.options()) : at::Tensor();
    at::Tensor gb = want_b ? at::empty({N}, weight.options()) : at::Tensor();
    fastdropout_linear_args a{};
    a.x = in_ptr(x2);
    a.w = in_ptr(w);
    a.dy = in_ptr(dy);
    a.z = z2.defined() ? in_ptr(z2) : nullptr;
    a.grad_x = want_x ? out_ptr(gx) : nullptr;
    a.grad_w = want_w ? out_ptr(gw) : nullptr;
    a.grad_b = want_b ? out_ptr(gb) : nullptr;
    a.M = M, a.N = N, a.K = K;
    a.activation = static_cast<int32_t>(activation);
    a.masked = train ? 1 : 0;
    a.seed = seed, a.offset = offset, a.p = p;
    g_last_wanted[0] = want_x, g_last_wanted[1] = want_w, g_last_wanted[2] = want_b;
    char msg[256] = {0};
    check(g_engine->linear_backward(&a, msg, sizeof msg), msg);  // (the autograd engine holds no GIL here)
    out[0] = gx;
    out[1] = gw;
    out[2] = gb;
    return out;
  }
};

at::Tensor dropout_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          double p, uint64_t seed, uint64_t offset, int64_t activation, bool train) {
  TORCH_CHECK(g_engine && g_composite, "fastdropout's native torch ops are not initialised");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  (!bias.has_value() || bias->scalar_type() == at::kFloat),
              "fastdropout native dropout_linear: float32 tensors only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && x.layout() == at::kStrided &&
                  weight.layout() == at::kStrided,
              "fastdropout native dropout_linear: dense CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1) &&
                  (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0))),
              "fastdropout native dropout_linear: shapes do not fit");
  TORCH_CHECK(activation >= 0 && activation <= 2 && p >= 0.0 && p <= 1.0,
              "fastdropout native dropout_linear: bad activation or p");
  return DropoutLinear::apply(x, weight, bias, p, seed, offset, activation, train);
}

void init(py::capsule engine, py::object composite) {
  const char* name = engine.name();
  TORCH_CHECK(name && std::string(name) == FASTDROPOUT_ENGINE_CAPSULE, "not fastdropout's engine capsule");
  const auto* e = static_cast<const fastdropout_engine_v1*>(engine.get_pointer());
  TORCH_CHECK(e && e->abi_version == FASTDROPOUT_ENGINE_ABI_VERSION && e->struct_size >= sizeof(fastdropout_engine_v1),
              "fastdropout's engine interface does not match this build of its torch ops");
  g_engine = e;
  g_composite = new py::object(std::move(composite));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("init", &init, py::arg("engine"), py::arg("composite"),
        "Bind to _core's engine capsule and the Python backward used under create_graph.");
  m.def("dropout_linear", &dropout_linear, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("p"),
        py::arg("seed"), py::arg("offset"), py::arg("activation"), py::arg("train"),
        "act(dropout(x) @ weight.T + bias) with autograd; arguments already checked by fastdropout.torch.");
  m.def("_last_operands", [] {
    return py::make_tuple(reinterpret_cast<uintptr_t>(g_last_operands[0]), reinterpret_cast<uintptr_t>(g_last_operands[1]),
                          reinterpret_cast<uintptr_t>(g_last_operands[2]));
  }, "For tests: the data addresses of x, weight and bias the last forward gave the engine (0: none).");
  m.def("_last_wanted", [] { return py::make_tuple(g_last_wanted[0], g_last_wanted[1], g_last_wanted[2]); },
        "For tests: which of (grad_x, grad_weight, grad_bias) the last fused backward computed.");
}
