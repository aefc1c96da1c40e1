"""The fused forward's two GEMM paths against each other, in one process, with no neighbours.

`fd.dropout_dense(x, W, b, p)` on the sparse path (which skips dropped inputs) and on the
dense path (which multiplies them by zero), both forced with `set_gemm_path`, and the same
call at p = 0 (the plain dense kernel), timed in turn in a new order each round, medians of
N samples; the two paths' outputs are asserted bit-identical.  Nothing else runs in the
process, so no other library's threads take our cores: this is the engine's own speed.
The dense path is what the avx2 backend ran for every p before it had a sparse path.  Below
the backend's threshold (`python -m fastdropout info`: p >= 0.375 on avx2, 0.3 on avx512), for
fewer than 64 output columns on avx2 and for a batch of 1-4 rows (the direct path) the
"sparse" case runs the dense path too.

Usage: python bench/experiments/gemm_paths.py [N] [p,p,...] [MxKxN,...]
e.g.   python bench/experiments/gemm_paths.py 9 0.3,0.45,0.5,0.6 256x1024x1024
"""
import statistics
import sys
import time

import numpy as np

import fastdropout as fd

N = int(sys.argv[1]) if len(sys.argv) > 1 else 9
PS = [float(v) for v in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0.5]
SHAPES = ([tuple(int(d) for d in s.split("x")) for s in sys.argv[3].split(",")] if len(sys.argv) > 3
          else [(64, 784, 512), (256, 1024, 1024), (1024, 4096, 4096)])


def forced(path, fn):
    def run():
        fd._core.set_gemm_path(path)
        return fn()
    return run


def main():
    print(f"backend {fd.backend()}, {fd.get_num_threads()} threads; auto: {fd._core.gemm_path()[1]}")
    rng = np.random.default_rng(0)
    order = np.random.default_rng(1)
    try:
        for m, k, n in SHAPES:
            x = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(k ** -0.5)
            b = np.zeros(n, np.float32)
            inner = max(1, int(2e8 / (2 * m * k * n)))
            for p in PS:
                cases = {
                    "sparse": forced("sparse", lambda: fd.dropout_dense(x, w, b, p, seed=1)),
                    "dense": forced("dense", lambda: fd.dropout_dense(x, w, b, p, seed=1)),
                    "p=0": forced("dense", lambda: fd.dropout_dense(x, w, b, 0.0, seed=1)),
                }
                names = list(cases)
                times = {c: [] for c in names}
                for c in names:
                    cases[c]()  # warm up
                for _ in range(N):
                    for i in order.permutation(len(names)):
                        fn = cases[names[i]]
                        t0 = time.perf_counter()
                        for _ in range(inner):
                            fn()
                        times[names[i]].append((time.perf_counter() - t0) / inner)
                med = {c: statistics.median(v) for c, v in times.items()}
                assert np.array_equal(cases["sparse"]().view(np.uint32), cases["dense"]().view(np.uint32))
                print(f"{m}x{k}x{n} p={p}: " + "  ".join(f"{c} {med[c] * 1e3:.3f} ms" for c in names)
                      + f"  | sparse: {med['dense'] / med['sparse']:.2f}x the dense path's speed,"
                      f" {med['p=0'] / med['sparse']:.2f}x that at p=0", flush=True)
    finally:
        fd._core.set_gemm_path("auto")


if __name__ == "__main__":
    main()
