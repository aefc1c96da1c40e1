"""``python -m fastdropout bench``: fastdropout next to its peers, in one run.

Every figure is the median of several timed samples of the same work; peers
(NumPy, and PyTorch and JAX when installed) run in the same process on the
same inputs, timed in turn (A B C A B C ...) with no sleep between calls, so
the ratios hold where absolute times drift and each call meets what a user's
process would leave behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import fastdropout as fd
from . import reference
from ._checks import output_path_arg, positive_int_arg
from ._platform import caches, cpu_model, cpu_vendor
from ._runtime import wait_policy

P = 0.5
SEED = 1234
DESCRIPTION = ("Time fastdropout next to NumPy (and PyTorch and JAX when installed) in one process: "
               "medians with their spread, peers timed in turn, no sleeps.")

ELEMENT_SIZES = {"small": 1 << 16, "medium": 1 << 20, "large": 1 << 24}
DENSE_SHAPES = [(64, 784, 512), (256, 1024, 1024), (1024, 4096, 4096)]


@dataclass
class Result:
    """One measured row."""

    group: str  # "elementwise", "dense", "training", "attention", "memory", "mixed" or "threads"
    kernel: str  # what is computed, e.g. "dropout forward"
    impl: str  # who computes it, e.g. "fastdropout", "numpy copyto", "torch"
    size: str  # "16777216" elements, or "MxKxN"
    threads: int
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    rate: float  # in `unit`
    unit: str
    ratios: Dict[str, float] = field(default_factory=dict)  # peer impl -> peer time / our time


# --------------------------------------------------------------------------- timing


def _calibrate(fn: Callable[[], object], min_sample_s: float) -> int:
    """Calls per sample so that one sample lasts >= min_sample_s (after a warm-up call)."""
    fn()  # warm up: page faults, caches, lazy initialisation, JIT
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    return max(1, min(1000, int(min_sample_s / max(once, 1e-9))))


def measure_interleaved(fns: Sequence[Callable[[], object]], repeats: int, min_sample_s: float = 2e-3,
                        before: Optional[Sequence[Callable[[], object]]] = None) -> List[Tuple[float, float, float]]:
    """(median, min, max) seconds per call of each fn, timed in turn (A B C, C A B, ...:
    every round in a new order).

    No sleep anywhere: each call meets whatever the previous one left behind (other
    libraries' spinning threads, caches), as in a user's process, and the host's
    drift falls on every fn alike.  `before[i]()`, when given, runs untimed right before
    each sample of fns[i].  `min_sample_s=0` times one call per sample.
    """
    inner = [_calibrate(fn, min_sample_s) for fn in fns]
    samples: List[List[float]] = [[] for _ in fns]
    order = np.random.default_rng(SEED)
    for _ in range(repeats):
        # a new order each round, so that no fn always follows the same neighbour (whose
        # threads may still be spinning) and no fn is always first after a pause
        for i in order.permutation(len(fns)):
            fn = fns[i]
            if before is not None:
                before[i]()
            t0 = time.perf_counter()
            for _ in range(inner[i]):
                fn()
            samples[i].append((time.perf_counter() - t0) / inner[i])
    return [(statistics.median(v), min(v), max(v)) for v in samples]


def measure(fn: Callable[[], object], repeats: int, min_sample_s: float = 2e-3) -> Tuple[float, float, float]:
    """(median, min, max) seconds per call of one fn."""
    return measure_interleaved([fn], repeats, min_sample_s)[0]


class Progress:
    """One line per measurement on stderr (overwritten in place on a terminal)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        msg = f"[{self.done:3d}/{self.total}] {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + msg)
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.done < self.total:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------- peers


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torch():
    if not _have("torch"):
        return None
    import torch

    return torch


def _jax():
    if not _have("jax"):
        return None
    try:
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_platforms", "cpu")
        return jax, jnp
    except Exception:  # pragma: no cover - a broken jax install is not our benchmark
        return None


def header(threads: int) -> Dict[str, object]:
    torch = _torch() if _have("torch") else None
    info: Dict[str, object] = {
        "cpu": cpu_model(),
        "cpu_vendor": cpu_vendor(),
        "caches": caches(),
        "gemm_path": fd._core.gemm_path()[1],
        "bf16_gemm": fd._core.bf16_gemm()[1],
        "openmp_wait": wait_policy.get("why"),
        "adapt_threads": fd._core.neighbours()["adapting"],
        "cores": os.cpu_count(),
        "isa": fd._core.cpu_features(),
        "backend": fd.backend(),
        "available_backends": fd.available_backends(),
        "threads": threads,
        "openmp": fd._core.has_openmp(),
        "python": platform.python_version(),
        "fastdropout": fd.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "jax": None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m fastdropout " + " ".join(sys.argv[1:]) if sys.argv else "",
    }
    if _have("jax"):
        try:
            import jax

            info["jax"] = jax.__version__
        except Exception:  # pragma: no cover
            pass
    try:
        from threadpoolctl import threadpool_info

        blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})" for i in threadpool_info() if i.get("user_api") == "blas"]
        info["numpy_blas"] = ", ".join(blas) or None
    except Exception:
        info["numpy_blas"] = None
    return info


# --------------------------------------------------------------------------- cases


def elementwise_cases(n: int, threads: int) -> List[Tuple[str, str, Callable[[], object]]]:
    """(kernel, impl, fn) for n float32 elements."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    y = np.empty_like(x)
    cases: List[Tuple[str, str, Callable[[], object]]] = [
        ("memory limit", "numpy copyto", lambda: np.copyto(y, x)),
        ("mask (packed)", "fastdropout", lambda: fd.dropout_mask(n, P, seed=SEED, packed=True)),
        ("mask (packed)", "numpy rng.random >= p", lambda: np.packbits(rng.random(n, dtype=np.float32) >= P, bitorder="little")),
        ("mask (bool)", "fastdropout", lambda: fd.dropout_mask(n, P, seed=SEED)),
        ("mask (bool)", "numpy rng.random >= p", lambda: rng.random(n, dtype=np.float32) >= P),
        ("dropout forward", "fastdropout (out=)", lambda: fd.dropout(x, P, seed=SEED, out=y)),
        ("dropout forward", "fastdropout", lambda: fd.dropout(x, P, seed=SEED)),
        ("dropout forward", "numpy reference", lambda: reference.dropout(x, P, seed=SEED)),
        ("dropout backward", "fastdropout (out=)", lambda: fd.dropout_backward(x, P, seed=SEED, out=y)),
        ("dropout backward", "fastdropout", lambda: fd.dropout_backward(x, P, seed=SEED)),
        ("dropout backward", "numpy reference", lambda: reference.dropout_backward(x, P, seed=SEED)),
    ]
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
        tx = torch.from_numpy(x)
        _, tmask = torch.native_dropout(tx, P, True)
        cases += [
            ("dropout forward", "torch", lambda: torch.nn.functional.dropout(tx, P, training=True)),
            ("dropout backward", "torch", lambda: torch.ops.aten.native_dropout_backward(tx, tmask, 1.0 / (1.0 - P))),
            ("mask (bool)", "torch", lambda: torch.empty(n).bernoulli_(1.0 - P)),
        ]
    jx = _jax()
    if jx is not None:
        jax, jnp = jx
        key = jax.random.PRNGKey(SEED)
        jxa = jnp.asarray(x)

        @jax.jit
        def jdrop(k, v):
            keep = jax.random.bernoulli(k, 1.0 - P, v.shape)
            return jnp.where(keep, v / (1.0 - P), 0.0)

        cases.append(("dropout forward", "jax (jit)", lambda: jdrop(key, jxa).block_until_ready()))
    return cases


def _fd_layer(x, w, b, dy):
    """fastdropout's fused layer on these operands: (forward, forward + backward)."""
    def forward():
        return fd.dropout_dense(x, w, b, P, seed=SEED)

    def forward_backward():
        fd.dropout_dense(x, w, b, P, seed=SEED)
        fd.dropout_dense_backward(dy, x, w, P, seed=SEED)

    return forward, forward_backward


def _torch_layer(torch, x, w, b, dy):
    """torch's F.linear(F.dropout(x)) on these tensors: (forward, forward + backward)."""
    F = torch.nn.functional
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))

    def forward():
        with torch.no_grad():
            return F.linear(F.dropout(x, P, training=True), w, b)

    def forward_backward():
        out = F.linear(F.dropout(xg, P, training=True), wg, bg)
        out.backward(dy)
        xg.grad = wg.grad = bg.grad = None

    return forward, forward_backward


def dense_cases(shape: Tuple[int, int, int], threads: int) -> List[Tuple[str, str, Callable[[], object], float]]:
    """(kernel, impl, fn, flops) for a (batch, in, out) layer."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((n, k), dtype=np.float32) / math.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    fwd, fwdbwd = 2.0 * m * k * n, 6.0 * m * k * n

    fd_fwd, fd_fwd_bwd = _fd_layer(x, w, b, dy)
    cases = [
        ("forward", "numpy x @ W.T + b", lambda: x @ w.T + b, fwd),
        ("forward", "numpy reference dropout, then matmul", lambda: reference.dropout(x, P, seed=SEED) @ w.T + b, fwd),
        ("forward", "fastdropout dense (p=0)", lambda: fd.dense(x, w, b), fwd),
        ("forward", "fastdropout", fd_fwd, fwd),
        ("forward+backward", "fastdropout", fd_fwd_bwd, fwdbwd),
    ]
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
        tensors = [torch.from_numpy(a) for a in (x, w, b, dy)]
        torch_fwd, torch_fwd_bwd = _torch_layer(torch, *tensors)
        cases += [("forward", "torch", torch_fwd, fwd), ("forward+backward", "torch", torch_fwd_bwd, fwdbwd)]
        if _have("ml_dtypes"):  # bfloat16 operands (NumPy's through ml_dtypes) against torch's bfloat16 layer
            import ml_dtypes

            bf = ml_dtypes.bfloat16
            fd_fwd_bf16, fd_fwd_bwd_bf16 = _fd_layer(x.astype(bf), w.astype(bf), b, dy.astype(bf))
            torch_fwd_bf16, torch_fwd_bwd_bf16 = _torch_layer(torch, *(t.to(torch.bfloat16) for t in tensors))
            cases += [
                ("forward, bfloat16", "fastdropout", fd_fwd_bf16, fwd),
                ("forward, bfloat16", "torch", torch_fwd_bf16, fwd),
                ("forward+backward, bfloat16", "fastdropout", fd_fwd_bwd_bf16, fwdbwd),
                ("forward+backward, bfloat16", "torch", torch_fwd_bwd_bf16, fwdbwd),
            ]
    jx = _jax()
    if jx is not None:
        jax, jnp = jx
        key = jax.random.PRNGKey(SEED)
        jxx, jw, jb, jdy = (jnp.asarray(a) for a in (x, w, b, dy))

        def layer(xx, ww, bb):
            keep = jax.random.bernoulli(key, 1.0 - P, xx.shape)
            return jnp.where(keep, xx / (1.0 - P), 0.0) @ ww.T + bb

        jf = jax.jit(layer)
        def layer_and_grads(xx, ww, bb):
            # return the forward output too: XLA drops any work whose result is unused,
            # and a vjp alone would skip the forward GEMM
            out, pullback = jax.vjp(layer, xx, ww, bb)
            return out, pullback(jdy)

        jg = jax.jit(layer_and_grads)
        cases += [
            ("forward", "jax (jit)", lambda: jf(jxx, jw, jb).block_until_ready(), fwd),
            ("forward+backward", "jax (jit)", lambda: jax.block_until_ready(jg(jxx, jw, jb)), fwdbwd),
        ]
    return cases


ATTENTION_CASES = [(128, 8, 8), (512, 8, 8), (2048, 1, 8)]  # (tokens, batch, heads); head size 64
ATTENTION_P = 0.1
MEMORY_LENGTHS = [1024, 2048, 4096]  # batch 1, 4 heads, head size 64


def attention_cases(length: int, batch: int, heads: int, threads: int):
    """(kernel, impl, fn, flops) for self-attention over (batch, heads, length, 64)."""
    rng = np.random.default_rng(0)
    shape = (batch, heads, length, 64)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    fwd = 4.0 * batch * heads * length * length * 64  # q k^T and P v
    fwdbwd = fwd * 3.5  # the backward: q k^T again and four more products

    def fd_fwd_bwd():
        out, lse, (seed, offset) = fd.attention(q, k, v, ATTENTION_P, return_lse=True, return_stream=True)
        fd.attention_backward(dout, q, k, v, out, lse, ATTENTION_P, seed=seed, offset=offset)

    cases = [
        ("forward", f"fastdropout p={ATTENTION_P}", lambda: fd.attention(q, k, v, ATTENTION_P), fwd),
        ("forward", "fastdropout p=0", lambda: fd.attention(q, k, v), fwd),
        ("forward+backward", f"fastdropout p={ATTENTION_P}", fd_fwd_bwd, fwdbwd),
    ]
    torch = _torch()
    if torch is not None:
        import fastdropout.torch as fdt

        F = torch.nn.functional
        torch.set_num_threads(threads)
        tq, tk, tv, tdout = (torch.from_numpy(a) for a in (q, k, v, dout))
        gq, gk, gv = (t.clone().requires_grad_(True) for t in (tq, tk, tv))

        def sdpa(p):
            def run():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(tq, tk, tv, dropout_p=p)
            return run

        def sdpa_fwd_bwd(fn, p):
            def run():
                fn(gq, gk, gv, dropout_p=p).backward(tdout)
                gq.grad = gk.grad = gv.grad = None
            return run

        cases += [
            ("forward", f"torch sdpa p={ATTENTION_P}", sdpa(ATTENTION_P), fwd),
            ("forward", "torch sdpa p=0", sdpa(0.0), fwd),
            ("forward+backward", f"fastdropout.torch p={ATTENTION_P}",
             sdpa_fwd_bwd(fdt.scaled_dot_product_attention, ATTENTION_P), fwdbwd),
            ("forward+backward", f"torch sdpa p={ATTENTION_P}", sdpa_fwd_bwd(F.scaled_dot_product_attention, ATTENTION_P), fwdbwd),
            ("forward+backward", "torch sdpa p=0", sdpa_fwd_bwd(F.scaled_dot_product_attention, 0.0), fwdbwd),
        ]
    return cases


FAMILY_ELEMENTS = 1 << 24
FAMILY_DENSE = (256, 1024, 1024)
FAMILY_NORM = (8192, 1024)


def family_cases(threads: int, n: int = FAMILY_ELEMENTS, dense: Tuple[int, int, int] = FAMILY_DENSE,
                 norm: Tuple[int, int] = FAMILY_NORM):
    """[(size, [(kernel, impl, fn, work, unit)])] for the rest of the dropout family: n elements
    (a multiple of 64 * 256), a DropConnect layer and a dropout+add+LayerNorm of rows x D."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    y = np.empty_like(x)
    img = x.reshape(64, 256, -1)
    img_out = np.empty_like(img)
    cases = [
        ("copy (the memory limit)", "numpy copyto", lambda: np.copyto(y, x), float(n), "Gelem/s"),
        ("channel dropout (N, C, 1)", "fastdropout", lambda: fd.dropout(img, P, seed=SEED, noise_shape=(64, 256, 1),
                                                                          out=img_out), float(n), "Gelem/s"),
        ("alpha dropout", "fastdropout", lambda: fd.alpha_dropout(x, P, seed=SEED, out=y), float(n), "Gelem/s"),
        ("Gaussian dropout", "fastdropout", lambda: fd.gaussian_dropout(x, P, seed=SEED, out=y), float(n), "Gelem/s"),
    ]
    m, k, o = dense
    xd = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((o, k), dtype=np.float32) / math.sqrt(k)).astype(np.float32)
    b = np.zeros(o, np.float32)
    dy = rng.standard_normal((m, o), dtype=np.float32)

    def dc_fwd_bwd():
        fd.dropconnect_dense(xd, w, b, P, seed=SEED)
        fd.dropconnect_dense_backward(dy, xd, w, P, seed=SEED)

    rows, d = norm
    h = rng.standard_normal((rows, d), dtype=np.float32)
    r = rng.standard_normal((rows, d), dtype=np.float32)
    lw, lb = np.ones(d, np.float32), np.zeros(d, np.float32)
    g = rng.standard_normal((rows, d), dtype=np.float32)

    def ln_fwd_bwd():
        fd.dropout_add_layer_norm(h, r, lw, lb, 0.1, seed=SEED)
        fd.dropout_add_layer_norm_backward(g, h, r, lw, lb, 0.1, seed=SEED)

    flops = 6.0 * m * k * o
    dc = [("DropConnect fwd+bwd", "fastdropout", dc_fwd_bwd, flops, "GFLOP/s")]
    ln = [("dropout+add+LayerNorm fwd+bwd", "fastdropout", ln_fwd_bwd, float(rows * d), "Gelem/s")]
    torch = _torch()
    if torch is not None:
        F = torch.nn.functional
        torch.set_num_threads(threads)
        tx = torch.from_numpy(x)
        txd, tdy = torch.from_numpy(xd), torch.from_numpy(dy)
        tw, tb = torch.from_numpy(w).clone().requires_grad_(True), torch.from_numpy(b).clone().requires_grad_(True)
        txg = txd.clone().requires_grad_(True)

        def torch_dc():
            F.linear(txg, F.dropout(tw, P, training=True), tb).backward(tdy)
            txg.grad = tw.grad = tb.grad = None

        th, tr, tg = (torch.from_numpy(a).clone().requires_grad_(True) for a in (h, r, g))
        tlw, tlb = torch.from_numpy(lw).clone().requires_grad_(True), torch.from_numpy(lb).clone().requires_grad_(True)

        def torch_ln():
            F.layer_norm(tr + F.dropout(th, 0.1, training=True), (d,), tlw, tlb).backward(tg.detach())
            th.grad = tr.grad = tlw.grad = tlb.grad = None

        cases.append(("alpha dropout", "torch F.alpha_dropout", lambda: F.alpha_dropout(tx, P, True), float(n), "Gelem/s"))
        dc.append(("DropConnect fwd+bwd", "torch F.linear(x, F.dropout(W))", torch_dc, flops, "GFLOP/s"))
        ln.append(("dropout+add+LayerNorm fwd+bwd", "torch F.layer_norm(r + F.dropout(h))", torch_ln, float(rows * d),
                   "Gelem/s"))
    return [(str(n), cases), ("x".join(map(str, dense)), dc), (f"{rows}x{d}", ln)]


def _peak_rss_kib() -> float:
    """This process's peak resident size in KiB: Linux's VmHWM (the high-water mark of this
    address space, which starts afresh at exec), else ru_maxrss (which on Linux also keeps
    the peak of the process that spawned this one, when that is larger)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def attention_peak_child(impl: str, length: int) -> None:
    """Run in a fresh process: prints the peak resident memory that one forward+backward at
    p = ATTENTION_P adds (MiB) over the process after its inputs exist."""
    rng = np.random.default_rng(0)
    shape = (1, 4, length, 64)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    if impl == "fastdropout":
        small = tuple(a[:, :, :64] for a in (q, k, v, dout))
        out, lse = fd.attention(*small[:3], ATTENTION_P, seed=1, return_lse=True)  # load everything first
        fd.attention_backward(small[3], *small[:3], out, lse, ATTENTION_P, seed=1)
        before = _peak_rss_kib()
        out, lse = fd.attention(q, k, v, ATTENTION_P, seed=1, return_lse=True)
        fd.attention_backward(dout, q, k, v, out, lse, ATTENTION_P, seed=1)
    else:
        import torch

        tq, tk, tv = (torch.from_numpy(a).requires_grad_(True) for a in (q, k, v))
        tdout = torch.from_numpy(dout)
        F = torch.nn.functional
        F.scaled_dot_product_attention(tq[:, :, :64], tk[:, :, :64], tv[:, :, :64], dropout_p=ATTENTION_P).sum().backward()
        before = _peak_rss_kib()
        F.scaled_dot_product_attention(tq, tk, tv, dropout_p=ATTENTION_P).backward(tdout)
    print((_peak_rss_kib() - before) / 1024.0)


def measure_attention_memory(lengths: Sequence[int]) -> List[Result]:
    """Peak memory of one forward+backward, each in a fresh process (Linux: VmHWM)."""
    import subprocess

    out = []
    impls = ["fastdropout"] + (["torch sdpa"] if _have("torch") else [])
    for impl in impls:
        for length in lengths:
            code = f"from fastdropout._bench import attention_peak_child as f; f({impl!r}, {length})"
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            mib = float(run.stdout.strip().splitlines()[-1])
            out.append(Result("memory", "forward+backward peak", impl, f"1x4x{length}x64", fd.get_num_threads(),
                              0.0, 0.0, 0.0, 1, mib, "MiB"))
    return out


# --------------------------------------------------------------------------- run


MIXED_SHAPES = [(64, 784, 512), (256, 1024, 1024)]
MLP = (784, 1024, 1024, 10)
MLP_P = (0.2, 0.5, 0.5)
TRAIN_BATCHES = [64, 256, 1024]


def mixed_cases(shape: Tuple[int, int, int], threads: int) -> List[Tuple[str, Callable[[], object]]]:
    """(name, fn) of the layer and its neighbours in a user's process, for one shape."""
    m, k, n = shape
    rng = np.random.default_rng(2)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((n, k), dtype=np.float32) / math.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    cases: List[Tuple[str, Callable[[], object]]] = [
        ("fastdropout dropout_dense", lambda: fd.dropout_dense(x, w, b, P, seed=SEED)),
        ("numpy x @ W.T + b", lambda: x @ w.T + b),
    ]
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
        tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
        cases.append(("torch F.linear", lambda: torch.nn.functional.linear(tx, tw, tb)))
    return cases


def measure_mixed(cases: List[Tuple[str, Callable[[], object]]], repeats: int
                  ) -> List[Tuple[str, str, Tuple[float, float, float], float]]:
    """fastdropout (cases[0]) in a loop with each other library in turn, as a user's loop
    alternates them: in the loop with library L, fastdropout and L are each timed right
    after a call of their own kind and right after one of the other.

    Returns (target, before, (median, min, max), slowdown): ``before`` is "... (L loop)" for
    fastdropout's own-kind row in L's loop, and the slowdown is the median against the same
    call's median right after its own kind in that loop.  Each loop's pairs are timed in
    turn, in a new order each round, one call per sample.
    """
    ours, out = cases[0], []
    for peer in cases[1:]:
        pairs = [(ours, ours), (ours, peer), (peer, ours), (peer, peer)]
        timed = measure_interleaved([t[1] for t, _ in pairs], repeats, min_sample_s=0.0, before=[b[1] for _, b in pairs])
        own = {id(t): m[0] for (t, b), m in zip(pairs, timed) if t is b}
        loop = peer[0].split()[0]  # the library ("numpy x @ W.T + b" -> "numpy")
        for (t, b), m in zip(pairs, timed):
            before = f"{b[0]} ({loop} loop)" if t is ours and b is ours else b[0]
            out.append((t[0], before, m, m[0] / own[id(t)]))
    return out


COMPILED_FD = "fastdropout.torch, torch.compile"


def training_cases(batch: int, threads: int, sizes: Sequence[int] = MLP, ps: Sequence[float] = MLP_P,
                   compile_torch: bool = True) -> List[Tuple[str, Callable[[], object]]]:
    """One SGD step (forward, cross-entropy, backward, update) of an MLP with dropout before
    every Linear and ReLU between them: fastdropout.torch, torch eager, torch.compile of the
    torch model and, with `compile_torch`, torch.compile(fullgraph=True) of the fastdropout one."""
    torch = _torch()
    if torch is None:
        return []
    import fastdropout.torch as fdt

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)

    def torch_model():
        layers: List[object] = []
        for i, (a, b_) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [torch.nn.Dropout(ps[i]), torch.nn.Linear(a, b_)]
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)

    def fd_model():
        layers = [fdt.DropoutLinear(a, b_, p=ps[i], activation="relu" if i < len(sizes) - 2 else None)
                  for i, (a, b_) in enumerate(zip(sizes[:-1], sizes[1:]))]
        return torch.nn.Sequential(*layers)

    def step_fn(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    cases = [("fastdropout.torch", step_fn(fd_model())), ("torch eager", step_fn(torch_model()))]
    if compile_torch:
        cases.append(("torch.compile", step_fn(torch.compile(torch_model()))))
        cases.append((COMPILED_FD, step_fn(torch.compile(fd_model(), fullgraph=True))))
    return cases


def run(
    quick: bool = False,
    threads: Optional[int] = None,
    backend: Optional[str] = None,
    repeats: Optional[int] = None,
    element_sizes: Optional[Dict[str, int]] = None,
    dense_shapes: Optional[Sequence[Tuple[int, int, int]]] = None,
    scaling: bool = True,
    progress: bool = True,
    mixed_shapes: Optional[Sequence[Tuple[int, int, int]]] = None,
    train_batches: Optional[Sequence[int]] = None,
    mlp: Sequence[int] = MLP,
    compile_torch: Optional[bool] = None,
    attention: Optional[Sequence[Tuple[int, int, int]]] = None,
    memory_lengths: Optional[Sequence[int]] = None,
    family: Optional[Dict[str, object]] = None,
) -> Tuple[Dict[str, object], List[Result]]:
    """Measure everything; returns (header, results)."""
    if backend is not None:
        fd._core.set_backend(backend)
    if threads is not None:
        fd.set_num_threads(threads)
    threads = fd.get_num_threads()
    if element_sizes is None:
        element_sizes = {"large": ELEMENT_SIZES["large"]} if quick else ELEMENT_SIZES
    if dense_shapes is None:
        dense_shapes = DENSE_SHAPES[:2] if quick else DENSE_SHAPES
    if mixed_shapes is None:
        mixed_shapes = MIXED_SHAPES
    if train_batches is None:
        train_batches = TRAIN_BATCHES[:2] if quick else TRAIN_BATCHES
    if compile_torch is None:
        compile_torch = not quick
    if attention is None:
        attention = ATTENTION_CASES[:2] if quick else ATTENTION_CASES
    if memory_lengths is None:
        memory_lengths = MEMORY_LENGTHS
    repeats = repeats or (5 if quick else 9)
    info = header(threads)

    # NumPy's BLAS gets the same thread count as fastdropout and torch, when
    # threadpoolctl is there to set it.
    limiter = None
    if _have("threadpoolctl"):
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(threads)
    info["numpy_threads"] = threads if limiter is not None else "OpenBLAS default"
    groups = []  # (group, size, [(kernel, impl, fn, work, unit)])
    for n in element_sizes.values():
        cases = [c for c in elementwise_cases(n, threads)
                 if not (quick and c[1] == "numpy reference" and c[0] == "dropout backward")]  # ~0.7 s a call at 16M
        groups.append(("elementwise", str(n), [(k, i, f, float(n), "Gelem/s") for k, i, f in cases]))
    for shape in dense_shapes:
        groups.append(("dense", "x".join(map(str, shape)), [(k, i, f, w, "GFLOP/s") for k, i, f, w in dense_cases(shape, threads)]))
    if dense_shapes and not (_have("torch") and _have("ml_dtypes")):
        info.setdefault("skipped", []).append("bfloat16 dense rows: need torch and ml_dtypes")
    if family is None or family:  # None: the default sizes; {}: no family rows
        for size, cases in family_cases(threads, **(family or {})):
            groups.append(("family", size, cases))
    for length, batch, heads in attention:
        groups.append(("attention", f"{batch}x{heads}x{length}x64",
                       [(k, i, f, w, "GFLOP/s") for k, i, f, w in attention_cases(length, batch, heads, threads)]))
    total = sum(len(g[2]) for g in groups) + len(mixed_shapes) + len(train_batches) + (1 if memory_lengths else 0)
    bar = Progress(total + (len(_scaling_threads()) if scaling else 0), progress)
    results: List[Result] = []
    try:
        for group, size, cases in groups:
            for kernel, impl, *_ in cases:
                bar.step(f"{group} {size}: {kernel} | {impl}")
            timed = measure_interleaved([c[2] for c in cases], repeats)
            for (kernel, impl, _, work, unit), (med, lo, hi) in zip(cases, timed):
                results.append(Result(group, kernel, impl, size, threads, med, lo, hi, repeats, work / med / 1e9, unit))
        for shape in mixed_shapes:
            bar.step(f"mixed process {'x'.join(map(str, shape))}")
            m, k, n = shape
            for target, before, (med, lo, hi), slowdown in measure_mixed(mixed_cases(shape, threads), max(repeats, 15)):
                results.append(Result("mixed", f"after {before}", target, "x".join(map(str, shape)), threads, med, lo, hi,
                                      max(repeats, 15), 2.0 * m * k * n / med / 1e9, "GFLOP/s",
                                      {"after its own kind": slowdown}))
        for batch in train_batches:
            bar.step(f"training step, batch {batch}")
            cases = training_cases(batch, threads, mlp, compile_torch=compile_torch)
            if not cases:
                info.setdefault("skipped", []).append(f"training step, batch {batch}: needs torch")
                continue
            flops = 6.0 * batch * sum(a * b for a, b in zip(mlp[:-1], mlp[1:]))
            timed = measure_interleaved([c[1] for c in cases], repeats, min_sample_s=2e-2)
            for (impl, _), (med, lo, hi) in zip(cases, timed):
                results.append(Result("training", "SGD step", impl, f"batch {batch}",
                                      threads, med, lo, hi, repeats, flops / med / 1e9, "GFLOP/s"))
        if memory_lengths:
            bar.step("attention peak memory (fresh processes)")
            results += measure_attention_memory(memory_lengths)
        if scaling:
            results += _measure_scaling(element_sizes, dense_shapes, repeats, bar)
    finally:
        bar.close()
        fd.set_num_threads(threads)
        if limiter is not None:
            limiter.restore_original_limits()
    _add_ratios(results)
    info["notes"] = disturbance_notes(results)
    return info, results


def _scaling_threads() -> List[int]:
    return sorted({1, *range(2, (os.cpu_count() or 1) + 1)})


def _measure_scaling(element_sizes, dense_shapes, repeats: int, bar: Progress) -> List[Result]:
    """fastdropout alone at 1..cores threads, interleaved over the thread counts."""
    n = max(element_sizes.values())
    shape = dense_shapes[min(1, len(dense_shapes) - 1)]
    m, k, nn = shape
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n, dtype=np.float32)
    y = np.empty_like(x)
    xd = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((nn, k), dtype=np.float32)
    dy = rng.standard_normal((m, nn), dtype=np.float32)
    def dense_forward():
        return fd.dropout_dense(xd, w, None, P, seed=SEED)

    kernels = [
        ("mask (packed)", str(n), lambda: fd.dropout_mask(n, P, seed=SEED, packed=True), float(n), "Gelem/s"),
        ("dropout forward", str(n), lambda: fd.dropout(x, P, seed=SEED, out=y), float(n), "Gelem/s"),
        ("dropout_dense forward", "x".join(map(str, shape)), dense_forward, 2.0 * m * k * nn, "GFLOP/s"),
        ("dropout_dense backward", "x".join(map(str, shape)), lambda: fd.dropout_dense_backward(dy, xd, w, P, seed=SEED), 4.0 * m * k * nn, "GFLOP/s"),
    ]
    counts = _scaling_threads()
    out = []
    for t in counts:
        bar.step(f"scaling: {t} threads")
    # Alone: fastdropout's own calls for 0.3 s first (untimed), so that the workers other
    # libraries left spinning in the rows before (OpenBLAS's spin about 0.1 s after a call)
    # have gone to sleep and the neighbour rule's backoff has ended, as in a process that
    # runs fastdropout only.  Without it the quick run's 2-thread GEMM rows met them.
    fd.set_num_threads(counts[-1])
    t_end = time.perf_counter() + 0.3
    while time.perf_counter() < t_end:
        dense_forward()
    for kernel, size, fn, work, unit in kernels:
        def at(t, fn=fn):
            def call():
                fd.set_num_threads(t)
                return fn()
            return call
        for t, (med, lo, hi) in zip(counts, measure_interleaved([at(t) for t in counts], repeats)):
            out.append(Result("threads", kernel, "fastdropout", size, t, med, lo, hi, repeats, work / med / 1e9, unit))
    return out


def _add_ratios(results: List[Result]) -> None:
    """For each fastdropout row: peer time / our time, for peers doing the same work."""
    by_key: Dict[Tuple[str, str, str], List[Result]] = {}
    for r in results:
        if r.group in ("elementwise", "dense", "training", "attention", "family"):
            by_key.setdefault((r.group, r.kernel, r.size), []).append(r)
    for (group, kernel, size), rows in by_key.items():
        peers = [r for r in rows if not r.impl.startswith("fastdropout")]
        if group == "elementwise":
            peers += by_key.get((group, "memory limit", size), [])
        if group == "family" and kernel != "copy (the memory limit)":
            peers += by_key.get((group, "copy (the memory limit)", size), []) if "fwd+bwd" not in kernel else []
        if group == "dense" and kernel == "forward":
            peers += [r for r in rows if r.impl == "fastdropout dense (p=0)"]
        for r in rows:
            if r.impl.startswith("fastdropout"):
                r.ratios = {p.impl: p.median_s / r.median_s for p in peers if p is not r}
            if r.impl == COMPILED_FD:  # compiled against eager, the same model
                r.ratios.update({q.impl: q.median_s / r.median_s for q in rows if q.impl == "fastdropout.torch"})
    for r in results:
        if r.group == "threads":  # speed-up over one thread
            one = next(q for q in results if q.group == "threads" and q.kernel == r.kernel and q.threads == 1)
            r.ratios = {"1 thread": one.median_s / r.median_s}
        if r.group == "memory" and r.impl == "fastdropout":  # peer peak / our peak
            r.ratios = {q.impl: q.rate / r.rate for q in results
                        if q.group == "memory" and q.size == r.size and q.impl != r.impl and r.rate > 0}


def disturbance_notes(results: List[Result]) -> List[str]:
    """Signs that the host was busy during the run (a skeptic's first question)."""
    notes = []
    wide = [r for r in results if r.group not in ("mixed",) and r.min_s > 0 and r.max_s / r.min_s > 1.5]
    if wide:
        notes.append(f"{len(wide)} of {len(results)} rows spread by more than 1.5x between their fastest and slowest repeat "
                     "(the host was busy at times: compare medians, and rerun)")
    two = [r for r in results if r.group == "threads" and r.threads == 2 and r.unit == "GFLOP/s"]
    if two and (os.cpu_count() or 1) >= 2 and min(r.ratios.get("1 thread", 2.0) for r in two) < 1.5:
        notes.append("the GEMM scaled below 1.5x from 1 to 2 threads: another process (or a thread another library "
                     "left spinning in this one) probably held a core")
    return notes


# --------------------------------------------------------------------------- report


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:9.3f} ms" if s >= 1e-4 else f"{s * 1e6:9.1f} us"


def _spread(r: Result) -> str:
    return f"{_fmt_time(r.min_s).strip()}-{_fmt_time(r.max_s).strip()}"


def format_report(info: Dict[str, object], results: List[Result]) -> str:
    out = []
    threads = info["threads"]
    out.append("fastdropout benchmark")
    caches = ", ".join(f"{k} {v}" for k, v in (info.get("caches") or {}).items())
    out.append(f"  cpu      : {info['cpu']} ({info.get('cpu_vendor', '?')}; {info['cores']} cores{'; ' + caches if caches else ''})")
    out.append(f"  isa      : {info['isa']}; backend {info['backend']} (available: {', '.join(info['available_backends'])})")
    peers = f"NumPy's BLAS ({info.get('numpy_threads')})" + (" and torch" if info.get("torch") else "")
    out.append(f"  threads  : {threads} thread{'s' if threads != 1 else ''} for fastdropout and {peers}")
    out.append(f"  gemm path: {info.get('gemm_path')}")
    if info.get("bf16_gemm"):
        out.append(f"  bf16 gemm: {info['bf16_gemm']}")
    if info.get("openmp_wait"):
        out.append(f"  openmp   : idle threads wait {info['openmp_wait']}")
    if "adapt_threads" in info:
        out.append("  neighbours: " + ("threads give way (small problems run on one thread while other libraries' "
                                       "threads hold our cores)" if info["adapt_threads"] else
                                       "threads do not give way (FASTDROPOUT_ADAPT_THREADS=0)"))
    if info.get("torch_layer"):
        out.append(f"  torch layer: {info['torch_layer']}")
    vers = ", ".join(f"{k} {info[k]}" for k in ("fastdropout", "numpy", "torch", "jax") if info.get(k))
    out.append(f"  versions : python {info['python']}, {vers}")
    if info.get("numpy_blas"):
        out.append(f"  numpy blas: {info['numpy_blas']}")
    reps = results[0].repeats if results else 0
    out.append(f"  date     : {info['date']}; each row: median of {reps} samples (fastest-slowest beside it), "
               "the implementations of a row group timed in turn, in a new order each round, no sleeps")
    out.append("  ratios   : peer time / fastdropout time for the same work (>1: fastdropout is faster)")
    titles = (("elementwise", "Elementwise, float32, p=0.5"),
              ("dense", "Dropout -> dense, float32, p=0.5 (size = batch x in x out)"),
              ("training", "Training step: SGD on an MLP (784-1024-1024-10 unless said) with dropout before each Linear (0.2, 0.5, 0.5), ReLU, cross-entropy"),
              ("family", f"The dropout family, float32 (16M elements at p={P}; DropConnect at {'x'.join(map(str, FAMILY_DENSE))}, p={P}; "
                         f"dropout+add+LayerNorm at {FAMILY_NORM[0]}x{FAMILY_NORM[1]}, p=0.1)"),
              ("attention", "Attention, float32, dropout on the probabilities (size = batch x heads x tokens x head size; rate: nominal FLOPs, 3.5x the forward's for forward+backward)"))
    for group, title in titles:
        rows = [r for r in results if r.group == group]
        if not rows:
            continue
        out.append("")
        out.append(title)
        kw = max(18, *(len(r.kernel) for r in rows))  # the kernel column, as wide as its longest name
        out.append(f"  {'size':>15} {'kernel':<{kw}} {'implementation':<38} {'median':>12} {'fastest-slowest':>22} {'rate':>16}  ratios")
        for r in rows:
            ratios = "  ".join(f"{v:.2f}x vs {k}" for k, v in r.ratios.items())
            if not ratios and r.impl.startswith("fastdropout"):
                ratios = "(no peer for this work installed: torch or jax)"
            out.append(f"  {r.size:>15} {r.kernel:<{kw}} {r.impl:<38} {_fmt_time(r.median_s)} {_spread(r):>22} "
                       f"{r.rate:9.2f} {r.unit:<7}  {ratios}")
    rows = [r for r in results if r.group == "memory"]
    if rows:
        out.append("")
        out.append(f"Attention peak memory: what one forward+backward at p={ATTENTION_P} adds to a fresh process's peak resident size")
        out.append(f"  {'size':>15} {'implementation':<38} {'peak':>12}  ratios")
        for r in rows:
            ratios = "  ".join(f"{v:.1f}x less than {k}" for k, v in r.ratios.items())
            out.append(f"  {r.size:>15} {r.impl:<38} {r.rate:9.1f} MiB  {ratios}")
    rows = [r for r in results if r.group == "mixed"]
    if rows:
        out.append("")
        out.append("Mixed process: fastdropout in a loop with each other library in turn, each call timed right after one")
        out.append("call of the other (no pause between), against the same call right after one of its own kind in that loop")
        out.append("(slowdown > 1: the neighbour's threads got in the way)")
        out.append(f"  {'size':>15} {'call':<28} {'right after':<41} {'median':>12} {'fastest-slowest':>22}  slowdown")
        for r in rows:
            out.append(f"  {r.size:>15} {r.impl:<28} {r.kernel[len('after '):]:<41} {_fmt_time(r.median_s)} {_spread(r):>22}  "
                       f"{r.ratios.get('after its own kind', 1.0):.2f}x")
    rows = [r for r in results if r.group == "threads"]
    if rows:
        out.append("")
        out.append("Thread scaling (fastdropout alone)")
        out.append(f"  {'kernel':<24} {'size':>15} {'threads':>7} {'median':>12} {'fastest-slowest':>22} {'rate':>16}  speed-up")
        for r in rows:
            out.append(f"  {r.kernel:<24} {r.size:>15} {r.threads:>7} {_fmt_time(r.median_s)} {_spread(r):>22} "
                       f"{r.rate:9.2f} {r.unit:<7}  {r.ratios.get('1 thread', 1.0):.2f}x")
    for skipped in info.get("skipped") or []:
        out.append("")
        out.append(f"Skipped: {skipped}")
    notes = info.get("notes") or []
    out.append("")
    out.append("Notes: " + ("; ".join(notes) if notes else "no sign of a disturbed run (spreads under 1.5x, 2-thread scaling >= 1.5x)"))
    return "\n".join(out)


def to_json(info: Dict[str, object], results: List[Result]) -> Dict[str, object]:
    return {"schema": 1, "header": info, "results": [asdict(r) for r in results]}


def plot(results: List[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    rows = [r for r in results if r.group == "elementwise" and r.kernel in ("dropout forward", "memory limit")]
    for impl in dict.fromkeys(r.impl for r in rows):
        pts = sorted((int(r.size), r.rate) for r in rows if r.impl == impl)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("elements (float32)")
    ax.set_ylabel("Gelem/s")
    ax.set_title("dropout forward, p=0.5")
    ax.legend(fontsize=8)
    ax = axes[1]
    rows = [r for r in results if r.group == "dense"]
    shapes = list(dict.fromkeys(r.size for r in rows))
    impls = list(dict.fromkeys(f"{r.kernel}: {r.impl}" for r in rows))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        vals = [next((r.rate for r in rows if f"{r.kernel}: {r.impl}" == impl and r.size == s), 0.0) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels(shapes)
    ax.set_ylabel("GFLOP/s")
    ax.set_title("dropout -> dense (batch x in x out)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdropout bench", description=DESCRIPTION)
    ap.add_argument("--quick", action="store_true",
                    help="16M elements, the two smaller layers, training steps at batch 64 and 256 without torch.compile, "
                         "attention at 128 and 512 tokens, 5 repeats")
    ap.add_argument("--json", metavar="PATH", type=output_path_arg, help="save every figure as JSON")
    ap.add_argument("--plot", metavar="PATH", type=output_path_arg,
                    help="draw throughput against size to a PNG (needs matplotlib)")
    ap.add_argument("--threads", type=positive_int_arg, help="threads for fastdropout and the peers (default: all cores)")
    ap.add_argument("--backend", choices=fd._core.compiled_backends(),
                    help=f"force a SIMD backend this CPU has ({', '.join(fd.available_backends())})")
    ap.add_argument("--repeats", type=positive_int_arg, help="timed samples per figure (default 9, 5 with --quick)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile training-step rows")
    ap.add_argument("--no-scaling", action="store_true", help="skip the thread-scaling table")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    args = ap.parse_args(argv)
    if args.backend is not None and args.backend not in fd.available_backends():
        ap.error(f"--backend {args.backend}: this CPU has {', '.join(fd.available_backends())}")
    if args.plot and not _have("matplotlib"):
        ap.error("--plot needs matplotlib: pip install 'fastdropout[bench]'")
    kwargs = {}
    if args.tiny:
        kwargs = dict(element_sizes={"tiny": 4096}, dense_shapes=[(8, 16, 24)], repeats=1, mixed_shapes=[(8, 16, 24)],
                      train_batches=[8], mlp=(16, 32, 32, 10), compile_torch=False, attention=[(16, 1, 2)],
                      memory_lengths=[64], family=dict(n=64 * 256 * 2, dense=(8, 16, 24), norm=(16, 32)))
    info, results = run(
        quick=args.quick, threads=args.threads, backend=args.backend, repeats=args.repeats or kwargs.pop("repeats", None),
        scaling=not args.no_scaling, **{**kwargs, **({"compile_torch": False} if args.no_compile else {})},
    )
    if info.get("torch"):  # (after the rows: the training rows build the C++ layer if it was not yet)
        from ._torch_native import describe

        info["torch_layer"] = describe()
    print(format_report(info, results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(to_json(info, results), fh, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0
