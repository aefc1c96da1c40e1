"""Bad input (SPEC section 6): the right exception, before any work, with nothing written."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import sample_values

import fastdropout as fd
from fastdropout import reference as ref

SENTINEL = -777.0
N = 37

BAD_P_VALUES = [-0.1, -1e-300, -0.0 - 1e-9, 1.0 + 2**-52, 1.5, 2, -1, math.nan, math.inf, -math.inf]
BAD_P_TYPES = ["0.5", None, 0.5j, [0.5], object()]
BAD_U64_VALUES = [-1, 2**64, 2**64 + 5, 2**100, -(2**64)]
BAD_U64_TYPES = [1.0, 1.5, np.float64(3.0), "1", [1], 1j]
BAD_ARRAY_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object]


def _x():
    return sample_values(N, np.float32, seed=1)


def _sentinel_out(shape=(N,), dtype=np.float32):
    return np.full(shape, SENTINEL, dtype)


def _call_all(x, out, **kwargs):
    """Yield (name, thunk) for every public entry point with the given (bad) arguments."""
    p = kwargs.pop("p", 0.5)
    yield "dropout", lambda: fd.dropout(x, p, out=out, **kwargs)
    yield "dropout_backward", lambda: fd.dropout_backward(x, p, out=out, **kwargs)
    yield "dropout_mask", lambda: fd.dropout_mask(x.shape, p, **kwargs)
    yield "dropout_mask_packed", lambda: fd.dropout_mask(x.shape, p, packed=True, **kwargs)


def _assert_out_untouched(thunk, exc, out):
    before = out.copy()
    with pytest.raises(exc) as info:
        thunk()
    np.testing.assert_array_equal(out, before)
    return info


# ---------------------------------------------------------------------------------------------
# p, seed and offset
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", BAD_P_VALUES)
def test_p_out_of_range(p):
    x = _x()
    for name, thunk in _call_all(x, None, p=p, seed=1):
        with pytest.raises(ValueError):
            thunk()
            pytest.fail(name)
    for function in (fd.dropout, fd.dropout_backward):
        out = _sentinel_out()
        _assert_out_untouched(lambda: function(x, p, seed=1, out=out), ValueError, out)


@pytest.mark.parametrize("p", BAD_P_TYPES, ids=repr)
def test_p_wrong_type(p):
    x = _x()
    for function in (fd.dropout, fd.dropout_backward):
        out = _sentinel_out()
        _assert_out_untouched(lambda: function(x, p, seed=1, out=out), TypeError, out)
    with pytest.raises(TypeError):
        fd.dropout_mask((N,), p, seed=1)


def test_p_message_says_what_was_received():
    with pytest.raises(ValueError, match=r"1\.5"):
        fd.dropout(_x(), 1.5, seed=1)
    with pytest.raises(ValueError, match=r"(?i)nan"):
        fd.dropout_mask((3,), math.nan, seed=1)


@pytest.mark.parametrize("value", BAD_U64_VALUES)
@pytest.mark.parametrize("name", ["seed", "offset"])
def test_seed_and_offset_out_of_range(name, value):
    x = _x()
    kwargs = {"seed": 1, "offset": 0, name: value}
    for function in (fd.dropout, fd.dropout_backward):
        out = _sentinel_out()
        info = _assert_out_untouched(lambda: function(x, 0.5, out=out, **kwargs), ValueError, out)
        assert str(value) in str(info.value)
    with pytest.raises(ValueError):
        fd.dropout_mask((N,), 0.5, **kwargs)
    with pytest.raises(ValueError):
        fd.dropout_mask((N,), 0.5, packed=True, **kwargs)


@pytest.mark.parametrize("value", BAD_U64_TYPES, ids=repr)
@pytest.mark.parametrize("name", ["seed", "offset"])
def test_seed_and_offset_wrong_type(name, value):
    x = _x()
    kwargs = {"seed": 1, "offset": 0, name: value}
    for function in (fd.dropout, fd.dropout_backward):
        out = _sentinel_out()
        _assert_out_untouched(lambda: function(x, 0.5, out=out, **kwargs), TypeError, out)
    with pytest.raises(TypeError):
        fd.dropout_mask((N,), 0.5, **kwargs)


def test_bad_input_does_not_advance_the_generator():
    g = fd.Generator(3)
    x = _x()
    out = _sentinel_out()
    _assert_out_untouched(lambda: fd.dropout(x, 1.5, generator=g, out=out), ValueError, out)
    _assert_out_untouched(
        lambda: fd.dropout(np.ones(N, np.int32), 0.5, generator=g), TypeError, out
    )
    _assert_out_untouched(lambda: fd.dropout(x, 0.5, generator=g, out=out[:-1]), ValueError, out)
    assert g.offset == 0


@pytest.mark.parametrize("generator", [5, "gen", object()], ids=repr)
def test_generator_wrong_type(generator):
    out = _sentinel_out()
    _assert_out_untouched(
        lambda: fd.dropout(_x(), 0.5, generator=generator, out=out), TypeError, out
    )


# ---------------------------------------------------------------------------------------------
# Arrays and out=
# ---------------------------------------------------------------------------------------------


_X8, _W38 = np.ones((1, 8), np.float32), np.ones((3, 8), np.float32)
FLAG_CALLS = {
    "dropout training": lambda v: fd.dropout(_X8, 0.5, seed=1, training=v),
    "dropout return_stream": lambda v: fd.dropout(_X8, 0.5, seed=1, return_stream=v),
    "dropout_mask packed": lambda v: fd.dropout_mask(8, 0.5, seed=1, packed=v),
    "dropout_dense training": lambda v: fd.dropout_dense(_X8, _W38, None, 0.5, seed=1, training=v),
    "dropout_dense return_preactivation": lambda v: fd.dropout_dense(_X8, _W38, None, 0.5, seed=1,
                                                                     return_preactivation=v),
    "dropout_dense_backward bias": lambda v: fd.dropout_dense_backward(np.ones((1, 3), np.float32), _X8, _W38, 0.5,
                                                                       seed=1, bias=v),
    "dropout_dense_backward training": lambda v: fd.dropout_dense_backward(np.ones((1, 3), np.float32), _X8, _W38,
                                                                           0.5, seed=1, training=v),
    "gaussian_dropout training": lambda v: fd.gaussian_dropout(_X8, 0.5, seed=1, training=v),
    "alpha_dropout training": lambda v: fd.alpha_dropout(_X8, 0.5, seed=1, training=v),
    "dropconnect_dense_backward bias": lambda v: fd.dropconnect_dense_backward(np.ones((1, 3), np.float32), _X8, _W38,
                                                                               0.5, seed=1, bias=v),
}


@pytest.mark.parametrize("value", ["no", None, np.zeros(3, np.float32), 2, 0.0], ids=repr)
@pytest.mark.parametrize("call", sorted(FLAG_CALLS))
def test_flags_are_booleans(call, value):
    # a truthy string or an array is a mistake, not a choice (the backward's bias says whether
    # the layer has one: an array of its values is refused, None means none)
    if value is None and call.endswith(" bias"):
        FLAG_CALLS[call](value)
        return
    with pytest.raises(TypeError, match=call.split()[-1] + " must be True or False"):
        FLAG_CALLS[call](value)


@pytest.mark.parametrize("value", [True, False, 1, 0, np.bool_(True), np.bool_(False)], ids=repr)
@pytest.mark.parametrize("call", sorted(FLAG_CALLS))
def test_flags_take_bools_and_one_or_zero(call, value):
    FLAG_CALLS[call](value)


@pytest.mark.parametrize("dtype", BAD_ARRAY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_non_float_arrays(dtype):
    x = np.ones(N, dtype=dtype)
    for function in (fd.dropout, fd.dropout_backward):
        out = _sentinel_out()
        info = _assert_out_untouched(lambda: function(x, 0.5, seed=1, out=out), TypeError, out)
        if dtype is not object:
            assert np.dtype(dtype).name in str(info.value)
        with pytest.raises(TypeError):
            function(x, 0.5, seed=1)


@pytest.mark.parametrize("x", ["abc", None, object()], ids=repr)
def test_non_arrays(x):
    with pytest.raises(TypeError):
        fd.dropout(x, 0.5, seed=1)


@pytest.mark.parametrize("shape", [(N + 1,), (N - 1,), (N, 1), (1, N), (), (0,)], ids=str)
def test_out_wrong_shape(shape):
    x = _x()
    for function in (fd.dropout, fd.dropout_backward):
        out = _sentinel_out(shape)
        _assert_out_untouched(lambda: function(x, 0.5, seed=1, out=out), ValueError, out)
    out = _sentinel_out(shape)
    _assert_out_untouched(
        lambda: fd.dropout(x, 0.5, seed=1, training=False, out=out), ValueError, out
    )


def test_out_wrong_shape_message():
    with pytest.raises(ValueError, match=str(N + 1)):
        fd.dropout(_x(), 0.5, seed=1, out=_sentinel_out((N + 1,)))


@pytest.mark.parametrize("out_dtype", [np.float64, np.float16, np.int32, np.uint32, np.complex64])
def test_out_wrong_dtype(out_dtype):
    x = _x()  # float32
    for function in (fd.dropout, fd.dropout_backward):
        out = _sentinel_out(dtype=out_dtype)
        _assert_out_untouched(lambda: function(x, 0.5, seed=1, out=out), TypeError, out)
    out = _sentinel_out(dtype=out_dtype)
    _assert_out_untouched(
        lambda: fd.dropout(x, 0.5, seed=1, training=False, out=out), TypeError, out
    )


def test_out_float32_for_float64_input():
    x = sample_values(N, np.float64)
    out = _sentinel_out(dtype=np.float32)
    _assert_out_untouched(lambda: fd.dropout(x, 0.5, seed=1, out=out), TypeError, out)


def test_out_read_only():
    x = _x()
    for function in (fd.dropout, fd.dropout_backward):
        out = _sentinel_out()
        out.flags.writeable = False
        _assert_out_untouched(lambda: function(x, 0.5, seed=1, out=out), ValueError, out)
    broadcast = np.broadcast_to(np.float32(SENTINEL), (N,))
    _assert_out_untouched(lambda: fd.dropout(x, 0.5, seed=1, out=broadcast), ValueError, broadcast)


@pytest.mark.parametrize("out", [[0.0] * N, (0.0,) * N, "out"], ids=["list", "tuple", "str"])
def test_out_not_an_array(out):
    with pytest.raises(TypeError):
        fd.dropout(_x(), 0.5, seed=1, out=out)


def test_out_untouched_when_p_and_out_both_bad():
    # Whichever error wins, nothing is written.
    x = _x()
    out = _sentinel_out()
    _assert_out_untouched(lambda: fd.dropout(x, 0.5, seed=-1, out=out), ValueError, out)
    _assert_out_untouched(
        lambda: fd.dropout(x, 2.0, seed=1, offset=1.0, out=out), (TypeError, ValueError), out
    )


# ---------------------------------------------------------------------------------------------
# dropout_mask shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(-1,), (3, -2), -5], ids=str)
def test_mask_negative_shape(shape):
    with pytest.raises(ValueError):
        fd.dropout_mask(shape, 0.5, seed=1)


@pytest.mark.parametrize("shape", [(2.0,), (3, "4"), "abc", None, (1.5, 2)], ids=str)
def test_mask_shape_wrong_type(shape):
    with pytest.raises(TypeError):
        fd.dropout_mask(shape, 0.5, seed=1)


def test_mask_shape_too_large_does_not_crash():
    # The element count overflows 64 bits: refuse it rather than allocate or wrap around.
    with pytest.raises((ValueError, OverflowError, MemoryError)):
        fd.dropout_mask((2**40, 2**40), 0.5, seed=1)
    with pytest.raises((ValueError, OverflowError, MemoryError)):
        fd.dropout_mask((2**62, 4), 0.5, seed=1, packed=True)


# ---------------------------------------------------------------------------------------------
# Threads, backends and the private _core entry points
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, -8])
def test_set_num_threads_rejects_non_positive(n):
    before = fd.get_num_threads()
    with pytest.raises(ValueError):
        fd.set_num_threads(n)
    assert fd.get_num_threads() == before


@pytest.mark.parametrize("n", [1.5, "2", None])
def test_set_num_threads_wrong_type(n):
    with pytest.raises(TypeError):
        fd.set_num_threads(n)


def test_available_backends():
    names = fd.available_backends()
    order = ["scalar", "avx2", "avx512"]
    assert names, "at least the scalar backend must be available"
    assert names[0] == "scalar"
    assert set(names) <= set(order)
    assert names == sorted(names, key=order.index)
    assert fd.backend() in names


@pytest.mark.parametrize("name", ["bogus", "", "AVX2x", "sse"])
def test_set_backend_rejects_unknown(name):
    before = fd.backend()
    with pytest.raises(ValueError, match=name or "backend"):
        fd._core.set_backend(name)
    assert fd.backend() == before


def test_set_backend_rejects_unsupported():
    missing = [b for b in ["avx2", "avx512"] if b not in fd.available_backends()]
    if not missing:
        pytest.skip("this CPU supports every backend")
    before = fd.backend()
    for name in missing:
        with pytest.raises(ValueError, match=name):
            fd._core.set_backend(name)
    assert fd.backend() == before


def test_set_backend_round_trip(backend):
    assert fd.backend() == backend


@pytest.mark.parametrize("rounds", [-1, 1000, 2**40])
def test_core_philox_rejects_rounds(rounds):
    with pytest.raises((ValueError, TypeError, OverflowError)):
        fd._core.philox4x32(np.zeros((2, 4), np.uint32), np.zeros(2, np.uint32), rounds)


@pytest.mark.parametrize(
    ("counter", "key"),
    [
        (np.zeros((2, 3), np.uint32), np.zeros(2, np.uint32)),
        (np.zeros((2, 5), np.uint32), np.zeros(2, np.uint32)),
        (np.zeros(8, np.uint32), np.zeros(2, np.uint32)),
        (np.zeros((2, 4), np.uint32), np.zeros(1, np.uint32)),
        (np.zeros((2, 4), np.uint32), np.zeros(3, np.uint32)),
        (np.zeros((2, 4), np.float64), np.zeros(2, np.uint32)),
        (np.zeros((2, 4), np.uint32), np.zeros(2, np.float32)),
    ],
)
def test_core_philox_rejects_bad_arrays(counter, key):
    with pytest.raises((ValueError, TypeError)):
        fd._core.philox4x32(counter, key, 10)


@pytest.mark.parametrize(
    ("n", "seed", "offset"), [(-1, 0, 0), (4, -1, 0), (4, 0, 2**64), (4, 2**64, 0)]
)
def test_core_random_words_rejects_bad_values(n, seed, offset):
    with pytest.raises((ValueError, TypeError, OverflowError)):
        fd._core.random_words(n, seed, offset)


_CHILD = textwrap.dedent(
    """
    import numpy as np
    try:
        import fastdropout as fd
        y = fd.dropout(np.ones(64, np.float32), 0.5, seed=1)
    except (ImportError, ValueError) as exc:
        print("REFUSED", type(exc).__name__, exc)
        raise SystemExit(3)
    print("RAN", fd.backend(), np.packbits(y != 0, bitorder="little").tobytes().hex())
    """
)


def _run_child(backend_name):
    env = dict(os.environ)
    env["FASTDROPOUT_BACKEND"] = backend_name
    package_root = str(Path(fd.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_env_backend_unknown_is_a_clear_error():
    child = _run_child("bogus")
    output = child.stdout + child.stderr
    assert child.returncode == 3, output  # a Python exception, not a signal or a crash
    assert "bogus" in output


def test_env_backend_unsupported_is_a_clear_error():
    missing = [b for b in ["avx2", "avx512"] if b not in fd.available_backends()]
    if not missing:
        pytest.skip("this CPU supports every backend")
    for name in missing:
        child = _run_child(name)
        output = child.stdout + child.stderr
        assert child.returncode == 3, output
        assert name in output


@pytest.mark.parametrize("name", fd.available_backends())
def test_env_backend_is_honoured(name):
    child = _run_child(name)
    output = child.stdout + child.stderr
    assert child.returncode == 0, output
    expected = ref.dropout_mask((64,), 0.5, seed=1, packed=True).tobytes().hex()
    assert child.stdout.split() == ["RAN", name, expected]


# ---------------------------------------------------------------------------------------------
# The reference validates the same way
# ---------------------------------------------------------------------------------------------


def test_reference_validation():
    x = np.ones(4, np.float32)
    for p in BAD_P_VALUES:
        with pytest.raises(ValueError):
            ref.dropout(x, p, seed=1)
    for p in ["0.5", None, 0.5j, True]:
        with pytest.raises(TypeError):
            ref.threshold(p)
    for value in BAD_U64_VALUES:
        with pytest.raises(ValueError):
            ref.dropout(x, 0.5, seed=value)
        with pytest.raises(ValueError):
            ref.dropout_mask((4,), 0.5, seed=1, offset=value)
    for value in [*BAD_U64_TYPES, True]:
        with pytest.raises(TypeError):
            ref.random_words(4, value, 0)
        with pytest.raises(TypeError):
            ref.random_words(4, 0, value)
    for dtype in BAD_ARRAY_DTYPES:
        with pytest.raises(TypeError):
            ref.dropout(np.ones(3, dtype), 0.5, seed=1)
    with pytest.raises(ValueError):
        ref.dropout_mask((-1,), 0.5, seed=1)
    with pytest.raises(TypeError):
        ref.philox4x32(np.zeros((1, 4), np.int64), np.zeros(2, np.uint32))
    with pytest.raises(ValueError):
        ref.philox4x32(np.zeros((1, 3), np.uint32), np.zeros(2, np.uint32))


# --- what a newcomer trips over ------------------------------------------------------------


def test_torch_tensors_given_to_the_numpy_api_name_fastdropout_torch():
    torch = pytest.importorskip("torch")
    for call in (lambda t: fd.dropout(t, 0.5, seed=1), lambda t: fd.dropout_backward(t, 0.5, seed=1),
                 lambda t: fd.dropout_dense(t, np.ones((2, 3), np.float32), seed=1)):
        with pytest.raises(TypeError, match="fastdropout.torch"):
            call(torch.ones(4, 3))


def test_set_num_threads_above_the_cores_warns():
    import os
    previous = fd.get_num_threads()
    try:
        with pytest.warns(fd.OversubscriptionWarning, match="cores"):
            fd.set_num_threads((os.cpu_count() or 1) + 1)
        with pytest.warns(fd.OversubscriptionWarning, match="capped at 65536 threads"):
            fd.set_num_threads(2 ** 31)
        assert fd.get_num_threads() == 65536
    finally:
        fd.set_num_threads(previous)


def test_version_flag(capsys):
    from fastdropout.__main__ import main
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastdropout {fd.__version__}"


@pytest.mark.parametrize("bad", [-0.5, float("nan"), 1.5])
def test_layer_p_assigned_after_construction_is_checked_when_used(bad):
    import fastdropout.nn as fnn
    for layer in (fnn.Dropout(0.5, seed=0), fnn.DropoutDense(4, 3, p=0.5, seed=0)):
        layer.p = bad
        with pytest.raises(ValueError, match="p must be in"):
            layer(np.ones((2, 4), np.float32))


def test_dropout_drawn_from_a_generator_can_be_backpropagated():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    g = fd.Generator(seed=5)
    y, (seed, offset) = fd.dropout(x, 0.3, generator=g, return_stream=True)
    assert (seed, offset) == (5, 0) and g.offset == 1000
    dx = fd.dropout_backward(np.ones_like(x), 0.3, seed=seed, offset=offset)
    np.testing.assert_array_equal(dx != 0, y != 0)  # the very mask of the forward
    y2, stream = fd.dropout(x, 0.3, generator=g, return_stream=True)
    assert stream == (5, 1000) and not np.array_equal(y2 != 0, y != 0)
    assert fd.dropout(x, 0.3, training=False, return_stream=True)[1] == (None, None)
    with pytest.raises(TypeError):
        fd.dropout_backward(np.ones_like(x), 0.3, generator=g)  # the backward never draws
