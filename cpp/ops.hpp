// The operations, threaded with OpenMP over the active backend's kernels.
// Inputs are already validated; arrays are C-contiguous.  Every result is
// bit-identical for any thread count: work is split only where no reduction
// crosses the split.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels.hpp"

namespace fastdropout {
namespace ops {

void philox(const uint32_t* ctr, uint32_t* out, int64_t n, PhiloxKey key, int rounds);
void random_words(uint32_t* out, int64_t n, uint64_t seed, uint64_t offset);
void mask_packed(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold);
void mask_bool(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold);
void dropout(const float* x, float* y, int64_t n, uint64_t seed, uint64_t offset,
             uint64_t threshold, float scale);
void dropout(const double* x, double* y, int64_t n, uint64_t seed, uint64_t offset,
             uint64_t threshold, double scale);

/// Dropout of float16 (bf16 false) or bfloat16 (bf16 true) values stored as uint16.
void dropout_h16(const uint16_t* x, uint16_t* y, int64_t n, uint64_t seed, uint64_t offset,
                 uint64_t threshold, float scale, bool bf16);

MaskSpec make_mask(bool enabled, uint64_t seed, uint64_t offset, uint64_t threshold, float scale);

/// y (M x N) = act(dropout(x) @ w.T + bias); z (optional) = the pre-activation.
struct DenseForward {
  const float* x = nullptr;  // M x K
  const float* w = nullptr;  // N x K
  const float* bias = nullptr;  // N, optional
  float* y = nullptr;
  float* z = nullptr;
  int64_t M = 0, N = 0, K = 0;
  Activation act = Activation::none;
  MaskSpec mask;
  MaskSpec weight_mask;  ///< DropConnect: the mask on w (w's flat index), applied while packing
  const uint16_t* xh = nullptr;  ///< bfloat16 x (instead of x)
  const uint16_t* wh = nullptr;  ///< bfloat16 w (instead of w)
};
void dense_forward(const DenseForward& a);

/// Gradients of DenseForward given dy (M x N); each output is optional.
struct DenseBackward {
  const float* dy = nullptr;  // M x N
  const float* x = nullptr;   // M x K
  const float* w = nullptr;   // N x K
  const float* z = nullptr;   // M x N, needed when act != none
  float* grad_x = nullptr;    // M x K
  float* grad_w = nullptr;    // N x K
  float* grad_b = nullptr;    // N
  int64_t M = 0, N = 0, K = 0;
  Activation act = Activation::none;
  MaskSpec mask;
  MaskSpec weight_mask;  ///< DropConnect
  const uint16_t *dyh = nullptr, *xh = nullptr, *wh = nullptr;  ///< bfloat16 operands (instead)
};
void dense_backward(const DenseBackward& a);

/// Attention forward (out, lse) and backward (grad_q, grad_k, grad_v) of the contract's
/// section 7; see AttentionProblem.
void attention_forward(const AttentionProblem& a);
void attention_backward(const AttentionProblem& a);

/// The family's elementwise op (ElemOp) with keep bits from the stream: element i has
/// word index offset + i.
void family(const float* x, float* y, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold, const ElemOp& op);
void family(const double* x, double* y, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold, const ElemOp& op);
/// The same with the mask drawn over a broadcast noise array (the contract's broadcast
/// masks): x's shape collapsed into groups of dimensions, outermost first, `sizes[g]`
/// elements each, `noise[g]` true where the noise array has x's extent (false: 1).
void family_noise(const float* x, float* y, const std::vector<int64_t>& sizes, const std::vector<char>& noise,
                  uint64_t seed, uint64_t offset, uint64_t threshold, const ElemOp& op);
void family_noise(const double* x, double* y, const std::vector<int64_t>& sizes, const std::vector<char>& noise,
                  uint64_t seed, uint64_t offset, uint64_t threshold, const ElemOp& op);

/// Gaussian dropout y = x * (1 + sigma * z) (the contract's Gaussian section); y may be x.
void gaussian(const float* x, float* y, int64_t n, uint64_t seed, uint64_t offset, float sigma);
void gaussian(const double* x, double* y, int64_t n, uint64_t seed, uint64_t offset, double sigma);
/// The float32 Box-Muller deviates of given word pairs (Kernels::normal_pairs_f32), one thread.
void normal_pairs(const uint32_t* w, float* z, int64_t pairs);

/// Dropout + residual + LayerNorm/RMSNorm (AddNormProblem) forward, and backward: grad_x,
/// grad_residual (each optional) and, when given, grad_weight and grad_bias (D doubles,
/// summed over the rows in a fixed order).
void add_norm_forward(const AddNormProblem& a, bool f64);
void add_norm_backward(const AddNormProblem& a, bool f64, double* grad_weight, double* grad_bias);

/// A general GEMM problem on the active backend, split over threads.
void gemm(const GemmProblem& g);

/// What the parallel regions have seen of other libraries' threads on our cores (see
/// ops.cpp, Neighbours): whether adapting is on, how long small problems still run on
/// one thread, the core time a thread lost that started it, the measured one-thread CPU
/// time per unit of work (elementwise: 65536 elements; GEMM and attention: 2^20 FLOPs).
struct NeighbourState {
  bool adapting = false;
  int64_t one_thread_ns_left = 0, lost_ns = 0, backoff_ns = 0;
  int64_t unit_ns_elements = 0, unit_ns_flops = 0;
};
NeighbourState neighbour_state();
/// For tests: records a neighbour as a region that saw a thread lose `lost_ns` would
/// (0: forgets what was seen, as if no neighbour had been).
void note_neighbour(int64_t lost_ns);
/// For tests: the threads a GEMM of `flops` floating-point operations would get now.
int gemm_threads(int64_t flops);

}  // namespace ops
}  // namespace fastdropout
