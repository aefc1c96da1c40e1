// The dropout family: broadcast masks, alpha dropout, DropConnect, dropout + residual + norm.
#include <cmath>
#include <vector>

#include "common.hpp"
#include "ops.hpp"

namespace fastdropout {
namespace bind {

namespace {

bool is_f64(const py::array& x, const char* name) {
  if (x.dtype().equal(py::dtype::of<float>())) return false;
  if (x.dtype().equal(py::dtype::of<double>())) return true;
  throw py::type_error(std::string(name) + ": expected dtype float32 or float64, got " + std::string(py::str(x.dtype())));
}

/// x and y: C-contiguous arrays of one float dtype and one size (y writable; it may be x).
bool elementwise_pair(const py::array& x, const py::array& y) {
  const bool f64 = is_f64(x, "x");
  if (f64) {
    require<double>(x, "x");
    require<double>(y, "out", true);
  } else {
    require<float>(x, "x");
    require<float>(y, "out", true);
  }
  if (x.size() != y.size()) throw py::value_error("out: expected as many elements as x");
  return f64;
}

ElemOp make_op(double a, double b_keep, double b_drop, bool affine) {
  ElemOp op;
  op.a = a;
  op.b_keep = b_keep;
  op.b_drop = b_drop;
  op.affine = affine;
  return op;
}

void family(const py::array& x, py::array y, uint64_t seed, uint64_t offset, uint64_t threshold, double a,
            double b_keep, double b_drop, bool affine) {
  const bool f64 = elementwise_pair(x, y);
  require_threshold(threshold);
  const ElemOp op = make_op(a, b_keep, b_drop, affine);
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  if (f64)
    ops::family(static_cast<const double*>(x.data()), static_cast<double*>(y.mutable_data()), n, seed, offset,
                threshold, op);
  else
    ops::family(static_cast<const float*>(x.data()), static_cast<float*>(y.mutable_data()), n, seed, offset,
                threshold, op);
}

void family_noise(const py::array& x, py::array y, const std::vector<int64_t>& sizes, const std::vector<bool>& noise,
                  uint64_t seed, uint64_t offset, uint64_t threshold, double a, double b_keep, double b_drop,
                  bool affine) {
  const bool f64 = elementwise_pair(x, y);
  require_threshold(threshold);
  if (sizes.size() != noise.size()) throw py::value_error("sizes and noise must have one entry per group");
  int64_t total = 1;
  for (int64_t s : sizes) {
    if (s < 0) throw py::value_error("sizes must be >= 0");
    total *= s;
  }
  if (total != static_cast<int64_t>(x.size())) throw py::value_error("the group sizes must multiply to x's size");
  const std::vector<char> flags(noise.begin(), noise.end());
  const ElemOp op = make_op(a, b_keep, b_drop, affine);
  py::gil_scoped_release nogil;
  if (f64)
    ops::family_noise(static_cast<const double*>(x.data()), static_cast<double*>(y.mutable_data()), sizes, flags,
                      seed, offset, threshold, op);
  else
    ops::family_noise(static_cast<const float*>(x.data()), static_cast<float*>(y.mutable_data()), sizes, flags,
                      seed, offset, threshold, op);
}

void gaussian(const py::array& x, py::array y, uint64_t seed, uint64_t offset, double sigma) {
  const bool f64 = elementwise_pair(x, y);
  if (!(sigma >= 0.0) || std::isinf(sigma)) throw py::value_error("sigma must be finite and >= 0");
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  if (f64)
    ops::gaussian(static_cast<const double*>(x.data()), static_cast<double*>(y.mutable_data()), n, seed, offset, sigma);
  else
    ops::gaussian(static_cast<const float*>(x.data()), static_cast<float*>(y.mutable_data()), n, seed, offset,
                  static_cast<float>(sigma));
}

py::array_t<float> normal_pairs(const py::array& words) {
  require<uint32_t>(words, "words");
  if (words.ndim() != 1 || words.size() % 2 != 0)
    throw py::value_error("words: expected a 1-D array of an even number of words");
  py::array_t<float> z(words.size());
  const int64_t pairs = words.size() / 2;
  const auto* w = static_cast<const uint32_t*>(words.data());
  float* out = z.mutable_data();
  py::gil_scoped_release nogil;
  ops::normal_pairs(w, out, pairs);
  return z;
}

/// A (rows, D) array of the problem's dtype (optional where `o` may be None).
const void* rows_in(const py::object& o, const char* name, bool f64, py::ssize_t rows, py::ssize_t D,
                    bool writable = false) {
  if (o.is_none()) return nullptr;
  py::array a = o.cast<py::array>();
  if (f64)
    require<double>(a, name, writable);
  else
    require<float>(a, name, writable);
  if (rows >= 0)
    require_shape(a, name, {rows, D});
  else
    require_shape(a, name, {D});
  return a.data();
}

AddNormProblem add_norm_problem(const py::array& x, const py::array& residual, const py::object& weight,
                                const py::object& bias, bool masked, uint64_t seed, uint64_t offset,
                                uint64_t threshold, double keep_scale, bool rms, double eps, bool& f64) {
  f64 = is_f64(x, "x");
  if (x.ndim() != 2) throw py::value_error("x must be 2-D (rows, D) here");
  AddNormProblem a;
  a.rows = x.shape(0);
  a.D = x.shape(1);
  a.x = rows_in(x, "x", f64, a.rows, a.D);
  a.residual = rows_in(residual, "residual", f64, a.rows, a.D);
  a.weight = rows_in(weight, "weight", f64, -1, a.D);
  a.bias = rows_in(bias, "bias", f64, -1, a.D);
  require_threshold(threshold);
  a.mask = ops::make_mask(masked, seed, offset, threshold, static_cast<float>(keep_scale));
  a.mask.enabled = masked;
  a.keep_scale = keep_scale;
  a.rms = rms;
  a.eps = eps;
  return a;
}

void add_norm_forward(const py::array& x, const py::array& residual, const py::object& weight, const py::object& bias,
                      const py::array& y, const py::object& sum, bool masked, uint64_t seed, uint64_t offset,
                      uint64_t threshold, double keep_scale, bool rms, double eps) {
  bool f64 = false;
  AddNormProblem a = add_norm_problem(x, residual, weight, bias, masked, seed, offset, threshold, keep_scale, rms, eps, f64);
  a.y = const_cast<void*>(rows_in(y, "out", f64, a.rows, a.D, true));
  a.sum = const_cast<void*>(rows_in(sum, "sum", f64, a.rows, a.D, true));
  py::gil_scoped_release nogil;
  ops::add_norm_forward(a, f64);
}

void add_norm_backward(const py::array& grad_out, const py::array& x, const py::array& residual,
                       const py::object& weight, const py::object& grad_x, const py::object& grad_residual,
                       const py::object& grad_weight, const py::object& grad_bias, bool masked, uint64_t seed,
                       uint64_t offset, uint64_t threshold, double keep_scale, bool rms, double eps) {
  bool f64 = false;
  AddNormProblem a = add_norm_problem(x, residual, weight, py::none(), masked, seed, offset, threshold, keep_scale,
                                      rms, eps, f64);
  a.grad_out = rows_in(grad_out, "grad_out", f64, a.rows, a.D);
  a.grad_x = const_cast<void*>(rows_in(grad_x, "grad_x", f64, a.rows, a.D, true));
  a.grad_residual = const_cast<void*>(rows_in(grad_residual, "grad_residual", f64, a.rows, a.D, true));
  auto sums = [&a](const py::object& o, const char* name) -> double* {
    if (o.is_none()) return nullptr;
    py::array s = o.cast<py::array>();
    require<double>(s, name, true);
    require_shape(s, name, {a.D});
    return static_cast<double*>(s.mutable_data());
  };
  double* gw = sums(grad_weight, "grad_weight");
  double* gb = sums(grad_bias, "grad_bias");
  py::gil_scoped_release nogil;
  ops::add_norm_backward(a, f64, gw, gb);
}

}  // namespace

void register_family(py::module_& m) {
  m.def("family", &family, py::arg("x"), py::arg("out"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
        py::arg("a"), py::arg("b_keep"), py::arg("b_drop"), py::arg("affine"),
        "out = keep ? x * a (+ b_keep) : (b_drop or +0), element i with word offset + i.");
  m.def("family_noise", &family_noise, py::arg("x"), py::arg("out"), py::arg("sizes"), py::arg("noise"),
        py::arg("seed"), py::arg("offset"), py::arg("threshold"), py::arg("a"), py::arg("b_keep"), py::arg("b_drop"),
        py::arg("affine"), "The same with the mask drawn over a broadcast noise array (collapsed groups).");
  m.def("gaussian", &gaussian, py::arg("x"), py::arg("out"), py::arg("seed"), py::arg("offset"), py::arg("sigma"),
        "out = x * (1 + sigma * z), z the Box-Muller deviate of element i's word pair (offset + i).");
  m.def("normal_pairs", &normal_pairs, py::arg("words"),
        "The float32 Box-Muller deviates (r cos theta, r sin theta) of word pairs, as Gaussian dropout draws them.");
  m.def("add_norm_forward", &add_norm_forward, py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"),
        py::arg("out"), py::arg("sum"), py::arg("masked"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
        py::arg("keep_scale"), py::arg("rms"), py::arg("eps"), "norm(residual + dropout(x)) over rows.");
  m.def("add_norm_backward", &add_norm_backward, py::arg("grad_out"), py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("grad_x"), py::arg("grad_residual"), py::arg("grad_weight"), py::arg("grad_bias"),
        py::arg("masked"), py::arg("seed"), py::arg("offset"), py::arg("threshold"), py::arg("keep_scale"),
        py::arg("rms"), py::arg("eps"), "Gradients of add_norm_forward (grad_weight, grad_bias in float64).");
}

}  // namespace bind
}  // namespace fastdropout
