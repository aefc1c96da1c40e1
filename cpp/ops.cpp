#include "ops.hpp"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>

#if defined(FD_HAVE_OPENMP)
#include <omp.h>
#endif

#include "dispatch.hpp"

namespace fastdropout {
namespace ops {
namespace {

int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------
// Neighbours.  Another library's idle threads (OpenBLAS's busy-wait, with no sched_yield,
// for about 110 ms after a NumPy matmul; an OpenMP runtime's for milliseconds) can hold the core
// one of our threads runs on.  The scheduler then gives that thread a fraction of it,
// and a parallel region waits for its share: measured on 2 vCPUs, a 64x784x512
// dropout_dense right after a NumPy matmul took 4-7 ms on 2 threads against 0.9 ms on
// one.  So each parallel region compares, for each of its threads, the wall time since
// the region began with the CPU time the thread got.  A neighbour is taken to be there
// when some thread went without its core for more than half of a region twice, with no
// clean region between (once is the system's noise: a 131072-element dropout in a loop
// lost 0.1-1 ms once in a few hundred calls), or lost 2 ms or more at once (the
// scheduler's time slice, which a spinning neighbour takes).  Then, for 50 ms (doubling
// while it recurs, up to 200 ms), a problem whose one-thread time (measured here per unit
// of work) is below four times the time that thread lost runs on one thread (taking the
// loss as a fixed delay, twice would be the break-even for our own call; four counts the
// neighbour's gain too, since our idle worker then no longer spins beside it); after that,
// a region on all threads probes again.  (Longer windows probed less often in a loop with
// NumPy but stayed on one thread for up to a second after NumPy's calls stopped, and a
// PyTorch op that shares our OpenMP threads then found them asleep: 1.5x slower at
// 64x784x512.)  Only speed changes: every result is bit-identical for any thread count.
// FASTDROPOUT_ADAPT_THREADS=0 turns this off.
// ---------------------------------------------------------------------------

/// The kind of work a team's units stand for (each has its own measured cost).
enum WorkKind { kElements = 0, kFlops = 1 };

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// The calling thread's CPU time (ns); -1 where the platform has no such clock.
int64_t thread_cpu_ns() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
#endif
  return -1;
}

constexpr int64_t kBackoffMin = 50'000'000, kBackoffMax = 200'000'000;  // ns
constexpr int64_t kLostFloor = 50'000;  // ns: less is a worker's wake-up, not a neighbour
constexpr int kStrikes = 2;  // regions in a row that must see it
constexpr int64_t kSliceNs = 2'000'000;  // a loss this long is seen at once (the system's noise measured up to 1 ms)
constexpr int64_t kPreciseNs = 200'000;  // a thread's expected share from which CPU time is read

struct Neighbours {
  std::atomic<int64_t> until{0};  ///< steady-clock ns: until then, small problems run on one thread
  std::atomic<int64_t> lost{0};   ///< the time (ns) a thread went without its core, that set `until`
  std::atomic<int64_t> backoff{kBackoffMin};
  std::atomic<int> strikes{0};  ///< regions in a row that saw a thread lose its core
  std::atomic<int64_t> unit_ns[2] = {{0}, {0}};  ///< one thread's ns per unit of work, averaged
};
Neighbours g_neighbours;

bool adapt_threads() {
  static const bool on = [] {
    const char* v = std::getenv("FASTDROPOUT_ADAPT_THREADS");
    return !(v && std::strcmp(v, "0") == 0) && thread_cpu_ns() >= 0;
  }();
  return on;
}

/// Folds one measured one-thread time per unit into the running average (weight 1/8).
void note_unit_time(WorkKind kind, int64_t ns_per_unit) {
  if (ns_per_unit <= 0) return;
  std::atomic<int64_t>& avg = g_neighbours.unit_ns[kind];
  const int64_t old = avg.load(std::memory_order_relaxed);
  avg.store(old == 0 ? ns_per_unit : old + (ns_per_unit - old) / 8, std::memory_order_relaxed);
}

void atomic_max(std::atomic<int64_t>& a, int64_t v) {
  int64_t seen = a.load(std::memory_order_relaxed);
  while (v > seen && !a.compare_exchange_weak(seen, v, std::memory_order_relaxed)) {
  }
}

/// Small problems run on one thread from `t` for the backoff, which doubles.
void mark_neighbour(int64_t t, int64_t lost) {
  Neighbours& nb = g_neighbours;
  nb.strikes.store(0, std::memory_order_relaxed);
  const int64_t backoff = nb.backoff.load(std::memory_order_relaxed);
  nb.lost.store(lost, std::memory_order_relaxed);
  nb.until.store(t + backoff, std::memory_order_relaxed);
  nb.backoff.store(min64(2 * backoff, kBackoffMax), std::memory_order_relaxed);
}

/// The threads a problem gets, its work in units (of its kind's grain: 2^16 elements, 2^20
/// FLOPs) and that kind, whose measured cost per unit the neighbour rule compares with.
struct Team {
  int threads;
  int64_t units;
  WorkKind kind;
};

/// Times one parallel region: each thread calls enter() when it starts and leave()
/// when its share is done; the caller calls done() after the region.  A thread's lost
/// time is the wall time since the region began less the CPU time it got; in a region
/// expected to be short (under kPreciseNs a thread, by the measured cost) only how late
/// the thread started counts, since a CPU-time read is a system call (0.8 us on a virtual
/// machine, 2-3% of a 60 us region).
class TeamClock {
 public:
  struct Mark {
    int64_t wall, cpu;
  };
  explicit TeamClock(const Team& team)
      : kind_(team.kind), units_(team.units), on_(adapt_threads()), t0_(on_ ? now_ns() : 0) {
    const int64_t unit = g_neighbours.unit_ns[kind_].load(std::memory_order_relaxed);
    precise_ = unit == 0 || unit * units_ / max64(team.threads, 1) >= kPreciseNs;
  }
  Mark enter() const {
    if (!on_) return {0, 0};
    return {now_ns(), precise_ ? thread_cpu_ns() : 0};
  }
  void leave(const Mark& m) {
    if (!on_) return;
    const int64_t now = now_ns();
    const int64_t cpu = precise_ ? thread_cpu_ns() - m.cpu : now - m.wall;
    atomic_max(lost_, precise_ ? now - t0_ - cpu : m.wall - t0_);
    cpu_.fetch_add(cpu, std::memory_order_relaxed);
  }
  void done() {
    if (!on_) return;
    const int64_t t = now_ns(), span = t - t0_, lost = lost_.load(std::memory_order_relaxed);
    Neighbours& nb = g_neighbours;
    const bool lost_core = lost > kLostFloor && 2 * lost > span;
    // The threads' CPU time is the work's cost whatever the neighbours did (a short region's
    // wall time per thread only where no thread lost its core).  A sleeping runtime's
    // wake-up (50-100 us here) keeps small regions from ever being clean, so this is not
    // left to clean regions.
    if (precise_ || !lost_core) note_unit_time(kind_, cpu_.load(std::memory_order_relaxed) / units_);
    if (lost_core) {
      // once is the system's noise (an interrupt, a page fault); twice, or a loss of a
      // scheduler's time slice at once, a neighbour
      if (nb.strikes.fetch_add(1, std::memory_order_relaxed) + 1 >= kStrikes || lost >= kSliceNs) mark_neighbour(t, lost);
    } else if (8 * lost < span) {  // a clean region (one in between changes nothing)
      nb.strikes.store(0, std::memory_order_relaxed);
      nb.backoff.store(kBackoffMin, std::memory_order_relaxed);
    }
  }

 private:
  WorkKind kind_;
  int64_t units_;
  bool on_, precise_ = true;
  int64_t t0_;
  std::atomic<int64_t> lost_{0}, cpu_{0};
};

/// The team for `work` (in the kind's own measure: elements or FLOPs) at ~`grain` of it per
/// thread: one thread while a neighbour holds our cores and the problem is small (see
/// Neighbours above).
Team team_for(int64_t work, int64_t grain, WorkKind kind) {
  const int64_t units = max64(1, work / grain);
  int threads = static_cast<int>(min64(get_num_threads(), units));
  if (threads > 1 && adapt_threads()) {
    const Neighbours& nb = g_neighbours;
    const int64_t unit = nb.unit_ns[kind].load(std::memory_order_relaxed);  // 0: not measured yet
    if (unit > 0 && now_ns() < nb.until.load(std::memory_order_relaxed) &&
        unit * units < 4 * nb.lost.load(std::memory_order_relaxed))
      threads = 1;
  }
  return {threads, units, kind};
}

constexpr int64_t kFlopGrain = int64_t{1} << 20;  // ~1 MFLOP a thread at least

/// Runs f() on the calling thread alone.  A problem that more threads could have taken has
/// its time noted as the per-unit cost that team_for compares with (wall time: a CPU-time
/// read is a system call, 0.8 us on a virtual machine, too dear for the smallest calls).
template <class F>
void run_alone(const Team& team, F&& f) {
  if (team.units < 2 || get_num_threads() < 2 || !adapt_threads()) {
    f();
    return;
  }
  const int64_t t0 = now_ns();
  f();
  note_unit_time(team.kind, (now_ns() - t0) / team.units);
}

/// Ranges per thread that parallel_ranges aims for when the work allows.
constexpr int64_t kRangesPerThread = 8;

/// Calls f(begin, end) on disjoint ranges covering [0, n); range starts are
/// multiples of `align`, and each range has at least `grain` elements unless it is the
/// last.  Up to kRangesPerThread ranges per thread, handed out as threads ask for them:
/// a thread that loses part of its core (to another process, or to another library's
/// spinning worker, such as OpenBLAS's after a NumPy matmul) takes fewer of them instead
/// of holding the others up at the end.  Which thread runs a range never changes a result.
template <class F>
void parallel_ranges(int64_t n, int64_t align, int64_t grain, F&& f) {
  const Team team = team_for(n, grain, kElements);
  const int threads = team.threads;
  if (threads <= 1) {
    if (n > 0) run_alone(team, [&] { f(int64_t{0}, n); });
    return;
  }
  const int64_t ranges = int64_t{threads} * kRangesPerThread;
  const int64_t per = round_up(max64((n + ranges - 1) / ranges, grain), align);
  const int64_t count = (n + per - 1) / per;
  TeamClock clock(team);
#if defined(FD_HAVE_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    const TeamClock::Mark mark = clock.enter();
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t r = 0; r < count; ++r) f(r * per, min64(n, r * per + per));
    clock.leave(mark);
  }
#else
  for (int64_t r = 0; r < count; ++r) f(r * per, min64(n, r * per + per));
#endif
  clock.done();
}

constexpr int64_t kElementGrain = 1 << 16;

/// Outputs larger than this many bytes are written with streaming stores: far
/// beyond the last-level cache share of a core, caching them only evicts data.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

}  // namespace

void philox(const uint32_t* ctr, uint32_t* out, int64_t n, PhiloxKey key, int rounds) {
  active_kernels().philox(ctr, out, n, key, rounds);
}

namespace {
/// body(begin, count, j0, key) over thread ranges of the n elements whose
/// random word indices start at offset.
template <class Body>
void over_stream(int64_t n, uint64_t seed, uint64_t offset, Body&& body) {
  const PhiloxKey key = key_from_seed(seed);
  parallel_ranges(n, 64, kElementGrain, [&](int64_t b, int64_t e) {
    body(b, e - b, offset + static_cast<uint64_t>(b), key);
  });
}

template <class T, class Fn>
void dropout_any(Fn kernel, const T* x, T* y, int64_t n, uint64_t seed, uint64_t offset,
                 uint64_t threshold, T scale) {
  const bool stream = n * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  over_stream(n, seed, offset, [&](int64_t b, int64_t len, uint64_t j, PhiloxKey key) {
    kernel(x + b, y + b, len, j, key, threshold, scale, stream);
  });
}
}  // namespace

void random_words(uint32_t* out, int64_t n, uint64_t seed, uint64_t offset) {
  const Kernels& k = active_kernels();
  over_stream(n, seed, offset, [&](int64_t b, int64_t len, uint64_t j, PhiloxKey key) {
    k.random_words(out + b, len, j, key);
  });
}

void mask_packed(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold) {
  const Kernels& k = active_kernels();
  over_stream(n, seed, offset, [&](int64_t b, int64_t len, uint64_t j, PhiloxKey key) {
    k.mask_packed(out + b / 8, len, j, key, threshold);  // ranges start on multiples of 64
  });
}

void mask_bool(uint8_t* out, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold) {
  const Kernels& k = active_kernels();
  over_stream(n, seed, offset, [&](int64_t b, int64_t len, uint64_t j, PhiloxKey key) {
    k.mask_bool(out + b, len, j, key, threshold);
  });
}

void dropout(const float* x, float* y, int64_t n, uint64_t seed, uint64_t offset,
             uint64_t threshold, float scale) {
  dropout_any(active_kernels().dropout_f32, x, y, n, seed, offset, threshold, scale);
}

void dropout(const double* x, double* y, int64_t n, uint64_t seed, uint64_t offset,
             uint64_t threshold, double scale) {
  dropout_any(active_kernels().dropout_f64, x, y, n, seed, offset, threshold, scale);
}

void dropout_h16(const uint16_t* x, uint16_t* y, int64_t n, uint64_t seed, uint64_t offset,
                 uint64_t threshold, float scale, bool bf16) {
  const Kernels& k = active_kernels();
  over_stream(n, seed, offset, [&](int64_t b, int64_t len, uint64_t j, PhiloxKey key) {
    k.dropout_h16(x + b, y + b, len, j, key, threshold, scale, bf16);
  });
}

MaskSpec make_mask(bool enabled, uint64_t seed, uint64_t offset, uint64_t threshold, float scale) {
  MaskSpec m;
  // p = 0 keeps everything with scale 1: no mask to apply at all
  m.enabled = enabled && !(threshold == 0 && scale == 1.0f);
  m.key = key_from_seed(seed);
  m.offset = offset;
  m.threshold = threshold;
  m.scale = scale;
  return m;
}

/// The calling thread's GEMM scratch (packing buffers for every OpenMP thread),
/// kept between calls: a fresh allocation of a few MB costs a page fault per 4 KB
/// page on every call, which is most of the time of a small layer.  Its size is
/// bounded by the cache blocking, never by the problem.
float* scratch(size_t floats) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local size_t have = 0;
  if (floats > have) {
    buffer.reset();  // release the old block first
    buffer.reset(new float[floats]);
    have = floats;
  }
  return buffer.get();
}

/// The calling thread's buffer of drawn keep bits (MaskSpec::bits) for GEMM operand
/// `which` (0: A, 1: B), kept between calls as scratch is.
uint64_t* bits_scratch(int which, size_t words) {
  thread_local std::unique_ptr<uint64_t[]> buffer[2];
  thread_local size_t have[2] = {0, 0};
  if (words > have[which]) {
    buffer[which].reset();
    buffer[which].reset(new uint64_t[words]);
    have[which] = words;
  }
  return buffer[which].get();
}

/// Part t of `parts` of drawing the keep bits of masked matrix m into bits (64-element
/// ranges, so that each thread writes whole words), and the spare word.
void draw_bits(const Kernels& k, const Mat& m, uint64_t* bits, int t, int parts) {
  const int64_t n = m.rows * m.cols, words = (n + 63) / 64;
  const int64_t per = (words + parts - 1) / parts;
  const int64_t w0 = min64(words, t * per), w1 = min64(words, w0 + per);
  if (w0 < w1) {
    const int64_t e0 = w0 * 64, e1 = min64(n, w1 * 64);
    uint8_t* out = reinterpret_cast<uint8_t*>(bits + w0);
    k.mask_packed(out, e1 - e0, m.mask.offset + static_cast<uint64_t>(e0), m.mask.key, m.mask.threshold);
    for (int64_t b = (e1 - e0 + 7) / 8; b < (w1 - w0) * 8; ++b) out[b] = 0;  // past n
  }
  if (t == parts - 1) bits[words] = 0;
}

NeighbourState neighbour_state() {
  const Neighbours& nb = g_neighbours;
  NeighbourState st;
  st.adapting = adapt_threads();
  st.one_thread_ns_left = max64(0, nb.until.load() - now_ns());
  st.lost_ns = nb.lost.load();
  st.backoff_ns = nb.backoff.load();
  st.unit_ns_elements = nb.unit_ns[kElements].load();
  st.unit_ns_flops = nb.unit_ns[kFlops].load();
  return st;
}

void note_neighbour(int64_t lost_ns) {
  if (lost_ns > 0) {
    mark_neighbour(now_ns(), lost_ns);
    return;
  }
  g_neighbours.until.store(0);
  g_neighbours.lost.store(0);
  g_neighbours.backoff.store(kBackoffMin);
  g_neighbours.strikes.store(0);
}

int gemm_threads(int64_t flops) { return team_for(flops, kFlopGrain, kFlops).threads; }

namespace {
/// The calling thread's buffer for a narrow product's transposed C (see narrow_output),
/// kept between calls as scratch is.
float* narrow_scratch(size_t floats) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local size_t have = 0;
  if (floats > have) {
    buffer.reset();
    buffer.reset(new float[floats]);
    have = floats;
  }
  return buffer.get();
}

int64_t padded(int64_t n, int64_t unit) { return (n + unit - 1) / unit * unit; }

/// Whether C = op(A) op(B) is better computed as C^T = op(B)^T op(A)^T: a product whose
/// output is narrower than the micro-kernel's tile (a classifier's 10 outputs on a tile 32
/// wide: 69% of every FMA padding, and every tile an edge tile) and whose rows fill a tile
/// row.  Decided from the micro-kernel's shape alone (a quarter less padded work at
/// least), not from timings: each element is the same FMA chain in depth order either
/// way, so the bits do not change.
bool narrow_output(const GemmProblem& g, const GemmBlocking& b) {
  if (g.c_trans || g.K == 0 || g.N <= 0 || g.N >= b.nr || g.M <= b.direct_rows) return false;
  const int64_t as_is = padded(g.M, b.mr) * padded(g.N, b.nr), swapped = padded(g.N, b.mr) * padded(g.M, b.nr);
  return 4 * swapped <= 3 * as_is;
}
}  // namespace

static bool bf16_dot_for(const Mat& a, const Mat& b) {
  // bfloat16 values (a ReLU's derivative keeps them so; GELU's does not) on both sides
  auto bf16 = [](const Mat& m) { return m.h && (!m.z || m.zact == Activation::relu); };
  return bf16(a) && bf16(b) && bf16_dot_enabled();
}

void gemm(const GemmProblem& problem) {
  const Kernels& k = active_kernels();
  if (narrow_output(problem, k.blocking)) {
    // C^T into a buffer (no epilogue there), then C's rows from it and their epilogue.
    const GemmProblem& g = problem;
    GemmProblem t;
    t.M = g.N;
    t.N = g.M;
    t.K = g.K;
    t.a = g.b;
    t.a_trans = !g.b_trans;
    t.b = g.a;
    t.b_trans = !g.a_trans;
    float* ct = narrow_scratch(static_cast<size_t>(g.M * g.N));
    t.c = ct;
    gemm(t);
    parallel_ranges(g.M, 1, max64(1, kElementGrain / g.N), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t n = 0; n < g.N; ++n) g.c[r * g.N + n] = ct[n * g.M + r];
      k.gemm_epilogue(g, r0, r1);
    });
    return;
  }
  GemmProblem g = problem;
  // bfloat16 operands on a CPU whose dot product runs at the FMA's rate: the dot-product
  // kernel (two products an instruction) rather than the sparse path (which skips dropped
  // inputs but does one product an FMA, each loading its own vector).
  g.allow_bf16_dot = !g.c_trans && bf16_dot_for(g.a, g.b);
  g.allow_sparse = sparse_path_enabled() && !g.allow_bf16_dot;
  const GemmBlocking& b = k.blocking;
  // ~1 MFLOP per thread at least.  Split the output's rows when each thread gets at
  // least 128 of them (measured at 2 threads against splitting the columns: 2-4% faster
  // at 1024x4096x4096 and 256x1024x1024, 8-12% for grad_weight at 64x784x512, and much
  // less hurt when the host is busy); otherwise its columns when there are enough of
  // them, its rows when there are not.  Each output element is computed whole by one
  // thread, so the split never changes a bit of the result.
  const int64_t flops = 2 * g.M * g.N * max64(g.K, 1);
  Team team = team_for(flops, kFlopGrain, kFlops);
  int& threads = team.threads;
  const int64_t nr = sparse_path(g, b) ? b.sparse_split : b.nr;  // the column unit of the path taken
  const bool split_n = g.M < int64_t{threads} * 128 && (g.N >= int64_t{threads} * nr * 4 || g.N >= g.M);
  const int64_t extent = split_n ? g.N : g.M;
  const int64_t unit = split_n ? nr : b.mr;
  threads = static_cast<int>(min64(threads, max64(1, (extent + unit - 1) / unit)));
  const int64_t per = round_up((extent + threads - 1) / threads, unit);
  const int64_t m_range = split_n ? g.M : per, n_range = split_n ? per : g.N;
  const int64_t stride = gemm_work(b, m_range, n_range, g.K).total;  // (enough for any shorter range)
  float* base = scratch(static_cast<size_t>(stride * threads + 16));
  base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
  auto run = [&](int t) {
    const int64_t lo = t * per, hi = min64(extent, lo + per);
    if (lo >= hi) return;
    float* work = base + t * stride;
    if (split_n)
      k.gemm_tile(g, 0, g.M, lo, hi, work);
    else
      k.gemm_tile(g, lo, hi, 0, g.N, work);
  };
  if (threads <= 1) {
    run_alone(team, [&] { run(0); });
    return;
  }
  // A masked operand that every thread packs whole (A when the columns are split, B
  // when the rows are) would have its Philox words drawn by every thread: the team
  // draws its keep bits once, in parts, and packs from them (the same bits).
  const bool share_a = g.a.mask.enabled && split_n, share_b = g.b.mask.enabled && !split_n;
  auto words = [](const Mat& m) { return static_cast<size_t>((m.rows * m.cols + 63) / 64 + 1); };
  uint64_t* a_bits = share_a ? bits_scratch(0, words(g.a)) : nullptr;
  uint64_t* b_bits = share_b ? bits_scratch(1, words(g.b)) : nullptr;
  if (share_a) g.a.mask.bits = a_bits;
  if (share_b) g.b.mask.bits = b_bits;
  TeamClock clock(team);
#if defined(FD_HAVE_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    const int id = omp_get_thread_num(), team = omp_get_num_threads();
    const TeamClock::Mark mark = clock.enter();
    if (share_a) draw_bits(k, g.a, a_bits, id, team);
    if (share_b) draw_bits(k, g.b, b_bits, id, team);
    if (share_a || share_b) {
#pragma omp barrier
    }
    for (int t = id; t < threads; t += team) run(t);
    clock.leave(mark);
  }
#else
  if (share_a) draw_bits(k, g.a, a_bits, 0, 1);
  if (share_b) draw_bits(k, g.b, b_bits, 0, 1);
  for (int t = 0; t < threads; ++t) run(t);
#endif
  clock.done();
}

void dense_forward(const DenseForward& a) {
  GemmProblem g;
  g.M = a.M;
  g.N = a.N;
  g.K = a.K;
  g.a = Mat{a.x, a.M, a.K, nullptr, Activation::none, a.mask, a.xh};
  g.b = Mat{a.w, a.N, a.K, nullptr, Activation::none, a.weight_mask, a.wh};
  g.a_trans = false;
  g.b_trans = true;  // op(B)(k, n) = w[n, k]
  g.c = a.y;
  g.bias = a.bias;
  g.z_out = a.z;
  g.act = a.act;
  gemm(g);
}

void dense_backward(const DenseBackward& a) {
  const Mat dz{a.dy, a.M, a.N, a.act == Activation::none ? nullptr : a.z, a.act, MaskSpec{}, a.dyh};
  if (a.grad_x) {  // grad_x = mask * (dz @ w) * s
    GemmProblem g;
    g.M = a.M;
    g.N = a.K;
    g.K = a.N;
    g.a = dz;
    g.b = Mat{a.w, a.N, a.K, nullptr, Activation::none, a.weight_mask, a.wh};
    g.c = a.grad_x;
    g.out_mask = a.mask;
    gemm(g);
  }
  if (a.grad_w) {  // grad_w = dz.T @ dropout(x)
    GemmProblem g;
    const Mat xd{a.x, a.M, a.K, nullptr, Activation::none, a.mask, a.xh};
    // On the sparse path: grad_w.T = dropout(x).T @ dz, stored transposed, so that the
    // masked operand is on the left, where the sparse path skips its dropped elements.
    // Its depth is the batch: on avx512 (Zen 4) from 256 rows it measured faster than the
    // dense kernel (23% at 256x1024x1024, p = 0.5; 15% at 300x300x300, p = 0.375), below
    // 128 slower (up to 2.7x at a batch of 8); in between it depends on p.  The backend's
    // sparse_grad_min says from which p, if any.  Re-measured on Zen 4 after the sparse
    // panels' packing was fixed (a driver alternating the two paths, medians of 5): at a
    // batch of 128-192 the sparse form took 0.8-1.27x the dense kernel's time (1.09-1.27x at
    // p = 0.375 and 1024x1024), at 256x1024x1024 and p = 0.3 1.11-1.14x; so 256 and 0.375
    // stay (at 1024x4096x4096 and p = 0.3-0.35 it took 0.86-0.98x: a size-aware rule could
    // take that).
    const bool sparse = sparse_path_enabled() && sparse_mask(a.mask, active_kernels().blocking, true) &&
                        a.M >= 256 && !bf16_dot_for(dz, xd);
    g.M = sparse ? a.K : a.N;
    g.N = sparse ? a.N : a.K;
    g.K = a.M;
    g.a = sparse ? xd : dz;
    g.b = sparse ? dz : xd;
    g.a_trans = true;  // either operand on the left is read transposed
    g.c_trans = sparse;
    g.c = a.grad_w;
    g.out_mask = a.weight_mask;  // DropConnect: grad_w's flat index is w's
    gemm(g);
  }
  if (a.grad_b) {
    const Kernels& k = active_kernels();
    parallel_ranges(a.N, 64, max64(64, (int64_t{1} << 16) / max64(a.M, 1)),
                    [&](int64_t b, int64_t e) { k.col_sums(dz, b, e, a.grad_b); });
  }
}

namespace {
/// Runs body(unit, work, &packed) for units [0, n) on up to `threads` threads, each with
/// its own `stride` floats of scratch and its own record of the item it has packed.
/// Units go to threads dynamically (causal tiles differ in cost); which thread runs a
/// unit never changes its result.
template <class Body>
void attention_units(int64_t n, Team team, int64_t stride, Body&& body) {
  const int threads = team.threads = static_cast<int>(min64(team.threads, n));
  if (n <= 0) return;
  float* base = scratch(static_cast<size_t>(stride * max64(threads, 1) + 16));
  base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
  if (threads <= 1) {
    int64_t packed = -1;
    run_alone(team, [&] {
      for (int64_t u = 0; u < n; ++u) body(u, base, &packed);
    });
    return;
  }
  TeamClock clock(team);
#if defined(FD_HAVE_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    const TeamClock::Mark mark = clock.enter();
    float* work = base + omp_get_thread_num() * stride;
    int64_t packed = -1;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t u = 0; u < n; ++u) body(u, work, &packed);
    clock.leave(mark);
  }
#endif
  clock.done();
}

Team attention_team(const AttentionProblem& a) {
  const int64_t flops = 4 * a.batch * a.Lq * max64(a.Lk, 1) * max64(a.E + a.Ev, 1);
  return team_for(flops, kFlopGrain, kFlops);
}
}  // namespace

void attention_forward(const AttentionProblem& a) {
  const Kernels& k = active_kernels();
  const AttnLayout L = attention_layout(k.blocking, a, false);
  const int64_t tiles = (a.Lq + L.rows - 1) / L.rows;
  attention_units(a.batch * tiles, attention_team(a), L.total, [&](int64_t u, float* work, int64_t* packed) {
    const int64_t b = u / tiles, i0 = u % tiles * L.rows;
    k.attention_forward(a, b, i0, min64(a.Lq, i0 + L.rows), work, packed);
  });
}

void attention_backward(const AttentionProblem& a) {
  const Kernels& k = active_kernels();
  const AttnLayout L = attention_layout(k.blocking, a, true);
  const Team team = attention_team(a);
  if (a.batch >= team.threads || a.Lk == 0) {  // whole items: grad_q summed as the keys go
    attention_units(a.batch, team, L.total, [&](int64_t b, float* work, int64_t* packed) {
      k.attention_backward_kv(a, b, 0, a.Lk, true, work, packed);
    });
    return;
  }
  // Fewer items than threads: grad_k and grad_v by key tile, then grad_q by query tile
  // (the same tiles summed in the same order, so the same bits as above).
  const int64_t ktiles = (a.Lk + L.cols - 1) / L.cols, qtiles = (a.Lq + L.rows - 1) / L.rows;
  attention_units(a.batch * ktiles, team, L.total, [&](int64_t u, float* work, int64_t* packed) {
    const int64_t b = u / ktiles, j0 = u % ktiles * L.cols;
    k.attention_backward_kv(a, b, j0, min64(a.Lk, j0 + L.cols), false, work, packed);
  });
  attention_units(a.batch * qtiles, team, L.total, [&](int64_t u, float* work, int64_t* packed) {
    const int64_t b = u / qtiles, i0 = u % qtiles * L.rows;
    k.attention_backward_q(a, b, i0, min64(a.Lq, i0 + L.rows), work, packed);
  });
}

// --------------------------------------------------------------------------- the family

namespace {
template <class T, class Kernel>
void family_any(Kernel kernel, const T* x, T* y, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold,
                const ElemOp& op) {
  over_stream(n, seed, offset, [&](int64_t b, int64_t len, uint64_t j, PhiloxKey key) {
    KeepSource src;
    src.kind = KeepSource::stream;
    src.j0 = j;
    src.key = key;
    src.threshold = threshold;
    kernel(x + b, y + b, len, src, op);
  });
}

template <class T, class Kernel>
void family_noise_any(Kernel kernel, const T* x, T* y, const std::vector<int64_t>& sizes,
                      const std::vector<char>& noise, uint64_t seed, uint64_t offset, uint64_t threshold,
                      const ElemOp& op) {
  const size_t groups = sizes.size();
  int64_t total = 1, noise_total = 1;
  for (size_t g = 0; g < groups; ++g) {
    total *= sizes[g];
    if (noise[g]) noise_total *= sizes[g];
  }
  if (total == 0) return;
  // The noise array's keep bits, one Philox word per noise element, packed.
  std::vector<uint8_t> bits(static_cast<size_t>((noise_total + 7) / 8 + 16), 0);
  mask_packed(bits.data(), noise_total, seed, offset, threshold);
  // A row: the innermost group, or (when that one is broadcast) the noise group before it
  // times it.  Row r's first element has noise index n0(r).
  const bool inner_noise = groups > 0 && noise[groups - 1];
  const size_t outer = groups == 0 ? 0 : (inner_noise || groups == 1 ? groups - 1 : groups - 2);
  const int64_t block = inner_noise || groups == 0 ? 1 : sizes[groups - 1];      // x elements per noise element
  const int64_t per_row = groups == 0 ? 1 : (inner_noise ? sizes[groups - 1] : (groups >= 2 && noise[groups - 2] ? sizes[groups - 2] : 1));
  const int64_t row_len = per_row * block;
  const bool row_noise = inner_noise || (groups >= 2 && noise[groups - 2]);
  std::vector<int64_t> stride(groups, 0);  // noise stride of each outer noise group
  int64_t inner = row_noise ? per_row : 1;
  for (size_t g = outer; g-- > 0;)
    if (noise[g]) {
      stride[g] = inner;
      inner *= sizes[g];
    }
  const int64_t rows = total / row_len;
  parallel_ranges(rows, 1, max64(1, kElementGrain / max64(row_len, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t rest = r, n0 = 0;
      for (size_t g = outer; g-- > 0;) {
        const int64_t idx = rest % sizes[g];
        rest /= sizes[g];
        n0 += idx * stride[g];
      }
      const T* xr = x + r * row_len;
      T* yr = y + r * row_len;
      KeepSource src;
      if (block == 1) {
        src.kind = KeepSource::packed;
        src.bits = bits.data();
        src.b0 = static_cast<uint64_t>(n0);
        kernel(xr, yr, row_len, src, op);
        continue;
      }
      src.kind = KeepSource::block;
      for (int64_t e = 0; e < per_row; ++e) {
        const uint64_t at = static_cast<uint64_t>(n0 + (row_noise ? e : 0));
        src.keep = (bits[at >> 3] >> (at & 7)) & 1;
        kernel(xr + e * block, yr + e * block, block, src, op);
      }
    }
  });
}
}  // namespace

void family(const float* x, float* y, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold, const ElemOp& op) {
  family_any(active_kernels().family_f32, x, y, n, seed, offset, threshold, op);
}
void family(const double* x, double* y, int64_t n, uint64_t seed, uint64_t offset, uint64_t threshold, const ElemOp& op) {
  family_any(active_kernels().family_f64, x, y, n, seed, offset, threshold, op);
}
void family_noise(const float* x, float* y, const std::vector<int64_t>& sizes, const std::vector<char>& noise,
                  uint64_t seed, uint64_t offset, uint64_t threshold, const ElemOp& op) {
  family_noise_any(active_kernels().family_f32, x, y, sizes, noise, seed, offset, threshold, op);
}
void family_noise(const double* x, double* y, const std::vector<int64_t>& sizes, const std::vector<char>& noise,
                  uint64_t seed, uint64_t offset, uint64_t threshold, const ElemOp& op) {
  family_noise_any(active_kernels().family_f64, x, y, sizes, noise, seed, offset, threshold, op);
}

void gaussian(const float* x, float* y, int64_t n, uint64_t seed, uint64_t offset, float sigma) {
  const Kernels& k = active_kernels();
  over_stream(n, seed, offset, [&](int64_t b, int64_t len, uint64_t j, PhiloxKey key) {
    k.gaussian_f32(x + b, y + b, len, j, key, sigma);
  });
}

void gaussian(const double* x, double* y, int64_t n, uint64_t seed, uint64_t offset, double sigma) {
  const Kernels& k = active_kernels();
  over_stream(n, seed, offset, [&](int64_t b, int64_t len, uint64_t j, PhiloxKey key) {
    k.gaussian_f64(x + b, y + b, len, j, key, sigma);
  });
}

void normal_pairs(const uint32_t* w, float* z, int64_t pairs) { active_kernels().normal_pairs_f32(w, z, pairs); }

void add_norm_forward(const AddNormProblem& a, bool f64) {
  const Kernels& k = active_kernels();
  auto fn = f64 ? k.add_norm_f64 : k.add_norm_f32;
  parallel_ranges(a.rows, 1, max64(1, kElementGrain / max64(a.D, 1)), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
}

void add_norm_backward(const AddNormProblem& a, bool f64, double* grad_weight, double* grad_bias) {
  const Kernels& k = active_kernels();
  auto fn = f64 ? k.add_norm_backward_f64 : k.add_norm_backward_f32;
  // grad_weight and grad_bias: each block of kNormRows rows sums into its own row of partial
  // sums, and the blocks are added in order, so the thread count never changes a bit.  The
  // threads take whole blocks; one kernel call (one scratch allocation) per thread.
  const int64_t blocks = (a.rows + kNormRows - 1) / kNormRows;
  std::vector<double> wpart(grad_weight ? static_cast<size_t>(blocks * a.D) : 0, 0.0);
  std::vector<double> bpart(grad_bias ? static_cast<size_t>(blocks * a.D) : 0, 0.0);
  parallel_ranges(blocks, 1, max64(1, kElementGrain / max64(a.D * kNormRows, 1)), [&](int64_t b0, int64_t b1) {
    fn(a, b0 * kNormRows, min64(a.rows, b1 * kNormRows), grad_weight ? wpart.data() : nullptr,
       grad_bias ? bpart.data() : nullptr);
  });
  auto reduce = [&](const std::vector<double>& part, double* out) {
    for (int64_t j = 0; out && j < a.D; ++j) {
      double sum = 0.0;
      for (int64_t b = 0; b < blocks; ++b) sum += part[static_cast<size_t>(b * a.D + j)];
      out[j] = sum;
    }
  };
  reduce(wpart, grad_weight);
  reduce(bpart, grad_bias);
}

}  // namespace ops
}  // namespace fastdropout
