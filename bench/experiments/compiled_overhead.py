"""What torch.compile adds to a training step, apart from the work: fastdropout's MLP and torch's own.

Issue 13 asks that `torch.compile(fullgraph=True)` of the MLP training step be no slower than
the eager fastdropout step.  This separates the fixed cost of running a compiled graph (dynamo's
guards, AOT autograd's runtime wrappers, the generated wrapper code) from the cost per layer:
models of 1, 3 and 6 layers on a tiny shape (batch 4, 16 features, so the kernels take
microseconds), fastdropout's `DropoutLinear` stack and torch's own `Dropout -> Linear -> ReLU`
stack and `Linear -> ReLU` stack, each eager and compiled, their forward alone (under grad
mode) and their whole SGD step, timed in turn in one process (A B C ... then reversed, no
sleeps), medians of ROUNDS rounds of 50 calls.  The fixed cost is read off as the intercept of
a straight line through the three depths, the cost per layer as its slope.

Usage: python bench/experiments/compiled_overhead.py [ROUNDS]

Measured 2026-12-02 on the AMD EPYC Zen 3 (family 19h model 01h, 2 vCPUs, a shared host),
torch 2.13.0, `python bench/experiments/compiled_overhead.py 11`, two runs (us; fixed cost +
cost per layer, the first run then the second, quieter one):
  forward   fastdropout         eager      3 + 81,   2 + 61     compiled  245 + 41,  202 + 31
            torch (dropout)     eager     -4 + 89, -27 + 81     compiled  288 + 40,  217 + 43
            torch (no dropout)  eager    -13 + 43,  -7 + 36     compiled  242 + 28,  202 + 24
  step      fastdropout         eager    408 + 139, 352 + 74    compiled  774 + 160, 653 + 42
            torch (dropout)     eager    286 + 222, 224 + 129   compiled  687 + 187, 536 + 69
            torch (no dropout)  eager    343 + 125, 248 + 76    compiled  780 + 103, 535 + 57
What these say: a compiled call costs 200-290 us more than an eager one, forward alone, and
300-440 us more a step, about the same for torch's own models (with dropout or without) as for
fastdropout's; a layer costs about what it costs eager (more in the first run, less in the
second).  At batch 64 of the 784-1024-1024-10 MLP (a 7-11 ms step on this host) that fixed
cost is the 3-7% by which the compiled step is slower than the eager one: torch's runtime, not
fastdropout's ops.
"""
import statistics
import sys
import time

import torch

import fastdropout.torch as fdt

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 11
B, H, CALLS = 4, 16, 50


def stack(kind, layers):
    if kind == "fastdropout":
        mods = [fdt.DropoutLinear(H, H, p=0.5, activation="relu") for _ in range(layers - 1)]
        return torch.nn.Sequential(*mods, fdt.DropoutLinear(H, 10, p=0.5))
    mods = []
    for i in range(layers):
        if kind == "torch (dropout)":
            mods.append(torch.nn.Dropout(0.5))
        mods.append(torch.nn.Linear(H, H if i < layers - 1 else 10))
        if i < layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def fit(depths, times):
    """Least-squares line through (depth, time): (intercept, slope)."""
    n = len(depths)
    mx, my = sum(depths) / n, sum(times) / n
    slope = sum((d - mx) * (t - my) for d, t in zip(depths, times)) / sum((d - mx) ** 2 for d in depths)
    return my - slope * mx, slope


def main():
    torch._dynamo.config.recompile_limit = 64  # (18 compiled models share Sequential.forward's code)
    torch.manual_seed(0)
    x, target = torch.randn(B, H), torch.randint(0, 10, (B,))
    depths = (1, 3, 6)
    kinds = ("fastdropout", "torch (dropout)", "torch (no dropout)")
    variants = {}
    for kind in kinds:
        for layers in depths:
            model = stack(kind, layers)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            variants[(kind, "eager", layers)] = (model, opt)
            variants[(kind, "compiled", layers)] = (torch.compile(model, fullgraph=True), opt)

    def forward(model, opt):
        model(x)

    def step(model, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    for what, fn in (("forward", forward), ("step", step)):
        for v in variants.values():
            for _ in range(3):
                fn(*v)
        times = {k: [] for k in variants}
        keys = list(variants)
        for r in range(ROUNDS):
            for k in keys if r % 2 == 0 else keys[::-1]:
                t0 = time.perf_counter()
                for _ in range(CALLS):
                    fn(*variants[k])
                times[k].append((time.perf_counter() - t0) / CALLS * 1e6)
        print(f"{what} (us a call, medians of {ROUNDS} rounds; fixed cost + cost per layer, fitted over 1, 3, 6 layers)")
        for kind in kinds:
            for how in ("eager", "compiled"):
                med = [statistics.median(times[(kind, how, d)]) for d in depths]
                a, b = fit(depths, med)
                print(f"  {kind:20s} {how:9s} " + "  ".join(f"{d} layers {m:7.0f}" for d, m in zip(depths, med))
                      + f"   -> {a:5.0f} + {b:4.0f}/layer")


if __name__ == "__main__":
    main()
