"""Thread safety (issue 6): Python threads calling the kernels at once.

The kernels release the GIL, so eight Python threads really do run them at the same time (each
with its own OpenMP team). They must give exactly the results of the same calls made one after
another, whatever the other threads do: other inputs and seeds, the same call, disjoint parts of
one output array, a generator shared by all of them, or a thread that keeps changing
``fd.set_num_threads`` meanwhile.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import assert_bits_equal, round_up4, sample_values

import fastdropout as fd
from fastdropout import reference as ref

N_THREADS = 8
ACTIVATIONS = [None, "relu", "gelu"]
P_CYCLE = [0.5, 0.1, 0.9, 0.0, 1.0, 0.3, 2.0**-32, 0.75]
JOIN_TIMEOUT = 120


def run_in_threads(fn, n=N_THREADS):
    """Run fn(k) for k in range(n) on n threads released together; returns the results in
    order, re-raising the first exception a thread hit."""
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = []

    def worker(k):
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            results[k] = fn(k)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append((k, exc))

    workers = [threading.Thread(target=worker, args=(k,), name=f"fd-test-{k}") for k in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(JOIN_TIMEOUT)
    assert not any(w.is_alive() for w in workers), "a thread hung"
    if errors:
        k, exc = errors[0]
        raise AssertionError(f"thread {k} raised {type(exc).__name__}: {exc}") from exc
    return results


class NumThreads:
    """Set the kernels' thread count, restore it afterwards."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.previous = fd.get_num_threads()
        fd.set_num_threads(self.n)

    def __exit__(self, *exc):
        fd.set_num_threads(self.previous)


def assert_all_bits_equal(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, b) in enumerate(zip(actual, expected)):
        if b is None:
            assert a is None, f"{what}[{i}]"
            continue
        try:
            assert_bits_equal(a, b)
        except AssertionError as exc:
            raise AssertionError(f"{what}[{i}]: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Eight threads, eight different problems
# ---------------------------------------------------------------------------------------------

# Inputs shared (read-only) by every thread, so that concurrent reads of one array are covered.
SHARED_X = sample_values(40_000, np.float32, seed=99).reshape(200, 200)
SHARED_W = np.random.default_rng(98).standard_normal((48, 200)).astype(np.float32) / 14


class Task:
    """One thread's calls: dropout (fresh, into out=, and of a strided view), its backward,
    a mask (bool or packed), and the fused dense layer forward and backward."""

    def __init__(self, k):
        rng = np.random.default_rng(1000 + k)
        self.k = k
        self.dtype = np.float32 if k % 2 == 0 else np.float64
        self.x = sample_values(30_011 + 997 * k, self.dtype, seed=k)
        self.p = P_CYCLE[k % len(P_CYCLE)]
        self.seed = 0x9E3779B97F4A7C15 * (k + 1) % 2**64
        self.offset = (k * 2**40 + 2**32 - 3 * k) % 2**64
        self.act = ACTIVATIONS[k % 3]
        m = 64 + 7 * k
        self.xd = rng.standard_normal((m, 200)).astype(np.float32) if k % 2 else SHARED_X[:m]
        self.bias = rng.standard_normal(48).astype(np.float32)
        self.grad = rng.standard_normal((m, 48)).astype(np.float32)

    def run(self):
        p, seed, offset = self.p, self.seed, self.offset
        y = fd.dropout(self.x, p, seed=seed, offset=offset)
        out = np.full(self.x.shape, -1.0, self.dtype)
        fd.dropout(self.x, p, seed=seed, offset=offset + 1, out=out)
        strided = fd.dropout(SHARED_X[::-3, 1::2], p, seed=seed, offset=offset)
        back = fd.dropout_backward(self.x, p, seed=seed, offset=offset)
        mask = fd.dropout_mask(
            (self.x.size + self.k,), p, seed=seed, offset=offset, packed=self.k % 2 == 0
        )
        yd, z = fd.dropout_dense(
            self.xd, SHARED_W, self.bias, p, seed=seed, offset=offset, activation=self.act,
            return_preactivation=True,
        )  # fmt: skip
        gx, gw, gb = fd.dropout_dense_backward(
            self.grad, self.xd, SHARED_W, p, seed=seed, offset=offset, activation=self.act,
            preactivation=z,
        )  # fmt: skip
        return (y, out, strided, back, mask, yd, z, gx, gw, gb)


@pytest.mark.parametrize("kernel_threads", [1, 2])
def test_eight_threads_give_the_serial_results(backend, kernel_threads):
    tasks = [Task(k) for k in range(N_THREADS)]
    shared_before = (SHARED_X.copy(), SHARED_W.copy())
    with NumThreads(kernel_threads):
        serial = [t.run() for t in tasks]
        for _ in range(2):
            concurrent = run_in_threads(lambda k: tasks[k].run())
            for k, (got, want) in enumerate(zip(concurrent, serial)):
                assert_all_bits_equal(got, want, f"thread {k}")
    assert_bits_equal(SHARED_X, shared_before[0])
    assert_bits_equal(SHARED_W, shared_before[1])
    # The serial results are the right ones, too (spot check against the oracle).
    t = tasks[3]
    assert_bits_equal(serial[3][0], ref.dropout(t.x, t.p, seed=t.seed, offset=t.offset))
    want = ref.dropout(SHARED_X[::-3, 1::2], t.p, seed=t.seed, offset=t.offset)
    assert_bits_equal(serial[3][2], want)


def test_eight_threads_making_the_same_call(backend):
    # No shared scratch state inside the kernels: identical concurrent calls agree.
    x = sample_values(100_003, np.float64, seed=5)
    w = np.random.default_rng(6).standard_normal((33, 200)).astype(np.float32)

    def calls(_k):
        return (
            fd.dropout(x, 0.4, seed=17, offset=2**33 + 1),
            fd.dropout_mask((70_001,), 0.4, seed=17, offset=5, packed=True),
            fd.dropout_dense(SHARED_X, w, None, 0.4, seed=17, offset=9, activation="gelu"),
        )

    with NumThreads(2):
        serial = calls(None)
        for got in run_in_threads(calls):
            assert_all_bits_equal(got, serial, "same call")


def test_eight_threads_writing_disjoint_parts_of_one_output(backend):
    # Thread k drops out elements [k*n, (k+1)*n) into the matching slice of one shared out
    # (offset + k*n): together exactly one call over the whole array (SPEC section 1).
    n = 12_345
    x = sample_values(N_THREADS * n, np.float32, seed=7)
    out = np.full_like(x, -1.0)
    strided_out = np.full(2 * x.size, -1.0, np.float32)
    offset = 2**32 - 1000

    def part(k):
        piece = slice(k * n, (k + 1) * n)
        fd.dropout(x[piece], 0.3, seed=8, offset=offset + k * n, out=out[piece])
        # and into every 2nd element of the k-th block of a strided buffer
        block = strided_out[2 * k * n : 2 * (k + 1) * n : 2]
        fd.dropout(x[piece], 0.3, seed=8, offset=offset + k * n, out=block)

    with NumThreads(1):
        run_in_threads(part)
        whole = fd.dropout(x, 0.3, seed=8, offset=offset)
    assert_bits_equal(out, whole)
    assert_bits_equal(strided_out[::2], whole)
    assert (strided_out[1::2] == -1.0).all()
    assert_bits_equal(whole, ref.dropout(x, 0.3, seed=8, offset=offset))


# ---------------------------------------------------------------------------------------------
# A generator shared by eight threads
# ---------------------------------------------------------------------------------------------


def _locate(keeps, seed, total, p):
    """The offset of each drawn keep-mask in the stream: the unique multiple of 4 below
    `total` where the reference mask of (seed, offset) matches it."""
    stream = ref.dropout_mask((total + 128,), p, seed=seed, offset=0)
    width = 48  # 48 random bits: a wrong match among ~1e5 candidates has odds ~1e-9
    index = {}
    for o in range(0, total, 4):
        index.setdefault(stream[o : o + width].tobytes(), []).append(o)
    located = []
    for keep in keeps:
        candidates = [
            o
            for o in index.get(keep[:width].tobytes(), [])
            if np.array_equal(stream[o : o + keep.size], keep)
        ]
        assert len(candidates) == 1, f"a {keep.size}-element mask matches {len(candidates)} offsets"
        located.append(candidates[0])
    return located


@pytest.mark.parametrize("which", ["own", "default"])
def test_shared_generator_never_hands_out_overlapping_ranges(which):
    # Eight threads draw from one generator, half of the time through fd.dropout (seed=None)
    # and half directly with Generator.draw. Every random word goes to exactly one draw: the
    # ranges [offset, offset + round_up4(n)) tile [start, end) with no gap and no overlap.
    p = 0.5
    draws_per_thread = 150
    if which == "own":
        g = fd.Generator(0xC0FFEE)
        saved = None
    else:
        g = fd.default_generator
        saved = g.get_state()
        g.manual_seed(0xC0FFEE)

    def worker(k):
        rng = np.random.default_rng(50 + k)
        mine_dropout, mine_draws = [], []
        for i in range(draws_per_thread):
            n = int(rng.integers(48, 97))
            if i % 2 == 0:
                kwargs = {"generator": g} if which == "own" else {}
                y = fd.dropout(np.ones(n, np.float32), p, **kwargs)
                mine_dropout.append(y != 0)
            else:
                m = int(rng.integers(0, 97))
                seed, offset = g.draw(m)
                mine_draws.append((seed, offset, m))
        return mine_dropout, mine_draws

    try:
        with NumThreads(1):
            results = run_in_threads(worker)
        end = g.offset
        seed = g.seed
    finally:
        if saved is not None:
            g.set_state(saved)

    ranges = []
    keeps = [keep for dropout_keeps, _ in results for keep in dropout_keeps]
    for keep, offset in zip(keeps, _locate(keeps, seed, end, p)):
        ranges.append((offset, round_up4(keep.size)))
    for _, draws in results:
        for draw_seed, offset, m in draws:
            assert draw_seed == seed
            ranges.append((offset, round_up4(m)))

    assert len(ranges) == N_THREADS * draws_per_thread
    position = 0
    for offset, length in sorted(ranges):
        if length == 0:
            assert offset <= position
            continue
        assert offset == position, f"range at {offset}, expected {position}: a gap or an overlap"
        position += length
    assert position == end


# ---------------------------------------------------------------------------------------------
# Changing the thread count while kernels run
# ---------------------------------------------------------------------------------------------


def test_switching_num_threads_concurrently_changes_nothing(backend):
    tasks = [Task(k) for k in range(N_THREADS - 1)]
    previous = fd.get_num_threads()
    try:
        fd.set_num_threads(2)
        serial = [t.run() for t in tasks]
        stop = threading.Event()

        def switcher():
            counts = [1, 3, 2, 4, 1, 2]
            i = 0
            while not stop.is_set():
                fd.set_num_threads(counts[i % len(counts)])
                i += 1
                time.sleep(0.0005)
            return i

        def work(k):
            if k == N_THREADS - 1:
                return switcher()
            try:
                return [tasks[k].run() for _ in range(3)]
            finally:
                # the last worker to finish stops the switcher
                with lock:
                    finished[0] += 1
                    if finished[0] == N_THREADS - 1:
                        stop.set()

        lock = threading.Lock()
        finished = [0]
        results = run_in_threads(work)
    finally:
        fd.set_num_threads(previous)
    assert results[-1] > 0, "the switcher never ran"
    for k, runs in enumerate(results[:-1]):
        for got in runs:
            assert_all_bits_equal(got, serial[k], f"thread {k}")


# ---------------------------------------------------------------------------------------------
# The GIL is released inside the kernels
# ---------------------------------------------------------------------------------------------


def _calibrated(make_call, target_s=0.2):
    """Grow the problem size until one call takes about target_s (serially, one thread)."""
    size = 1
    while True:
        call = make_call(size)
        start = time.perf_counter()
        call()
        took = time.perf_counter() - start
        if took >= target_s or size >= 16:
            return call, took
        size *= 2 if took > target_s / 4 else 4


def _mask_call(size):
    return lambda: fd.dropout_mask((size * 2**23,), 0.5, seed=1, packed=True)


def _dropout_call(size):
    x = np.ones(size * 2**20, np.float32)
    return lambda: fd.dropout(x, 0.5, seed=1, out=x)


def _dense_call(size):
    x = np.ones((256 * size, 1024), np.float32)
    w = np.ones((512, 1024), np.float32)
    return lambda: fd.dropout_dense(x, w, None, 0.5, seed=1)


@pytest.mark.parametrize(
    "make_call", [_mask_call, _dropout_call, _dense_call], ids=["mask", "dropout", "dense"]
)
def test_kernels_release_the_gil(make_call):
    # While one thread is inside a long kernel, the main thread keeps running Python. With the
    # GIL held it would stall for the whole call; released, it never stalls for long. (Timing
    # based, hence a generous bound and a few attempts on a busy machine. The scalar backend
    # makes the calls long without big arrays.)
    previous = fd.backend()
    fd._core.set_backend("scalar")
    try:
        _check_gil_released(make_call)
    finally:
        fd._core.set_backend(previous)


def _check_gil_released(make_call):
    with NumThreads(1):
        call, took = _calibrated(make_call)
        longest = []
        for _ in range(3):
            done = threading.Event()

            def worker(call=call, done=done):
                try:
                    call()
                finally:
                    done.set()

            t = threading.Thread(target=worker)
            last = time.perf_counter()
            gap = 0.0
            t.start()
            while not done.is_set():
                now = time.perf_counter()
                gap = max(gap, now - last)
                last = now
                sum(range(100))
            t.join()
            longest.append(gap)
            if gap < took / 2:
                return
    pytest.fail(
        f"the main thread stalled for {min(longest):.3f} s while a {took:.3f} s kernel ran: "
        "is the GIL held inside the kernel?"
    )
