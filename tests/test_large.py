"""Arrays and offsets beyond 32 bits (issue 6): 64-bit indices everywhere.

* A packed mask of 2**32 + 5 elements (512 MB) is right at its head, around element 2**31,
  around the place where offset + i wraps past 2**64, around element 2**32, at its tail and in
  random windows, checked window by window against the reference; and its bit count is what
  the threshold predicts (no block left unwritten).
* Offsets beyond 2**32 (and up to the 2**64 wrap) on small arrays give the reference's answer
  for every function and backend.
* A shape whose element count overflows 32 bits and that cannot fit in memory gets a clean
  MemoryError (or ValueError), and one with 2**62 elements or more a ValueError: no crash, no
  wrapped-around size.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_bits_equal, sample_values

import fastdropout as fd
from fastdropout import reference as ref

U64 = 2**64
GiB = 2**30
N_BIG = 2**32 + 5
NEED_FREE = 2 * GiB


def free_memory():
    """Bytes of free memory (os.sysconf), or what /proc/meminfo calls available when that
    is more (page cache can be reclaimed); None where neither can be read."""
    free = None
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                free = max(free or 0, available)
    except (OSError, ValueError, IndexError):
        pass
    return free


def overcommit_always():
    """Whether a terabyte allocation may 'succeed' and only fail (the process killed) once its
    pages are touched: Linux with vm.overcommit_memory = 1, and macOS, which reserves address
    space lazily. Windows commits memory up front and refuses cleanly."""
    if sys.platform == "darwin":
        return True
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# A mask of 2**32 + 5 elements
# ---------------------------------------------------------------------------------------------

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _kept_bits(packed, chunk=2**26):
    total = 0
    for start in range(0, packed.size, chunk):
        total += int(_POPCOUNT[packed[start : start + chunk]].sum(dtype=np.int64))
    return total


@pytest.mark.slow
def test_packed_mask_of_more_than_2_32_elements():
    free = free_memory()
    if free is not None and free < NEED_FREE:
        pytest.skip(
            f"needs about {NEED_FREE / GiB:.0f} GB of free memory for a 512 MB mask and its "
            f"checks; {free / GiB:.2f} GB free"
        )
    p, seed = 0.3, 0x0123456789ABCDEF
    offset = U64 - 3 * 2**30 + 2  # offset + i wraps past 2**64 at i = 3 * 2**30 - 2
    packed = fd.dropout_mask((N_BIG,), p, seed=seed, offset=offset, packed=True)
    assert packed.dtype == np.uint8
    assert packed.shape == ((N_BIG + 7) // 8,) == (2**29 + 1,)

    wrap = U64 - offset
    tail = (N_BIG - 1000) // 8 * 8  # a multiple of 8 elements: whole bytes line up
    starts = [0, 2**31 - 512, (wrap - 512) // 8 * 8, 2**32 - 512, tail]
    rng = np.random.default_rng(2024)
    starts += [int(s) // 8 * 8 for s in rng.integers(0, N_BIG - 1024, size=32)]
    for start in starts:
        count = min(1024, N_BIG - start)
        want = ref.dropout_mask((count,), p, seed=seed, offset=(offset + start) % U64, packed=True)
        got = packed[start // 8 : start // 8 + want.size]
        assert got.size == want.size
        try:
            assert_bits_equal(got, want)
        except AssertionError as exc:
            raise AssertionError(f"bytes of elements [{start}, {start + count}): {exc}") from None
    # The last byte holds elements 2**32 .. 2**32 + 4: its top 3 bits are padding, 0.
    assert packed[-1] >> 5 == 0

    # Every block was written: the number of kept elements is what the threshold predicts
    # (P(keep) = 1 - t / 2**32; 12 standard deviations is ~400k elements).
    keep = 1.0 - ref.threshold(p) / 2**32
    expected = keep * N_BIG
    sd = (N_BIG * keep * (1.0 - keep)) ** 0.5
    kept = _kept_bits(packed)
    assert abs(kept - expected) < 12 * sd, (kept, expected)


# ---------------------------------------------------------------------------------------------
# Offsets beyond 2**32 on small arrays
# ---------------------------------------------------------------------------------------------

BIG_OFFSETS = [
    2**32, 2**32 + 13, 2**33 - 3, 2**34 - 6, 2**34, 2**40 + 1, 2**62 + 6, 2**63 - 2, 2**63 + 5,
    U64 - 997, U64 - 21, U64 - 4, U64 - 1,
]  # fmt: skip


@pytest.mark.parametrize("offset", BIG_OFFSETS)
def test_offsets_beyond_2_32(backend, offset):
    seed = 0xDEADBEEF12345678
    for dtype in (np.float32, np.float64):
        x = sample_values(1001, dtype, seed=offset % 1000)
        want = ref.dropout(x, 0.4, seed=seed, offset=offset)
        assert_bits_equal(fd.dropout(x, 0.4, seed=seed, offset=offset), want)
        assert_bits_equal(fd.dropout_backward(x, 0.4, seed=seed, offset=offset), want)
        out = np.full(x.shape, -1.0, dtype)[::-1]
        fd.dropout(x, 0.4, seed=seed, offset=offset, out=out)
        assert_bits_equal(out, want)
    for packed in (False, True):
        assert_bits_equal(
            fd.dropout_mask((7, 143), 0.4, seed=seed, offset=offset, packed=packed),
            ref.dropout_mask((7, 143), 0.4, seed=seed, offset=offset, packed=packed),
        )
    # A generator positioned there hands out the same words.
    g = fd.Generator(seed)
    g.set_state({"seed": seed, "offset": offset})
    x = sample_values(1001, np.float32, seed=1)
    want = ref.dropout(x, 0.4, seed=seed, offset=offset)
    assert_bits_equal(fd.dropout(x, 0.4, generator=g), want)
    assert g.offset == (offset + 1004) % U64


@pytest.mark.parametrize("offset", [2**32 + 13, 2**34 - 6, 2**63 + 5, U64 - 21])
def test_dense_offsets_beyond_2_32(backend, offset):
    # Identity weights expose the mask the fused layer applied, exactly.
    seed = 77
    x = np.random.default_rng(3).standard_normal((40, 32)).astype(np.float32)
    eye = np.eye(32, dtype=np.float32)
    want = ref.dropout(x, 0.3, seed=seed, offset=offset)
    assert_bits_equal(fd.dropout_dense(x, eye, None, 0.3, seed=seed, offset=offset), want)
    ones = np.ones((40, 32), np.float32)
    grad_x, grad_w, _ = fd.dropout_dense_backward(ones, x, eye, 0.3, seed=seed, offset=offset)
    keep = ref.dropout_mask(x.shape, 0.3, seed=seed, offset=offset)
    scale = ref.dropout_scale(0.3, np.float32)
    assert_bits_equal(grad_x, np.where(keep, scale, np.float32(0.0)).astype(np.float32))
    # grad_weight[i, j] = sum over rows of dropout(x)[:, j], the same for every i
    np.testing.assert_allclose(grad_w, np.tile(want.sum(axis=0), (32, 1)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sizes that overflow 32 bits and do not fit in memory; sizes of 2**62 elements and more
# ---------------------------------------------------------------------------------------------

# Element counts beyond 2**31 and 2**32; the arrays would need terabytes.
TOO_BIG_FOR_MEMORY = [(2**20, 2**20, 8), (2**16, 2**16, 2**10), (3, 2**41 + 1)]
# Bigger than any address space (2**57 bytes and more): refused under any overcommit policy.
BEYOND_ADDRESS_SPACE = [(2**20, 2**20, 2**17), (2**31, 2**30), (2**61,)]


OVERCOMMIT_REASON = "memory is overcommitted here: a terabyte array would 'succeed', then be killed"


def _clean_failure(thunk):
    with pytest.raises((MemoryError, ValueError)) as info:
        thunk()
    assert str(info.value) or isinstance(info.value, MemoryError)


@pytest.mark.parametrize("shape", BEYOND_ADDRESS_SPACE + TOO_BIG_FOR_MEMORY, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
def test_mask_too_big_for_memory_is_a_clean_error(shape, packed):
    if shape in TOO_BIG_FOR_MEMORY and overcommit_always():
        pytest.skip(OVERCOMMIT_REASON)
    _clean_failure(lambda: fd.dropout_mask(shape, 0.5, seed=1, packed=packed))


@pytest.mark.parametrize("shape", TOO_BIG_FOR_MEMORY, ids=str)
def test_zero_stride_input_too_big_for_memory_is_a_clean_error(shape):
    # A broadcast view of 4 bytes whose C-contiguous result would need terabytes.
    if overcommit_always():
        pytest.skip(OVERCOMMIT_REASON)
    x = np.broadcast_to(np.float32(1.0), shape)
    _clean_failure(lambda: fd.dropout(x, 0.5, seed=1))
    _clean_failure(lambda: fd.dropout(x, 0.5, seed=1, training=False))
    _clean_failure(lambda: fd.dropout_backward(x, 0.5, seed=1))
    if shape[-1] <= 2**20:  # (a weight matrix for a wider x would not fit either)
        w = np.ones((3, shape[-1]), np.float32)
        _clean_failure(lambda: fd.dropout_dense(x, w, None, 0.5, seed=1))
        _clean_failure(lambda: fd.dense(x, w))


NOT_ADDRESSABLE = [
    (2**62,),
    (2**62 + 1,),
    (2**61, 2),
    (2**31, 2**31),
    (2**21, 2**21, 2**20),
    (3, 2**61 - 1 + 2**60),
    (2**64,),
    (2**100,),
    (2**32, 2**32, 2**32),
    (2**40, 2**40, 1),
    # NumPy integer sides whose NumPy product wraps around to 0 (or to something small):
    (np.int64(2**32), np.int64(2**32)),
    (np.uint64(2**63), np.uint64(2)),
    (np.int64(2**62), np.int64(4), np.int64(1)),
]


@pytest.mark.parametrize("shape", NOT_ADDRESSABLE, ids=lambda s: "x".join(str(int(d)) for d in s))
@pytest.mark.parametrize("packed", [False, True], ids=["bool", "packed"])
def test_2_62_elements_or_more_is_a_value_error(shape, packed):
    with pytest.raises(ValueError) as info:
        fd.dropout_mask(shape, 0.5, seed=1, packed=packed)
    assert str(info.value)


def test_element_count_just_below_2_62_is_not_refused_as_too_many():
    # 2**62 - 1 elements is addressable; it fails only for want of memory (MemoryError).
    # Beyond any address space even when packed (2**59 bytes), so it fails cleanly everywhere.
    with pytest.raises(MemoryError):
        fd.dropout_mask((2**62 - 1,), 0.5, seed=1, packed=True)


def test_huge_sides_with_zero_elements():
    # Sides beyond 2**32 are fine when another side is 0: nothing to draw, nothing to allocate.
    for shape in [(2**40, 0), (0, 2**62 - 1), (2**33, 0, 2**20)]:
        mask = fd.dropout_mask(shape, 0.5, seed=1)
        assert mask.shape == shape and mask.dtype == np.bool_
        assert fd.dropout_mask(shape, 0.5, seed=1, packed=True).shape == (0,)
    x = np.zeros((2**40, 0), np.float32)
    assert fd.dropout(x, 0.5, seed=1).shape == (2**40, 0)
    x = np.zeros((2**33, 0, 4), np.float32)  # no rows, a huge leading side
    y = fd.dropout_dense(x, np.ones((3, 4), np.float32), p=0.5, seed=1)
    assert y.shape == (2**33, 0, 3) and y.dtype == np.float32
