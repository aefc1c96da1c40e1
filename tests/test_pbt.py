"""Property tests: fd.dropout, fd.dropout_backward and fd.dropout_mask equal the reference
for any shape, strides, p, seed and offset."""

from __future__ import annotations

import numpy as np
from helpers import assert_bits_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastdropout as fd
from fastdropout import reference as ref

# The backend fixture only selects a kernel table; sharing it across examples is intended.
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

U64_EDGES = [0, 1, 3, 2**32 - 1, 2**32, 2**34 - 1, 2**63, 2**64 - 4, 2**64 - 1]
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
# Offsets close below 2**64 make the stream wrap inside the array.
offsets = st.one_of(u64, st.integers(2**64 - 200, 2**64 - 1), st.integers(2**32 - 200, 2**32 + 200))
probabilities = st.one_of(
    st.sampled_from([0.0, 1e-9, 0.1, 0.5, 0.9, 1.0, 2.0**-32, 1.0 - 2.0**-32]),
    st.floats(0.0, 1.0),
)
float_dtypes = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])


@st.composite
def strided_arrays(draw):
    """A float array that is a view with arbitrary (also negative) steps into a larger one."""
    dtype = draw(float_dtypes)
    base_shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9))
    base = draw(hnp.arrays(dtype, base_shape, elements=st.floats(width=8 * dtype.itemsize)))
    # The trailing Ellipsis keeps a 0-d result an array view rather than a NumPy scalar.
    view = base[(*(draw(st.slices(n)) for n in base_shape), Ellipsis)]
    if view.ndim > 1 and draw(st.booleans()):
        view = view.transpose(draw(st.permutations(range(view.ndim))))
    return view


@SETTINGS
@given(x=strided_arrays(), p=probabilities, seed=u64, offset=offsets)
def test_dropout_matches_reference(backend, x, p, seed, offset):
    before = x.copy()
    y = fd.dropout(x, p, seed=seed, offset=offset)
    assert y.flags.c_contiguous
    assert_bits_equal(y, ref.dropout(x, p, seed=seed, offset=offset))
    assert_bits_equal(fd.dropout_backward(x, p, seed=seed, offset=offset), y)
    assert_bits_equal(x, before)


@SETTINGS
@given(x=strided_arrays(), p=probabilities, seed=u64, offset=offsets, data=st.data())
def test_dropout_into_strided_out(backend, x, p, seed, offset, data):
    backing = np.full(tuple(2 * n + 1 for n in x.shape), -1.0, x.dtype)
    steps = data.draw(st.tuples(*[st.sampled_from([1, 2, -1, -2]) for _ in x.shape]))
    out = backing[tuple(slice(None, None, s) for s in steps)]
    out = out[(*(slice(0, n) for n in x.shape), Ellipsis)]
    assert out.shape == x.shape
    assert fd.dropout(x, p, seed=seed, offset=offset, out=out) is out
    assert_bits_equal(out, ref.dropout(x, p, seed=seed, offset=offset))


@SETTINGS
@given(
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
    p=probabilities,
    seed=u64,
    offset=offsets,
)
def test_mask_matches_reference(backend, shape, p, seed, offset):
    want = ref.dropout_mask(shape, p, seed=seed, offset=offset)
    np.testing.assert_array_equal(fd.dropout_mask(shape, p, seed=seed, offset=offset), want)
    np.testing.assert_array_equal(
        fd.dropout_mask(shape, p, seed=seed, offset=offset, packed=True),
        np.packbits(want.ravel(), bitorder="little"),
    )


@SETTINGS
@given(
    n=st.integers(0, 300),
    data=st.data(),
    p=probabilities,
    seed=u64,
    offset=offsets,
    dtype=float_dtypes,
)
def test_splitting_a_call_changes_nothing(backend, n, data, p, seed, offset, dtype):
    # The mask of element i depends only on offset + i (SPEC section 1).
    x = np.arange(1, n + 1, dtype=dtype)
    k = data.draw(st.integers(0, n))
    whole = fd.dropout(x, p, seed=seed, offset=offset)
    first = fd.dropout(x[:k], p, seed=seed, offset=offset)
    second = fd.dropout(x[k:], p, seed=seed, offset=(offset + k) % 2**64)
    assert_bits_equal(np.concatenate([first, second]), whole)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), seed=u64, offset=offsets)
def test_reference_words_are_the_shifted_stream(n, seed, offset):
    # The oracle's block-wise vectorization agrees with itself under any shift.
    words = ref.random_words(n + 5, seed, offset)
    np.testing.assert_array_equal(ref.random_words(n, seed, (offset + 5) % 2**64), words[5:])
