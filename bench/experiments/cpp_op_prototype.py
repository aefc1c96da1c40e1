"""Would C++-registered ops meet the custom-op layer's bar?  A prototype, measured.

fastdropout's ops are registered with torch.library from Python: a call through the
dispatcher passes into a Python autograd kernel and the Python implementation, and an
eager layer under autograd goes through torch.autograd.Function in Python.
cold_overhead.py shows that this Python runs with cold caches beside a real kernel, at two
to five times its tight-loop cost.  Here the same call routes are timed against a
prototype op whose CPU kernel and autograd are C++ (torch's C++ API: TORCH_LIBRARY and
torch::autograd::Function, in cpp_op_prototype.cpp, built at run time against the
installed torch; it needs a C++ compiler and ninja).  Both sides run the same stand-in for
the kernel, a read of 4 MB (the real kernel's footprint at 64x784x512), timed inside and
subtracted: what remains is each route's own time ("outside"), with warm caches (no
stand-in) and with the stream's cold ones.  The timing, the data and the Python side's
stand-in are cold_overhead.py's (imported from this folder).

Usage: OMP_NUM_THREADS=1 python bench/experiments/cpp_op_prototype.py [ROUNDS]   (default 41)

The first run builds the extension (about 45 s on 2 cores, silently) into
$TMPDIR/fastdropout_cpp_op_prototype (/tmp/... without TMPDIR); later runs reuse it.

Measured 2026-12-02 on the Intel Xeon (family 6 model 167, 2 vCPUs, L2 2 MiB a core),
torch 2.13.0, one thread, 41 rounds, three runs (us, medians; ranges over the runs):

                                   warm     after the 4 MB stream
  Python op, no grad               50-61        195-240
  C++ op, no grad                  15-18         63-80
  fd.dropout_dense (NumPy API)     21-26         75-96
  Python DropoutLinear, grad       73-91        271-323
  C++ autograd op, grad            12-16         64-78

The C++ routes cost less than the NumPy API's own checks and allocation (whose overhead is
the bar's baseline: "calling the kernels directly"), so the op layer would be within the
5% bar at 64x784x512, and an MLP layer's call under autograd would save about 200 us beside
a real kernel (the C++ layer here draws no seed; in C++ that is a generator call).  What
this needs is the packaging: torch's C++ API has no stable ABI, so such an extension is
built against one torch version and must ship per version (as torchvision does), with torch
a build requirement; torch's stable C ABI (torch/csrc/stable) registers CPU kernels but
has no autograd, which would leave the Python autograd kernel (about 115 us of the op's
242-260 after the stream, one thread, in cold_overhead.py) in every call.
"""
import os
import sys

import torch
from torch.utils.cpp_extension import load

import fastdropout as fd
from cold_overhead import Operands, install_timed_core, measure, no_grad, show  # (this folder)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 41
    here = os.path.dirname(os.path.abspath(__file__))
    build_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "fastdropout_cpp_op_prototype")
    os.makedirs(build_dir, exist_ok=True)
    proto = load("fdproto", [os.path.join(here, "cpp_op_prototype.cpp")], extra_cflags=["-O2"],
                 build_directory=build_dir, verbose=False)
    core = install_timed_core()
    d = Operands(64, 784, 512)
    py_op = torch.ops.fastdropout.dropout_linear.default
    cpp_op, cpp_layer = torch.ops.fdproto.dropout_linear.default, torch.ops.fdproto.layer.default
    py, cpp = core.take_spent, proto.take_spent  # each side's stand-in time
    routes = {
        "Python op, no grad": (no_grad(lambda: py_op(d.tx, d.tw, d.tb, 0.5, d.state, 0, True)), py),
        "C++ op, no grad": (no_grad(lambda: cpp_op(d.tx, d.tw, d.tb, 0.5, d.state, 0, True)), cpp),
        "fd.dropout_dense (NumPy API)": (no_grad(lambda: fd.dropout_dense(d.x, d.w, d.b, 0.5, seed=3)), py),
        "Python DropoutLinear, grad": (lambda: d.layer(d.txg), py),
        "C++ autograd op, grad": (lambda: cpp_layer(d.txg, d.layer.weight, d.layer.bias, 0.5), cpp),
    }
    print(f"64x784x512, {rounds} rounds, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          "us a call, medians: total / inside the stand-in / outside it (the route's own time)")
    for stream in (False, True):
        core.mode = "stream" if stream else "none"
        proto.set_stream(stream)
        show("after the 4 MB stream" if stream else "warm (no stand-in)", measure(routes, rounds))


if __name__ == "__main__":
    main()
