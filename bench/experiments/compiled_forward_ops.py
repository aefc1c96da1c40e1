"""The MLP's forward: the eager modules, the compiled model and the registered ops called directly.

`torch.compile(fullgraph=True)` of a fastdropout MLP runs the registered op
`fastdropout::dropout_linear` three times inside the compiled graph.  This times, in one
process, in turn (A B C D E, then E D C B A, no sleeps), the forward of the 784-1024-1024-10
MLP of `fastdropout.torch.DropoutLinear` (dropout 0.2/0.5/0.5, ReLU): the eager modules, the
compiled model, the three ops called directly with parameters that require grad (the ops'
Python autograd kernel) and under `torch.no_grad()` (the ops' C++ kernels, as the compiled
graph calls them below autograd), and the modules under `torch.no_grad()`.  Medians, and the
median of the per-round ratios against the eager modules.

Usage: python bench/experiments/compiled_forward_ops.py BATCH ROUNDS

Measured 2026-12-02 on AMD Zen 4 (EPYC, family 19h model 11h, 2 vCPUs), torch 2.13.0,
`... 1024 41` then `... 64 101` (ms; ratio to the eager modules):
                          batch 1024        batch 64
  eager                   19.08  1.000      1.624  1.000
  compiled                19.66  1.029      1.897  1.178
  raw ops (grad mode)     19.40  1.033      1.933  1.200
  raw ops no_grad         18.44  0.971      1.509  0.935
  eager no_grad           19.17  0.994      1.689  1.039
What these say: the ops themselves, called as the compiled graph calls them, take less than
the eager forward (0.94-0.97x); the compiled forward's 0.3 ms more at batch 64 is the compiled
runtime around them (bench/experiments/compiled_overhead.py measures that apart, for torch's
own models too).  Calling a registered op directly with inputs that require grad goes through
its Python autograd kernel (1.20x at batch 64); the modules, the functional forms and compiled
graphs do not take that route.
"""
import statistics
import sys
import time

import torch

import fastdropout.torch as fdt

B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
R = int(sys.argv[2]) if len(sys.argv) > 2 else 101
m = torch.nn.Sequential(fdt.DropoutLinear(784, 1024, p=0.2, activation="relu"),
                        fdt.DropoutLinear(1024, 1024, p=0.5, activation="relu"),
                        fdt.DropoutLinear(1024, 10, p=0.5))
cm = torch.compile(m, fullgraph=True)
x = torch.randn(B, 784)
ps = list(m.parameters())
op = torch.ops.fastdropout.dropout_linear.default


def raw():
    h = op(x, ps[0], ps[1], 0.2, None, 1, True)[0]
    h = op(h, ps[2], ps[3], 0.5, None, 1, True)[0]
    return op(h, ps[4], ps[5], 0.5, None, 0, True)[0]


def raw_no_grad():
    with torch.no_grad():
        return raw()


def eager_no_grad():
    with torch.no_grad():
        return m(x)


cases = {"eager": lambda: m(x), "compiled": lambda: cm(x), "raw ops (grad mode)": raw,
         "raw ops no_grad": raw_no_grad, "eager no_grad": eager_no_grad}
for f in cases.values():
    for _ in range(3):  # compiles, then warms every allocation pattern
        f()
times = {c: [] for c in cases}
for r in range(R):
    for c in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
        t0 = time.perf_counter()
        y = cases[c]()
        times[c].append(time.perf_counter() - t0)
        del y
for c, v in times.items():
    ratio = statistics.median(a / b for a, b in zip(v, times["eager"]))
    print(f"{c:22s} {statistics.median(v) * 1e3:8.3f} ms  ratio to eager {ratio:.3f}")
