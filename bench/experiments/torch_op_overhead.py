"""The PyTorch custom-op layer's cost, and torch.compile of a training step, in one process.

1. fastdropout.torch.dropout_linear (the functional form, forward only, no grad) and the
   registered op torch.ops.fastdropout.dropout_linear (through the dispatcher, as in a
   compiled graph) against the NumPy API's fd.dropout_dense on the same data (the kernels
   called directly), and
   the same for forward + backward (autograd through the op against fd.dropout_dense
   + fd.dropout_dense_backward, and against those calls inside a bare autograd.Function: the
   cost of torch's autograd engine that any layer pays), at 64x784x512 and p = 0.5; and the DropoutLinear module
   (nn.Parameter weights, a seed drawn from torch's generator per call).
2. One SGD step of the 784-1024-1024-10 MLP of fastdropout.torch.DropoutLinear layers:
   eager against torch.compile(model, fullgraph=True), batch 64 and 256.
Rows marked "Python route" run with the C++ layer switched off (fastdropout/_torch_native.py:
the eager autograd.Function and the registered ops' kernels in Python, as
FASTDROPOUT_TORCH_NATIVE=0), the others with it.

Timed in turn (A B A B ...), no sleeps; medians and ranges of N samples, and the median (with
the quartiles) of the per-round ratios: each round times every variant once, next to each
other, so a ratio of one round is not moved by the host's drift between rounds.
Usage: python bench/experiments/torch_op_overhead.py [N]
"""
import statistics
import sys
import time

import numpy as np
import torch

import fastdropout as fd
import fastdropout.torch as fdt
from fastdropout import _torch_native, _torch_ops

N = int(sys.argv[1]) if len(sys.argv) > 1 else 15


def interleaved(fns, samples=N, inner=20):
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(samples):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: (statistics.median(v), min(v), max(v), v) for k, v in times.items()}


def show(title, res, base):
    print(title)
    for k, (med, lo, hi, samples) in res.items():
        ratios = [a / b for a, b in zip(samples, res[base][3])]
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        print(f"  {k:42s} {med * 1e3:8.3f} ms  ({lo * 1e3:.3f}-{hi * 1e3:.3f})  {med / res[base][0]:.3f}x of {base};"
              f" per round {q2:.3f}x ({q1:.3f}-{q3:.3f})")


m, k, n = 64, 784, 512
rng = np.random.default_rng(0)
x = rng.standard_normal((m, k), dtype=np.float32)
w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
b = np.zeros(n, np.float32)
dy = rng.standard_normal((m, n), dtype=np.float32)
tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w, b, dy))
txg, twg, tbg = (t.clone().requires_grad_() for t in (tx, tw, tb))


def python_route(f):
    """f with fastdropout.torch's C++ layer switched off (the Python route: the eager
    autograd.Function and the registered ops' Python kernels), as FASTDROPOUT_TORCH_NATIVE=0."""
    def run():
        previous = _torch_native.set_enabled(False)
        try:
            f()
        finally:
            _torch_native.set_enabled(previous)
    return run


def direct_fwd_bwd():
    fd.dropout_dense(x, w, b, 0.5, seed=3)
    fd.dropout_dense_backward(dy, x, w, 0.5, seed=3)


class _KernelsInAutograd(torch.autograd.Function):
    """The kernels called directly inside the least autograd.Function there is: what any
    layer pays for torch's autograd engine (the graph, backward(), AccumulateGrad), so that
    the op layer's own cost is its time beyond this."""

    @staticmethod
    def forward(ctx, xt, wt, bt):  # type: ignore[override]
        return torch.from_numpy(fd.dropout_dense(x, w, b, 0.5, seed=3))

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return tuple(torch.from_numpy(a) for a in fd.dropout_dense_backward(g.numpy(), x, w, 0.5, seed=3))


def engine_fwd_bwd():
    _KernelsInAutograd.apply(txg, twg, tbg).backward(tdy)
    txg.grad = twg.grad = tbg.grad = None


def op_fwd_bwd():
    fdt.dropout_linear(txg, twg, tbg, 0.5, seed=3).backward(tdy)
    txg.grad = twg.grad = tbg.grad = None


def module_fwd_bwd():
    layer(txg).backward(tdy)
    txg.grad = layer.weight.grad = layer.bias.grad = None


layer = fdt.DropoutLinear(k, n, p=0.5)
op, state = torch.ops.fastdropout.dropout_linear.default, _torch_ops.make_state(3, 0)
with torch.no_grad():
    layer.weight.copy_(tw)
    layer.bias.copy_(tb)
    res = interleaved({"kernels (fd.dropout_dense)": lambda: fd.dropout_dense(x, w, b, 0.5, seed=3),
                       "functional (fdt.dropout_linear)": lambda: fdt.dropout_linear(tx, tw, tb, 0.5, seed=3),
                       "registered op (torch.ops.fastdropout)": lambda: op(tx, tw, tb, 0.5, state, 0, True),
                       "module (DropoutLinear, seed drawn)": lambda: layer(tx),
                       "registered op, Python route": python_route(lambda: op(tx, tw, tb, 0.5, state, 0, True)),
                       "module, Python route": python_route(lambda: layer(tx))})
show(f"forward {m}x{k}x{n}, p=0.5", res, "kernels (fd.dropout_dense)")
res = interleaved({"kernels (forward + backward)": direct_fwd_bwd,
                   "kernels in a bare autograd.Function": engine_fwd_bwd, "functional + autograd": op_fwd_bwd,
                   "module + autograd": module_fwd_bwd, "module + autograd, Python route": python_route(module_fwd_bwd)})
show(f"forward+backward {m}x{k}x{n}, p=0.5", res, "kernels (forward + backward)")

for batch in (64, 256):
    torch.manual_seed(0)
    model = torch.nn.Sequential(fdt.DropoutLinear(784, 1024, p=0.2, activation="relu"),
                                fdt.DropoutLinear(1024, 1024, p=0.5, activation="relu"),
                                fdt.DropoutLinear(1024, 10, p=0.5))
    compiled = torch.compile(model, fullgraph=True)
    xb, yb = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(mod):
        def run():
            loss = torch.nn.functional.cross_entropy(mod(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    res = interleaved({"eager fastdropout.torch": step(model), "torch.compile(fullgraph=True)": step(compiled),
                       "eager, Python route": python_route(step(model)),
                       "compiled, Python route": python_route(step(compiled))}, inner=3)
    show(f"training step, batch {batch}", res, "eager fastdropout.torch")
