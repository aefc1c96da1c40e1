// Shared argument checks for the bindings.  The Python layer validates user input
// with friendly messages first; these checks make the native module safe on its own.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "kernels.hpp"

namespace fastdropout {
namespace bind {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

/// A C-contiguous array of dtype T; `writable` also demands a writeable one.
template <class T>
void require(const py::array& a, const char* name, bool writable = false) {
  if (!a.dtype().equal(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array");
  if (reinterpret_cast<uintptr_t>(a.data()) % alignof(T) != 0)
    throw py::value_error(std::string(name) + ": expected an aligned array (copy it first)");
  if (writable && !a.writeable())
    throw py::value_error(std::string(name) + ": the array is read-only");
}

inline void require_shape(const py::array& a, const char* name, std::initializer_list<py::ssize_t> shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  py::ssize_t i = 0;
  std::string want = "(";
  for (auto s : shape) {
    ok = ok && a.shape(i) == s;
    want += (i ? ", " : "") + std::to_string(s);
    ++i;
  }
  want += shape.size() == 1 ? ",)" : ")";
  if (!ok)
    throw py::value_error(std::string(name) + ": expected shape " + want + ", got " + shape_str(a));
}

inline void require_threshold(uint64_t threshold) {
  if (threshold > kDropAll)
    throw py::value_error("threshold must be in [0, 2**32], got " + std::to_string(threshold));
}

inline Activation to_activation(int act) {
  if (act < 0 || act > 2)
    throw py::value_error("activation code must be 0 (none), 1 (relu) or 2 (gelu), got " +
                          std::to_string(act));
  return static_cast<Activation>(act);
}

void register_runtime(py::module_& m);
void register_rng(py::module_& m);
void register_dense(py::module_& m);
void register_attention(py::module_& m);
void register_family(py::module_& m);
void register_engine_abi(py::module_& m);

}  // namespace bind
}  // namespace fastdropout
