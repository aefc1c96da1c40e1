"""Property tests for the fused dropout -> dense layer: for any small shape, strides, p, seed,
offset, activation and bias, the kernels agree with the NumPy reference (within a float32
GEMM's error), use fd.dropout's mask bit for bit, and equal dense(dropout(x)) exactly.

Tolerance: tiny random shapes produce outputs far smaller than their terms (hypothesis found a
1 x 1 grad_x 256 times smaller than sum |dz_j w_j|), where ``max|a-b| / max|b|`` no longer
measures a GEMM's error. So here each element is held to the standard componentwise bound of
a float32 dot product, ``|fl(A @ B) - A @ B| <= rtol(K) * (|A| @ |B|)`` with test_dense's
``rtol(K) = max(4 K 2**-24, 2**-20)``; ``|A|`` for the gradients uses ``1.13 |grad_out|``
(``|act'| <= 1.13``), which also covers the float32 evaluation of ``act'``.
"""

from __future__ import annotations

import math

import numpy as np
from helpers import assert_bits_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dense import gemm_rtol

import fastdropout as fd
from fastdropout import reference as ref

# The backend fixture only selects a kernel table; sharing it across examples is intended.
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

U64_EDGES = [0, 1, 3, 2**32 - 1, 2**32, 2**34 - 1, 2**63, 2**64 - 4, 2**64 - 1]
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
offsets = st.one_of(u64, st.integers(2**64 - 300, 2**64 - 1), st.integers(2**32 - 300, 2**32 + 300))
probabilities = st.one_of(
    st.sampled_from([0.0, 1e-9, 0.1, 0.5, 0.9, 1.0, 2.0**-32, 1.0 - 2.0**-32]),
    st.floats(0.0, 1.0),
)
activations = st.sampled_from([None, "relu", "gelu"])
ACT_LIPSCHITZ = 1.13  # max |act'| over None, relu and gelu


def assert_within_bound(actual, expected, terms, k_inner, what):
    """Elementwise ``|actual - expected| <= gemm_rtol(k_inner) * terms`` (terms = |A| @ |B|)."""
    actual = np.asarray(actual)
    assert actual.dtype == np.float32 and actual.shape == expected.shape, (what, actual.shape)
    err = np.abs(actual.astype(np.float64) - expected)
    allowed = gemm_rtol(k_inner) * np.asarray(terms, dtype=np.float64)
    bad = err > allowed
    if bad.any():
        i = np.flatnonzero(bad.ravel())[0]
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} elements outside the GEMM bound; first at {i}: "
            f"got {actual.ravel()[i]!r}, expected {expected.ravel()[i]!r}, "
            f"|err| {err.ravel()[i]:.3g} > {allowed.ravel()[i]:.3g}"
        )


@st.composite
def problems(draw):
    """float32 (x, weight, bias or None, grad_out), x and weight possibly non-contiguous."""
    lead = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=2)))
    # in_features >= 1: in_features = 0 is a known failure, pinned in test_dense.py.
    k = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((*lead, k), dtype=np.float32)
    if x.ndim >= 2 and draw(st.booleans()):
        # the same logical array, stored transposed
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    weight = rng.standard_normal((n, k), dtype=np.float32) * np.float32(1 / math.sqrt(k))
    layout = draw(st.sampled_from(["c", "transposed", "strided"]))
    if layout == "transposed":
        weight = np.ascontiguousarray(weight.T).T
    elif layout == "strided":
        backing = np.zeros((n, 2 * k), np.float32)
        backing[:, ::2] = weight
        weight = backing[:, ::2]
    bias = rng.standard_normal(n, dtype=np.float32) if draw(st.booleans()) else None
    grad = rng.standard_normal((*lead, n), dtype=np.float32)
    return x, weight, bias, grad


@SETTINGS
@given(problem=problems(), p=probabilities, seed=u64, offset=offsets, activation=activations)
def test_matches_reference(backend, problem, p, seed, offset, activation):
    x, weight, bias, grad = problem
    lead, k, n = x.shape[:-1], x.shape[-1], weight.shape[0]
    m = math.prod(lead)

    y, z = fd.dropout_dense(x, weight, bias, p, seed=seed, offset=offset, activation=activation,
                            return_preactivation=True)
    ry, rz = ref.dropout_dense(x, weight, bias, p, seed=seed, offset=offset,
                               activation=activation, return_preactivation=True)
    abs_x = np.abs(ref.dropout(x, p, seed=seed, offset=offset).astype(np.float64)).reshape(-1, k)
    abs_w = np.abs(weight.astype(np.float64))
    terms_z = abs_x @ abs_w.T + (0.0 if bias is None else np.abs(bias.astype(np.float64)))
    terms_z = terms_z.reshape(rz.shape)
    assert_within_bound(z, rz, terms_z, k + 1, "z")
    assert_within_bound(y, ry, ACT_LIPSCHITZ * terms_z, k + 1, "y")

    dropped = fd.dropout(x, p, seed=seed, offset=offset)
    assert_bits_equal(z, fd.dense(dropped, weight, bias))
    assert_bits_equal(y, fd.dense(dropped, weight, bias, activation=activation))

    gx, gw, gb = fd.dropout_dense_backward(grad, x, weight, p, seed=seed, offset=offset,
                                           activation=activation, preactivation=z,
                                           bias=bias is not None)
    rgx, rgw, rgb = ref.dropout_dense_backward(grad, x, weight, p, seed=seed, offset=offset,
                                               activation=activation, preactivation=z,
                                               bias=bias is not None)
    abs_dz = ACT_LIPSCHITZ * np.abs(grad.astype(np.float64)).reshape(-1, n)
    s_keep = np.where(ref.dropout_mask(x.shape, p, seed=seed, offset=offset), 1.0, 0.0)
    s_keep = s_keep * float(ref.dropout_scale(p, np.float32))
    terms_gx = (abs_dz @ abs_w).reshape(x.shape) * s_keep
    assert_within_bound(gx, rgx, terms_gx, n, "grad_x")
    assert_within_bound(gw, rgw, abs_dz.T @ abs_x, max(m, 1), "grad_weight")
    if bias is None:
        assert gb is None
    else:
        assert_within_bound(gb, rgb, abs_dz.sum(axis=0), max(m, 1), "grad_bias")
    keep = ref.dropout_mask(x.shape, p, seed=seed, offset=offset)
    assert not gx.view(np.uint32)[~keep].any()


@SETTINGS
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 300),
    split=st.data(),
    p=probabilities,
    seed=u64,
    offset=offsets,
)
def test_splitting_the_batch_keeps_the_mask(backend, m, k, split, p, seed, offset):
    # Rows [a, m) of x under offset + a * k get the same mask as inside the whole batch:
    # with weight = I the layer is exactly dropout(x), so the pieces concatenate bit for bit.
    a = split.draw(st.integers(0, m))
    rng = np.random.default_rng(m * 1000 + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    eye = np.eye(k, dtype=np.float32)
    whole = fd.dropout_dense(x, eye, None, p, seed=seed, offset=offset)
    first = fd.dropout_dense(x[:a], eye, None, p, seed=seed, offset=offset)
    second = fd.dropout_dense(x[a:], eye, None, p, seed=seed, offset=(offset + a * k) % 2**64)
    assert_bits_equal(np.concatenate([first, second]), whole)
    np.testing.assert_array_equal(whole, ref.dropout(x, p, seed=seed, offset=offset))
