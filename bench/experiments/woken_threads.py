"""Why fastdropout runs small problems on one thread right after a NumPy matmul (Linux x86-64).

After a multithreaded matmul, OpenBLAS's worker threads busy-wait for about 0.1 s (OpenBLAS
0.3.31: a loop of no-ops with no system call, then a sleep), each holding a core.  A
fastdropout call made then wakes its OpenMP worker, which the scheduler has to place on such
a core.  This times `fd.dropout_dense(x, W, b, 0.5)` in a loop of its own (after 0.3 s of
its own calls, untimed, so that OpenBLAS's workers have gone to sleep) and right after a
NumPy `x @ W.T + b` of the same shape, in four child processes, one per setting:

  rule        the default: a neighbour seen, small problems run on one thread (README,
              "Threads give way to neighbours")
  2 threads   FASTDROPOUT_ADAPT_THREADS=0: every call on the full team
  2, slice    as 2 threads, and fastdropout's threads ask the scheduler for a 0.1 ms time
              slice (sched_setattr's sched_runtime; EEVDF, Linux >= 6.12), so that a woken
              one may preempt a thread with a longer slice
  2, all      as 2 threads, and every thread of the process asks for that slice

Usage: python bench/experiments/woken_threads.py [ROUNDS] [MxKxN]   (default 9, 64x784x512)

Measured 2026-12-03 on AMD Zen 4 (EPYC, family 19h model 11h, 2 vCPUs, a KVM guest; Linux
6.18, HZ 250, preemption "none"), two runs, medians of 9 rounds, the time right after NumPy
against the time alone:
                  64x784x512                    256x1024x1024
  rule           1.91x, 1.85x (0.55-0.57 ms)    2.46x, 2.07x
  2 threads     26.0x, 12.8x  (3.9-7.6 ms)      2.57x, 2.49x
  2, slice      12.5x, 12.4x  (3.8 ms)          1.96x, 2.68x
  2, all        13.4x, 13.0x  (3.8-3.9 ms)      1.31x, 2.62x
What these say: a woken worker waits about 3.8 ms, one tick of a 250 Hz kernel, for the core
that OpenBLAS's worker spins on, and asking for a short slice does not shorten that here
(the one 1.31x did not repeat).  So after a NumPy matmul fastdropout has one core until
OpenBLAS's worker sleeps, and its one-thread time, about twice its two-thread time, is the
floor; the rule gets close to it.
"""
import ctypes
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"rule": ("1", 0), "2 threads": ("0", 0), "2, slice": ("0", 1), "2, all": ("0", 2)}
SLICE_NS = 100_000


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
                ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64)]


def _ask_for_slice(tids):
    """SCHED_OTHER, nice 0, a SLICE_NS time slice for each thread id (x86-64 Linux syscall 314)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for tid in tids:
        attr = _SchedAttr(ctypes.sizeof(_SchedAttr), 0, 0, 0, 0, SLICE_NS, 0, 0)
        if libc.syscall(314, tid, ctypes.byref(attr), 0) != 0:
            raise OSError(ctypes.get_errno(), f"sched_setattr({tid}) failed")


def child(rounds, shape, slice_mode):
    import numpy as np

    m, k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(k ** -0.5)
    b = np.zeros(n, np.float32)
    x @ w.T  # OpenBLAS's threads exist from here on
    before = set(os.listdir("/proc/self/task"))
    import fastdropout as fd

    def ours():
        fd.dropout_dense(x, w, b, 0.5, seed=1)

    ours()
    tasks = set(os.listdir("/proc/self/task"))
    if slice_mode == 1:  # fastdropout's OpenMP workers and the calling thread
        _ask_for_slice([int(t) for t in tasks - before] + [os.getpid()])
    elif slice_mode == 2:
        _ask_for_slice([int(t) for t in tasks])

    def timed(f):
        t = time.perf_counter()
        f()
        return time.perf_counter() - t

    alone, after = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            ours()
        alone.append(statistics.median(timed(ours) for _ in range(20)))
        samples, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            x @ w.T + b
            samples.append(timed(ours))
        after.append(statistics.median(samples))
    print(statistics.median(alone) * 1e3, statistics.median(after) * 1e3)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), tuple(int(v) for v in sys.argv[3].split("x")), int(sys.argv[4]))
        return
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        sys.exit("Linux x86-64 only (sched_setattr by its syscall number)")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    shape = sys.argv[2] if len(sys.argv) > 2 else "64x784x512"
    print(f"{shape}, p = 0.5, medians of {rounds} rounds: fastdropout alone, right after NumPy (ms)")
    for name, (adapt, slice_mode) in SETTINGS.items():
        env = dict(os.environ, FASTDROPOUT_ADAPT_THREADS=adapt)
        out = subprocess.run([sys.executable, __file__, "--child", str(rounds), shape, str(slice_mode)], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        alone, after = float(out[0]), float(out[1])
        print(f"  {name:10s} alone {alone:7.3f}  after NumPy {after:7.3f}  ({after / alone:.2f}x)")


if __name__ == "__main__":
    main()
