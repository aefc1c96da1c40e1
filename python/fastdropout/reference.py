"""Plain NumPy reference implementation of fastdropout: the oracle every kernel is tested against.

Everything here follows the contract (the documentation's *The contract* page) literally and favours clarity over speed. The module imports
nothing from the package (only NumPy and the standard library), so it can be loaded on its own.

The random stream (the contract's random stream): element ``i`` of a logical array, under a 64-bit ``seed`` and
``offset``, uses the random word ``u_i = Philox4x32_10(counter, key)[lane]`` with
``j = (offset + i) mod 2**64``, ``counter = (block & 0xffffffff, block >> 32, 0, 0)``,
``block = j >> 2``, ``lane = j & 3`` and ``key = (seed & 0xffffffff, seed >> 32)``.
Element ``i`` is kept iff ``u_i >= round(p * 2**32)``.
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

__all__ = [
    "alpha_dropout",
    "alpha_dropout_backward",
    "attention",
    "attention_backward",
    "dropconnect_dense",
    "dropconnect_dense_backward",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_backward",
    "gaussian_dropout",
    "gaussian_dropout_backward",
    "gaussian_noise",
    "dense",
    "dropout",
    "dropout_backward",
    "dropout_dense",
    "dropout_dense_backward",
    "dropout_mask",
    "dropout_scale",
    "philox4x32",
    "random_words",
    "threshold",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85

_MASK32 = 0xFFFFFFFF
_TWO32 = 2**32
_TWO64 = 2**64
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _is_bfloat16(dtype: np.dtype) -> bool:
    """Whether `dtype` is ml_dtypes' bfloat16.  ml_dtypes is not imported here (its import
    took about 1.4 s of CPU time, paid by every ``import fastdropout``): an array of that
    dtype exists only once the user's code has imported it."""
    ml_dtypes = sys.modules.get("ml_dtypes")
    return ml_dtypes is not None and dtype == np.dtype(ml_dtypes.bfloat16)


def _is_half(dtype: np.dtype) -> bool:
    return dtype == np.float16 or _is_bfloat16(dtype)


_ACTIVATIONS = (None, "relu", "gelu")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_p(p) -> float:
    # bool is a numbers.Real, but p=True is almost certainly a mistake.
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number in [0, 1], got {p!r} of type {type(p).__name__}")
    try:
        value = float(p)
    except OverflowError:  # an int or Fraction too large for a float: out of range
        raise ValueError(f"p must be in [0, 1], got {p!r:.60}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    return value


def _check_u64(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int in [0, 2**64), got {value!r} of type {type(value).__name__}"
        )
    value = int(value)
    if not 0 <= value < _TWO64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _check_count(n) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be a non-negative int, got {n!r} of type {type(n).__name__}")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be a non-negative int, got {n}")
    return n


def _check_shape(shape) -> tuple:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
            raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"shape must not have negative dimensions, got {shape!r}")
    return tuple(int(d) for d in dims)


def _check_float_array(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "f" and a.dtype.itemsize > 1 and not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))  # byte-swapped data: same values, native order
    if a.dtype not in _FLOAT_DTYPES and not _is_bfloat16(a.dtype):
        raise TypeError(f"{name} must be a float16, bfloat16 (ml_dtypes), float32 or float64 array, got dtype {a.dtype}")
    return a


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
    return activation


def _check_dense_shapes(x: np.ndarray, weight: np.ndarray, bias) -> None:
    if weight.ndim != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {weight.shape}"
        )
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must have shape (..., {weight.shape[1]}) to match weight {weight.shape}, "
            f"got {x.shape}"
        )
    if bias is not None and np.shape(bias) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {np.shape(bias)}")


# ---------------------------------------------------------------------------------------------
# The random stream
# ---------------------------------------------------------------------------------------------


def philox4x32(counter, key, rounds: int = 10) -> np.ndarray:
    """Philox4x32-``rounds`` of Random123, applied to each row of ``counter`` with one ``key``.

    Parameters
    ----------
    counter : uint32 array of shape (n, 4)
        One 128-bit counter per row; word 0 is the least significant.
    key : uint32 array of shape (2,)
    rounds : int
        Number of rounds (10 is the standard Philox4x32-10; 7 is also tested).

    Returns
    -------
    uint32 array of shape (n, 4)

    Raises
    ------
    TypeError
        ``counter`` or ``key`` not uint32-convertible integer arrays, ``rounds`` not an int.
    ValueError
        Shapes other than (n, 4) and (2,), values outside [0, 2**32), ``rounds`` < 0.

    References
    ----------
    J. Salmon, M. Moraes, R. Dror, D. Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3",
    SC 2011.
    """
    counter = np.asarray(counter)
    key = np.asarray(key)
    if counter.dtype != np.uint32 or key.dtype != np.uint32:
        raise TypeError(f"counter and key must be uint32, got {counter.dtype} and {key.dtype}")
    if counter.ndim != 2 or counter.shape[1] != 4:
        raise ValueError(f"counter must have shape (n, 4), got {counter.shape}")
    if key.shape != (2,):
        raise ValueError(f"key must have shape (2,), got {key.shape}")
    rounds = _check_count(rounds)

    # 32x32 -> 64-bit products are exact in uint64; every value kept below 2**32.
    c0, c1, c2, c3 = (counter[:, k].astype(np.uint64) for k in range(4))
    k0, k1 = int(key[0]), int(key[1])
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    shift, low = np.uint64(32), np.uint64(_MASK32)
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        prod0 = c0 * m0
        prod1 = c2 * m1
        hi0, lo0 = prod0 >> shift, prod0 & low
        hi1, lo1 = prod1 >> shift, prod1 & low
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def random_words(n: int, seed: int, offset: int = 0) -> np.ndarray:
    """The random words ``u_0 .. u_{n-1}`` of the contract's random stream, as a uint32 array of length ``n``.

    ``u_i`` is lane ``j & 3`` of ``Philox4x32_10((block & 0xffffffff, block >> 32, 0, 0), key)``
    with ``j = (offset + i) mod 2**64``, ``block = j >> 2`` and
    ``key = (seed & 0xffffffff, seed >> 32)``. Wraps around at ``2**64``.

    Raises
    ------
    TypeError
        Non-integer ``n``/``seed``/``offset``.
    ValueError
        Values outside [0, 2**64) (``n`` below 2**62).
    """
    n = _check_count(n)
    seed = _check_u64(seed, "seed")
    offset = _check_u64(offset, "offset")
    if n == 0:
        return np.empty(0, dtype=np.uint32)

    # Consecutive j map to consecutive (block, lane); j wrapping at 2**64 is block wrapping
    # at 2**62. So generate whole blocks and cut the requested words out of their stream.
    lane0 = offset & 3
    nblocks = (lane0 + n + 3) // 4
    blocks = np.arange(nblocks, dtype=np.uint64) + np.uint64(offset >> 2)
    blocks &= np.uint64(2**62 - 1)
    counter = np.zeros((nblocks, 4), dtype=np.uint32)
    counter[:, 0] = (blocks & np.uint64(_MASK32)).astype(np.uint32)
    counter[:, 1] = (blocks >> np.uint64(32)).astype(np.uint32)
    key = np.array([seed & _MASK32, seed >> 32], dtype=np.uint32)
    stream = philox4x32(counter, key, rounds=10).reshape(-1)
    return stream[lane0 : lane0 + n].copy()


# ---------------------------------------------------------------------------------------------
# Masks and dropout
# ---------------------------------------------------------------------------------------------


def threshold(p) -> int:
    """The keep threshold ``t = round_half_even(p * 2**32)``, an int in [0, 2**32].

    Element ``i`` is kept iff ``u_i >= t``. ``p`` must be a real number in [0, 1]:
    ``TypeError`` otherwise, ``ValueError`` outside [0, 1] or NaN.
    """
    p = _check_p(p)
    return round(p * float(_TWO32))  # exact product (power of two); round() is half-even


def dropout_scale(p, dtype):
    """The inverted-dropout scale ``1 / (1 - p)``, computed in double and rounded once to ``dtype``.

    Returns a NumPy scalar of ``dtype``. For ``p == 1`` (every element dropped, the scale is never
    used) it returns 0.  ``TypeError``/``ValueError`` for a bad ``p`` as :func:`threshold`.
    """
    p = _check_p(p)
    dtype = np.dtype(dtype)
    if p == 1.0:
        return dtype.type(0)
    with np.errstate(over="ignore"):  # float16 may overflow to inf; that is the rounded value
        return dtype.type(1.0 / (1.0 - p))


def dropout_mask(shape, p, *, seed: int, offset: int = 0, packed: bool = False) -> np.ndarray:
    """The keep mask of a ``shape``-shaped array (flat C-order index ``i``).

    Returns a bool array of ``shape`` (True = kept), or with ``packed=True`` a uint8 array of
    ``ceil(n / 8)`` bytes equal to ``np.packbits(keep.ravel(), bitorder="little")``.

    Raises
    ------
    TypeError
        ``shape`` not ints, a non-real ``p``, non-integer ``seed``/``offset``.
    ValueError
        Negative dimensions, ``p`` outside [0, 1], ``seed``/``offset`` outside [0, 2**64).
    """
    shape = _check_shape(shape)
    t = threshold(p)
    n = math.prod(shape)
    words = random_words(n, seed, offset)
    keep = words.astype(np.int64) >= np.int64(t)  # 64-bit compare: t may be 2**32
    if packed:
        return np.packbits(keep, bitorder="little")
    return keep.reshape(shape)


def _apply_mask(values: np.ndarray, keep: np.ndarray, s) -> np.ndarray:
    # A select, not a multiply: dropped NaN/inf become +0.0. Overflow and signalling NaNs in the
    # kept products are what the arithmetic gives, not an error.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(keep, values * s, values.dtype.type(0))


def dropout(x, p=0.5, *, seed: int, offset: int = 0, training: bool = True, noise_shape=None) -> np.ndarray:
    """Inverted dropout (the contract's dropout): ``y = where(keep, x * s, +0.0)``.

    ``s = dropout_scale(p, x.dtype)``; the mask is ``dropout_mask(x.shape, p, seed, offset)``
    over the flat C-order index of the logical array (errors as :func:`dropout_mask`, and
    ``TypeError`` for an array of another dtype). Returns a new C-contiguous array of
    ``x``'s dtype (float16, bfloat16, float32 or float64). For float16 and bfloat16 (the contract's
    half-precision rule) a kept value is ``x * s`` computed in float32 with ``s`` rounded to float32,
    then rounded once to the dtype. ``training=False`` returns a copy of ``x``.  With ``noise_shape``
    (x's rank, each dimension x's or 1) the mask is ``dropout_mask(noise_shape, ...)`` broadcast over
    ``x`` (the contract's broadcast masks).
    """
    x = _check_float_array(x, "x")
    p = _check_p(p)
    seed = _check_u64(seed, "seed")
    offset = _check_u64(offset, "offset")
    x = np.asarray(x, order="C")
    if not training:
        return x.copy(order="C")
    keep = _broadcast_mask(x.shape, p, seed, offset, noise_shape)
    if _is_half(x.dtype):
        # the contract's half-precision rule: x * s in float32 (s rounded once to float32), rounded once to the dtype
        with np.errstate(over="ignore", invalid="ignore"):
            kept = (x.astype(np.float32) * dropout_scale(p, np.float32)).astype(x.dtype)
        return np.where(keep, kept, x.dtype.type(0))
    return _apply_mask(x, keep, dropout_scale(p, x.dtype))


def dropout_backward(grad, p, *, seed: int, offset: int = 0, noise_shape=None) -> np.ndarray:
    """Gradient of :func:`dropout`: ``where(keep, grad * s, +0.0)`` with the same mask and scale.

    Same arguments, dtypes and errors as :func:`dropout`.
    """
    return dropout(grad, p, seed=seed, offset=offset, training=True, noise_shape=noise_shape)


def _broadcast_mask(shape, p, seed, offset, noise_shape) -> np.ndarray:
    """The keep mask of an array of ``shape``: its own, or ``noise_shape``'s broadcast."""
    if noise_shape is None:
        return dropout_mask(shape, p, seed=seed, offset=offset)
    noise_shape = _check_shape(noise_shape)
    if len(noise_shape) != len(shape) or any(n not in (s, 1) for n, s in zip(noise_shape, shape)):
        raise ValueError(f"noise_shape {noise_shape} must have the rank of {tuple(shape)}, each dimension equal or 1")
    return np.broadcast_to(dropout_mask(noise_shape, p, seed=seed, offset=offset), shape)


# ---------------------------------------------------------------------------------------------
# Dense layers (float64 oracle)
# ---------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _activate(z: np.ndarray, activation) -> np.ndarray:
    if activation is None:
        return z
    if activation == "relu":
        return np.maximum(z, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def _activation_grad(z: np.ndarray, activation) -> np.ndarray:
    if activation == "relu":
        return (z > 0).astype(np.float64)
    # d/dz [z * Phi(z)] = Phi(z) + z * phi(z)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf


def dense(x, weight, bias=None, *, activation=None) -> np.ndarray:
    """``act(x @ weight.T + bias)`` in float64, with ``weight`` of shape (out, in) as torch.

    ``x`` has shape (..., in); the result has shape (..., out) and dtype float64.
    ``activation`` is None, ``"relu"`` or ``"gelu"`` (erf form).

    Raises
    ------
    TypeError
        Arrays that are not float16/32/64 (or bfloat16).
    ValueError
        Shapes that do not fit, an unknown activation.
    """
    x = _check_float_array(x, "x")
    weight = _check_float_array(weight, "weight")
    if bias is not None:
        bias = _check_float_array(bias, "bias")
    activation = _check_activation(activation)
    _check_dense_shapes(x, weight, bias)
    z = x.astype(np.float64) @ weight.astype(np.float64).T
    if bias is not None:
        z = z + bias.astype(np.float64)
    return _activate(z, activation)


def dropout_dense(
    x,
    weight,
    bias=None,
    p=0.5,
    *,
    seed: int,
    offset: int = 0,
    activation=None,
    training: bool = True,
    return_preactivation: bool = False,
):
    """Fused dropout -> dense (the contract's fused layer), in float64.

    ``z = dropout(x, p, seed, offset).astype(float64) @ weight.T + bias`` and ``y = act(z)``:
    the dropped-and-scaled ``x`` is exactly :func:`dropout`'s output in ``x``'s dtype (so the
    scale is rounded to that dtype), then widened. Returns ``y``, or ``(y, z)`` with
    ``return_preactivation=True``.

    Raises
    ------
    TypeError
        Arrays of other dtypes, non-integer ``seed``/``offset``.
    ValueError
        Shapes that do not fit, ``p`` outside [0, 1], ``seed``/``offset`` outside
        [0, 2**64), an unknown activation.
    """
    x = _check_float_array(x, "x")
    weight = _check_float_array(weight, "weight")
    activation = _check_activation(activation)
    _check_dense_shapes(x, weight, bias)
    dropped = dropout(x, p, seed=seed, offset=offset, training=training)
    z = dense(dropped, weight, bias)
    y = _activate(z, activation)
    return (y, z) if return_preactivation else y


def _grad_preactivation(grad_out, activation, preactivation, expected):
    """dL/dz = grad_out * act'(preactivation) in float64 (preactivation required, of the
    output's shape, with an activation)."""
    dz = grad_out.astype(np.float64)
    if activation is not None:
        if preactivation is None:
            raise ValueError(f"preactivation is required with activation={activation!r}")
        z = _check_float_array(preactivation, "preactivation")
        if z.shape != expected:
            raise ValueError(f"preactivation must have shape {expected}, got {z.shape}")
        dz = dz * _activation_grad(z.astype(np.float64), activation)
    return dz


def dropout_dense_backward(
    grad_out,
    x,
    weight,
    p,
    *,
    seed: int,
    offset: int = 0,
    activation=None,
    preactivation=None,
    bias: bool = True,
):
    """Gradients of :func:`dropout_dense` (training mode), in float64.

    ``dz = grad_out * act'(preactivation)`` (relu' = ``z > 0``, gelu' = ``Phi(z) + z phi(z)``),
    ``grad_bias = dz`` summed over the leading dimensions (None when ``bias`` is False),
    ``grad_weight = dz2d.T @ dropout(x)2d`` and
    ``grad_x = where(keep, (dz @ weight) * s, 0)`` with ``dropout``'s mask and scale
    (``s`` rounded to ``x``'s dtype, i.e. the exact derivative of the forward), reshaped to
    ``x.shape``. ``preactivation`` (``z`` of the forward) is required when ``activation`` is
    set. Returns ``(grad_x, grad_weight, grad_bias)``.

    Raises
    ------
    TypeError
        Arrays of other dtypes, non-integer ``seed``/``offset``.
    ValueError
        Shapes that do not fit, a missing ``preactivation`` with an activation, ``p``
        outside [0, 1], ``seed``/``offset`` outside [0, 2**64).
    """
    x = _check_float_array(x, "x")
    weight = _check_float_array(weight, "weight")
    grad_out = _check_float_array(grad_out, "grad_out")
    activation = _check_activation(activation)
    p = _check_p(p)
    _check_dense_shapes(x, weight, None)
    out_features, in_features = weight.shape
    expected = x.shape[:-1] + (out_features,)
    if grad_out.shape != expected:
        raise ValueError(f"grad_out must have shape {expected}, got {grad_out.shape}")

    dz = _grad_preactivation(grad_out, activation, preactivation, expected)

    keep = dropout_mask(x.shape, p, seed=seed, offset=offset)
    dropped = dropout(x, p, seed=seed, offset=offset).astype(np.float64)
    rows = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) cannot infer the rows
    dz2d = dz.reshape(rows, out_features)
    grad_weight = dz2d.T @ dropped.reshape(rows, in_features)
    grad_bias = dz2d.sum(axis=0) if bias else None
    s = np.float64(dropout_scale(p, x.dtype))
    grad_x = _apply_mask(dz @ weight.astype(np.float64), keep, s).reshape(x.shape)
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Attention (float64 oracle, written the plain way: explicit scores, explicit mask)
# ---------------------------------------------------------------------------------------------


def _attention_parts(q, k, v, p, seed, offset, attn_mask, is_causal, scale, enable_gqa, training):
    q = _check_float_array(q, "q").astype(np.float64)
    k = _check_float_array(k, "k").astype(np.float64)
    v = _check_float_array(v, "v").astype(np.float64)
    p = _check_p(p)
    if enable_gqa:
        groups = q.shape[-3] // k.shape[-3]
        k = np.repeat(k, groups, axis=-3)
        v = np.repeat(v, groups, axis=-3)
    E = q.shape[-1]
    scale = (1.0 / math.sqrt(E) if E else 1.0) if scale is None else float(scale)
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask)
        if attn_mask.dtype == np.bool_:
            s = np.where(attn_mask, s, -np.inf)
        else:
            s = s + attn_mask.astype(np.float32).astype(np.float64)
    Lq, Lk = s.shape[-2:]
    if is_causal:
        s = np.where(np.tril(np.ones((Lq, Lk), dtype=bool)), s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if Lk else np.full(s.shape[:-1] + (1,), -np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    prob = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(total[..., 0] > 0, m[..., 0] + np.log(total[..., 0]), -np.inf)
    if training and p > 0.0:
        keep = dropout_mask(prob.shape, p, seed=seed, offset=offset)
    else:
        keep = np.ones(prob.shape, dtype=bool)
    s_keep = np.float64(dropout_scale(p, np.float32)) if training and p > 0.0 else 1.0
    return q, k, v, scale, prob, keep, s_keep, lse


def _sum_to(g: np.ndarray, shape: tuple) -> np.ndarray:
    """g summed over the dimensions that broadcasting added or stretched, to `shape`."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def attention(q, k, v, p=0.0, *, seed: int = 0, offset: int = 0, attn_mask=None, is_causal: bool = False,
              scale=None, enable_gqa: bool = False, training: bool = True, return_lse: bool = False):
    """Scaled dot-product attention with dropout on the probabilities (the contract's attention), in float64.

    ``S = q @ k^T * scale + bias`` (``bias``: a bool ``attn_mask`` gives -inf where False, a float
    one is added; ``is_causal`` hides keys ``j > i``), ``P = softmax(S)`` over the last axis (a row
    of all -inf gives ``P = 0``), ``keep = dropout_mask(P.shape, p, seed, offset)`` over P's full
    broadcast shape, ``out = where(keep, P * s, 0) @ v`` with ``s = dropout_scale(p, float32)``.
    Returns ``out``, or ``(out, lse)`` with ``lse = log(sum(exp(S)))`` per query row (-inf for an
    all-masked row).
    """
    q, k, v, scale, prob, keep, s_keep, lse = _attention_parts(
        q, k, v, p, seed, offset, attn_mask, is_causal, scale, enable_gqa, training)
    out = np.where(keep, prob * s_keep, 0.0) @ v
    return (out, lse) if return_lse else out


def attention_backward(grad_out, q, k, v, p, *, seed: int = 0, offset: int = 0, attn_mask=None,
                       is_causal: bool = False, scale=None, enable_gqa: bool = False):
    """Gradients ``(grad_q, grad_k, grad_v)`` of :func:`attention` (training mode), in float64,
    each summed over the dimensions its input was broadcast along (and over the query heads
    that share a key head with ``enable_gqa``)."""
    shapes = (np.shape(q), np.shape(k), np.shape(v))
    q, k, v, scale, prob, keep, s_keep, _ = _attention_parts(
        q, k, v, p, seed, offset, attn_mask, is_causal, scale, enable_gqa, True)
    g = _check_float_array(grad_out, "grad_out").astype(np.float64)
    dropped = np.where(keep, prob * s_keep, 0.0)
    grad_v = np.swapaxes(dropped, -1, -2) @ g
    d_prob = np.where(keep, (g @ np.swapaxes(v, -1, -2)) * s_keep, 0.0)
    d_s = prob * (d_prob - (d_prob * prob).sum(axis=-1, keepdims=True))
    grad_q = d_s @ k * scale
    grad_k = np.swapaxes(d_s, -1, -2) @ q * scale
    if enable_gqa:
        groups = shapes[0][-3] // shapes[1][-3]
        grad_k = grad_k.reshape(grad_k.shape[:-3] + (-1, groups) + grad_k.shape[-2:]).sum(axis=-3)
        grad_v = grad_v.reshape(grad_v.shape[:-3] + (-1, groups) + grad_v.shape[-2:]).sum(axis=-3)
    return _sum_to(grad_q, shapes[0]), _sum_to(grad_k, shapes[1]), _sum_to(grad_v, shapes[2])



# ---------------------------------------------------------------------------------------------
# The dropout family
# ---------------------------------------------------------------------------------------------

SELU_ALPHA_SCALE = 1.7580993408473766  # SELU's alpha * scale (Klambauer et al. 2017)


def alpha_dropout_constants(p, dtype):
    """``(a, b_keep, b_drop)`` of alpha dropout for ``p`` in (0, 1), computed in double and each
    rounded once to ``dtype``: ``a = 1 / sqrt((alpha**2 * p + 1) * (1 - p))``,
    ``b_keep = alpha * a * p``, ``b_drop = alpha * a * (p - 1)``."""
    p = _check_p(p)
    alpha = SELU_ALPHA_SCALE
    a = 1.0 / math.sqrt((alpha * alpha * p + 1.0) * (1.0 - p))
    dtype = np.dtype(dtype)
    return dtype.type(a), dtype.type(alpha * a * p), dtype.type(alpha * a * (p - 1.0))


def alpha_dropout(x, p=0.5, *, seed: int, offset: int = 0, training: bool = True, noise_shape=None) -> np.ndarray:
    """Alpha dropout for self-normalizing networks (the contract's alpha dropout; Klambauer et al.,
    "Self-Normalizing Neural Networks", NeurIPS 2017), float32 or float64.

    Kept: ``x * a + b_keep`` as two operations in the dtype (each rounded); dropped: ``b_drop``.
    ``p = 0`` (or ``training=False``) returns a copy of ``x``, ``p = 1`` zeros.  ``noise_shape``
    broadcasts the mask as :func:`dropout`'s (feature alpha dropout).
    """
    x = _check_float_array(x, "x")
    if _is_half(x.dtype):
        raise TypeError(f"alpha_dropout takes float32 or float64, got {x.dtype}")
    p = _check_p(p)
    seed, offset = _check_u64(seed, "seed"), _check_u64(offset, "offset")
    x = np.asarray(x, order="C")
    if not training or p == 0.0:
        return x.copy(order="C")
    if p == 1.0:
        return np.zeros_like(x)
    keep = _broadcast_mask(x.shape, p, seed, offset, noise_shape)
    a, b_keep, b_drop = alpha_dropout_constants(p, x.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        kept = (x * a) + b_keep  # two roundings in the dtype
    return np.where(keep, kept, b_drop).astype(x.dtype)


def alpha_dropout_backward(grad, p, *, seed: int, offset: int = 0, noise_shape=None) -> np.ndarray:
    """Gradient of :func:`alpha_dropout`: ``grad * a`` where kept, ``+0.0`` where dropped (``grad``
    itself for ``p = 0``, zeros for ``p = 1``)."""
    grad = _check_float_array(grad, "grad")
    p = _check_p(p)
    grad = np.asarray(grad, order="C")
    if p == 0.0:
        return grad.copy(order="C")
    if p == 1.0:
        return np.zeros_like(grad)
    keep = _broadcast_mask(grad.shape, p, seed, offset, noise_shape)
    a = alpha_dropout_constants(p, grad.dtype)[0]
    return _apply_mask(grad, keep, a)


def gaussian_noise(shape, p, *, seed: int, offset: int = 0) -> np.ndarray:
    """``z`` of Gaussian dropout (the contract's Gaussian dropout), float64, for an array of ``shape``:
    element ``i`` takes ``j = (offset + i) mod 2**64``, ``m = j >> 1``, ``u1 = (w(2m) + 0.5) 2**-32``,
    ``u2 = (w(2m + 1) + 0.5) 2**-32``, ``r = sqrt(-2 ln u1)``, ``theta = 2 pi u2`` and
    ``z = r cos(theta)`` (``j`` even) or ``r sin(theta)`` (``j`` odd)."""
    shape = _check_shape(shape)
    seed, offset = _check_u64(seed, "seed"), _check_u64(offset, "offset")
    n = math.prod(shape)
    if n == 0:
        return np.zeros(shape)
    first = offset & ~1  # the pair of the first element
    words = random_words((offset - first) + n + 1, seed, first).astype(np.float64)
    j = np.arange(n, dtype=np.int64) + (offset - first)  # index relative to the first pair (even)
    pair = j & ~1
    u1 = (words[pair] + 0.5) * 2.0**-32
    u2 = (words[pair + 1] + 0.5) * 2.0**-32
    r = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    odd = (j & 1).astype(bool)  # the parity of offset + i, as first is even
    return np.where(odd, r * np.sin(theta), r * np.cos(theta)).reshape(shape)


def gaussian_dropout(x, p=0.5, *, seed: int, offset: int = 0, training: bool = True) -> np.ndarray:
    """Gaussian dropout in float64: ``x * (1 + sigma * z)``, ``sigma = sqrt(p / (1 - p))``, ``z`` from
    :func:`gaussian_noise`; ``p`` in [0, 1) (``p = 1`` is a ValueError)."""
    x = _check_float_array(x, "x")
    p = _check_p(p)
    if p == 1.0:
        raise ValueError("gaussian_dropout needs p < 1")
    if not training or p == 0.0:
        return x.astype(np.float64)
    sigma = math.sqrt(p / (1.0 - p))
    return x.astype(np.float64) * (1.0 + sigma * gaussian_noise(x.shape, p, seed=seed, offset=offset))


def gaussian_dropout_backward(grad, p, *, seed: int, offset: int = 0) -> np.ndarray:
    """Gradient of :func:`gaussian_dropout`: ``grad * (1 + sigma * z)``, float64."""
    return gaussian_dropout(grad, p, seed=seed, offset=offset)


def dropconnect_dense(x, weight, bias=None, p=0.5, *, seed: int, offset: int = 0, activation=None,
                      training: bool = True, return_preactivation: bool = False):
    """DropConnect (Wan et al., "Regularization of Neural Networks using DropConnect", ICML 2013),
    in float64: ``z = x @ dropout(weight, p, seed, offset).T + bias``, ``y = act(z)``; the mask is
    over the weight's flat index (one mask per call) and the dropped weight is exactly
    :func:`dropout`'s output in the weight's dtype."""
    x = _check_float_array(x, "x")
    weight = _check_float_array(weight, "weight")
    activation = _check_activation(activation)
    _check_dense_shapes(x, weight, bias)
    dropped = dropout(weight, p, seed=seed, offset=offset, training=training)
    z = dense(x, dropped, bias)
    y = _activate(z, activation)
    return (y, z) if return_preactivation else y


def dropconnect_dense_backward(grad_out, x, weight, p, *, seed: int, offset: int = 0, activation=None,
                               preactivation=None, bias: bool = True):
    """Gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`dropconnect_dense` (training), in
    float64: ``dz = grad_out * act'(z)``, ``grad_x = dz @ dropout(weight)``,
    ``grad_weight = where(keep, (dz.T @ x) * s, 0)``, ``grad_bias = dz`` summed over the rows."""
    x = _check_float_array(x, "x")
    weight = _check_float_array(weight, "weight")
    grad_out = _check_float_array(grad_out, "grad_out")
    activation = _check_activation(activation)
    _check_dense_shapes(x, weight, None)
    out_features, in_features = weight.shape
    expected = x.shape[:-1] + (out_features,)
    if grad_out.shape != expected:
        raise ValueError(f"grad_out must have shape {expected}, got {grad_out.shape}")
    dz = _grad_preactivation(grad_out, activation, preactivation, expected)
    rows = math.prod(x.shape[:-1])
    dz2d = dz.reshape(rows, out_features)
    dropped = dropout(weight, p, seed=seed, offset=offset).astype(np.float64)
    grad_x = (dz2d @ dropped).reshape(x.shape)
    keep = dropout_mask(weight.shape, p, seed=seed, offset=offset)
    s = np.float64(dropout_scale(p, weight.dtype))
    grad_weight = _apply_mask(dz2d.T @ x.reshape(rows, in_features).astype(np.float64), keep, s)
    grad_bias = dz2d.sum(axis=0) if bias else None
    return grad_x, grad_weight, grad_bias


def _add_norm_parts(x, residual, p, seed, offset, training, norm, eps):
    x = _check_float_array(x, "x")
    residual = _check_float_array(residual, "residual")
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if residual.dtype != x.dtype or np.broadcast_shapes(residual.shape, x.shape) != x.shape:
        raise ValueError("residual must have x's dtype, and x's shape or one that broadcasts to it")
    s = (residual + dropout(x, p, seed=seed, offset=offset, training=training)).astype(np.float64)  # in the dtype
    mean = np.zeros(s.shape[:-1] + (1,)) if norm == "rms" else s.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((s - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    return x, s, (s - mean) * rstd, rstd


def dropout_add_layer_norm(x, residual, weight, bias, p, *, eps: float = 1e-5, norm: str = "layer", seed: int,
                           offset: int = 0, training: bool = True, return_sum: bool = False):
    """``LayerNorm(residual + dropout(x))`` over the last axis (the contract's dropout + residual +
    normalization), in float64 from ``s = residual + dropout(x)`` computed in the dtype:
    ``(s - mean) / sqrt(var + eps) * weight + bias`` (biased variance), or with ``norm="rms"``
    ``s / sqrt(mean(s**2) + eps) * weight`` (``bias`` must be None).  ``weight`` and ``bias`` may
    be None (no affine).  Returns ``y``, or ``(y, s)``."""
    x, s, xhat, _ = _add_norm_parts(x, residual, p, seed, offset, training, norm, eps)
    y = xhat * (1.0 if weight is None else np.asarray(weight, np.float64))
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return (y, s) if return_sum else y


def dropout_add_layer_norm_backward(grad_out, x, residual, weight, bias, p, *, eps: float = 1e-5,
                                    norm: str = "layer", seed: int, offset: int = 0):
    """Gradients ``(grad_x, grad_residual, grad_weight, grad_bias)`` of
    :func:`dropout_add_layer_norm` (training), in float64; ``grad_weight`` is None without a
    weight and ``grad_bias`` None without a bias (always for RMS)."""
    x, s, xhat, rstd = _add_norm_parts(x, residual, p, seed, offset, True, norm, eps)
    dy = _check_float_array(grad_out, "grad_out").astype(np.float64)
    g = dy * (1.0 if weight is None else np.asarray(weight, np.float64))
    mg = 0.0 if norm == "rms" else g.mean(axis=-1, keepdims=True)
    ds = rstd * (g - mg - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    keep = dropout_mask(x.shape, p, seed=seed, offset=offset)
    grad_x = _apply_mask(ds, keep, np.float64(dropout_scale(p, x.dtype)))
    lead = tuple(range(dy.ndim - 1))
    grad_weight = (dy * xhat).sum(axis=lead) if weight is not None else None
    grad_bias = dy.sum(axis=lead) if bias is not None else None
    r = np.shape(residual)  # a broadcast residual's gradient: ds summed over the broadcast dimensions
    grad_residual = ds.sum(axis=tuple(range(ds.ndim - len(r))))
    grad_residual = grad_residual.sum(axis=tuple(i for i, n in enumerate(r) if n == 1), keepdims=True)
    return grad_x, grad_residual, grad_weight, grad_bias
