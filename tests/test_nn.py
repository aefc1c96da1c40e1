"""fastdropout.nn: layers, losses, optimizers and MC dropout (NumPy only).

What is checked:

* ``Dropout`` and ``DropoutDense`` apply the mask of the ``(seed, offset)`` they draw from their
  generator, bit for bit, and their forward and gradients match ``fastdropout.reference`` within
  float32 GEMM error, on every backend; ``Dense`` matches ``reference.dense``;
* between forward and backward a layer keeps its input (the same object), the pre-activation
  and two integers: no mask;
* eval mode is the identity for dropout and draws nothing; gradients accumulate;
* initialisation follows ``torch.nn.Linear`` (U(-1/sqrt(in), 1/sqrt(in))) and is reproducible
  from a seed, a Generator or ``fastdropout.manual_seed``;
* state dicts (torch-style keys), ``.npz`` save/load, strict loading that writes nothing on error;
* losses against hand computation and finite differences; SGD and Adam against the formulas
  of ``torch.optim`` (and against torch itself when it is installed);
* a short training run decreases the loss; ``mc_predict`` restores modes and matches manual
  passes; bad arguments raise TypeError/ValueError, misuse RuntimeError.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastdropout as fd
import fastdropout.nn as nn
from fastdropout import reference as ref


def assert_gemm_close(actual, expected, k_inner):
    """``max|a - b| / max|b|`` within the error of a float32 GEMM with inner dimension k."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(np.max(np.abs(expected), initial=0.0), 1e-30)
    err = np.max(np.abs(actual - expected), initial=0.0) / scale
    assert err <= max(4 * k_inner * 2.0**-24, 2.0**-20), err


def data(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_layer_uses_drawn_stream(backend, dtype):
    gen = fd.Generator(7)
    layer = nn.Dropout(0.3, generator=gen)
    x = data((6, 5)).astype(dtype)
    y1 = layer.forward(x)
    assert y1.dtype == dtype
    np.testing.assert_array_equal(y1, ref.dropout(x, 0.3, seed=7, offset=0))
    g = data((6, 5), seed=1).astype(dtype)
    np.testing.assert_array_equal(layer.backward(g), ref.dropout_backward(g, 0.3, seed=7, offset=0))
    # The next call draws the next disjoint range: 30 elements rounded up to 32.
    y2 = layer.forward(x)
    np.testing.assert_array_equal(y2, ref.dropout(x, 0.3, seed=7, offset=32))
    assert gen.offset == 64


def test_dropout_layer_eval_is_identity_and_draws_nothing(backend):
    gen = fd.Generator(1)
    layer = nn.Dropout(0.5, generator=gen).eval()
    x = data((4, 3))
    assert layer.forward(x) is x
    g = data((4, 3), seed=2)
    assert layer.backward(g) is g
    assert gen.offset == 0


def test_dropout_layer_converts_other_real_dtypes():
    y = nn.Dropout(0.0, seed=0).forward(np.arange(6, dtype=np.int32))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, np.arange(6))


def test_dropout_layer_grad_shape_checked():
    layer = nn.Dropout(0.5, seed=0)
    layer.forward(data((3, 4)))
    with pytest.raises(ValueError, match="shape"):
        layer.backward(data((4, 3)))


# ---------------------------------------------------------------------------------------------
# DropoutDense and Dense
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 17), (2, 3, 17), (17,)])
def test_dropout_dense_matches_reference(backend, activation, bias, shape):
    gen = fd.Generator(11)
    gen.draw(5)  # a non-zero offset that is not a multiple of the element count
    layer = nn.DropoutDense(17, 9, p=0.4, bias=bias, activation=activation, generator=gen)
    x = data(shape)
    seed, offset = gen.get_state()["seed"], gen.get_state()["offset"]
    y = layer.forward(x)
    y_ref, z_ref = ref.dropout_dense(
        x, layer.weight, layer.bias, 0.4, seed=seed, offset=offset, activation=activation, return_preactivation=True
    )
    assert y.dtype == np.float32 and y.shape == shape[:-1] + (9,)
    assert_gemm_close(y, y_ref, 17)

    g = data(shape[:-1] + (9,), seed=3)
    grad_x = layer.backward(g)
    gx_ref, gw_ref, gb_ref = ref.dropout_dense_backward(
        g, x, layer.weight, 0.4, seed=seed, offset=offset, activation=activation, preactivation=z_ref, bias=bias
    )
    assert_gemm_close(grad_x, gx_ref, 9)
    assert_gemm_close(layer.grad_weight, gw_ref, max(1, x.size // 17))
    if bias:
        assert_gemm_close(layer.grad_bias, gb_ref, max(1, x.size // 17))
    else:
        assert layer.bias is None and layer.grad_bias is None
    # Dropped inputs get exactly zero gradient: the backward regenerated the forward's mask.
    keep = fd.dropout_mask(x.shape, 0.4, seed=seed, offset=offset)
    assert np.all(grad_x[~keep] == 0.0)


def test_dropout_dense_mask_is_exactly_dropout_of_input(backend):
    """With identity weights the output is the dropped input itself, bit for bit."""
    layer = nn.DropoutDense(8, 8, p=0.5, bias=False, seed=3)
    layer.weight[...] = np.eye(8, dtype=np.float32)
    x = data((10, 8))
    y = layer.forward(x)
    np.testing.assert_array_equal(y, ref.dropout(x, 0.5, seed=3, offset=_init_draw(8, 8, False)))


def _init_draw(n_in, n_out, bias):
    """Where a fresh Generator's offset stands after a layer's initialisation."""
    n = n_in * n_out + (n_out if bias else 0)
    return -(-n // 4) * 4


def test_saved_state_is_input_preactivation_and_stream():
    layer = nn.DropoutDense(6, 4, p=0.5, activation="relu", seed=0)
    x = data((3, 6))
    layer.forward(x)
    saved = layer._saved
    arrays = [s for s in saved if isinstance(s, np.ndarray)]
    assert arrays[0] is x  # the input itself, not a copy
    assert len(arrays) == 2 and arrays[1].shape == (3, 4)  # plus the pre-activation
    assert not any(a.dtype == np.bool_ or a.dtype == np.uint8 for a in arrays)
    assert sum(isinstance(s, int) and not isinstance(s, bool) for s in saved) == 2  # seed, offset
    layer.backward(data((3, 4)))
    assert layer._saved is not saved  # released after the backward


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_dense_matches_reference(backend, activation):
    layer = nn.Dense(13, 5, activation=activation, seed=2)
    x = data((4, 13))
    y = layer.forward(x)
    assert_gemm_close(y, ref.dense(x, layer.weight, layer.bias, activation=activation), 13)
    z = ref.dense(x, layer.weight, layer.bias)
    g = data((4, 5), seed=1)
    gx = layer.backward(g)
    gx_ref, gw_ref, gb_ref = ref.dropout_dense_backward(
        g, x, layer.weight, 0.0, seed=0, activation=activation, preactivation=z
    )
    assert_gemm_close(gx, gx_ref, 5)
    assert_gemm_close(layer.grad_weight, gw_ref, 4)
    assert_gemm_close(layer.grad_bias, gb_ref, 4)


def test_eval_mode_dense_draws_nothing_and_backward_works(backend):
    gen = fd.Generator(5)
    layer = nn.DropoutDense(7, 3, p=0.5, generator=gen)
    before = gen.offset
    layer.eval()
    x = data((2, 7))
    assert_gemm_close(layer(x), ref.dense(x, layer.weight, layer.bias), 7)
    assert gen.offset == before
    gx = layer.backward(np.ones((2, 3), np.float32))
    assert_gemm_close(gx, np.ones((2, 3)) @ layer.weight.astype(np.float64), 3)


def test_float64_input_is_converted():
    layer = nn.Dense(3, 2, seed=0)
    y = layer.forward(np.ones((1, 3)))
    assert y.dtype == np.float32
    assert layer.backward(np.ones((1, 2))).dtype == np.float32


def test_gradients_accumulate_until_zero_grad():
    layer = nn.DropoutDense(4, 3, p=0.0, seed=0)
    x, g = data((5, 4)), data((5, 3), seed=1)
    layer.forward(x)
    layer.backward(g)
    once = layer.grad_weight.copy(), layer.grad_bias.copy()
    layer.forward(x)
    layer.backward(g)
    np.testing.assert_allclose(layer.grad_weight, 2 * once[0], rtol=1e-6)
    np.testing.assert_allclose(layer.grad_bias, 2 * once[1], rtol=1e-6)
    layer.zero_grad()
    assert not layer.grad_weight.any() and not layer.grad_bias.any()


def test_backward_needs_a_forward():
    layer = nn.DropoutDense(4, 3, seed=0)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(data((1, 3)))
    layer.forward(data((1, 4)))
    layer.backward(data((1, 3)))
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(data((1, 3)))
    with pytest.raises(RuntimeError, match="forward"):
        nn.Dropout(0.5, seed=0).backward(data((1, 3)))


# ---------------------------------------------------------------------------------------------
# Initialisation and reproducibility
# ---------------------------------------------------------------------------------------------


def test_init_follows_torch_linear():
    layer = nn.DropoutDense(400, 300, seed=0)
    bound = 1 / math.sqrt(400)
    for a in (layer.weight, layer.bias):
        assert a.dtype == np.float32
        assert np.all(np.abs(a) <= bound)
    w = layer.weight.astype(np.float64)
    assert abs(w.mean()) < 0.01 * bound
    assert abs(w.var() / (bound**2 / 3) - 1) < 0.02  # variance of U(-b, b)
    assert np.abs(w).max() > 0.999 * bound
    assert layer.bias.shape == (300,) and np.abs(layer.bias).max() > 0.9 * bound


def test_seed_generator_and_manual_seed_reproduce():
    def run(**kwargs):
        model = nn.Sequential(nn.DropoutDense(5, 6, p=0.5, activation="relu", **kwargs), nn.Dropout(0.5, **kwargs))
        return model.state_dict(), model(data((3, 5))), model(data((3, 5)))

    for make in (lambda: {"seed": 9}, lambda: {"generator": fd.Generator(9)}):
        a, b = run(**make()), run(**make())
        for k in a[0]:
            np.testing.assert_array_equal(a[0][k], b[0][k])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
        assert not np.array_equal(a[1], a[2])  # fresh masks on each call

    fd.manual_seed(123)
    a = run()
    fd.manual_seed(123)
    b = run()
    np.testing.assert_array_equal(a[0]["0.weight"], b[0]["0.weight"])
    np.testing.assert_array_equal(a[2], b[2])


def test_seed_and_generator_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        nn.Dropout(0.5, seed=1, generator=fd.Generator(1))
    with pytest.raises(TypeError, match="Generator"):
        nn.DropoutDense(3, 3, generator=np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Sequential, state dicts
# ---------------------------------------------------------------------------------------------


def make_model(seed=0, p=0.5):
    gen = fd.Generator(seed)
    return nn.Sequential(
        nn.DropoutDense(6, 8, p=0.2, activation="relu", generator=gen),
        nn.Dropout(p, generator=gen),
        nn.Dense(8, 3, generator=gen),
    )


def test_sequential_forward_backward_chain(backend):
    model = make_model()
    x = data((4, 6))
    y = model(x)
    manual = x
    g = fd.Generator(0)
    [g.draw(n) for n in (6 * 8 + 8, 8 * 3 + 3)]  # the initialisation draws
    s0, o0 = g.draw(x.size)
    h = ref.dropout_dense(x, model[0].weight, model[0].bias, 0.2, seed=s0, offset=o0, activation="relu")
    s1, o1 = g.draw(h.size)
    manual = ref.dense(ref.dropout(h.astype(np.float32), 0.5, seed=s1, offset=o1), model[2].weight, model[2].bias)
    assert_gemm_close(y, manual, 8)
    grad_x = model.backward(np.ones_like(y))
    assert grad_x.shape == x.shape
    assert len(model) == 3 and list(model)[1] is model[1]
    assert "DropoutDense" in repr(model)


def test_train_eval_propagate():
    model = make_model()
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_state_dict_keys_and_roundtrip(tmp_path):
    a, b = make_model(0), make_model(1)
    state = a.state_dict()
    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    state["0.weight"][...] = 0  # a copy: the model is untouched
    assert a[0].weight.any()
    b_weight = b[0].weight
    b.load_state_dict(a.state_dict())
    assert b[0].weight is b_weight  # loaded in place
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)

    path = tmp_path / "model.npz"
    a.save(path)
    c = make_model(2)
    c.load(path)
    x = data((3, 6))
    np.testing.assert_array_equal(a.eval()(x), c.eval()(x))


def test_load_state_dict_is_strict_and_atomic():
    model = make_model()
    before = model.state_dict()
    bad = dict(before)
    del bad["2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['2.bias'\]"):
        model.load_state_dict(bad)
    bad = {k: np.zeros_like(v) for k, v in before.items()}
    bad["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        model.load_state_dict(bad)
    bad = {k: np.zeros_like(v) for k, v in before.items()}
    bad["2.weight"] = np.zeros((8, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():  # nothing was written
        np.testing.assert_array_equal(before[k], v)
    with pytest.raises(TypeError):
        model.load_state_dict([("0.weight", 1)])


def test_sequential_rejects_non_modules():
    with pytest.raises(TypeError, match="layer 1"):
        nn.Sequential(nn.Dropout(0.5), lambda x: x)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: nn.DropoutDense(0, 3), ValueError, "in_features"),
        (lambda: nn.DropoutDense(3, 2.5), TypeError, "out_features"),
        (lambda: nn.DropoutDense(3, 3, p=1.5), ValueError, "p must be"),
        (lambda: nn.Dropout(float("nan")), ValueError, "p must be"),
        (lambda: nn.Dense(3, 3, activation="tanh"), ValueError, "activation"),
        (lambda: nn.Dense(3, 3, seed=-1), ValueError, "seed"),
        (lambda: nn.Dense(3, 2, seed=0)(data((2, 4))), ValueError, r"\(\.\.\., 3\)"),
        (lambda: nn.Dense(3, 2, seed=0)(np.ones((2, 3), np.complex64)), TypeError, "real numbers"),
        (lambda: nn.Dense(3, 2, seed=0)("abc"), TypeError, "NumPy array"),
    ],
)
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_cross_entropy_value_and_gradient():
    logits = np.random.default_rng(0).standard_normal((5, 4)) * 3
    target = np.array([0, 3, 1, 1, 2])
    loss, grad = nn.cross_entropy(logits, target)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert loss == pytest.approx(-logp[np.arange(5), target].mean(), rel=1e-12)
    eps = 1e-6
    for i, j in [(0, 0), (1, 3), (4, 1)]:
        bumped = logits.copy()
        bumped[i, j] += eps
        numeric = (nn.cross_entropy(bumped, target)[0] - nn.cross_entropy(logits - 0, target)[0]) / eps
        assert grad[i, j] == pytest.approx(numeric, abs=1e-5)
    assert grad.dtype == np.float32
    # Large logits do not overflow.
    assert np.isfinite(nn.cross_entropy(np.array([[1e4, 0.0]]), np.array([1]))[0])


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        nn.cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        nn.cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        nn.cross_entropy(np.zeros(3), np.array([0]))


def test_mse_loss_and_softmax():
    pred, target = np.array([[1.0, 2.0]]), np.array([[0.0, 4.0]])
    loss, grad = nn.mse_loss(pred, target)
    assert loss == pytest.approx(2.5)
    np.testing.assert_allclose(grad, [[1.0, -2.0]])
    s = nn.softmax(np.array([[0.0, 1000.0], [1.0, 1.0]]))
    np.testing.assert_allclose(s, [[0.0, 1.0], [0.5, 0.5]])


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------


def test_sgd_momentum_weight_decay_formula():
    p = np.array([1.0, -2.0], np.float32)
    g = np.array([0.5, 0.25], np.float32)
    opt = nn.SGD([(p, g)], lr=0.1, momentum=0.9, weight_decay=0.01)
    expected = p.astype(np.float64)
    buf = None
    for _ in range(3):
        d = g + 0.01 * expected
        buf = d if buf is None else 0.9 * buf + d
        expected = expected - 0.1 * buf
        opt.step()
    np.testing.assert_allclose(p, expected, rtol=1e-6)


def test_adam_formula():
    p = np.array([1.0, -2.0, 0.5], np.float32)
    g = np.array([0.5, -0.25, 1e-4], np.float32)
    opt = nn.Adam([(p, g)], lr=0.01, weight_decay=0.1)
    expected, m, v = p.astype(np.float64), 0.0, 0.0
    for t in range(1, 4):
        d = g + 0.1 * expected
        m = 0.9 * m + 0.1 * d
        v = 0.999 * v + 0.001 * d * d
        expected = expected - 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        opt.step()
    np.testing.assert_allclose(p, expected, rtol=1e-5)


@pytest.mark.parametrize("which", ["sgd", "sgd-nesterov", "adam"])
def test_optimizers_match_torch(which):
    torch = pytest.importorskip("torch")
    w0 = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    grads = [np.random.default_rng(i).standard_normal((3, 4)).astype(np.float32) for i in range(1, 5)]
    p, g = w0.copy(), np.zeros_like(w0)
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    if which == "adam":
        ours = nn.Adam([(p, g)], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
        theirs = torch.optim.Adam([tp], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    else:
        nesterov = which == "sgd-nesterov"
        ours = nn.SGD([(p, g)], lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
        theirs = torch.optim.SGD([tp], lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    for grad in grads:
        g[...] = grad
        tp.grad = torch.from_numpy(grad.copy())
        ours.step()
        theirs.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_optimizer_tracks_module_and_zero_grad():
    model = make_model()
    opt = nn.SGD(model, lr=0.1)
    w = model[0].weight.copy()
    model(data((2, 6)))
    model.backward(np.ones((2, 3), np.float32))
    opt.step()
    assert not np.array_equal(model[0].weight, w)
    opt.zero_grad()
    assert not any(g.any() for g in model.gradients())


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda m: nn.SGD(m.parameters(), lr=0.1), TypeError),
        (lambda m: nn.SGD(m, lr=-1.0), ValueError),
        (lambda m: nn.SGD(m, lr=0.1, nesterov=True), ValueError),
        (lambda m: nn.Adam(m, betas=(0.9, 1.0)), ValueError),
        (lambda m: nn.Adam(m, betas=0.9), TypeError),
        (lambda m: nn.Adam(m, lr="fast"), TypeError),
        (lambda m: nn.SGD([(np.zeros(2), np.zeros(3))]), ValueError),
        (lambda m: nn.SGD(5), TypeError),
    ],
)
def test_optimizer_errors(call, exc):
    with pytest.raises(exc):
        call(make_model())


# ---------------------------------------------------------------------------------------------
# Training and MC dropout
# ---------------------------------------------------------------------------------------------


def test_short_training_run_decreases_loss():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 10)).astype(np.float32)
    y = (x[:, :3].sum(1) > 0).astype(np.int64) + 2 * (x[:, 3] > 0)
    model = nn.Sequential(
        nn.DropoutDense(10, 64, p=0.1, activation="relu", seed=0), nn.DropoutDense(64, 4, p=0.3, seed=1)
    )
    opt = nn.Adam(model, lr=1e-2)
    model.eval()
    first = nn.cross_entropy(model(x), y)[0]
    model.train()
    for step in range(60):
        idx = rng.choice(256, 32, replace=False)
        loss, grad = nn.cross_entropy(model(x[idx]), y[idx])
        model.zero_grad()
        model.backward(grad)
        opt.step()
    model.eval()
    last = nn.cross_entropy(model(x), y)[0]
    assert last < 0.5 * first


def test_mc_predict_matches_manual_passes_and_restores_modes(backend):
    gen = fd.Generator(4)
    model = nn.Sequential(
        nn.DropoutDense(5, 16, p=0.5, activation="relu", generator=gen), nn.DropoutDense(16, 3, p=0.5, generator=gen)
    )
    model.eval()
    model[1].train()
    x = data((7, 5))
    state = gen.get_state()
    mean, std = nn.mc_predict(model, x, samples=8, transform=nn.softmax)
    assert not model.training and not model[0].training and model[1].training
    gen.set_state(state)
    model.train()
    outs = np.stack([nn.softmax(model(x)) for _ in range(8)]).astype(np.float64)
    np.testing.assert_allclose(mean, outs.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(std, outs.std(0), rtol=1e-4, atol=1e-6)
    assert mean.dtype == np.float32 and np.all(std > 0)
    np.testing.assert_allclose(mean.sum(1), 1.0, rtol=1e-5)


def test_mc_predict_without_dropout_has_zero_spread():
    model = nn.Sequential(nn.Dense(4, 3, seed=0))
    mean, std = nn.mc_predict(model, data((2, 4)), samples=3)
    assert not std.any()
    np.testing.assert_allclose(mean, model(data((2, 4))), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, exc",
    [({"samples": 0}, ValueError), ({"samples": 2.0}, TypeError), ({"transform": 3}, TypeError)],
)
def test_mc_predict_errors(kwargs, exc):
    with pytest.raises(exc):
        nn.mc_predict(make_model(), data((1, 6)), **kwargs)
    with pytest.raises(TypeError, match="Module"):
        nn.mc_predict(lambda x: x, data((1, 6)))
