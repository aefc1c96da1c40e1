// The fused dropout -> dense layer, forward and backward.
#include "common.hpp"
#include "ops.hpp"

namespace fastdropout {
namespace bind {

namespace {

/// A GEMM operand: float32, or bfloat16 given as its uint16 bits.
struct Operand {
  const float* p = nullptr;
  const uint16_t* h = nullptr;
};

Operand operand(const py::array& a, const char* name) {
  Operand o;
  if (a.dtype().equal(py::dtype::of<uint16_t>())) {
    require<uint16_t>(a, name);
    o.h = static_cast<const uint16_t*>(a.data());
  } else {
    require<float>(a, name);
    o.p = static_cast<const float*>(a.data());
  }
  return o;
}

const float* optional_in(const py::object& o, const char* name, std::initializer_list<py::ssize_t> shape) {
  if (o.is_none()) return nullptr;
  py::array a = o.cast<py::array>();
  require<float>(a, name);
  require_shape(a, name, shape);
  return static_cast<const float*>(a.data());
}

float* optional_out(const py::object& o, const char* name, std::initializer_list<py::ssize_t> shape) {
  if (o.is_none()) return nullptr;
  py::array a = o.cast<py::array>();
  require<float>(a, name, true);
  require_shape(a, name, shape);
  return static_cast<float*>(a.mutable_data());
}

void dense_forward(const py::array& x, const py::array& w, const py::object& bias,
                   py::array y, const py::object& z, int act, bool masked, uint64_t seed,
                   uint64_t offset, uint64_t threshold, double scale, bool on_weight) {
  const Operand xo = operand(x, "x"), wo = operand(w, "weight");
  if (x.ndim() != 2) throw py::value_error("x: expected 2 dimensions, got shape " + shape_str(x));
  if (w.ndim() != 2) throw py::value_error("weight: expected 2 dimensions, got shape " + shape_str(w));
  const py::ssize_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
  if (w.shape(1) != K)
    throw py::value_error("weight: expected shape (out_features, " + std::to_string(K) + "), got " +
                          shape_str(w));
  require_threshold(threshold);
  ops::DenseForward a;
  a.x = xo.p;
  a.xh = xo.h;
  a.w = wo.p;
  a.wh = wo.h;
  a.bias = optional_in(bias, "bias", {N});
  require<float>(y, "out", true);
  require_shape(y, "out", {M, N});
  a.y = static_cast<float*>(y.mutable_data());
  a.z = optional_out(z, "preactivation", {M, N});
  a.M = M;
  a.N = N;
  a.K = K;
  a.act = to_activation(act);
  (on_weight ? a.weight_mask : a.mask) = ops::make_mask(masked, seed, offset, threshold, static_cast<float>(scale));
  py::gil_scoped_release nogil;
  ops::dense_forward(a);
}

void dense_backward(const py::array& dy, const py::array& x, const py::array& w,
                    const py::object& z, const py::object& grad_x, const py::object& grad_w,
                    const py::object& grad_b, int act, bool masked, uint64_t seed, uint64_t offset,
                    uint64_t threshold, double scale, bool on_weight) {
  const Operand dyo = operand(dy, "grad_out"), xo = operand(x, "x"), wo = operand(w, "weight");
  if (x.ndim() != 2 || w.ndim() != 2 || dy.ndim() != 2)
    throw py::value_error("grad_out, x and weight must be 2-D here");
  const py::ssize_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
  require_shape(w, "weight", {N, K});
  require_shape(dy, "grad_out", {M, N});
  require_threshold(threshold);
  ops::DenseBackward a;
  a.act = to_activation(act);
  a.dy = dyo.p;
  a.dyh = dyo.h;
  a.x = xo.p;
  a.xh = xo.h;
  a.w = wo.p;
  a.wh = wo.h;
  a.z = optional_in(z, "preactivation", {M, N});
  if (a.act != Activation::none && !a.z)
    throw py::value_error("preactivation is required when an activation is set");
  a.grad_x = optional_out(grad_x, "grad_x", {M, K});
  a.grad_w = optional_out(grad_w, "grad_weight", {N, K});
  a.grad_b = optional_out(grad_b, "grad_bias", {N});
  a.M = M;
  a.N = N;
  a.K = K;
  (on_weight ? a.weight_mask : a.mask) = ops::make_mask(masked, seed, offset, threshold, static_cast<float>(scale));
  py::gil_scoped_release nogil;
  ops::dense_backward(a);
}

}  // namespace

void register_dense(py::module_& m) {
  m.def("dense_forward", &dense_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("out"), py::arg("preactivation"), py::arg("activation"), py::arg("masked"),
        py::arg("seed"), py::arg("offset"), py::arg("threshold"), py::arg("scale"), py::arg("on_weight") = false,
        "out = act(dropout(x) @ weight.T + bias) for 2-D C-contiguous float32 arrays (x, weight: or\n"
        "bfloat16 as uint16 bits, widened while packed); with on_weight,\n"
        "act(x @ dropout(weight).T + bias) (DropConnect).");
  m.def("dense_backward", &dense_backward, py::arg("grad_out"), py::arg("x"), py::arg("weight"),
        py::arg("preactivation"), py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"),
        py::arg("activation"), py::arg("masked"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("scale"), py::arg("on_weight") = false,
        "Gradients of dense_forward; each grad_* output is optional (None).");
}

}  // namespace bind
}  // namespace fastdropout
