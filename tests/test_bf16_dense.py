"""The dense engine on bfloat16 operands (NumPy through ml_dtypes, and torch): operands widened to
float32 as they are packed, float32 sums, one rounding of the result.

Bound: against the float64 computation on the bfloat16 operands with the same mask (the dropped-out
x is ``reference.dropout`` of the bfloat16 x: ``x * s`` rounded once to bfloat16),
``|y - y64| <= 2**-8 |y64| + 4 K 2**-24 M`` elementwise, with ``M = |xd| @ |w|.T + |b|`` (K the
depth): one bfloat16 rounding (2**-9 relative), which a float32 sum error can push one bfloat16 ulp
further, plus that error.  Also: with p = 0, or p = 0.5 (an exact scale), the bfloat16 path equals
the float32 path on the widened operands bit for bit before its final rounding; bit-identical for
any thread count.
"""
from __future__ import annotations

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

import fastdropout as fd  # noqa: E402
from fastdropout import reference as ref  # noqa: E402

BF16 = ml_dtypes.bfloat16


def operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(BF16)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(BF16)
    b = rng.standard_normal(n).astype(np.float32)
    return x, w, b


def within(y, y64, mag, k):
    bound = 2.0**-8 * np.abs(y64) + 4 * k * 2.0**-24 * mag
    assert np.all(np.abs(y.astype(np.float64) - y64) <= bound)


@pytest.mark.parametrize("shape", [(1, 3, 5), (64, 300, 70), (257, 1030, 129)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_bf16_forward_and_backward(backend, threads, gemm_path, shape, p, activation):
    m, k, n = shape
    x, w, b = operands(m, k, n)
    y, z = fd.dropout_dense(x, w, b, p, seed=4, offset=1, activation=activation, return_preactivation=True)
    assert y.dtype == BF16 and z.dtype == np.float32
    xd = ref.dropout(x, p, seed=4, offset=1).astype(np.float64)
    w64 = w.astype(np.float64)
    z64 = xd @ w64.T + b
    mag = np.abs(xd) @ np.abs(w64).T + np.abs(b)
    within(z, z64, mag, k)
    within(y, np.maximum(z64, 0) if activation else z64, mag, k)
    dy = np.random.default_rng(2).standard_normal((m, n)).astype(BF16)
    gx, gw, gb = fd.dropout_dense_backward(dy, x, w, p, seed=4, offset=1, activation=activation, preactivation=z)
    assert gx.dtype == gw.dtype == gb.dtype == BF16
    dz = dy.astype(np.float64) * ((z > 0) if activation else 1.0)
    keep = ref.dropout_mask(x.shape, p, seed=4, offset=1)
    s = float(ref.dropout_scale(p, np.float32))
    within(gx, np.where(keep, (dz @ w64) * s, 0.0), np.where(keep, (np.abs(dz) @ np.abs(w64)) * s, 0.0), n)
    within(gw, dz.T @ xd, np.abs(dz).T @ np.abs(xd), m)
    within(gb, dz.sum(0), np.abs(dz).sum(0), m)


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("n", [40, 100])  # 100 columns: the sparse path at p = 0.5 on avx2 too
def test_bf16_path_is_the_float32_path_on_widened_operands(backend, gemm_path, p, n):
    x, w, b = operands(96, 520, n, seed=1)
    y = fd.dropout_dense(x, w, b, p, seed=7)
    y32 = fd.dropout_dense(x.astype(np.float32), w.astype(np.float32), b, p, seed=7)
    assert np.array_equal(y.view(np.uint16), y32.astype(BF16).view(np.uint16))


def test_bf16_threads_and_dropconnect(backend):
    x, w, b = operands(300, 257, 65, seed=3)
    results = []
    for t in (1, 2, 3):
        fd._core.set_num_threads(t)
        try:
            results.append((fd.dropout_dense(x, w, b, 0.4, seed=2),
                            fd.dropconnect_dense(x, w, b, 0.4, seed=2))
                           + fd.dropout_dense_backward(np.ones((300, 65), BF16), x, w, 0.4, seed=2))
        finally:
            fd._core.set_num_threads(2)
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert np.array_equal(a.view(np.uint16), e.view(np.uint16))
    wd = ref.dropout(w, 0.4, seed=2).astype(np.float64)
    within(results[0][1], x.astype(np.float64) @ wd.T + b, np.abs(x.astype(np.float64)) @ np.abs(wd).T + np.abs(b), 257)


def test_bf16_errors():
    x, w, b = operands(4, 8, 3)
    with pytest.raises(TypeError, match="one dtype"):
        fd.dropout_dense(x, w.astype(np.float32), b, 0.5, seed=1)
    with pytest.raises(TypeError):
        fd.dropout_dense(x.astype(np.float16), w.astype(np.float16), b, 0.5, seed=1)
