"""``python -m fastdropout bench``: fastdropout next to its peers, in one run.

Every figure is the median of several timed repeats of the same work; peers
(NumPy, and PyTorch and JAX when installed) run in the same process on the
same inputs, so the ratios hold even where absolute times drift.
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
from ._platform import caches, cpu_model, cpu_vendor
from ._runtime import wait_policy

P = 0.5
SEED = 1234

ELEMENT_SIZES = {"small": 1 << 16, "medium": 1 << 20, "large": 1 << 24}
DENSE_SHAPES = [(64, 784, 512), (256, 1024, 1024), (1024, 4096, 4096)]


@dataclass
class Result:
    """One measured row."""

    group: str  # "elementwise", "dense" or "threads"
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


SETTLE_S = 0.3


def measure(fn: Callable[[], object], repeats: int, min_sample_s: float = 2e-3, settle_s: float = SETTLE_S) -> Tuple[float, float, float]:
    """(median, min, max) seconds per call; each sample loops until >= min_sample_s.

    It first waits `settle_s`: thread pools of the previous case (OpenBLAS's
    workers spin for a long while after a call, so do OpenMP's and XLA's) must
    not steal the cores from the next one, whoever it is.
    """
    time.sleep(settle_s)
    fn()  # warm up: page faults, caches, lazy initialisation, JIT
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = max(1, min(1000, int(min_sample_s / max(once, 1e-9))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples), min(samples), max(samples)


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
        "openmp_wait": wait_policy.get("why"),
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


def dense_cases(shape: Tuple[int, int, int], threads: int) -> List[Tuple[str, str, Callable[[], object], float]]:
    """(kernel, impl, fn, flops) for a (batch, in, out) layer."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = (rng.standard_normal((n, k), dtype=np.float32) / math.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    fwd, fwdbwd = 2.0 * m * k * n, 6.0 * m * k * n

    def fd_fwd_bwd():
        fd.dropout_dense(x, w, b, P, seed=SEED)
        fd.dropout_dense_backward(dy, x, w, P, seed=SEED)

    cases = [
        ("forward", "numpy x @ W.T + b", lambda: x @ w.T + b, fwd),
        ("forward", "numpy reference dropout, then matmul", lambda: reference.dropout(x, P, seed=SEED) @ w.T + b, fwd),
        ("forward", "fastdropout dense (p=0)", lambda: fd.dense(x, w, b), fwd),
        ("forward", "fastdropout", lambda: fd.dropout_dense(x, w, b, P, seed=SEED), fwd),
        ("forward+backward", "fastdropout", fd_fwd_bwd, fwdbwd),
    ]
    torch = _torch()
    if torch is not None:
        F = torch.nn.functional
        torch.set_num_threads(threads)
        tx, tw, tb, tdy = (torch.from_numpy(a) for a in (x, w, b, dy))
        twg, tbg = tw.clone().requires_grad_(True), tb.clone().requires_grad_(True)
        txg = tx.clone().requires_grad_(True)

        def torch_fwd():
            with torch.no_grad():
                return F.linear(F.dropout(tx, P, training=True), tw, tb)

        def torch_fwd_bwd():
            out = F.linear(F.dropout(txg, P, training=True), twg, tbg)
            out.backward(tdy)
            txg.grad = twg.grad = tbg.grad = None

        cases += [("forward", "torch", torch_fwd, fwd), ("forward+backward", "torch", torch_fwd_bwd, fwdbwd)]
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


# --------------------------------------------------------------------------- run


def run(
    quick: bool = False,
    threads: Optional[int] = None,
    backend: Optional[str] = None,
    repeats: Optional[int] = None,
    element_sizes: Optional[Dict[str, int]] = None,
    dense_shapes: Optional[Sequence[Tuple[int, int, int]]] = None,
    scaling: bool = True,
    progress: bool = True,
    settle_s: Optional[float] = None,
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
    repeats = repeats or (3 if quick else 7)
    info = header(threads)

    plan: List[Tuple[str, str, str, Callable[[], object], float, str]] = []
    for label, n in element_sizes.items():
        for kernel, impl, fn in elementwise_cases(n, threads):
            if quick and impl == "numpy reference" and kernel == "dropout backward":
                continue  # ~0.7 s a call at 16M: the forward row already shows the reference
            plan.append(("elementwise", kernel, impl, fn, float(n), str(n)))
    for shape in dense_shapes:
        for kernel, impl, fn, flops in dense_cases(shape, threads):
            plan.append(("dense", kernel, impl, fn, flops, "x".join(map(str, shape))))
    scale_threads = sorted({1, *range(2, (os.cpu_count() or 1) + 1)}) if scaling else []
    scale_plan = []
    if scaling:
        n = max(element_sizes.values())
        shape = dense_shapes[min(1, len(dense_shapes) - 1)]
        m, k, nn = shape
        rng = np.random.default_rng(1)
        x = rng.standard_normal(n, dtype=np.float32)
        y = np.empty_like(x)
        xd = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((nn, k), dtype=np.float32)
        dy = rng.standard_normal((m, nn), dtype=np.float32)
        for t in scale_threads:
            scale_plan += [
                ("mask (packed)", str(n), t, lambda: fd.dropout_mask(n, P, seed=SEED, packed=True), float(n)),
                ("dropout forward", str(n), t, lambda: fd.dropout(x, P, seed=SEED, out=y), float(n)),
                ("dropout_dense forward", "x".join(map(str, shape)), t, lambda: fd.dropout_dense(xd, w, None, P, seed=SEED), 2.0 * m * k * nn),
                ("dropout_dense backward", "x".join(map(str, shape)), t, lambda: fd.dropout_dense_backward(dy, xd, w, P, seed=SEED), 4.0 * m * k * nn),
            ]

    # NumPy's BLAS gets the same thread count as fastdropout and torch, when
    # threadpoolctl is there to set it.
    limiter = None
    if _have("threadpoolctl"):
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(threads)
    info["numpy_threads"] = threads if limiter is not None else "OpenBLAS default"
    try:
        results = _measure_all(plan, scale_plan, repeats, threads, progress, settle_s=(0.1 if quick else SETTLE_S) if settle_s is None else settle_s)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    _add_ratios(results)
    return info, results


def _measure_all(plan, scale_plan, repeats: int, threads: int, progress: bool, settle_s: float) -> List[Result]:
    bar = Progress(len(plan) + len(scale_plan), progress)
    results: List[Result] = []
    for group, kernel, impl, fn, work, size in plan:
        bar.step(f"{kernel} | {impl} | {size}")
        med, lo, hi = measure(fn, repeats, settle_s=settle_s)
        unit = "Gelem/s" if group == "elementwise" else "GFLOP/s"
        results.append(Result(group, kernel, impl, size, threads, med, lo, hi, repeats, work / med / 1e9, unit))
    for kernel, size, t, fn, work in scale_plan:
        bar.step(f"scaling: {kernel} | {t} threads")
        fd.set_num_threads(t)
        med, lo, hi = measure(fn, repeats, settle_s=settle_s)
        unit = "Gelem/s" if "dense" not in kernel else "GFLOP/s"
        results.append(Result("threads", kernel, "fastdropout", size, t, med, lo, hi, repeats, work / med / 1e9, unit))
    fd.set_num_threads(threads)
    bar.close()
    return results


def _add_ratios(results: List[Result]) -> None:
    """For each fastdropout row: peer time / our time for the peers doing the same work."""
    by_key: Dict[Tuple[str, str, str], List[Result]] = {}
    for r in results:
        if r.group != "threads":
            by_key.setdefault((r.group, r.kernel, r.size), []).append(r)
    for (group, kernel, size), rows in by_key.items():
        peers = [r for r in rows if not r.impl.startswith("fastdropout")]
        if group == "elementwise":
            peers += by_key.get((group, "memory limit", size), [])
        if group == "dense" and kernel == "forward+backward":
            peers += [r for r in by_key.get((group, "forward", size), []) if r.impl == "numpy x @ W.T + b"]
        for r in rows:
            if r.impl.startswith("fastdropout"):
                r.ratios = {p.impl: p.median_s / r.median_s for p in peers}
    for r in results:  # thread scaling: speed-up over one thread
        if r.group == "threads":
            one = next(q for q in results if q.group == "threads" and q.kernel == r.kernel and q.threads == 1)
            r.ratios = {"1 thread": one.median_s / r.median_s}


# --------------------------------------------------------------------------- report


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:9.3f} ms" if s >= 1e-4 else f"{s * 1e6:9.1f} us"


def format_report(info: Dict[str, object], results: List[Result]) -> str:
    out = []
    out.append("fastdropout benchmark")
    out.append(f"  cpu      : {info['cpu']} ({info['cores']} cores; {info['isa']})")
    out.append(f"  backend  : {info['backend']} (available: {', '.join(info['available_backends'])}); threads: {info['threads']}")
    vers = ", ".join(f"{k} {info[k]}" for k in ("fastdropout", "numpy", "torch", "jax") if info.get(k))
    out.append(f"  versions : python {info['python']}, {vers}")
    if info.get("numpy_blas"):
        out.append(f"  numpy blas: {info['numpy_blas']}")
    out.append(f"  date     : {info['date']}; median of {results[0].repeats if results else 0} repeats each")
    out.append("  ratios   : peer time / fastdropout time (>1 means fastdropout is faster)")
    for group, title in (("elementwise", "Elementwise, float32, p=0.5"), ("dense", "Dropout -> dense, float32, p=0.5 (size = batch x in x out)")):
        rows = [r for r in results if r.group == group]
        if not rows:
            continue
        out.append("")
        out.append(title)
        out.append(f"  {'size':>15} {'kernel':<18} {'implementation':<38} {'median':>12} {'rate':>16}  ratios")
        for r in rows:
            ratios = "  ".join(f"{v:.2f}x vs {k}" for k, v in r.ratios.items())
            out.append(f"  {r.size:>15} {r.kernel:<18} {r.impl:<38} {_fmt_time(r.median_s)} {r.rate:9.2f} {r.unit:<7}  {ratios}")
    rows = [r for r in results if r.group == "threads"]
    if rows:
        out.append("")
        out.append("Thread scaling (fastdropout)")
        out.append(f"  {'kernel':<24} {'size':>15} {'threads':>7} {'median':>12} {'rate':>16}  speed-up")
        for r in rows:
            out.append(f"  {r.kernel:<24} {r.size:>15} {r.threads:>7} {_fmt_time(r.median_s)} {r.rate:9.2f} {r.unit:<7}  {r.ratios.get('1 thread', 1.0):.2f}x")
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
    ap = argparse.ArgumentParser(prog="python -m fastdropout bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16M elements and the two smaller layers, 3 repeats (under 30 s)")
    ap.add_argument("--json", metavar="PATH", help="save every figure as JSON")
    ap.add_argument("--plot", metavar="PATH", help="draw throughput against size to a PNG (needs matplotlib)")
    ap.add_argument("--threads", type=int, help="threads for fastdropout and the peers (default: all cores)")
    ap.add_argument("--backend", choices=fd._core.compiled_backends(), help="force a SIMD backend")
    ap.add_argument("--repeats", type=int, help="timed repeats per figure (default 7, 3 with --quick)")
    ap.add_argument("--no-scaling", action="store_true", help="skip the thread-scaling table")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.plot and not _have("matplotlib"):
        ap.error("--plot needs matplotlib: pip install 'fastdropout[bench]'")
    kwargs = {}
    if args.tiny:
        kwargs = dict(element_sizes={"tiny": 4096}, dense_shapes=[(8, 16, 24)], repeats=1, settle_s=0.0)
    info, results = run(
        quick=args.quick, threads=args.threads, backend=args.backend, repeats=args.repeats or kwargs.pop("repeats", None),
        scaling=not args.no_scaling, **kwargs,
    )
    print(format_report(info, results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(to_json(info, results), fh, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0
