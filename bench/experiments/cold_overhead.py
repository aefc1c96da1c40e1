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

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 41
M, K, N = (int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "64,784,512").split(","))
INNER = 4

_real_core = _api._core
_stream = np.ones(1 << 20, np.float32)  # 4 MB
_clock = time.perf_counter


class _TimedCore:
    """The core module with dense_forward replaced by a stand-in, its time summed."""

    def __init__(self):
        self.mode, self.spent = "kernel", 0.0

    def __getattr__(self, name):
        return getattr(_real_core, name)

    def dense_forward(self, *args):
        t0 = _clock()
        if self.mode == "kernel":
            _real_core.dense_forward(*args)
        elif self.mode == "stream":
            _stream.sum()
        self.spent += _clock() - t0


core = _TimedCore()
_api._core = core  # every route below reaches the kernel through _api.dense_forward_checked

rng = np.random.default_rng(0)
x = rng.standard_normal((M, K), dtype=np.float32)
w = (rng.standard_normal((N, K), dtype=np.float32) / np.sqrt(K)).astype(np.float32)
b = np.zeros(N, np.float32)
y = np.empty((M, N), np.float32)
tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
txg = tx.clone().requires_grad_()
threshold, scale = _api.threshold(0.5), _api.scale(0.5, np.float32)
op, state = torch.ops.fastdropout.dropout_linear.default, _torch_ops.make_state(3, 0)
layer = fdt.DropoutLinear(K, N, p=0.5)
with torch.no_grad():
    layer.weight.copy_(tw)
    layer.bias.copy_(tb)


def no_grad(f):
    def run():
        with torch.no_grad():
            f()
    return run


routes = {
    "core call": no_grad(lambda: core.dense_forward(x, w, b, y, None, 0, True, 3, 0, threshold, scale, False)),
    "fd.dropout_dense": no_grad(lambda: fd.dropout_dense(x, w, b, 0.5, seed=3)),
    "registered op": no_grad(lambda: op(tx, tw, tb, 0.5, state, 0, True)),
    "fdt.dropout_linear": no_grad(lambda: fdt.dropout_linear(tx, tw, tb, 0.5, seed=3)),
    "DropoutLinear (grad)": lambda: layer(txg),
}

print(f"{M}x{K}x{N}, p=0.5, {ROUNDS} rounds, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
      "us a call, medians: total / inside the kernel's stand-in / outside it")
for mode in ("none", "stream", "kernel"):
    core.mode = mode
    for f in routes.values():
        f()
    total = {k: [] for k in routes}
    inside = {k: [] for k in routes}
    for _ in range(ROUNDS):
        for name, f in routes.items():
            core.spent = 0.0
            t0 = _clock()
            for _ in range(INNER):
                f()
            total[name].append((_clock() - t0) / INNER)
            inside[name].append(core.spent / INNER)
    print(f"stand-in: {mode}")
    for name in routes:
        outside = statistics.median(t - i for t, i in zip(total[name], inside[name]))
        print(f"  {name:22s} {statistics.median(total[name]) * 1e6:9.1f} {statistics.median(inside[name]) * 1e6:9.1f}"
              f" {outside * 1e6:9.1f}")
