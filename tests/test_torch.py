"""fastdropout.torch: autograd functions and modules against torch's own ops.

What is checked:

* forward and all gradients of ``dropout_linear`` / ``DropoutLinear`` equal
  ``act(F.linear(x * mask / (1 - p), W, b))`` computed by torch, where ``mask`` is
  ``fd.dropout_mask`` for the same ``(seed, offset)``, within float32 GEMM tolerance, on every
  backend, for each activation, with and without bias, batched and 1-D inputs, non-contiguous
  inputs; ``Dropout`` equals ``x * mask / (1 - p)`` exactly in float32 and float64 and passes
  ``gradcheck`` in float64;
* the seed comes from torch's default generator (``torch.manual_seed`` reproduces a run),
  ``eval()`` turns dropout off and draws nothing;
* contiguous float32 inputs reach the kernels without a copy;
* ``DropoutLinear`` initialises exactly as ``torch.nn.Linear`` and state dicts load both ways
  (also into ``fastdropout.nn``);
* a short training run decreases the loss;
* CUDA and sparse tensors, other dtypes and bad arguments raise clear errors.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import fastdropout as fd  # noqa: E402
import fastdropout.nn as fnn  # noqa: E402
import fastdropout.torch as fdt  # noqa: E402
from fastdropout import _torch_native  # noqa: E402

ACTS = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu}

# every test here runs through both routes of the eager layer (conftest.torch_route)
pytestmark = pytest.mark.usefixtures("torch_route")


def gemm_close(actual, expected, k_inner):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-30)
    err = (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
    assert err <= max(4 * k_inner * 2.0**-24, 2.0**-20), err


def torch_mask(shape, p, seed, offset):
    return torch.from_numpy(fd.dropout_mask(tuple(shape), p, seed=seed, offset=offset))


def reference_linear(x, weight, bias, p, seed, offset, activation):
    """torch's own F.linear over torch's dropout arithmetic with fastdropout's mask."""
    scale = torch.tensor(1.0 / (1.0 - p) if p < 1 else 0.0, dtype=torch.float32)
    dropped = torch.where(torch_mask(x.shape, p, seed, offset), x * scale, torch.zeros((), dtype=x.dtype))
    return ACTS[activation](F.linear(dropped, weight, bias))


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# dropout_linear against torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 19), (2, 3, 19), (19,)])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dropout_linear_matches_torch(backend, activation, bias, shape, p):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(7, 19, generator=gen) * 0.3
    b = torch.randn(7, generator=gen) if bias else None
    seed, offset = 0xDEADBEEF12345, 6
    xs, ws, bs = leaf(x), leaf(w), None if b is None else leaf(b)
    y = fdt.dropout_linear(xs, ws, bs, p, activation=activation, seed=seed, offset=offset)
    xr, wr, br = leaf(x), leaf(w), None if b is None else leaf(b)
    y_ref = reference_linear(xr, wr, br, p, seed, offset, activation)
    gemm_close(y, y_ref, 19)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    y_ref.backward(g)
    rows = max(1, x.numel() // 19)
    gemm_close(xs.grad, xr.grad, 7)
    gemm_close(ws.grad, wr.grad, rows)
    if bias:
        gemm_close(bs.grad, br.grad, rows)
    # Dropped inputs get exactly zero gradient.
    assert torch.all(xs.grad[~torch_mask(x.shape, p, seed, offset)] == 0)


@pytest.mark.parametrize("x_grad, w_grad, b_grad", [(False, True, True), (True, False, False), (True, True, False), (False, False, True)])
def test_backward_computes_only_what_autograd_needs(backend, torch_route, monkeypatch, x_grad, w_grad, b_grad):
    asked = []
    real = fdt._ops.dense_backward_checked

    def spy(*args):
        asked.append(args[-1])  # which of (grad_x, grad_weight, grad_bias) are computed
        return real(*args)

    monkeypatch.setattr(fdt._ops, "dense_backward_checked", spy)
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(9, 19, generator=gen), torch.randn(7, 19, generator=gen), torch.randn(7, generator=gen)
    xs, ws, bs = (t.clone().requires_grad_(need) for t, need in ((x, x_grad), (w, w_grad), (b, b_grad)))
    xr, wr, br = (t.clone().requires_grad_(need) for t, need in ((x, x_grad), (w, w_grad), (b, b_grad)))
    g = torch.randn(9, 7, generator=gen)
    fdt.dropout_linear(xs, ws, bs, 0.5, activation="relu", seed=5).backward(g)
    reference_linear(xr, wr, br, 0.5, 5, 0, "relu").backward(g)
    if torch_route == "native":  # the C++ layer's own record of its last backward
        asked.append(_torch_native.module()._last_wanted())
    assert asked == [(x_grad, w_grad, b_grad)]
    for ours, theirs, need, k in ((xs, xr, x_grad, 7), (ws, wr, w_grad, 9), (bs, br, b_grad, 9)):
        if need:
            gemm_close(ours.grad, theirs.grad, k)
        else:
            assert ours.grad is None


def test_dropout_linear_non_contiguous_input(backend):
    x = torch.randn(19, 8).t()  # (8, 19), transposed strides
    w = torch.randn(5, 19)
    y = fdt.dropout_linear(x, w, None, 0.5, seed=3)
    gemm_close(y, reference_linear(x, w, None, 0.5, 3, 0, None), 19)


_THREE_TYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                                       ids=["float32", "bfloat16", "float16"])


@_THREE_TYPES
def test_dropout_linear_zero_copy(torch_route, monkeypatch, dtype):
    """float32 and bfloat16 operands reach the engine without a copy (bfloat16 as its 16-bit
    patterns); float16 ones, and a half-precision bias, as a float32 copy (the engine has no
    float16 GEMM input and takes its bias in float32)."""
    seen = {}
    real = fdt._ops.dense_forward_checked

    def spy(x, weight, bias, *args, **kwargs):
        seen.update(x=x, weight=weight, bias=bias)
        return real(x, weight, bias, *args, **kwargs)

    monkeypatch.setattr(fdt._ops, "dense_forward_checked", spy)
    layer = fdt.DropoutLinear(8, 4, dtype=dtype)
    x = torch.randn(3, 8).to(dtype)
    layer(x)
    tensors = (x, layer.weight, layer.bias)
    shared = (dtype != torch.float16, dtype != torch.float16, dtype == torch.float32)
    if torch_route == "native":  # what the C++ layer handed the engine
        for address, t, same in zip(_torch_native.module()._last_operands(), tensors, shared):
            assert address != 0 and (address == t.data_ptr()) == same
        return
    for name, t, same in zip(("x", "weight", "bias"), tensors, shared):
        bits = t.detach() if dtype == torch.float32 else t.detach().view(torch.int16)  # (numpy has no bfloat16)
        assert np.shares_memory(seen[name], bits.numpy()) == same


# ---------------------------------------------------------------------------------------------
# Dropout against torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_matches_torch_arithmetic(backend, dtype):
    x = torch.randn(4, 5, 6, dtype=dtype)
    xs = leaf(x)
    y = fdt.dropout(xs, 0.25, seed=99, offset=3)
    keep = torch_mask(x.shape, 0.25, 99, 3)
    scale = torch.tensor(1 / 0.75, dtype=dtype)
    expected = torch.where(keep, x * scale, torch.zeros((), dtype=dtype))
    assert y.dtype == dtype
    assert torch.equal(y, expected)
    g = torch.randn(x.shape, dtype=dtype)
    y.backward(g)
    assert torch.equal(xs.grad, torch.where(keep, g * scale, torch.zeros((), dtype=dtype)))


def test_dropout_gradcheck():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fdt.dropout(t, 0.4, seed=5), (x,))


def test_dropout_module_train_eval():
    layer = fdt.Dropout(0.5)
    x = torch.randn(100)
    state = torch.get_rng_state()
    y = layer(x)
    assert not torch.equal(y, x) and (y == 0).any()
    layer.eval()
    assert layer(x) is x
    torch.set_rng_state(state)
    layer.train()
    assert torch.equal(layer(x), y)
    assert "p=0.5" in repr(layer)


# ---------------------------------------------------------------------------------------------
# Randomness, modes
# ---------------------------------------------------------------------------------------------


def test_seed_drawn_from_torch_default_generator():
    layer = fdt.DropoutLinear(10, 4, p=0.5)
    x = torch.randn(3, 10)
    torch.manual_seed(1234)
    y = layer(x)
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**63 - 1, ()).item())
    gemm_close(y, reference_linear(x, layer.weight, layer.bias, 0.5, seed, 0, None), 10)
    torch.manual_seed(1234)
    assert torch.equal(layer(x), y)
    assert not torch.equal(layer(x), y)  # the next call draws a new seed


def test_eval_turns_dropout_off_and_draws_nothing(backend):
    model = torch.nn.Sequential(fdt.DropoutLinear(6, 5, p=0.9, activation="relu"), fdt.Dropout(0.5))
    model.eval()
    x = torch.randn(4, 6)
    state = torch.get_rng_state()
    y = model(x)
    assert torch.equal(torch.get_rng_state(), state)
    gemm_close(y, F.relu(F.linear(x, model[0].weight, model[0].bias)), 6)


# ---------------------------------------------------------------------------------------------
# Parameters, init, state dicts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_init_identical_to_linear(bias):
    torch.manual_seed(7)
    ours = fdt.DropoutLinear(30, 20, bias=bias)
    torch.manual_seed(7)
    theirs = torch.nn.Linear(30, 20, bias=bias)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_state_dict_roundtrip_with_linear():
    ours = fdt.DropoutLinear(8, 3, p=0.2, activation="gelu")
    linear = torch.nn.Linear(8, 3)
    linear.load_state_dict(ours.state_dict())
    assert torch.equal(linear.weight, ours.weight) and torch.equal(linear.bias, ours.bias)
    other = torch.nn.Linear(8, 3)
    ours.load_state_dict(other.state_dict())
    assert torch.equal(other.weight, ours.weight) and torch.equal(other.bias, ours.bias)
    ours.eval()
    x = torch.randn(2, 8)
    gemm_close(ours(x), F.gelu(other(x)), 8)


def test_state_dict_moves_to_fastdropout_nn():
    model = torch.nn.Sequential(fdt.DropoutLinear(6, 8, activation="relu"), fdt.DropoutLinear(8, 2))
    numpy_model = fnn.Sequential(fnn.DropoutDense(6, 8, activation="relu", seed=0), fnn.DropoutDense(8, 2, seed=0))
    numpy_model.load_state_dict(model.state_dict())
    model.eval()
    numpy_model.eval()
    x = torch.randn(3, 6)
    gemm_close(torch.from_numpy(numpy_model(x.numpy())), model(x), 8)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in numpy_model.state_dict().items()})


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_short_training_run_decreases_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long() + 2 * (x[:, 3] > 0).long()
    model = torch.nn.Sequential(
        fdt.DropoutLinear(10, 64, p=0.1, activation="relu"), fdt.DropoutLinear(64, 4, p=0.3)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        first = F.cross_entropy(model.eval()(x), y).item()
    model.train()
    for _ in range(60):
        idx = torch.randint(0, 256, (32,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = F.cross_entropy(model.eval()(x), y).item()
    assert last < 0.5 * first


def test_no_grad_inference_and_empty_batch():
    layer = fdt.DropoutLinear(4, 3)
    with torch.no_grad():
        assert layer(torch.randn(2, 4)).shape == (2, 3)
    x = torch.randn(0, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 3) and torch.equal(layer.weight.grad, torch.zeros(3, 4))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_dropout_linear_rejects_other_dtypes(dtype):
    layer = fdt.DropoutLinear(4, 2)
    with pytest.raises(TypeError, match="x must have dtype torch.float32, torch.bfloat16, torch.float16; got"):
        layer(torch.ones(2, 4, dtype=dtype))
    with pytest.raises(TypeError, match="weight must have dtype torch.float32"):
        layer.double()(torch.ones(2, 4, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropout_linear_refuses_mixed_dtypes_outside_autocast(dtype):
    with pytest.raises(TypeError, match="one dtype"):
        fdt.DropoutLinear(4, 2)(torch.ones(2, 4, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_dropout_rejects_other_dtypes(dtype):
    with pytest.raises(TypeError, match="x must have dtype torch.float32, torch.float64, torch.float16, torch.bfloat16"):
        fdt.Dropout(0.5)(torch.ones(3, dtype=dtype))


def test_non_cpu_tensors_are_refused():
    # (meta tensors are taken: shapes only, test_torch_ops.py's meta-device test)
    with pytest.raises(TypeError, match="CPU"):
        fdt.dropout(torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match="CPU"):
        fdt.Dropout2d(0.5)(torch.eye(3).to_sparse().unsqueeze(0))
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        with pytest.raises(TypeError, match="CPU"):
            fdt.DropoutLinear(4, 2).cuda()(torch.randn(2, 4, device="cuda"))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: fdt.Dropout(1.5), ValueError, "p must be"),
        (lambda: fdt.DropoutLinear(4, 2, p=-0.1), ValueError, "p must be"),
        (lambda: fdt.DropoutLinear(4, 2, activation="tanh"), ValueError, "activation"),
        (lambda: fdt.DropoutLinear(4, 2)(torch.randn(3, 5)), ValueError, "in_features"),
        (lambda: fdt.dropout(np.ones(3, np.float32)), TypeError, "torch.Tensor"),
        (lambda: fdt.dropout(torch.ones(3), seed=-1), ValueError, "seed"),
        (lambda: fdt.dropout_linear(torch.ones(2, 4), torch.ones(3, 4), torch.ones(2)), ValueError, "bias"),
    ],
)
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


_TX8, _TW38 = torch.ones(2, 8), torch.ones(3, 8)
TORCH_FLAG_CALLS = {
    "dropout training": lambda v: fdt.dropout(_TX8, 0.5, training=v),
    "dropout inplace": lambda v: fdt.dropout(_TX8.clone(), 0.5, inplace=v),
    "dropout_linear training": lambda v: fdt.dropout_linear(_TX8, _TW38, None, 0.5, training=v),
    "dropout2d training": lambda v: fdt.dropout2d(torch.ones(2, 3, 4, 4), 0.5, training=v),
    "alpha_dropout inplace": lambda v: fdt.alpha_dropout(_TX8.clone(), 0.5, True, inplace=v),
}


@pytest.mark.parametrize("value", ["yes", None, torch.ones(3), 2, 0.0], ids=repr)
@pytest.mark.parametrize("call", sorted(TORCH_FLAG_CALLS))
def test_torch_flags_are_booleans(call, value):
    """As torch's functional dropout refuses training="yes" (TypeError), so do these: a truthy
    string, None, a tensor or 2 is a mistake that would silently apply (or skip) dropout."""
    with pytest.raises(TypeError, match=call.split()[-1] + " must be True or False"):
        TORCH_FLAG_CALLS[call](value)


@pytest.mark.parametrize("value", [True, False, 1, 0], ids=repr)
@pytest.mark.parametrize("call", sorted(TORCH_FLAG_CALLS))
def test_torch_flags_take_bools_and_one_or_zero(call, value):
    TORCH_FLAG_CALLS[call](value)


def test_native_setting_from_the_environment():
    """FASTDROPOUT_TORCH_NATIVE=0 keeps the Python route (and the same result); a bad value
    is a ValueError when fastdropout.torch is imported."""
    import subprocess
    import sys

    code = ("import torch, fastdropout.torch as fdt; from fastdropout import _torch_native as n\n"
            "x, w = torch.ones(3, 4), torch.ones(2, 4)\n"
            "total = fdt.dropout_linear(x, w, None, 0.5, seed=7).sum().item()\n"
            "print(n.status(), '|', total)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "FASTDROPOUT_TORCH_NATIVE"}
    off = subprocess.run([sys.executable, "-c", code], env={**env, "FASTDROPOUT_TORCH_NATIVE": "0"},
                         capture_output=True, text=True, timeout=300)
    assert off.returncode == 0, off.stderr
    status, total = off.stdout.strip().split(" | ")
    assert status == "off (FASTDROPOUT_TORCH_NATIVE=0)"
    x, w = torch.ones(3, 4), torch.ones(2, 4)
    assert float(total) == fdt.dropout_linear(x, w, None, 0.5, seed=7).sum().item()
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "FASTDROPOUT_TORCH_NATIVE": "maybe"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "ValueError: FASTDROPOUT_TORCH_NATIVE must be one of auto, 0, 1" in bad.stderr


def test_native_layer_loads_before_fastdropout_torch_is_imported(torch_route):
    """_torch_native.module() called first in a process (as `.ci/run` and `info` may) still
    binds everything the C++ layer calls back."""
    import subprocess
    import sys

    if torch_route != "native":
        pytest.skip("the C++ route's own test")
    code = "from fastdropout import _torch_native as n; m = n.module(); print(m is not None, n.status())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "FASTDROPOUT_TORCH_NATIVE"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("True loaded"), r.stdout + r.stderr


def test_failed_build_falls_back_says_why_and_is_not_retried(tmp_path, torch_route):
    """Where the C++ layer cannot be built (here: a compiler that fails), the Python route
    serves with the same result, stderr says why, the reason is kept in the cache folder, the
    next process does not try again, and `info` reports it."""
    import subprocess
    import sys

    if torch_route != "python":
        pytest.skip("one run is enough: it starts its own processes")
    env = {k: v for k, v in __import__("os").environ.items() if k != "FASTDROPOUT_TORCH_NATIVE"}
    env.update(FASTDROPOUT_CACHE_DIR=str(tmp_path), CXX="/bin/false")
    code = ("import torch, fastdropout.torch as fdt\n"
            "print(fdt.dropout_linear(torch.ones(3, 4), torch.ones(2, 4), None, 0.5, seed=7).sum().item())\n")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    expected = fdt.dropout_linear(torch.ones(3, 4), torch.ones(2, 4), None, 0.5, seed=7).sum().item()
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert float(r.stdout) == expected
        assert "its C++ PyTorch layer is not available" in r.stderr and "the Python route serves" in r.stderr
    assert "an earlier build failed" in runs[1].stderr  # (not built again)
    kept = list(tmp_path.glob("torch_ops/*/failed.txt"))
    assert len(kept) == 1 and "/bin/false" in kept[0].read_text()
    info = subprocess.run([sys.executable, "-m", "fastdropout", "info"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert "torch layer       : Python: building the C++ layer failed" in info.stdout


@contextlib.contextmanager
def routes_in_turn():
    """For a test that runs both routes itself: yields the setter (True: the C++ layer, which
    must be buildable here, else the test is skipped; False: the Python route), and restores
    the setting after, whatever happens."""
    previous = _torch_native.set_enabled(True)
    try:
        if _torch_native.module() is None:
            pytest.skip(f"fastdropout's C++ torch layer: {_torch_native.status()}")
        yield _torch_native.set_enabled
    finally:
        _torch_native.set_enabled(previous)


@pytest.mark.parametrize("p", [0.0, 2.0**-33, 3 * 2.0**-33, 0.1, 0.375, 0.5, 1 - 2.0**-32, 1.0])
def test_routes_agree_on_the_mask_parameters_of_p(backend, p):
    """The C++ layer computes p's threshold and scale itself (engine_abi.cpp): at p = 0 and 1,
    next to 1, tiny p (p * 2**32 half-way between integers) and usual p, its output and
    gradients are the Python route's, bit for bit.  (A threshold off by one would show only
    where a Philox word equals it: this pins the scale and gross threshold errors, not the
    half-way rounding, which both sides take from the contract: round half to even.)"""
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(5, 33, generator=gen), torch.randn(7, 33, generator=gen), torch.randn(7, generator=gen)
    results = []
    with routes_in_turn() as use:
        for native in (True, False):
            use(native)
            xs, ws, bs = leaf(x), leaf(w), leaf(b)
            y = fdt.dropout_linear(xs, ws, bs, p, activation="relu", seed=9, offset=2)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), xs.grad, ws.grad, bs.grad))
    for a, c in zip(*results):
        assert torch.equal(a, c)


_HALF_TYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])


@_HALF_TYPES
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("shape", [((5, 33), 7), ((2, 3, 17), 20), ((0, 9), 4)])
def test_routes_agree_in_half_precision(backend, threads, dtype, activation, shape):
    """A bfloat16 or float16 layer takes the C++ layer as float32 does (its node is C++; bfloat16
    operands reach the engine as they are, float16 ones widened to float32): output and
    gradients are the Python route's bit for bit, in each operand's dtype, for every subset
    of gradients autograd asks for, in training and in evaluation."""
    (x_shape, n) = shape
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(x_shape, generator=gen).to(dtype)
    w, b = torch.randn(n, x_shape[-1], generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(x_shape[:-1] + (n,), generator=gen).to(dtype)
    for training, needs in ((True, (True, True, True)), (True, (False, True, False)), (True, (True, False, True)),
                            (False, (True, True, True))):
        results = []
        with routes_in_turn() as use:
            for native in (True, False):
                use(native)
                xs, ws, bs = (t.clone().requires_grad_(need) for t, need in zip((x, w, b), needs))
                y = fdt.dropout_linear(xs, ws, bs, 0.4, training=training, activation=activation, seed=8, offset=3)
                assert ("CppNode" in y.grad_fn.name()) == native
                y.backward(g)
                if native:  # the C++ layer's own record of what its backward computed
                    assert _torch_native.module()._last_wanted() == needs
                results.append((y.detach(), xs.grad, ws.grad, bs.grad))
        assert results[0][0].dtype == dtype
        for a, c, need in zip(results[0], results[1], (True,) + needs):
            if need:
                assert a.dtype == dtype and torch.equal(a, c)
            else:
                assert a is None and c is None


@_HALF_TYPES
@pytest.mark.parametrize("activation", [0, 1, 2])
def test_registered_ops_cpu_kernels_agree_in_half_precision(backend, dtype, activation):
    """fastdropout::dropout_linear and its backward, called as compiled and exported graphs
    call them: the C++ CPU kernels give the Python kernels' outputs, dtypes and state, bit
    for bit (z, the pre-activation kept for the backward, is float32)."""
    gen = torch.Generator().manual_seed(13)
    x, w, b = (torch.randn(s, generator=gen).to(dtype) for s in ((6, 21), (5, 21), (5,)))
    gy = torch.randn(6, 5, generator=gen).to(dtype)
    state = torch.tensor([7, 2], dtype=torch.int64)
    fwd, bwd = torch.ops.fastdropout.dropout_linear.default, torch.ops.fastdropout.dropout_linear_backward.default
    results = []
    with routes_in_turn() as use:
        for native in (True, False):
            use(native)
            with torch.no_grad():
                y, z, st = fwd(x, w, b, 0.3, state, activation, True)
                z_for_backward = y if activation == 1 and z.numel() == 0 else z
                grads = bwd(gy, x, w, z_for_backward, 0.3, st, activation, True, True, [True, True, True])
            results.append((y, z, st) + tuple(grads))
    for a, c in zip(*results):
        assert a.dtype == c.dtype and torch.equal(a, c)
    y, z, st, gx, gw, gb = results[0]
    assert (y.dtype, gx.dtype, gw.dtype, gb.dtype) == (dtype,) * 4
    assert z.dtype == torch.float32 and (z.shape == y.shape) == (activation != 0)


@_THREE_TYPES
@pytest.mark.parametrize("p", [2.0**-33, 0.1, 0.5, 1 - 2.0**-32, 1.0])
@pytest.mark.parametrize("shape", [(0,), (5, 33), (3, 4, 130)])
def test_routes_agree_on_dropout(backend, dtype, p, shape):
    """fastdropout.torch.dropout of a contiguous float32, bfloat16 or float16 tensor under
    autograd runs the C++ layer's own Function (its node is C++), and its output, its gradient
    for a dense and for an expanded upstream gradient (sum()'s), and the gradient through
    create_graph (the gradient's own derivative: the same mask) are the Python route's, bit
    for bit, and the float32 dropout rounded once to the dtype."""
    gen = torch.Generator().manual_seed(6)
    x, v, w = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    results = []
    with routes_in_turn() as use:
        for native in (True, False):
            use(native)
            xs, vs = leaf(x), leaf(v)
            y = fdt.dropout(xs, p, seed=11, offset=5)
            assert ("CppNode" in y.grad_fn.name()) == native
            y.sum().backward()
            g_sum = xs.grad
            xs.grad = None
            y = fdt.dropout(xs, p, seed=11, offset=5)
            (gx,) = torch.autograd.grad(y, xs, vs, create_graph=True)
            (gx * w).sum().backward()  # d/dv of <dropout(v), w> = dropout(w), the same mask
            results.append((y.detach(), g_sum, gx.detach(), vs.grad))
    for a, c in zip(*results):
        assert a.dtype == dtype and torch.equal(a, c)

    def expected(t):
        return torch.from_numpy(fd.dropout(t.float().numpy(), p, seed=11, offset=5)).to(dtype)

    y, g_sum, gx, v_grad = results[0]
    assert torch.equal(y, expected(x))
    assert torch.equal(gx, expected(v))
    assert torch.equal(v_grad, expected(w))
    assert torch.equal(g_sum, expected(torch.ones(shape)))
