"""fastdropout.nn's dropout-family layers: each forward is its function under the generator's draw,
each backward that function's gradient; eval mode is the identity; errors."""
from __future__ import annotations

import numpy as np
import pytest

import fastdropout as fd
import fastdropout.nn as nn


def values(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("layer,shape,noise", [
    (nn.Dropout1d, (4, 3, 9), (4, 3, 1)),
    (nn.Dropout1d, (3, 9), (3, 1)),
    (nn.Dropout2d, (2, 3, 4, 5), (2, 3, 1, 1)),
    (nn.Dropout2d, (3, 4, 5), (3, 1, 1)),
    (nn.Dropout3d, (2, 3, 2, 4, 5), (2, 3, 1, 1, 1)),
    (nn.LockedDropout, (6, 2, 5), (1, 2, 5)),
])
def test_broadcast_layers(backend, layer, shape, noise):
    x, g = values(shape), values(shape, 1)
    m = layer(0.4, seed=3)
    y = m(x)
    seed, offset = fd.Generator(seed=3).draw(int(np.prod(noise)))
    assert np.array_equal(y, fd.dropout(x, 0.4, seed=seed, offset=offset, noise_shape=noise))
    assert np.array_equal(m.backward(g), fd.dropout_backward(g, 0.4, seed=seed, offset=offset, noise_shape=noise))
    m.eval()
    assert m(x) is x and m.backward(g) is g
    if layer is not nn.LockedDropout:
        with pytest.raises(ValueError):  # a wrong rank raises in eval mode too, as torch's modules do
            m(values((3,)))


@pytest.mark.parametrize("layer,fn,bwd", [
    (nn.AlphaDropout, fd.alpha_dropout, fd.alpha_dropout_backward),
    (nn.GaussianDropout, fd.gaussian_dropout, fd.gaussian_dropout_backward),
])
def test_alpha_and_gaussian_layers(backend, layer, fn, bwd):
    x, g = values((5, 7)), values((5, 7), 1)
    m = layer(0.3, seed=2)
    seed, offset = fd.Generator(seed=2).draw(35)
    assert np.array_equal(m(x), fn(x, 0.3, seed=seed, offset=offset))
    assert np.array_equal(m.backward(g), bwd(g, 0.3, seed=seed, offset=offset))


def test_feature_alpha_dropout():
    x = values((4, 3, 6))
    y = nn.FeatureAlphaDropout(0.5, seed=1)(x)
    seed, offset = fd.Generator(seed=1).draw(12)
    assert np.array_equal(y, fd.alpha_dropout(x, 0.5, seed=seed, offset=offset, noise_shape=(4, 3, 1)))
    with pytest.raises(ValueError):
        nn.FeatureAlphaDropout(0.5)(values(3))


def test_dropconnect_dense_layer_trains():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = nn.Sequential(nn.DropConnectDense(8, 32, p=0.3, activation="relu", seed=0), nn.Dense(32, 2, seed=1))
    opt = nn.SGD(model, lr=0.1, momentum=0.9)
    first = None
    for _ in range(60):
        loss, grad = nn.cross_entropy(model(x), y)
        first = loss if first is None else first
        model.zero_grad()
        model.backward(grad)
        opt.step()
    assert loss < 0.5 * first
    layer = model[0]
    assert layer.grad_weight.shape == layer.weight.shape


def test_dropout_add_layer_norm_layer():
    x, r, g = values((3, 16)), values((3, 16), 1), values((3, 16), 2)
    m = nn.DropoutAddLayerNorm(16, p=0.2, seed=4)
    y = m(x, r)
    seed, offset = fd.Generator(seed=4).draw(48)
    assert np.array_equal(y, fd.dropout_add_layer_norm(x, r, m.weight, m.bias, 0.2, seed=seed, offset=offset))
    gx, gr = m.backward(g)
    want = fd.dropout_add_layer_norm_backward(g, x, r, m.weight, m.bias, 0.2, seed=seed, offset=offset)
    assert np.array_equal(gx, want[0]) and np.array_equal(gr, want[1])
    assert np.array_equal(m.grad_weight, want[2]) and np.array_equal(m.grad_bias, want[3])
    rms = nn.DropoutAddLayerNorm(16, norm="rms", seed=1)
    assert rms.bias is None
    with pytest.raises(ValueError):
        nn.DropoutAddLayerNorm(16, norm="group")
    with pytest.raises(ValueError):
        nn.GaussianDropout(1.0)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Dropout(0.5, seed=1), (40, 30)), (lambda: nn.Dropout2d(0.5, seed=1), (4, 6, 5, 5)),
    (lambda: nn.AlphaDropout(0.5, seed=1), (40, 30)), (lambda: nn.GaussianDropout(0.5, seed=1), (40, 30)),
    (lambda: nn.DropoutDense(30, 8, 0.5, activation="relu", seed=1), (40, 30)),
    (lambda: nn.DropConnectDense(30, 8, 0.5, activation="gelu", seed=1), (40, 30)),
    (lambda: nn.DropoutAddLayerNorm(30, p=0.5, seed=1), (40, 30)),
], ids=["Dropout", "Dropout2d", "AlphaDropout", "GaussianDropout", "DropoutDense", "DropConnectDense",
        "DropoutAddLayerNorm"])
def test_backward_uses_the_forwards_hyperparameters(backend, make, shape):
    """p (and the activation, eps, norm) assigned between forward and backward do not change
    the backward: it regenerates the mask the forward applied, as torch's saved state would."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    grads = []
    for change in (False, True):
        layer = make()
        args = (x, x) if isinstance(layer, nn.DropoutAddLayerNorm) else (x,)
        y = layer.forward(*args)
        if change:
            layer.p = 0.1
            for name, value in (("activation", None), ("eps", 0.5), ("norm", "rms")):
                if hasattr(layer, name):
                    setattr(layer, name, value)
        g = layer.backward(np.ones_like(y))
        grads.append(g if isinstance(g, tuple) else (g,))
    for a, b in zip(*grads):
        assert np.array_equal(a, b)
