// A stand-in for fastdropout's dropout_linear registered with PyTorch in C++, for
// cpp_op_prototype.py: what the dispatcher route costs when the op's CPU kernel and its
// autograd are C++ (torch's C++ API) instead of Python (torch.library).  The "kernel" is a
// read of a 4 MB buffer (the real kernel's cache footprint at 64x784x512, without its
// arithmetic), timed here so that the caller can subtract it.  Not part of the package:
// built at run time by torch.utils.cpp_extension.load against the installed torch.
#include <torch/extension.h>
#include <torch/library.h>

#include <chrono>
#include <optional>
#include <tuple>
#include <vector>

namespace {

std::vector<float> g_stream(std::size_t{1} << 20, 1.0f);  // 4 MB
double g_spent = 0.0;                                       // seconds inside the stand-in
bool g_stream_on = false;
volatile float g_sink = 0.0f;

void stand_in() {
  const auto t0 = std::chrono::steady_clock::now();
  if (g_stream_on) {
    float acc[16] = {0.0f};
    for (std::size_t i = 0; i < g_stream.size(); i += 16)
      for (int j = 0; j < 16; ++j) acc[j] += g_stream[i + j];
    float s = 0.0f;
    for (float a : acc) s += a;
    g_sink = s;
  }
  g_spent += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The schema of fastdropout::dropout_linear: (y, z, state).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double p,
    const std::optional<at::Tensor>& state, int64_t activation, bool train) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shapes do not fit");
  (void)bias, (void)p, (void)activation, (void)train;
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  stand_in();
  at::Tensor out_state = state.has_value() ? state->clone() : at::zeros({2}, x.options().dtype(at::kLong));
  return {y, at::empty({0}, x.options()), out_state};
}

// A layer under autograd: a C++ autograd::Function around the CPU kernel (the backward is
// not the point here and returns no gradients).
class Layer : public torch::autograd::Function<Layer> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, double p) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor y = std::get<0>(dropout_linear_cpu(x, weight, bias, p, std::nullopt, 0, true));
    ctx->save_for_backward({x, weight});
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*, torch::autograd::variable_list) {
    return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor layer_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double p) {
  return Layer::apply(x, weight, bias, p);
}

}  // namespace

TORCH_LIBRARY(fdproto, m) {
  m.def("dropout_linear(Tensor x, Tensor weight, Tensor? bias, float p, Tensor? state, int activation, bool train)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("layer(Tensor x, Tensor weight, Tensor bias, float p) -> Tensor");
}
TORCH_LIBRARY_IMPL(fdproto, CPU, m) { m.impl("dropout_linear", &dropout_linear_cpu); }
TORCH_LIBRARY_IMPL(fdproto, Autograd, m) { m.impl("layer", &layer_autograd); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("take_spent", [] { const double s = g_spent; g_spent = 0.0; return s; });
  module.def("set_stream", [](bool on) { g_stream_on = on; });
}
