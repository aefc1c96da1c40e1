"""fd.Generator (SPEC section 5) and the default generator behind seed=None."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
from helpers import assert_bits_equal, round_up4, sample_values

import fastdropout as fd
from fastdropout import reference as ref


def test_new_generator_state():
    g = fd.Generator(5)
    assert g.seed == 5
    assert g.offset == 0
    assert g.get_state() == {"seed": 5, "offset": 0}


@pytest.mark.parametrize("seed", [0, 1, 2**32, 2**64 - 1])
def test_seed_range(seed):
    assert fd.Generator(seed).seed == seed


def test_draw_rounds_up_to_multiples_of_four():
    g = fd.Generator(7)
    expected_offset = 0
    for n in [1, 4, 5, 0, 3, 8, 1001, 2, 6]:
        assert g.draw(n) == (7, expected_offset)
        expected_offset += round_up4(n)
        assert g.offset == expected_offset
        assert g.seed == 7


def test_draw_returns_ints():
    seed, offset = fd.Generator(2**64 - 1).draw(3)
    assert type(seed) is int and type(offset) is int


def test_draw_wraps_at_2_64():
    g = fd.Generator(1)
    g.set_state({"seed": 1, "offset": 2**64 - 4})
    assert g.draw(8) == (1, 2**64 - 4)
    assert g.offset == 4
    g.set_state({"seed": 1, "offset": 2**64 - 1})
    assert g.draw(1) == (1, 2**64 - 1)
    assert g.offset == 3


def test_consecutive_draws_never_share_a_word():
    g = fd.Generator(3)
    ranges = []
    for n in [1, 2, 3, 4, 5, 17]:
        _, offset = g.draw(n)
        ranges.append((offset, offset + n))
    for (a_start, a_end), (b_start, _) in zip(ranges, ranges[1:]):
        assert a_end <= b_start
        assert b_start == a_start + round_up4(a_end - a_start)


def test_state_round_trip():
    g = fd.Generator(11)
    g.draw(10)
    state = g.get_state()
    assert state == {"seed": 11, "offset": 12}
    first = [g.draw(5) for _ in range(3)]
    g.set_state(state)
    assert [g.draw(5) for _ in range(3)] == first


def test_set_state_changes_seed():
    g = fd.Generator(1)
    g.set_state({"seed": 2**64 - 1, "offset": 6})
    assert (g.seed, g.offset) == (2**64 - 1, 6)
    assert g.draw(1) == (2**64 - 1, 6)


def test_get_state_is_a_snapshot():
    g = fd.Generator(1)
    state = g.get_state()
    g.draw(4)
    assert state == {"seed": 1, "offset": 0}
    state["offset"] = 100
    assert g.offset == 4


@pytest.mark.parametrize(
    "state",
    [
        {"seed": -1, "offset": 0},
        {"seed": 2**64, "offset": 0},
        {"seed": 0, "offset": 2**64},
        {"seed": 0, "offset": -4},
    ],
)
def test_set_state_rejects_out_of_range(state):
    g = fd.Generator(9)
    g.draw(4)
    with pytest.raises(ValueError):
        g.set_state(state)
    assert g.get_state() == {"seed": 9, "offset": 4}


@pytest.mark.parametrize("state", [{"seed": 1.5, "offset": 0}, {"seed": 1, "offset": "0"}, None, 5])
def test_set_state_rejects_wrong_types(state):
    g = fd.Generator(9)
    with pytest.raises(TypeError):
        g.set_state(state)
    assert g.get_state() == {"seed": 9, "offset": 0}


def test_set_state_rejects_missing_keys():
    g = fd.Generator(9)
    with pytest.raises((KeyError, ValueError)):
        g.set_state({"seed": 1})
    assert g.get_state() == {"seed": 9, "offset": 0}


@pytest.mark.parametrize("n", [-1, -4])
def test_draw_rejects_negative(n):
    g = fd.Generator(1)
    with pytest.raises(ValueError):
        g.draw(n)
    assert g.offset == 0


def test_pickle_and_copy():
    g = fd.Generator(2**64 - 3)
    g.draw(13)
    clones = [lambda: pickle.loads(pickle.dumps(g)), lambda: copy.deepcopy(g), lambda: copy.copy(g)]
    for make_clone in clones:
        clone = make_clone()
        assert isinstance(clone, fd.Generator)
        assert clone.get_state() == g.get_state()
        assert clone.draw(3) == g.draw(3)  # same stream ...
        clone.draw(100)
        assert clone.offset != g.offset  # ... but independent state


def test_seed_none_draws_from_the_os():
    seeds = {fd.Generator(None).seed for _ in range(4)} | {fd.Generator().seed for _ in range(4)}
    for seed in seeds:
        assert type(seed) is int
        assert 0 <= seed < 2**64
    assert len(seeds) > 1  # eight 64-bit OS seeds colliding is not a realistic event
    assert fd.Generator().offset == 0


def test_threads_never_get_overlapping_ranges():
    g = fd.Generator(42)
    n_threads, draws_per_thread = 8, 500
    results = [[] for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)

    def worker(k):
        sizes = np.random.default_rng(k).integers(0, 50, size=draws_per_thread)
        barrier.wait()
        for n in sizes.tolist():
            seed, offset = g.draw(n)
            results[k].append((seed, offset, round_up4(n)))

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    draws = sorted(d for r in results for d in r)
    assert len(draws) == n_threads * draws_per_thread
    assert {seed for seed, _, _ in draws} == {42}
    position = 0
    for _, offset, length in draws:
        if length == 0:
            assert offset <= position
            continue
        assert offset == position  # no gap, no overlap: the ranges tile [0, total)
        position += length
    assert g.offset == position


# ---------------------------------------------------------------------------------------------
# seed=None in fd.dropout: the generator= argument and the default generator
# ---------------------------------------------------------------------------------------------


def test_dropout_draws_from_given_generator(backend):
    x = sample_values(10, np.float32, seed=1)
    g = fd.Generator(123)
    a = fd.dropout(x, 0.5, generator=g)
    assert g.offset == 12
    b = fd.dropout(x, 0.5, generator=g)
    assert g.offset == 24
    assert_bits_equal(a, ref.dropout(x, 0.5, seed=123, offset=0))
    assert_bits_equal(b, ref.dropout(x, 0.5, seed=123, offset=12))


def test_offset_is_ignored_when_drawing(backend):
    x = sample_values(8, np.float64, seed=2)
    g = fd.Generator(5)
    y = fd.dropout(x, 0.5, offset=1000, generator=g)
    assert_bits_equal(y, ref.dropout(x, 0.5, seed=5, offset=0))
    assert g.offset == 8


def test_seed_and_generator_together_is_an_error():
    # Ambiguous: which stream did the caller mean? Refused, and nothing is drawn.
    g = fd.Generator(5)
    with pytest.raises(ValueError, match="generator"):
        fd.dropout(np.ones(100, np.float32), 0.5, seed=9, offset=4, generator=g)
    assert g.offset == 0


def test_explicit_seed_does_not_draw_from_the_default_generator(backend):
    x = np.ones(100, np.float32)
    fd.manual_seed(31)
    assert_bits_equal(fd.dropout(x, 0.5, seed=9, offset=4), ref.dropout(x, 0.5, seed=9, offset=4))
    assert_bits_equal(fd.dropout(x, 0.5), ref.dropout(x, 0.5, seed=31, offset=0))


def test_eval_mode_draws_nothing(backend):
    g = fd.Generator(5)
    x = np.ones(100, np.float32)
    assert_bits_equal(fd.dropout(x, 0.5, generator=g, training=False), x)
    assert g.offset == 0


def test_manual_seed_reproducibility(backend):
    x = sample_values(1001, np.float32, seed=3)
    fd.manual_seed(2024)
    a = fd.dropout(x, 0.5)
    b = fd.dropout(x, 0.5)
    assert not np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert_bits_equal(a, ref.dropout(x, 0.5, seed=2024, offset=0))
    assert_bits_equal(b, ref.dropout(x, 0.5, seed=2024, offset=round_up4(x.size)))

    fd.manual_seed(2024)
    assert_bits_equal(fd.dropout(x, 0.5), a)
    assert_bits_equal(fd.dropout(x, 0.5), b)

    fd.manual_seed(2025)
    assert not np.array_equal(fd.dropout(x, 0.5).view(np.uint32), a.view(np.uint32))


def test_manual_seed_matches_an_explicit_generator(backend):
    x = np.ones(64, np.float64)
    fd.manual_seed(7)
    g = fd.Generator(7)
    assert_bits_equal(fd.dropout(x, 0.5, generator=g), fd.dropout(x, 0.5))
    assert g.offset == 64


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_manual_seed_rejects_out_of_range(seed):
    with pytest.raises(ValueError):
        fd.manual_seed(seed)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_generator_rejects_out_of_range(seed):
    with pytest.raises(ValueError):
        fd.Generator(seed)


@pytest.mark.parametrize("seed", [1.0, "1", [1]])
def test_generator_rejects_wrong_types(seed):
    with pytest.raises(TypeError):
        fd.Generator(seed)
