"""Philox4x32 known-answer tests and the random-word stream of SPEC section 1.

The known-answer vectors in tests/data/philox4x32_kat.txt are Random123's public test data
(kat_vectors); every backend and the NumPy reference must reproduce them bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import EDGE_OFFSETS, EDGE_SEEDS, read_kat

import fastdropout as fd
from fastdropout import reference as ref

KAT = read_kat()
KAT_IDS = [f"r{r}-{i}" for i, (r, *_rest) in enumerate(KAT)]


def test_kat_file_has_both_round_counts():
    assert sorted({r for r, *_ in KAT}) == [7, 10]
    assert len(KAT) >= 6


@pytest.mark.parametrize(("rounds", "counter", "key", "expected"), KAT, ids=KAT_IDS)
def test_reference_kat(rounds, counter, key, expected):
    out = ref.philox4x32(np.array([counter], np.uint32), np.array(key, np.uint32), rounds)
    assert out.dtype == np.uint32
    assert out.tolist() == [expected]


@pytest.mark.parametrize(("rounds", "counter", "key", "expected"), KAT, ids=KAT_IDS)
def test_kernel_kat(backend, rounds, counter, key, expected):
    out = fd._core.philox4x32(np.array([counter], np.uint32), np.array(key, np.uint32), rounds)
    assert out.dtype == np.uint32
    assert out.shape == (1, 4)
    assert out.tolist() == [expected]


@pytest.mark.parametrize(("rounds", "counter", "key", "expected"), KAT, ids=KAT_IDS)
def test_kernel_kat_in_every_simd_lane(backend, rounds, counter, key, expected):
    # The vector sits at every position of a batch whose length is no multiple of the SIMD
    # width, among other counters, so every lane and the scalar tail must get it right.
    n = 37
    rng = np.random.default_rng(rounds)
    batch = rng.integers(0, 2**32, size=(n, 4), dtype=np.uint32)
    key = np.array(key, np.uint32)
    background = ref.philox4x32(batch, key, rounds)
    for position in range(n):
        batch_here = batch.copy()
        batch_here[position] = counter
        want = background.copy()
        want[position] = expected
        np.testing.assert_array_equal(fd._core.philox4x32(batch_here, key, rounds), want)


@pytest.mark.parametrize("rounds", [7, 10])
@pytest.mark.parametrize("n", [0, 1, 3, 8, 15, 16, 17, 64, 1001])
def test_kernel_philox_matches_reference(backend, rounds, n):
    rng = np.random.default_rng(1000 * rounds + n)
    counter = rng.integers(0, 2**32, size=(n, 4), dtype=np.uint32)
    key = rng.integers(0, 2**32, size=2, dtype=np.uint32)
    got = fd._core.philox4x32(counter, key, rounds)
    assert got.dtype == np.uint32
    assert got.shape == (n, 4)
    np.testing.assert_array_equal(got, ref.philox4x32(counter, key, rounds))


def test_reference_rounds_differ():
    counter = np.zeros((1, 4), np.uint32)
    key = np.zeros(2, np.uint32)
    assert not np.array_equal(ref.philox4x32(counter, key, 7), ref.philox4x32(counter, key, 10))


def _words_one_by_one(n, seed, offset):
    """SPEC section 1 written out per element, one Philox call each."""
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
    words = []
    for i in range(n):
        j = (offset + i) % 2**64
        block, lane = j >> 2, j & 3
        counter = np.array([[block & 0xFFFFFFFF, block >> 32, 0, 0]], np.uint32)
        words.append(ref.philox4x32(counter, key, 10)[0, lane])
    return np.array(words, dtype=np.uint32)


@pytest.mark.parametrize("seed", EDGE_SEEDS)
@pytest.mark.parametrize("offset", EDGE_OFFSETS)
def test_reference_random_words_follow_spec(seed, offset):
    n = 11
    np.testing.assert_array_equal(
        ref.random_words(n, seed, offset), _words_one_by_one(n, seed, offset)
    )


def test_reference_random_words_zero_key_counter_is_kat():
    # u_0..u_3 for seed 0, offset 0 are Philox4x32-10((0,0,0,0), (0,0)), the first KAT vector.
    expected = next(e for r, c, k, e in KAT if r == 10 and c == [0] * 4 and k == [0, 0])
    assert ref.random_words(4, 0, 0).tolist() == expected


def test_reference_random_words_wrap_at_2_64():
    # The stream is periodic in j modulo 2**64: words after the wrap are those of offset 0.
    words = ref.random_words(10, 99, 2**64 - 3)
    np.testing.assert_array_equal(words[3:], ref.random_words(7, 99, 0))
    np.testing.assert_array_equal(words[:3], ref.random_words(3, 99, 2**64 - 3))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 16, 17, 31, 33, 1000, 4099])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 6, 2**32 - 3, 2**34 - 5, 2**64 - 9, 2**64 - 1])
def test_kernel_random_words_match_reference(backend, n, offset):
    seed = 0xDEADBEEFCAFEF00D
    got = fd._core.random_words(n, seed, offset)
    assert got.dtype == np.uint32
    assert got.shape == (n,)
    np.testing.assert_array_equal(got, ref.random_words(n, seed, offset))


@pytest.mark.parametrize("seed", EDGE_SEEDS)
def test_kernel_random_words_seeds(backend, seed):
    np.testing.assert_array_equal(
        fd._core.random_words(257, seed, 3), ref.random_words(257, seed, 3)
    )


def test_kernel_random_words_large(backend, threads):
    n, seed, offset = 1_000_003, 2**64 - 1, 2**64 - 500_001
    np.testing.assert_array_equal(
        fd._core.random_words(n, seed, offset), ref.random_words(n, seed, offset)
    )
