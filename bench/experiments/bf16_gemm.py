"""bfloat16 layers: the dot-product kernel against the float32 kernels, and against torch.

Part 1 (the engine, NumPy API): `fd.dropout_dense` and the two gradients of
`fd.dropout_dense_backward` (grad_x alone, then grad_weight alone) on bfloat16 operands, with
the bfloat16 GEMM forced to the dot-product kernel (vdpbf16ps) and to the float32 kernels
(`_core.set_bf16_gemm`), timed in turn, the order swapped every round, medians; the results are
asserted bit-identical.  At p = 0.5 the float32 kernels take the sparse path where the CPU
chooses it (AMD); the dot-product kernel always runs dense.

Part 2 (PyTorch): forward + backward of a bfloat16 `fastdropout.torch.DropoutLinear` (its
kernels on the CPU's choice, then forced to float32) against torch's bfloat16
`F.linear(F.dropout(x))` (oneDNN), in turn, medians.

Usage: python bench/experiments/bf16_gemm.py [ROUNDS] [MxKxN,...]   (needs ml_dtypes; part 2 torch)

Measured 2026-12-03 on the AMD EPYC Zen 4 (family 19h model 11h, 2 vCPUs under KVM, AVX-512 with
AVX512_BF16), 2 threads, `python bench/experiments/bf16_gemm.py 9`: see the README's *Measured*
("bfloat16 on Zen 4").
"""
import statistics
import sys
import time

import ml_dtypes
import numpy as np

import fastdropout as fd
from fastdropout import _core

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 9
SHAPES = ([tuple(int(d) for d in s.split("x")) for s in sys.argv[2].split(",")] if len(sys.argv) > 2
          else [(64, 784, 512), (256, 1024, 1024), (1024, 4096, 4096)])
BF16 = ml_dtypes.bfloat16
SETTINGS = ("dot", "float32")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def engine(m, k, n, p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(BF16)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(BF16)
    b = rng.standard_normal(n).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(BF16)
    calls = {
        "forward": lambda: fd.dropout_dense(x, w, b, p, seed=1),
        "grad_x": lambda: fd.dropout_dense_backward(dy, x, w, p, seed=1, output_mask=(True, False, False))[0],
        "grad_weight": lambda: fd.dropout_dense_backward(dy, x, w, p, seed=1, output_mask=(False, True, False))[1],
    }
    times = {(s, c): [] for s in SETTINGS for c in calls}
    for r in range(ROUNDS):
        results = {}
        for s in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            _core.set_bf16_gemm(s)
            for c, fn in calls.items():
                dt, results[s, c] = timed(fn)
                times[s, c].append(dt)
        for c in calls:
            assert np.array_equal(results["dot", c].view(np.uint16), results["float32", c].view(np.uint16))
    _core.set_bf16_gemm("auto")
    parts = []
    for c in calls:
        dot, f32 = statistics.median(times["dot", c]), statistics.median(times["float32", c])
        parts.append(f"{c} {dot * 1e3:.2f} ms ({2 * m * k * n / dot / 1e9:.0f} GFLOP/s) against {f32 * 1e3:.2f}: "
                     f"{f32 / dot:.2f}x")
    print(f"  {m}x{k}x{n} p={p}: " + "; ".join(parts), flush=True)


def layers(m, k, n, p):
    import torch

    import fastdropout.torch as fdt

    F = torch.nn.functional
    torch.manual_seed(0)
    ours = fdt.DropoutLinear(k, n, p=p).to(torch.bfloat16)
    theirs = torch.nn.Linear(k, n).to(torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)

    def fd_step():
        ours(x).sum().backward()

    def torch_step():
        theirs(F.dropout(x, p)).sum().backward()

    cases = {"fastdropout (dot)": ("dot", fd_step), "fastdropout (float32)": ("float32", fd_step),
             "torch": (None, torch_step)}
    times = {c: [] for c in cases}
    for name, (s, fn) in cases.items():  # warm up (and build the C++ layer)
        _core.set_bf16_gemm(s or "auto")
        fn()
    for r in range(ROUNDS):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            s, fn = cases[name]
            _core.set_bf16_gemm(s or "auto")
            dt, _ = timed(fn)
            times[name].append(dt)
    _core.set_bf16_gemm("auto")
    t = statistics.median(times["torch"])
    print(f"  {m}x{k}x{n} p={p}: torch bfloat16 {t * 1e3:.2f} ms; " + "; ".join(
        f"{c} {statistics.median(times[c]) * 1e3:.2f} ms ({t / statistics.median(times[c]):.2f}x)"
        for c in cases if c != "torch") + "  (torch time / ours)", flush=True)


def main():
    print(f"cpu: {_core.cpu_id()}; backend {fd.backend()}; {fd.get_num_threads()} threads; "
          f"bfloat16 GEMM: {_core.bf16_gemm()[1]}")
    print("1. the engine, bfloat16 operands: dot-product kernel against float32 kernels (their time / dot's)")
    for shape in SHAPES:
        for p in (0.0, 0.5):
            engine(*shape, p)
    try:
        import torch
    except ImportError:
        print("2. skipped: no torch")
        return
    torch.set_num_threads(fd.get_num_threads())
    print("2. forward + backward of a bfloat16 layer: fastdropout.torch.DropoutLinear against torch")
    for shape in SHAPES:
        layers(*shape, 0.5)


if __name__ == "__main__":
    main()
