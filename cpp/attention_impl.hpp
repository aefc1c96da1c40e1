// Attention with dropout on the probabilities (the contract's section 7), written
// once: the loops of FlashAttention-2 (T. Dao, "FlashAttention-2: Faster Attention
// with Better Parallelism and Work Partitioning", 2023) on this backend's GEMM
// micro-kernel.  A tile of queries meets a tile of keys: the scores come from the
// micro-kernel, an online softmax turns them into probabilities, the keep bits of
// each tile row come from the Philox stream (never stored), and P @ V is the
// micro-kernel again.  No buffer grows with Lq * Lk; the backward regenerates P and
// the mask from the log-sum-exp kept per query row.
//
// Every tile is computed by the same code whichever thread runs it, and sums run in a
// fixed order (keys in order for grad_q, queries in order for grad_k and grad_v), so
// results are bit-identical for any thread count.
//
// Included by kernels_impl.hpp inside fastdropout::FD_ISA::(anonymous).

/// out[c / w * rows_pad * w + r * w + c % w] = x[r * cols + c]: B panels whose depth
/// runs over x's rows; zero past `rows` and past `cols`.
void pack_by_row(const float* x, int64_t rows, int64_t cols, int64_t rows_pad, int64_t w, float* out) {
  const int64_t panels = (cols + w - 1) / w;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t have = min64(w, cols - p * w);
    float* dst = out + p * rows_pad * w;
    for (int64_t r = 0; r < rows_pad; ++r, dst += w) {
      const int64_t from = r < rows ? have : 0;
      if (from) std::memcpy(dst, x + r * cols + p * w, static_cast<size_t>(from) * sizeof(float));
      for (int64_t l = from; l < w; ++l) dst[l] = 0.0f;
    }
  }
}

/// Rows of x (n x depth, C-contiguous) as panels of w lanes: out[l / w * depth * w + d * w + l % w].
void pack_by_lane(const float* x, int64_t n, int64_t depth, int64_t w, float* out) {
  pack(Mat{x, n, depth, nullptr, Activation::none, MaskSpec{}}, true, 0, n, 0, depth, w, out, nullptr);
}

/// C (mrows x ncols, leading dimension ldc) = (or +=) A @ B, A given as panels of kMR
/// rows (a_stride floats apart), B as panels of kNR columns (b_stride apart), both of
/// the given depth.  mrows and ncols are multiples of kMR and kNR.
/// (Not inlined: inside the large tile functions GCC kept the micro-kernel's
/// accumulators on the stack, halving its speed.)
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void tile_mm(int64_t mrows, int64_t ncols, int64_t depth, const float* a, int64_t a_stride,
                    const float* b, int64_t b_stride, float* c, int64_t ldc, bool accumulate) {
  for (int64_t ir = 0; ir < mrows; ir += kMR)
    for (int64_t jr = 0; jr < ncols; jr += kNR)
      microkernel(depth, a + ir / kMR * a_stride, b + jr / kNR * b_stride, c + ir * ldc + jr, ldc,
                  accumulate);
}

static_assert(kNR % kLanes == 0, "a tile row is whole vectors (row_max, row_exp)");
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

#if !defined(FD_ISA_ROWS)
inline float row_max(const float* x, int64_t n) {
  float r = kMinusInf;
  for (int64_t j = 0; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

inline float row_exp(float* x, int64_t n, float m) {
  float s = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_approx(x[j] - m);
    s += x[j];
  }
  return s;
}
#endif

/// Scores of one tile row in place: x * scale + bias for the first `seen` keys, -inf
/// for the rest of the n (a multiple of nr); returns the row's maximum.
inline float score_row(float* x, int64_t n, int64_t seen, float scale, const float* bias) {
  if (bias)
    for (int64_t j = 0; j < seen; ++j) x[j] = x[j] * scale + bias[j];
  else
    for (int64_t j = 0; j < seen; ++j) x[j] = x[j] * scale;
  for (int64_t j = seen < 0 ? 0 : seen; j < n; ++j) x[j] = kMinusInf;
  return row_max(x, n);
}

/// The keep bits of keys [jb, jb + n) of query row i of item b: word w holds keys
/// jb + 64 w .. jb + 64 w + 63.
inline void tile_row_bits(const AttentionProblem& a, int64_t b, int64_t i, int64_t jb, int64_t n,
                          uint64_t* words) {
  const uint64_t at = a.mask.offset + (static_cast<uint64_t>(b) * static_cast<uint64_t>(a.Lq) +
                                       static_cast<uint64_t>(i)) * static_cast<uint64_t>(a.Lk) +
                      static_cast<uint64_t>(jb);
  BitStream bits(at, a.mask.key, a.mask.threshold);
  for (int64_t w = 0; w * 64 < n; ++w) words[w] = bits.next(n - w * 64);
}

/// x = keep ? x * s : +0 over whole 64-key words (x holds at least that many floats).
inline void apply_keep(float* x, int64_t n, const uint64_t* words, float s) {
  for (int64_t w = 0; w * 64 < n; ++w) select_scale64<false>(x + w * 64, x + w * 64, words[w], s);
}

/// Keys of tile [jb, jb + ncols) that query i sees.
inline int64_t keys_seen(const AttentionProblem& a, int64_t i, int64_t jb, int64_t ncols) {
  if (!a.causal) return ncols;
  const int64_t seen = i - jb + 1;
  return seen < 0 ? 0 : (seen < ncols ? seen : ncols);
}

inline const float* bias_row(const AttentionProblem& a, int64_t b, int64_t i, int64_t jb) {
  return a.bias ? a.bias + a.bias_off[b] + i * a.bias_row_stride + jb : nullptr;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

void attention_forward(const AttentionProblem& a, int64_t b, int64_t i0, int64_t i1, float* work,
                       int64_t* packed) {
  const AttnLayout L = attention_layout(kBlocking, a, false);
  float* kt = work + L.kt;
  float* vb = work + L.vb;
  if (*packed != b) {
    pack_by_lane(a.k + a.k_off[b], a.Lk, a.E, kNR, kt);
    pack_by_row(a.v + a.v_off[b], a.Lk, a.Ev, L.lkp, kNR, vb);
    *packed = b;
  }
  const float* q = a.q + a.q_off[b];
  float *qa = work + L.qa, *s = work + L.s, *pa = work + L.pa, *o = work + L.o;
  float *m = work + L.m, *l = work + L.l;
  auto* words = reinterpret_cast<uint64_t*>(work + L.bits);
  const bool masked = a.mask.enabled;
  const bool drop_all = masked && a.mask.threshold >= kDropAll;
  const float keep_scale = masked ? a.mask.scale : 1.0f;
  for (int64_t ib = i0; ib < i1; ib += L.rows) {
    const int64_t rows = min64(L.rows, i1 - ib), mb = round_up(rows, kMR);
    pack_by_lane(q + ib * a.E, rows, a.E, kMR, qa);
    for (int64_t r = 0; r < mb; ++r) {
      m[r] = kMinusInf;
      l[r] = 0.0f;
    }
    std::memset(o, 0, static_cast<size_t>(mb * L.evp) * sizeof(float));
    const int64_t jend = a.causal ? min64(a.Lk, ib + rows) : a.Lk;
    for (int64_t jb = 0; jb < jend; jb += L.cols) {
      const int64_t ncols = min64(L.cols, a.Lk - jb), nb = round_up(ncols, kNR);
      tile_mm(mb, nb, a.E, qa, a.E * kMR, kt + jb * a.E, a.E * kNR, s, L.cols_ld, false);
      for (int64_t r = 0; r < mb; ++r) {
        float* p = s + r * L.cols_ld;  // the scores become the tile row's probabilities
        bool any = false;
        if (r < rows) {
          const int64_t i = ib + r;
          const float mx = score_row(p, nb, keys_seen(a, i, jb, ncols), a.scale, bias_row(a, b, i, jb));
          const float m_new = mx > m[r] ? mx : m[r];
          if (m_new != kMinusInf) {  // else every key so far is masked: P stays 0
            any = true;
            const float alpha = exp_approx(m[r] - m_new);  // 0 for the first keys seen
            l[r] = l[r] * alpha + row_exp(p, nb, m_new);
            m[r] = m_new;
            if (alpha != 1.0f)
              for (int64_t c = 0; c < L.evp; ++c) o[r * L.evp + c] *= alpha;
            if (masked) {
              tile_row_bits(a, b, i, jb, ncols, words);
              apply_keep(p, nb, words, 1.0f);
            }
          }
        }
        float* dst = pa + r / kMR * nb * kMR + r % kMR;
        if (any)
          for (int64_t j = 0; j < nb; ++j) dst[j * kMR] = p[j];
        else
          for (int64_t j = 0; j < nb; ++j) dst[j * kMR] = 0.0f;
      }
      tile_mm(mb, L.evp, nb, pa, nb * kMR, vb + jb * kNR, L.lkp * kNR, o, L.evp, true);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = b * a.Lq + ib + r;
      float* out = a.out + row * a.Ev;
      const bool empty = l[r] == 0.0f;  // every key masked
      const float f = empty || drop_all ? 0.0f : keep_scale / l[r];
      for (int64_t c = 0; c < a.Ev; ++c) out[c] = o[r * L.evp + c] * f;
      a.lse[row] = empty ? kMinusInf : m[r] + std::log(l[r]);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward: dV = dropout(P)^T dO, dP = dropout'(dO V^T), dS = P * (dP - rowsum(dO * O)),
// dQ = scale * dS K, dK = scale * dS^T Q
// ---------------------------------------------------------------------------

/// Packs item b's operands for the backward (all of them: O(L * E) floats) and the
/// per-row rowsum(dO * O).
void attention_pack_backward(const AttentionProblem& a, const AttnLayout& L, int64_t b, float* work) {
  const float *q = a.q + a.q_off[b], *k = a.k + a.k_off[b], *v = a.v + a.v_off[b];
  const float* dout = a.grad_out + b * a.Lq * a.Ev;
  const float* out = a.out + b * a.Lq * a.Ev;
  pack_by_lane(k, a.Lk, a.E, kNR, work + L.kt);
  pack_by_row(k, a.Lk, a.E, L.lkp, kNR, work + L.kb);
  pack_by_lane(v, a.Lk, a.Ev, kNR, work + L.vt);
  pack_by_lane(q, a.Lq, a.E, kMR, work + L.qa);
  pack_by_lane(dout, a.Lq, a.Ev, kMR, work + L.doa);
  pack_by_row(q, a.Lq, a.E, L.lqp, kMR, work + L.qt);
  pack_by_row(dout, a.Lq, a.Ev, L.lqp, kMR, work + L.dot);
  float* delta = work + L.delta;
  for (int64_t i = 0; i < a.Lq; ++i) {
    double acc = 0.0;
    for (int64_t c = 0; c < a.Ev; ++c)
      acc += static_cast<double>(dout[i * a.Ev + c]) * static_cast<double>(out[i * a.Ev + c]);
    delta[i] = static_cast<float>(acc);
  }
}

/// The tile of queries [ib, ib + rows) x keys [jb, jb + ncols) of item b: recomputes P
/// and the mask, then adds its share to grad_k^T and grad_v^T (want_kv) and to dq
/// (want_q).  grad_v^T += dO^T dropout(P) and grad_k^T += Q^T dS take dropout(P) and
/// dS as B panels, whose rows are plain copies of the tile rows.
void backward_tile(const AttentionProblem& a, const AttnLayout& L, int64_t b, int64_t ib,
                   int64_t rows, int64_t jb, int64_t ncols, float* work, bool want_kv, bool want_q) {
  const int64_t mb = round_up(rows, kMR), nb = round_up(ncols, kNR);
  float *s = work + L.s, *dp = work + L.dp, *pb = work + L.pb, *gb = work + L.gb, *ds = work + L.pa;
  auto* words = reinterpret_cast<uint64_t*>(work + L.bits);
  tile_mm(mb, nb, a.E, work + L.qa + ib * a.E, a.E * kMR, work + L.kt + jb * a.E, a.E * kNR, s,
          L.cols_ld, false);
  tile_mm(mb, nb, a.Ev, work + L.doa + ib * a.Ev, a.Ev * kMR, work + L.vt + jb * a.Ev, a.Ev * kNR,
          dp, L.cols_ld, false);
  const bool masked = a.mask.enabled;
  for (int64_t r = 0; r < mb; ++r) {
    float* p = s + r * L.cols_ld;   // P, then dropout(P)
    float* g = dp + r * L.cols_ld;  // dO V^T, then dS (times scale)
    const int64_t i = ib + r;
    const float lse = r < rows ? a.lse[b * a.Lq + i] : kMinusInf;
    if (lse == kMinusInf) {  // a padding row, or a row with every key masked
      for (int64_t j = 0; j < nb; ++j) p[j] = g[j] = 0.0f;
    } else {
      score_row(p, nb, keys_seen(a, i, jb, ncols), a.scale, bias_row(a, b, i, jb));
      row_exp(p, nb, lse);
      if (masked) {
        tile_row_bits(a, b, i, jb, ncols, words);
        apply_keep(g, nb, words, a.mask.scale);
      }
      const float d = work[L.delta + i];
      for (int64_t j = 0; j < nb; ++j) g[j] = p[j] * (g[j] - d) * a.scale;
      if (masked) apply_keep(p, nb, words, a.mask.scale);
    }
    if (want_kv)
      for (int64_t j = 0; j < nb; j += kNR) {
        std::memcpy(pb + j * mb + r * kNR, p + j, kNR * sizeof(float));
        std::memcpy(gb + j * mb + r * kNR, g + j, kNR * sizeof(float));
      }
    if (want_q) {
      float* to = ds + r / kMR * nb * kMR + r % kMR;
      for (int64_t j = 0; j < nb; ++j) to[j * kMR] = g[j];
    }
  }
  if (want_kv) {
    tile_mm(L.evm, nb, mb, work + L.dot + ib * kMR, L.lqp * kMR, pb, mb * kNR, work + L.dvt, L.cols, true);
    tile_mm(L.em, nb, mb, work + L.qt + ib * kMR, L.lqp * kMR, gb, mb * kNR, work + L.dkt, L.cols, true);
  }
  if (want_q)
    tile_mm(mb, L.ep, nb, ds, nb * kMR, work + L.kb + jb * kNR, L.lkp * kNR, work + L.dq + ib * L.ep,
            L.ep, true);
}

/// dst[j * cols + c] = src[c * ld + j] for j < rows, c < cols.
void copy_transposed(const float* src, int64_t ld, float* dst, int64_t cols, int64_t rows) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < cols; ++c) dst[j * cols + c] = src[c * ld + j];
}

void copy_rows(const float* src, int64_t ld_src, float* dst, int64_t cols, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * cols, src + r * ld_src, static_cast<size_t>(cols) * sizeof(float));
}

void attention_backward_kv(const AttentionProblem& a, int64_t b, int64_t j0, int64_t j1,
                           bool with_grad_q, float* work, int64_t* packed) {
  const AttnLayout L = attention_layout(kBlocking, a, true);
  if (*packed != b) {
    attention_pack_backward(a, L, b, work);
    *packed = b;
  }
  if (with_grad_q) std::memset(work + L.dq, 0, static_cast<size_t>(L.lqp * L.ep) * sizeof(float));
  for (int64_t jb = j0; jb < j1; jb += L.cols) {
    const int64_t ncols = min64(L.cols, a.Lk - jb);
    std::memset(work + L.dkt, 0, static_cast<size_t>(L.em * L.cols) * sizeof(float));
    std::memset(work + L.dvt, 0, static_cast<size_t>(L.evm * L.cols) * sizeof(float));
    for (int64_t ib = 0; ib < a.Lq; ib += L.rows) {
      const int64_t rows = min64(L.rows, a.Lq - ib);
      if (a.causal && jb >= ib + rows) continue;  // no query of the tile sees these keys
      backward_tile(a, L, b, ib, rows, jb, ncols, work, true, with_grad_q);
    }
    copy_transposed(work + L.dkt, L.cols, a.grad_k + (b * a.Lk + jb) * a.E, a.E, ncols);
    copy_transposed(work + L.dvt, L.cols, a.grad_v + (b * a.Lk + jb) * a.Ev, a.Ev, ncols);
  }
  if (with_grad_q) copy_rows(work + L.dq, L.ep, a.grad_q + b * a.Lq * a.E, a.E, a.Lq);
}

void attention_backward_q(const AttentionProblem& a, int64_t b, int64_t i0, int64_t i1, float* work,
                          int64_t* packed) {
  const AttnLayout L = attention_layout(kBlocking, a, true);
  if (*packed != b) {
    attention_pack_backward(a, L, b, work);
    *packed = b;
  }
  for (int64_t ib = i0; ib < i1; ib += L.rows) {
    const int64_t rows = min64(L.rows, i1 - ib);
    std::memset(work + L.dq + ib * L.ep, 0, static_cast<size_t>(round_up(rows, kMR) * L.ep) * sizeof(float));
    const int64_t jend = a.causal ? min64(a.Lk, ib + rows) : a.Lk;
    for (int64_t jb = 0; jb < jend; jb += L.cols)
      backward_tile(a, L, b, ib, rows, jb, min64(L.cols, a.Lk - jb), work, false, true);
    copy_rows(work + L.dq + ib * L.ep, L.ep, a.grad_q + (b * a.Lq + ib) * a.E, a.E, rows);
  }
}
