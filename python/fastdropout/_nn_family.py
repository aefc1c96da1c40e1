"""fastdropout.nn's layers for the rest of the dropout family (re-exported by fastdropout.nn)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ._checks import check_p
from ._family import (
    alpha_dropout,
    alpha_dropout_backward,
    dropconnect_dense,
    dropconnect_dense_backward,
    dropout_add_layer_norm,
    dropout_add_layer_norm_backward,
    gaussian_dropout,
    gaussian_dropout_backward,
)
from ._generator import Generator

# the helpers of fastdropout.nn (imported late there, so no cycle at import time)
from .nn import (  # noqa: E402
    _NOTHING_SAVED,
    Module,
    _as_float32,
    _check_features,
    _DenseLayer,
    _MaskedLayer,
    _resolve_generator,
    _take_saved,
)


class _ChannelDropout(_MaskedLayer):
    spatial = 1

    def noise_shape(self, shape):
        ranks = (self.spatial + 1, self.spatial + 2)
        if len(shape) not in ranks:
            raise ValueError(f"{type(self).__name__} expects a {ranks[0]}-D (unbatched) or {ranks[1]}-D input, "
                             f"got shape {shape}")
        return shape[:len(shape) - self.spatial] + (1,) * self.spatial


class Dropout1d(_ChannelDropout):
    """Drops whole channels of ``(N, C, L)`` (or unbatched ``(C, L)``) inputs, as ``torch.nn.Dropout1d``:
    the mask is drawn over ``(N, C, 1)`` and broadcast (one word per channel).  ``p``, ``seed``,
    ``generator``, dtypes (float32 and float64 kept, other real dtypes as float32) and errors as
    :class:`Dropout`; an input of another rank is a ``ValueError``.

    References
    ----------
    J. Tompson, R. Goroshin, A. Jain, Y. LeCun, C. Bregler, "Efficient Object Localization Using
    Convolutional Networks", CVPR 2015 (spatial dropout).
    """

    spatial = 1


class Dropout2d(_ChannelDropout):
    """Channel dropout of ``(N, C, H, W)`` (or ``(C, H, W)``) inputs, as ``torch.nn.Dropout2d``;
    parameters, dtypes and errors as :class:`Dropout1d` (Tompson et al., CVPR 2015)."""

    spatial = 2


class Dropout3d(_ChannelDropout):
    """Channel dropout of ``(N, C, D, H, W)`` (or ``(C, D, H, W)``) inputs, as ``torch.nn.Dropout3d``;
    parameters, dtypes and errors as :class:`Dropout1d` (Tompson et al., CVPR 2015)."""

    spatial = 3


class LockedDropout(_MaskedLayer):
    """One dropout mask shared along axis ``dim`` (e.g. time): variational dropout of recurrent
    networks (Gal and Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
    Neural Networks", NeurIPS 2016), ``noise_shape`` = x's shape with 1 at ``dim``.  ``p``,
    ``seed``, ``generator``, dtypes and errors as :class:`Dropout`; ``dim`` an int (``TypeError``
    otherwise), out of range for the input a ``ValueError`` at the call."""

    def __init__(self, p: float = 0.5, dim: int = 0, *, seed: Optional[int] = None,
                 generator: Optional[Generator] = None) -> None:
        super().__init__(p, seed=seed, generator=generator)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        self.dim = int(dim)

    def noise_shape(self, shape):
        if not -len(shape) <= self.dim < len(shape):
            raise ValueError(f"dim {self.dim} is out of range for an input of shape {shape}")
        d = self.dim % len(shape)
        return shape[:d] + (1,) + shape[d + 1:]

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}"


class AlphaDropout(_MaskedLayer):
    """Alpha dropout for SELU networks (:func:`fastdropout.alpha_dropout`), as ``torch.nn.AlphaDropout``;
    parameters, dtypes and errors as :class:`Dropout` (Klambauer et al., "Self-Normalizing Neural
    Networks", NeurIPS 2017)."""

    _forward = staticmethod(alpha_dropout)
    _backward = staticmethod(alpha_dropout_backward)


class FeatureAlphaDropout(AlphaDropout):
    """Alpha dropout of whole channels of an ``(N, C, ...)`` input (mask over ``(N, C, 1, ...)``), as
    ``torch.nn.FeatureAlphaDropout``; a 1-D input is a ``ValueError``."""

    def noise_shape(self, shape):
        if len(shape) < 2:
            raise ValueError(f"FeatureAlphaDropout expects an input of shape (N, C, ...), got {shape}")
        return shape[:2] + (1,) * (len(shape) - 2)


def _gaussian_forward(x, p, *, seed, offset, noise_shape):
    return gaussian_dropout(x, p, seed=seed, offset=offset)


def _gaussian_backward(grad, p, *, seed, offset, noise_shape):
    return gaussian_dropout_backward(grad, p, seed=seed, offset=offset)


class GaussianDropout(_MaskedLayer):
    """Multiplicative Gaussian noise (:func:`fastdropout.gaussian_dropout`): ``x * (1 + sigma * z)``
    with ``sigma = sqrt(p / (1 - p))``; ``p`` in [0, 1) (``ValueError`` at 1)."""

    _forward = staticmethod(_gaussian_forward)
    _backward = staticmethod(_gaussian_backward)

    def __init__(self, p: float = 0.5, *, seed: Optional[int] = None, generator: Optional[Generator] = None) -> None:
        super().__init__(p, seed=seed, generator=generator)
        if self.p == 1.0:
            raise ValueError("GaussianDropout needs p < 1")


class DropConnectDense(_DenseLayer):
    """``act(x @ dropout(weight).T + bias)``: DropConnect (Wan et al., ICML 2013), one weight mask per
    forward, applied inside the GEMM and regenerated in the backward.  Parameters, attributes and
    errors as :class:`DropoutDense` (``p`` drops weights instead of inputs); each training-mode
    forward draws ``weight.size`` elements."""

    _forward = staticmethod(dropconnect_dense)
    _backward = staticmethod(dropconnect_dense_backward)

    def __init__(self, in_features: int, out_features: int, p: float = 0.5, *, bias: bool = True,
                 activation: Optional[str] = None, seed: Optional[int] = None,
                 generator: Optional[Generator] = None) -> None:
        super().__init__(in_features, out_features, p, bias, activation, seed, generator)

    def _draw_size(self, x: np.ndarray) -> int:
        return self.weight.size

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, p={self.p}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")


class DropoutAddLayerNorm(Module):
    """``LayerNorm(residual + dropout(x))`` (or RMSNorm with ``norm="rms"``) in one pass per row
    (:func:`fastdropout.dropout_add_layer_norm`): ``forward(x, residual)`` returns the normalized
    sum, ``backward(grad)`` returns ``(grad_x, grad_residual)`` and adds into ``grad_weight`` and
    ``grad_bias``.  ``weight`` (ones) and ``bias`` (zeros; none for RMS) have shape ``(D,)`` as
    ``torch.nn.LayerNorm``'s, float32 (float64 inputs are converted to float32, unlike
    :func:`fastdropout.dropout_add_layer_norm`, which keeps float64).  Each training-mode forward
    with p > 0 draws ``x.size`` elements."""

    _param_names = ("weight", "bias")

    def __init__(self, normalized_shape: int, p: float = 0.1, eps: float = 1e-5, elementwise_affine: bool = True,
                 norm: str = "layer", *, seed: Optional[int] = None, generator: Optional[Generator] = None) -> None:
        super().__init__()
        self.normalized_shape = _check_features(normalized_shape, "normalized_shape")
        self.p = check_p(p)
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        self.norm, self.eps = norm, float(eps)
        self.generator = _resolve_generator(seed, generator)
        D = self.normalized_shape
        self.weight = np.ones(D, np.float32) if elementwise_affine else None
        self.bias = np.zeros(D, np.float32) if elementwise_affine and norm == "layer" else None
        self.grad_weight = None if self.weight is None else np.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else np.zeros_like(self.bias)
        self._saved: Any = _NOTHING_SAVED

    def __call__(self, x: np.ndarray, residual: np.ndarray) -> np.ndarray:  # type: ignore[override]
        return self.forward(x, residual)

    def forward(self, x: np.ndarray, residual: np.ndarray) -> np.ndarray:  # type: ignore[override]
        x, residual = _as_float32(x, "x"), _as_float32(residual, "residual")
        self.p = check_p(self.p)
        masked = self.training and self.p > 0.0
        seed, offset = self.generator.draw(x.size) if masked else (0, 0)
        y = dropout_add_layer_norm(x, residual, self.weight, self.bias, self.p, eps=self.eps, norm=self.norm,
                                   seed=seed, offset=offset, training=masked)
        self._saved = (x, residual, seed, offset, masked, self.p, self.eps, self.norm)  # (as the forward used them)
        return y

    def backward(self, grad: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        x, residual, seed, offset, masked, p, eps, norm = _take_saved(self)
        grads = dropout_add_layer_norm_backward(_as_float32(grad, "grad"), x, residual, self.weight, self.bias,
                                                p if masked else 0.0, eps=eps, norm=norm, seed=seed, offset=offset)
        if self.grad_weight is not None:
            self.grad_weight += grads[2]
        if self.grad_bias is not None:
            self.grad_bias += grads[3]
        return grads[0], grads[1]

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, p={self.p}, eps={self.eps}, norm={self.norm!r}"
