// The kernel table: what every instruction-set backend provides.  Plain C++,
// no Python, no SIMD types in the interface.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "philox.hpp"

namespace fastdropout {

static inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

enum class Activation : int { none = 0, relu = 1, gelu = 2 };

/// The dropout mask of a row-major matrix: element (r, c) of a matrix with
/// `cols` columns has random word index `offset + r * cols + c` (mod 2**64).
struct MaskSpec {
  bool enabled = false;
  PhiloxKey key{0, 0};
  uint64_t offset = 0;
  uint64_t threshold = 0;  ///< keep iff word >= threshold; 2**32 drops all
  float scale = 1.0f;
  /// The keep bits already drawn (optional): bit j of bits[j / 64] for element j of the
  /// matrix (word index offset + j), one spare zero word at the end.  The GEMM draws
  /// them once for a whole team when several threads pack the same masked operand.
  const uint64_t* bits = nullptr;
};

/// A C-contiguous float32 (or bfloat16) matrix as a GEMM operand source.  Values are read as
/// `p[r, c] * act'(z[r, c])` (when `z`), then masked and scaled (when `mask`).  With `h`
/// the values are bfloat16 (`h` instead of `p`), widened to float32 as they are packed; a
/// masked bfloat16 value is `x * s` in float32 rounded once to bfloat16 (the contract's
/// half-precision rule), so the product is that of the bfloat16 operands.
struct Mat {
  const float* p = nullptr;
  int64_t rows = 0, cols = 0;
  const float* z = nullptr;
  Activation zact = Activation::none;
  MaskSpec mask;
  const uint16_t* h = nullptr;
};

/// C (M x N, row-major, ld N) = op(A) @ op(B) followed by the epilogue.
/// op(A)(i, k) is a(i, k), or a(k, i) when a_trans; op(B)(k, n) is b(k, n), or
/// b(n, k) when b_trans.
struct GemmProblem {
  int64_t M = 0, N = 0, K = 0;
  Mat a, b;
  bool a_trans = false, b_trans = false;
  float* c = nullptr;
  // epilogue, in this order: + bias[n]; z_out = value; value = act(value); mask
  const float* bias = nullptr;
  float* z_out = nullptr;
  Activation act = Activation::none;
  MaskSpec out_mask;  ///< applied to C with C's own flat index
  /// Store C transposed: element (i, n) goes to c[n * M + i].  Only for problems
  /// that take the sparse path (see sparse_path) and have no epilogue.
  bool c_trans = false;
  /// Whether a sparse enough mask on op(A) may take the sparse path (the run-time
  /// choice of dispatch.hpp's sparse_path_enabled); either path gives the same bits.
  bool allow_sparse = false;
  /// Whether the backend's bfloat16 dot-product kernel may run (dispatch.hpp's
  /// bf16_dot_enabled, bfloat16 operands); it runs only on blocks where it gives the float32
  /// kernel's bits (see the backend's bf16_gemm_tile), so this too is a speed choice only.
  bool allow_bf16_dot = false;
};

/// Register and cache blocking of a backend's GEMM.
struct GemmBlocking {
  int64_t mr, nr, mc, kc, nc;
  bool sparse;  ///< whether the backend has the sparse path
  int64_t snr;  ///< its panel width (a multiple of nr dividing nc; nr where there is none)
  int64_t skc, snc;  ///< its depth and column blocking (kc, nc where there is none)
  int64_t smc;       ///< its row blocking (mc where there is none)
  int64_t spr;       ///< rows of sums it keeps aside (its `part`; 0 where there is none)
  /// Masks with at least this threshold (p * 2**32) take it, in the forward form and in
  /// grad_weight's (above kDropAll: never); measured per backend, see its isa header.
  uint64_t sparse_min, sparse_grad_min;
  int64_t sparse_min_n;  ///< the forward form from this many output columns (measured)
  int64_t sparse_split;  ///< a thread's share of the columns on it is a multiple of this
  int64_t direct_rows;  ///< ranges of at most this many rows take the direct path (0: none)
  bool bf16_dot;        ///< whether the backend has the bfloat16 dot-product kernel
};

/// Floats of the row buffer that the sparse path's build_rows uses for the segments
/// it transposes.
constexpr int64_t kSparseSegment = 1024;
/// Rows of sums the AVX-512 sparse path keeps aside (its `part`: edge tiles, transposed C).
constexpr int64_t kSparsePartRows = 64;

/// Whether a mask is sparse enough for the backend's sparse path: in the forward form
/// (op(A) is the masked input), or in grad_weight's (its depth is the batch).
static inline bool sparse_mask(const MaskSpec& m, const GemmBlocking& b, bool grad_weight = false) {
  return b.sparse && m.enabled && m.threshold >= (grad_weight ? b.sparse_grad_min : b.sparse_min);
}

/// Whether gemm_tile computes `g` on the sparse path: not for a batch the direct path
/// serves (it packs no weight; the sparse path, like the dense one, packs all of it:
/// at 1x4096x4096 on avx2 the sparse path took 1.8x the direct path's time).
static inline bool sparse_path(const GemmProblem& g, const GemmBlocking& b) {
  return g.c_trans ||
         (g.allow_sparse && sparse_mask(g.a.mask, b) && g.N >= b.sparse_min_n && g.M > b.direct_rows);
}

/// Scaled dot-product attention with dropout on the probabilities (the contract's
/// section 7) over `batch` items: item b multiplies q_b (Lq x E), k_b (Lk x E) and
/// v_b (Lk x Ev), C-contiguous matrices at q + q_off[b], k + k_off[b], v + v_off[b]
/// (broadcast items share them).  out, lse, grad_out and the gradients are dense over
/// the batch: (batch, Lq, Ev), (batch, Lq), (batch, Lq, Ev), (batch, Lq|Lk, E|Ev).
struct AttentionProblem {
  int64_t batch = 0, Lq = 0, Lk = 0, E = 0, Ev = 0;
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  const int64_t *q_off = nullptr, *k_off = nullptr, *v_off = nullptr;
  /// Optional additive bias (a float mask, -inf where a bool mask is False): row i of
  /// item b is bias + bias_off[b] + i * bias_row_stride (0: one row for all queries).
  const float* bias = nullptr;
  const int64_t* bias_off = nullptr;
  int64_t bias_row_stride = 0;
  bool causal = false;  ///< query i sees keys j <= i
  float scale = 1.0f;   ///< multiplies q @ k^T
  /// Element (b, i, j) of P has random word index mask.offset + (b * Lq + i) * Lk + j.
  MaskSpec mask;
  float* out = nullptr;  ///< written by the forward, read by the backward
  float* lse = nullptr;  ///< log-sum-exp of each query row (-inf: every key masked)
  const float* grad_out = nullptr;
  float *grad_q = nullptr, *grad_k = nullptr, *grad_v = nullptr;
};

/// Tile sizes of the attention kernels for a backend's blocking: kAttnRows queries
/// (rounded up to whole micro-kernel rows) against kAttnCols keys.
constexpr int64_t kAttnRows = 64, kAttnCols = 128;
static_assert(kAttnCols % 64 == 0, "whole 64-bit words of keep bits per tile row");

/// One thread's attention scratch, in floats, each part on a 64-byte boundary.  Packed
/// operands (micro-kernel panels, zero-padded): kt = K^T and vt = V^T as B panels of
/// keys, kb and vb = K and V as B panels by key, qa and doa = Q and dO as A panels of
/// queries, qt and dot = Q^T and dO^T as A panels by query; the forward packs a query
/// tile of Q into qa.  Tiles: s and dp (scores and dP, rows x cols_ld), pa (P, or dS,
/// as A panels), pb and gb (dropout(P) and dS as B panels by query); accumulators o,
/// dkt and dvt (grad_k^T, grad_v^T of a key tile), dq; per row m, l, delta
/// (rowsum(dO * O)) and the keep bits.
struct AttnLayout {
  int64_t rows, cols, cols_ld;       // query tile, key tile, score row stride
  int64_t lkp, lqp, ep, evp, em, evm;  // Lk (to nr), Lq (to mr), E and Ev (to nr, to mr)
  int64_t kt, kb, vt, vb, qa, doa, qt, dot, s, dp, pa, pb, gb, o, dkt, dvt, dq, m, l, delta, bits;
  int64_t total;
};

static inline AttnLayout attention_layout(const GemmBlocking& b, const AttentionProblem& a, bool backward) {
  AttnLayout L;
  L.rows = round_up(kAttnRows, b.mr);
  L.cols = kAttnCols;
  L.cols_ld = kAttnCols + 16;
  L.lkp = round_up(a.Lk, b.nr);
  L.lqp = round_up(a.Lq, b.mr);
  L.ep = round_up(a.E, b.nr);
  L.evp = round_up(a.Ev, b.nr);
  L.em = round_up(a.E, b.mr);
  L.evm = round_up(a.Ev, b.mr);
  const int64_t fwd = backward ? 0 : 1, bwd = backward ? 1 : 0;
  int64_t at = 0;
  auto take = [&at](int64_t n) {
    const int64_t here = at;
    at = round_up(at + n, 16);
    return here;
  };
  L.kt = take(L.lkp * a.E);
  L.vb = take(fwd * L.lkp * L.evp);
  L.kb = take(bwd * L.lkp * L.ep);
  L.vt = take(bwd * L.lkp * a.Ev);
  L.qa = take((backward ? L.lqp : L.rows) * a.E);
  L.doa = take(bwd * L.lqp * a.Ev);
  L.qt = take(bwd * L.lqp * L.em);
  L.dot = take(bwd * L.lqp * L.evm);
  L.s = take(L.rows * L.cols_ld);
  L.dp = take(bwd * L.rows * L.cols_ld);
  L.pa = take(L.rows * L.cols_ld);
  L.pb = take(bwd * L.rows * L.cols);
  L.gb = take(bwd * L.rows * L.cols);
  L.o = take(fwd * L.rows * L.evp);
  L.dkt = take(bwd * L.em * L.cols);
  L.dvt = take(bwd * L.evm * L.cols);
  L.dq = take(bwd * L.lqp * L.ep);
  L.m = take(L.rows);
  L.l = take(L.rows);
  L.delta = take(bwd * L.lqp);
  L.bits = take(L.rows * (kAttnCols / 64) * 2);
  L.total = take(16);
  return L;
}

/// Where an elementwise family op takes each element's keep bit from: the Philox stream
/// (element k of the call has word index j0 + k), a packed bit array (element k has bit
/// b0 + k; the array has 16 readable bytes past its end), or one bit for the whole call.
struct KeepSource {
  enum Kind { stream, packed, block } kind = stream;
  uint64_t j0 = 0;
  PhiloxKey key{0, 0};
  uint64_t threshold = 0;
  const uint8_t* bits = nullptr;
  uint64_t b0 = 0;
  bool keep = true;
};

/// The family's elementwise op (the contract's dropout, broadcast and alpha sections):
/// y = keep ? x * a + b_keep : b_drop when affine (alpha dropout: the product and the
/// sum rounded separately), else y = keep ? x * a : +0.
struct ElemOp {
  double a = 1.0, b_keep = 0.0, b_drop = 0.0;
  bool affine = false;
};

/// Residual + dropout + normalization over rows of D elements (float or double per the
/// entry called): s = residual + dropout(x) in the dtype, then LayerNorm (or RMSNorm)
/// over each row.  Row r's mask words are mask.offset + r * D + c.
/// Rows per block of the add + norm backward's partial sums of grad_weight and grad_bias.
constexpr int64_t kNormRows = 32;

struct AddNormProblem {
  int64_t rows = 0, D = 0;
  const void *x = nullptr, *residual = nullptr, *weight = nullptr, *bias = nullptr;
  void *y = nullptr, *sum = nullptr;  ///< forward outputs (sum optional)
  const void* grad_out = nullptr;     ///< backward
  void *grad_x = nullptr, *grad_residual = nullptr;
  MaskSpec mask;
  double keep_scale = 1.0;  ///< 1 / (1 - p) in the dtype
  bool rms = false;
  double eps = 1e-5;
};

struct Kernels {
  const char* name;
  /// Philox4x32 on n arbitrary counters (n x 4 words, word 0 first).
  void (*philox)(const uint32_t* ctr, uint32_t* out, int64_t n, PhiloxKey key, int rounds);
  /// Random words of elements j0 .. j0 + n - 1 (indices mod 2**64).
  void (*random_words)(uint32_t* out, int64_t n, uint64_t j0, PhiloxKey key);
  /// Packed keep bits of n elements starting at index j0; writes ceil(n / 8) bytes.
  void (*mask_packed)(uint8_t* out, int64_t n, uint64_t j0, PhiloxKey key, uint64_t threshold);
  /// One byte (0 or 1) per element.
  void (*mask_bool)(uint8_t* out, int64_t n, uint64_t j0, PhiloxKey key, uint64_t threshold);
  /// y = keep ? x * s : +0; y may alias x exactly.  `stream`: y is large and
  /// will not be read soon, so write it with non-temporal stores.
  void (*dropout_f32)(const float* x, float* y, int64_t n, uint64_t j0, PhiloxKey key,
                      uint64_t threshold, float scale, bool stream);
  void (*dropout_f64)(const double* x, double* y, int64_t n, uint64_t j0, PhiloxKey key,
                      uint64_t threshold, double scale, bool stream);
  /// The same for 16-bit floats (the contract's half-precision rule): float16, or bfloat16 when `bf16`;
  /// kept values are x * s in float32, rounded once to the format.
  void (*dropout_h16)(const uint16_t* x, uint16_t* y, int64_t n, uint64_t j0, PhiloxKey key,
                      uint64_t threshold, float scale, bool bf16);
  GemmBlocking blocking;
  /// The rows [m0, m1) x columns [n0, n1) of a GemmProblem, on one thread.
  /// `work` holds gemm_work(blocking, m1 - m0, n1 - n0, K).total floats, 64-byte aligned.
  void (*gemm_tile)(const GemmProblem& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                    float* work);
  /// Rows [r0, r1) of C = g.c (whose products are in place) finished: the epilogue (+ bias,
  /// z_out, activation, output mask), as gemm_tile applies it.
  void (*gemm_epilogue)(const GemmProblem& g, int64_t r0, int64_t r1);
  /// sums[n] = sum over rows r of p[r, n] * act'(z[r, n]) for columns [n0, n1).
  void (*col_sums)(const Mat& m, int64_t n0, int64_t n1, float* sums);
  /// Attention forward of query rows [i0, i1) of item b (i0 a multiple of the query
  /// tile).  `work` holds attention_layout(..., false).total floats; `*packed` names the item
  /// whose keys and values it holds (-1: none), so consecutive calls reuse them.
  void (*attention_forward)(const AttentionProblem& a, int64_t b, int64_t i0, int64_t i1,
                            float* work, int64_t* packed);
  /// Attention backward, key-major: grad_k and grad_v of keys [j0, j1) of item b (j0 a
  /// multiple of the key tile); with `with_grad_q` (only for the whole key range) also
  /// item b's grad_q.  `work`: attention_layout(..., true).total floats.
  void (*attention_backward_kv)(const AttentionProblem& a, int64_t b, int64_t j0, int64_t j1,
                                bool with_grad_q, float* work, int64_t* packed);
  /// grad_q of query rows [i0, i1) of item b alone (i0 a multiple of the query tile).
  void (*attention_backward_q)(const AttentionProblem& a, int64_t b, int64_t i0, int64_t i1,
                               float* work, int64_t* packed);
  /// The family's elementwise ops (ElemOp) on n elements, keep bits from `keep`; y may alias x.
  void (*family_f32)(const float* x, float* y, int64_t n, const KeepSource& keep, const ElemOp& op);
  void (*family_f64)(const double* x, double* y, int64_t n, const KeepSource& keep, const ElemOp& op);
  /// Gaussian dropout: y = x * (1 + sigma * z) for elements j0 .. j0 + n - 1 of the stream
  /// (the contract's Gaussian section); y may alias x.
  void (*gaussian_f32)(const float* x, float* y, int64_t n, uint64_t j0, PhiloxKey key, float sigma);
  void (*gaussian_f64)(const double* x, double* y, int64_t n, uint64_t j0, PhiloxKey key, double sigma);
  /// The float32 normal deviates of `pairs` given word pairs: z[2 m], z[2 m + 1] = the Box-Muller
  /// (r cos theta, r sin theta) of (w[2 m], w[2 m + 1]), the transform gaussian_f32 applies
  /// (exposed so that tests can reach chosen words).
  void (*normal_pairs_f32)(const uint32_t* w, float* z, int64_t pairs);
  /// AddNormProblem forward of rows [r0, r1) (float32 or float64 data).
  void (*add_norm_f32)(const AddNormProblem& a, int64_t r0, int64_t r1);
  void (*add_norm_f64)(const AddNormProblem& a, int64_t r0, int64_t r1);
  /// Its backward for rows [r0, r1): grad_x, grad_residual, and the sums of grad_out * x_hat
  /// and of grad_out per block of kNormRows rows: row r adds into wsum[r / kNormRows * D + c]
  /// and bsum[...] (each optional), so that the blocks can be added up in a fixed order.
  void (*add_norm_backward_f32)(const AddNormProblem& a, int64_t r0, int64_t r1, double* wsum, double* bsum);
  void (*add_norm_backward_f64)(const AddNormProblem& a, int64_t r0, int64_t r1, double* wsum, double* bsum);
};

/// Scratch layout of one thread's gemm_tile over an m x n range: packed A, packed
/// B, a row buffer and an edge tile, then (on a backend with the sparse path) its
/// rows: values by depth and the same compacted (each chunk's kept values first), 64
/// floats per 64-depth chunk each, one 64-bit word of keep bits per chunk, the
/// all-kept words and the sums of a block of b.spr rows.  Each part starts
/// on a 64-byte boundary.
struct GemmWork {
  int64_t a_pack, b_pack, buf, tile, s_vals, s_kept, s_bits, s_all, s_part, a_pairs, b_pairs, total;  // in floats
};


static inline GemmWork gemm_work(const GemmBlocking& b, int64_t m, int64_t n, int64_t k) {
  auto depth = [k](int64_t kc) { return k < kc ? (k > 0 ? k : 1) : kc; };
  auto width = [n, &b](int64_t nc) { return n < nc ? round_up(n, b.snr) : nc; };  // snr: a multiple of nr
  const int64_t mc = m < b.mc ? round_up(m, b.mr) : b.mc;
  const int64_t kc = depth(b.kc), nc = width(b.nc);
  const int64_t skc = b.sparse ? depth(b.skc) : 1, snc = b.sparse ? width(b.snc) : 1;
  const int64_t b_block = kc * nc > skc * snc ? kc * nc : skc * snc;
  int64_t longest = kc > nc ? kc : nc;
  longest = longest > mc ? longest : mc;
  longest = longest > skc ? longest : skc;
  longest = longest > snc ? longest : snc;
  if (b.sparse && longest < kSparseSegment) longest = kSparseSegment;  // build_rows' transposes
  const int64_t smc = m < b.smc ? m : b.smc;
  const int64_t rows = b.sparse ? round_up(smc, 4) : 0;  // the sparse path: groups of 4 rows
  const int64_t words = b.sparse ? (skc + 63) / 64 : 0;  // of 64-depth chunks
  GemmWork w;
  w.a_pack = 0;
  // packed A: an mc x kc block, or, for the direct path, one panel of its few rows at every
  // depth; room for both, so that a range of fewer rows never needs more than a longer one
  const int64_t direct_panel = b.direct_rows > 0 ? b.mr * (k > 0 ? k : 1) : 0;
  w.b_pack = round_up(w.a_pack + (mc * kc > direct_panel ? mc * kc : direct_panel), 16);
  w.buf = round_up(w.b_pack + b_block, 16);
  w.tile = round_up(w.buf + longest, 16);
  w.s_vals = round_up(w.tile + b.mr * b.nr, 16);
  w.s_kept = round_up(w.s_vals + rows * words * 64, 16);
  w.s_bits = round_up(w.s_kept + rows * words * 64, 16);
  w.s_all = round_up(w.s_bits + rows * words * 2, 16);
  w.s_part = round_up(w.s_all + words * 2, 16);
  // the bfloat16 dot-product kernel's pairs (two depths in 32 bits) of the packed blocks
  w.a_pairs = round_up(w.s_part + (b.sparse ? b.spr * b.snr : 0), 16);
  w.b_pairs = round_up(w.a_pairs + (b.bf16_dot ? mc * ((kc + 1) / 2) : 0), 16);
  w.total = round_up(w.b_pairs + (b.bf16_dot ? ((kc + 1) / 2) * nc : 0), 16);
  return w;
}

// One table per backend (each defined in its own translation unit).
/// Blocks (one (ic, jc) block of a depth block) the bfloat16 dot-product kernel computed in
/// this process: the tests' evidence that it ran.
extern std::atomic<uint64_t> bf16_dot_blocks;

namespace scalar { const Kernels& kernels(); }
#if defined(FD_HAVE_X86_BACKENDS)
namespace avx2 { const Kernels& kernels(); }
namespace avx512 { const Kernels& kernels(); }
#endif
#if defined(FD_HAVE_NEON_BACKEND)
namespace neon { const Kernels& kernels(); }
#endif

}  // namespace fastdropout
