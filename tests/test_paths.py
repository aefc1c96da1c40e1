"""Value tests for every path a size, the blocking or the thread count can select.

Each kernel path is checked against the NumPy reference under 1, 2 and 3 threads on
every backend: the streaming-store path of outputs of 16 MB and more, elementwise
thread ranges whose sizes leave a remainder, and the boundaries that one rounding
or comparison decides (the keep test at u == t, the half-way threshold, ReLU'(0)).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_bits_equal

import fastdropout as fd
from fastdropout import _checks
from fastdropout import reference as ref

STREAM_BYTES = 16 << 20  # ops.cpp: outputs this large are written with streaming stores
SEED, OFFSET, P = 0x5EED5EED5EED, 2**64 - 1013, 0.3


@functools.lru_cache(maxsize=None)
def _reference_keep(n: int) -> np.ndarray:
    return ref.dropout_mask((n,), P, seed=SEED, offset=OFFSET)


def _expected(x: np.ndarray) -> np.ndarray:
    keep = _reference_keep(x.size)
    return np.where(keep, x * x.dtype.type(_checks.scale(P, x.dtype)), x.dtype.type(0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_store_path_values(backend, threads, dtype):
    # just past the streaming threshold, with a size that is no multiple of any vector width
    n = STREAM_BYTES // np.dtype(dtype).itemsize + 37
    x = np.random.default_rng(3).standard_normal(n).astype(dtype)
    want = _expected(x)
    assert_bits_equal(fd.dropout(x, P, seed=SEED, offset=OFFSET), want)
    assert_bits_equal(fd.dropout_backward(x, P, seed=SEED, offset=OFFSET), want)
    out = np.full_like(x, np.nan)
    fd.dropout(x, P, seed=SEED, offset=OFFSET, out=out)
    assert_bits_equal(out, want)
    fd.dropout(x, P, seed=SEED, offset=OFFSET, out=x)  # in place
    assert_bits_equal(x, want)


# Ranges (ops.cpp's parallel_ranges, handed to threads as they ask) are cut every
# max(ceil(n / (8 threads)), 2**16) elements, rounded up to 64: these sizes leave a short
# last range, both where the 2**16 floor sets the cut and (the last one) where n does.
REMAINDER_SIZES = [2 * 2**16 + 1, 3 * 2**16 + 1, 3 * 2**16 + 130, 5 * 2**16 + 63, 2**21 + 4097]


@pytest.mark.parametrize("n", REMAINDER_SIZES)
def test_elementwise_thread_ranges_cover_every_element(backend, threads, n):
    words = ref.random_words(n, SEED, OFFSET)
    keep = _reference_keep(n)
    np.testing.assert_array_equal(fd._core.random_words(n, SEED, OFFSET), words)
    np.testing.assert_array_equal(fd.dropout_mask((n,), P, seed=SEED, offset=OFFSET), keep)
    np.testing.assert_array_equal(
        fd.dropout_mask((n,), P, seed=SEED, offset=OFFSET, packed=True), np.packbits(keep, bitorder="little")
    )
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert_bits_equal(fd.dropout(x, P, seed=SEED, offset=OFFSET), _expected(x))


def _words_with_both_parities(n=256, seed=41, offset=5):
    words = ref.random_words(n, seed, offset).astype(np.int64)
    even = int(np.flatnonzero(words % 2 == 0)[0])
    odd = int(np.flatnonzero(words % 2 == 1)[0])
    return words, seed, offset, even, odd


def test_reference_keeps_at_u_equal_t_and_drops_below():
    words, seed, offset, *_ = _words_with_both_parities()
    for k in (0, 1, 2, 3, 100):
        u = int(words[k])
        assert ref.threshold(u / 2**32) == u
        assert ref.dropout_mask((words.size,), u / 2**32, seed=seed, offset=offset)[k]
        assert ref.dropout(np.ones(words.size, np.float32), u / 2**32, seed=seed, offset=offset)[k] != 0
        assert not ref.dropout_mask((words.size,), (u + 1) / 2**32, seed=seed, offset=offset)[k]
        assert ref.dropout_backward(np.ones(words.size), (u + 1) / 2**32, seed=seed, offset=offset)[k] == 0


@pytest.mark.parametrize("which", ["kernels", "reference"])
def test_half_way_threshold_rounds_to_even(backend, which):
    # p * 2**32 = u + 1/2 rounds to u when u is even (kept) and to u + 1 when odd (dropped);
    # a floor, or rounding half up, gets one of the two wrong.
    words, seed, offset, even, odd = _words_with_both_parities()
    mod = fd if which == "kernels" else ref
    for k, kept in ((even, True), (odd, False)):
        p = (int(words[k]) + 0.5) / 2**32
        assert _checks.threshold(p) == ref.threshold(p) == int(words[k]) + (not kept)
        assert bool(mod.dropout_mask((words.size,), p, seed=seed, offset=offset)[k]) is kept
        y = mod.dropout(np.ones(words.size, np.float32), p, seed=seed, offset=offset)
        assert bool(y[k] != 0) is kept


@pytest.mark.parametrize("which", ["kernels", "reference"])
def test_relu_derivative_at_exactly_zero_is_zero(backend, threads, which):
    # Zero rows with a zero bias give z == 0 exactly: relu'(0) = 0 (torch's convention),
    # so those rows pass no gradient to the bias, the weight or x.
    rng = np.random.default_rng(8)
    m, k, n = 40, 33, 70
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[::3] = 0.0
    weight = rng.standard_normal((n, k)).astype(np.float32)
    bias = np.zeros(n, np.float32)
    bias[::2] = 1.5  # z > 0 there on the zero rows: those columns do pass gradient
    grad = rng.standard_normal((m, n)).astype(np.float32)
    mod = fd if which == "kernels" else ref
    y, z = mod.dropout_dense(x, weight, bias, 0.5, seed=4, activation="relu", return_preactivation=True)
    assert np.all(z[::3, 1::2] == 0)
    gx, gw, gb = mod.dropout_dense_backward(grad, x, weight, 0.5, seed=4, activation="relu", preactivation=z)
    dz = np.where(z > 0, grad, np.float32(0))
    np.testing.assert_allclose(gb, dz.sum(0, dtype=np.float64), rtol=1e-5, atol=1e-5)
    zero_rows_dz = dz[::3]
    assert np.all(zero_rows_dz[:, 1::2] == 0)
    np.testing.assert_allclose(gw, dz.T.astype(np.float64) @ ref.dropout(x, 0.5, seed=4).astype(np.float64), rtol=1e-4, atol=1e-4)
