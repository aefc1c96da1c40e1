"""A DropoutLinear (or a Dropout) on fastdropout's C++ torch layer against its Python route.

fastdropout.torch runs an eager float32, bfloat16 or float16 `DropoutLinear` through a
`torch.autograd.Function` written in C++ (fastdropout/_torch_native.py), else through the
Python route (the same kernels; FASTDROPOUT_TORCH_NATIVE=0).  This times, in one process,
the layer's forward + backward (ReLU, p = 0.5, a gradient of ones) and its forward under
`torch.no_grad()` on each route in turn (A B C D, then D C B A, no sleeps; the route is
switched inside each timed call), medians of ROUNDS rounds and the medians of the per-round
ratios (the Python route's time / the C++ layer's: > 1, the C++ layer is faster).

Usage: python bench/experiments/layer_routes.py MxKxN [ROUNDS] [DTYPE]   (float32, bfloat16, float16)
       python bench/experiments/layer_routes.py dropout:N [ROUNDS] [DTYPE]
       python bench/experiments/layer_routes.py autocast:MxKxN [ROUNDS] [DTYPE]
       python bench/experiments/layer_routes.py autocast:dropout:N [ROUNDS] [DTYPE]
The second form times `fastdropout.torch.dropout(x, 0.1)` of N elements and its backward.  The
third times a float32 layer's forward + backward under `torch.autocast("cpu", dtype=DTYPE)`
(a DropoutLinear, or a Dropout at p = 0.1 in the fourth form): the eager call, which casts
what the op's autocast kernel would cast and takes the fast route ("fast"), against the same
call through the registered op (how autocast ran before 2026-12-03: "op"), and torch's
`relu(linear(dropout(x)))` (or `dropout(x)`) under autocast ("torch").

Measured 2026-12-03 on AMD Zen 4 (EPYC, family 19h model 11h, 2 vCPUs, avx512, the bfloat16
dot-product kernel), torch 2.13.0, forward + backward, then the no-grad forward:
  bfloat16 64x784x512       0.97x, 1.01x, 1.17x (three runs of 11-21 rounds)   1.14x, 1.05x, 1.06x
  bfloat16 256x1024x1024    1.07x                                             0.94x
  bfloat16 8x1024x1024      1.08x                                             1.04x
  float16  64x784x512       1.04x                                             0.94x
  float32  64x784x512       1.08x                                             0.98x
  dropout:65536, bfloat16  1.35x, 1.27x (float32 1.23x)                      1.28x
  dropout:4194304, bfloat16  1.03x (float32 1.06x)
  autocast (bfloat16), "op" / "fast" and "torch" / "fast", two runs (15 rounds; 9 at the last):
  8x512x512 1.26x, 1.20x and 0.82x, 0.74x; 64x784x512 1.28x, 1.17x and 1.00x, 1.12x;
  256x1024x1024 1.03x, 1.10x and 1.22x, 1.26x; a third run at 64x784x512 1.20x and 1.10x;
  autocast:dropout:65536 (float32 in, no cast) 1.39x, 1.25x and 2.24x, 2.05x
What these say: for the layer a few percent, within this host's noise at the larger shape, as
for float32: the kernels dominate, and what the C++ layer removes is the Python around them;
for a small dropout, whose kernel is short, a quarter to a third.
"""
import statistics
import sys
import time

import torch

import fastdropout.torch as fdt
from fastdropout import _torch_native


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 11
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
    if _torch_native.module() is None:
        sys.exit(f"the C++ layer is not available: {_torch_native.status()}")
    if sys.argv[1].startswith("autocast:"):
        autocast(sys.argv[1].split(":", 1)[1], rounds, dtype)
        return
    if sys.argv[1].startswith("dropout:"):
        size = int(sys.argv[1].split(":")[1])
        x = torch.randn(size, dtype=dtype, requires_grad=True)
        g = torch.ones(size, dtype=dtype)
        layer = lambda t: fdt.dropout(t, 0.1)  # noqa: E731
        label = f"dropout of {size} elements"
    else:
        m, k, n = (int(v) for v in sys.argv[1].split("x"))
        layer = fdt.DropoutLinear(k, n, p=0.5, activation="relu").to(dtype)
        x = torch.randn(m, k, dtype=dtype, requires_grad=True)
        g = torch.ones(m, n, dtype=dtype)
        label = f"DropoutLinear {m}x{k}x{n}"

    def step(native):
        def f():
            _torch_native.set_enabled(native)
            layer(x).backward(g)
        return f

    def forward(native):
        def f():
            _torch_native.set_enabled(native)
            with torch.no_grad():
                layer(x)
        return f

    cases = {"C++ forward + backward": step(True), "Python forward + backward": step(False),
             "C++ forward, no grad": forward(True), "Python forward, no grad": forward(False)}
    times = interleaved(cases, rounds)
    _torch_native.set_enabled(True)
    print(f"{label}, {dtype}, {rounds} rounds")
    for name, ts in times.items():
        print(f"  {name:26s} {statistics.median(ts):8.3f} ms")
    for what in ("forward + backward", "forward, no grad"):
        py, cpp = times["Python " + what], times["C++ " + what]
        print(f"  {what}: Python route / C++ layer {statistics.median([a / b for a, b in zip(py, cpp)]):.3f}x")


def autocast(shape, rounds, dtype):
    from fastdropout import _torch_ops

    if shape.startswith("dropout:"):
        size = int(shape.split(":")[1])
        layer, label = fdt.Dropout(0.1), f"Dropout of {size} elements"
        x = torch.randn(size, requires_grad=True)

        def torch_layer(t):
            return torch.nn.functional.dropout(t, 0.1)
    else:
        m, k, n = (int(v) for v in shape.split("x"))
        layer, lin = fdt.DropoutLinear(k, n, p=0.5, activation="relu"), torch.nn.Linear(k, n)
        x = torch.randn(m, k, requires_grad=True)
        label = f"DropoutLinear {m}x{k}x{n}"

        def torch_layer(t):
            return torch.relu(lin(torch.nn.functional.dropout(t, 0.5)))
    route = _torch_ops._route

    def through_op(*tensors):  # the dispatcher under autocast, as before 2026-12-03
        return "op" if torch.is_autocast_enabled("cpu") else route(*tensors)

    def ours(how):
        def f():
            _torch_ops._route = how
            with torch.autocast("cpu", dtype=dtype):
                y = layer(x)
            y.float().sum().backward()
        return f

    def theirs():
        with torch.autocast("cpu", dtype=dtype):
            y = torch_layer(x)
        y.float().sum().backward()

    cases = {"fast": ours(route), "op": ours(through_op), "torch": theirs}
    try:
        times = interleaved(cases, rounds)
    finally:
        _torch_ops._route = route
    print(f"autocast {dtype}, {label}, {rounds} rounds")
    for name, ts in times.items():
        print(f"  {name:6s} {statistics.median(ts):8.3f} ms")
    for name in ("op", "torch"):
        ratio = statistics.median([a / b for a, b in zip(times[name], times["fast"])])
        print(f"  {name} / fast: {ratio:.3f}x")


def interleaved(cases, rounds):
    """{name: [ms a call, one per round]}, the cases timed in turn (reversed every other round)."""
    for f in cases.values():
        f()
    t = time.perf_counter()
    next(iter(cases.values()))()
    inner = max(5, int(0.15 / (time.perf_counter() - t)))
    times = {name: [] for name in cases}
    for r in range(rounds):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            t = time.perf_counter()
            for _ in range(inner):
                cases[name]()
            times[name].append((time.perf_counter() - t) / inner * 1e3)
    return times


if __name__ == "__main__":
    main()
