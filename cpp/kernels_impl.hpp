// The kernels, written once.  Each backend translation unit includes its
// primitives header (isa_*.hpp), defines FD_ISA to its namespace and includes
// this file; everything here lands in fastdropout::FD_ISA::(anonymous), so code
// compiled with different instruction sets is never merged by the linker.
//
// Primitives the ISA header provides (in the same namespace):
//   kLanes, kMR, kNR, kMC, kKC, kNC
//   philox_soa, words64, keep_bits64, select_scale64 (float, double),
//   bits_to_bytes64, microkernel
// and optionally
//   kT, transpose_block (FD_ISA_TRANSPOSE; a portable one otherwise)
//   kSNR, kSKC, kSNC, kSMC, kSparseMin, kSparseGradMin, kSparseMinN, kSparseSplit,
//   nonzero_bits64, compact64 and sparse_rows (FD_ISA_SPARSE: the sparse path, four rows
//   in lockstep), or sparse_row_chunk_for instead of sparse_rows (FD_ISA_SPARSE_CHUNKS:
//   one row per 64-depth chunk)
//   microkernel_direct (FD_ISA_DIRECT: the direct path for a batch of one to four rows)
#ifndef FD_ISA
#error "define FD_ISA before including kernels_impl.hpp"
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#if defined(_MSC_VER)
#include <xmmintrin.h>  // _mm_prefetch
#endif

#include "kernels.hpp"

namespace fastdropout {
namespace FD_ISA {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

#if defined(FD_ISA_DIRECT)
/// The direct path (see direct_gemm_tile) serves ranges of at most this many rows.
constexpr int64_t kDirectRows = 4;
#else
constexpr int64_t kDirectRows = 0;
#endif
#if defined(FD_ISA_SPARSE_CHUNKS)
// Rows of the sparse path's blocks: each 64-depth chunk of a B panel (in L1) serves every
// row of the (ic, pc) block before the next chunk (measured at 256x1024x1024 and
// 512x2048x1024 on Zen 3: 2-7% faster than blocks of 16 rows); their sums wait in part.
constexpr int64_t kRowBlock = kSMC, kRowBlockTrans = kSMC, kSparsePart = kSMC;
#elif defined(FD_ISA_SPARSE)
// Rows per block of the sweep over the B panels (measured).  A transposed C takes all
// the rows `part` holds, so that each of its rows gets that many contiguous floats.
constexpr int64_t kRowBlock = 16, kRowBlockTrans = kSparsePartRows, kSparsePart = kSparsePartRows;
#endif
#if defined(FD_ISA_BF16_DOT)
constexpr bool kHasBf16Dot = true;
#else
constexpr bool kHasBf16Dot = false;
#endif
#if defined(FD_ISA_SPARSE)
constexpr GemmBlocking kBlocking{kMR, kNR, kMC, kKC, kNC, true, kSNR, kSKC, kSNC, kSMC, kSparsePart,
                                 kSparseMin, kSparseGradMin, kSparseMinN, kSparseSplit, kDirectRows,
                                 kHasBf16Dot};
#else
constexpr GemmBlocking kBlocking{kMR, kNR, kMC, kKC, kNC, false, kNR, kKC, kNC, kMC, 0, ~uint64_t{0}, ~uint64_t{0},
                                 0, kNR, kDirectRows, kHasBf16Dot};
#endif

#if !defined(FD_ISA_TRANSPOSE)
/// dst[j * ldd + i] = src[i * lds + j] for i, j < kT.
constexpr int64_t kT = 8;
inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  for (int64_t j = 0; j < kT; ++j)
    for (int64_t i = 0; i < kT; ++i) dst[j * ldd + i] = src[i * lds + j];
}
#endif

// ---------------------------------------------------------------------------
// The mask stream
// ---------------------------------------------------------------------------

#if !defined(FD_ISA_KEY_SCHEDULE)
/// What a backend's Philox takes for a key: its round keys prepared once per stream where it
/// has such a form (FD_ISA_KEY_SCHEDULE), the key itself otherwise.
using KeySchedule = PhiloxKey;
#endif

/// Keep bits of consecutive elements starting at any index j0, 64 at a time.
/// Bit k of the n-th word is element j0 + 64 n + k.  Where the backend draws 128 bits in
/// one go (FD_ISA_KEEP_BITS128: independent Philox chains side by side), the word after
/// the next is drawn with it when the caller still wants it, and kept.
struct BitStream {
  KeySchedule key;
  uint64_t threshold;
  uint64_t block;  // next block to generate
  unsigned shift;  // j0 & 3: elements of the first block that come before j0
  uint64_t carry = 0;
  uint64_t ahead = 0;  // the word of the blocks before `block`, drawn ahead
  bool have_ahead = false;

  BitStream(uint64_t j0, PhiloxKey k, uint64_t t)
      : key(k), threshold(t), block(j0 >> 2), shift(static_cast<unsigned>(j0 & 3)) {
    if (shift) carry = gen(0);
  }

  /// The next word of the stream; `more` > 0: the caller wants elements beyond it.
  uint64_t gen([[maybe_unused]] int64_t more) {
    if (have_ahead) {
      have_ahead = false;
      return ahead;
    }
    uint64_t bits;
    if (threshold == 0) {
      bits = ~uint64_t{0};
    } else if (threshold >= kDropAll) {
      bits = 0;
#if defined(FD_ISA_KEEP_BITS128)
    } else if (more > 0) {
      uint64_t two[2];
      keep_bits128(block & kBlockMask, key, static_cast<uint32_t>(threshold), two);
      block += 16;
      ahead = two[1];
      have_ahead = true;
      bits = two[0];
#endif
    } else {
      bits = keep_bits64(block & kBlockMask, key, static_cast<uint32_t>(threshold));
    }
    block += 16;
    return bits;
  }

  /// The next 64 keep bits; `remaining` (>= 1) elements are still wanted.
  uint64_t next(int64_t remaining) {
    if (shift == 0) return gen(remaining - 64);
    uint64_t w = carry >> shift;
    if (remaining > static_cast<int64_t>(64 - shift)) {
      carry = gen(remaining - static_cast<int64_t>(128 - shift));
      w |= carry << (64 - shift);
    }
    return w;
  }
};

inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1; }

void philox_many(const uint32_t* ctr, uint32_t* out, int64_t n, PhiloxKey key, int rounds) {
  for (int64_t i = 0; i < n; i += kLanes) {
    uint32_t c[4][kLanes] = {};
    const int64_t m = min64(kLanes, n - i);
    for (int64_t l = 0; l < m; ++l)
      for (int w = 0; w < 4; ++w) c[w][l] = ctr[4 * (i + l) + w];
    philox_soa(c[0], c[1], c[2], c[3], key, rounds);
    for (int64_t l = 0; l < m; ++l)
      for (int w = 0; w < 4; ++w) out[4 * (i + l) + w] = c[w][l];
  }
}

void random_words(uint32_t* out, int64_t n, uint64_t j0, PhiloxKey key) {
  const KeySchedule ks(key);
  alignas(64) uint32_t buf[128];
  uint64_t block = j0 >> 2;
  int64_t skip = static_cast<int64_t>(j0 & 3);
  for (int64_t i = 0; i < n;) {
    int64_t got = 64;
#if defined(FD_ISA_WORDS128)
    if (n - i > 64 - skip) {  // (the caller wants words of the next 16 blocks too)
      words128(block & kBlockMask, ks, buf);
      got = 128;
    } else
#endif
      words64(block & kBlockMask, ks, buf);
    block += static_cast<uint64_t>(got / 4);
    const int64_t take = min64(got - skip, n - i);
    std::memcpy(out + i, buf + skip, static_cast<size_t>(take) * sizeof(uint32_t));
    i += take;
    skip = 0;
  }
}

inline void store_bytes(uint8_t* out, uint64_t w, int64_t nbytes) {
  for (int64_t b = 0; b < nbytes; ++b) out[b] = static_cast<uint8_t>(w >> (8 * b));
}

void mask_packed(uint8_t* out, int64_t n, uint64_t j0, PhiloxKey key, uint64_t t) {
  BitStream bits(j0, key, t);
  for (int64_t i = 0; i < n; i += 64) {
    const int64_t rem = n - i;
    store_bytes(out + i / 8, bits.next(rem) & low_bits(rem), min64(8, (rem + 7) / 8));
  }
}

void mask_bool(uint8_t* out, int64_t n, uint64_t j0, PhiloxKey key, uint64_t t) {
  BitStream bits(j0, key, t);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) bits_to_bytes64(bits.next(n - i), out + i);
  if (i < n) {
    const uint64_t w = bits.next(n - i);
    for (int64_t k = 0; i + k < n; ++k) out[i + k] = static_cast<uint8_t>((w >> k) & 1);
  }
}

template <class T, bool Stream = false>
void dropout(const T* x, T* y, int64_t n, uint64_t j0, PhiloxKey key, uint64_t t, T s) {
  if (t >= kDropAll) {  // p = 1: nothing is kept, no word is needed
    for (int64_t i = 0; i < n; ++i) y[i] = T(0);
    return;
  }
  BitStream bits(j0, key, t);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) select_scale64<Stream>(x + i, y + i, bits.next(n - i), s);
  if (i < n) {
    const uint64_t w = bits.next(n - i);
    for (int64_t k = 0; i + k < n; ++k) y[i + k] = ((w >> k) & 1) ? x[i + k] * s : T(0);
  }
}

/// Large outputs go around the caches (no read-for-ownership of y): the
/// elements before y's first 64-byte boundary take the ordinary path.
template <class T>
void dropout_entry(const T* x, T* y, int64_t n, uint64_t j0, PhiloxKey key, uint64_t t, T s,
                   bool stream) {
  const auto addr = reinterpret_cast<uintptr_t>(y);
  if (!stream || addr % sizeof(T) != 0 || n < 1024) {
    dropout<T>(x, y, n, j0, key, t, s);
    return;
  }
  const int64_t head = static_cast<int64_t>(((64 - addr % 64) % 64) / sizeof(T));
  dropout<T>(x, y, head, j0, key, t, s);
  dropout<T, true>(x + head, y + head, n - head, j0 + static_cast<uint64_t>(head), key, t, s);
  stream_fence();
}

#include "half_impl.hpp"

void dropout_f32(const float* x, float* y, int64_t n, uint64_t j0, PhiloxKey key, uint64_t t,
                 float s, bool stream) {
  dropout_entry<float>(x, y, n, j0, key, t, s, stream);
}
void dropout_f64(const double* x, double* y, int64_t n, uint64_t j0, PhiloxKey key, uint64_t t,
                 double s, bool stream) {
  dropout_entry<double>(x, y, n, j0, key, t, s, stream);
}

// ---------------------------------------------------------------------------
// Activations.  Branch-free so the compiler vectorizes the loops around them.
// ---------------------------------------------------------------------------

inline float exp_approx(float x) {
  // 2**n * e**r with |r| <= ln2 / 2; relative error ~2e-7 on [-87, 88]; 0 below
  // -87 (where e**x is at most a subnormal), so z * e**(-z*z/2) vanishes for huge z.
  const bool underflow = x < -87.0f;
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2**23: adding it rounds to an integer
  const float n = (x * 1.44269504f + shifter) - shifter;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const uint32_t u = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &u, sizeof scale);
  return underflow ? 0.0f : p * scale;
}

/// erf(x) for float, absolute error below 3e-7 (Numerical Recipes' erfc
/// Chebyshev fit, fractional error 1.2e-7 in exact arithmetic).
inline float erf_approx(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.5f * a);
  float q = 0.17087277f;
  q = q * t - 0.82215223f;
  q = q * t + 1.48851587f;
  q = q * t - 1.13520398f;
  q = q * t + 0.27886807f;
  q = q * t - 0.18628806f;
  q = q * t + 0.09678418f;
  q = q * t + 0.37409196f;
  q = q * t + 1.00002368f;
  q = q * t - 1.26551223f;
  const float erfc = t * exp_approx(-a * a + q);
  const float r = 1.0f - erfc;
  return x < 0.0f ? -r : r;
}

inline float gelu(float z) { return 0.5f * z * (1.0f + erf_approx(z * 0.70710678f)); }

inline float gelu_grad(float z) {
  const float cdf = 0.5f * (1.0f + erf_approx(z * 0.70710678f));
  const float pdf = 0.39894228f * exp_approx(-0.5f * z * z);
  return cdf + z * pdf;
}

void apply_activation(float* v, int64_t n, Activation act) {
  if (act == Activation::relu) {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] < 0.0f ? 0.0f : v[i];
  } else if (act == Activation::gelu) {
    for (int64_t i = 0; i < n; ++i) v[i] = gelu(v[i]);
  }
}

/// dst = dy * act'(z)
void mul_activation_grad(const float* dy, const float* z, float* dst, int64_t n, Activation act) {
  if (act == Activation::relu) {
    for (int64_t i = 0; i < n; ++i) dst[i] = z[i] > 0.0f ? dy[i] : 0.0f;
  } else if (act == Activation::gelu) {
    for (int64_t i = 0; i < n; ++i) dst[i] = dy[i] * gelu_grad(z[i]);
  } else {
    std::memcpy(dst, dy, static_cast<size_t>(n) * sizeof(float));
  }
}

// ---------------------------------------------------------------------------
// GEMM (BLIS structure): jc -> pc -> pack B -> ic -> pack A -> jr -> ir -> microkernel
// ---------------------------------------------------------------------------

inline void prefetch(const float* p) {
#if defined(_MSC_VER)
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
}

/// Fetches the rows x cols tile of C at c before a micro-kernel reads it back after
/// its depth loop.
inline void prefetch_tile(const float* c, int64_t ldc, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < cols; n += 16) prefetch(c + r * ldc + n);
}

/// The kMR x kNR micro-tiles of one (ic, jc) block of C, mc x nc, in order:
/// kernel(ir, jr, dst, ld) computes the tile at (ic + ir, jc + jr) into dst with row stride
/// ld.  A whole tile is C itself (prefetched where the kernel adds to it); an edge tile is
/// computed aside in `tile` (C's values, or zeros, first) and only its valid part kept.
template <class Kernel>
inline void block_tiles(const GemmProblem& g, int64_t ic, int64_t mc, int64_t jc, int64_t nc, bool accumulate,
                        float* tile, Kernel&& kernel) {
  for (int64_t ir = 0; ir < mc; ir += kMR) {
    const int64_t mr = min64(kMR, mc - ir);
    for (int64_t jr = 0; jr < nc; jr += kNR) {
      const int64_t nr = min64(kNR, nc - jr);
      float* c = g.c + (ic + ir) * g.N + jc + jr;
      if (mr == kMR && nr == kNR) {
        if (accumulate) prefetch_tile(c, g.N, kMR, kNR);
        kernel(ir, jr, c, g.N);
        continue;
      }
      for (int64_t r = 0; r < mr; ++r)
        for (int64_t n = 0; n < nr; ++n) tile[r * kNR + n] = accumulate ? c[r * g.N + n] : 0.0f;
      kernel(ir, jr, tile, kNR);
      for (int64_t r = 0; r < mr; ++r)
        for (int64_t n = 0; n < nr; ++n) c[r * g.N + n] = tile[r * kNR + n];
    }
  }
}

/// bfloat16 bits to float32 (exact).
inline void widen_bf16(const uint16_t* h, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(h[i]) << 16;
    std::memcpy(out + i, &u, sizeof u);
  }
}

/// Rounds float32 values to bfloat16 precision in place (to nearest, ties to even; NaN stays NaN).
inline void round_to_bf16(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, v + i, sizeof u);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    u = nan ? (u | 0x00400000u) & 0xffff0000u : r;
    std::memcpy(v + i, &u, sizeof u);
  }
}

/// y = keep ? x * s : +0 over n elements whose keep bits start at bit `at` of `bits`
/// (MaskSpec::bits): dropout's select-and-scale on bits drawn earlier.
void dropout_bits(const float* x, float* y, int64_t n, const uint64_t* bits, uint64_t at, float s) {
  auto word = [bits](uint64_t pos) {  // 64 bits from bit pos (the spare word ends the array)
    const uint64_t q = pos >> 6;
    const unsigned r = static_cast<unsigned>(pos & 63);
    return r == 0 ? bits[q] : (bits[q] >> r) | (bits[q + 1] << (64 - r));
  };
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) select_scale64<false>(x + i, y + i, word(at + static_cast<uint64_t>(i)), s);
  if (i < n) {
    const uint64_t w = word(at + static_cast<uint64_t>(i));
    for (int64_t k = 0; i + k < n; ++k) y[i + k] = ((w >> k) & 1) ? x[i + k] * s : 0.0f;
  }
}

/// Elements (r, c0 .. c0 + len) of m, transformed; either a pointer into m or `buf`.
const float* load_segment(const Mat& m, int64_t r, int64_t c0, int64_t len, float* buf) {
  const int64_t at = r * m.cols + c0;
  const float* src = m.p + at;
  if (m.h) {
    widen_bf16(m.h + at, buf, len);
    src = buf;
  }
  if (m.z) {
    mul_activation_grad(src, m.z + at, buf, len, m.zact);
    src = buf;
  }
  if (m.mask.enabled) {
    if (m.mask.bits)
      dropout_bits(src, buf, len, m.mask.bits, static_cast<uint64_t>(at), m.mask.scale);
    else
      dropout<float>(src, buf, len, m.mask.offset + static_cast<uint64_t>(at), m.mask.key,
                     m.mask.threshold, m.mask.scale);
    if (m.h) round_to_bf16(buf, len);  // a dropped-out bfloat16 value is bfloat16
    src = buf;
  }
  return src;
}

/// One depth's row of `full` whole panels of W lanes: seg[p W : (p + 1) W] to out[p stride].
/// W known at compile time, so the copy is inlined (a memmove call per 16 floats took 10%
/// of a backward).
template <int64_t W>
inline void copy_panel_rows(const float* seg, float* out, int64_t full, int64_t stride) {
  for (int64_t p = 0; p < full; ++p) std::memcpy(out + p * stride, seg + p * W, W * sizeof(float));
}

/// Packs lanes [l0, l0 + nl) x depth [d0, d0 + nd) into panels of w lanes:
/// out[p * nd * w + d * w + l % w] for lane l of panel p; missing lanes are zero.
void pack(const Mat& m, bool lanes_are_rows, int64_t l0, int64_t nl, int64_t d0, int64_t nd,
          int64_t w, float* out, float* buf) {
  const int64_t panels = (nl + w - 1) / w;
  if (lanes_are_rows && !m.z && !m.mask.enabled && !m.h && w % kT == 0) {
    // plain rows: kT x kT blocks transposed in registers, the edges one by one
    const int64_t fl = nl / kT * kT, fd = nd / kT * kT;
    for (int64_t lb = 0; lb < fl; lb += kT) {
      const float* src = m.p + (l0 + lb) * m.cols + d0;
      float* dst = out + (lb / w) * nd * w + (lb % w);
      for (int64_t db = 0; db < fd; db += kT) transpose_block(src + db, m.cols, dst + db * w, w);
      for (int64_t l = 0; l < kT; ++l)
        for (int64_t d = fd; d < nd; ++d) dst[d * w + l] = src[l * m.cols + d];
    }
    for (int64_t l = fl; l < panels * w; ++l) {
      float* dst = out + (l / w) * nd * w + (l % w);
      const float* src = m.p + (l0 + l) * m.cols + d0;
      for (int64_t d = 0; d < nd; ++d) dst[d * w] = l < nl ? src[d] : 0.0f;
    }
    return;
  }
  if (lanes_are_rows && !m.z && !m.mask.enabled && m.h && w % kT == 0) {
    // plain bfloat16 rows: each kT x kT block widened into a small tile, then transposed (3.5%
    // faster at 256x1024x1024 than widening kT whole rows first, as the branch below does)
    alignas(64) float tile[kT * kT];
    const int64_t fl = nl / kT * kT, fd = nd / kT * kT;
    for (int64_t lb = 0; lb < fl; lb += kT) {
      const uint16_t* src = m.h + (l0 + lb) * m.cols + d0;
      float* dst = out + (lb / w) * nd * w + (lb % w);
      for (int64_t db = 0; db < fd; db += kT) {
        for (int64_t l = 0; l < kT; ++l) widen_bf16(src + l * m.cols + db, tile + l * kT, kT);
        transpose_block(tile, kT, dst + db * w, w);
      }
      for (int64_t l = 0; l < kT; ++l) {
        widen_bf16(src + l * m.cols + fd, tile, nd - fd);
        for (int64_t d = fd; d < nd; ++d) dst[d * w + l] = tile[d - fd];
      }
    }
    for (int64_t l = fl; l < panels * w; ++l) {
      float* dst = out + (l / w) * nd * w + (l % w);
      const float* seg = l < nl ? load_segment(m, l0 + l, d0, nd, buf) : nullptr;
      for (int64_t d = 0; d < nd; ++d) dst[d * w] = seg ? seg[d] : 0.0f;
    }
    return;
  }
  if (lanes_are_rows && w % kT == 0 && nd <= kKC) {
    // rows that load_segment transforms (a mask, an activation's derivative, on float32 or
    // bfloat16): kT rows at a time transformed into `rows`, then kT x kT blocks
    // transposed in registers (a store per element, a panel row apart, took most of a
    // narrow product's time)
    alignas(64) float rows[kT * kKC];
    const int64_t fl = nl / kT * kT, fd = nd / kT * kT;
    for (int64_t lb = 0; lb < fl; lb += kT) {
      for (int64_t l = 0; l < kT; ++l) {
        float* row = rows + l * nd;  // load_segment transforms into its buffer, returning it
        const float* seg = load_segment(m, l0 + lb + l, d0, nd, row);
        if (seg != row) std::memcpy(row, seg, static_cast<size_t>(nd) * sizeof(float));
      }
      float* dst = out + (lb / w) * nd * w + (lb % w);
      for (int64_t db = 0; db < fd; db += kT) transpose_block(rows + db, nd, dst + db * w, w);
      for (int64_t l = 0; l < kT; ++l)
        for (int64_t d = fd; d < nd; ++d) dst[d * w + l] = rows[l * nd + d];
    }
    for (int64_t l = fl; l < panels * w; ++l) {
      float* dst = out + (l / w) * nd * w + (l % w);
      const float* seg = l < nl ? load_segment(m, l0 + l, d0, nd, buf) : nullptr;
      for (int64_t d = 0; d < nd; ++d) dst[d * w] = seg ? seg[d] : 0.0f;
    }
    return;
  }
  if (lanes_are_rows) {
    for (int64_t l = 0; l < nl; ++l) {
      const float* seg = load_segment(m, l0 + l, d0, nd, buf);
      float* dst = out + (l / w) * nd * w + (l % w);
      for (int64_t d = 0; d < nd; ++d) dst[d * w] = seg[d];
    }
    for (int64_t l = nl; l < panels * w; ++l) {
      float* dst = out + (l / w) * nd * w + (l % w);
      for (int64_t d = 0; d < nd; ++d) dst[d * w] = 0.0f;
    }
  } else {
    constexpr int64_t kAhead = 8;  // rows: strided rows defeat the hardware prefetcher
    for (int64_t d = 0; d < nd; ++d) {
      if (d + kAhead < nd && !m.h) {
        const float* next = m.p + (d0 + d + kAhead) * m.cols + l0;
        for (int64_t l = 0; l < nl; l += 16) prefetch(next + l);
        if (m.z) {
          const float* nz = m.z + (d0 + d + kAhead) * m.cols + l0;
          for (int64_t l = 0; l < nl; l += 16) prefetch(nz + l);
        }
      }
      const float* seg = load_segment(m, d0 + d, l0, nl, buf);
      const int64_t full = nl / w;
      if (w == kNR)
        copy_panel_rows<kNR>(seg, out + d * w, full, nd * w);
      else if (w == kMR)
        copy_panel_rows<kMR>(seg, out + d * w, full, nd * w);
#if defined(FD_ISA_SPARSE)
      else if (w == kSNR)  // the sparse path's panels (grad_weight's dz on avx512): a
        copy_panel_rows<kSNR>(seg, out + d * w, full, nd * w);  // runtime width was 5% slower
#endif
      else  // any other width: a panel at a time, no division per float
        for (int64_t p = 0; p < full; ++p) {
          float* dst = out + p * nd * w + d * w;
          const float* src = seg + p * w;
          for (int64_t l = 0; l < w; ++l) dst[l] = src[l];
        }
      for (int64_t p = full; p < panels; ++p) {  // the last, partial panel: zeros after its lanes
        float* dst = out + p * nd * w + d * w;
        const int64_t have = nl - p * w;
        for (int64_t l = 0; l < w; ++l) dst[l] = l < have ? seg[p * w + l] : 0.0f;
      }
    }
  }
}

void epilogue(const GemmProblem& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  const int64_t len = c1 - c0;
  for (int64_t r = r0; r < r1; ++r) {
    float* row = g.c + r * g.N + c0;
    if (g.bias)
      for (int64_t i = 0; i < len; ++i) row[i] += g.bias[c0 + i];
    if (g.z_out) std::memcpy(g.z_out + r * g.N + c0, row, static_cast<size_t>(len) * sizeof(float));
    apply_activation(row, len, g.act);
    if (g.out_mask.enabled)
      dropout<float>(row, row, len, g.out_mask.offset + static_cast<uint64_t>(r * g.N + c0),
                     g.out_mask.key, g.out_mask.threshold, g.out_mask.scale);
  }
}

#if defined(FD_ISA_SPARSE)
// ---------------------------------------------------------------------------
// Sparse path: op(A) is masked with p >= 0.3.  Each row of an (ic, pc) block is
// kept as its values, one bit per depth (set where the value is not zero) and, per
// 64-depth chunk, its kept values compacted; sparse_rows multiplies only those (every
// entry, from the values by depth, for a B panel holding an inf or NaN).  Each output
// element is one FMA chain in depth order, as in the dense micro-kernel: the results
// are the dense path's, bit for bit, and never depend on the thread split.
// ---------------------------------------------------------------------------

/// The masked operand of one (ic, pc) block, as sparse_rows reads it: 64 floats per
/// row and chunk, in vals by depth (zero past kc) and in kept compacted.
struct SparseRows {
  float* vals;      // rows x vld
  float* kept;      // rows x vld: each chunk's kept values in depth order, then zeros
  uint64_t* bits;   // rows x words
  uint64_t* all;    // words: every depth below kc (for panels holding inf or NaN)
  float* part;      // kSparsePart x SNR: sums of a block of rows (transposed C, edge tiles)
  float* tile;      // kT x kT: a transposed block on its way to C (the edge tile)
  int64_t vld, words;
};

/// Columns per segment of a transposed op(A) in build_rows (kT of them fill the row
/// buffer, which gemm_work sizes to at least kSparseSegment floats).
constexpr int64_t kSeg = kSparseSegment / kT;
static_assert(kSeg % kT == 0, "whole transposed blocks per segment");

/// Fills rows [ic, ic + mc) x depth [pc, pc + kc) of op(A); rows mc .. mc + 3 (to a
/// multiple of 4) are empty.
void build_rows(const GemmProblem& g, int64_t ic, int64_t mc, int64_t pc, int64_t kc,
                SparseRows& s, float* buf) {
  s.words = (kc + 63) / 64;
  s.vld = s.words * 64;
  const int64_t rows = round_up(mc, 4);
  for (int64_t i = 0; i < rows; ++i)  // zero what no value lands in
    for (int64_t d = i < mc ? kc : 0; d < s.vld; ++d) s.vals[i * s.vld + d] = 0.0f;
  if (!g.a_trans) {
    for (int64_t i = 0; i < mc; ++i) {
      const float* seg = load_segment(g.a, ic + i, pc, kc, buf);
      std::memcpy(s.vals + i * s.vld, seg, static_cast<size_t>(kc) * sizeof(float));
    }
  } else {  // op(A)(i, d) = a(d, i): kT segments of kSeg columns at a time, transposed
    for (int64_t d0 = 0; d0 < kc; d0 += kT) {
      const int64_t nd = min64(kT, kc - d0);
      for (int64_t i0 = 0; i0 < mc; i0 += kSeg) {
        const int64_t ni = min64(kSeg, mc - i0);
        for (int64_t d = 0; d < nd; ++d) {
          float* row = buf + d * kSeg;
          const float* seg = load_segment(g.a, pc + d0 + d, ic + i0, ni, row);
          if (seg != row) std::memcpy(row, seg, static_cast<size_t>(ni) * sizeof(float));
        }
        float* dst = s.vals + i0 * s.vld + d0;
        const int64_t fi = nd == kT ? ni / kT * kT : 0;
        for (int64_t ib = 0; ib < fi; ib += kT) transpose_block(buf + ib, kSeg, dst + ib * s.vld, s.vld);
        for (int64_t i = fi; i < ni; ++i)
          for (int64_t d = 0; d < nd; ++d) dst[i * s.vld + d] = buf[d * kSeg + i];
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t w = 0; w < s.words; ++w) {
      const float* v = s.vals + i * s.vld + w * 64;
      const uint64_t m = nonzero_bits64(v);
      s.bits[i * s.words + w] = m;
      compact64(v, m, s.kept + i * s.vld + w * 64);
    }
  for (int64_t w = 0; w < s.words; ++w) {
    const int64_t have = min64(64, kc - w * 64);
    s.all[w] = have == 64 ? ~uint64_t{0} : (uint64_t{1} << have) - 1;
  }
}

static_assert(kT * kT <= kMR * kNR, "a transposed block fits the edge tile");
static_assert(kSKC % kKC == 0 && kKC % 64 == 0, "the sparse depth block holds whole dense ones");

/// Whether a packed B panel holds an inf or NaN.  Then 0 * inf must give NaN as in
/// the dense product, so that panel multiplies every entry, zeros included.
bool has_non_finite(const float* p, int64_t n) {
  uint32_t any = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof u);
    any |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return any != 0;
}

#if defined(FD_ISA_SPARSE_CHUNKS)
/// Rows [ib, ie) of an (ic, pc) block against the panel at bp (nr of its kSNR columns
/// are C's columns c0 ..), one row at a time per 64-depth chunk (sparse_row_chunk), the
/// chunks of each of the dense path's depth blocks (kKC) carried in s.part; the block's
/// last chunk adds the sums to C, as the dense micro-kernel ends a block (the same
/// bits).  An edge panel takes the narrowest kernel that covers it; where its columns are
/// not whole vectors, their C values go through a copy padded to whole vectors, so that
/// they meet the same vector add as everywhere else (as the dense path's edge tiles do:
/// which of two NaNs an add returns depends on its operand order).
/// (Never a transposed C: this backend's sparse_grad_min keeps grad_weight dense.)
void sparse_rows_by_chunk(const GemmProblem& g, SparseRows& s, int64_t ic, int64_t ib, int64_t ie, int64_t c0,
                          int64_t nr, const float* bp, bool every, int64_t kc, bool accumulate) {
  const bool whole = nr % 8 == 0;
  const SparseRowChunk chunk = sparse_row_chunk_for(nr);
  alignas(32) float row[kSNR] = {};  // the columns past nr: added and dropped, never read uninitialized
  for (int64_t sub = 0; sub < kc; sub += kKC) {
    const int64_t w0 = sub / 64, w1 = min64(s.words, (sub + kKC) / 64);
    const bool add = accumulate || sub > 0;
    for (int64_t w = w0; w < w1; ++w) {
      const float* bw = bp + w * 64 * kSNR;
      const bool last = w + 1 == w1, padded = last && !whole;  // padded: C's row through `row`
      for (int64_t i = ib; i < ie; ++i) {
        float* c = g.c + (ic + i) * g.N + c0;
        if (padded && add) std::memcpy(row, c, static_cast<size_t>(nr) * sizeof(float));
        chunk(every ? s.all[w] : s.bits[i * s.words + w], (every ? s.vals : s.kept) + i * s.vld + w * 64, bw,
              s.part + (i - ib) * kSNR, w > w0, !last ? nullptr : padded ? row : c, add);
        if (padded) std::memcpy(c, row, static_cast<size_t>(nr) * sizeof(float));
      }
    }
  }
}
#endif

void sparse_gemm_tile(const GemmProblem& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                      float* work) {
  const GemmWork layout = gemm_work(kBlocking, m1 - m0, n1 - n0, g.K);
  float* b_pack = work + layout.b_pack;
  float* buf = work + layout.buf;
  SparseRows s{work + layout.s_vals, work + layout.s_kept, reinterpret_cast<uint64_t*>(work + layout.s_bits),
               reinterpret_cast<uint64_t*>(work + layout.s_all), work + layout.s_part,
               work + layout.tile, 0, 0};
  for (int64_t pc = 0; pc < g.K; pc += kSKC) {
    const int64_t kc = min64(kSKC, g.K - pc);
    const bool accumulate = pc > 0, last = pc + kc >= g.K;
    for (int64_t ic = m0; ic < m1; ic += kSMC) {
      const int64_t mc = min64(kSMC, m1 - ic);
      build_rows(g, ic, mc, pc, kc, s, buf);
      for (int64_t jc = n0; jc < n1; jc += kSNC) {
        const int64_t nc = min64(kSNC, n1 - jc);
        pack(g.b, g.b_trans, jc, nc, pc, kc, kSNR, b_pack, buf);
        bool full[kSNC / kSNR];  // panels holding inf or NaN multiply every entry
        for (int64_t jr = 0; jr < nc; jr += kSNR) full[jr / kSNR] = has_non_finite(b_pack + jr * kc, kc * kSNR);
        // Blocks of rows sweep every panel: their C block, rows and the B block stay in L2.
        const int64_t row_block = g.c_trans ? kRowBlockTrans : kRowBlock;
        for (int64_t ib = 0; ib < mc; ib += row_block) {
          const int64_t ie = min64(mc, ib + row_block);
          for (int64_t jr = 0; jr < nc; jr += kSNR) {
            const int64_t nr = min64(kSNR, nc - jr);
            const float* bp = b_pack + jr * kc;
            const bool every = full[jr / kSNR];
#if defined(FD_ISA_SPARSE_CHUNKS)
            sparse_rows_by_chunk(g, s, ic, ib, ie, jc + jr, nr, bp, every, kc, accumulate);
#else
            // The dense path's depth blocks (kKC), each added to the sums as it ends,
            // so that both paths sum in the same order.  Tiles that do not go straight
            // to C keep their running sums in part (when C holds nothing yet) and are
            // stored once, at the end.
            for (int64_t sub = 0; sub < kc; sub += kKC) {
              const int64_t w0 = sub / 64, w1 = min64(s.words, (sub + kKC) / 64);
              const bool add = accumulate || sub > 0;
              const bool flush = accumulate || sub + kKC >= kc;  // part to C, adding if accumulate
              for (int64_t i0 = ib; i0 < ie; i0 += 4) {
                const uint64_t* bits = every ? s.all : s.bits + i0 * s.words;
                const int64_t bld = every ? 0 : s.words;
                const float* kept = (every ? s.vals : s.kept) + i0 * s.vld;
                float* part = s.part + (i0 - ib) * kSNR;
                float* c = g.c + (ic + i0) * g.N + jc + jr;
                if (!g.c_trans && i0 + 4 <= ie && nr == kSNR) {  // a whole 4 x SNR tile of C
                  if (add) prefetch_tile(c, g.N, 4, kSNR);
                  sparse_rows(w0, w1, kept, s.vld, bits, bld, bp, c, g.N, add);
                  continue;
                }
                sparse_rows(w0, w1, kept, s.vld, bits, bld, bp, part, kSNR, !accumulate && sub > 0);
                if (g.c_trans || !flush) continue;  // stored below, transposed / later
                for (int64_t r = 0; r < min64(4, ie - i0); ++r)  // an edge tile
                  for (int64_t n = 0; n < nr; ++n) {
                    const float v = part[r * kSNR + n];
                    c[r * g.N + n] = accumulate ? c[r * g.N + n] + v : v;
                  }
              }
              if (g.c_trans && flush) {  // C(i, n) -> c[n * M + i]: 64 rows become 64 contiguous floats
                const int64_t rows = ie - ib;
                float* base = g.c + (jc + jr) * g.M + ic + ib;
                for (int64_t nb = 0; nb < nr; nb += kT)
                  for (int64_t rb = 0; rb < rows; rb += kT) {
                    if (nb + kT <= nr && rb + kT <= rows) {  // kT x kT through the tile
                      transpose_block(s.part + rb * kSNR + nb, kSNR, s.tile, kT);
                      for (int64_t n = 0; n < kT; ++n) {
                        float* dst = base + (nb + n) * g.M + rb;
                        const float* src = s.tile + n * kT;
                        for (int64_t r = 0; r < kT; ++r) dst[r] = accumulate ? dst[r] + src[r] : src[r];
                      }
                      continue;
                    }
                    for (int64_t n = nb; n < min64(nr, nb + kT); ++n)
                      for (int64_t r = rb; r < min64(rows, rb + kT); ++r) {
                        const float v = s.part[r * kSNR + n];
                        float* dst = base + n * g.M + r;
                        *dst = accumulate ? *dst + v : v;
                      }
                  }
              }
            }
#endif
          }
        }
        if (last && !g.c_trans) epilogue(g, ic, ic + mc, jc, jc + nc);
      }
    }
  }
}

#endif  // FD_ISA_SPARSE

#if defined(FD_ISA_DIRECT)
// ---------------------------------------------------------------------------
// Direct path: a batch of one to four rows against a plain float32 weight, read where it
// lies (op(B) is its transpose in the forward, the weight itself in grad_x).  Packing the
// weight into B panels, which the micro-kernel then reads back, costs as much as the
// multiplication at one row, and the micro-kernel computes kMR rows whatever the batch:
// at 1x1024x1024 the packed path took 5x NumPy's time.  Here microkernel_direct transposes
// the weight's rows in registers on their way to the FMAs (microkernel_direct_rows loads
// them as they are), and only the rows there are are computed.  Each output is the same
// FMA chain per depth block as on the packed path, so the two give the same bits.
// ---------------------------------------------------------------------------
static inline bool direct_path(const GemmProblem& g, int64_t rows) {
  return rows <= kDirectRows && !g.b.mask.enabled && !g.b.h && !g.b.z && !g.c_trans;
}

/// Columns n0 .. n1 of rows m0 .. m0 + R - 1 of C, whose A values (all depths) are packed
/// at ap; wtmp holds 8 x kKC floats and tile 8 R.  The weight is op(B)'s transpose (the
/// forward: its rows are read start to end, each group of columns through every depth
/// block before the next group, streams the prefetchers follow) or op(B) itself (grad_x:
/// each depth block's rows are read across all the columns before the next block, rather
/// than a narrow strip of every row at a time).
template <int R>
void direct_rows(const GemmProblem& g, int64_t m0, int64_t n0, int64_t n1, const float* ap, float* wtmp,
                 float* tile) {
  float* c = g.c + m0 * g.N;
  const int64_t ldb = g.b.cols;
  // independent chains: (transposed) 3 for one row, 2 x 2 for two, 2 x 3 for three, 1 x 4
  // for four (two groups of four rows spill registers: measured 1.1-1.2x slower at
  // 4x1024x1024); (along the rows) 8 to 12 accumulators
  constexpr int GT = R == 1 ? 3 : (R == 4 ? 1 : 2), GR = R == 1 ? 8 : (R == 4 ? 3 : 4);
  const int64_t wide = 8 * (g.b_trans ? GT : GR);
  const int64_t edge = n0 + (n1 - n0) / 8 * 8, cols = n1 - edge;  // the last columns, fewer than 8
  // columns n .. n + 8 G - 1 (G: GT, GR or 1) over the depths pc .. pc + kc - 1
  auto block = [&](int64_t n, int64_t pc, int64_t kc, bool many) {
    const float* a = ap + pc * kMR;
    if (g.b_trans) {
      const float* w = g.b.p + n * ldb + pc;
      if (many)
        microkernel_direct<R, GT>(kc, a, w, ldb, c + n, g.N, pc > 0);
      else
        microkernel_direct<R, 1>(kc, a, w, ldb, c + n, g.N, pc > 0);
    } else {
      const float* w = g.b.p + pc * ldb + n;
      if (many)
        microkernel_direct_rows<R, GR>(kc, a, w, ldb, c + n, g.N, pc > 0);
      else
        microkernel_direct_rows<R, 1>(kc, a, w, ldb, c + n, g.N, pc > 0);
    }
  };
  // the last columns: their weight values copied beside zeros, the sums through a tile
  auto last = [&](int64_t pc, int64_t kc) {
    const float* a = ap + pc * kMR;
    if (g.b_trans) {  // 8 rows of kc
      for (int64_t j = 0; j < 8; ++j)
        for (int64_t k = 0; k < kc; ++k) wtmp[j * kc + k] = j < cols ? g.b.p[(edge + j) * ldb + pc + k] : 0.0f;
      microkernel_direct<R, 1>(kc, a, wtmp, kc, tile, 8, pc > 0);
    } else {  // kc rows of 8
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < 8; ++j) wtmp[k * 8 + j] = j < cols ? g.b.p[(pc + k) * ldb + edge + j] : 0.0f;
      microkernel_direct_rows<R, 1>(kc, a, wtmp, 8, tile, 8, pc > 0);
    }
  };
  auto groups = [&](auto&& f) {  // f(n, many) for each group of columns: wide ones, then 8 at a time
    int64_t n = n0;
    for (; n + wide <= n1; n += wide) f(n, true);
    for (; n + 8 <= n1; n += 8) f(n, false);
  };
  auto depths = [&](auto&& f) {  // f(pc, kc) for each of the packed path's depth blocks
    for (int64_t pc = 0; pc < g.K; pc += kKC) f(pc, min64(kKC, g.K - pc));
  };
  if (g.b_trans)  // each group through every depth block
    groups([&](int64_t n, bool many) { depths([&](int64_t pc, int64_t kc) { block(n, pc, kc, many); }); });
  else  // each depth block across every group
    depths([&](int64_t pc, int64_t kc) { groups([&](int64_t n, bool many) { block(n, pc, kc, many); }); });
  if (cols == 0) return;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < 8; ++j) tile[r * 8 + j] = 0.0f;
  depths(last);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < cols; ++j) c[r * g.N + edge + j] = tile[r * 8 + j];
}

void direct_gemm_tile(const GemmProblem& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* work) {
  const GemmWork layout = gemm_work(kBlocking, m1 - m0, n1 - n0, g.K);
  float* a_pack = work + layout.a_pack;  // room for kMR x K (gemm_work)
  float* wtmp = work + layout.b_pack;    // 8 x kKC of the kKC x 16 (at least) it holds
  float* buf = work + layout.buf;
  float* tile = work + layout.tile;
  static_assert(kDirectRows <= kMR && 8 * kDirectRows <= kMR * kNR && kNR >= 8, "direct path scratch");
  for (int64_t pc = 0; pc < g.K; pc += kKC)  // one panel whose depth blocks follow each other
    pack(g.a, !g.a_trans, m0, m1 - m0, pc, min64(kKC, g.K - pc), kMR, a_pack + pc * kMR, buf);
  switch (m1 - m0) {
    case 1: direct_rows<1>(g, m0, n0, n1, a_pack, wtmp, tile); break;
    case 2: direct_rows<2>(g, m0, n0, n1, a_pack, wtmp, tile); break;
    case 3: direct_rows<3>(g, m0, n0, n1, a_pack, wtmp, tile); break;
    default: direct_rows<4>(g, m0, n0, n1, a_pack, wtmp, tile); break;
  }
  epilogue(g, m0, m1, n0, n1);
}
#endif  // FD_ISA_DIRECT

#if defined(FD_ISA_BF16_DOT)
// ---------------------------------------------------------------------------
// bfloat16 dot-product path: bfloat16 operands (their values packed as float32 by `pack`,
// then into pairs of depths) multiplied by microkernel_bf16, two depths per instruction,
// where the CPU issues it at the FMA's rate (dispatch.hpp's bf16_dot_enabled).  The same
// blocking and loops as the dense path; a block takes the dot-product kernel only where it
// gives the float32 kernel's bits: every value of both packed blocks bfloat16, finite, zero
// or normal, and the exponent fields ea, eb of their smallest nonzero values with
// ea + eb >= 142.  Then every product is a multiple of 2**(ea + eb - 254 - 14) >= 2**-126,
// and so is every partial sum (rounding keeps multiples of a power of two): none is
// subnormal, which the instruction would flush to zero.  Any other block (a subnormal,
// an inf or NaN, a GELU derivative that is no bfloat16 value) takes the float32 kernel:
// the results never depend on which kernel ran.
// ---------------------------------------------------------------------------
constexpr uint32_t kBf16DotMinExpSum = 142;

inline uint32_t pair_of(uint16_t a, uint16_t b) { return static_cast<uint32_t>(a) << 16 | b; }

/// pack's panels for the dot-product kernel: lanes [l0, l0 + nl) x depth [d0, d0 + nd) into
/// panels of w lanes of depth pairs, out[p kp w + q w + l % w] (kp = ceil(nd / 2), missing
/// lanes and a missing last depth zero), the values scanned into `scan`.  Plain bfloat16
/// rows are paired straight from their 16-bit values, depth rows two at a time from
/// load_segment; anything else is packed as float32 into `fpanel` by `pack`, then paired.
template <int64_t W>
void pack_pairs(const Mat& m, bool lanes_are_rows, int64_t l0, int64_t nl, int64_t d0, int64_t nd, uint32_t* out,
                float* fpanel, float* buf, PairScan& scan) {
  const int64_t kp = (nd + 1) / 2, panels = (nl + W - 1) / W;
  const bool plain = m.h && !m.z && !m.mask.enabled;
  if (plain && lanes_are_rows && W % kT == 0) {
    // rows: kT x kT blocks of pair words transposed in registers, as pack does with floats
    alignas(64) uint32_t tile[kT * kT];
    const int64_t fl = nl / kT * kT, fq = nd / 2 / kT * kT;  // (blocks of whole pairs)
    for (int64_t lb = 0; lb < fl; lb += kT) {
      const uint16_t* src = m.h + (l0 + lb) * m.cols + d0;
      uint32_t* dst = out + (lb / W) * kp * W + (lb % W);
      for (int64_t qb = 0; qb < fq; qb += kT) {
        for (int64_t l = 0; l < kT; ++l) row_pairs16(src + l * m.cols + 2 * qb, tile + l * kT);
        transpose_block(reinterpret_cast<const float*>(tile), kT, reinterpret_cast<float*>(dst + qb * W), W);
      }
      for (int64_t l = 0; l < kT; ++l)
        for (int64_t q = fq; q < kp; ++q)
          dst[q * W + l] = pair_of(src[l * m.cols + 2 * q], 2 * q + 1 < nd ? src[l * m.cols + 2 * q + 1] : 0);
    }
    for (int64_t l = fl; l < panels * W; ++l) {
      uint32_t* dst = out + (l / W) * kp * W + (l % W);
      const uint16_t* src = m.h + (l0 + l) * m.cols + d0;
      for (int64_t q = 0; q < kp; ++q)
        dst[q * W] = l < nl ? pair_of(src[2 * q], 2 * q + 1 < nd ? src[2 * q + 1] : 0) : 0;
    }
  } else if (!lanes_are_rows && nd >= 2) {
    // depth rows (lanes contiguous), as load_segment gives them (widened, masked, times an
    // activation's derivative): two rows into the float32 panel's room (nl x nd floats),
    // then paired
    float* row0 = fpanel;
    float* row1 = fpanel + nl;
    for (int64_t q = 0; q < kp; ++q) {
      const float* r0 = load_segment(m, d0 + 2 * q, l0, nl, row0);
      const float* r1 = 2 * q + 1 < nd ? load_segment(m, d0 + 2 * q + 1, l0, nl, row1) : nullptr;
      for (int64_t p = 0; p < panels; ++p) {
        uint32_t* dst = out + p * kp * W + q * W;
        const int64_t have = min64(W, nl - p * W);
        for (int64_t l = 0; l < W; l += 16) {
          const int64_t n = min64(16, W - l), real = min64(n, have - l);
          if (real > 0) pair_float_rows(r0 + p * W + l, r1 ? r1 + p * W + l : nullptr, dst + l, real, scan);
          for (int64_t i = real > 0 ? real : 0; i < n; ++i) dst[l + i] = 0;
        }
      }
    }
    return;
  } else {
    pack(m, lanes_are_rows, l0, nl, d0, nd, W, fpanel, buf);
    to_pairs<W>(fpanel, panels, nd, out, scan);
    return;
  }
  scan_pairs(out, panels * kp * W, scan);
}

void bf16_gemm_tile(const GemmProblem& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* work) {
  const GemmWork layout = gemm_work(kBlocking, m1 - m0, n1 - n0, g.K);
  float* a_pack = work + layout.a_pack;
  float* b_pack = work + layout.b_pack;
  float* buf = work + layout.buf;
  float* tile = work + layout.tile;
  uint32_t* a_pairs = reinterpret_cast<uint32_t*>(work + layout.a_pairs);
  uint32_t* b_pairs = reinterpret_cast<uint32_t*>(work + layout.b_pairs);
  for (int64_t pc = 0; pc < g.K; pc += kKC) {
    const int64_t kc = min64(kKC, g.K - pc), kp = (kc + 1) / 2;
    const bool accumulate = pc > 0, last = pc + kc >= g.K;
    for (int64_t ic = m0; ic < m1; ic += kMC) {
      const int64_t mc = min64(kMC, m1 - ic);
      PairScan sa;
      pack_pairs<kMR>(g.a, !g.a_trans, ic, mc, pc, kc, a_pairs, a_pack, buf, sa);
      uint32_t ea = 0;
      const bool a_ok = sa.finish(&ea);
      bool a_floats = false;  // whether a_pack holds A as float32 (for the float32 kernel)
      for (int64_t jc = n0; jc < n1; jc += kNC) {
        const int64_t nc = min64(kNC, n1 - jc);
        bool dot = false;
        if (a_ok) {
          PairScan sb;
          pack_pairs<kNR>(g.b, g.b_trans, jc, nc, pc, kc, b_pairs, b_pack, buf, sb);
          uint32_t eb = 0;
          dot = sb.finish(&eb) && ea + eb >= kBf16DotMinExpSum;
        }
        if (dot) {
          bf16_dot_blocks.fetch_add(1, std::memory_order_relaxed);
        } else {  // this block on the float32 kernel
          if (!a_floats) pack(g.a, !g.a_trans, ic, mc, pc, kc, kMR, a_pack, buf);
          a_floats = true;
          pack(g.b, g.b_trans, jc, nc, pc, kc, kNR, b_pack, buf);
        }
        block_tiles(g, ic, mc, jc, nc, accumulate, tile, [&](int64_t ir, int64_t jr, float* dst, int64_t ld) {
          if (dot)
            microkernel_bf16(kp, a_pairs + ir * kp, b_pairs + jr * kp, dst, ld, accumulate);
          else
            microkernel(kc, a_pack + ir * kc, b_pack + jr * kc, dst, ld, accumulate);
        });
        if (last) epilogue(g, ic, ic + mc, jc, jc + nc);
      }
    }
  }
}
#endif  // FD_ISA_BF16_DOT

void gemm_tile(const GemmProblem& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* work) {
  if (m0 >= m1 || n0 >= n1) return;
#if defined(FD_ISA_SPARSE)
  if (g.K > 0 && sparse_path(g, kBlocking)) {
    sparse_gemm_tile(g, m0, m1, n0, n1, work);
    return;
  }
#endif
  if (g.K == 0) {
    for (int64_t r = m0; r < m1; ++r)
      for (int64_t c = n0; c < n1; ++c) g.c[g.c_trans ? c * g.M + r : r * g.N + c] = 0.0f;
    if (!g.c_trans) epilogue(g, m0, m1, n0, n1);
    return;
  }
#if defined(FD_ISA_DIRECT)
  if (direct_path(g, m1 - m0)) {
    direct_gemm_tile(g, m0, m1, n0, n1, work);
    return;
  }
#endif
#if defined(FD_ISA_BF16_DOT)
  if (g.allow_bf16_dot) {
    bf16_gemm_tile(g, m0, m1, n0, n1, work);
    return;
  }
#endif
  const GemmWork layout = gemm_work(kBlocking, m1 - m0, n1 - n0, g.K);
  float* a_pack = work + layout.a_pack;
  float* b_pack = work + layout.b_pack;
  float* buf = work + layout.buf;
  float* tile = work + layout.tile;
  // Loop order pc -> ic -> (pack A) -> jc -> (pack B) -> ir -> jr: the A
  // micro-panel (MR x kc, the broadcast operand) stays in L1 while B micro-panels
  // stream from the L2-resident B block, and the masked A block is packed (its
  // Philox words generated) once per (pc, ic), never once per column block.
  for (int64_t pc = 0; pc < g.K; pc += kKC) {
    const int64_t kc = min64(kKC, g.K - pc);
    const bool accumulate = pc > 0, last = pc + kc >= g.K;
    for (int64_t ic = m0; ic < m1; ic += kMC) {
      const int64_t mc = min64(kMC, m1 - ic);
      pack(g.a, !g.a_trans, ic, mc, pc, kc, kMR, a_pack, buf);
      for (int64_t jc = n0; jc < n1; jc += kNC) {
        const int64_t nc = min64(kNC, n1 - jc);
        pack(g.b, g.b_trans, jc, nc, pc, kc, kNR, b_pack, buf);
        block_tiles(g, ic, mc, jc, nc, accumulate, tile, [&](int64_t ir, int64_t jr, float* dst, int64_t ld) {
          microkernel(kc, a_pack + ir * kc, b_pack + jr * kc, dst, ld, accumulate);
        });
        if (last) epilogue(g, ic, ic + mc, jc, jc + nc);
      }
    }
  }
}

void gemm_epilogue(const GemmProblem& g, int64_t r0, int64_t r1) { epilogue(g, r0, r1, 0, g.N); }

void col_sums(const Mat& m, int64_t n0, int64_t n1, float* sums) {
  constexpr int64_t kChunk = 256;
  double acc[kChunk];
  float row[kChunk];
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t len = min64(kChunk, n1 - c0);
    for (int64_t i = 0; i < len; ++i) acc[i] = 0.0;
    for (int64_t r = 0; r < m.rows; ++r) {
      const float* seg = load_segment(m, r, c0, len, row);
      for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<double>(seg[i]);
    }
    for (int64_t i = 0; i < len; ++i) sums[c0 + i] = static_cast<float>(acc[i]);
  }
}

#include "attention_impl.hpp"
#include "family_impl.hpp"

}  // namespace

const Kernels& kernels() {
  static const Kernels table = {
      FD_ISA_NAME,  philox_many, random_words,
      mask_packed,  mask_bool,   dropout_f32,
      dropout_f64,  dropout_h16, kBlocking,
      gemm_tile,    gemm_epilogue, col_sums,    attention_forward,
      attention_backward_kv,     attention_backward_q,
      family_f32,   family_f64,  gaussian_f32, gaussian_f64, normal_pairs_f32, add_norm_f32,
      add_norm_f64, add_norm_backward_f32, add_norm_backward_f64,
  };
  return table;
}

}  // namespace FD_ISA
}  // namespace fastdropout
