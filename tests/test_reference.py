"""The NumPy reference's dense layers checked on their own (no kernel involved):
known values, composition with the reference dropout, and gradients by finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_bits_equal

from fastdropout import reference as ref

ACTIVATIONS = [None, "relu", "gelu"]


def _problem(dtype=np.float64, lead=(2, 3), in_features=4, out_features=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, in_features)).astype(dtype)
    weight = rng.standard_normal((out_features, in_features)).astype(dtype)
    bias = rng.standard_normal(out_features).astype(dtype)
    return x, weight, bias


def test_activations_known_values():
    z = np.array([[-1.0, 0.0, 1.0, 3.0]])
    eye = np.eye(4)
    np.testing.assert_array_equal(ref.dense(z, eye, activation="relu"), [[0.0, 0.0, 1.0, 3.0]])
    gelu = ref.dense(z, eye, activation="gelu")
    # GELU(z) = z * Phi(z); Phi(1) = 0.8413447460685429, Phi(3) = 0.9986501019683699
    np.testing.assert_allclose(
        gelu, [[-0.15865525393145707, 0.0, 0.8413447460685429, 3 * 0.9986501019683699]], rtol=1e-15
    )
    np.testing.assert_array_equal(ref.dense(z, eye), z)


def test_dense_shapes_and_dtype():
    x, weight, bias = _problem(np.float32)
    y = ref.dense(x, weight, bias)
    assert y.dtype == np.float64
    assert y.shape == (2, 3, 5)
    expected = np.einsum("abi,oi->abo", x.astype(np.float64), weight.astype(np.float64)) + bias
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    assert ref.dense(x[0, 0], weight).shape == (5,)
    assert ref.dense(np.zeros((0, 4)), weight).shape == (0, 5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_dense_is_dropout_then_dense(dtype, activation):
    x, weight, bias = _problem(dtype)
    y, z = ref.dropout_dense(
        x, weight, bias, 0.4, seed=5, offset=3, activation=activation, return_preactivation=True
    )
    dropped = ref.dropout(x, 0.4, seed=5, offset=3)
    assert dropped.dtype == dtype  # the scale is rounded to x's dtype before widening
    assert_bits_equal(z, ref.dense(dropped, weight, bias))
    assert_bits_equal(y, ref.dense(dropped, weight, bias, activation=activation))
    y_only = ref.dropout_dense(x, weight, bias, 0.4, seed=5, offset=3, activation=activation)
    assert_bits_equal(y_only, y)
    eval_y = ref.dropout_dense(x, weight, bias, 0.4, seed=5, activation=activation, training=False)
    assert_bits_equal(eval_y, ref.dense(x, weight, bias, activation=activation))


def test_dropout_dense_uses_the_float32_scale():
    x = np.ones((1, 8), np.float32)
    keep = ref.dropout_mask(x.shape, 0.1, seed=2)
    z = ref.dropout_dense(x, np.eye(8, dtype=np.float32), None, 0.1, seed=2)
    np.testing.assert_array_equal(z, np.where(keep, np.float64(np.float32(1 / 0.9)), 0.0))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_finite_differences(activation):
    x, weight, bias = _problem(np.float64, seed=1)
    p, seed, offset = 0.3, 77, 2**64 - 5
    grad_out = np.random.default_rng(2).standard_normal((2, 3, 5))

    def loss(x_, weight_, bias_):
        y = ref.dropout_dense(
            x_, weight_, bias_, p, seed=seed, offset=offset, activation=activation
        )
        return float((y * grad_out).sum())

    _, z = ref.dropout_dense(
        x, weight, bias, p, seed=seed, offset=offset, activation=activation,
        return_preactivation=True,
    )
    assert np.abs(z).min() > 1e-3  # relu is differentiable at every sample point
    grad_x, grad_weight, grad_bias = ref.dropout_dense_backward(
        grad_out, x, weight, p, seed=seed, offset=offset, activation=activation, preactivation=z
    )
    assert grad_x.shape == x.shape and grad_x.dtype == np.float64
    assert grad_weight.shape == weight.shape and grad_bias.shape == bias.shape

    h = 1e-6
    for array, analytic in [(x, grad_x), (weight, grad_weight), (bias, grad_bias)]:
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            original = array[index]
            array[index] = original + h
            up = loss(x, weight, bias)
            array[index] = original - h
            down = loss(x, weight, bias)
            array[index] = original
            numeric[index] = (up - down) / (2 * h)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)

    keep = ref.dropout_mask(x.shape, p, seed=seed, offset=offset)
    assert np.all(grad_x[~keep] == 0)


def test_backward_float32_input_and_options():
    x, weight, bias = _problem(np.float32, lead=(7,), seed=3)
    grad_out = np.ones((7, 5), np.float32)
    grad_x, grad_weight, grad_bias = ref.dropout_dense_backward(grad_out, x, weight, 0.5, seed=1)
    dropped = ref.dropout(x, 0.5, seed=1).astype(np.float64)
    np.testing.assert_allclose(grad_weight, np.ones((5, 7)) @ dropped, rtol=1e-12)
    np.testing.assert_array_equal(grad_bias, np.full(5, 7.0))
    keep = ref.dropout_mask(x.shape, 0.5, seed=1)
    np.testing.assert_allclose(grad_x, np.where(keep, 2.0 * weight.astype(np.float64).sum(0), 0.0))
    _, _, no_bias = ref.dropout_dense_backward(grad_out, x, weight, 0.5, seed=1, bias=False)
    assert no_bias is None


def test_gelu_derivative_at_known_points():
    z = np.array([[0.0, 1.0, -2.0]])
    eye = np.eye(3)
    grad_x, _, _ = ref.dropout_dense_backward(
        np.ones((1, 3)), z, eye, 0.0, seed=0, activation="gelu", preactivation=z, bias=False
    )
    expected = [
        0.5 * (1 + math.erf(t / math.sqrt(2))) + t * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
        for t in (0.0, 1.0, -2.0)
    ]
    np.testing.assert_allclose(grad_x[0], expected, rtol=1e-14)
    assert grad_x[0, 0] == 0.5


def test_reference_dense_errors():
    x, weight, bias = _problem()
    with pytest.raises(ValueError):
        ref.dense(x, weight[:, :3])
    with pytest.raises(ValueError):
        ref.dense(x, weight, bias[:4])
    with pytest.raises(ValueError):
        ref.dense(x, weight[0])
    with pytest.raises(ValueError):
        ref.dense(x, weight, activation="tanh")
    with pytest.raises(TypeError):
        ref.dense(x.astype(np.int64), weight)
    with pytest.raises(ValueError, match="preactivation"):
        ref.dropout_dense_backward(np.ones((2, 3, 5)), x, weight, 0.5, seed=1, activation="relu")
    with pytest.raises(ValueError):
        ref.dropout_dense_backward(np.ones((2, 3, 4)), x, weight, 0.5, seed=1)
    with pytest.raises(ValueError):
        ref.dropout_dense(x, weight, bias, 1.5, seed=1)
