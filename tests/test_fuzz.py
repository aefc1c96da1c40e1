"""Fuzzing every public function (issue 6, hardening).

Hypothesis drives ``fd.dropout``, ``fd.dropout_backward``, ``fd.dropout_mask``, ``fd.dense``,
``fd.dropout_dense`` and ``fd.dropout_dense_backward`` (and, where it shares their signature,
``fd.reference``; also ``fd.Generator``, ``fd.manual_seed`` and ``fd.set_num_threads``, with
their own small tests) with random shapes (0-d to 4-d, empty, empty with huge dimensions, "huge but
cheap" zero-stride views), dtypes (bool, ints, float16, float32, float64, byte-swapped floats,
long double, complex, object, structured, str, datetime), layouts (C, Fortran, transposed,
sliced with positive, negative and zero strides, misaligned, nested lists, scalars), ``out=``
arrays (fresh, the input itself, a second view of the input, partial overlaps, strided,
misaligned, read-only, broadcast, wrong dtype, byte-swapped, wrong shape, not an array) and
p / seed / offset values at and beyond their limits (negative, 2**64 - 1, 2**64, huge ints,
NaN, inf, -0.0, bools, floats, NumPy scalars, fractions, decimals, strings, None).

Every call must

* either succeed with exactly the reference's answer (bit for bit for dropout and masks; within
  the error of a float32 GEMM for the dense functions, see ``assert_gemm_close``),
* or raise ``TypeError`` / ``ValueError`` with a message, having written nothing: ``out`` and
  every array that shares memory with it or with the input keep their bytes, and neither the
  default generator nor the one passed in has advanced.

Nothing may crash and no other exception type may escape. Which of the two outcomes a call must
have is predicted by a small model of SPEC section 6 written here (``Expect``), independent of
the implementation: ``must`` holds errors the call has to raise (any one of them), ``may`` the
errors it is allowed to raise instead of succeeding (documented latitude, e.g. float16 input,
byte-swapped ``out``, a generator passed in evaluation mode).

Example counts: ``DEFAULT_EXAMPLES`` per test and backend by default (random, as hypothesis
does); with ``FASTDROPOUT_FUZZ_EXAMPLES=N`` in the environment (``--fuzz-examples N`` once
conftest wires the option) every fuzz test runs N examples per backend from the fixed
hypothesis seed ``FASTDROPOUT_FUZZ_SEED`` (default 20240606) without the example database, so
the long run is reproducible. ``CASES`` counts the public calls made;
``test_zz_report_fuzz_case_count`` prints the count at the end of the module (``summary_line``).

Dense results are also re-run with another thread count and must be bit-identical, and NaN/inf
are planted in elements the mask drops (a select, not a multiply, must ignore them).
"""

from __future__ import annotations

import collections
import math
import numbers
import os
import pickle
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from helpers import assert_bits_equal, round_up4, sample_values
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import fastdropout as fd
from fastdropout import reference as ref

U64 = 2**64

# ---------------------------------------------------------------------------------------------
# Example counts and the case counter
# ---------------------------------------------------------------------------------------------

DEFAULT_EXAMPLES = 250


def _long_run_examples():
    raw = os.environ.get("FASTDROPOUT_FUZZ_EXAMPLES", "").strip()
    if not raw:
        return None
    n = int(raw)
    if n < 1:
        raise ValueError(f"FASTDROPOUT_FUZZ_EXAMPLES must be a positive int, got {raw!r}")
    return n


LONG_RUN_EXAMPLES = _long_run_examples()
FUZZ_SEED = int(os.environ.get("FASTDROPOUT_FUZZ_SEED", "20240606"))

# Public calls made by this module, by function name (fd.* calls; reference calls are
# counted under "reference.*").
CASES: collections.Counter = collections.Counter()
# How the fuzzed calls (those made through `call`) ended: "checked" (result compared with the
# reference) or "raised" (a predicted TypeError/ValueError, nothing written).
OUTCOMES: collections.Counter = collections.Counter()

_HEALTH = [
    HealthCheck.function_scoped_fixture,  # `backend` only selects a kernel table
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.large_base_example,
]


def fuzz(weight=1.0):
    """Hypothesis settings for a fuzz test: ``weight * DEFAULT_EXAMPLES`` examples per backend,
    or the seeded long run when FASTDROPOUT_FUZZ_EXAMPLES is set."""

    def decorate(test):
        if LONG_RUN_EXAMPLES is None:
            n = max(1, int(DEFAULT_EXAMPLES * weight))
            return settings(max_examples=n, deadline=None, suppress_health_check=_HEALTH)(test)
        configured = settings(
            max_examples=LONG_RUN_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=_HEALTH,
        )(test)
        return hypothesis_seed(FUZZ_SEED)(configured)

    return decorate


# ---------------------------------------------------------------------------------------------
# Argument values at and beyond their limits
# ---------------------------------------------------------------------------------------------

NAN = math.nan
INF = math.inf

P_VALID = [
    0.0, -0.0, 1.0, 0.5, 0.1, 0.9, 1e-300, 5e-324, 2.0**-32, 2.0**-33, 2.5 * 2.0**-32,
    3.5 * 2.0**-32, 1.0 - 2.0**-53, 1.0 - 2.0**-32, 1.0 - 2.5 * 2.0**-32, 0, 1,
    np.float32(0.25), np.float16(0.5), np.float64(0.75), np.longdouble(0.125), np.int64(1),
    np.uint8(0), Fraction(1, 3),
]  # fmt: skip
P_INVALID = [
    -1e-300, -5e-324, 1.0 + 2.0**-52, NAN, INF, -INF, 2, -1, 1.5, np.float64(NAN),
    np.float32(1.5), np.int8(-1), 10**400, -(10**400), Fraction(10**400, 3), True, False,
    np.bool_(True), None, "0.5", b"0.5", 0.5j, np.complex64(0.5), [0.5], (0.5,), np.array(0.5),
    np.array([0.5]), Decimal("0.5"), object(),
]  # fmt: skip
PROBABILITIES = st.one_of(
    st.sampled_from(P_VALID), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.sampled_from(P_INVALID)
)
VALID_PROBABILITIES = st.one_of(st.sampled_from(P_VALID), st.floats(0.0, 1.0))

U64_VALID = [
    0, 1, 2, 3, 4, 5, 2**31 - 1, 2**31, 2**32 - 5, 2**32 - 1, 2**32, 2**32 + 3, 2**34 - 6,
    2**62, 2**63 - 1, 2**63, 2**64 - 7, 2**64 - 4, 2**64 - 2, 2**64 - 1, np.uint64(2**64 - 1),
    np.int64(2**63 - 1), np.uint32(7), np.int8(5), np.uint8(255), np.intp(12345),
]  # fmt: skip
U64_INVALID = [
    -1, -(2**63), 2**64, 2**64 + 1, 2**100, 10**400, -(10**400), np.int16(-1), np.int64(-5),
    1.0, 0.0, -0.0, 2.0**64, NAN, INF, True, False, np.bool_(False), "1", b"1", 1j,
    Fraction(4, 1), Decimal(4), np.array(3), np.float64(3.0), [1], object(),
]  # fmt: skip
U64_VALUES = st.one_of(
    st.sampled_from(U64_VALID),
    st.integers(0, U64 - 1),
    st.integers(U64 - 300, U64 - 1),
    st.sampled_from(U64_INVALID),
)
VALID_U64 = st.one_of(st.sampled_from(U64_VALID), st.integers(0, U64 - 1))
SEEDS = st.one_of(U64_VALUES, st.none())  # None: a required seed missing / use a generator
VALID_SEEDS = st.one_of(VALID_U64, st.none())
TRUTHY = st.sampled_from([True, False, 1, 0, np.bool_(True), np.bool_(False)])
VALID_ACTIVATIONS = st.sampled_from([None, "relu", "gelu"])
ACTIVATIONS = st.one_of(
    st.sampled_from([None, "relu", "gelu"]),
    st.sampled_from([None, "relu", "gelu"]),
    st.sampled_from(["tanh", "RELU", "", "gelu ", b"relu", 1, 2, 0, 1.0, ["relu"], object()]),
)

# ---------------------------------------------------------------------------------------------
# The outcome model (SPEC section 6)
# ---------------------------------------------------------------------------------------------


class Expect:
    """``must``: the call has to raise one of these; ``may``: it may raise these instead of
    succeeding. A raised error must be an instance of ``must | may``."""

    def __init__(self):
        self.must = set()
        self.may = set()
        self.notes = []

    def error(self, note, *types):
        self.must.update(types)
        self.notes.append(note)

    def maybe(self, note, *types):
        self.may.update(types)
        self.notes.append(f"(maybe) {note}")

    def __repr__(self):
        must = sorted(t.__name__ for t in self.must)
        may = sorted(t.__name__ for t in self.may)
        return f"Expect(must={must}, may={may}, notes={self.notes})"


def expect_p(e, p):
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        e.error(f"p of type {type(p).__name__}", TypeError)
        return
    try:
        value = float(p)
    except OverflowError:  # a real number far outside [0, 1]
        e.error(f"p = {p!r} out of range", ValueError)
        return
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        e.error(f"p = {p!r} out of range", ValueError)


def u64_errors(value):
    """The error types a 64-bit seed/offset value must get (empty when valid)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return {TypeError}
    if not 0 <= int(value) < U64:
        return {ValueError}
    return set()


def expect_u64(e, value, name, *, optional=False):
    errors = u64_errors(value)
    if errors:
        (e.maybe if optional else e.error)(f"{name} = {value!r}", *errors)


def expect_array(e, x, name, ok, maybe=()):
    """Model of 'a NumPy array (or array-like) of one of the dtypes `ok`'. Returns the array
    the function would see, or None when it cannot be one."""
    if isinstance(x, np.ndarray):
        a = x
    elif x is None or isinstance(x, (str, bytes)):
        e.error(f"{name} is {type(x).__name__}", TypeError)
        return None
    else:
        try:
            a = np.asarray(x)
        except (TypeError, ValueError):  # ragged nested sequences
            e.error(f"{name} is not array-like", TypeError, ValueError)
            return None
    if a.dtype.type in ok:
        pass
    elif a.dtype.type in maybe:
        e.maybe(f"{name} has dtype {a.dtype}", TypeError)
    else:
        e.error(f"{name} has dtype {a.dtype}", TypeError)
    return a


def expect_out(e, out, shape, dtype):
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        e.error(f"out is {type(out).__name__}", TypeError)
        return
    if dtype is not None and out.dtype != dtype:
        if out.dtype.newbyteorder("=") == dtype:
            e.maybe(f"out has the byte-swapped dtype {out.dtype.str}", TypeError)
        else:
            e.error(f"out has dtype {out.dtype}, not {dtype}", TypeError)
    if shape is not None and out.shape != tuple(shape):
        e.error(f"out has shape {out.shape}, not {shape}", ValueError)
    if not out.flags.writeable:
        e.error("out is read-only", ValueError)


def expect_activation(e, activation):
    if activation is None or activation in ("relu", "gelu"):
        return
    if isinstance(activation, str):
        e.error(f"activation {activation!r}", ValueError)
    else:  # TypeError is the natural answer; a ValueError ('not one of ...') is also fine
        e.error(f"activation of type {type(activation).__name__}", TypeError, ValueError)


def expect_shape(e, shape):
    """Model of dropout_mask's shape argument. Returns (dims or None, too_big)."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, (bool, np.bool_)):
        dims = (shape,)
    else:
        try:
            dims = tuple(shape)
        except TypeError:
            e.error(f"shape of type {type(shape).__name__}", TypeError)
            return None, False
    bad = False
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
            e.error(f"dimension {d!r} of type {type(d).__name__}", TypeError)
            bad = True
        elif int(d) < 0:
            e.error(f"negative dimension {d}", ValueError)
            bad = True
    if bad:
        return None, False
    dims = tuple(int(d) for d in dims)
    n = math.prod(dims)
    too_big = n >= 2**62
    if too_big:
        e.error(f"{n} elements", ValueError)
    if any(d >= 2**63 for d in dims):  # NumPy cannot even make an empty array like that
        e.maybe("a dimension beyond intp", ValueError)
    return dims, too_big


# ---------------------------------------------------------------------------------------------
# Calling: the outcome, nothing written on error, no generator advanced
# ---------------------------------------------------------------------------------------------


def _snapshot(a):
    return None if a is None else (a.shape, a.tobytes())


def _same_bytes(a, snap):
    return snap is None or (a.shape, a.tobytes()) == snap


class Watch:
    """Arrays whose bytes and generators whose state a failing call must leave alone."""

    def __init__(self, arrays, generators):
        self.arrays = [a for a in arrays if isinstance(a, np.ndarray)]
        self.generators = [g for g in generators if isinstance(g, fd.Generator)]
        if not any(g is fd.default_generator for g in self.generators):
            self.generators.append(fd.default_generator)
        self.before = [_snapshot(a) for a in self.arrays]
        self.states = [g.get_state() for g in self.generators]

    def assert_untouched(self, what):
        for a, snap in zip(self.arrays, self.before):
            assert _same_bytes(a, snap), f"{what}: an array was written before the error"
        for g, state in zip(self.generators, self.states):
            assert g.get_state() == state, f"{what}: a generator advanced before the error"


def call(name, thunk, expect, watch):
    """Run one public call. Returns (True, result) or (False, exception)."""
    CASES[name] += 1
    try:
        result = thunk()
    except (TypeError, ValueError) as exc:
        allowed = expect.must | expect.may
        assert allowed, f"{name} raised {type(exc).__name__}: {exc} for valid input ({expect})"
        assert isinstance(exc, tuple(allowed)), (
            f"{name} raised {type(exc).__name__}: {exc}; expected one of {expect}"
        )
        assert str(exc), f"{name} raised {type(exc).__name__} without a message"
        watch.assert_untouched(name)
        OUTCOMES["raised"] += 1
        return False, exc
    except Exception as exc:  # noqa: BLE001 - anything else is a bug, reported as one
        raise AssertionError(
            f"{name} raised {type(exc).__name__} (neither TypeError nor ValueError): {exc}; "
            f"{expect}"
        ) from exc
    assert not expect.must, f"{name} succeeded but should have raised: {expect}"
    OUTCOMES["checked"] += 1
    return True, result


def call_reference(name, thunk, expect=None):
    """The oracle: must succeed when fastdropout did, and fail only with TypeError/ValueError."""
    CASES["reference." + name] += 1
    try:
        return thunk()
    except (TypeError, ValueError) as exc:
        if expect is None:
            raise AssertionError(
                f"reference.{name} rejected input fastdropout accepted: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return exc
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(
            f"reference.{name} raised {type(exc).__name__} (neither TypeError nor ValueError): "
            f"{exc}"
        ) from exc


class Threads:
    """Set the kernels' thread count for one example, restore it afterwards."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.previous = fd.get_num_threads()
        if self.n is not None:
            fd.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        fd.set_num_threads(self.previous)


class DefaultGeneratorKept:
    """Restore the default generator's state after an example that may have used it."""

    def __enter__(self):
        self.state = fd.default_generator.get_state()

    def __exit__(self, *exc):
        fd.default_generator.set_state(self.state)


# ---------------------------------------------------------------------------------------------
# Arrays: values, dtypes and layouts
# ---------------------------------------------------------------------------------------------

STRUCT = np.dtype([("a", "<f4"), ("b", "<i4")])
STRUCT_F4 = np.dtype([("a", "<f4")])  # looks like float32, is not
FLOAT_DTYPES = [np.dtype("float32"), np.dtype("float64")]
X_DTYPES = (
    FLOAT_DTYPES * 8
    + [np.dtype(">f4"), np.dtype(">f8"), np.dtype("float16")] * 2
    + [np.dtype(d) for d in ["bool", "int8", "int32", "int64", "uint8", "uint64"]]
    + [np.dtype(d) for d in ["complex64", "complex128", "object", "longdouble", "U3", "M8[s]"]]
    + [np.dtype("m8[s]"), STRUCT, STRUCT_F4]
)
VALID_X_DTYPES = FLOAT_DTYPES * 4 + [np.dtype(">f4"), np.dtype(">f8")]
VALID_DENSE_DTYPES = [np.dtype("float32")] * 8 + [np.dtype(">f4")]
DENSE_DTYPES = (
    [np.dtype("float32")] * 16
    + [np.dtype(">f4")] * 2
    + [np.dtype(d) for d in ["float64", "float16", "int32", "bool", "complex64", "object"]]
    + [STRUCT_F4]
)
SIDES = st.one_of(
    st.integers(0, 6),
    st.integers(0, 6),
    st.sampled_from([1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65, 129]),
)
HUGE_DIMS = [2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**50]  # with a 0 elsewhere: empty


def values(shape, dtype, seed):
    """Values of `dtype` (NaN, inf, -0.0, subnormals among the floats)."""
    dtype = np.dtype(dtype)
    n = math.prod(shape)
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        flat = sample_values(n, dtype.newbyteorder("="), seed=seed).astype(dtype)
    elif dtype.kind == "c":
        flat = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype)
    elif dtype.kind == "b":
        flat = rng.integers(0, 2, n).astype(dtype)
    elif dtype.kind == "i":
        flat = rng.integers(-50, 50, n).astype(dtype)
    elif dtype.kind == "u":
        flat = rng.integers(0, 100, n).astype(dtype)
    elif dtype.kind == "O":
        flat = np.empty(n, dtype)
        flat[:] = [float(v) for v in rng.standard_normal(n)]
    elif dtype.kind in "mM":
        flat = np.arange(n).astype(dtype)
    elif dtype.kind == "U":
        flat = np.full(n, "ab", dtype)
    else:
        flat = np.zeros(n, dtype)
    return flat.reshape(shape)


def filled(shape, dtype):
    """A sentinel-filled array."""
    a = np.zeros(shape, dtype)
    kind = a.dtype.kind
    if kind in "fcO":
        a[...] = -777.0
    elif kind == "i":
        a[...] = -77
    elif kind == "u":
        a[...] = 77
    elif kind == "b":
        a[...] = True
    return a


class Buf:
    """An array given as a view of a backing array that owns the memory: ``view(backing)``.

    The view can be re-applied to a copy of the backing, which is how the tests build the
    bytes a call must leave behind: the backing as it was, with the view's elements replaced
    by the expected result.
    """

    def __init__(self, backing, view=None, obj=None):
        self.backing = backing
        self.view = view if view is not None else (lambda b: b)
        self.obj = obj  # a non-array stand-in (list, scalar), else None

    def make(self):
        return self.obj if self.backing is None else self.view(self.backing)

    def expected_backing(self, before, expected):
        copy = np.array(before, copy=True)
        self.view(copy)[...] = expected
        return copy


def _reversed_axes(steps):
    return tuple(slice(None, None, -1) if s < 0 else slice(None) for s in steps) + (Ellipsis,)


LAYOUTS = ["c", "c", "c", "f", "strided", "strided", "transposed", "broadcast", "unaligned"]


def build(draw, shape, content, layout):
    """A Buf whose view has `shape` and the values of `content` (an array of that shape)."""
    dtype = content.dtype
    n = content.size
    if layout == "unaligned" and dtype.hasobject:
        layout = "c"
    if layout == "c":
        return Buf(np.array(content, copy=True))
    if layout == "f":
        return Buf(np.asfortranarray(content))
    if layout == "strided":
        steps = [draw(st.sampled_from([1, 1, 2, 3, -1, -2]), label="steps") for _ in shape]
        pads = [draw(st.integers(0, 1), label="pads") for _ in shape]
        bshape = tuple(p + abs(s) * d + 1 if d else 0 for p, s, d in zip(pads, steps, shape))
        backing = filled(bshape, dtype)
        cut = tuple(slice(p, p + abs(s) * d, abs(s)) for p, s, d in zip(pads, steps, shape))

        def view(b, cut=cut + (Ellipsis,), flip=_reversed_axes(steps)):
            return b[cut][flip]

        view(backing)[...] = content
        return Buf(backing, view)
    if layout == "transposed":
        perm = draw(st.permutations(range(len(shape))), label="perm")
        backing = np.array(content.transpose(perm), order="C", copy=True)
        inverse = tuple(int(i) for i in np.argsort(perm))
        return Buf(backing, lambda b, inverse=inverse: b.transpose(inverse))
    if layout == "broadcast":
        axes = [draw(st.booleans(), label="broadcast axis") for _ in shape]
        cut = tuple(slice(0, min(1, d)) if a else slice(None) for a, d in zip(axes, shape))
        small = np.array(content[cut + (Ellipsis,)], copy=True)
        if 0 in small.shape and 0 not in shape:  # cannot broadcast an empty axis
            small = np.ones(tuple(max(1, d) for d in small.shape), dtype)
        return Buf(small, lambda b, shape=shape: np.broadcast_to(b, shape))
    if layout == "unaligned":
        size = dtype.itemsize
        raw = np.zeros(n * size + 1 + size, np.uint8)

        def view(b, shape=shape, dtype=dtype, nbytes=n * size):
            return b[1 : 1 + nbytes].view(dtype).reshape(shape)

        view(raw)[...] = content
        return Buf(raw, view)
    raise AssertionError(layout)


def shapes(draw, max_dims=4, budget=1 << 12):
    ndim = draw(st.integers(0, max_dims), label="ndim")
    dims = []
    for _ in range(ndim):
        d = draw(SIDES, label="side")
        room = budget // max(1, math.prod(x for x in dims if x))
        dims.append(min(d, room))
    if ndim >= 2 and draw(st.integers(0, 9), label="empty with a huge side") == 0:
        i, j = draw(st.permutations(range(ndim)), label="axes")[:2]
        dims[i] = 0
        # NumPy refuses even an empty array whose nonzero sides multiply past ~2**63 bytes;
        # stay far below that (the strided layouts triple the sides).
        others = math.prod(d for a, d in enumerate(dims) if a != j and d)
        dims[j] = min(draw(st.sampled_from(HUGE_DIMS), label="huge side"), 2**44 // others)
    return tuple(dims)


def huge_shape(draw):
    """A big logical shape (2**10 .. 2**18 elements) for a zero-stride view of a tiny array."""
    ndim = draw(st.integers(1, 4), label="huge ndim")
    target = 2 ** draw(st.integers(10, 18), label="log2 size")
    dims = []
    for k in range(ndim):
        left = max(1, target // max(1, math.prod(dims)))
        if k == ndim - 1:
            dims.append(left + draw(st.integers(0, 3), label="odd"))
        else:
            dims.append(max(1, min(left, draw(st.sampled_from([1, 3, 16, 64, 127, 256, 1024])))))
    return tuple(dims)


def small_nesting(shape):
    """Whether shape is small enough to spell as nested lists (an empty array of shape
    (129, 2**32, 0) would be 2**39 empty lists)."""
    lists = prefix = 1
    for d in shape[:-1]:
        prefix *= d
        lists += prefix
    return math.prod(shape) <= 256 and lists <= 4096


def build_input(draw, shape, dtype, vseed, layouts=LAYOUTS, allow_list=True, allow_huge=True):
    """The (x, Buf) of a fuzzed array argument."""
    choices = list(layouts)
    if allow_list and small_nesting(shape):
        choices.append("list")
    if shape == ():
        choices.append("scalar")
    if allow_huge:
        choices.append("huge")
    layout = draw(st.sampled_from(choices), label="layout")
    if layout == "huge":
        shape = huge_shape(draw)
        small_shape = tuple(1 for _ in shape[:-1]) + (shape[-1] if shape[-1] <= 16 else 1,)
        small = values(small_shape, dtype, vseed)
        return Buf(small, lambda b, shape=shape: np.broadcast_to(b, shape))
    if layout == "list":
        content = values(shape, dtype, vseed)
        return Buf(None, obj=content.tolist())
    if layout == "scalar":
        content = values((), dtype, vseed)
        obj = content[()] if draw(st.booleans(), label="numpy scalar") else content.item()
        return Buf(None, obj=obj)
    return build(draw, shape, values(shape, dtype, vseed), layout)


def oracle_copy(a):
    """A copy for the reference, in native byte order (the reference only takes native float
    dtypes; fastdropout converts byte-swapped input itself)."""
    if not isinstance(a, np.ndarray):
        return a
    return np.array(a, dtype=a.dtype.newbyteorder("="), copy=True)


def out_dtype_for(x):
    """The dtype a correct out= has for input x (float32 where x has no float dtype)."""
    try:
        native = np.asarray(x).dtype.newbyteorder("=")
    except (TypeError, ValueError):
        return np.dtype("float32")
    return native if native.kind == "f" and native.itemsize <= 8 else np.dtype("float32")


# ---------------------------------------------------------------------------------------------
# out= arrays
# ---------------------------------------------------------------------------------------------

OUT_KINDS = (
    ["none"] * 6
    + ["fresh"] * 3
    + ["alias", "alias-view", "overlap", "overlap", "strided", "f", "transposed", "unaligned"]
    + ["read-only", "broadcast", "wrong-dtype", "byteswapped", "wrong-shape", "not-array"]
)
VALID_OUT_KINDS = ["none"] * 4 + ["fresh"] * 2 + [
    "alias", "alias-view", "overlap", "overlap", "strided", "f", "transposed", "unaligned",
]  # fmt: skip
OTHER_DTYPES = [np.dtype(d) for d in ["float32", "float64", "float16", "int32", "uint32"]] + [
    np.dtype("complex64"),
    np.dtype("bool"),
    np.dtype("object"),
]


def wrong_shape(draw, shape):
    options = [shape + (1,), (1,) + shape, (2,) + shape]
    if shape:
        i = draw(st.integers(0, len(shape) - 1), label="grown axis")
        options += [shape[:i] + (shape[i] + 1,) + shape[i + 1 :], shape[:-1], ()]
        if shape[i] > 0:
            options.append(shape[:i] + (shape[i] - 1,) + shape[i + 1 :])
        if tuple(reversed(shape)) != shape:
            options.append(tuple(reversed(shape)))
    # (growing the 0 of an empty shape with a huge side would allocate gigabytes)
    options = [s for s in options if math.prod(s) <= 1 << 16] or [shape + (1, 2)]
    return draw(st.sampled_from(options), label="wrong shape")


def build_shared(draw, shape, dtype, vseed):
    """x and out as two views of one 1-D buffer: the same elements, partially overlapping
    ones (forwards or backwards) or disjoint ones."""
    n = math.prod(shape)
    backing = values((2 * n + 3,), dtype, vseed)
    a = draw(st.integers(0, n + 3), label="x start")
    c = draw(st.integers(0, n + 3), label="out start")
    flip_x = draw(st.booleans(), label="x reversed")
    flip_out = draw(st.booleans(), label="out reversed")

    def segment(start, flip):
        def view(b, start=start, flip=flip, n=n, shape=shape):
            seg = b[start : start + n]
            return (seg[::-1] if flip else seg).reshape(shape)

        return view

    x_buf, out_buf = Buf(backing, segment(a, flip_x)), Buf(backing, segment(c, flip_out))
    if n:
        assert np.shares_memory(x_buf.make(), backing) and np.shares_memory(out_buf.make(), backing)
    return x_buf, out_buf


def build_out(draw, kind, x_buf, x, shape, dtype):
    """(out, Buf or None) for an out= kind; shape and dtype are what a correct out has."""
    if kind == "none":
        return None, None
    if kind == "alias" or kind == "alias-view":
        if x_buf.backing is None:
            return x, None
        if kind == "alias":
            return x, x_buf  # the very same object
        return x_buf.make(), x_buf  # another view of the same memory
    if kind == "fresh" or kind == "overlap":
        buf = Buf(filled(shape, dtype))
    elif kind in ("strided", "f", "transposed", "unaligned"):
        buf = build(draw, shape, filled(shape, dtype), kind)
    elif kind == "read-only":
        buf = Buf(filled(shape, dtype))
        buf.backing.flags.writeable = False
    elif kind == "broadcast":
        buf = Buf(filled((), dtype), lambda b, shape=shape: np.broadcast_to(b, shape))
    elif kind == "wrong-dtype":
        other = draw(st.sampled_from([d for d in OTHER_DTYPES if d != dtype]), label="out dtype")
        buf = Buf(filled(shape, other))
    elif kind == "byteswapped":
        buf = Buf(filled(shape, dtype.newbyteorder(">" if dtype.isnative else "<")))
    elif kind == "wrong-shape":
        buf = Buf(filled(wrong_shape(draw, shape), dtype))
    elif kind == "not-array":
        obj = draw(
            st.sampled_from(["list", "tuple", "str", "scalar", "memoryview", "float", "bytearray"]),
            label="out object",
        )
        stand_in = {
            "list": lambda: filled(shape, dtype).tolist() if small_nesting(shape) else [0.0],
            "tuple": lambda: tuple(np.ravel(filled(shape, dtype)).tolist()),
            "str": lambda: "out",
            "scalar": lambda: np.float32(0.0),
            "memoryview": lambda: memoryview(bytearray(8 * max(1, math.prod(shape)))),
            "float": lambda: 0.0,
            "bytearray": lambda: bytearray(8),
        }[obj]()
        return stand_in, None
    else:
        raise AssertionError(kind)
    return buf.make(), buf


# ---------------------------------------------------------------------------------------------
# Result checks
# ---------------------------------------------------------------------------------------------


def assert_same_as(result, expected, dtype, what):
    """Bit-identical to the reference (converted to the native dtype fastdropout works in)."""
    expected = np.asarray(expected)
    if expected.dtype != dtype:
        expected = expected.astype(dtype)
    actual = np.asarray(result)
    if actual.dtype != dtype and actual.dtype.newbyteorder("=") == dtype:
        actual = actual.astype(dtype)
    try:
        assert_bits_equal(actual, expected)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def check_elementwise_result(result, expected, dtype, x, x_buf, out, out_buf, before, what):
    """Result of dropout/dropout_backward: new C-contiguous array or out itself, the right
    bytes in out's memory and nowhere else, x unchanged unless it shares out's memory."""
    x_before, out_before = before
    if out is None:
        assert type(result) is np.ndarray, f"{what}: returned {type(result).__name__}"
        assert result.flags.c_contiguous and result.flags.writeable, what
        assert_same_as(result, expected, dtype, what)
        if x_buf.backing is not None:
            assert not np.shares_memory(result, x_buf.backing), f"{what}: result aliases x"
    else:
        assert result is out, f"{what}: did not return out"
        assert_same_as(out, expected, dtype, what)
        want = out_buf.expected_backing(out_before, expected)
        assert out_buf.backing.tobytes() == want.tobytes(), (
            f"{what}: wrote outside out's elements (or the wrong bytes)"
        )
    if x_buf.backing is not None and (out_buf is None or out_buf.backing is not x_buf.backing):
        assert x_buf.backing.tobytes() == x_before.tobytes(), f"{what}: modified x"


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------


def draw_generator(draw, valid):
    kinds = ["default", "own", "own", "own-near-wrap"]
    if not valid:
        kinds += ["bad-int", "bad-str", "bad-obj"]
    kind = draw(st.sampled_from(kinds), label="generator")
    if kind == "default":
        return None
    if kind.startswith("own"):
        g = fd.Generator(draw(VALID_U64, label="generator seed"))
        offset = draw(
            st.integers(U64 - 64, U64 - 1) if kind == "own-near-wrap" else VALID_U64,
            label="generator offset",
        )
        g.set_state({"seed": g.seed, "offset": int(offset)})
        return g
    return {"bad-int": 5, "bad-str": "gen", "bad-obj": object()}[kind]


def draw_elementwise_case(draw):
    """(valid, input buffer, input, out, out buffer, p) for dropout and dropout_backward."""
    shape = shapes(draw)
    valid = draw(st.integers(0, 4), label="mostly valid") < 3
    dtype = draw(st.sampled_from(VALID_X_DTYPES if valid else X_DTYPES), label="dtype")
    vseed = draw(st.integers(0, 2**32 - 1), label="value seed")
    out_kind = draw(st.sampled_from(VALID_OUT_KINDS if valid else OUT_KINDS), label="out kind")
    if out_kind == "overlap" and dtype in FLOAT_DTYPES:
        buf, out_buf = build_shared(draw, shape, dtype, vseed)
        arr, out = buf.make(), out_buf.make()
    else:
        buf = build_input(draw, shape, dtype, vseed)
        arr = buf.make()
        out, out_buf = build_out(draw, out_kind, buf, arr, np.shape(arr), out_dtype_for(arr))
    p = draw(VALID_PROBABILITIES if valid else PROBABILITIES, label="p")
    return valid, buf, arr, out, out_buf, p


@fuzz(weight=1.5)
@given(data=st.data())
def test_fuzz_dropout(backend, data):
    draw = data.draw
    valid, x_buf, x, out, out_buf, p = draw_elementwise_case(draw)
    training = draw(TRUTHY, label="training")
    seed = draw(st.one_of(VALID_SEEDS, st.none()) if valid else SEEDS, label="seed")
    offset = draw(VALID_U64 if valid else U64_VALUES, label="offset")
    pass_generator = draw(st.integers(0, 3), label="pass generator") == 0
    generator = draw_generator(draw, valid) if pass_generator else None
    threads = draw(st.sampled_from([None, 1, 2, 3]), label="threads")
    if seed is None and isinstance(generator, fd.Generator):
        offset = draw(st.sampled_from([0, offset]), label="offset with generator")

    e = Expect()
    xa = expect_array(e, x, "x", (np.float32, np.float64), maybe=(np.float16,))
    native = None if xa is None else xa.dtype.newbyteorder("=")
    expect_p(e, p)
    expect_out(e, out, None if xa is None else xa.shape, native)
    if training:
        if seed is None:
            if generator is not None and not isinstance(generator, fd.Generator):
                e.error("generator of the wrong type", TypeError)
            expect_u64(e, offset, "offset (ignored with a generator)", optional=True)
        else:
            expect_u64(e, seed, "seed")
            expect_u64(e, offset, "offset")
            if generator is not None:
                e.error("both seed and generator", ValueError)
                if not isinstance(generator, fd.Generator):
                    e.maybe("generator of the wrong type", TypeError)
    else:
        if seed is not None:
            expect_u64(e, seed, "seed")
        expect_u64(e, offset, "offset", optional=seed is None)
        if generator is not None:
            e.maybe("generator given in evaluation mode", TypeError, ValueError)

    used = generator if isinstance(generator, fd.Generator) else fd.default_generator
    state = used.get_state()
    x_before = None if x_buf.backing is None else np.array(x_buf.backing, copy=True)
    out_before = None if out_buf is None else np.array(out_buf.backing, copy=True)
    x_value = oracle_copy(x)

    kwargs = {"seed": seed, "offset": offset, "training": training, "out": out}
    if generator is not None:
        kwargs["generator"] = generator
    watch = Watch([x_buf.backing, None if out_buf is None else out_buf.backing], [generator])
    with Threads(threads), DefaultGeneratorKept():
        ok, result = call("dropout", lambda: fd.dropout(x, p, **kwargs), e, watch)
        if not ok:
            return
        if training and seed is None:
            s, o = state["seed"], state["offset"]
            n = int(np.size(x_value))
            assert used.get_state() == {"seed": s, "offset": (o + round_up4(n)) % U64}
        else:
            s, o = (0, 0) if seed is None else (seed, offset)
            assert used.get_state() == state, "a generator advanced without being used"
        expected = call_reference(
            "dropout", lambda: ref.dropout(x_value, p, seed=s, offset=o, training=training)
        )
        check_elementwise_result(
            result, expected, native, x, x_buf, out, out_buf, (x_before, out_before), "dropout"
        )


# ---------------------------------------------------------------------------------------------
# dropout_backward
# ---------------------------------------------------------------------------------------------


@fuzz()
@given(data=st.data())
def test_fuzz_dropout_backward(backend, data):
    draw = data.draw
    valid, g_buf, grad, out, out_buf, p = draw_elementwise_case(draw)
    seed = draw(VALID_U64 if valid else SEEDS, label="seed")
    offset = draw(VALID_U64 if valid else U64_VALUES, label="offset")
    threads = draw(st.sampled_from([None, 1, 2, 3]), label="threads")

    e = Expect()
    ga = expect_array(e, grad, "grad", (np.float32, np.float64), maybe=(np.float16,))
    native = None if ga is None else ga.dtype.newbyteorder("=")
    expect_p(e, p)
    expect_u64(e, seed, "seed")
    expect_u64(e, offset, "offset")
    expect_out(e, out, None if ga is None else ga.shape, native)

    g_before = None if g_buf.backing is None else np.array(g_buf.backing, copy=True)
    out_before = None if out_buf is None else np.array(out_buf.backing, copy=True)
    g_value = oracle_copy(grad)
    watch = Watch([g_buf.backing, None if out_buf is None else out_buf.backing], [])
    with Threads(threads):
        ok, result = call(
            "dropout_backward",
            lambda: fd.dropout_backward(grad, p, seed=seed, offset=offset, out=out),
            e,
            watch,
        )
    if not ok:
        return
    expected = call_reference(
        "dropout_backward", lambda: ref.dropout_backward(g_value, p, seed=seed, offset=offset)
    )
    check_elementwise_result(
        result, expected, native, grad, g_buf, out, out_buf, (g_before, out_before), "backward"
    )


# ---------------------------------------------------------------------------------------------
# dropout_mask
# ---------------------------------------------------------------------------------------------

BAD_SHAPES = [
    -1, (-1,), (3, -2), (2.0,), (3, "4"), "abc", None, (1.5, 2), (True, 2), (np.bool_(True),),
    ((2, 3),), [[2]], object(), 2.0, np.array(5), np.array([2.5]), (None,), {"a": 1}, 3j,
    (2**62,), (2**61, 2), (2**31, 2**31), (2**32, 2**32, 2**32), (2**64,), (2**100,), 10**30,
    (np.uint64(2**63), 1), (2**62 + 1, 1), (3, 2**61 - 1 + 2**60),
]  # fmt: skip
ODD_VALID_SHAPES = [
    (), [], 0, 5, np.int64(7), [3, 4], (np.int32(2), np.uint64(3)), np.array([2, 3]),
    range(1, 4), (2**62, 0), (0, 2**62 - 1), (2**40, 0, 3), (1, 1, 1, 1, 1), (2**63 - 1, 0),
    (2**63, 0), (2**64, 0), (0, 2**70),
]  # fmt: skip


@fuzz()
@given(data=st.data())
def test_fuzz_dropout_mask(backend, data):
    draw = data.draw
    valid = draw(st.integers(0, 4), label="mostly valid") < 3
    kind = draw(st.sampled_from(["random"] * 4 + ["odd", "bad"]), label="shape kind")
    if kind == "random":
        shape = shapes(draw, budget=1 << 13)
        if draw(st.booleans(), label="as list"):
            shape = list(shape)
    else:
        pool = ODD_VALID_SHAPES if kind == "odd" else BAD_SHAPES
        shape = draw(st.sampled_from(pool), label="shape")
    p = draw(VALID_PROBABILITIES if valid else PROBABILITIES, label="p")
    seed = draw(VALID_U64 if valid else SEEDS, label="seed")
    offset = draw(VALID_U64 if valid else U64_VALUES, label="offset")
    packed = draw(TRUTHY, label="packed")
    threads = draw(st.sampled_from([None, 1, 2, 3]), label="threads")

    e = Expect()
    dims, too_big = expect_shape(e, shape)
    expect_p(e, p)
    expect_u64(e, seed, "seed")
    expect_u64(e, offset, "offset")
    watch = Watch([], [])
    with Threads(threads):
        ok, result = call(
            "dropout_mask",
            lambda: fd.dropout_mask(shape, p, seed=seed, offset=offset, packed=packed),
            e,
            watch,
        )
    if not ok:
        if e.must and not too_big:  # the oracle validates the same way
            outcome = call_reference(
                "dropout_mask",
                lambda: ref.dropout_mask(shape, p, seed=seed, offset=offset, packed=packed),
                expect=e,
            )
            assert isinstance(outcome, Exception), f"reference.dropout_mask accepted it: {e}"
        return
    n = math.prod(dims)
    assert type(result) is np.ndarray and result.flags.c_contiguous
    if packed:
        assert result.dtype == np.uint8 and result.shape == ((n + 7) // 8,)
    else:
        assert result.dtype == np.bool_ and result.shape == dims
    expected = call_reference(
        "dropout_mask", lambda: ref.dropout_mask(shape, p, seed=seed, offset=offset, packed=packed)
    )
    assert_bits_equal(result, expected)


# ---------------------------------------------------------------------------------------------
# dense, dropout_dense, dropout_dense_backward
# ---------------------------------------------------------------------------------------------

GEMM_C = 8
GEMM_FLOOR_K = 8  # rtol >= 8 * 8 * 2**-24 ~ 3.8e-6: float32 activations for tiny K


def gemm_rtol(k):
    return GEMM_C * max(k, GEMM_FLOOR_K) * 2.0**-24


def assert_gemm_close(actual, expected, bound, k, what):
    """``max|a - b| / max(max|b|, bound) <= 8 * max(K, 8) * 2**-24``.

    ``bound`` is the largest entry of the same product computed on absolute values (the
    classic error bound's scale), which keeps heavy cancellation from failing correct results;
    with scale 0 the result must be exactly 0.
    """
    assert isinstance(actual, np.ndarray), f"{what}: got {type(actual).__name__}"
    assert actual.dtype == np.float32, (what, actual.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.flags.c_contiguous, f"{what}: not C-contiguous"
    if actual.size == 0:
        return
    assert np.isfinite(expected).all(), f"{what}: the reference is not finite (test bug)"
    assert np.isfinite(actual).all(), f"{what}: non-finite values where the reference is finite"
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    scale = max(float(np.max(np.abs(expected))), float(bound))
    if scale == 0.0:
        assert err == 0.0, f"{what}: expected exact zeros, max|a-b| = {err}"
        return
    tol = gemm_rtol(k)
    assert err <= tol * scale, (
        f"{what}: max|a-b|/scale = {err / scale:.3g} > {tol:.3g} (K = {k}, scale {scale:.3g})"
    )


def dense_values(shape, seed, zeros=True):
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    v = rng.standard_normal(n).astype(np.float32) * np.float32(2.0 ** rng.integers(-6, 7))
    if zeros and n:
        where = rng.random(n) < 0.1
        v[where] = np.where(rng.random(n) < 0.5, 0.0, -0.0)[where]
    return v.reshape(shape)


DENSE_LAYOUTS = ["c"] * 6 + ["f", "strided", "transposed", "broadcast", "unaligned"]


def dense_arg(draw, valid, label, shape, vseed, allow_list=True):
    """A fuzzed float32-ish argument of `shape` (with a small chance of a wrong dtype)."""
    pool = VALID_DENSE_DTYPES if valid else DENSE_DTYPES
    dtype = draw(st.sampled_from(pool), label=f"{label} dtype")
    if dtype.kind == "f":
        content = dense_values(shape, vseed).astype(dtype)
    else:
        content = values(shape, dtype, vseed)
    choices = DENSE_LAYOUTS + (["list"] if allow_list and small_nesting(shape) else [])
    layout = draw(st.sampled_from(choices), label=f"{label} layout")
    if layout == "list":
        return Buf(None, obj=content.tolist())
    return build(draw, shape, content, layout)


def dense_shapes(draw):
    side = st.one_of(st.integers(0, 5), st.sampled_from([1, 7, 17, 64]))
    lead = tuple(draw(st.lists(side, max_size=3), label="lead"))
    k = draw(st.one_of(st.integers(0, 24), st.sampled_from([0, 1, 31, 65, 129, 300])), label="K")
    n = draw(st.one_of(st.integers(0, 12), st.sampled_from([0, 1, 17, 33])), label="N")
    if math.prod(lead) * max(k, n) > 1 << 14:
        lead = lead[:1]
    return lead, k, n


def corrupt_shape(draw, valid, shape, label):
    """Usually `shape`, sometimes a wrong one."""
    if valid or draw(st.integers(0, 4), label=f"{label} shape wrong") != 0:
        return shape
    return wrong_shape(draw, shape)


def dense_inputs(draw, valid, with_grad=False):
    lead, k, n = dense_shapes(draw)
    vseed = draw(st.integers(0, 2**32 - 1), label="value seed")
    x_shape = corrupt_shape(draw, valid, lead + (k,), "x")
    w_shape = corrupt_shape(draw, valid, (n, k), "weight")
    huge = draw(st.integers(0, 24), label="huge x") == 0
    if huge:  # a zero-stride x of up to 2**18 elements
        m = draw(st.sampled_from([1024, 4099, 2**14]), label="huge rows")
        m = max(1, min(m, 2**18 // max(k, 1)))
        row = dense_values((1, k), vseed)
        x_buf = Buf(row, lambda b, s=(m, k): np.broadcast_to(b, s))
        x_shape = (m, k)
    else:
        x_buf = dense_arg(draw, valid, "x", x_shape, vseed)
    w_buf = dense_arg(draw, valid, "weight", w_shape, vseed + 1)
    b_buf = None
    if draw(st.booleans(), label="bias"):
        b_buf = dense_arg(draw, valid, "bias", corrupt_shape(draw, valid, (n,), "bias"), vseed + 2)
    extra = {}
    if with_grad:
        out_shape = x_shape[:-1] + (n,) if x_shape else (n,)
        grad_shape = corrupt_shape(draw, valid, out_shape, "grad")
        extra["grad"] = dense_arg(draw, valid, "grad_out", grad_shape, vseed + 3)
        if not valid and draw(st.integers(0, 3), label="no preactivation") == 0:
            extra["z"] = None
        else:
            z_shape = corrupt_shape(draw, valid, out_shape, "z")
            extra["z"] = dense_arg(draw, valid, "preactivation", z_shape, vseed + 4)
    return x_buf, w_buf, b_buf, extra


def expect_dense_arrays(e, x, weight, bias):
    f32 = (np.float32,)
    xa = expect_array(e, x, "x", f32)
    wa = expect_array(e, weight, "weight", f32)
    ba = None if bias is None else expect_array(e, bias, "bias", f32)
    if xa is not None and xa.ndim < 1:
        e.error("x is 0-d", ValueError)
    if wa is not None and wa.ndim != 2:
        e.error(f"weight has shape {wa.shape}", ValueError)
    if xa is not None and wa is not None and xa.ndim >= 1 and wa.ndim == 2:
        if wa.shape[1] != xa.shape[-1]:
            e.error(f"weight {wa.shape} does not fit x {xa.shape}", ValueError)
    if ba is not None and wa is not None and (wa.ndim != 2 or ba.shape != (wa.shape[0],)):
        e.error(f"bias has shape {ba.shape}", ValueError)
    return xa, wa, ba


def poison_dropped(draw, x_buf, p, seed, offset, training):
    """Put NaN and inf into elements the mask drops: a select, not a multiply, ignores them."""
    x = x_buf.make()
    if (
        not training
        or not isinstance(x, np.ndarray)
        or x.dtype.type is not np.float32
        or not x.flags.writeable
        or x.size == 0
        or u64_errors(seed)
        or u64_errors(offset)
    ):
        return
    e = Expect()
    expect_p(e, p)
    if e.must or not draw(st.booleans(), label="poison dropped"):
        return
    keep = ref.dropout_mask(x.shape, p, seed=seed, offset=offset)
    poison = np.where(np.arange(x.size).reshape(x.shape) % 2 == 0, np.nan, np.inf)
    x[~keep] = poison[~keep].astype(np.float32)


def absolute_product(dropped, weight, bias, m):
    k = weight.shape[1]
    a = np.abs(np.asarray(dropped, np.float64)).reshape(m, k)
    a = a @ np.abs(np.asarray(weight, np.float64)).T
    if bias is not None:
        a = a + np.abs(np.asarray(bias, np.float64))
    return float(np.max(a, initial=0.0))


def rerun_with_other_threads(thunk, first, what):
    """Dense results are bit-identical for any thread count."""
    n = fd.get_num_threads()
    with Threads(n % 3 + 1):
        CASES[what] += 1
        again = thunk()
    first = first if isinstance(first, tuple) else (first,)
    again = again if isinstance(again, tuple) else (again,)
    for a, b in zip(first, again):
        if a is None:
            assert b is None
        else:
            assert_bits_equal(a, b)


@fuzz(weight=1.5)
@given(data=st.data())
def test_fuzz_dropout_dense(backend, data):
    draw = data.draw
    valid = draw(st.integers(0, 4), label="mostly valid") < 3
    x_buf, w_buf, b_buf, _ = dense_inputs(draw, valid)
    p = draw(VALID_PROBABILITIES if valid else PROBABILITIES, label="p")
    seed = draw(VALID_U64 if valid else SEEDS, label="seed")
    offset = draw(VALID_U64 if valid else U64_VALUES, label="offset")
    activation = draw(VALID_ACTIVATIONS if valid else ACTIVATIONS, label="activation")
    training = draw(TRUTHY, label="training")
    return_z = draw(TRUTHY, label="return_preactivation")
    plain = draw(st.integers(0, 4), label="fd.dense") == 0
    threads = draw(st.sampled_from([None, 1, 2, 3]), label="threads")
    poison_dropped(draw, x_buf, p, seed, offset, training and not plain)
    x, weight = x_buf.make(), w_buf.make()
    bias = None if b_buf is None else b_buf.make()

    e = Expect()
    xa, wa, ba = expect_dense_arrays(e, x, weight, bias)
    expect_activation(e, activation)
    if not plain:
        expect_p(e, p)
        expect_u64(e, seed, "seed")
        expect_u64(e, offset, "offset")
    bufs = [x_buf, w_buf, b_buf]
    watch = Watch([b.backing for b in bufs if b is not None], [])
    before = [None if b is None or b.backing is None else b.backing.tobytes() for b in bufs]
    x_value = oracle_copy(x)

    if plain:
        name = "dense"

        def thunk():
            return fd.dense(x, weight, bias, activation=activation)
    else:
        name = "dropout_dense"

        def thunk():
            return fd.dropout_dense(
                x, weight, bias, p, seed=seed, offset=offset, activation=activation,
                training=training, return_preactivation=return_z,
            )  # fmt: skip

    with Threads(threads):
        ok, result = call(name, thunk, e, watch)
        if not ok:
            return
        rerun_with_other_threads(thunk, result, name)
    for b, snap in zip(bufs, before):
        if snap is not None:
            assert b.backing.tobytes() == snap, f"{name} modified an input"

    k, n = wa.shape[1], wa.shape[0]
    lead = xa.shape[:-1]
    if plain:
        w_value, b_value = oracle_copy(weight), oracle_copy(bias)
        want_y = call_reference(
            "dense", lambda: ref.dense(x_value, w_value, b_value, activation=activation)
        )
        want_z = ref.dense(x_value, w_value, b_value) if activation else want_y
        dropped = xa
    else:
        w_value, b_value = oracle_copy(weight), oracle_copy(bias)
        want_y, want_z = call_reference(
            "dropout_dense",
            lambda: ref.dropout_dense(
                x_value, w_value, b_value, p, seed=seed, offset=offset, activation=activation,
                training=training, return_preactivation=True,
            ),
        )  # fmt: skip
        dropped = ref.dropout(x_value, p, seed=seed, offset=offset, training=training)
    bound = absolute_product(dropped, wa, ba, math.prod(lead))
    if return_z and not plain:
        assert isinstance(result, tuple) and len(result) == 2, f"{name}: expected (y, z)"
        y, z = result
        assert_gemm_close(z, want_z.reshape(lead + (n,)), bound, k, f"{name} z")
    else:
        y = result
    assert_gemm_close(y, want_y.reshape(lead + (n,)), bound, k, f"{name} y")


@fuzz(weight=1.5)
@given(data=st.data())
def test_fuzz_dropout_dense_backward(backend, data):
    draw = data.draw
    valid = draw(st.integers(0, 4), label="mostly valid") < 3
    x_buf, w_buf, _, extra = dense_inputs(draw, valid, with_grad=True)
    g_buf, z_buf = extra["grad"], extra["z"]
    p = draw(VALID_PROBABILITIES if valid else PROBABILITIES, label="p")
    seed = draw(VALID_U64 if valid else SEEDS, label="seed")
    offset = draw(VALID_U64 if valid else U64_VALUES, label="offset")
    activation = draw(VALID_ACTIVATIONS if valid else ACTIVATIONS, label="activation")
    training = draw(TRUTHY, label="training")
    bias = draw(st.sampled_from([True, False, 1, 0, None]), label="bias")
    threads = draw(st.sampled_from([None, 1, 2, 3]), label="threads")
    poison_dropped(draw, x_buf, p, seed, offset, training)
    x, weight, grad = x_buf.make(), w_buf.make(), g_buf.make()
    z = None if z_buf is None else z_buf.make()

    e = Expect()
    xa, wa, _ = expect_dense_arrays(e, x, weight, None)
    ga = expect_array(e, grad, "grad_out", (np.float32,))
    want_shape = None
    if xa is not None and wa is not None and xa.ndim >= 1 and wa.ndim == 2:
        want_shape = xa.shape[:-1] + (wa.shape[0],)
        if ga is not None and ga.shape != want_shape:
            e.error(f"grad_out has shape {ga.shape}, not {want_shape}", ValueError)
    expect_activation(e, activation)
    if activation in ("relu", "gelu"):
        if z is None:
            e.error("preactivation missing", ValueError)
        else:
            za = expect_array(e, z, "preactivation", (np.float32,))
            if za is not None and want_shape is not None and za.shape != want_shape:
                e.error(f"preactivation has shape {za.shape}", ValueError)
    expect_p(e, p)
    expect_u64(e, seed, "seed")
    expect_u64(e, offset, "offset")

    bufs = [x_buf, w_buf, g_buf, z_buf]
    watch = Watch([b.backing for b in bufs if b is not None], [])
    before = [None if b is None or b.backing is None else b.backing.tobytes() for b in bufs]
    x_value = oracle_copy(x)

    def thunk():
        return fd.dropout_dense_backward(
            grad, x, weight, p, seed=seed, offset=offset, activation=activation,
            preactivation=z, bias=bias, training=training,
        )  # fmt: skip

    with Threads(threads):
        ok, result = call("dropout_dense_backward", thunk, e, watch)
        if not ok:
            return
        rerun_with_other_threads(thunk, result, "dropout_dense_backward")
    for b, snap in zip(bufs, before):
        if snap is not None:
            assert b.backing.tobytes() == snap, "dropout_dense_backward modified an input"

    assert isinstance(result, tuple) and len(result) == 3
    grad_x, grad_w, grad_b = result
    m = math.prod(xa.shape[:-1])
    n, k = wa.shape
    p_ref = p if training else 0.0
    want_x, want_w, want_b = call_reference(
        "dropout_dense_backward",
        lambda: ref.dropout_dense_backward(
            oracle_copy(grad), x_value, oracle_copy(weight), p_ref, seed=seed, offset=offset,
            activation=activation, preactivation=oracle_copy(z), bias=bias,
        ),
    )  # fmt: skip
    keep = ref.dropout_mask(xa.shape, p_ref, seed=seed, offset=offset)
    dropped = ref.dropout(x_value, p_ref, seed=seed, offset=offset)
    scale = float(ref.dropout_scale(p_ref, np.float32))
    g_abs = np.abs(np.asarray(ga, np.float64)).reshape(m, n) * 1.13  # |act'| <= 1.13
    bound_x = float(np.max(g_abs @ np.abs(np.asarray(wa, np.float64)), initial=0.0)) * scale
    bound_w = float(np.max(g_abs.T @ np.abs(dropped.astype(np.float64)).reshape(m, k), initial=0.0))
    bound_b = float(np.max(g_abs.sum(axis=0), initial=0.0))

    assert_gemm_close(grad_x, want_x, bound_x, n, "grad_x")
    dropped_bits = np.ascontiguousarray(grad_x).view(np.uint32)[~keep]
    assert not dropped_bits.any(), "grad_x is not +0.0 exactly where x was dropped"
    assert_gemm_close(grad_w, want_w, bound_w, m, "grad_weight")
    if bias:
        assert_gemm_close(grad_b, want_b, bound_b, m, "grad_bias")
    else:
        assert grad_b is None


# ---------------------------------------------------------------------------------------------
# Generator, manual_seed, set_num_threads
# ---------------------------------------------------------------------------------------------

STATE_OBJECTS = st.one_of(
    st.fixed_dictionaries({"seed": U64_VALUES, "offset": U64_VALUES}),
    st.fixed_dictionaries({"seed": U64_VALUES, "offset": U64_VALUES, "extra": st.just(1)}),
    st.fixed_dictionaries({"seed": U64_VALUES}),
    st.fixed_dictionaries({"offset": U64_VALUES}),
    st.sampled_from([None, [], (1, 2), "state", {}, 5]),
)
COUNTS = st.one_of(
    st.integers(0, 300), st.sampled_from([U64 - 1, U64 - 4, 2**63, 2**64, -1, 2**100]), U64_VALUES
)
THREAD_COUNTS = st.one_of(
    st.integers(1, 4),
    st.sampled_from([0, -1, -(2**70), 10**30, 2**16, 2**16 + 1]),
    st.sampled_from([np.int32(2), np.uint8(3), np.int64(-3)]),
    st.sampled_from([True, False, np.bool_(True), 1.0, 2.5, "2", None, [2], NAN]),
)


def _model_draw(state, n):
    """(seed, offset) a draw of n returns, and the state after it."""
    after = (state["offset"] + round_up4(int(n))) % U64
    return state["seed"], state["offset"], {"seed": state["seed"], "offset": after}


@fuzz(weight=2)
@given(data=st.data())
def test_fuzz_generator(data):
    draw = data.draw
    seed = draw(st.one_of(VALID_U64, U64_VALUES, st.none()), label="Generator seed")
    e = Expect()
    if seed is not None:
        expect_u64(e, seed, "seed")
    ok, g = call("Generator", lambda: fd.Generator(seed), e, Watch([], []))
    if not ok:
        return
    assert isinstance(g.seed, int) and 0 <= g.seed < U64 and g.offset == 0
    if seed is not None:
        assert g.seed == int(seed)
    for _ in range(draw(st.integers(1, 6), label="operations")):
        ops = ["draw", "draw", "set_state", "manual_seed", "pickle"]
        op = draw(st.sampled_from(ops), label="op")
        state = g.get_state()
        watch = Watch([], [g])
        if op == "draw":
            n = draw(COUNTS, label="n")
            e = Expect()
            expect_u64(e, n, "n")
            ok, got = call("Generator.draw", lambda: g.draw(n), e, watch)
            if ok:
                s, o, after = _model_draw(state, n)
                assert got == (s, o) and all(type(v) is int for v in got)
                assert g.get_state() == after
        elif op == "set_state":
            new = draw(STATE_OBJECTS, label="state")
            e = Expect()
            if not isinstance(new, dict):
                e.error("state is not a dict", TypeError)
            else:
                if not {"seed", "offset"} <= set(new):
                    e.error("state lacks a key", ValueError)
                for key in ("seed", "offset"):
                    if key in new:
                        expect_u64(e, new[key], key)
            ok, _ = call("Generator.set_state", lambda: g.set_state(new), e, watch)
            if ok:
                assert g.get_state() == {"seed": int(new["seed"]), "offset": int(new["offset"])}
        elif op == "manual_seed":
            value = draw(U64_VALUES, label="manual seed")
            e = Expect()
            expect_u64(e, value, "seed")
            ok, got = call("Generator.manual_seed", lambda: g.manual_seed(value), e, watch)
            if ok:
                assert got is g and g.get_state() == {"seed": int(value), "offset": 0}
        else:
            CASES["Generator.pickle"] += 1
            clone = pickle.loads(pickle.dumps(g))
            assert clone.get_state() == g.get_state() and clone is not g


@fuzz(weight=0.5)
@given(data=st.data())
def test_fuzz_module_functions(data):
    # fd.manual_seed (the default generator) and fd.set_num_threads / get_num_threads.
    draw = data.draw
    value = draw(U64_VALUES, label="manual_seed")
    e = Expect()
    expect_u64(e, value, "seed")
    with DefaultGeneratorKept():
        ok, got = call("manual_seed", lambda: fd.manual_seed(value), e, Watch([], []))
        if ok:
            assert got is fd.default_generator
            assert got.get_state() == {"seed": int(value), "offset": 0}
    n = draw(THREAD_COUNTS, label="num threads")
    e = Expect()
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        e.error(f"thread count of type {type(n).__name__}", TypeError)
    elif int(n) < 1:
        e.error(f"thread count {n}", ValueError)
    previous = fd.get_num_threads()
    try:
        ok, _ = call("set_num_threads", lambda: fd.set_num_threads(n), e, Watch([], []))
        now = fd.get_num_threads()
        if ok:
            assert isinstance(now, int) and now >= 1
            if int(n) <= 64:
                assert now == int(n)
        else:
            assert now == previous, "a refused thread count changed the setting"
    finally:
        fd.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Fixed cases the fuzzers found or that are too costly to draw often
# ---------------------------------------------------------------------------------------------


def test_huge_but_cheap_input(backend):
    # 2**20 logical elements, 4 bytes of memory: the result is a full C-contiguous array.
    x = np.broadcast_to(np.float32(1.5), (64, 128, 128))
    want = ref.dropout(x, 0.25, seed=3, offset=2**64 - 9)
    CASES["dropout"] += 2
    assert_bits_equal(fd.dropout(x, 0.25, seed=3, offset=2**64 - 9), want)
    out = np.full(x.shape, -1.0, np.float32)[:, ::-1]
    assert fd.dropout(x, 0.25, seed=3, offset=2**64 - 9, out=out) is out
    assert_bits_equal(out, want)


@pytest.mark.parametrize(
    "p", [10**400, -(10**400), Fraction(10**400, 3)], ids=["1e400", "-1e400", "fraction"]
)
def test_p_too_large_to_be_a_float_is_a_value_error(p):
    # A Python int (or fraction) beyond the float range is a real number outside [0, 1]:
    # ValueError like p = 2, not the OverflowError of float(p).
    x = np.ones(5, np.float32)
    out = np.full(5, -777.0, np.float32)
    CASES["dropout"] += 1
    with pytest.raises(ValueError):
        fd.dropout(x, p, seed=1, out=out)
    assert (out == -777.0).all()
    CASES["dropout_mask"] += 1
    with pytest.raises(ValueError):
        fd.dropout_mask(5, p, seed=1)
    CASES["dropout_dense"] += 1
    with pytest.raises(ValueError):
        fd.dropout_dense(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), p=p, seed=1)


def test_reference_p_too_large_to_be_a_float_is_a_value_error():
    with pytest.raises(ValueError):
        ref.dropout_mask(5, 10**400, seed=1)


@pytest.mark.parametrize("lead", [(3,), (0,), (2, 2)], ids=str)
def test_dense_with_no_in_features(backend, lead):
    # in_features = 0: z = bias (torch.nn.Linear(0, n) does the same); nothing to reshape away.
    x = np.ones(lead + (0,), np.float32)
    w = np.ones((4, 0), np.float32)
    b = np.arange(4, dtype=np.float32)
    CASES["dropout_dense"] += 1
    y = fd.dropout_dense(x, w, b, 0.5, seed=1)
    np.testing.assert_array_equal(y, ref.dropout_dense(x, w, b, 0.5, seed=1))
    CASES["dropout_dense_backward"] += 1
    gx, gw, gb = fd.dropout_dense_backward(np.ones(lead + (4,), np.float32), x, w, 0.5, seed=1)
    assert gx.shape == x.shape and gw.shape == (4, 0)
    np.testing.assert_array_equal(gb, np.full(4, math.prod(lead), np.float32))


@pytest.mark.parametrize("lead", [(3,), (0,), (2, 2)], ids=str)
def test_dense_backward_with_no_out_features(backend, lead):
    x = np.ones(lead + (5,), np.float32)
    w = np.ones((0, 5), np.float32)
    CASES["dropout_dense_backward"] += 1
    gx, gw, gb = fd.dropout_dense_backward(np.ones(lead + (0,), np.float32), x, w, 0.5, seed=1)
    np.testing.assert_array_equal(gx, np.zeros(x.shape, np.float32))
    assert gw.shape == (0, 5) and gb.shape == (0,)


# ---------------------------------------------------------------------------------------------
# The count
# ---------------------------------------------------------------------------------------------


def summary_line():
    """One line with the number of calls this module made (for the report and conftest)."""
    total = sum(n for name, n in CASES.items() if not name.startswith("reference."))
    reference = sum(n for name, n in CASES.items() if name.startswith("reference."))
    mode = (
        f"seeded long run, {LONG_RUN_EXAMPLES} examples/test/backend, seed {FUZZ_SEED}"
        if LONG_RUN_EXAMPLES
        else f"default run, {DEFAULT_EXAMPLES} examples x weight per test/backend"
    )
    detail = ", ".join(f"{name} {n}" for name, n in sorted(CASES.items()))
    return (
        f"fastdropout fuzz: {total} calls to fastdropout ({reference} to the reference) [{mode}]; "
        f"{OUTCOMES['checked']} fuzzed calls checked against the reference, "
        f"{OUTCOMES['raised']} raised a predicted TypeError/ValueError; by function: {detail}"
    )


def test_zz_report_fuzz_case_count(capsys):
    """Print how many calls the module made (it runs last in the module)."""
    with capsys.disabled():
        print("\n" + summary_line())
