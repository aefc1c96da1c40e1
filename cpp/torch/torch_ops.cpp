// fastdropout's fused dropout -> linear layer and its plain dropout (float32, bfloat16 and
// float16 CPU tensors), as PyTorch autograd functions in C++, for plain eager calls of
// fastdropout.torch.  The same layer through the
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

// Runs the engine without the GIL: released here when the caller holds it (a call from
// Python), as it is already where the dispatcher or the autograd engine calls.
struct NoGil {
  std::optional<py::gil_scoped_release> release;
  NoGil() {
    if (PyGILState_Check()) release.emplace();
  }
};

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
uint16_t g_none_h = 0;
const float* in_ptr(const at::Tensor& t) { return t.numel() ? t.const_data_ptr<float>() : &g_none; }
float* out_ptr(at::Tensor& t) { return t.numel() ? t.mutable_data_ptr<float>() : &g_none; }
// (a bfloat16 or float16 tensor's data as its 16-bit patterns)
uint16_t* h16_ptr(const at::Tensor& t) {
  return t.numel() ? static_cast<uint16_t*>(const_cast<void*>(t.const_data_ptr())) : &g_none_h;
}

// The dtypes the engine's GEMM takes an operand in: float32; bfloat16 (its 16-bit patterns,
// widened exactly while packed); float16 (widened to a float32 copy first, as the Python
// route does).  Outputs are float32, rounded once to the caller's dtype.
bool engine_dtype(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

// A C-contiguous GEMM operand as the engine takes it: float16 widened to float32, float32 and
// bfloat16 as they are; then its data as float32 (f32_of) or as bfloat16 bits (bf16_of), the
// other null.
at::Tensor engine_operand(const at::Tensor& t) { return t.scalar_type() == at::kHalf ? t.to(at::kFloat) : t; }
const float* f32_of(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? in_ptr(t) : nullptr; }
const uint16_t* bf16_of(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? h16_ptr(t) : nullptr; }

// A float32 result of the engine in `dtype` (rounded once; the tensor itself where float32).
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) { return dtype == at::kFloat ? t : t.to(dtype); }

// Whether dropout_linear keeps z, the pre-activation, for its backward (_torch_ops._keeps_z):
// GELU's derivative reads z; ReLU's reads a float32 output, and z where the output is rounded
// to half precision (a tiny positive z can round to 0).
bool keeps_z(int64_t activation, const at::Tensor& x) {
  return activation == 2 || (activation == 1 && x.scalar_type() != at::kFloat);
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

// y = act(dropout(x) @ weight.T + bias) (and z, the pre-activation, when keep_z, in float32)
// in x's shape with weight's rows as its last dimension and x's dtype, by the engine.
std::pair<at::Tensor, at::Tensor> run_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                              double p, uint64_t seed, uint64_t offset, int64_t activation, bool train,
                                              bool keep_z) {
  const int64_t K = x.size(-1), N = weight.size(0);
  const at::Tensor x2 = engine_operand(rows_of(x, K)), w = engine_operand(weight.resolve_neg().contiguous());
  at::Tensor b = bias.defined() ? bias.resolve_neg().contiguous().to(at::kFloat) : at::Tensor();
  // (allocated in the output's shape: a view made here could not take in-place changes)
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty(out_shape(x, N), f32);
  at::Tensor z = keep_z ? at::empty(out_shape(x, N), f32) : at::Tensor();
  fastdropout_linear_args a{};
  a.x = f32_of(x2), a.xh = bf16_of(x2);
  a.w = f32_of(w), a.wh = bf16_of(w);
  a.bias = b.defined() ? in_ptr(b) : nullptr;
  a.y = out_ptr(y);
  a.z_out = keep_z ? out_ptr(z) : nullptr;
  a.M = x2.size(0), a.N = N, a.K = K;
  a.activation = static_cast<int32_t>(activation);
  a.masked = train ? 1 : 0;
  a.seed = seed, a.offset = offset, a.p = p;
  g_last_operands[0] = a.x ? static_cast<const void*>(a.x) : a.xh;
  g_last_operands[1] = a.w ? static_cast<const void*>(a.w) : a.wh;
  g_last_operands[2] = a.bias;
  char msg[256] = {0};
  int rc;
  {
    NoGil nogil;
    rc = g_engine->linear_forward(&a, msg, sizeof msg);
  }
  check(rc, msg);
  return {as_dtype(y, x.scalar_type()), z};
}

// (grad_x, grad_weight, grad_bias) by the engine in x's, weight's and weight's dtype, each
// only where `want` asks (else undefined); z (float32) is the pre-activation (ReLU: its
// float32 output) where there is an activation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& z, double p,
                                                            uint64_t seed, uint64_t offset, int64_t activation,
                                                            bool train, const bool want[3]) {
  const int64_t K = x.size(-1), N = weight.size(0);
  const at::Tensor x2 = engine_operand(rows_of(x, K)), w = engine_operand(weight.resolve_neg().contiguous()),
                   dy = engine_operand(rows_of(grad_y, N));
  at::Tensor z2 = activation && z.defined() ? rows_of(z, N) : at::Tensor();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gx = want[0] ? at::empty(x.sizes(), f32) : at::Tensor();
  at::Tensor gw = want[1] ? at::empty({N, K}, f32) : at::Tensor();
  at::Tensor gb = want[2] ? at::empty({N}, f32) : at::Tensor();
  fastdropout_linear_args a{};
  a.x = f32_of(x2), a.xh = bf16_of(x2);
  a.w = f32_of(w), a.wh = bf16_of(w);
  a.dy = f32_of(dy), a.dyh = bf16_of(dy);
  a.z = z2.defined() ? in_ptr(z2) : nullptr;
  a.grad_x = want[0] ? out_ptr(gx) : nullptr;
  a.grad_w = want[1] ? out_ptr(gw) : nullptr;
  a.grad_b = want[2] ? out_ptr(gb) : nullptr;
  a.M = x2.size(0), a.N = N, a.K = K;
  a.activation = static_cast<int32_t>(activation);
  a.masked = train ? 1 : 0;
  a.seed = seed, a.offset = offset, a.p = p;
  g_last_wanted[0] = want[0], g_last_wanted[1] = want[1], g_last_wanted[2] = want[2];
  char msg[256] = {0};
  int rc;
  {
    NoGil nogil;
    rc = g_engine->linear_backward(&a, msg, sizeof msg);
  }
  check(rc, msg);
  const auto back = [](const at::Tensor& g, const at::Tensor& like) {
    return g.defined() ? as_dtype(g, like.scalar_type()) : g;
  };
  return {back(gx, x), back(gw, weight), back(gb, weight)};
}

class DropoutLinear : public torch::autograd::Function<DropoutLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, double p, uint64_t seed, uint64_t offset,
                            int64_t activation, bool train) {
    const bool keep_z = keeps_z(activation, x);
    auto [out, z] = run_forward(x, weight, bias.has_value() ? *bias : at::Tensor(), p, seed, offset, activation, train,
                                keep_z);
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
    const bool want[3] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                          bias.defined() && ctx->needs_input_grad(2)};
    std::tie(out[0], out[1], out[2]) = run_backward(grad_y, x, weight, z, p, seed, offset, activation, train, want);
    return out;
  }
};

// ------------------------------------------------------------------ dropout
// dropout(x) under (seed, offset) by the engine, as a new C-contiguous tensor of x's shape and
// dtype (float32, or bfloat16 and float16 computed in float32 and rounded once; made
// contiguous first where it is not, as an expanded gradient).
at::Tensor run_dropout(const at::Tensor& x, double p, uint64_t seed, uint64_t offset) {
  const at::Tensor src = x.resolve_neg().contiguous();
  at::Tensor y = at::empty(src.sizes(), src.options());
  const bool half = src.scalar_type() != at::kFloat;
  char msg[256] = {0};
  int rc;
  {
    NoGil nogil;
    rc = half ? g_engine->dropout_h16(h16_ptr(src), h16_ptr(y), src.numel(),
                                      src.scalar_type() == at::kBFloat16 ? 1 : 0, seed, offset, p, msg, sizeof msg)
              : g_engine->dropout(in_ptr(src), out_ptr(y), src.numel(), seed, offset, p, msg, sizeof msg);
  }
  check(rc, msg);
  return y;
}

// The map x -> mask * x * scale is its own adjoint: the backward is the same dropout of the
// gradient, and under create_graph this Function again (so higher derivatives are right).
class Dropout : public torch::autograd::Function<Dropout> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, uint64_t seed, uint64_t offset) {
    at::Tensor y = run_dropout(x, p, seed, offset);
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = static_cast<int64_t>(seed);
    ctx->saved_data["offset"] = static_cast<int64_t>(offset);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const double p = ctx->saved_data["p"].toDouble();
    const uint64_t seed = static_cast<uint64_t>(ctx->saved_data["seed"].toInt());
    const uint64_t offset = static_cast<uint64_t>(ctx->saved_data["offset"].toInt());
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    if (at::GradMode::is_enabled()) return {Dropout::apply(grad_y, p, seed, offset), at::Tensor(), at::Tensor(), at::Tensor()};
    return {run_dropout(grad_y, p, seed, offset), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// dropout(x) for a plain eager call: x a C-contiguous float32, bfloat16 or float16 CPU tensor
// (fastdropout.torch checked it, and p, and drew the stream).
at::Tensor dropout(const at::Tensor& x, double p, uint64_t seed, uint64_t offset) {
  TORCH_CHECK(g_engine, "fastdropout's native torch ops are not initialised");  // (init checked struct_size)
  TORCH_CHECK(engine_dtype(x) && x.device().is_cpu() && x.layout() == at::kStrided,
              "fastdropout native dropout: float32, bfloat16 or float16 dense CPU tensors only");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "fastdropout native dropout: p outside [0, 1]");
  if (at::GradMode::is_enabled() && x.requires_grad()) return Dropout::apply(x, p, seed, offset);
  return run_dropout(x, p, seed, offset);
}

at::Tensor dropout_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          double p, uint64_t seed, uint64_t offset, int64_t activation, bool train) {
  TORCH_CHECK(g_engine && g_composite, "fastdropout's native torch ops are not initialised");
  TORCH_CHECK(engine_dtype(x) && weight.scalar_type() == x.scalar_type() &&
                  (!bias.has_value() || bias->scalar_type() == x.scalar_type()),
              "fastdropout native dropout_linear: float32, bfloat16 or float16 tensors of one dtype only");
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

// ------------------------------------------------------------------ the registered ops' CPU kernels
// fastdropout::dropout_linear and fastdropout::dropout_linear_backward (schemas defined in
// _torch_ops.py) are what compiled and exported graphs call; their CPU kernels here replace
// the Python ones, which still serve other dtypes (float64 and the like).
py::object* g_py_linear = nullptr;
py::object* g_py_linear_backward = nullptr;
torch::Library* g_impls = nullptr;
torch::Library* g_autograd = nullptr;
bool g_cpp_kernels = true;  // false: the Python kernels for every dtype (tests of that route)

// Whether the engine takes these operands (undefined ones aside) in C++.
bool engine_dtypes(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t->defined() && !engine_dtype(*t)) return false;
  return true;
}

using Three = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Three three_of(const py::object& r) {
  py::tuple t = r.cast<py::tuple>();
  return {t[0].cast<at::Tensor>(), t[1].cast<at::Tensor>(), t[2].cast<at::Tensor>()};
}

std::pair<uint64_t, uint64_t> read_state(const at::Tensor& state) {
  at::Tensor s = state.contiguous();
  TORCH_CHECK(s.scalar_type() == at::kLong && s.numel() == 2, "state must be an int64 tensor [seed, offset]");
  const int64_t* v = s.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
}

Three linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double p,
                 const std::optional<at::Tensor>& state, int64_t activation, bool train) {
  const at::Tensor no_bias;
  if (!g_cpp_kernels || !engine_dtypes({&x, &weight, bias.has_value() ? &*bias : &no_bias})) {
    py::gil_scoped_acquire gil;
    return three_of((*g_py_linear)(x, weight, bias.has_value() ? py::cast(*bias) : py::none(), p,
                                   state.has_value() ? py::cast(*state) : py::none(), activation, train));
  }
  at::Tensor st;
  if (!train) {
    st = at::zeros({2}, at::kLong);
  } else if (state.has_value()) {
    st = state->clone();  // (an op's outputs may not alias its inputs)
  } else {  // one draw from torch's default generator, as _torch_ops._draw_seed
    const int64_t seed = at::randint(0, INT64_MAX, {}, at::kLong).item<int64_t>();
    st = at::tensor({seed, int64_t{0}}, at::kLong);
  }
  const auto [seed, offset] = train ? read_state(st) : std::pair<uint64_t, uint64_t>{0, 0};
  auto [y, z] = run_forward(x, weight, bias.has_value() ? *bias : at::Tensor(), p, seed, offset, activation, train,
                            keeps_z(activation, x));
  return {y, z.defined() ? z : at::empty({0}, x.options().dtype(at::kFloat)), st};
}

Three linear_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
                          double p, const at::Tensor& state, int64_t activation, bool train, bool has_bias,
                          c10::List<bool> output_mask) {
  TORCH_CHECK(output_mask.size() == 3, "output_mask must have 3 entries");
  if (!g_cpp_kernels || !engine_dtypes({&grad_y, &x, &weight}) || (z.defined() && z.scalar_type() != at::kFloat)) {
    py::gil_scoped_acquire gil;
    py::list mask;
    for (size_t i = 0; i < 3; ++i) mask.append(static_cast<bool>(output_mask.get(i)));
    return three_of((*g_py_linear_backward)(grad_y, x, weight, z, p, state, activation, train, has_bias, mask));
  }
  const auto [seed, offset] = read_state(state);
  const bool want[3] = {output_mask.get(0), output_mask.get(1), output_mask.get(2) && has_bias};
  auto [gx, gw, gb] = run_backward(grad_y, x, weight, z, p, seed, offset, activation, train, want);
  // (the schema's outputs are tensors: an empty one for a gradient not asked for)
  const auto or_empty = [](const at::Tensor& g, const at::Tensor& like) {
    return g.defined() ? g : at::empty({0}, like.options());
  };
  return {or_empty(gx, x), or_empty(gw, weight), or_empty(gb, weight)};
}

// The op's autograd kernel: where no gradient is wanted and the CPU kernel is all the
// dispatcher would reach below autograd (compiled graphs run so, and no-grad calls), the
// C++ CPU kernel without a hop into Python; everything else (a graph to record, fake
// tensors, modes, subclasses) to the Python autograd kernel (_torch_ops._Op.register_autograd)
// with the same key set.
py::object* g_py_linear_autograd = nullptr;

Three linear_autograd(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, double p, const std::optional<at::Tensor>& state,
                      int64_t activation, bool train) {
  const bool wants_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()) ||
                           (state.has_value() && state->requires_grad()));
  if (g_cpp_kernels && !wants_grad && (ks & c10::after_autograd_keyset).highestPriorityTypeId() == c10::DispatchKey::CPU) {
    at::AutoDispatchBelowADInplaceOrView below;
    return linear_cpu(x, weight, bias, p, state, activation, train);
  }
  py::gil_scoped_acquire gil;
  return three_of((*g_py_linear_autograd)(py::cast(ks), x, weight, bias.has_value() ? py::cast(*bias) : py::none(), p,
                                          state.has_value() ? py::cast(*state) : py::none(), activation, train));
}

void init(py::capsule engine, py::object composite, py::object py_linear, py::object py_linear_backward,
          py::object py_linear_autograd) {
  const char* name = engine.name();
  TORCH_CHECK(name && std::string(name) == FASTDROPOUT_ENGINE_CAPSULE, "not fastdropout's engine capsule");
  const auto* e = static_cast<const fastdropout_engine_v1*>(engine.get_pointer());
  TORCH_CHECK(e && e->abi_version == FASTDROPOUT_ENGINE_ABI_VERSION && e->struct_size >= sizeof(fastdropout_engine_v1),
              "fastdropout's engine interface does not match this build of its torch ops");
  g_engine = e;
  g_composite = new py::object(std::move(composite));
  g_py_linear = new py::object(std::move(py_linear));
  g_py_linear_backward = new py::object(std::move(py_linear_backward));
  g_py_linear_autograd = new py::object(std::move(py_linear_autograd));
  // the Python kernel takes torch._C.DispatchKeySet: this build must share torch's pybind11 types
  TORCH_CHECK(py::isinstance(py::cast(c10::DispatchKeySet(c10::DispatchKey::CPU)),
                             py::module_::import("torch._C").attr("DispatchKeySet")),
              "fastdropout's torch layer: DispatchKeySet does not reach Python as torch's type");
  if (!g_impls) {  // (kept for the process: the registration lasts as long as this object)
    g_impls = new torch::Library(torch::Library::IMPL, "fastdropout", c10::DispatchKey::CPU, __FILE__, __LINE__);
    g_impls->impl("dropout_linear", TORCH_FN(linear_cpu));
    g_impls->impl("dropout_linear_backward", TORCH_FN(linear_backward_cpu));
    g_autograd = new torch::Library(torch::Library::IMPL, "fastdropout", c10::DispatchKey::Autograd, __FILE__, __LINE__);
    g_autograd->impl("dropout_linear", TORCH_FN(linear_autograd));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("init", &init, py::arg("engine"), py::arg("composite"), py::arg("py_linear"), py::arg("py_linear_backward"),
        py::arg("py_linear_autograd"),
        "Bind to _core's engine capsule, the Python backward used under create_graph and the Python CPU kernels\n"
        "of the registered ops (for other dtypes); register the C++ CPU kernels of those ops.");
  m.def("dropout_linear", &dropout_linear, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("p"),
        py::arg("seed"), py::arg("offset"), py::arg("activation"), py::arg("train"),
        "act(dropout(x) @ weight.T + bias) with autograd; arguments already checked by fastdropout.torch.");
  m.def("dropout", &dropout, py::arg("x"), py::arg("p"), py::arg("seed"), py::arg("offset"),
        "Inverted dropout of a C-contiguous float32, bfloat16 or float16 tensor with autograd; arguments\n"
        "already checked by fastdropout.torch.");
  m.def("_set_cpp_kernels", [](bool on) { g_cpp_kernels = on; }, py::arg("on"),
        "For tests: the registered ops' C++ CPU kernels (True) or the Python ones (False) for every dtype.");
  m.def("_last_operands", [] {
    return py::make_tuple(reinterpret_cast<uintptr_t>(g_last_operands[0]), reinterpret_cast<uintptr_t>(g_last_operands[1]),
                          reinterpret_cast<uintptr_t>(g_last_operands[2]));
  }, "For tests: the data addresses of x, weight and bias the last forward gave the engine (0: none).");
  m.def("_last_wanted", [] { return py::make_tuple(g_last_wanted[0], g_last_wanted[1], g_last_wanted[2]); },
        "For tests: which of (grad_x, grad_weight, grad_bias) the last fused backward computed.");
}
