// The engine's C interface (engine_abi.h), exported by _core as a capsule.
#include "../engine_abi.h"

#include <cmath>
#include <cstdio>
#include <exception>
#include <limits>

#include "common.hpp"
#include "ops.hpp"

namespace fastdropout {
namespace bind {

namespace {

/// The contract's mask parameters of p: threshold round_half_even(p * 2**32) (the default
/// rounding mode's nearbyint) and scale 1 / (1 - p) in double, rounded once to float.
uint64_t threshold_of(double p) { return static_cast<uint64_t>(std::nearbyint(p * 4294967296.0)); }
float scale_of(double p) {
  return p == 1.0 ? std::numeric_limits<float>::infinity() : static_cast<float>(1.0 / (1.0 - p));
}

MaskSpec mask_of(const fastdropout_linear_args& a) {
  return ops::make_mask(a.masked != 0, a.seed, a.offset, threshold_of(a.p), scale_of(a.p));
}

int failed(const char* what, char* msg, size_t len) {
  if (msg && len) std::snprintf(msg, len, "%s", what);
  return 1;
}

/// Runs `body`, turning any exception into the interface's error return.
template <class Body>
int guarded(Body&& body, char* msg, size_t len) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    return failed(e.what(), msg, len);
  } catch (...) {
    return failed("fastdropout engine: unknown error", msg, len);
  }
}

bool bad(const fastdropout_linear_args* a) {
  return !a || a->M < 0 || a->N < 0 || a->K < 0 || a->activation < 0 || a->activation > 2 || !(a->p >= 0.0) ||
         a->p > 1.0;
}

int linear_forward(const fastdropout_linear_args* a, char* msg, size_t len) {
  if (bad(a) || !(a->x || a->xh) || !(a->w || a->wh) || !a->y)
    return failed("fastdropout engine: bad linear_forward arguments", msg, len);
  return guarded([a] {
    ops::DenseForward f;
    f.x = a->x;
    f.w = a->w;
    f.xh = a->xh;
    f.wh = a->wh;
    f.bias = a->bias;
    f.y = a->y;
    f.z = a->z_out;
    f.M = a->M;
    f.N = a->N;
    f.K = a->K;
    f.act = static_cast<Activation>(a->activation);
    f.mask = mask_of(*a);
    ops::dense_forward(f);
  }, msg, len);
}

int linear_backward(const fastdropout_linear_args* a, char* msg, size_t len) {
  if (bad(a) || !(a->x || a->xh) || !(a->w || a->wh) || !(a->dy || a->dyh) || (a->activation != 0 && !a->z))
    return failed("fastdropout engine: bad linear_backward arguments", msg, len);
  return guarded([a] {
    ops::DenseBackward b;
    b.dy = a->dy;
    b.x = a->x;
    b.w = a->w;
    b.dyh = a->dyh;
    b.xh = a->xh;
    b.wh = a->wh;
    b.z = a->z;
    b.grad_x = a->grad_x;
    b.grad_w = a->grad_w;
    b.grad_b = a->grad_b;
    b.M = a->M;
    b.N = a->N;
    b.K = a->K;
    b.act = static_cast<Activation>(a->activation);
    b.mask = mask_of(*a);
    ops::dense_backward(b);
  }, msg, len);
}

int dropout(const float* x, float* y, int64_t n, uint64_t seed, uint64_t offset, double p, char* msg, size_t len) {
  if (!x || !y || n < 0 || !(p >= 0.0) || p > 1.0) return failed("fastdropout engine: bad dropout arguments", msg, len);
  return guarded([=] { ops::dropout(x, y, n, seed, offset, threshold_of(p), scale_of(p)); }, msg, len);
}

int dropout_h16(const uint16_t* x, uint16_t* y, int64_t n, int32_t bf16, uint64_t seed, uint64_t offset, double p,
                char* msg, size_t len) {
  if (!x || !y || n < 0 || !(p >= 0.0) || p > 1.0)
    return failed("fastdropout engine: bad dropout_h16 arguments", msg, len);
  return guarded([=] { ops::dropout_h16(x, y, n, seed, offset, threshold_of(p), scale_of(p), bf16 != 0); }, msg, len);
}

const fastdropout_engine_v1 kEngine = {FASTDROPOUT_ENGINE_ABI_VERSION, sizeof(fastdropout_engine_v1),
                                       &linear_forward, &linear_backward, &dropout, &dropout_h16};

}  // namespace

void register_engine_abi(py::module_& m) {
  m.attr("_engine_abi") = py::capsule(static_cast<const void*>(&kEngine), FASTDROPOUT_ENGINE_CAPSULE);
}

}  // namespace bind
}  // namespace fastdropout
