"""fastdropout and NumPy each in a loop of its own, and the two alternating, in one process.

Each in a loop of its own is the engine's speed against NumPy's with no neighbour:
`fd.dropout_dense(x, W, b, p)` at p = 0.5 and p = 0 against `x @ W.T + b`.

`python -m fastdropout bench`'s mixed-process rows compare a call right after the other
library's with the same call right after its own kind *in the alternating loop*.  In that
loop OpenBLAS's workers spin for a while after each NumPy matmul, so fastdropout's threads
give way (small problems run on one thread: `python -m fastdropout info`, "neighbours")
whichever call came just before.  This script shows what that costs against a loop with no
neighbour: each case runs for 0.3 s (its own calls, not timed: the other library's workers
go to sleep and the backoff ends, as in a user's loop that calls only that library), then
calls for about 0.3 s (5 to 30 of them) are timed; the cases take turns in a new order each
round; medians, and the ratios' medians over the rounds.

Usage: python bench/experiments/neighbours.py [ROUNDS] [MxKxN,...]
"""
import statistics
import sys
import time

import numpy as np

import fastdropout as fd

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 7
SHAPES = ([tuple(int(d) for d in s.split("x")) for s in sys.argv[2].split(",")] if len(sys.argv) > 2
          else [(64, 784, 512), (256, 1024, 1024), (1024, 4096, 4096)])
WARM_S = 0.3


def warm(fn):
    """Calls fn for WARM_S; returns how many calls take about WARM_S (5 to 30)."""
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < WARM_S:
        fn()
        calls += 1
    per = (time.perf_counter() - t0) / calls
    return int(min(30, max(5, WARM_S / per)))


def main():
    if ROUNDS < 1:
        sys.exit("ROUNDS must be at least 1")
    print(f"backend {fd.backend()}, {fd.get_num_threads()} threads; p = 0.5; medians of {ROUNDS} rounds")
    rng = np.random.default_rng(0)
    order = np.random.default_rng(1)
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(k ** -0.5)
        b = np.zeros(n, np.float32)

        def ours():
            return fd.dropout_dense(x, w, b, 0.5, seed=1)

        def ours_p0():
            return fd.dropout_dense(x, w, b, 0.0, seed=1)

        def numpy():
            return x @ w.T + b

        def alone(fn):
            def run():
                calls = warm(fn)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                return {fn: statistics.median(times)}
            return run

        def alternating():
            calls = warm(lambda: (ours(), numpy()))
            tf, tn = [], []
            for _ in range(calls):
                t0 = time.perf_counter()
                ours()
                t1 = time.perf_counter()
                numpy()
                tn.append(time.perf_counter() - t1)
                tf.append(t1 - t0)
            return {"ours mixed": statistics.median(tf), "numpy mixed": statistics.median(tn)}

        cases = [alone(ours), alone(ours_p0), alone(numpy), alternating]
        got = {ours: [], ours_p0: [], numpy: [], "ours mixed": [], "numpy mixed": []}
        for _ in range(ROUNDS):
            for i in order.permutation(len(cases)):
                for key, t in cases[i]().items():
                    got[key].append(t)
        med = {key: statistics.median(v) * 1e3 for key, v in got.items()}

        def ratio(a, b):  # median over the rounds of got[a] / got[b]
            return statistics.median(u / v for u, v in zip(got[a], got[b]))

        print(f"{m}x{k}x{n}, each alone: fastdropout {med[ours]:.3f} ms, at p = 0 {med[ours_p0]:.3f} ms, NumPy "
              f"{med[numpy]:.3f} ms: NumPy's time / ours {ratio(numpy, ours):.2f}x (at p = 0 "
              f"{ratio(numpy, ours_p0):.2f}x), p = 0.5 against p = 0 {ratio(ours_p0, ours):.2f}x\n"
              f"  alternating: fastdropout {med['ours mixed']:.3f} ms ({ratio('ours mixed', ours):.2f}x its time "
              f"alone), NumPy {med['numpy mixed']:.3f} ms ({ratio('numpy mixed', numpy):.2f}x); NumPy's time / ours "
              f"{ratio('numpy mixed', 'ours mixed'):.2f}x")

if __name__ == "__main__":
    main()
