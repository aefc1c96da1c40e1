/* The engine's C interface for other native modules of the package (the PyTorch ops of
 * cpp/torch/torch_ops.cpp, built against the installed torch at run time).  _core exports
 * one fastdropout_engine_v1 in a capsule named FASTDROPOUT_ENGINE_CAPSULE; the caller checks
 * abi_version and struct_size before using a field.  Plain C types only, so that the two
 * modules may be built by different compilers and C++ runtimes; no exception crosses it.
 * Every array is C-contiguous, float32 unless said otherwise; the arguments are trusted (the
 * Python layer checked them). */
#ifndef FASTDROPOUT_ENGINE_ABI_H
#define FASTDROPOUT_ENGINE_ABI_H

#include <stddef.h>
#include <stdint.h>

#define FASTDROPOUT_ENGINE_ABI_VERSION 2
#define FASTDROPOUT_ENGINE_CAPSULE "fastdropout._core.engine_v1"

#ifdef __cplusplus
extern "C" {
#endif

/* One fused dropout -> dense layer: y (M x N) = act(dropout(x) @ w.T + bias), z the
 * pre-activation (optional), the mask over x from the Philox stream (seed, offset) with
 * p's threshold round(p * 2**32) and scale 1 / (1 - p) (the contract); its gradients from
 * dy.  activation: 0 none, 1 ReLU, 2 GELU (erf).  masked 0: no dropout (evaluation, p = 0). */
typedef struct fastdropout_linear_args {
  const float* x;    /* M x K */
  const float* w;    /* N x K */
  const float* bias; /* N, or NULL */
  const float* dy;   /* M x N (backward) */
  const float* z;    /* M x N: backward's pre-activation (ReLU: its output will do), or NULL */
  float* y;          /* M x N (forward) */
  float* z_out;      /* M x N (forward), or NULL */
  float* grad_x;     /* M x K (backward), or NULL */
  float* grad_w;     /* N x K (backward), or NULL */
  float* grad_b;     /* N (backward), or NULL */
  int64_t M, N, K;
  int32_t activation;
  int32_t masked;
  uint64_t seed, offset;
  double p;
  /* (version 2) bfloat16 operands as their 16-bit patterns, each instead of its float32
   * array above (which is then NULL): x and w (forward and backward), dy (backward).  They are
   * widened exactly while packed; the outputs stay float32. */
  const uint16_t* xh;
  const uint16_t* wh;
  const uint16_t* dyh;
} fastdropout_linear_args;

typedef struct fastdropout_engine_v1 {
  uint32_t abi_version; /* FASTDROPOUT_ENGINE_ABI_VERSION */
  uint32_t struct_size; /* sizeof(fastdropout_engine_v1) */
  /* Each returns 0, or 1 with a NUL-terminated message in msg (at most msg_len bytes). */
  int (*linear_forward)(const fastdropout_linear_args* a, char* msg, size_t msg_len);
  int (*linear_backward)(const fastdropout_linear_args* a, char* msg, size_t msg_len);
  /* Inverted dropout of n float32 elements in index order: y = x * scale where kept, 0 where
   * dropped, the mask from (seed, offset) with p's threshold and scale as above; y may be x.
   * (Appended: a caller that uses it asks for a struct_size that includes it.) */
  int (*dropout)(const float* x, float* y, int64_t n, uint64_t seed, uint64_t offset, double p, char* msg,
                 size_t msg_len);
  /* (Version 2) The same for n bfloat16 (bf16 != 0) or float16 (bf16 == 0) elements as their
   * 16-bit patterns: each computed in float32 and rounded once to the nearest, ties to even. */
  int (*dropout_h16)(const uint16_t* x, uint16_t* y, int64_t n, int32_t bf16, uint64_t seed, uint64_t offset,
                     double p, char* msg, size_t msg_len);
} fastdropout_engine_v1;

#ifdef __cplusplus
}
#endif

#endif
