"""The public functions: validate, then hand contiguous arrays to the native core."""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._checks import (
    check_activation,
    check_bias_flag,
    check_flags,
    elementwise_dtypes,
    check_float_array,
    check_out,
    check_p,
    check_shape,
    check_u64,
    scale,
    threshold,
)
from ._generator import Generator, check_stream, default_generator

ArrayPair = Tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- runtime


def backend() -> str:
    """The SIMD backend the kernels run on: ``"scalar"``, ``"avx2"`` or ``"avx512"``.

    Chosen once from cpuid/xgetbv; ``FASTDROPOUT_BACKEND`` forces one.  Results never
    depend on it.
    """
    return _core.backend()


def available_backends() -> List[str]:
    """Backends this CPU (and operating system) can run, slowest first, e.g. ``["scalar", "avx2"]``."""
    return list(_core.available_backends())


class OversubscriptionWarning(RuntimeWarning):
    """More kernel threads were asked for than the machine has cores."""


def set_num_threads(n: int) -> None:
    """Set how many OpenMP threads the kernels use (results never depend on it).

    Parameters
    ----------
    n : int >= 1.  More than the machine's cores is allowed (a test of thread
        counts may want it) but warns: threads then share cores and run slower.
        Counts above 65536 are capped there (the warning says so).

    Raises
    ------
    TypeError
        ``n`` is not an int.
    ValueError
        ``n`` < 1.

    Warns
    -----
    OversubscriptionWarning
        ``n`` exceeds ``os.cpu_count()``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int >= 1, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cores, cap = os.cpu_count() or 1, 1 << 16
    if n > cores:
        capped = f"; capped at {cap} threads" if n > cap else ""
        warnings.warn(f"set_num_threads({n}) on a machine with {cores} cores: threads will share cores "
                      f"and run slower (results are the same for any count){capped}", OversubscriptionWarning,
                      stacklevel=2)
    _core.set_num_threads(int(min(n, cap)))


def get_num_threads() -> int:
    """How many threads the kernels use (default: OpenMP's, i.e. OMP_NUM_THREADS or all cores)."""
    return _core.get_num_threads()


# --------------------------------------------------------------------------- dropout


def noise_groups(noise_shape: Any, shape: Tuple[int, ...]) -> Optional[Tuple[List[int], List[bool]]]:
    """Checks ``noise_shape`` against an array's shape (the contract's broadcast masks) and
    collapses the dimensions into groups, outermost first: ``(sizes, is_noise)``; None when
    the mask is not broadcast at all (plain dropout)."""
    if noise_shape is None:
        return None
    ns = check_shape(noise_shape)
    if len(ns) != len(shape):
        raise ValueError(f"noise_shape must have x's rank {len(shape)}, got {tuple(ns)} for x of shape {tuple(shape)}")
    for d, (n, s) in enumerate(zip(ns, shape)):
        if n not in (s, 1):
            raise ValueError(f"noise_shape[{d}] must be {s} (x's) or 1, got {n} (noise_shape {tuple(ns)}, x {tuple(shape)})")
    sizes: List[int] = []
    kinds: List[bool] = []
    for n, s in zip(ns, shape):
        if s == 1:
            continue
        noise = n == s
        if kinds and kinds[-1] == noise:
            sizes[-1] *= s
        else:
            sizes.append(s)
            kinds.append(noise)
    if all(kinds):
        return None
    return sizes, kinds


def stream_words(noise_shape: Any, x: np.ndarray) -> int:
    """How many words a call draws: one per noise element (an int noise_shape is a 1-d shape),
    else one per element of x."""
    return math.prod(check_shape(noise_shape)) if noise_shape is not None else x.size


def writes_directly(out: Optional[np.ndarray], src: np.ndarray) -> bool:
    """Whether an elementwise kernel may write `out` while it reads `src`: C-contiguous and
    aligned, and either apart from src or exactly src (in place).  A partial overlap goes
    through a buffer, so that the result is as if src had been read first."""
    return out is not None and out.flags.c_contiguous and out.flags.aligned and (
        not np.may_share_memory(out, src)
        or (out.__array_interface__["data"][0] == src.__array_interface__["data"][0] and out.strides == src.strides)
    )


def _elementwise(x: np.ndarray, p: float, seed: int, offset: int, out: Optional[np.ndarray],
                 op: Optional[Tuple[float, float, float, bool]] = None,
                 groups: Optional[Tuple[List[int], List[bool]]] = None) -> np.ndarray:
    """out = the family's op over x: dropout's select-and-scale when `op` is None, else
    ``keep ? x * a (+ b_keep) : (b_drop or +0)`` with op = (a, b_keep, b_drop, affine);
    the mask over `groups` (a broadcast noise array) when given."""
    src = np.asarray(x, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    target = out if writes_directly(out, src) else np.empty(src.shape, dtype=src.dtype)
    if groups is not None or op is not None:
        a, b_keep, b_drop, affine = op if op is not None else (scale(p, src.dtype), 0.0, 0.0, False)
        if groups is not None:
            _core.family_noise(src.reshape(-1), target.reshape(-1), groups[0], groups[1], seed, offset, threshold(p),
                               a, b_keep, b_drop, affine)
        else:
            _core.family(src.reshape(-1), target.reshape(-1), seed, offset, threshold(p), a, b_keep, b_drop, affine)
    elif src.dtype.itemsize == 2:  # float16 / bfloat16: float32 arithmetic, one rounding (the contract's half-precision rule)
        _core.dropout_h16(src.reshape(-1).view(np.uint16), target.reshape(-1).view(np.uint16), seed, offset,
                          threshold(p), scale(p, np.float32), src.dtype.name == "bfloat16")
    else:
        _core.dropout(src.reshape(-1), target.reshape(-1), seed, offset, threshold(p), scale(p, src.dtype))
    if out is None:
        return target
    if target is not out:
        np.copyto(out, target)
    return out


def check_no_half(x: np.ndarray, what: str) -> None:
    if x.dtype.itemsize == 2:
        raise TypeError(f"{what} takes float32 or float64, got {x.dtype} (convert with astype(np.float32))")


def dropout(
    x: np.ndarray,
    p: float = 0.5,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[Generator] = None,
    training: bool = True,
    out: Optional[np.ndarray] = None,
    return_stream: bool = False,
    noise_shape: Optional[Sequence[int]] = None,
) -> Union[np.ndarray, Tuple[np.ndarray, Tuple[int, int]]]:
    """Inverted dropout: ``y = x / (1 - p)`` where kept, ``+0.0`` where dropped.

    The mask of element ``i`` (flat C-order index of ``x``, whatever its
    strides) depends only on ``(seed, offset + i, p)`` (see the contract: the random stream, the mask, dropout), so
    it is the same for every backend, thread count and call split.

    Parameters
    ----------
    x : ndarray of float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``), any
        shape and strides.  For float16 and bfloat16 a kept value is ``x * s`` in
        float32, rounded once to the dtype (the contract's half-precision rule).
    p : drop probability in [0, 1].
    seed, offset : the Philox stream; when ``seed`` is None, ``(seed, offset)``
        is drawn from ``generator`` (default: the package's default generator,
        see :func:`manual_seed`) and ``offset`` is ignored.
    training : when False, returns a copy of ``x`` and draws nothing.
    out : optional array of ``x``'s shape and dtype to write into; it may be
        ``x`` itself.
    return_stream : also return the ``(seed, offset)`` the mask was drawn with (the
        ones given, or those drawn from the generator; ``(None, None)`` when
        ``training`` is False), for :func:`dropout_backward`.  This is how to
        backpropagate dropout drawn from a generator: the backward never draws.
    noise_shape : optional shape of x's rank whose every dimension is x's or 1 (Keras's
        ``noise_shape``): the mask is drawn over ``noise_shape`` (noise element ``n``, flat
        C-order, uses word ``offset + n``) and broadcast over x, so ``(N, C, 1, 1)`` drops
        whole channels (``torch.nn.Dropout2d``) and a 1 on the time axis locks the mask over
        time (variational dropout, Gal and Ghahramani 2016).  One pass over x; one word per
        noise element.  float32 and float64 only.

    Returns
    -------
    ndarray of ``x``'s dtype: ``out`` if given, else a new C-contiguous array;
    with ``return_stream``, ``(y, (seed, offset))``.

    Raises
    ------
    TypeError
        ``x`` is not a float32/float64/float16/bfloat16 array (a torch tensor names
        ``fastdropout.torch``), ``out`` has another dtype, ``seed``/``offset`` are
        not integers, ``generator`` is not a :class:`Generator`, ``noise_shape`` with a
        float16/bfloat16 ``x`` or not a shape of integers.
    ValueError
        ``p`` outside [0, 1] or NaN, ``seed``/``offset`` outside [0, 2**64), ``out``
        of another shape or read-only, both ``seed`` and ``generator`` given, a
        ``noise_shape`` of another rank or with a dimension neither x's nor 1.

    References
    ----------
    N. Srivastava, G. Hinton, A. Krizhevsky, I. Sutskever, R. Salakhutdinov, "Dropout: A
    Simple Way to Prevent Neural Networks from Overfitting", JMLR 15 (2014).  J. Salmon,
    M. Moraes, R. Dror, D. Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011
    (Philox).

    Examples
    --------
    >>> import numpy as np, fastdropout as fd
    >>> fd.dropout(np.ones(8, np.float32), 0.5, seed=1)
    array([2., 2., 2., 2., 2., 2., 0., 2.], dtype=float32)
    """
    check_flags(training=training, return_stream=return_stream)
    x = check_float_array(x, "x", elementwise_dtypes())
    p = check_p(p)
    if out is not None:
        check_out(out, x.shape, x.dtype)
    groups = noise_groups(noise_shape, x.shape)
    if noise_shape is not None:
        check_no_half(x, "dropout with noise_shape")
    # every argument is checked whichever path runs, and before anything is drawn
    seed, offset = check_stream(seed, offset, generator)
    if not training:
        if out is None:
            y = np.array(x, order="C", copy=True)
        else:
            np.copyto(out, x)
            y = out
        return (y, (None, None)) if return_stream else y
    if seed is None:
        seed, offset = (generator or default_generator).draw(stream_words(noise_shape, x))
    y = _elementwise(x, p, seed, offset, out, groups=groups)
    return (y, (seed, offset)) if return_stream else y


def dropout_backward(
    grad: np.ndarray, p: float, *, seed: int, offset: int = 0, out: Optional[np.ndarray] = None,
    noise_shape: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Gradient of :func:`dropout`: ``grad / (1 - p)`` where kept, ``+0.0`` where dropped.

    The mask is regenerated from ``(seed, offset, p)``; pass the values the
    forward used (``return_stream=True`` gives them).  It never draws from a
    generator, so it cannot apply another mask by accident.

    Parameters
    ----------
    grad : array of float32, float64, float16 or bfloat16, the forward output's shape
        (any strides).
    p : the forward's drop probability, in [0, 1].
    seed, offset : the forward's Philox stream, ints in [0, 2**64).
    out : optional array of ``grad``'s shape and dtype (it may be ``grad``).
    noise_shape : the forward's (a broadcast mask; float32 and float64 only).

    Returns
    -------
    ndarray of ``grad``'s dtype and shape: ``out`` if given, else a new C-contiguous array.

    Raises
    ------
    TypeError
        Not a float array of a supported dtype (a torch tensor names ``fastdropout.torch``),
        ``out`` of another dtype, non-integer ``seed``/``offset``.
    ValueError
        ``p`` outside [0, 1] or NaN, ``seed``/``offset`` outside [0, 2**64), ``out`` of
        another shape or read-only.

    Examples
    --------
    >>> fd.dropout_backward(np.ones(4, np.float32), 0.5, seed=1)
    array([2., 2., 2., 2.], dtype=float32)
    """
    grad = check_float_array(grad, "grad", elementwise_dtypes())
    p = check_p(p)
    seed = check_u64(seed, "seed")
    offset = check_u64(offset, "offset")
    if out is not None:
        check_out(out, grad.shape, grad.dtype)
    groups = noise_groups(noise_shape, grad.shape)
    if noise_shape is not None:
        check_no_half(grad, "dropout_backward with noise_shape")
    return _elementwise(grad, p, seed, offset, out, groups=groups)


def dropout_mask(shape, p: float, *, seed: int, offset: int = 0, packed: bool = False) -> np.ndarray:
    """The keep mask of an array of ``shape`` (True = kept), without the array.

    Element ``i`` (flat C-order index) is kept iff its Philox word ``u_i`` is
    ``>= round_half_even(p * 2**32)`` (see the contract).

    Parameters
    ----------
    shape : int or tuple of ints >= 0.
    p : drop probability in [0, 1].
    seed, offset : the Philox stream, ints in [0, 2**64).
    packed : return the packed form instead of bools.

    Returns
    -------
    ndarray of bool of ``shape``; with ``packed=True``, a ``uint8`` array of
    ``ceil(n / 8)`` bytes, bit ``i & 7`` of byte ``i >> 3`` set when element ``i`` is
    kept: the same as ``np.packbits(mask.ravel(), bitorder="little")``.

    Raises
    ------
    TypeError
        ``shape`` not ints, non-integer ``seed``/``offset``.
    ValueError
        Negative dimensions or 2**62 elements or more, ``p`` outside [0, 1],
        ``seed``/``offset`` outside [0, 2**64).

    Examples
    --------
    >>> fd.dropout_mask((2, 3), 0.5, seed=1)
    array([[ True,  True,  True],
           [ True,  True,  True]])
    >>> fd.dropout_mask(8, 0.5, seed=1, packed=True)
    array([191], dtype=uint8)
    """
    check_flags(packed=packed)
    shape = check_shape(shape)
    p = check_p(p)
    seed = check_u64(seed, "seed")
    offset = check_u64(offset, "offset")
    n = math.prod(shape)
    if packed:
        out = np.empty((n + 7) // 8, dtype=np.uint8)
    else:
        out = np.empty(shape, dtype=np.bool_)
    _core.mask(out.reshape(-1), n, seed, offset, threshold(p), bool(packed))
    return out


# --------------------------------------------------------------------------- dense


def dense_dtypes() -> Tuple[type, ...]:
    """What the dense functions take: float32, and bfloat16 once ml_dtypes is imported."""
    bf16 = elementwise_dtypes()[3:]
    return (np.float32,) + tuple(bf16)


def as_operand(a: np.ndarray) -> np.ndarray:
    """A GEMM operand for the core: float32 as is, bfloat16 as its uint16 bits."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _dense_inputs(x, weight, bias):
    x = check_float_array(x, "x", dense_dtypes())
    weight = check_float_array(weight, "weight", dense_dtypes())
    if weight.dtype != x.dtype:
        raise TypeError(f"x and weight must have one dtype (float32 or bfloat16), got {x.dtype} and {weight.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have shape (..., in_features), got a 0-d array")
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {weight.shape}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape (out_features, {x.shape[-1]}) for x of shape {x.shape}, got {weight.shape}"
        )
    if bias is not None:
        bias = check_float_array(bias, "bias", dense_dtypes())
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
        bias = np.ascontiguousarray(bias, dtype=np.float32)
    return x, np.ascontiguousarray(weight), bias


def dense_forward_checked(x, weight, bias, p, seed, offset, act, masked, want_z, on_weight=False):
    """(y, z) as 2-D float32 arrays (z None unless want_z), from arguments already checked:
    float32 or bfloat16 arrays of fitting shapes, weight and bias C-contiguous.  The mask
    is on x, or on the weight with `on_weight` (DropConnect)."""
    k = x.shape[-1]
    rows = math.prod(x.shape[:-1])  # (reshape(-1, k) cannot infer the rows when k == 0)
    x2 = np.ascontiguousarray(x).reshape(rows, k)
    y = np.empty((rows, weight.shape[0]), dtype=np.float32)
    z = np.empty_like(y) if want_z else None
    _core.dense_forward(as_operand(x2), as_operand(weight), bias, y, z, act, masked, seed, offset, threshold(p),
                        scale(p, np.float32), on_weight)
    return y, z


def dense_backward_checked(grad_out, x, weight, z, p, seed, offset, act, masked, want, on_weight=False):
    """(grad_x, grad_weight, grad_bias) from checked arguments (see dense_forward_checked);
    `want` says which to compute (the others are None)."""
    k, n_out = x.shape[-1], weight.shape[0]
    rows = math.prod(x.shape[:-1])
    x2 = np.ascontiguousarray(x).reshape(rows, k)
    dy2 = np.ascontiguousarray(grad_out).reshape(rows, n_out)
    z2 = None if z is None else np.ascontiguousarray(z).reshape(rows, n_out)
    grad_x = np.empty(x2.shape, dtype=np.float32) if want[0] else None
    grad_w = np.empty(weight.shape, dtype=np.float32) if want[1] else None
    grad_b = np.empty(n_out, dtype=np.float32) if want[2] else None
    _core.dense_backward(as_operand(dy2), as_operand(x2), as_operand(weight), z2, grad_x, grad_w, grad_b, act, masked,
                         seed, offset, threshold(p), scale(p, np.float32), on_weight)
    return None if grad_x is None else grad_x.reshape(x.shape), grad_w, grad_b


def _layer_args(p, seed, offset, activation) -> Tuple[float, int, int, int]:
    return check_p(p), check_u64(seed, "seed"), check_u64(offset, "offset"), check_activation(activation)


def dense(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None, *, activation: Optional[str] = None) -> np.ndarray:
    """``act(x @ weight.T + bias)``: a plain dense layer (``torch.nn.Linear`` weight layout).

    Parameters
    ----------
    x : float32 or bfloat16 (``ml_dtypes``) array of shape ``(..., in_features)``.
    weight : float32 or bfloat16 array of shape ``(out_features, in_features)``.
    bias : optional float32 or bfloat16 array of shape ``(out_features,)``.
    activation : None, ``"relu"`` or ``"gelu"`` (the erf form).

    Returns
    -------
    array of shape ``(..., out_features)`` in ``x``'s dtype (bfloat16 computed in float32 and
    rounded once), as :func:`dropout_dense`.

    Raises
    ------
    TypeError
        Other dtypes (float64 included: convert with ``astype(np.float32)``), a torch tensor.
    ValueError
        Shapes that do not fit, an unknown activation.
    """
    return dropout_dense(x, weight, bias, 0.0, seed=0, activation=activation, training=False)


def dropout_dense(
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
) -> Union[np.ndarray, ArrayPair]:
    """Fused ``act(dropout(x, p, seed, offset) @ weight.T + bias)`` in one GEMM.

    The mask is generated inside the matrix multiply while ``x`` is packed
    (the contract's fused layer); it is exactly the mask :func:`dropout` would apply to
    ``x``.  float32, or bfloat16 (``ml_dtypes.bfloat16``; x and weight of one dtype): bfloat16
    operands are widened to float32 as the GEMM packs them (a dropped-out value ``x * s`` is
    rounded once to bfloat16), products are summed in float32 and ``y`` is rounded once to
    bfloat16; ``z`` stays float32.  float64 inputs raise ``TypeError`` (convert with
    ``astype(np.float32)``).  Results are bit-identical for any thread count.

    Parameters
    ----------
    x : float32 or bfloat16 array of shape (..., in_features)
    weight : array of x's dtype, shape (out_features, in_features)
    bias : optional float32 or bfloat16 array of shape (out_features,)
    p, seed, offset : the dropout applied to x
    activation : None, "relu" or "gelu" (erf form, as ``torch.nn.GELU()``)
    training : False disables dropout (a plain dense layer)
    return_preactivation : also return ``z`` (before the activation), which
        :func:`dropout_dense_backward` needs when an activation is set.

    Returns
    -------
    ``y`` of shape (..., out_features), or ``(y, z)``.

    Raises
    ------
    TypeError
        Other dtypes than float32 and bfloat16 (float64 included), mixed dtypes, a torch tensor, non-integer
        ``seed``/``offset``, an activation that is not a string.
    ValueError
        Shapes that do not fit, ``p`` outside [0, 1], ``seed``/``offset`` outside
        [0, 2**64), an unknown activation.

    References
    ----------
    F. Van Zee, R. van de Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS
    Functionality", ACM TOMS 41 (2015): the GEMM structure the mask is fused into.

    Examples
    --------
    >>> x = np.ones((2, 4), np.float32); w = np.ones((3, 4), np.float32)
    >>> fd.dropout_dense(x, w, None, 0.5, seed=1)
    array([[8., 8., 8.],
           [6., 6., 6.]], dtype=float32)
    """
    check_flags(training=training, return_preactivation=return_preactivation)
    return dense_layer(x, weight, bias, p, seed, offset, activation, training, return_preactivation, False)


def dense_layer(x, weight, bias, p, seed, offset, activation, training, return_preactivation, on_weight):
    """:func:`dropout_dense` (or DropConnect with `on_weight`): checks, then one GEMM."""
    x, weight, bias = _dense_inputs(x, weight, bias)
    p, seed, offset, act = _layer_args(p, seed, offset, activation)
    lead = x.shape[:-1]
    n_out = weight.shape[0]
    y, z = dense_forward_checked(x, weight, bias, p, seed, offset, act, bool(training) and p > 0.0,
                                 return_preactivation, on_weight)
    y = y.reshape(lead + (n_out,))
    if x.dtype != np.float32:
        y = y.astype(x.dtype)  # one rounding of the float32 result
    if return_preactivation:
        return y, z.reshape(lead + (n_out,))
    return y


def dropout_dense_backward(
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
    output_mask: Tuple[bool, bool, bool] = (True, True, True),
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """Gradients of :func:`dropout_dense` given ``grad_out`` = dL/dy.

    ``dz = grad_out * act'(z)``; ``grad_bias = dz.sum(0)``;
    ``grad_weight = dz.T @ dropout(x)``; ``grad_x = dropout_backward(dz @ weight)``.
    The mask is regenerated from ``(seed, offset, p)`` inside the kernels; no
    mask is stored.  ``preactivation`` (the ``z`` returned by the forward with
    ``return_preactivation=True``) is required when ``activation`` is set.

    Parameters
    ----------
    grad_out : float32 or bfloat16 array of shape ``(..., out_features)``, dL/dy.
    x, weight : the forward's inputs (float32, or bfloat16: the gradients are computed in float32
        from the bfloat16 operands and rounded once to bfloat16).
    p, seed, offset, activation : the forward's.
    preactivation : the forward's ``z`` (``return_preactivation=True``), required with an
        activation.
    bias : whether the layer has a bias (else ``grad_bias`` is None).
    training : False gives the plain dense layer's gradients.
    output_mask : which of ``(grad_x, grad_weight, grad_bias)`` to compute, as in
        PyTorch's ``*_backward`` ops; an entry that is False is not computed and comes
        back as None (a first layer needs no ``grad_x``, a frozen one no ``grad_weight``).

    Returns
    -------
    ``(grad_x, grad_weight, grad_bias)``: arrays of ``x``'s, ``weight``'s and
    ``(out_features,)`` shapes in ``x``'s, ``weight``'s and ``weight``'s dtypes (float32, or
    bfloat16 rounded once from float32 sums), or None where not computed.

    Raises
    ------
    TypeError
        Dtypes other than float32 and bfloat16, a torch tensor, ``output_mask`` not three bools.
    ValueError
        Shapes that do not fit (``grad_out`` and ``preactivation`` must be
        ``(..., out_features)``), a missing ``preactivation`` with an activation, ``p``
        outside [0, 1], ``seed``/``offset`` outside [0, 2**64).
    """
    bias = check_bias_flag(bias)
    check_flags(training=training)
    return dense_layer_backward(grad_out, x, weight, p, seed, offset, activation, preactivation, bias, training,
                                output_mask, False)


def dense_layer_backward(grad_out, x, weight, p, seed, offset, activation, preactivation, bias, training,
                         output_mask, on_weight):
    """:func:`dropout_dense_backward` (or DropConnect's with `on_weight`): checks, then the GEMMs."""
    if (not isinstance(output_mask, (tuple, list)) or len(output_mask) != 3
            or not all(isinstance(v, (bool, np.bool_)) for v in output_mask)):
        raise TypeError(f"output_mask must be a tuple of three bools (grad_x, grad_weight, grad_bias), got {output_mask!r}")
    x, weight, _ = _dense_inputs(x, weight, None)
    grad_out = check_float_array(grad_out, "grad_out", dense_dtypes())
    p, seed, offset, act = _layer_args(p, seed, offset, activation)
    lead = x.shape[:-1]
    n_out = weight.shape[0]
    if grad_out.shape != lead + (n_out,):
        raise ValueError(f"grad_out must have shape {lead + (n_out,)}, got {grad_out.shape}")
    z = None
    if act:
        if preactivation is None:
            raise ValueError(f"preactivation is required with activation={activation!r}")
        z = check_float_array(preactivation, "preactivation", (np.float32,))
        if z.shape != grad_out.shape:
            raise ValueError(f"preactivation must have shape {grad_out.shape}, got {z.shape}")
    want = (bool(output_mask[0]), bool(output_mask[1]), bool(bias) and bool(output_mask[2]))
    grads = dense_backward_checked(grad_out, x, weight, z, p, seed, offset, act, bool(training) and p > 0.0, want,
                                   on_weight)
    if x.dtype == np.float32:
        return grads
    return tuple(None if g is None else g.astype(x.dtype) for g in grads)  # type: ignore[return-value]
