"""Where an MLP training step's time goes: forward, backward and optimizer, per model, in one process.

The benchmark's training-step rows (`python -m fastdropout bench`) give whole steps.  This
splits them: one SGD step of the 784-1024-1024-10 MLP (dropout 0.2/0.5/0.5 before each
Linear, ReLU, cross-entropy), built from fastdropout.torch.DropoutLinear and from torch.nn,
and, for scale, torch.nn without the dropout, each eager and under
torch.compile(fullgraph=True), the six stepped in turn (A B C D E F, no sleeps), the
phases timed with perf_counter: forward (model and loss), backward (zero_grad and
loss.backward()), optimizer (opt.step()).  Medians over the rounds, and the median of
the per-round ratios of whole steps against fastdropout's eager one.

Usage: python bench/experiments/step_phases.py [ROUNDS] [BATCH,...]

Measured 2026-12-02 on the Intel Xeon (family 6 model 167, 2 vCPUs, a shared host),
torch 2.13.0, `python bench/experiments/step_phases.py 30 64,256` (ms, medians of 30 rounds;
the step's ratio against fastdropout eager's):
  batch 64                     forward  backward  optimizer   step
  fastdropout eager              2.90     3.75      0.91      7.62
  fastdropout compiled           3.30     3.93      0.88      8.12   1.05x
  torch eager                    6.21     4.78      1.00     12.07   1.57x
  torch compiled                 7.35     5.39      1.00     13.86   1.85x
  torch, no dropout, eager       2.57     4.39      0.96      8.11   1.07x
  torch, no dropout, compiled    2.74     4.19      0.90      7.95   1.06x
  batch 256
  fastdropout eager              8.74    12.63      1.22     22.53
  fastdropout compiled           9.34    12.93      1.22     23.43   1.04x
  torch eager                   24.60    11.83      1.25     38.24   1.68x
  torch compiled                27.83    15.58      1.25     45.32   1.99x
  torch, no dropout, eager       7.73    11.32      1.27     20.41   0.90x
  torch, no dropout, compiled    7.97    11.47      1.21     21.06   0.92x
(An earlier run on a busier host, without the no-dropout rows: fastdropout's backward took
0.87x torch's time at batch 64 and 1.12x at 256; the steps' ratios 1.55x and 1.59x.)
What these say: fastdropout's step with dropout took less than torch's step without any
at batch 64 (7.6 against 8.1 ms) and 1.10x its time at 256.  Against torch with dropout,
the forward takes under half of torch's (torch's dropout draws its mask element by
element), but the backward takes 0.78-0.87x torch's time at batch 64 and 1.07-1.12x at
256 (the GEMMs against oneDNN's at these shapes, and the masks regenerated), and the
optimizer's update is the same for both: at batch 64 the backward and the update are 4.7
of fastdropout's 7.6 ms against torch's 5.8, which keeps the step's ratio near 1.6x.
Compiling fastdropout's model added 0.5 ms a step at batch 64 (0.4 in the forward, 0.2 in
the backward) and 0.9 at 256: each of the six op calls a step goes through the
dispatcher into Python in the compiled graph (about 15 us more than the eager route's
call, measured on a tiny shape), and the compiled runtime wraps the graphs; torch's MLP
without dropout lost 0.17-0.24 ms in its forward by compiling and gained in its backward.
"""
import statistics
import sys
import time

import torch

import fastdropout.torch as fdt

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
BATCHES = [int(b) for b in sys.argv[2].split(",")] if len(sys.argv) > 2 else [64, 256]


def fastdropout_mlp():
    return torch.nn.Sequential(fdt.DropoutLinear(784, 1024, p=0.2, activation="relu"),
                               fdt.DropoutLinear(1024, 1024, p=0.5, activation="relu"),
                               fdt.DropoutLinear(1024, 10, p=0.5))


def torch_mlp(dropout=True):
    drop = torch.nn.Dropout if dropout else (lambda p: torch.nn.Identity())
    return torch.nn.Sequential(drop(0.2), torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                               drop(0.5), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                               drop(0.5), torch.nn.Linear(1024, 10))


for batch in BATCHES:
    torch.manual_seed(0)
    eager = {"fastdropout": fastdropout_mlp(), "torch": torch_mlp(), "torch, no dropout": torch_mlp(False)}
    models, opts = {}, {}  # a model's eager and compiled forms step its one set of parameters
    for kind, model in eager.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for how, m in (("eager", model), ("compiled", torch.compile(model, fullgraph=True))):
            models[f"{kind} {how}"], opts[f"{kind} {how}"] = m, opt
    xb, yb = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    phases = {name: {"forward": [], "backward": [], "optimizer": []} for name in models}

    def step(name):
        model, opt = models[name], opts[name]
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        rec = phases[name]
        rec["forward"].append(t1 - t0)
        rec["backward"].append(t2 - t1)
        rec["optimizer"].append(t3 - t2)

    for _ in range(5):  # compiles, then warms every allocation pattern
        for name in models:
            step(name)
    for rec in phases.values():
        for v in rec.values():
            v.clear()
    for _ in range(ROUNDS):
        for name in models:
            step(name)
    totals = {name: [sum(p) for p in zip(*rec.values())] for name, rec in phases.items()}
    base = totals["fastdropout eager"]
    print(f"batch {batch}, {ROUNDS} rounds (ms: medians; the ratio is the median of the rounds' ratios, each"
          " round stepping every model once, so it can differ from the ratio of the medians)")
    for name, rec in phases.items():
        ratio = statistics.median(t / b for t, b in zip(totals[name], base))
        cells = "  ".join(f"{phase} {statistics.median(v) * 1e3:7.3f}" for phase, v in rec.items())
        print(f"  {name:27s} {cells}  step {statistics.median(totals[name]) * 1e3:7.3f}"
              f"  ({ratio:.2f}x fastdropout eager's time)")
