"""fd.dropout_dense, fd.dropout_dense_backward and fd.dense (SPEC section 4) against the NumPy
reference, on every backend.

What is checked:

* forward (``y`` and ``z``) and all three gradients against ``fastdropout.reference`` (float64)
  within the error of a float32 GEMM, over shapes that put 1, 3, 17, 64, 255, 1000, 1023 and
  1025 in each of (batch, in_features, out_features), leading batch dimensions, bias or none,
  each activation, p in {0, 0.1, 0.5, 0.9, 1} and non-contiguous inputs;
* the mask is the one of ``fd.dropout`` bit for bit: the fused layer equals
  ``dense(dropout(x))`` exactly, identity weights expose the mask of the forward, of
  ``grad_weight`` and of ``grad_x`` exactly (also at offsets that wrap 2**64), and ``grad_x`` is
  +0.0 exactly where ``x`` was dropped;
* bit-identical results for 1, 2 and 3 threads at shapes that are split by columns and by rows;
* errors and edge cases (empty batch, no inputs, no outputs, 1-D ``x``).

The finite-difference check of the reference's gradients lives in test_reference.py
(``test_backward_matches_finite_differences``, one per activation); here the kernels are
checked against that reference.

Tolerance: float32 GEMM results are compared as ``max|a - b| / max|b| <= rtol(K)`` with
``rtol(K) = max(4 * K * 2**-24, 2**-20)`` where K is the inner dimension of the product that
made the result (in_features for y and z, out_features for grad_x, the batch size for
grad_weight and grad_bias). The floor covers the float32 activation (GELU's erf/exp
approximations are good to ~3e-7 absolute) for tiny K.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings

import numpy as np
import pytest
from helpers import EDGE_OFFSETS, EDGE_SEEDS, assert_bits_equal

import fastdropout as fd
from fastdropout import reference as ref

ACTIVATIONS = [None, "relu", "gelu"]
DENSE_P = [0.0, 0.1, 0.5, 0.9, 1.0]

GEMM_C = 4
GEMM_FLOOR = 2.0**-20


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def gemm_rtol(k_inner: int) -> float:
    """Relative error a float32 GEMM with inner dimension k_inner may have against float64."""
    return max(GEMM_C * k_inner * 2.0**-24, GEMM_FLOOR)


def assert_gemm_close(actual, expected, k_inner, what="", scale=None):
    """``max|actual - expected| / scale <= gemm_rtol(k_inner)``, ``scale`` = max|expected| by
    default; when the scale is 0 the result must be exactly 0."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.float32, (what, actual.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err = float(np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0))
    if scale is None:
        scale = float(np.max(np.abs(expected), initial=0.0))
    if scale == 0.0:
        assert err == 0.0, f"{what}: expected exact zeros, max|a-b| = {err}"
        return
    rel = err / scale
    tol = gemm_rtol(k_inner)
    assert rel <= tol, f"{what}: max|a-b|/max|b| = {rel:.3g} > {tol:.3g} (K = {k_inner})"


def _problem(lead, k, n, seed=0):
    """float32 x (lead + (k,)), weight (n, k) scaled like a Linear init, bias (n,), grad (lead + (n,))."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, k), dtype=np.float32)
    weight = rng.standard_normal((n, k), dtype=np.float32) * np.float32(1.0 / math.sqrt(max(k, 1)))
    bias = rng.standard_normal(n, dtype=np.float32)
    grad = rng.standard_normal((*lead, n), dtype=np.float32)
    return x, weight, bias, grad


@contextlib.contextmanager
def num_threads(n):
    previous = fd.get_num_threads()
    fd.set_num_threads(n)
    try:
        yield
    finally:
        fd.set_num_threads(previous)


def _all_outputs(x, weight, bias, grad, p, seed, offset, activation):
    """(y, z, grad_x, grad_weight, grad_bias) from the kernels."""
    y, z = fd.dropout_dense(
        x, weight, bias, p, seed=seed, offset=offset, activation=activation,
        return_preactivation=True,
    )
    gx, gw, gb = fd.dropout_dense_backward(
        grad, x, weight, p, seed=seed, offset=offset, activation=activation,
        preactivation=z, bias=bias is not None,
    )
    return y, z, gx, gw, gb


def check_against_reference(x, weight, bias, grad, p, seed, offset, activation):
    """Run forward and backward on the kernels and compare everything with the reference."""
    originals = (x, weight, grad, bias)
    inputs = [None if a is None else a.copy() for a in originals]
    lead, k, n = x.shape[:-1], x.shape[-1], weight.shape[0]
    m = math.prod(lead)

    y, z, gx, gw, gb = _all_outputs(x, weight, bias, grad, p, seed, offset, activation)
    # The oracle gets native float32 views/copies (it does not take byte-swapped arrays).
    x, weight, grad = (np.asarray(a, dtype=np.float32) for a in (x, weight, grad))
    bias = None if bias is None else np.asarray(bias, dtype=np.float32)
    for name, a, shape in [("y", y, lead + (n,)), ("z", z, lead + (n,)), ("grad_x", gx, x.shape),
                           ("grad_weight", gw, weight.shape)]:
        assert a.dtype == np.float32 and a.shape == shape, (name, a.dtype, a.shape, shape)
        assert a.flags.c_contiguous, name

    ry, rz = ref.dropout_dense(
        x, weight, bias, p, seed=seed, offset=offset, activation=activation,
        return_preactivation=True,
    )
    assert_gemm_close(z, rz, k, "z")
    # The activation is (1.13-)Lipschitz, so y's error is z's error: measured against z's scale
    # (relu can make max|y| much smaller than the values whose rounding it inherits).
    z_scale = max(float(np.max(np.abs(rz), initial=0.0)), float(np.max(np.abs(ry), initial=0.0)))
    assert_gemm_close(y, ry, k, "y", scale=z_scale)
    if activation is None:
        assert_bits_equal(y, z)
    assert_bits_equal(
        fd.dropout_dense(x, weight, bias, p, seed=seed, offset=offset, activation=activation), y
    )

    # The reference gets the kernel's z, so act'(z) is evaluated at the same points.
    rgx, rgw, rgb = ref.dropout_dense_backward(
        grad, x, weight, p, seed=seed, offset=offset, activation=activation, preactivation=z,
        bias=bias is not None,
    )
    assert_gemm_close(gx, rgx, n, "grad_x")
    assert_gemm_close(gw, rgw, m, "grad_weight")
    if bias is None:
        assert gb is None
    else:
        assert gb.dtype == np.float32 and gb.shape == (n,)
        assert_gemm_close(gb, rgb, m, "grad_bias")

    # grad_x is +0.0 exactly where x was dropped (the mask of fd.dropout, bit for bit).
    keep = fd.dropout_mask(x.shape, p, seed=seed, offset=offset)
    np.testing.assert_array_equal(keep, ref.dropout_mask(x.shape, p, seed=seed, offset=offset))
    assert not gx.view(np.uint32)[~keep].any(), "grad_x is not +0.0 where x was dropped"

    # The inputs are untouched.
    for before, after in zip(inputs, originals):
        if before is not None:
            assert_bits_equal(after, before)
    return y, z, gx, gw, gb


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------

# (leading dims of x, in_features, out_features). Each of 1, 3, 17, 64, 255, 1000, 1023 and 1025
# appears as the batch size M = prod(lead), as in_features and as out_features; the large ones
# with small partners. 1025 crosses every backend's row block (kMC <= 1024), in_features >= 1000
# crosses the depth block (kKC = 256) and out_features >= 1000 the column block (kNC = 512).
SHAPES = [
    ((1,), 1, 1),
    ((3,), 3, 3),
    ((17,), 17, 17),
    ((4, 16), 64, 64),
    ((255,), 255, 255),
    ((10, 100), 17, 3),
    ((3, 11, 31), 3, 64),
    ((1025,), 64, 1),
    ((3,), 1000, 17),
    ((64,), 1023, 3),
    ((), 1025, 64),
    ((17,), 3, 1000),
    ((1,), 64, 1023),
    ((3,), 1, 1025),
    ((255,), 1025, 17),
    ((5, 205), 255, 64),
    ((64,), 255, 1025),
]


def _shape_cases():
    cases = []
    for i, (lead, k, n) in enumerate(SHAPES):
        for j, activation in enumerate(ACTIVATIONS):
            p = DENSE_P[(i + j) % len(DENSE_P)]
            with_bias = (i + j) % 2 == 0
            seed = EDGE_SEEDS[(i + j) % len(EDGE_SEEDS)]
            offset = EDGE_OFFSETS[(3 * i + j) % len(EDGE_OFFSETS)]
            case_id = f"{lead}x{k}->{n}-{activation}-p{p}-{'bias' if with_bias else 'nobias'}"
            cases.append(pytest.param(lead, k, n, activation, p, with_bias, seed, offset, id=case_id))
    return cases


@pytest.mark.parametrize("lead,k,n,activation,p,with_bias,seed,offset", _shape_cases())
def test_matches_reference_shapes(backend, lead, k, n, activation, p, with_bias, seed, offset):
    x, weight, bias, grad = _problem(lead, k, n, seed=k + n)
    check_against_reference(
        x, weight, bias if with_bias else None, grad, p, seed, offset, activation
    )


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", DENSE_P)
def test_matches_reference_options(backend, p, activation, with_bias):
    # Every (p, activation, bias) combination, leading dimensions, a wrapping offset.
    x, weight, bias, grad = _problem((2, 3), 17, 19, seed=3)
    check_against_reference(
        x, weight, bias if with_bias else None, grad, p, 2**64 - 1, 2**64 - 50, activation
    )


def _x_views(lead, k, rng):
    """x of shape (6, k) (or lead + (k,)) as several non-contiguous views."""
    m = 6
    base = rng.standard_normal((2 * m + 1, 3 * k + 2), dtype=np.float32)
    t = rng.standard_normal((k, m), dtype=np.float32)
    return {
        "contiguous": np.ascontiguousarray(base[:m, :k]),
        "transposed": t.T,
        "strided": base[1::2, ::3][:m, :k],
        "reversed": base[::-1, ::-1][:m, :k],
        "fortran": np.asfortranarray(base[:m, :k]),
        "big-endian": base[:m, :k].astype(">f4"),
        "broadcast": np.broadcast_to(base[0, :k], (m, k)),
    }


def _weight_views(n, k, rng):
    base = rng.standard_normal((2 * n + 1, 2 * k + 1), dtype=np.float32) * np.float32(0.2)
    return {
        "contiguous": np.ascontiguousarray(base[:n, :k]),
        "transposed": np.ascontiguousarray(base[:k, :n]).T,
        "strided": base[::2, ::2][:n, :k],
        "reversed": base[::-1][:n, :k],
        "fortran": np.asfortranarray(base[:n, :k]),
        "big-endian": base[:n, :k].astype(">f4"),
        "broadcast": np.broadcast_to(base[:n, :1], (n, k)),
    }


@pytest.mark.parametrize("weight_view", list(_weight_views(2, 2, np.random.default_rng(0))))
@pytest.mark.parametrize("x_view", list(_x_views((), 2, np.random.default_rng(0))))
def test_non_contiguous_inputs(backend, x_view, weight_view):
    k, n = 37, 21
    rng = np.random.default_rng(7)
    x = _x_views((), k, rng)[x_view]
    weight = _weight_views(n, k, rng)[weight_view]
    bias_base = rng.standard_normal(2 * n, dtype=np.float32)
    bias = bias_base[::-2]  # negative stride
    grad_base = rng.standard_normal((n, x.shape[0]), dtype=np.float32)
    grad = grad_base.T  # non-contiguous grad_out
    p, seed, offset, activation = 0.4, 99, 2**64 - 7, "gelu"

    got = check_against_reference(x, weight, bias, grad, p, seed, offset, activation)
    # The same numbers as on contiguous copies, bit for bit (the mask follows the logical index).
    xc, wc, bc, gc = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, weight, bias, grad))
    want = _all_outputs(xc, wc, bc, gc, p, seed, offset, activation)
    for a, b in zip(got, want):
        assert_bits_equal(a, b)
    # A non-contiguous preactivation is accepted too.
    z_strided = np.repeat(got[1], 2, axis=1)[:, ::2]
    assert not z_strided.flags.c_contiguous
    again = fd.dropout_dense_backward(
        grad, x, weight, p, seed=seed, offset=offset, activation=activation,
        preactivation=z_strided,
    )
    for a, b in zip(again, want[2:]):
        assert_bits_equal(a, b)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,k,n", [((5,), 7, 9), ((2, 3), 300, 33), ((), 17, 1), ((70,), 1, 600)])
def test_dense_matches_reference(backend, lead, k, n, activation):
    x, weight, bias, _ = _problem(lead, k, n, seed=11)
    for b in (bias, None):
        y = fd.dense(x, weight, b, activation=activation)
        assert y.dtype == np.float32 and y.shape == lead + (n,) and y.flags.c_contiguous
        want = ref.dense(x, weight, b, activation=activation)
        z_scale = float(np.max(np.abs(ref.dense(x, weight, b)), initial=0.0))
        assert_gemm_close(y, want, k, "dense", scale=z_scale)


# ---------------------------------------------------------------------------------------------
# The mask is dropout's mask, bit for bit
# ---------------------------------------------------------------------------------------------

FUSED_SHAPES = [((1,), 1, 1), ((3, 5), 17, 64), ((37,), 300, 45), ((130,), 64, 600), ((2, 3), 1025, 3)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead,k,n", FUSED_SHAPES)
def test_fused_equals_dense_of_dropout(backend, lead, k, n, activation):
    # The fused kernel applies mask * scale while packing x; dense(dropout(x)) packs the same
    # float32 products and runs the same GEMM: the results are identical.
    x, weight, bias, _ = _problem(lead, k, n, seed=k)
    streams = [(0, 0), (5, 3), (2**64 - 1, 2**64 - 3), (2**32, 2**32 - 1)]
    for i, p in enumerate(DENSE_P + [1e-9, 0.3]):
        seed, offset = streams[i % len(streams)]
        b = bias if i % 2 == 0 else None
        y, z = fd.dropout_dense(
            x, weight, b, p, seed=seed, offset=offset, activation=activation,
            return_preactivation=True,
        )
        dropped = fd.dropout(x, p, seed=seed, offset=offset)
        assert_bits_equal(y, fd.dense(dropped, weight, b, activation=activation))
        assert_bits_equal(z, fd.dense(dropped, weight, b))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_no_dropout_is_plain_dense(backend, activation):
    x, weight, bias, grad = _problem((4, 33), 70, 90, seed=2)
    want = fd.dense(x, weight, bias, activation=activation)
    for p in DENSE_P:
        off = fd.dropout_dense(x, weight, bias, p, seed=9, offset=1, activation=activation,
                               training=False)
        assert_bits_equal(off, want)
    assert_bits_equal(
        fd.dropout_dense(x, weight, bias, 0.0, seed=9, offset=1, activation=activation), want
    )
    # Backward: training=False (any p) is the backward of p = 0.
    z = fd.dense(x, weight, bias)
    want_grads = fd.dropout_dense_backward(
        grad, x, weight, 0.0, seed=9, activation=activation, preactivation=z
    )
    for p in (0.0, 0.5, 1.0):
        got = fd.dropout_dense_backward(
            grad, x, weight, p, seed=9, offset=1, activation=activation, preactivation=z,
            training=False,
        )
        for a, b in zip(got, want_grads):
            assert_bits_equal(a, b)
    rgx, rgw, rgb = ref.dropout_dense_backward(
        grad, x, weight, 0.0, seed=9, activation=activation, preactivation=z
    )
    assert_gemm_close(want_grads[0], rgx, 90, "grad_x")
    assert_gemm_close(want_grads[1], rgw, 4 * 33, "grad_weight")
    assert_gemm_close(want_grads[2], rgb, 4 * 33, "grad_bias")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_everything_dropped(backend, activation):
    # p = 1: z is the bias exactly, y = act(bias) in every row, all gradients but grad_bias are 0.
    x, weight, bias, grad = _problem((3, 7), 40, 50, seed=4)
    x[0, 0, :5] = [np.nan, np.inf, -np.inf, 1e38, -1e38]  # dropped: must not leak into y
    y, z = fd.dropout_dense(x, weight, bias, 1.0, seed=1, activation=activation,
                            return_preactivation=True)
    assert_bits_equal(z, np.broadcast_to(bias, z.shape).copy())
    act_bias = fd.dense(np.zeros((1, 1), np.float32), np.zeros((50, 1), np.float32), bias,
                        activation=activation)[0]
    assert_bits_equal(y, np.broadcast_to(act_bias, y.shape).copy())
    if activation is None:
        assert_bits_equal(act_bias, bias)
    elif activation == "relu":
        assert_bits_equal(act_bias, np.maximum(bias, np.float32(0)))
    else:
        assert_gemm_close(act_bias, ref.dense(bias[None, :], np.eye(50), activation="gelu")[0], 1)
    y0 = fd.dropout_dense(x, weight, None, 1.0, seed=1, activation=activation)
    assert np.all(y0 == 0)

    gx, gw, gb = fd.dropout_dense_backward(grad, x, weight, 1.0, seed=1, activation=activation,
                                           preactivation=z)
    assert not gx.view(np.uint32).any()  # +0.0 everywhere
    assert np.all(gw == 0)
    _, _, rgb = ref.dropout_dense_backward(grad, x, weight, 1.0, seed=1, activation=activation,
                                           preactivation=z)
    assert_gemm_close(gb, rgb, 21, "grad_bias")


@pytest.mark.parametrize("seed,offset", [(s, o) for s, o in zip(EDGE_SEEDS * 3, EDGE_OFFSETS)])
def test_identity_weights_expose_the_mask(backend, seed, offset):
    # With weight = I (and dy = I for grad_weight) every output element is one product x * s * 1
    # plus exact zeros: the GEMM is exact, so the kernels must reproduce the reference dropout
    # bit for bit, including offsets that are not multiples of 4 and that wrap 2**64.
    m, k = 37, 300  # k > 256: the depth is split into two blocks
    rng = np.random.default_rng(seed % 1000 + offset % 1000)
    x = rng.standard_normal((m, k), dtype=np.float32)
    eye_k = np.eye(k, dtype=np.float32)
    for p in (0.1, 0.5, 0.9):
        want = ref.dropout(x, p, seed=seed, offset=offset)
        y = fd.dropout_dense(x, eye_k, None, p, seed=seed, offset=offset)
        np.testing.assert_array_equal(y, want)

        # grad_weight = dy.T @ dropout(x): with batch = out_features and dy = I it is dropout(x).
        w_sq = rng.standard_normal((m, k), dtype=np.float32)
        _, gw, _ = fd.dropout_dense_backward(
            np.eye(m, dtype=np.float32), x, w_sq, p, seed=seed, offset=offset
        )
        np.testing.assert_array_equal(gw, want)

        # grad_x = dropout_backward(dy @ I) = dropout_backward(dy).
        dy = rng.standard_normal((m, k), dtype=np.float32)
        gx, _, _ = fd.dropout_dense_backward(dy, x, eye_k, p, seed=seed, offset=offset)
        np.testing.assert_array_equal(gx, ref.dropout_backward(dy, p, seed=seed, offset=offset))


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_grad_x_zero_exactly_where_dropped(backend, activation):
    x, weight, bias, grad = _problem((5, 41), 33, 29, seed=12)
    for p in (0.1, 0.5, 0.9):
        for seed, offset in [(3, 2**64 - 2), (2**64 - 1, 5)]:
            y, z = fd.dropout_dense(x, weight, bias, p, seed=seed, offset=offset,
                                    activation=activation, return_preactivation=True)
            gx, gw, _ = fd.dropout_dense_backward(grad, x, weight, p, seed=seed, offset=offset,
                                                  activation=activation, preactivation=z)
            keep = fd.dropout_mask(x.shape, p, seed=seed, offset=offset)
            # dz @ W is never exactly 0 here, so the zeros of grad_x are exactly the mask's.
            np.testing.assert_array_equal(gx != 0, keep)
            assert not gx.view(np.uint32)[~keep].any()
            # grad_weight = dz.T @ dropout(x), with the reference's dz and dropout of x.
            dz = _act_grad_ref(grad, z, activation)
            dropped = ref.dropout(x, p, seed=seed, offset=offset).astype(np.float64)
            assert_gemm_close(gw, dz.T @ dropped.reshape(-1, 33), 5 * 41, "grad_weight")


def _act_grad_ref(grad, z, activation):
    """dz = dy * act'(z) (2-D, float64) from the reference: its grad_x for weight = I, p = 0."""
    n = z.shape[-1]
    z2 = z.reshape(-1, n)
    dy2 = grad.reshape(-1, n)
    if activation is None:
        return dy2.astype(np.float64)
    gx, _, _ = ref.dropout_dense_backward(
        dy2, z2, np.eye(n), 0.0, seed=0, activation=activation, preactivation=z2, bias=False
    )
    return gx


def test_dropped_non_finite_inputs_do_not_leak(backend):
    # A NaN or inf in x that is dropped is a selected +0.0, not a product (SPEC section 3).
    x, weight, bias, grad = _problem((40,), 50, 30, seed=5)
    p, seed, offset = 0.5, 17, 2**64 - 9
    keep = fd.dropout_mask(x.shape, p, seed=seed, offset=offset)
    dropped_positions = np.flatnonzero(~keep)
    poisoned = x.copy()
    specials = np.array([np.nan, np.inf, -np.inf, np.float32(3e38)], np.float32)
    poisoned.ravel()[dropped_positions] = specials[np.arange(dropped_positions.size) % 4]
    for activation in ACTIVATIONS:
        clean = _all_outputs(x, weight, bias, grad, p, seed, offset, activation)
        dirty = _all_outputs(poisoned, weight, bias, grad, p, seed, offset, activation)
        for a, b in zip(dirty, clean):
            assert_bits_equal(a, b)
    # grad_x's mask is a select too: a NaN column of weight only reaches kept elements.
    w_nan = weight.copy()
    w_nan[:, 3] = np.nan
    gx, _, _ = fd.dropout_dense_backward(grad, x, w_nan, p, seed=seed, offset=offset)
    assert np.isnan(gx[keep[:, 3], 3]).all()
    assert not gx[~keep[:, 3], 3].view(np.uint32).any()


def test_gelu_at_extreme_preactivations(backend):
    # act'(z) for GELU lies in [-0.17, 1.13]: 1 for huge positive z, 0 for huge negative z.
    # With weight = I and p = 0, grad_x = grad_bias = dy * gelu'(z) exactly what the kernel uses.
    z = np.array([[1e20, 1e30, 1e35, 1e36, 1e38, 3e38, -1e36, -1e38, -3e38, 14, -14, 5, -5, 0.5]],
                 np.float32)
    n = z.shape[1]
    dy = np.ones_like(z)
    eye = np.eye(n, dtype=np.float32)
    gx, _, gb = fd.dropout_dense_backward(dy, z, eye, 0.0, seed=0, activation="gelu",
                                          preactivation=z)
    rgx, _, rgb = ref.dropout_dense_backward(dy, z, eye, 0.0, seed=0, activation="gelu",
                                             preactivation=z)
    # The forward is right (y = z for huge positive z, 0 for huge negative z) ...
    y = fd.dense(z, eye, activation="gelu")
    assert_gemm_close(y, ref.dense(z, eye, activation="gelu"), 1, "gelu(z)")
    # ... the derivative must be too (the kernel's exp_approx clamps its argument at -87, so
    # the pdf term z * phi(z) does not vanish: ~2.97 at z = 3e38, -0.66 at z = -1e38).
    assert_gemm_close(gb, rgb, 1, "gelu'(z) via grad_bias")
    assert_gemm_close(gx, rgx, 1, "gelu'(z) via grad_x")


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------

# (batch, in, out): columns split (out large), rows split (out small), and backward GEMMs that
# split rows as well (in_features small: grad_x has few columns).
THREAD_SHAPES = [(256, 300, 700), (700, 300, 64), (700, 40, 64)]


@pytest.mark.parametrize("m,k,n", THREAD_SHAPES)
def test_bit_identical_for_any_thread_count(backend, gemm_path, m, k, n):
    x, weight, bias, grad = _problem((m,), k, n, seed=21)
    results = {}
    for t in (1, 2, 3):
        with num_threads(t):
            assert fd.get_num_threads() == t
            results[t] = [
                _all_outputs(x, weight, bias, grad, 0.3, 2**64 - 1, 2**64 - 1001, act)
                for act in ACTIVATIONS
            ]
    for t in (2, 3):
        for per_act_1, per_act_t in zip(results[1], results[t]):
            for a, b in zip(per_act_t, per_act_1):
                assert_bits_equal(a, b)
    # and they are right
    y, z, gx, gw, gb = results[1][2]
    ry = ref.dropout_dense(x, weight, bias, 0.3, seed=2**64 - 1, offset=2**64 - 1001,
                           activation="gelu")
    assert_gemm_close(y, ry, k, "y", scale=float(np.abs(z).max()))


def test_threads_fixture_matches_single_thread(backend, gemm_path, threads):
    x, weight, bias, grad = _problem((3, 50), 200, 300, seed=22)
    got = _all_outputs(x, weight, bias, grad, 0.5, 8, 3, "relu")
    with num_threads(1):
        want = _all_outputs(x, weight, bias, grad, 0.5, 8, 3, "relu")
    assert fd.get_num_threads() == threads
    for a, b in zip(got, want):
        assert_bits_equal(a, b)


# Batches of one to four rows take the direct path where the backend has one (the weight's rows
# read in place, 24, 16 or 8 columns at a time, 16 depths a step; no packed B): depths around
# those steps and the 256-depth blocks, columns around the groups and the 8-column tail.
DIRECT_K = [1, 15, 16, 17, 255, 256, 257, 600]
DIRECT_N = [1, 7, 8, 23, 24, 25, 41, 300]


@pytest.mark.parametrize("k", DIRECT_K)
def test_one_to_four_rows_equal_those_rows_of_a_larger_batch(backend, threads, k):
    # a row's outputs never depend on the other rows of its batch: the same bits whether it
    # goes alone, with one to three others or in a batch of 7 (the packed path), and right;
    # so do its rows of grad_x (dz @ weight: the weight read along its rows, n deep)
    for n in DIRECT_N:
        x, weight, bias, grad = _problem((7,), k, n, seed=k * 1000 + n)
        for act in ACTIVATIONS:
            for p in (0.0, 0.5):
                def run(rows):
                    if p == 0.0:
                        return fd.dense(x[rows], weight, bias, activation=act)
                    return fd.dropout_dense(x[rows], weight, bias, p, seed=9, offset=rows.start * k, activation=act)

                def grad_x(rows):
                    return fd.dropout_dense_backward(grad[rows], x[rows], weight, p, seed=9, offset=rows.start * k,
                                                     activation=act, preactivation=None if act is None else z[rows],
                                                     output_mask=(True, False, False))[0]
                full = run(slice(0, 7))
                z = fd.dropout_dense(x, weight, bias, p, seed=9, activation=act, return_preactivation=True)[1]
                gx = grad_x(slice(0, 7))
                for rows in (slice(0, 1), slice(3, 4), slice(0, 2), slice(5, 7), slice(1, 4), slice(3, 7)):
                    assert_bits_equal(run(rows), full[rows])
                    assert_bits_equal(grad_x(rows), gx[rows])
                want = ref.dropout_dense(x, weight, bias, p, seed=9, activation=act) if p else ref.dense(
                    x, weight, bias, activation=act)
                assert_gemm_close(full, want, k, f"k={k} n={n} {act} p={p}")
                want_gx = ref.dropout_dense_backward(grad, x, weight, p, seed=9, activation=act,
                                                     preactivation=None if act is None else z)[0]
                assert_gemm_close(gx, want_gx, n, f"grad_x k={k} n={n} {act} p={p}")


# Outputs narrower than the micro-kernel's tile (a classifier's 10, a regression's 1) are
# computed as the transposed product, C^T = W x^T, into a buffer, then C's rows and their
# epilogue (ops.cpp, narrow_output): each element is the same FMA chain in depth order, so its
# bits are those of the same column of a wider product, for any thread count.  Depths cross
# the 512-deep blocks; batches fill one to many tile rows.
NARROW_N = [1, 3, 10, 16, 17, 31]
NARROW_MK = [(5, 17), (37, 300), (300, 600), (1030, 64)]


@pytest.mark.parametrize("m,k", NARROW_MK)
def test_narrow_outputs_equal_those_columns_of_a_wider_product(backend, gemm_path, threads, m, k):
    for n in NARROW_N:
        x, weight, bias, grad = _problem((m,), k, n + 40, seed=m * 7 + k + n)
        for act in ACTIVATIONS:
            for p in (0.0, 0.5):
                y_wide, z_wide = fd.dropout_dense(x, weight, bias, p, seed=5, offset=2**64 - 3, activation=act,
                                                  return_preactivation=True)
                y, z = fd.dropout_dense(x, weight[:n], bias[:n], p, seed=5, offset=2**64 - 3, activation=act,
                                        return_preactivation=True)
                assert_bits_equal(y, y_wide[:, :n])
                assert_bits_equal(z, z_wide[:, :n])
                # DropConnect: the mask on the weight, whose first n rows keep their flat indices
                yc = fd.dropconnect_dense(x, weight[:n], None, 0.5, seed=6, activation=act)
                assert_bits_equal(yc, fd.dropconnect_dense(x, weight, None, 0.5, seed=6, activation=act)[:, :n])
            assert_gemm_close(y, ref.dropout_dense(x, weight[:n], bias[:n], 0.5, seed=5, offset=2**64 - 3,
                                                   activation=act), k, f"n={n} {act}")


@pytest.mark.parametrize("m,k", [(37, 1), (300, 3), (1030, 10), (64, 31)])
def test_narrow_grad_x_equals_those_columns_of_a_wider_product(backend, gemm_path, threads, m, k):
    # grad_x = mask * (grad @ weight) * scale has in_features columns: with few of them it is a
    # narrow product, whose output mask the epilogue applies with grad_x's own flat indices
    for n in (5, 64, 700):
        x, weight, bias, grad = _problem((m,), k, n, seed=m + k + n)
        for p in (0.0, 0.5):
            gx = fd.dropout_dense_backward(grad, x, weight, p, seed=7, offset=11, output_mask=(True, False, False))[0]
            wide = np.concatenate([weight, np.ones((n, 40), np.float32)], axis=1)
            prod = fd.dense(grad, np.ascontiguousarray(wide.T))[:, :k]  # the same chains, n deep
            keep = ref.dropout_mask(x.shape, p, seed=7, offset=11)
            assert_bits_equal(gx, np.where(keep, prod * np.float32(ref.dropout_scale(p, np.float32)),
                                           np.float32(0)))


def test_last_rows_of_a_row_split_on_the_direct_path(backend):
    # 24 threads split 3176 rows as 23 x 138 and a last range of 2 rows, which the direct path
    # serves with x packed at every depth (6000 here, more than a 138-row range's packed block
    # holds): the scratch must be sized for it, and the bits are one thread's
    x, weight, bias, _ = _problem((3176,), 6000, 24, seed=31)
    with num_threads(1):
        want = fd.dropout_dense(x, weight, bias, 0.5, seed=12, activation="relu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fd.OversubscriptionWarning)
        with num_threads(24):
            got = fd.dropout_dense(x, weight, bias, 0.5, seed=12, activation="relu")
    assert_bits_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_empty_batch(backend, lead):
    x, weight, bias, grad = _problem(lead, 5, 3)
    y, z = fd.dropout_dense(x, weight, bias, 0.5, seed=1, activation="relu",
                            return_preactivation=True)
    assert y.shape == z.shape == lead + (3,) and y.dtype == np.float32
    assert fd.dense(x, weight, bias).shape == lead + (3,)
    gx, gw, gb = fd.dropout_dense_backward(grad, x, weight, 0.5, seed=1, activation="relu",
                                           preactivation=z)
    assert gx.shape == x.shape and gx.dtype == np.float32
    assert_bits_equal(gw, np.zeros((3, 5), np.float32))
    assert_bits_equal(gb, np.zeros(3, np.float32))


@pytest.mark.parametrize("lead", [(4,), (2, 3), ()], ids=str)
def test_no_input_features(backend, lead):
    # in_features = 0: z = bias (or 0) in every row, like torch.nn.functional.linear.
    x = np.zeros(lead + (0,), np.float32)
    weight = np.zeros((3, 0), np.float32)
    bias = np.array([-1.5, 0.25, 2.0], np.float32)
    grad = np.ones(lead + (3,), np.float32)
    for activation in ACTIVATIONS:
        y, z = fd.dropout_dense(x, weight, bias, 0.5, seed=1, activation=activation,
                                return_preactivation=True)
        assert y.shape == z.shape == lead + (3,)
        assert_bits_equal(z, np.broadcast_to(bias, lead + (3,)).copy())
        ry = ref.dropout_dense(x, weight, bias, 0.5, seed=1, activation=activation)
        assert_gemm_close(y, ry, 1, "y")
        assert np.all(fd.dropout_dense(x, weight, None, 0.5, seed=1, activation=activation) == 0)
        assert fd.dense(x, weight, bias, activation=activation).shape == lead + (3,)
        gx, gw, gb = fd.dropout_dense_backward(grad, x, weight, 0.5, seed=1,
                                               activation=activation, preactivation=z)
        assert gx.shape == x.shape and gw.shape == (3, 0)
        rgb = ref.dropout_dense_backward(grad, x, weight, 0.5, seed=1, activation=activation,
                                         preactivation=z)[2]
        assert_gemm_close(gb, rgb, max(1, math.prod(lead)), "grad_bias")


def test_no_output_features(backend):
    x, weight, bias, grad = _problem((4,), 5, 0)
    y = fd.dropout_dense(x, weight, bias, 0.5, seed=1)
    assert y.shape == (4, 0) and y.dtype == np.float32
    gx, gw, gb = fd.dropout_dense_backward(grad, x, weight, 0.5, seed=1)
    assert_bits_equal(gx, np.zeros((4, 5), np.float32))
    assert gw.shape == (0, 5) and gb.shape == (0,)


def test_one_dimensional_x(backend):
    x, weight, bias, grad = _problem((1,), 23, 7, seed=6)
    y1, z1 = fd.dropout_dense(x[0], weight, bias, 0.5, seed=3, offset=1, activation="gelu",
                              return_preactivation=True)
    y2 = fd.dropout_dense(x, weight, bias, 0.5, seed=3, offset=1, activation="gelu")
    assert y1.shape == (7,)
    assert_bits_equal(y1, y2[0])
    gx, gw, gb = fd.dropout_dense_backward(grad[0], x[0], weight, 0.5, seed=3, offset=1,
                                           activation="gelu", preactivation=z1)
    want = fd.dropout_dense_backward(grad, x, weight, 0.5, seed=3, offset=1, activation="gelu",
                                     preactivation=z1[None])
    assert gx.shape == (23,)
    assert_bits_equal(gx, want[0][0])
    assert_bits_equal(gw, want[1])
    assert_bits_equal(gb, want[2])


def test_lists_of_float32_are_not_silently_widened(backend):
    # Python lists become float64 arrays: rejected like any float64 input (float32 only).
    with pytest.raises(TypeError, match="float32"):
        fd.dropout_dense([[1.0, 2.0]], np.ones((1, 2), np.float32), seed=1)


def test_offset_wraps_inside_the_batch(backend):
    # The stream wraps at 2**64 in the middle of x: still the mask of fd.dropout.
    x, weight, bias, grad = _problem((9,), 31, 12, seed=8)
    for offset in (2**64 - 140, 2**64 - 1, 2**64 - 31):
        y = fd.dropout_dense(x, weight, bias, 0.5, seed=2**64 - 1, offset=offset)
        want = fd.dense(fd.dropout(x, 0.5, seed=2**64 - 1, offset=offset), weight, bias)
        assert_bits_equal(y, want)
        check_against_reference(x, weight, bias, grad, 0.5, 2**64 - 1, offset, "relu")


# ---------------------------------------------------------------------------------------------
# Errors (SPEC section 6)
# ---------------------------------------------------------------------------------------------


def _ok():
    x = np.ones((4, 5), np.float32)
    weight = np.ones((3, 5), np.float32)
    bias = np.ones(3, np.float32)
    grad = np.ones((4, 3), np.float32)
    z = np.ones((4, 3), np.float32)
    return x, weight, bias, grad, z


def _calls(x, weight, bias, grad, z, p=0.5, seed=1, offset=0, activation="relu"):
    """Every dense entry point with these arguments."""
    yield "dropout_dense", lambda: fd.dropout_dense(
        x, weight, bias, p, seed=seed, offset=offset, activation=activation
    )
    yield "dropout_dense_eval", lambda: fd.dropout_dense(
        x, weight, bias, p, seed=seed, offset=offset, activation=activation, training=False
    )
    yield "backward", lambda: fd.dropout_dense_backward(
        grad, x, weight, p, seed=seed, offset=offset, activation=activation, preactivation=z
    )


def _raises_everywhere(exc, match=None, **changes):
    args = dict(zip(["x", "weight", "bias", "grad", "z"], _ok()))
    args.update(changes)
    for name, thunk in _calls(**args):
        with pytest.raises(exc, match=match):
            thunk()


def test_valid_arguments_work(backend):
    for _, thunk in _calls(*_ok()):
        thunk()


@pytest.mark.parametrize("weight_shape", [(3, 4), (3, 6), (5, 3), (15,), (3, 5, 1), ()])
def test_weight_shape_mismatch(weight_shape):
    x, _, bias, grad, z = _ok()
    weight = np.ones(weight_shape, np.float32)
    calls = list(_calls(x, weight, None, grad, z)) + [("dense", lambda: fd.dense(x, weight))]
    for name, thunk in calls:
        with pytest.raises(ValueError) as info:
            thunk()
        assert str(weight_shape) in str(info.value), (name, str(info.value))


def test_weight_mismatch_message_names_both_shapes():
    x, _, _, _, _ = _ok()
    with pytest.raises(ValueError) as info:
        fd.dropout_dense(x, np.ones((3, 6), np.float32), seed=1)
    assert "(4, 5)" in str(info.value) and "(3, 6)" in str(info.value), str(info.value)


@pytest.mark.parametrize("bias_shape", [(4,), (2,), (1, 3), (3, 1), (), (0,)])
def test_bias_shape_mismatch(bias_shape):
    x, weight, _, grad, z = _ok()
    bias = np.ones(bias_shape, np.float32)
    for thunk in (
        lambda: fd.dropout_dense(x, weight, bias, 0.5, seed=1),
        lambda: fd.dense(x, weight, bias),
    ):
        with pytest.raises(ValueError) as info:
            thunk()
        assert "(3,)" in str(info.value) and str(bias_shape) in str(info.value), str(info.value)


@pytest.mark.parametrize("grad_shape", [(4, 4), (3, 4), (4,), (12,), (1, 4, 3), (4, 3, 1)])
def test_grad_out_shape_mismatch(grad_shape):
    x, weight, _, _, _ = _ok()
    grad = np.ones(grad_shape, np.float32)
    for activation, z in [(None, None), ("gelu", np.ones((4, 3), np.float32))]:
        with pytest.raises(ValueError) as info:
            fd.dropout_dense_backward(grad, x, weight, 0.5, seed=1, activation=activation,
                                      preactivation=z)
        msg = str(info.value)
        assert "(4, 3)" in msg and str(grad_shape) in msg, msg


@pytest.mark.parametrize("z_shape", [(4, 4), (3, 4), (12,), (4, 3, 1)])
def test_preactivation_shape_mismatch(z_shape):
    x, weight, _, grad, _ = _ok()
    with pytest.raises(ValueError) as info:
        fd.dropout_dense_backward(grad, x, weight, 0.5, seed=1, activation="relu",
                                  preactivation=np.ones(z_shape, np.float32))
    msg = str(info.value)
    assert "(4, 3)" in msg and str(z_shape) in msg, msg


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_missing_preactivation(activation):
    x, weight, _, grad, _ = _ok()
    with pytest.raises(ValueError, match="preactivation"):
        fd.dropout_dense_backward(grad, x, weight, 0.5, seed=1, activation=activation)
    with pytest.raises(ValueError, match="preactivation"):
        fd.dropout_dense_backward(grad, x, weight, 0.5, seed=1, activation=activation,
                                  training=False)


BAD_DTYPES = [np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_, np.complex64, object]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_non_float32_inputs(which, dtype):
    args = dict(zip(["x", "weight", "bias", "grad", "z"], _ok()))
    args[which] = args[which].astype(dtype)
    calls = list(_calls(**args))
    calls.append(("dense", lambda: fd.dense(args["x"], args["weight"], args["bias"])))
    for name, thunk in calls:
        if which == "bias" and name == "backward":
            continue  # the backward takes no bias array
        with pytest.raises(TypeError) as info:
            thunk()
        assert "float32" in str(info.value), (name, str(info.value))


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("which", ["grad", "z"])
def test_non_float32_gradient_inputs(which, dtype):
    x, weight, _, grad, z = _ok()
    args = {"grad": grad, "z": z}
    args[which] = args[which].astype(dtype)
    with pytest.raises(TypeError, match="float32"):
        fd.dropout_dense_backward(args["grad"], x, weight, 0.5, seed=1, activation="gelu",
                                  preactivation=args["z"])


@pytest.mark.parametrize("value", [None, "abc", b"abc"])
def test_non_arrays(value):
    x, weight, bias, grad, z = _ok()
    for thunk in (
        lambda: fd.dropout_dense(value, weight, bias, seed=1),
        lambda: fd.dropout_dense(x, value, bias, seed=1),
        lambda: fd.dense(value, weight),
        lambda: fd.dropout_dense_backward(value, x, weight, 0.5, seed=1),
    ):
        with pytest.raises(TypeError):
            thunk()


@pytest.mark.parametrize("activation", ["tanh", "ReLU", "GELU", "", "gelu ", "none"])
def test_unknown_activation(activation):
    _raises_everywhere(ValueError, match=re.escape(repr(activation)), activation=activation)
    x, weight, _, _, _ = _ok()
    with pytest.raises(ValueError):
        fd.dense(x, weight, activation=activation)


@pytest.mark.parametrize("activation", [1, 1.5, True, b"relu", ["relu"]])
def test_activation_wrong_type(activation):
    _raises_everywhere(TypeError, activation=activation)
    x, weight, _, _, _ = _ok()
    with pytest.raises(TypeError):
        fd.dense(x, weight, activation=activation)


@pytest.mark.parametrize("p", [-0.1, 1.0 + 2**-52, 1.5, -1, math.nan, math.inf, -math.inf])
def test_p_out_of_range(p):
    _raises_everywhere(ValueError, p=p)


@pytest.mark.parametrize("p", ["0.5", None, 0.5j])
def test_p_wrong_type(p):
    _raises_everywhere(TypeError, p=p)


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("value", [-1, 2**64, 2**64 + 5, -(2**64)])
def test_seed_and_offset_out_of_range(name, value):
    _raises_everywhere(ValueError, match=str(value), **{name: value})


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("value", [1.0, "1", None])
def test_seed_and_offset_wrong_type(name, value):
    _raises_everywhere(TypeError, **{name: value})


def test_seed_is_required():
    x, weight, bias, grad, _ = _ok()
    with pytest.raises(TypeError):
        fd.dropout_dense(x, weight, bias, 0.5)  # noqa
    with pytest.raises(TypeError):
        fd.dropout_dense_backward(grad, x, weight, 0.5)  # noqa


def test_zero_dimensional_x():
    _, weight, bias, grad, z = _ok()
    x0 = np.array(1.0, np.float32)
    for thunk in (
        lambda: fd.dropout_dense(x0, weight, bias, seed=1),
        lambda: fd.dense(x0, weight, bias),
        lambda: fd.dropout_dense_backward(grad, x0, weight, 0.5, seed=1),
    ):
        with pytest.raises(ValueError, match="0-d"):
            thunk()


# --- the sparse path (avx512: p >= 0.3; avx2: the forward, p >= 0.375): dropped elements cost no multiply-add ---


@pytest.mark.parametrize("k", [1, 63, 64, 65, 300, 513, 1100])
@pytest.mark.parametrize("p", [0.3, 0.375, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("batch", [37, 300, 1100])
def test_sparse_path_gradients_equal_the_dense_path(backend, gemm_path, k, p, batch):
    # For p >= 0.3 the kernels skip dropped elements; the sums keep the dense
    # kernel's order, so grad_weight equals that of dense(dropout(x)) bit for bit
    # (from a batch of 256 and p >= 0.375, grad_weight.T is computed with dropout(x) as the
    # sparse operand).
    x, weight, _, grad = _problem((batch,), k, 70, seed=k)
    for seed, offset in [(3, 0), (2**64 - 1, 2**64 - 5)]:
        dropped = fd.dropout(x, p, seed=seed, offset=offset)
        gx, gw, gb = fd.dropout_dense_backward(grad, x, weight, p, seed=seed, offset=offset)
        gx0, gw0, gb0 = fd.dropout_dense_backward(grad, dropped, weight, 0.0, seed=seed)
        assert_bits_equal(gw, gw0)
        assert_bits_equal(gb, gb0)
        assert_bits_equal(gx, fd.dropout_backward(gx0, p, seed=seed, offset=offset))


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_sparse_path_keeps_nan_of_zero_times_inf(backend, gemm_path, p):
    # dropout(x) @ weight.T multiplies the dropped zeros too: 0 * inf and 0 * NaN are NaN,
    # as in the reference and in PyTorch.  The sparse path must not skip them.
    x, weight, bias, grad = _problem((530,), 200, 90, seed=4)
    w_bad = weight.copy()
    w_bad[5, 7] = np.inf   # a whole output column turns NaN (some x[:, 7] are dropped)
    w_bad[40, 150] = np.nan
    y = fd.dropout_dense(x, w_bad, bias, p, seed=1)
    with np.errstate(invalid="ignore"):  # NumPy's matmul warns about inf * 0
        want = ref.dropout_dense(x, w_bad, bias, p, seed=1)
    assert_bits_equal(np.isnan(y), np.isnan(want))
    # inf where x[:, 7] is kept, NaN where it is dropped: never a finite value
    assert not np.isfinite(y[:, [5, 40]]).any() and np.isfinite(np.delete(y, [5, 40], axis=1)).all()
    assert np.isnan(y[:, 5]).any()
    g_bad = grad.copy()
    g_bad[3, 11] = np.nan  # grad_weight row 11 is NaN in every column, dropped or not
    _, gw, _ = fd.dropout_dense_backward(g_bad, x, weight, p, seed=1)
    with np.errstate(invalid="ignore"):
        _, gw_ref, _ = ref.dropout_dense_backward(g_bad, x, weight, p, seed=1)
    assert_bits_equal(np.isnan(gw), np.isnan(gw_ref))
    assert np.isnan(gw[11]).all() and not np.isnan(np.delete(gw, 11, axis=0)).any()


@pytest.mark.parametrize("m,k,n", [(600, 300, 203), (40, 1100, 203), (7, 64, 96), (64, 200, 64)])
@pytest.mark.parametrize("p", [0.375, 0.5, 0.9, 1.0])
def test_sparse_forward_is_dense_of_dropout(backend, gemm_path, threads, m, k, n, p):
    # The forward's sparse path (avx512 from p >= 0.3; avx2 from p >= 0.375 and 64 columns)
    # through every block it can meet: two row blocks (600 > 512 rows), depth blocks past
    # 256 and 512 with a partial last chunk (300, 1100), whole column panels and edge ones
    # (203 = 2 x 96 + 11 on avx2, 3 x 64 + 11 on avx512; each thread's share of 40 rows x
    # 203 columns ends in a narrower panel, of whole vectors or not), panels whose weight
    # holds an inf (every entry multiplied: 0 * inf is NaN) beside one that skips, and a
    # thread split by rows (600) or by columns (40, 7, 64).  Bit for bit dense(dropout(x)).
    x, weight, bias, _ = _problem((m,), k, n, seed=m + k)
    weight[5, k // 2] = np.inf  # the first panel
    weight[n - 3, 3] = -np.inf  # the last one
    for seed, offset in [(3, 0), (2**64 - 1, 2**64 - 5)]:
        dropped = fd.dropout(x, p, seed=seed, offset=offset)
        with np.errstate(invalid="ignore"):
            y, z = fd.dropout_dense(x, weight, bias, p, seed=seed, offset=offset, activation="relu",
                                    return_preactivation=True)
            z0 = fd.dense(dropped, weight, bias)
            y0 = fd.dense(dropped, weight, bias, activation="relu")
        assert_bits_equal(z, z0)
        assert_bits_equal(y, y0)
        assert not np.isfinite(z[:, [5, n - 3]]).any() and np.isfinite(np.delete(z, [5, n - 3], axis=1)).all()


@pytest.mark.parametrize("n", [65, 100, 203])
@pytest.mark.parametrize("m", [3, 8])
def test_nan_signs_meet_as_in_the_dense_product(backend, gemm_path, threads, m, n):
    # A +NaN kept in x beyond depth 256 and a -NaN in the weight before it reach one output
    # from two of the dense path's 256-deep blocks; which NaN an add returns depends on its
    # operand order, so both paths, edge columns included (65, 203: not whole vectors),
    # must add the blocks as the dense micro-kernel does.  (A new user's find: the sparse
    # path's edge columns returned the other NaN.)
    k, p = 300, 0.5
    keep = ref.dropout_mask((m, k), p, seed=3)
    row = int(np.flatnonzero(keep[:, 260])[0])
    x = np.ones((m, k), np.float32)
    x[row, 260] = np.nan
    weight = np.ones((n, k), np.float32)
    weight[n - 1, 0] = -np.nan
    weight[0, 0] = -np.nan
    with np.errstate(invalid="ignore"):
        y = fd.dropout_dense(x, weight, None, p, seed=3)
        want = fd.dense(fd.dropout(x, p, seed=3), weight)
    assert np.isnan(y[row, [0, n - 1]]).all()
    assert_bits_equal(y, want)


@pytest.mark.parametrize("output_mask", [(a, b, c) for a in (True, False) for b in (True, False) for c in (True, False)])
def test_output_mask_computes_only_what_is_asked(backend, gemm_path, threads, output_mask):
    x, weight, bias, grad = _problem((300,), 70, 45, seed=4)  # grad_weight's sparse form from a batch of 256
    _, z = fd.dropout_dense(x, weight, bias, 0.5, seed=9, activation="relu", return_preactivation=True)
    full = fd.dropout_dense_backward(grad, x, weight, 0.5, seed=9, activation="relu", preactivation=z)
    some = fd.dropout_dense_backward(grad, x, weight, 0.5, seed=9, activation="relu", preactivation=z, output_mask=output_mask)
    for wanted, got, want in zip(output_mask, some, full):
        if wanted:
            assert_bits_equal(got, want)
        else:
            assert got is None


@pytest.mark.parametrize("bad", [(True, True), [True, 1, True], "xyz", None])
def test_output_mask_must_be_three_bools(bad):
    x, weight, _, grad = _problem((4,), 5, 3)
    with pytest.raises(TypeError, match="output_mask"):
        fd.dropout_dense_backward(grad, x, weight, 0.5, seed=1, output_mask=bad)


# --- which path runs: chosen per CPU, forced by FASTDROPOUT_GEMM_PATH (or _core.set_gemm_path) ---


@pytest.mark.parametrize("m,k,n", [(300, 130, 70), (37, 1100, 45)])
def test_both_gemm_paths_give_the_same_bits(backend, threads, m, k, n):
    x, weight, bias, grad = _problem((m,), k, n, seed=m)
    results = {}
    for path in ("sparse", "dense"):
        fd._core.set_gemm_path(path)
        try:
            results[path] = _all_outputs(x, weight, bias, grad, 0.5, 11, 2**64 - 3, "relu")
        finally:
            fd._core.set_gemm_path("auto")
    for a, b in zip(results["sparse"], results["dense"]):
        assert_bits_equal(a, b)


@pytest.mark.parametrize("cpu, sparse", [
    (("AuthenticAMD", 0x19, 0x11), True),   # Zen 4: measured faster
    (("AuthenticAMD", 0x1A, 0x02), True),   # later AMD families
    (("AuthenticAMD", 0x17, 0x31), False),  # Zen 2 has no AVX-512, but the rule does not assume it
    (("GenuineIntel", 6, 207), False),      # Xeons: measured 1.05-1.6x slower
    (("GenuineIntel", 6, 167), False),
    (("GenuineIntel", 6, 143), False),
    (("HygonGenuine", 0x18, 0), False),     # not measured: the dense path
])
def test_gemm_path_rule(cpu, sparse):
    assert fd._core.decide_gemm_path(*cpu, True, "")[0] is sparse
    assert fd._core.decide_gemm_path(*cpu, True, "auto")[0] is sparse
    assert fd._core.decide_gemm_path(*cpu, True, "dense")[0] is False
    assert fd._core.decide_gemm_path(*cpu, True, "sparse")[0] is True
    assert fd._core.decide_gemm_path(*cpu, False, "sparse") == (False, "dense: this backend has no sparse path")


@pytest.mark.parametrize("bad", ["", "Sparse", "fast", "dense "])
def test_gemm_path_setting_is_validated(bad):
    with pytest.raises(ValueError, match="expected auto, dense or sparse"):
        fd._core.set_gemm_path(bad)
    assert fd._core.gemm_path()[1]  # unchanged and still answering


def test_bad_gemm_path_environment_fails_the_import_clearly():
    import subprocess
    import sys

    env = dict(os.environ, FASTDROPOUT_GEMM_PATH="fastest")
    r = subprocess.run([sys.executable, "-c", "import fastdropout"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "FASTDROPOUT_GEMM_PATH" in r.stderr and "forget to compile" not in r.stderr
