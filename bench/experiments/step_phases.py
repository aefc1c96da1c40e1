"""Where an MLP training step's time goes: forward, backward and optimizer, per model, in one process.

The benchmark's training-step rows (`python -m fastdropout bench`) give whole steps.  This
splits them: one SGD step of the 784-1024-1024-10 MLP (dropout 0.2/0.5/0.5 before each
Linear, ReLU, cross-entropy), built from fastdropout.torch.DropoutLinear and from torch.nn,
each eager and under torch.compile(fullgraph=True), the four stepped in turn (A B C D, no
sleeps), the phases timed with perf_counter: forward (model and loss), backward (zero_grad
and loss.backward()), optimizer (opt.step()).  Medians over the rounds, and the median of
the per-round ratios of whole steps against fastdropout's eager one.

Usage: python bench/experiments/step_phases.py [ROUNDS] [BATCH,...]

Measured 2026-12-02 on the Intel Xeon (family 6 model 167, 2 vCPUs, a busy shared host),
torch 2.13.0, `python bench/experiments/step_phases.py 30 64,256` (ms, medians of 30 rounds):
  batch 64             forward  backward  optimizer   step
  fastdropout eager      3.78     4.61      1.10      9.51
  fastdropout compiled   4.18     4.88      1.05     10.14  (1.06x fastdropout eager's time)
  torch eager            8.07     5.28      1.22     14.72  (1.55x)
  torch compiled         9.13     6.26      1.20     17.03  (1.76x)
  batch 256
  fastdropout eager     10.25    14.82      1.27     26.47
  fastdropout compiled  10.98    15.46      1.21     27.67  (1.04x)
  torch eager           27.57    13.21      1.23     42.08  (1.59x)
  torch compiled        30.66    17.48      1.24     49.45  (1.87x)
A torch.nn MLP without dropout, eager against compiled, timed the same way at batch 64:
forward 3.19 against 3.73 ms, backward 5.35 against 5.29.  What these say: fastdropout's
forward takes under half of torch's (torch's dropout draws its mask element by element);
its backward is within 13% of torch's either way (0.87x its time at batch 64, 1.12x at
256: the GEMMs against oneDNN's at these shapes, and the masks regenerated); the
optimizer's update is the same for both.  So the backward and the update, 5.7 of
fastdropout's 9.5 ms at batch 64 against torch's 6.5, hold the step's ratio near 1.5x
there.  The compiled step's extra 0.4-0.7 ms in the forward is torch's compiled
runtime's (guards, AOT autograd's wrappers), which torch's own model pays as well.
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


def torch_mlp():
    return torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(1024, 10))


for batch in BATCHES:
    torch.manual_seed(0)
    fd_model, t_model = fastdropout_mlp(), torch_mlp()
    models = {"fastdropout eager": fd_model, "fastdropout compiled": torch.compile(fd_model, fullgraph=True),
              "torch eager": t_model, "torch compiled": torch.compile(t_model, fullgraph=True)}
    opts = {name: torch.optim.SGD((fd_model if name.startswith("fastdropout") else t_model).parameters(), lr=1e-3)
            for name in models}
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
    print(f"batch {batch}, {ROUNDS} rounds (ms: medians)")
    for name, rec in phases.items():
        ratio = statistics.median(t / b for t, b in zip(totals[name], base))
        cells = "  ".join(f"{phase} {statistics.median(v) * 1e3:7.3f}" for phase, v in rec.items())
        print(f"  {name:22s} {cells}  step {statistics.median(totals[name]) * 1e3:7.3f}"
              f"  ({ratio:.2f}x fastdropout eager's time)")
