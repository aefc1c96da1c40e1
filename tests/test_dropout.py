"""fd.dropout, fd.dropout_backward and fd.dropout_mask against the NumPy reference, bit for bit.

Every test that runs a kernel takes the ``backend`` fixture, so it runs on each backend this
CPU supports.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import (
    EDGE_OFFSETS,
    EDGE_SEEDS,
    P_VALUES,
    assert_bits_equal,
    round_up4,
    sample_values,
)

import fastdropout as fd
from fastdropout import reference as ref

SIZES = [0, 1, 3, 17, 1000]
DTYPES = [np.float32, np.float64]
SHAPES = [(), (1,), (3, 4, 5), (2, 0, 3), (7, 1, 3), (2, 3, 2, 5)]
LARGE = 1_000_003
SENTINEL = -12345.0


def _seed_offset_pairs():
    # Every edge offset with a varying seed, plus every edge seed at a few offsets.
    pairs = [(EDGE_SEEDS[i % len(EDGE_SEEDS)], o) for i, o in enumerate(EDGE_OFFSETS)]
    pairs += [(s, o) for s in EDGE_SEEDS for o in (0, 3, 2**64 - 2)]
    return pairs


SEED_OFFSETS = _seed_offset_pairs()


def _views(base):
    """Strided views of a 2-D array: the logical C-order index is what the mask follows."""
    return {
        "contiguous": base,
        "step2": base[::2],
        "reversed": base[::-1],
        "reversed-cols-step3": base[:, ::-3],
        "transposed": base.T,
        "fortran": np.asfortranarray(base),
        "inner-slice": base[1:-1, 2:-1],
        "both-negative": base[::-2, ::-1],
        "broadcast": np.broadcast_to(base[0], (4,) + base[0].shape),
    }


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("n", SIZES)
def test_mask_matches_reference(backend, n, p):
    for seed, offset in SEED_OFFSETS:
        want = ref.dropout_mask((n,), p, seed=seed, offset=offset)
        got = fd.dropout_mask((n,), p, seed=seed, offset=offset)
        assert got.dtype == np.bool_
        assert got.shape == (n,)
        np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} offset={offset}")

        packed = fd.dropout_mask((n,), p, seed=seed, offset=offset, packed=True)
        assert packed.dtype == np.uint8
        assert packed.shape == ((n + 7) // 8,)
        np.testing.assert_array_equal(packed, np.packbits(want, bitorder="little"))


def test_mask_of_every_length_and_start(backend):
    """Masks of each length 1..260 from starts at each position within a Philox block (and
    across the 2**64 wrap of the stream), against one reference stream: a backend draws its
    keep bits 64 or, where the caller still wants them, 128 at a time and keeps the second
    64 for its next word, so every split of a call into such draws is exercised."""
    seed = 31
    for start in (0, 1, 2, 3, 125, 2**64 - 130):
        stream = ref.dropout_mask((263 + 260,), 0.5, seed=seed, offset=start)
        for n in range(1, 261):
            for skip in (0, 1, 3, 263):
                got = fd.dropout_mask((n,), 0.5, seed=seed, offset=(start + skip) % 2**64)
                np.testing.assert_array_equal(got, stream[skip:skip + n], err_msg=f"start={start} skip={skip} n={n}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mask_multi_dimensional(backend, shape):
    want = ref.dropout_mask(shape, 0.3, seed=11, offset=6)
    got = fd.dropout_mask(shape, 0.3, seed=11, offset=6)
    assert got.shape == shape
    np.testing.assert_array_equal(got, want)
    packed = fd.dropout_mask(shape, 0.3, seed=11, offset=6, packed=True)
    np.testing.assert_array_equal(packed, np.packbits(want.ravel(), bitorder="little"))


@pytest.mark.parametrize("p", [0.0, 2.0**-32, 0.25, 0.5 + 2.0**-33, 0.75, 1.0 - 2.0**-32, 1.0])
def test_mask_is_words_against_threshold(backend, p):
    # Ties the kernel mask to the kernel word stream: keep iff u >= round(p * 2**32).
    n, seed, offset = 4099, 77, 2**64 - 2001
    words = fd._core.random_words(n, seed, offset).astype(np.int64)
    keep = fd.dropout_mask((n,), p, seed=seed, offset=offset)
    np.testing.assert_array_equal(keep, words >= round(p * 2**32))


def test_mask_threshold_boundary(backend):
    # p = u_k / 2**32 puts t exactly on word k: kept (u >= t); one step higher drops it.
    n, seed, offset = 64, 2024, 2**64 - 30
    words = ref.random_words(n, seed, offset)
    for k in [0, 1, 2, 3, 29, 30, 31, 63]:
        u = int(words[k])
        assert fd.dropout_mask((n,), u / 2**32, seed=seed, offset=offset)[k]
        assert fd.dropout(np.ones(n, np.float32), u / 2**32, seed=seed, offset=offset)[k] != 0
        if u + 1 <= 2**32:
            assert not fd.dropout_mask((n,), (u + 1) / 2**32, seed=seed, offset=offset)[k]
            y = fd.dropout(np.ones(n, np.float64), (u + 1) / 2**32, seed=seed, offset=offset)
            assert y[k] == 0
        if u > 0:  # halfway below u rounds to even: u if u is even, else u - 1 (kept either way)
            assert fd.dropout_mask((n,), (u - 0.5) / 2**32, seed=seed, offset=offset)[k]
        # halfway above u rounds to u when u is even (kept), to u + 1 when odd (dropped)
        kept = fd.dropout_mask((n,), (u + 0.5) / 2**32, seed=seed, offset=offset)[k]
        assert kept == (u % 2 == 0), (k, u)


def test_mask_extremes(backend):
    n = 10_000
    assert fd.dropout_mask((n,), 0.0, seed=5).all()
    assert not fd.dropout_mask((n,), 1.0, seed=5).any()
    assert fd.dropout_mask((n,), 1.0, seed=5, packed=True).tolist() == [0] * (n // 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_matches_reference(backend, dtype):
    seed, offset = 2**64 - 1, 2**64 - LARGE // 2  # the stream wraps in the middle
    x = sample_values(LARGE, dtype, seed=3)
    assert_bits_equal(
        fd.dropout(x, 0.5, seed=seed, offset=offset), ref.dropout(x, 0.5, seed=seed, offset=offset)
    )
    np.testing.assert_array_equal(
        fd.dropout_mask((LARGE,), 0.1, seed=seed, offset=offset, packed=True),
        ref.dropout_mask((LARGE,), 0.1, seed=seed, offset=offset, packed=True),
    )


# ---------------------------------------------------------------------------------------------
# Forward and backward against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_reference(backend, dtype, n, p):
    x = sample_values(n, dtype, seed=n)
    for seed, offset in SEED_OFFSETS:
        y = fd.dropout(x, p, seed=seed, offset=offset)
        assert isinstance(y, np.ndarray)
        assert y.flags.c_contiguous
        assert not np.shares_memory(y, x)
        assert_bits_equal(y, ref.dropout(x, p, seed=seed, offset=offset))


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(backend, dtype, n, p):
    grad = sample_values(n, dtype, seed=n + 1)
    for seed, offset in SEED_OFFSETS:
        dx = fd.dropout_backward(grad, p, seed=seed, offset=offset)
        assert dx.flags.c_contiguous
        assert_bits_equal(dx, ref.dropout_backward(grad, p, seed=seed, offset=offset))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_uses_forward_mask(backend, dtype):
    # Backward of ones is s on the kept elements: exactly the forward of ones.
    x = np.ones(1001, dtype)
    y = fd.dropout(x, 0.4, seed=8, offset=13)
    assert_bits_equal(fd.dropout_backward(x, 0.4, seed=8, offset=13), y)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_multi_dimensional(backend, dtype, shape):
    x = sample_values(int(np.prod(shape)), dtype, seed=4).reshape(shape)
    y = fd.dropout(x, 0.5, seed=2**64 - 1, offset=2**32 - 3)
    assert y.shape == shape
    assert_bits_equal(y, ref.dropout(x, 0.5, seed=2**64 - 1, offset=2**32 - 3))
    dx = fd.dropout_backward(x, 0.5, seed=2**64 - 1, offset=2**32 - 3)
    assert_bits_equal(dx, ref.dropout_backward(x, 0.5, seed=2**64 - 1, offset=2**32 - 3))


@pytest.mark.parametrize("view", list(_views(np.zeros((6, 9)))))
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(backend, dtype, view):
    base = sample_values(6 * 9, dtype, seed=5).reshape(6, 9)
    x = _views(base)[view]
    y = fd.dropout(x, 0.5, seed=21, offset=3)
    assert y.flags.c_contiguous
    assert_bits_equal(y, ref.dropout(np.ascontiguousarray(x), 0.5, seed=21, offset=3))
    dx = fd.dropout_backward(x, 0.5, seed=21, offset=3)
    assert dx.flags.c_contiguous
    assert_bits_equal(dx, ref.dropout_backward(np.ascontiguousarray(x), 0.5, seed=21, offset=3))
    assert_bits_equal(base, sample_values(6 * 9, dtype, seed=5).reshape(6, 9))  # input untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_large(backend, dtype):
    base = sample_values(2 * 1001 * 3, dtype, seed=6).reshape(2 * 1001, 3)
    x = base[::-2, ::-1]
    assert_bits_equal(fd.dropout(x, 0.2, seed=9, offset=1), ref.dropout(x, 0.2, seed=9, offset=1))


def test_threshold_and_scale_rounding(backend):
    # Ones make the output show the scale itself: 1/(1-p) in double, rounded once.
    for p in [0.1, 0.3, 1 / 3, 0.7, 0.9, 0.99, 1e-9]:
        for dtype in DTYPES:
            y = fd.dropout(np.ones(4096, dtype), p, seed=1)
            kept = y[y != 0]
            assert kept.size > 0
            assert np.all(kept == dtype(1.0 / (1.0 - p))), (p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropped_nan_and_inf_become_positive_zero(backend, dtype):
    n = 999
    keep = fd.dropout_mask((n,), 0.5, seed=12, offset=1)
    assert 0 < keep.sum() < n
    uint = f"u{np.dtype(dtype).itemsize}"
    for special in [np.nan, np.inf, -np.inf, -0.0]:
        y = fd.dropout(np.full(n, special, dtype), 0.5, seed=12, offset=1)
        assert np.all(y[~keep].view(uint) == 0), special  # +0.0, never -0.0 or NaN
        if np.isnan(special):
            assert np.all(np.isnan(y[keep]))
        else:
            assert_bits_equal(y[keep], np.full(keep.sum(), special, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_p_zero_is_identity_and_p_one_is_zero(backend, dtype):
    x = sample_values(1003, dtype, seed=7)
    assert_bits_equal(fd.dropout(x, 0.0, seed=3), x)
    assert_bits_equal(fd.dropout_backward(x, 0.0, seed=3), x)
    assert_bits_equal(fd.dropout(x, 1.0, seed=3), np.zeros_like(x))
    assert_bits_equal(fd.dropout_backward(x, 1.0, seed=3), np.zeros_like(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_calls_give_the_same_result(backend, dtype):
    # The mask of element i depends only on offset + i: splitting a call changes nothing.
    x = sample_values(1000, dtype, seed=8)
    offset = 2**64 - 301
    whole = fd.dropout(x, 0.5, seed=4, offset=offset)
    for k in [1, 3, 4, 299, 301, 302, 999]:
        first = fd.dropout(x[:k], 0.5, seed=4, offset=offset)
        second = fd.dropout(x[k:], 0.5, seed=4, offset=(offset + k) % 2**64)
        assert_bits_equal(np.concatenate([first, second]), whole)


def test_different_seeds_and_offsets_differ(backend):
    x = np.ones(256, np.float32)
    a = fd.dropout(x, 0.5, seed=1, offset=0)
    assert not np.array_equal(a, fd.dropout(x, 0.5, seed=2, offset=0))
    assert not np.array_equal(a, fd.dropout(x, 0.5, seed=1, offset=4))
    assert not np.array_equal(a, fd.dropout(x, 0.5, seed=1 + 2**32, offset=0))


# ---------------------------------------------------------------------------------------------
# training=False and out=
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_mode_is_identity(backend, dtype):
    x = sample_values(1000, dtype, seed=9).reshape(10, 100)
    for view in [x, x[::-1, ::3], x.T]:
        y = fd.dropout(view, 0.5, seed=1, training=False)
        assert_bits_equal(y, view)
        out = np.full(view.shape, SENTINEL, dtype)
        assert fd.dropout(view, 0.5, seed=1, training=False, out=out) is out
        assert_bits_equal(out, view)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_contiguous(backend, dtype):
    x = sample_values(1000, dtype, seed=10).reshape(8, 125)
    out = np.full_like(x, SENTINEL)
    assert fd.dropout(x, 0.3, seed=5, offset=7, out=out) is out
    assert_bits_equal(out, ref.dropout(x, 0.3, seed=5, offset=7))
    grad_out = np.full_like(x, SENTINEL)
    assert fd.dropout_backward(x, 0.3, seed=5, offset=7, out=grad_out) is grad_out
    assert_bits_equal(grad_out, ref.dropout_backward(x, 0.3, seed=5, offset=7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_aliases_input(backend, dtype):
    original = sample_values(1003, dtype, seed=11)
    x = original.copy()
    assert fd.dropout(x, 0.5, seed=6, offset=2, out=x) is x
    assert_bits_equal(x, ref.dropout(original, 0.5, seed=6, offset=2))

    g = original.copy()
    assert fd.dropout_backward(g, 0.5, seed=6, offset=2, out=g) is g
    assert_bits_equal(g, ref.dropout_backward(original, 0.5, seed=6, offset=2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_aliases_strided_input(backend, dtype):
    buffer = sample_values(2 * 1003, dtype, seed=12)
    original = buffer.copy()
    x = buffer[::-2]
    assert fd.dropout(x, 0.5, seed=6, offset=2, out=x) is x
    assert_bits_equal(x, ref.dropout(original[::-2], 0.5, seed=6, offset=2))
    assert_bits_equal(buffer[-2::-2], original[-2::-2])  # the other half untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_partially_overlaps_input(backend, dtype):
    # NumPy's rule: the result is as if the input had been read before anything was written.
    buffer = sample_values(1004, dtype, seed=13)
    original = buffer.copy()
    x, out = buffer[:-1], buffer[1:]
    assert fd.dropout(x, 0.5, seed=6, offset=2, out=out) is out
    assert_bits_equal(out, ref.dropout(original[:-1], 0.5, seed=6, offset=2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_strided(backend, dtype):
    x = sample_values(600, dtype, seed=14).reshape(20, 30)
    layouts = {
        "step": ((40, 90), lambda b: b[::2, ::3]),
        "negative-steps": ((40, 90), lambda b: b[::-2, ::-3]),
        "row-padding": ((20, 31), lambda b: b[:, 1:]),
        "fortran": ((30, 20), lambda b: b.T),
        "fortran-negative": ((31, 21), lambda b: b.T[:0:-1, 1:]),
    }
    for name, (backing_shape, make) in layouts.items():
        backing = np.full(backing_shape, SENTINEL, dtype)
        out = make(backing)
        assert out.shape == x.shape and np.shares_memory(out, backing), name
        assert fd.dropout(x, 0.5, seed=7, offset=1, out=out) is out
        assert_bits_equal(out, ref.dropout(x, 0.5, seed=7, offset=1))
        written = np.zeros(backing_shape, bool)
        make(written)[...] = True
        assert np.all(backing[~written] == SENTINEL), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_strided_input_and_output(backend, dtype):
    x = sample_values(2000, dtype, seed=15).reshape(40, 50)[::-3, 1::2]
    out = np.full((x.shape[1], x.shape[0]), SENTINEL, dtype).T
    assert fd.dropout_backward(x, 0.25, seed=2**64 - 1, offset=2**64 - 5, out=out) is out
    assert_bits_equal(out, ref.dropout_backward(x, 0.25, seed=2**64 - 1, offset=2**64 - 5))


# ---------------------------------------------------------------------------------------------
# Thread counts
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _large_case(dtype):
    x = sample_values(LARGE, dtype, seed=16)
    seed, offset = 0x0123456789ABCDEF, 2**32 - 1001
    y = ref.dropout(x, 0.3, seed=seed, offset=offset)
    mask = ref.dropout_mask((LARGE,), 0.3, seed=seed, offset=offset, packed=True)
    return x, seed, offset, y, mask


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_does_not_change_results(backend, threads, dtype):
    x, seed, offset, y, mask = _large_case(dtype)
    assert_bits_equal(fd.dropout(x, 0.3, seed=seed, offset=offset), y)
    assert_bits_equal(fd.dropout_backward(x, 0.3, seed=seed, offset=offset), y)
    packed = fd.dropout_mask((LARGE,), 0.3, seed=seed, offset=offset, packed=True)
    np.testing.assert_array_equal(packed, mask)
    strided = x[::-1]
    assert_bits_equal(
        fd.dropout(strided, 0.3, seed=seed, offset=offset),
        ref.dropout(strided, 0.3, seed=seed, offset=offset),
    )


def test_num_threads_round_trip(threads):
    assert fd.get_num_threads() == threads


# ---------------------------------------------------------------------------------------------
# The reference's own invariants (no kernel involved)
# ---------------------------------------------------------------------------------------------


def test_reference_threshold():
    assert ref.threshold(0) == 0
    assert ref.threshold(1) == 2**32
    assert ref.threshold(0.5) == 2**31
    assert ref.threshold(1e-9) == 4
    assert ref.threshold(2.5 * 2.0**-32) == 2  # half to even
    assert ref.threshold(3.5 * 2.0**-32) == 4


def test_reference_dropout_semantics():
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 1.0, 2.0] * 50, np.float32)
    keep = ref.dropout_mask(x.shape, 0.5, seed=3, offset=1)
    assert 0 < keep.sum() < x.size
    y = ref.dropout(x, 0.5, seed=3, offset=1)
    assert y.dtype == np.float32
    assert np.all(y[~keep].view(np.uint32) == 0)
    s = np.float32(2.0)
    assert_bits_equal(y[keep], x[keep] * s)
    assert_bits_equal(ref.dropout(x, 0.5, seed=3, training=False), x)
    np.testing.assert_array_equal(
        ref.dropout_mask(x.shape, 0.5, seed=3, offset=1, packed=True),
        np.packbits(keep, bitorder="little"),
    )


def test_reference_scale_is_rounded_once():
    assert ref.dropout_scale(0.1, np.float32) == np.float32(1.0 / 0.9)
    assert ref.dropout_scale(0.1, np.float32).dtype == np.float32
    assert ref.dropout_scale(0.1, np.float64) == 1.0 / 0.9
    assert ref.dropout_scale(1.0, np.float32) == 0


def test_reference_draw_offsets_are_consecutive():
    x = np.ones(10, np.float64)
    a = ref.dropout(x, 0.5, seed=1, offset=0)
    b = ref.dropout(x, 0.5, seed=1, offset=round_up4(10))
    whole = ref.dropout(np.ones(22), 0.5, seed=1, offset=0)
    assert_bits_equal(a, whole[:10])
    assert_bits_equal(b, whole[12:])
