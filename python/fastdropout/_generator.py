"""The counter-based generator: a (seed, offset) pair handed out in disjoint ranges."""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Optional, Tuple

from ._checks import check_u64

_U64 = 1 << 64


class Generator:
    """Hands out ``(seed, offset)`` pairs for the Philox stream (the contract's generator).

    Each :meth:`draw` of ``n`` elements returns the current ``(seed, offset)``
    and advances ``offset`` by ``n`` rounded up to a multiple of 4 (modulo
    2**64), so consecutive draws never share a random word.  Thread-safe,
    picklable, and its state can be saved and restored.

    Parameters
    ----------
    seed : int or None
        A 64-bit seed in ``[0, 2**64)``; ``None`` takes one from the operating
        system's entropy source.

    Raises
    ------
    TypeError
        ``seed`` is not an int (or None).
    ValueError
        ``seed`` outside [0, 2**64).

    Examples
    --------
    >>> g = fd.Generator(seed=3)
    >>> g.draw(10), g.draw(1), g.offset
    ((3, 0), (3, 12), 16)
    """

    __slots__ = ("_seed", "_offset", "_lock")

    def __init__(self, seed: Optional[int] = None) -> None:
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._seed = check_u64(seed, "seed")
        self._offset = 0
        self._lock = threading.Lock()

    @property
    def seed(self) -> int:
        """The 64-bit seed (the Philox key)."""
        return self._seed

    @property
    def offset(self) -> int:
        """Index of the next unused random word."""
        return self._offset

    def draw(self, n: int) -> Tuple[int, int]:
        """Reserve ``n`` elements of the stream; returns ``(seed, offset)`` to use for them.

        The offset then advances by ``n`` rounded up to a multiple of 4 (mod 2**64).
        Raises ``TypeError`` for a non-integer ``n``, ``ValueError`` outside [0, 2**64).
        """
        n = check_u64(n, "n")
        step = -(-n // 4) * 4
        with self._lock:
            seed, offset = self._seed, self._offset
            self._offset = (offset + step) % _U64
        return seed, offset

    def manual_seed(self, seed: int) -> "Generator":
        """Reset to ``seed`` with offset 0; returns self (``TypeError``/``ValueError`` as the constructor)."""
        seed = check_u64(seed, "seed")
        with self._lock:
            self._seed, self._offset = seed, 0
        return self

    def get_state(self) -> Dict[str, int]:
        """The state as ``{"seed": int, "offset": int}``."""
        with self._lock:
            return {"seed": self._seed, "offset": self._offset}

    def set_state(self, state: Dict[str, Any]) -> None:
        """Restore a state returned by :meth:`get_state`.

        Raises ``TypeError`` if ``state`` is not a dict (or its values not ints), and
        ``ValueError`` if a key is missing or a value is outside [0, 2**64).
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict with 'seed' and 'offset', got {type(state).__name__}")
        missing = {"seed", "offset"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}; expected keys 'seed' and 'offset'")
        seed = check_u64(state["seed"], "seed")
        offset = check_u64(state["offset"], "offset")
        with self._lock:
            self._seed, self._offset = seed, offset

    def __getstate__(self) -> Dict[str, int]:
        return self.get_state()

    def __setstate__(self, state: Dict[str, int]) -> None:
        self._lock = threading.Lock()
        self._seed, self._offset = 0, 0
        self.set_state(state)

    def __repr__(self) -> str:
        return f"Generator(seed={self._seed}, offset={self._offset})"


default_generator = Generator()


def manual_seed(seed: int) -> Generator:
    """Seed the default generator (used when no ``seed`` is given); returns it.

    Raises ``TypeError`` for a non-integer ``seed`` and ``ValueError`` outside [0, 2**64).
    """
    return default_generator.manual_seed(seed)


def check_stream(seed: Any, offset: Any, generator: Any) -> Tuple[Optional[int], int]:
    """The ``seed``/``offset``/``generator`` arguments of a drawing function, checked before
    anything is drawn: ``(seed or None, offset)``.  ``TypeError`` for non-integers or a
    ``generator`` that is not a :class:`Generator`, ``ValueError`` outside [0, 2**64) or
    for both ``seed`` and ``generator``."""
    offset = check_u64(offset, "offset")
    if seed is not None:
        seed = check_u64(seed, "seed")
    if generator is not None:
        if not isinstance(generator, Generator):
            raise TypeError(f"generator must be a fastdropout.Generator, got {type(generator).__name__}")
        if seed is not None:
            raise ValueError("give either seed (and offset) or generator, not both")
    return seed, offset
