"""Argument checks shared by the public functions: clear errors before any work."""
from __future__ import annotations

import functools
import math
import os
import numbers
import operator
import sys
from typing import Any, Tuple

import numpy as np

U64 = 1 << 64
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2}


def check_u64(value: Any, name: str) -> int:
    """An integer in [0, 2**64)."""
    if type(value) is int and 0 <= value < U64:  # the everyday call, without the ABC checks
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [0, 2**64), got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if not 0 <= value < U64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def check_flags(**flags: Any) -> None:
    """Each keyword a bool, a NumPy bool, or the integer 1 or 0: a truthy string, None or an
    array is a mistake, not a choice."""
    for name, value in flags.items():
        if type(value) is bool:  # the everyday call, first and cheap
            continue
        if not (isinstance(value, np.bool_) or (isinstance(value, numbers.Integral) and value in (0, 1))):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")


def check_bias_flag(bias: Any) -> bool:
    """A backward's ``bias``: whether the layer has one (a flag, or None for none, as the
    forward's ``bias=None``), not its values."""
    if bias is None:
        return False
    if isinstance(bias, np.ndarray):
        raise TypeError("bias must be True or False (whether the layer has a bias; the backward needs no bias "
                        f"values), got an array of shape {bias.shape}")
    check_flags(bias=bias)
    return bool(bias)


def check_p(p: Any) -> float:
    """A drop probability: a real number in [0, 1]."""
    if type(p) is float and 0.0 <= p <= 1.0:  # the everyday call, without the ABC checks
        return p
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number in [0, 1], got {type(p).__name__} {p!r}")
    try:
        p = float(p)
    except OverflowError:  # a huge int or Fraction: certainly out of range
        raise ValueError(f"p must be in [0, 1], got {p!r:.60}") from None
    if not 0.0 <= p <= 1.0:  # (NaN too; comparisons rather than math.isnan, which torch.compile's
        raise ValueError(f"p must be in [0, 1], got {p}")  # dynamic mode cannot trace on a symbolic p)
    return p


def threshold(p: float) -> int:
    """round_half_even(p * 2**32) (the contract's mask)."""
    return round(p * 4294967296.0)


@functools.lru_cache(maxsize=256)
def scale(p: float, dtype: np.dtype) -> float:
    """1 / (1 - p) in double, rounded once to dtype; inf for p = 1 (never used)."""
    s = math.inf if p == 1.0 else 1.0 / (1.0 - p)
    return float(np.dtype(dtype).type(s))


def _bfloat16():
    """ml_dtypes' bfloat16 once the process has imported ml_dtypes, else None.  Not imported
    here (it took about 1.4 s of CPU time): a bfloat16 array exists only once it is."""
    ml_dtypes = sys.modules.get("ml_dtypes")
    return None if ml_dtypes is None else ml_dtypes.bfloat16


def elementwise_dtypes() -> Tuple[type, ...]:
    """What dropout takes: float32, float64, float16, and bfloat16 once ml_dtypes is imported."""
    bf16 = _bfloat16()
    return (np.float32, np.float64, np.float16) + ((bf16,) if bf16 is not None else ())


def check_float_array(x: Any, name: str, dtypes: Tuple[type, ...] = (np.float32, np.float64)) -> np.ndarray:
    """A NumPy array of one of `dtypes`; lists are converted, other dtypes rejected."""
    if type(x).__module__.split(".")[0] == "torch":
        raise TypeError(
            f"{name} is a torch.Tensor: this is fastdropout's NumPy API, which would lose autograd; "
            "use fastdropout.torch (e.g. fastdropout.torch.dropout, DropoutLinear) for tensors"
        )
    if not isinstance(x, np.ndarray):
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(f"{name} must be a NumPy array or a nested list of numbers, got {type(x).__name__}")
        try:
            converted = np.asarray(x)
        except Exception as exc:  # e.g. ragged nested lists
            raise TypeError(f"{name} must be array-like, got {type(x).__name__}: {exc}") from None
        x, given = converted, type(x).__name__
    else:
        given = None
    if x.dtype.type not in dtypes:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        if given is not None and x.dtype == np.float64 and np.float32 in dtypes:
            raise TypeError(f"{name} must have dtype {want}, got a {given} of Python floats, which NumPy makes "
                            f"float64: pass np.asarray({name}, dtype=np.float32)")
        raise TypeError(f"{name} must have dtype {want}, got {x.dtype}")
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if not x.flags.aligned:  # e.g. a view at an odd byte offset: the kernels need aligned data
        x = x.copy()
    return x


def check_out(out: Any, shape: Tuple[int, ...], dtype: np.dtype, name: str = "out") -> np.ndarray:
    """A writeable array of exactly `shape` and `dtype`."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def check_activation(activation: Any) -> int:
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None, 'relu' or 'gelu', got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
    return ACTIVATIONS[activation]


def check_shape(shape: Any) -> Tuple[int, ...]:
    """A shape: a non-negative int or a sequence of them."""
    if isinstance(shape, (numbers.Integral,)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, got {type(shape).__name__}") from None
    out = []
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
            raise TypeError(f"shape must contain ints, got {type(d).__name__} in {shape!r}")
        d = operator.index(d)
        if d < 0:
            raise ValueError(f"shape must be non-negative, got {dims}")
        out.append(d)
    n = math.prod(out)
    if n >= 1 << 62:
        raise ValueError(f"shape {tuple(out)} has {n} elements, more than this package can address")
    return tuple(out)


# --------------------------------------------------------------------------- command-line arguments


def positive_int_arg(text: str) -> int:
    """argparse type: an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def output_path_arg(text: str) -> str:
    """argparse type: a file to write at the end of a run, whose folder exists now (so that a
    long run does not end in FileNotFoundError)."""
    import argparse

    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist (for {text!r})")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    return text
