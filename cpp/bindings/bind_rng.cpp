// Philox, masks and elementwise dropout.
#include "common.hpp"
#include "ops.hpp"

namespace fastdropout {
namespace bind {

namespace {

py::array_t<uint32_t> philox4x32(const py::array& counters, const py::array& key, int rounds) {
  require<uint32_t>(counters, "counters");
  require<uint32_t>(key, "key");
  if (counters.ndim() != 2 || counters.shape(1) != 4)
    throw py::value_error("counters: expected shape (n, 4), got " + shape_str(counters));
  require_shape(key, "key", {2});
  if (rounds < 0 || rounds > 64)
    throw py::value_error("rounds must be in [0, 64], got " + std::to_string(rounds));
  const int64_t n = counters.shape(0);
  py::array_t<uint32_t> out({static_cast<py::ssize_t>(n), py::ssize_t{4}});
  const auto* c = static_cast<const uint32_t*>(counters.data());
  const auto* k = static_cast<const uint32_t*>(key.data());
  uint32_t* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    ops::philox(c, o, n, PhiloxKey{k[0], k[1]}, rounds);
  }
  return out;
}

py::array_t<uint32_t> random_words(int64_t n, uint64_t seed, uint64_t offset) {
  if (n < 0) throw py::value_error("n must be >= 0, got " + std::to_string(n));
  py::array_t<uint32_t> out(static_cast<py::ssize_t>(n));
  uint32_t* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    ops::random_words(o, n, seed, offset);
  }
  return out;
}

void mask(py::array out, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold,
          bool packed) {
  if (n < 0) throw py::value_error("n must be >= 0, got " + std::to_string(n));
  require_threshold(threshold);
  if (!(out.flags() & py::array::c_style) || !out.writeable())
    throw py::value_error("out: expected a writeable C-contiguous array");
  if (out.itemsize() != 1 || (out.dtype().kind() != 'u' && out.dtype().kind() != 'b'))
    throw py::type_error("out: expected dtype uint8 or bool, got " + std::string(py::str(out.dtype())));
  const int64_t need = packed ? (n + 7) / 8 : n;
  if (out.size() != need)
    throw py::value_error("out: expected " + std::to_string(need) + " bytes, got " +
                          std::to_string(out.size()));
  auto* o = static_cast<uint8_t*>(out.mutable_data());
  py::gil_scoped_release nogil;
  if (packed)
    ops::mask_packed(o, n, seed, offset, threshold);
  else
    ops::mask_bool(o, n, seed, offset, threshold);
}

/// A writeable C-contiguous `out` of dtype T with as many elements as `x`.
template <class T>
void require_out_like(const py::array& x, const py::array& out) {
  require<T>(out, "out", true);
  if (out.size() != x.size())
    throw py::value_error("out: expected " + std::to_string(x.size()) + " elements, got " +
                          std::to_string(out.size()));
}

template <class T>
void dropout_typed(const py::array& x, py::array out, uint64_t seed, uint64_t offset,
                   uint64_t threshold, double scale) {
  require_out_like<T>(x, out);
  const auto* xp = static_cast<const T*>(x.data());
  auto* yp = static_cast<T*>(out.mutable_data());
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  ops::dropout(xp, yp, n, seed, offset, threshold, static_cast<T>(scale));
}

void dropout(const py::array& x, py::array out, uint64_t seed, uint64_t offset,
             uint64_t threshold, double scale) {
  require_threshold(threshold);
  if (x.dtype().equal(py::dtype::of<float>())) {
    require<float>(x, "x");
    dropout_typed<float>(x, out, seed, offset, threshold, scale);
  } else if (x.dtype().equal(py::dtype::of<double>())) {
    require<double>(x, "x");
    dropout_typed<double>(x, out, seed, offset, threshold, scale);
  } else {
    throw py::type_error("x: expected dtype float32 or float64, got " + std::string(py::str(x.dtype())));
  }
}

void dropout_h16(const py::array& x, py::array out, uint64_t seed, uint64_t offset, uint64_t threshold,
                 double scale, bool bf16) {
  require_threshold(threshold);
  require<uint16_t>(x, "x");
  require_out_like<uint16_t>(x, out);
  const auto* xp = static_cast<const uint16_t*>(x.data());
  auto* yp = static_cast<uint16_t*>(out.mutable_data());
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  ops::dropout_h16(xp, yp, n, seed, offset, threshold, static_cast<float>(scale), bf16);
}

}  // namespace

void register_rng(py::module_& m) {
  m.def("philox4x32", &philox4x32, py::arg("counters"), py::arg("key"), py::arg("rounds") = 10,
        "Philox4x32 of each row of a uint32 (n, 4) counter array under a uint32 (2,) key.");
  m.def("random_words", &random_words, py::arg("n"), py::arg("seed"), py::arg("offset") = 0,
        "The random words u_i of elements 0 .. n-1 (SPEC section 1).");
  m.def("mask", &mask, py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("packed"),
        "Write the keep mask of n elements into out (bytes, or packed bits).");
  m.def("dropout", &dropout, py::arg("x"), py::arg("out"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("scale"),
        "out = keep ? x * scale : 0 over C-contiguous arrays; out may be x.");
  m.def("dropout_h16", &dropout_h16, py::arg("x"), py::arg("out"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("scale"), py::arg("bf16"),
        "Dropout of float16 (bf16=False) or bfloat16 bits held in C-contiguous uint16 arrays: "
        "x * scale in float32, rounded once to the format.");
}

}  // namespace bind
}  // namespace fastdropout
