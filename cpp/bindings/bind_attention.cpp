// Attention with dropout on the probabilities: forward and backward.
#include <vector>

#include "common.hpp"
#include "ops.hpp"

namespace fastdropout {
namespace bind {

namespace {

/// A (count, rows, cols) float32 operand and the item offsets into it; every item
/// must lie inside the array.
const float* operand(const py::array& a, const char* name, py::ssize_t rows, py::ssize_t cols,
                     const py::array& offsets, py::ssize_t batch, std::vector<int64_t>& off) {
  require<float>(a, name);
  if (a.ndim() != 3 || a.shape(1) != rows || a.shape(2) != cols)
    throw py::value_error(std::string(name) + ": expected shape (n, " + std::to_string(rows) + ", " +
                          std::to_string(cols) + "), got " + shape_str(a));
  require<int64_t>(offsets, "offsets");
  if (offsets.ndim() != 1 || offsets.shape(0) != batch)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(batch) + " item offsets");
  const auto* o = static_cast<const int64_t*>(offsets.data());
  const int64_t size = static_cast<int64_t>(a.size()), item = rows * cols;
  off.assign(o, o + batch);
  for (int64_t v : off)
    if (v < 0 || v % (item > 0 ? item : 1) != 0 || v + item > size)
      throw py::value_error(std::string(name) + ": item offset " + std::to_string(v) + " outside the array");
  return static_cast<const float*>(a.data());
}

struct Offsets {
  std::vector<int64_t> q, k, v, bias;
};

AttentionProblem problem(const py::array& q, const py::array& k, const py::array& v,
                              const py::array& q_off, const py::array& k_off, const py::array& v_off,
                              const py::object& bias, const py::object& bias_off, int64_t bias_row_stride,
                              bool causal, double scale, bool masked, uint64_t seed, uint64_t offset,
                              uint64_t threshold, double keep_scale, Offsets& keep) {
  if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3)
    throw py::value_error("q, k and v must be 3-D (n, L, E) here");
  const py::ssize_t batch = q_off.ndim() == 1 ? q_off.shape(0) : -1;
  if (batch < 0) throw py::value_error("q offsets must be 1-D");
  AttentionProblem a;
  a.batch = batch;
  a.Lq = q.shape(1);
  a.E = q.shape(2);
  a.Lk = k.shape(1);
  a.Ev = v.shape(2);
  a.q = operand(q, "q", a.Lq, a.E, q_off, batch, keep.q);
  a.k = operand(k, "k", a.Lk, a.E, k_off, batch, keep.k);
  a.v = operand(v, "v", a.Lk, a.Ev, v_off, batch, keep.v);
  a.q_off = keep.q.data();
  a.k_off = keep.k.data();
  a.v_off = keep.v.data();
  if (!bias.is_none()) {
    py::array b = bias.cast<py::array>();
    py::array bo = bias_off.cast<py::array>();
    require<float>(b, "attn_mask");
    require<int64_t>(bo, "attn_mask offsets");
    if (bo.ndim() != 1 || bo.shape(0) != batch) throw py::value_error("attn_mask: one offset per item expected");
    if (bias_row_stride != 0 && bias_row_stride != a.Lk)
      throw py::value_error("attn_mask: the row stride must be 0 or Lk");
    const auto* o = static_cast<const int64_t*>(bo.data());
    keep.bias.assign(o, o + batch);
    const int64_t span = a.Lq > 0 ? (a.Lq - 1) * bias_row_stride + a.Lk : 0;  // no queries: nothing read
    for (int64_t v : keep.bias)
      if (v < 0 || v + span > static_cast<int64_t>(b.size()))
        throw py::value_error("attn_mask: item offset " + std::to_string(v) + " outside the array");
    a.bias = static_cast<const float*>(b.data());
    a.bias_off = keep.bias.data();
    a.bias_row_stride = bias_row_stride;
  }
  require_threshold(threshold);
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.mask = ops::make_mask(masked, seed, offset, threshold, static_cast<float>(keep_scale));
  return a;
}

void attention_forward(const py::array& q, const py::array& k, const py::array& v, const py::array& q_off,
                       const py::array& k_off, const py::array& v_off, const py::object& bias,
                       const py::object& bias_off, int64_t bias_row_stride, bool causal, double scale,
                       bool masked, uint64_t seed, uint64_t offset, uint64_t threshold, double keep_scale,
                       py::array out, py::array lse) {
  Offsets keep;
  AttentionProblem a = problem(q, k, v, q_off, k_off, v_off, bias, bias_off, bias_row_stride, causal,
                                    scale, masked, seed, offset, threshold, keep_scale, keep);
  require<float>(out, "out", true);
  require_shape(out, "out", {a.batch, a.Lq, a.Ev});
  require<float>(lse, "lse", true);
  require_shape(lse, "lse", {a.batch, a.Lq});
  a.out = static_cast<float*>(out.mutable_data());
  a.lse = static_cast<float*>(lse.mutable_data());
  py::gil_scoped_release nogil;
  ops::attention_forward(a);
}

void attention_backward(const py::array& grad_out, const py::array& q, const py::array& k, const py::array& v,
                        const py::array& out, const py::array& lse, const py::array& q_off,
                        const py::array& k_off, const py::array& v_off, const py::object& bias,
                        const py::object& bias_off, int64_t bias_row_stride, bool causal, double scale,
                        bool masked, uint64_t seed, uint64_t offset, uint64_t threshold, double keep_scale,
                        py::array grad_q, py::array grad_k, py::array grad_v) {
  Offsets keep;
  AttentionProblem a = problem(q, k, v, q_off, k_off, v_off, bias, bias_off, bias_row_stride, causal,
                                    scale, masked, seed, offset, threshold, keep_scale, keep);
  require<float>(grad_out, "grad_out");
  require_shape(grad_out, "grad_out", {a.batch, a.Lq, a.Ev});
  require<float>(out, "out");
  require_shape(out, "out", {a.batch, a.Lq, a.Ev});
  require<float>(lse, "lse");
  require_shape(lse, "lse", {a.batch, a.Lq});
  require<float>(grad_q, "grad_q", true);
  require_shape(grad_q, "grad_q", {a.batch, a.Lq, a.E});
  require<float>(grad_k, "grad_k", true);
  require_shape(grad_k, "grad_k", {a.batch, a.Lk, a.E});
  require<float>(grad_v, "grad_v", true);
  require_shape(grad_v, "grad_v", {a.batch, a.Lk, a.Ev});
  a.grad_out = static_cast<const float*>(grad_out.data());
  a.out = const_cast<float*>(static_cast<const float*>(out.data()));  // read only by the backward
  a.lse = const_cast<float*>(static_cast<const float*>(lse.data()));
  a.grad_q = static_cast<float*>(grad_q.mutable_data());
  a.grad_k = static_cast<float*>(grad_k.mutable_data());
  a.grad_v = static_cast<float*>(grad_v.mutable_data());
  py::gil_scoped_release nogil;
  ops::attention_backward(a);
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_offsets"),
        py::arg("k_offsets"), py::arg("v_offsets"), py::arg("bias"), py::arg("bias_offsets"),
        py::arg("bias_row_stride"), py::arg("causal"), py::arg("scale"), py::arg("masked"), py::arg("seed"),
        py::arg("offset"), py::arg("threshold"), py::arg("keep_scale"), py::arg("out"), py::arg("lse"),
        "Attention forward over items given by offsets into (n, L, E) float32 arrays.");
  m.def("attention_backward", &attention_backward, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("q_offsets"), py::arg("k_offsets"), py::arg("v_offsets"),
        py::arg("bias"), py::arg("bias_offsets"), py::arg("bias_row_stride"), py::arg("causal"), py::arg("scale"),
        py::arg("masked"), py::arg("seed"), py::arg("offset"), py::arg("threshold"), py::arg("keep_scale"),
        py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"),
        "Attention backward: grad_q, grad_k, grad_v per item (not summed over broadcast items).");
}

}  // namespace bind
}  // namespace fastdropout
