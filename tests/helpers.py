"""Small helpers shared by the tests (plain functions, no fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

KAT_FILE = Path(__file__).parent / "data" / "philox4x32_kat.txt"

# Offsets that stress the 64-bit counter: not multiples of 4, around bit 32 of j, around the
# carry from counter word 0 into word 1 (j = 2**34), and the wrap of j at 2**64.
EDGE_OFFSETS = [0, 1, 2, 3, 5, 2**32 - 5, 2**32 + 3, 2**34 - 6, 2**63 - 1, 2**64 - 7, 2**64 - 1]
EDGE_SEEDS = [0, 1, 0x243F6A8885A308D3, 2**32, 2**64 - 1]
P_VALUES = [0.0, 1e-9, 0.1, 0.5, 0.9, 1.0]


def round_up4(n: int) -> int:
    return (n + 3) // 4 * 4


def assert_bits_equal(actual, expected) -> None:
    """Same dtype, same shape and the same bytes element by element (NaN payloads, -0.0)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    as_uint = f"u{actual.dtype.itemsize}"
    a = np.ascontiguousarray(actual).view(as_uint)
    b = np.ascontiguousarray(expected).view(as_uint)
    if not np.array_equal(a, b):
        bad = np.flatnonzero(a.ravel() != b.ravel())
        raise AssertionError(
            f"{bad.size} of {a.size} elements differ; first at flat index {bad[0]}: "
            f"got {actual.ravel()[bad[0]]!r}, expected {expected.ravel()[bad[0]]!r}"
        )


def sample_values(n: int, dtype, seed: int = 0) -> np.ndarray:
    """Normal values with NaN, +-inf, -0.0, +0.0, huge and subnormal ones sprinkled in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(dtype)
    info = np.finfo(dtype)
    specials = np.array(
        [np.nan, np.inf, -np.inf, -0.0, 0.0, info.max, -info.max, info.smallest_subnormal],
        dtype=dtype,
    )
    if n:
        where = rng.integers(0, n, size=min(n, 64))
        x[where] = specials[np.arange(where.size) % specials.size]
    return x


def read_kat():
    """Random123's Philox4x32 known-answer vectors: [(rounds, counter, key, expected)]."""
    vectors = []
    for line in KAT_FILE.read_text().splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        assert fields[0] == "philox4x32", line
        words = [int(w, 16) for w in fields[2:]]
        assert len(words) == 10, line
        vectors.append((int(fields[1]), words[0:4], words[4:6], words[6:10]))
    return vectors
