"""float16 and bfloat16 dropout (SPEC section 12): x * s in float32, rounded once."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_bits_equal

import fastdropout as fd
from fastdropout import reference as ref

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - the test extra installs it
    ml_dtypes = None

HALF = [np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes is not None else [])
P_VALUES = [0.0, 0.1, 0.5, 0.999, 1.0]


def _values(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    x[::97] = np.float32(6e4)        # overflows float16 once scaled
    x[1::101] = np.float32(3e-6)     # float16 subnormals
    x[2::103] = np.nan
    x[3::107] = -np.inf
    x[4::109] = -0.0
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 2 * 2**16 + 1])
def test_half_dropout_matches_reference(backend, threads, dtype, p, n):
    x = _values(n, dtype, seed=n)
    y = fd.dropout(x, p, seed=11, offset=2**64 - 9)
    assert y.dtype == np.dtype(dtype)
    assert_bits_equal(y, ref.dropout(x, p, seed=11, offset=2**64 - 9))
    assert_bits_equal(fd.dropout_backward(x, p, seed=11, offset=2**64 - 9), y)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_mask_is_the_float32_mask(backend, dtype):
    x = np.ones((31, 17), dtype)
    keep = fd.dropout_mask(x.shape, 0.4, seed=3, offset=1)
    y = fd.dropout(x, 0.4, seed=3, offset=1)
    np.testing.assert_array_equal(y != 0, keep)
    y32 = fd.dropout(x.astype(np.float32), 0.4, seed=3, offset=1)
    assert_bits_equal(y, y32.astype(dtype))  # the float32 result rounded once


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_every_bit_pattern(backend, dtype):
    # all 65536 inputs, kept with p = 0.3: against NumPy's / ml_dtypes' own float32 -> dtype rounding
    bits = np.arange(65536, dtype=np.uint16)
    x = bits.view(dtype)
    y = fd.dropout(x, 0.3, seed=1)
    keep = fd.dropout_mask(x.shape, 0.3, seed=1)
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.where(keep, (x.astype(np.float32) * np.float32(1 / 0.7)).astype(dtype), np.zeros(1, dtype))
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(y.astype(np.float32)), nan)
    np.testing.assert_array_equal(y.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_out_and_strides(backend, dtype):
    base = _values(40 * 30, dtype).reshape(40, 30)
    x = base[::-2, 1::3]
    out = np.empty(x.shape, dtype)
    fd.dropout(x, 0.5, seed=4, out=out)
    assert_bits_equal(out, ref.dropout(np.ascontiguousarray(x), 0.5, seed=4))
    fd.dropout(base, 0.5, seed=4, out=base)  # in place
    assert_bits_equal(base, ref.dropout(_values(40 * 30, dtype).reshape(40, 30), 0.5, seed=4))
