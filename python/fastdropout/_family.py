"""The rest of the dropout family in the NumPy API: alpha dropout, DropConnect, and dropout +
residual + LayerNorm/RMSNorm (broadcast masks are ``noise_shape`` of :func:`fastdropout.dropout`)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._api import _elementwise, dense_layer, dense_layer_backward, noise_groups, stream_words, writes_directly
from ._checks import check_bias_flag, check_flags, check_float_array, check_out, check_p, check_u64, scale, threshold
from ._generator import Generator, check_stream, default_generator

SELU_ALPHA_SCALE = 1.7580993408473766  # SELU's alpha * scale


def alpha_constants(p: float, dtype) -> Tuple[float, float, float]:
    """``(a, b_keep, b_drop)`` in double, each rounded once to ``dtype`` (the contract's alpha dropout)."""
    alpha = SELU_ALPHA_SCALE
    a = 1.0 / math.sqrt((alpha * alpha * p + 1.0) * (1.0 - p))
    t = np.dtype(dtype).type
    return float(t(a)), float(t(alpha * a * p)), float(t(alpha * a * (p - 1.0)))


def alpha_dropout(
    x: np.ndarray,
    p: float = 0.5,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[Generator] = None,
    training: bool = True,
    noise_shape: Optional[Sequence[int]] = None,
    out: Optional[np.ndarray] = None,
    return_stream: bool = False,
) -> Union[np.ndarray, Tuple[np.ndarray, Tuple[Optional[int], Optional[int]]]]:
    """Alpha dropout, which keeps the mean and variance of SELU activations.

    With ``alpha = 1.7580993408473766`` (SELU's alpha times its scale),
    ``a = 1 / sqrt((alpha**2 * p + 1) * (1 - p))``, ``b_keep = alpha * a * p`` and
    ``b_drop = alpha * a * (p - 1)`` (each computed in double, rounded once to the dtype):
    a kept element becomes ``x * a + b_keep`` (two roundings, no fused multiply-add), a dropped
    one ``b_drop``; PyTorch's ``alpha_dropout`` formula.  The mask is :func:`dropout`'s
    (``noise_shape`` broadcasts it: ``(N, C, 1, ...)`` is PyTorch's ``FeatureAlphaDropout``).

    Parameters
    ----------
    x : float32 or float64 array, any shape and strides.
    p : drop probability in [0, 1]; 0 returns a copy of ``x``, 1 returns zeros.
    seed, offset, generator, training, out, return_stream : as :func:`dropout`.
    noise_shape : as :func:`dropout`.

    Returns
    -------
    ndarray of ``x``'s dtype and shape (``out`` if given); with ``return_stream`` also the
    ``(seed, offset)`` used.

    Raises
    ------
    TypeError
        Other dtypes (float16 and bfloat16 included), ``out`` of another dtype, non-integer
        ``seed``/``offset``.
    ValueError
        ``p`` outside [0, 1], a ``noise_shape`` that does not fit, ``seed``/``offset`` outside
        [0, 2**64), both ``seed`` and ``generator``.

    References
    ----------
    G. Klambauer, T. Unterthiner, A. Mayr, S. Hochreiter, "Self-Normalizing Neural Networks",
    NeurIPS 2017.

    Examples
    --------
    >>> fd.alpha_dropout(np.zeros(4, np.float32), 0.5, seed=2)   # b_keep where kept, b_drop where dropped
    array([-0.77919394, -0.77919394,  0.77919394, -0.77919394], dtype=float32)
    """
    check_flags(training=training, return_stream=return_stream)
    x = check_float_array(x, "x")
    p = check_p(p)
    if out is not None:
        check_out(out, x.shape, x.dtype)
    groups = noise_groups(noise_shape, x.shape)
    seed, offset = check_stream(seed, offset, generator)
    if training and seed is None:  # (drawn at p = 0 too, as dropout does: the stream then feeds the backward)
        seed, offset = (generator or default_generator).draw(stream_words(noise_shape, x))
    if not training or p == 0.0:
        y = _copy(x, out)
    elif p == 1.0:
        y = np.zeros(x.shape, x.dtype) if out is None else (out.fill(0) or out)
    else:
        a, b_keep, b_drop = alpha_constants(p, x.dtype)
        y = _elementwise(x, p, seed, offset, out, op=(a, b_keep, b_drop, True), groups=groups)
    return (y, (seed, offset) if training else (None, None)) if return_stream else y


def _copy(x: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    """The identity of the family (not training, or p = 0): a C-ordered copy, or out filled."""
    return np.array(x, order="C", copy=True) if out is None else (np.copyto(out, x) or out)


def alpha_dropout_backward(
    grad: np.ndarray,
    p: float,
    *,
    seed: int,
    offset: int = 0,
    noise_shape: Optional[Sequence[int]] = None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Gradient of :func:`alpha_dropout`: ``grad * a`` where kept, ``+0.0`` where dropped (the mask
    regenerated from ``(seed, offset, p)``); ``grad`` itself for ``p = 0``, zeros for ``p = 1``.

    Parameters, returns and errors as :func:`alpha_dropout` (``seed`` is required).
    """
    grad = check_float_array(grad, "grad")
    p = check_p(p)
    seed, offset = check_u64(seed, "seed"), check_u64(offset, "offset")
    if out is not None:
        check_out(out, grad.shape, grad.dtype)
    groups = noise_groups(noise_shape, grad.shape)
    if p == 0.0:
        return np.array(grad, order="C", copy=True) if out is None else (np.copyto(out, grad) or out)
    if p == 1.0:
        return np.zeros(grad.shape, grad.dtype) if out is None else (out.fill(0) or out)
    a = alpha_constants(p, grad.dtype)[0]
    return _elementwise(grad, p, seed, offset, out, op=(a, 0.0, 0.0, False), groups=groups)


# --------------------------------------------------------------------------- Gaussian dropout


def _check_gaussian_p(p: Any) -> float:
    try:
        p = check_p(p)
    except ValueError:
        raise ValueError(f"gaussian_dropout needs p in [0, 1), got {p!r:.60}") from None
    if p == 1.0:
        raise ValueError("gaussian_dropout needs p < 1 (sigma = sqrt(p / (1 - p)) is infinite at p = 1)")
    return p


def _gaussian(x: np.ndarray, p: float, seed: int, offset: int, out: Optional[np.ndarray]) -> np.ndarray:
    src = np.asarray(x, order="C")
    target = out if writes_directly(out, src) else np.empty(src.shape, src.dtype)
    _core.gaussian(src.reshape(-1), target.reshape(-1), seed, offset, math.sqrt(p / (1.0 - p)))
    if out is not None and target is not out:
        np.copyto(out, target)
        return out
    return target


def gaussian_dropout(
    x: np.ndarray,
    p: float = 0.5,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[Generator] = None,
    training: bool = True,
    out: Optional[np.ndarray] = None,
    return_stream: bool = False,
) -> Union[np.ndarray, Tuple[np.ndarray, Tuple[Optional[int], Optional[int]]]]:
    """Gaussian (multiplicative) dropout: ``y = x * (1 + sigma * z)``, ``sigma = sqrt(p / (1 - p))``.

    ``z`` is a standard normal deviate per element, from the Box-Muller transform of the
    element's pair of Philox words: element ``i`` (``j = offset + i``, ``m = j >> 1``) takes
    ``u1 = (w(2m) + 0.5) 2**-32``, ``u2 = (w(2m + 1) + 0.5) 2**-32``, ``r = sqrt(-2 ln u1)``,
    ``theta = 2 pi u2`` and ``z = r cos(theta)`` for even ``j``, ``r sin(theta)`` for odd.  The
    noise has mean 1 and variance ``p / (1 - p)``, as dropout's (Srivastava et al. 2014, section
    10; Keras's ``GaussianDropout``).  float32 computes ``z`` in float32 within
    ``|y - y64| <= 8 eps |x| (1 + sigma |z|)`` of the float64 computation from the same words.

    Parameters
    ----------
    x : float32 or float64 array, any shape and strides.
    p : in [0, 1) (the variance of the noise is p / (1 - p)); 0 returns a copy of ``x``.
    seed, offset, generator, training, out, return_stream : as :func:`dropout`.

    Returns
    -------
    ndarray of ``x``'s dtype and shape (``out`` if given); with ``return_stream`` also the
    ``(seed, offset)`` used (``(None, None)`` when not training), which
    :func:`gaussian_dropout_backward` takes.

    Raises
    ------
    TypeError
        Other dtypes, ``out`` of another dtype, non-integer ``seed``/``offset``.
    ValueError
        ``p`` outside [0, 1) (``p = 1`` included), ``seed``/``offset`` outside [0, 2**64),
        both ``seed`` and ``generator``.

    References
    ----------
    N. Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
    JMLR 15 (2014); G. Box, M. Muller, "A Note on the Generation of Random Normal Deviates",
    Ann. Math. Stat. 29 (1958).
    """
    check_flags(training=training, return_stream=return_stream)
    x = check_float_array(x, "x")
    p = _check_gaussian_p(p)
    if out is not None:
        check_out(out, x.shape, x.dtype)
    seed, offset = check_stream(seed, offset, generator)
    if training and seed is None:  # (drawn at p = 0 too, as dropout does: the stream then feeds the backward)
        seed, offset = (generator or default_generator).draw(x.size)
    y = _copy(x, out) if not training or p == 0.0 else _gaussian(x, p, seed, offset, out)
    return (y, (seed, offset) if training else (None, None)) if return_stream else y


def gaussian_dropout_backward(
    grad: np.ndarray, p: float, *, seed: int, offset: int = 0, out: Optional[np.ndarray] = None
) -> np.ndarray:
    """Gradient of :func:`gaussian_dropout`: ``grad * (1 + sigma * z)`` with the same ``z``
    (regenerated).  Parameters and errors as :func:`gaussian_dropout` (``seed`` required)."""
    grad = check_float_array(grad, "grad")
    p = _check_gaussian_p(p)
    seed, offset = check_u64(seed, "seed"), check_u64(offset, "offset")
    if out is not None:
        check_out(out, grad.shape, grad.dtype)
    if p == 0.0:
        return np.array(grad, order="C", copy=True) if out is None else (np.copyto(out, grad) or out)
    return _gaussian(grad, p, seed, offset, out)


# --------------------------------------------------------------------------- DropConnect


def dropconnect_dense(
    x: np.ndarray,
    weight: np.ndarray,
    bias: Optional[np.ndarray] = None,
    p: float = 0.5,
    *,
    seed: int,
    offset: int = 0,
    activation: Optional[str] = None,
    training: bool = True,
    return_preactivation: bool = False,
):
    """DropConnect: ``act(x @ dropout(weight, p, seed, offset).T + bias)`` in one GEMM.

    The mask is on the weight (its flat index; one mask per call, shared by every row of
    ``x``) and is applied while the weight's panels are packed inside the GEMM; no masked
    copy of the weight exists.  float32 or bfloat16 as :func:`dropout_dense` (a dropped-out
    bfloat16 weight is rounded once to bfloat16); bit-identical for any thread count.

    Parameters
    ----------
    x : float32 or bfloat16 array ``(..., in_features)``.
    weight : float32 or bfloat16 array ``(out_features, in_features)`` (``torch.nn.Linear``'s layout).
    bias : optional float32 or bfloat16 ``(out_features,)``.
    p, seed, offset : the weight's dropout.
    activation : None, ``"relu"`` or ``"gelu"``.
    training : False gives the plain dense layer.
    return_preactivation : also return ``z`` (needed by the backward with an activation).

    Returns
    -------
    ``y`` of shape ``(..., out_features)``, or ``(y, z)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`dropout_dense`.

    References
    ----------
    L. Wan, M. Zeiler, S. Zhang, Y. LeCun, R. Fergus, "Regularization of Neural Networks using
    DropConnect", ICML 2013.
    """
    check_flags(training=training, return_preactivation=return_preactivation)
    return dense_layer(x, weight, bias, p, seed, offset, activation, training, return_preactivation, True)


def dropconnect_dense_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    p: float,
    *,
    seed: int,
    offset: int = 0,
    activation: Optional[str] = None,
    preactivation: Optional[np.ndarray] = None,
    bias: bool = True,
    training: bool = True,
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Gradients of :func:`dropconnect_dense` (of the plain layer with ``training=False``):
    ``dz = grad_out * act'(z)``,
    ``grad_x = dz @ dropout(weight)``, ``grad_weight = dropout_backward(dz.T @ x)`` (the weight's
    mask, regenerated in the GEMM's write-back), ``grad_bias = dz.sum(0)`` (None without bias).

    Parameters
    ----------
    grad_out : ``(..., out_features)``, the gradient of the forward's output.
    x, weight, p, activation : the forward's (float32 or bfloat16 as :func:`dropconnect_dense`).
    seed, offset : the forward's stream (the weight's mask is regenerated from it).
    preactivation : the forward's ``z`` (``return_preactivation=True``), required with an
        activation.
    bias : whether the layer has a bias (else ``grad_bias`` is None).
    training : False gives the plain dense layer's gradients.

    Returns
    -------
    ``(grad_x, grad_weight, grad_bias)`` of x's, weight's and ``(out_features,)`` shapes in x's,
    weight's and weight's dtypes.  All three are computed (:func:`dropout_dense_backward` has an
    ``output_mask``; here the weight's mask makes ``grad_weight`` the reason to call it).

    Raises
    ------
    TypeError, ValueError
        As :func:`dropout_dense_backward`.
    """
    bias = check_bias_flag(bias)
    check_flags(training=training)
    return dense_layer_backward(grad_out, x, weight, p, seed, offset, activation, preactivation, bias, training,
                                (True, True, True), True)


# --------------------------------------------------------------------------- dropout + residual + norm


def _check_eps(eps: Any) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _add_norm_inputs(x, residual, weight, bias, p, norm, eps, seed, offset):
    """The checked arguments of the add + norm functions: ``(x, x2, r2, weight, bias, p, eps,
    seed, offset)`` with x and the residual as C-contiguous (rows, D) arrays (a residual that
    broadcasts to x's shape, broadcast)."""
    x = check_float_array(x, "x")
    residual = check_float_array(residual, "residual")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    residual = _broadcast_residual(residual, x.shape)
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (the normalized one)")
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    D = x.shape[-1]
    params = []
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None:
            a = check_float_array(a, name)
            if a.dtype != x.dtype:
                raise TypeError(f"{name} must have x's dtype {x.dtype}, got {a.dtype}")
            if a.shape != (D,):
                raise ValueError(f"{name} must have shape ({D},), got {a.shape}")
            a = np.ascontiguousarray(a)
        params.append(a)
    if norm == "rms" and bias is not None:
        raise ValueError("norm='rms' has no bias: pass bias=None")
    eps, p = _check_eps(eps), check_p(p)
    seed, offset = check_u64(seed, "seed"), check_u64(offset, "offset")
    rows = math.prod(x.shape[:-1])
    x2 = np.ascontiguousarray(x).reshape(rows, D)
    r2 = np.ascontiguousarray(residual).reshape(rows, D)
    return x, x2, r2, params[0], params[1], p, eps, seed, offset


def _broadcast_residual(residual: np.ndarray, shape) -> np.ndarray:
    """``residual`` as an array of ``shape`` (a view), as ``residual + dropout(x)`` broadcasts it."""
    try:
        return np.broadcast_to(residual, shape)
    except ValueError:
        raise ValueError(f"residual must have x's shape {shape} or one that broadcasts to it, "
                         f"got {residual.shape}") from None


def _reduce_to(grad: np.ndarray, shape) -> np.ndarray:
    """dL/ds of x's shape summed over the dimensions a residual of `shape` was broadcast along
    (in float64, then the dtype), as autograd returns a broadcast operand's gradient."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1)
    return grad.sum(axis=axes, dtype=np.float64).reshape(shape).astype(grad.dtype)


def dropout_add_layer_norm(
    x: np.ndarray,
    residual: np.ndarray,
    weight: Optional[np.ndarray],
    bias: Optional[np.ndarray],
    p: float,
    *,
    eps: float = 1e-5,
    norm: str = "layer",
    seed: int,
    offset: int = 0,
    training: bool = True,
    return_sum: bool = False,
):
    """``LayerNorm(residual + dropout(x))``, the ending of every transformer block, in one pass per row.

    ``s = residual + dropout(x, p, seed, offset)`` in the dtype (the mask over x's flat index),
    then over the last axis ``(s - mean) / sqrt(var + eps) * weight + bias`` (biased variance,
    as ``torch.nn.functional.layer_norm``; statistics in float64), or with ``norm="rms"``
    ``s / sqrt(mean(s**2) + eps) * weight`` (RMSNorm: Zhang and Sennrich, 2019).

    Parameters
    ----------
    x, residual : float32 or float64 arrays of one dtype; x of shape ``(..., D)``, residual of x's
        shape or one that broadcasts to it (``residual + dropout(x)`` broadcasts as NumPy's ``+``).
    weight, bias : ``(D,)`` arrays of that dtype, or None (no scale, no shift); RMS takes no bias.
    p, seed, offset, training : the dropout of ``x``.
    eps : added to the variance (mean square for RMS).
    norm : ``"layer"`` or ``"rms"``.
    return_sum : also return ``s`` (the new residual stream of a pre-norm block).

    Returns
    -------
    ``y`` of x's shape and dtype, or ``(y, s)``.

    Raises
    ------
    TypeError
        Other dtypes, mixed dtypes, non-integer ``seed``/``offset``.
    ValueError
        Shapes that do not fit, an unknown ``norm``, a bias with ``norm="rms"``, ``p`` outside
        [0, 1], a negative or non-finite ``eps``.

    References
    ----------
    J. Ba, J. Kiros, G. Hinton, "Layer Normalization", 2016; B. Zhang, R. Sennrich, "Root Mean
    Square Layer Normalization", NeurIPS 2019.
    """
    check_flags(training=training, return_sum=return_sum)
    x, x2, r2, weight, bias, p, eps, seed, offset = _add_norm_inputs(x, residual, weight, bias, p, norm, eps, seed,
                                                                     offset)
    y = np.empty_like(x2)
    s = np.empty_like(y) if return_sum else None
    masked = bool(training) and p > 0.0
    _core.add_norm_forward(x2, r2, weight, bias, y, s, masked, seed, offset, threshold(p), scale(p, x.dtype) if masked else 1.0,
                           norm == "rms", eps)
    return (y.reshape(x.shape), s.reshape(x.shape)) if return_sum else y.reshape(x.shape)


def dropout_add_layer_norm_backward(
    grad_out: np.ndarray,
    x: np.ndarray,
    residual: np.ndarray,
    weight: Optional[np.ndarray],
    bias: Optional[np.ndarray],
    p: float,
    *,
    eps: float = 1e-5,
    norm: str = "layer",
    seed: int,
    offset: int = 0,
) -> tuple:
    """Gradients of :func:`dropout_add_layer_norm` (training), one pass per row, the mask regenerated.

    Returns ``(grad_x, grad_residual, grad_weight, grad_bias)`` for ``norm="layer"`` and
    ``(grad_x, grad_residual, grad_weight)`` for ``norm="rms"``; ``grad_weight`` (``grad_bias``)
    is None without a weight (bias).  ``grad_residual`` is dL/ds (for a residual that was
    broadcast, summed over the broadcast dimensions in float64 into the residual's shape, as
    autograd does), ``grad_x`` its dropout backward; ``grad_weight`` and ``grad_bias`` are
    summed over the rows in float64 in a fixed order (bit-identical for any thread count) and
    returned in the dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`dropout_add_layer_norm`; ``grad_out`` of another shape or dtype.
    """
    x, x2, r2, weight, bias, p, eps, seed, offset = _add_norm_inputs(x, residual, weight, bias, p, norm, eps, seed,
                                                                     offset)
    grad_out = check_float_array(grad_out, "grad_out")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {x.shape}, got {grad_out.shape}")
    D = x.shape[-1]
    dy = np.ascontiguousarray(grad_out).reshape(x2.shape)
    gx, gr = np.empty_like(x2), np.empty_like(x2)
    gw = np.empty(D, np.float64) if weight is not None else None
    gb = np.empty(D, np.float64) if bias is not None else None
    masked = p > 0.0
    _core.add_norm_backward(dy, x2, r2, weight, gx, gr, gw, gb, masked, seed, offset, threshold(p),
                            scale(p, x.dtype) if masked else 1.0, norm == "rms", eps)
    out = (gx.reshape(x.shape), _reduce_to(gr.reshape(x.shape), np.shape(residual)),
           None if gw is None else gw.astype(x.dtype))
    return out if norm == "rms" else out + (None if gb is None else gb.astype(x.dtype),)
