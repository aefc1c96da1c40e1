"""What a layer call costs beyond its kernel, with the caches as the kernel leaves them.

The fixed cost of a call (its Python, torch's dispatcher and autograd) is usually measured
at a tiny shape, where the caches stay warm from one call to the next.  At a real shape
the kernel streams its weight and its packed copy through the core's L2 (2 MiB on the
Xeon measured below; 64x784x512 reads a 1.6 MB weight and packs it), and the Python that
runs after it finds its own code and data evicted.  This separates the two: each route
below is timed whole, and the time inside the core's dense_forward call (wrapped here) is
subtracted, leaving the route's own time ("outside"), with three stand-ins for the kernel:

  kernel  the real kernel (the caches as a real call leaves them),
  none    nothing (the fixed cost with warm caches, as at a tiny shape),
  stream  a read of a 4 MB NumPy array (the kernel's footprint without its arithmetic).

Routes, in turn per round (A B C ..., no sleeps), forward at p = 0.5, torch.no_grad()
except the module under autograd: the core call (output reused), fd.dropout_dense (the
NumPy API), the torch.library op torch.ops.fastdropout.dropout_linear, the functional
fastdropout.torch.dropout_linear, and a DropoutLinear module (seed drawn) on an input that
requires grad.

Usage: OMP_NUM_THREADS=1 python bench/experiments/cold_overhead.py [ROUNDS] [M,K,N]
(defaults 41 and 64,784,512)

Measured 2026-12-02 on the Intel Xeon (family 6 model 167, 2 vCPUs, L2 2 MiB a core, a
busy shared host), torch 2.13.0, 41 rounds at 64x784x512, "outside" in us (medians), warm
(none) / after the 4 MB stream / after the real kernel:

                          OMP_NUM_THREADS=1         2 threads
  core call                 6 /  29 /  39         8 /  28 /  27
  fd.dropout_dense         21 /  90 / 117        27 /  92 /  92
  registered op            49 / 242 / 294        68 / 250 / 245
  fdt.dropout_linear       35 / 137 / 169        44 / 132 / 147
  DropoutLinear (grad)     72 / 295 / 338        96 / 308 / 305

(the kernel itself: 826-832 us on one thread, 530-543 on two.)  Split further (one
thread, after the stream): the registered op's 242-260 us are about 115 for the
dispatcher's hop into the Python autograd kernel and back, 30 for the op body's fresh
state, 17 for reading the state tensor, and 95 for the route that fdt.dropout_linear's
eager path shares.

A 400 KB stream instead of 4 MB left fd.dropout_dense's 21 us as it was, 800 KB made it
31, 1.6 MB 36, 2.4 MB 52: the cost grows with the footprint, from well under the L2's
size.  So the op layer's overhead at 64x784x512 (12-30% of the kernel's time in
torch_op_overhead.py) is mostly its fixed cost paid from L3 and memory, not a larger fixed
cost; the fewer Python frames and dispatcher hops a route has, the less it pays.
"""
import os
import statistics
import sys
import time

import numpy as np
import torch

import fastdropout as fd
import fastdropout.torch as fdt
from fastdropout import _api, _torch_ops

_real_core = _api._core
_stream = np.ones(1 << 20, np.float32)  # 4 MB
_clock = time.perf_counter


class TimedCore:
    """The core module with dense_forward replaced by a stand-in (`mode`: "kernel", the
    real one; "none"; "stream", a read of 4 MB), the time inside it summed."""

    def __init__(self):
        self.mode, self._spent = "kernel", 0.0

    def __getattr__(self, name):
        return getattr(_real_core, name)

    def dense_forward(self, *args):
        t0 = _clock()
        if self.mode == "kernel":
            _real_core.dense_forward(*args)
        elif self.mode == "stream":
            _stream.sum()
        self._spent += _clock() - t0

    def take_spent(self) -> float:
        """Seconds inside the stand-in since the last call."""
        spent, self._spent = self._spent, 0.0
        return spent


def install_timed_core() -> TimedCore:
    """A TimedCore in place of the core: every route reaches the kernel through
    _api.dense_forward_checked, which calls _api._core."""
    core = TimedCore()
    _api._core = core
    return core


class Operands:
    """One layer's data at M x K x N: NumPy arrays, tensors sharing them, an input that
    requires grad, a state tensor (seed 3) and a DropoutLinear (p = 0.5) with these weights."""

    def __init__(self, m: int, k: int, n: int):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((m, k), dtype=np.float32)
        self.w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        self.b = np.zeros(n, np.float32)
        self.tx, self.tw, self.tb = (torch.from_numpy(a) for a in (self.x, self.w, self.b))
        self.txg = self.tx.clone().requires_grad_()
        self.state = _torch_ops.make_state(3, 0)
        self.layer = fdt.DropoutLinear(k, n, p=0.5)
        with torch.no_grad():
            self.layer.weight.copy_(self.tw)
            self.layer.bias.copy_(self.tb)


def no_grad(f):
    def run():
        with torch.no_grad():
            f()
    return run


def measure(routes, rounds: int, inner: int = 4):
    """routes: name -> (call, take_spent).  Each round times every route once, in turn
    (`inner` calls, no sleeps).  Returns name -> (total, inside, outside): medians in
    seconds a call, inside being the stand-in's time and outside the rest."""
    for call, take_spent in routes.values():
        call()
        take_spent()
    samples = {name: [] for name in routes}
    for _ in range(rounds):
        for name, (call, take_spent) in routes.items():
            take_spent()
            t0 = _clock()
            for _ in range(inner):
                call()
            total = _clock() - t0
            samples[name].append((total / inner, take_spent() / inner))
    return {name: (statistics.median(t for t, _ in s), statistics.median(i for _, i in s),
                   statistics.median(t - i for t, i in s)) for name, s in samples.items()}


def show(title: str, results) -> None:
    print(title)
    for name, (total, inside, outside) in results.items():
        print(f"  {name:30s} {total * 1e6:9.1f} {inside * 1e6:9.1f} {outside * 1e6:9.1f}")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 41
    m, k, n = (int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "64,784,512").split(","))
    core = install_timed_core()
    d = Operands(m, k, n)
    y = np.empty((m, n), np.float32)
    threshold, scale = _api.threshold(0.5), _api.scale(0.5, np.float32)
    op = torch.ops.fastdropout.dropout_linear.default
    spent = core.take_spent
    routes = {
        "core call": (no_grad(lambda: core.dense_forward(d.x, d.w, d.b, y, None, 0, True, 3, 0, threshold, scale,
                                                         False)), spent),
        "fd.dropout_dense": (no_grad(lambda: fd.dropout_dense(d.x, d.w, d.b, 0.5, seed=3)), spent),
        "registered op": (no_grad(lambda: op(d.tx, d.tw, d.tb, 0.5, d.state, 0, True)), spent),
        "fdt.dropout_linear": (no_grad(lambda: fdt.dropout_linear(d.tx, d.tw, d.tb, 0.5, seed=3)), spent),
        "DropoutLinear (grad)": (lambda: d.layer(d.txg), spent),
    }
    print(f"{m}x{k}x{n}, p=0.5, {rounds} rounds, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          "us a call, medians: total / inside the kernel's stand-in / outside it")
    for mode in ("none", "stream", "kernel"):
        core.mode = mode
        show(f"stand-in: {mode}", measure(routes, rounds))


if __name__ == "__main__":
    main()
