"""Statistical sanity of the mask stream (fixed seeds, so the outcome is deterministic).

Each check allows 5 standard deviations, which a correct generator fails with probability
below 1e-6 per check; a broken lane, counter or key schedule fails it by far more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastdropout as fd

N = 1 << 20


def _mask(p, seed, offset=0, n=N):
    return fd.dropout_mask((n,), p, seed=seed, offset=offset).astype(np.float64)


def _assert_uncorrelated(a, b):
    # Under independence the sample correlation is ~ N(0, 1/n).
    r = np.corrcoef(a, b)[0, 1]
    assert abs(r) < 5 / math.sqrt(a.size), r


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_kept_fraction(backend, p):
    for seed, offset in [(0, 0), (2**64 - 1, 2**64 - N // 3), (12345, 2**32 - 7)]:
        kept = _mask(p, seed, offset).sum()
        sigma = math.sqrt(N * p * (1 - p))
        assert abs(kept - N * (1 - p)) < 5 * sigma, (seed, offset, kept)


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 8])
def test_neighbouring_elements_uncorrelated(backend, lag):
    # Lags 1-3 compare lanes of one Philox block, 4 and 8 the same lane of nearby blocks.
    keep = _mask(0.5, seed=99, offset=1)
    _assert_uncorrelated(keep[:-lag], keep[lag:])


def test_neighbouring_offsets_uncorrelated(backend):
    # offset o + 1 is the stream of offset o shifted by one element (SPEC section 1) ...
    a = _mask(0.5, seed=7, offset=2**34 - 3)
    b = _mask(0.5, seed=7, offset=2**34 - 2)
    np.testing.assert_array_equal(a[1:], b[:-1])
    # ... so element by element the two masks must look independent.
    _assert_uncorrelated(a, b)


@pytest.mark.parametrize("seed_pair", [(0, 1), (2**32 - 1, 2**32), (5, 5 + 2**32)])
def test_neighbouring_seeds_uncorrelated(backend, seed_pair):
    a = _mask(0.5, seed=seed_pair[0], offset=0)
    b = _mask(0.5, seed=seed_pair[1], offset=0)
    _assert_uncorrelated(a, b)


def test_far_blocks_differ(backend):
    # Blocks 2**32 apart differ only in counter word 1.
    a = _mask(0.5, seed=3, offset=0, n=1 << 16)
    b = _mask(0.5, seed=3, offset=2**34, n=1 << 16)
    _assert_uncorrelated(a, b)


def test_every_bit_of_the_words_is_balanced(backend):
    words = fd._core.random_words(N, 31337, 6)
    ones = np.array([((words >> np.uint32(b)) & np.uint32(1)).sum() for b in range(32)])
    assert np.all(np.abs(ones - N / 2) < 5 * math.sqrt(N / 4)), ones


def test_words_are_uniform(backend):
    # Chi-square over 256 buckets of the top byte: mean 255, sd sqrt(510).
    words = fd._core.random_words(N, 2**63 + 5, 2**64 - 1000)
    counts = np.bincount(words >> np.uint32(24), minlength=256)
    expected = N / 256
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert abs(chi2 - 255) < 5 * math.sqrt(510), chi2


def test_threshold_resolution(backend):
    # p = 2**-16 drops 64 of 2**22 elements on average: small p is not rounded away.
    n = 1 << 22
    dropped = n - int(fd.dropout_mask((n,), 2.0**-16, seed=17).sum())
    assert abs(dropped - 64) < 5 * 8, dropped
    assert fd.dropout_mask((n,), 0.0, seed=17).all()
