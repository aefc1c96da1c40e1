"""Attention with dropout on the probabilities: the NumPy API over the fused kernel."""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import _core
from ._checks import check_flags, check_float_array, check_p, check_u64, scale as dropout_scale, threshold
from ._generator import Generator, check_stream, default_generator


class AttentionPlan(NamedTuple):
    """How the broadcast items of an attention call map onto the inputs' own items."""

    batch_shape: Tuple[int, ...]
    Lq: int
    Lk: int
    E: int
    Ev: int
    q_index: np.ndarray  # per item, the index of its q, k, v matrix (flat over their own lead dims)
    k_index: np.ndarray
    v_index: np.ndarray
    bias: Optional[np.ndarray]  # float32, C-contiguous, (n_mask, mq, Lk)
    bias_index: Optional[np.ndarray]
    bias_row_stride: int
    scale: float

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)


def _lead_index(lead: Tuple[int, ...], batch_shape: Tuple[int, ...]) -> np.ndarray:
    ids = np.arange(math.prod(lead), dtype=np.int64).reshape(lead)
    return np.ascontiguousarray(np.broadcast_to(ids, batch_shape)).reshape(-1)


def check_scale(scale: Any, E: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(E) if E > 0 else 1.0
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def plan(q: np.ndarray, k: np.ndarray, v: np.ndarray, attn_mask: Any, scale: Any,
         enable_gqa: bool = False) -> AttentionPlan:
    """Checks the shapes of an attention call (arrays already of the right dtype) and maps
    each item of the broadcast batch onto its q, k, v and mask."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., L, E), got {a.shape}")
    Lq, E = q.shape[-2:]
    Lk, Ek = k.shape[-2:]
    Lv, Ev = v.shape[-2:]
    if Ek != E:
        raise ValueError(f"k must have shape (..., Lk, {E}) for q of shape {q.shape}, got {k.shape}")
    if Lv != Lk:
        raise ValueError(f"v must have shape (..., {Lk}, Ev) for k of shape {k.shape}, got {v.shape}")
    q_lead, k_lead, v_lead = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    k_ids = np.arange(math.prod(k_lead), dtype=np.int64).reshape(k_lead)
    v_ids = np.arange(math.prod(v_lead), dtype=np.int64).reshape(v_lead)
    if enable_gqa:
        if not (q.ndim >= 3 and k.ndim >= 3 and v.ndim >= 3):
            raise ValueError("enable_gqa needs a heads dimension: q, k, v of shape (..., H, L, E)")
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        if hk != hv or hk == 0 or hq % hk != 0:
            raise ValueError(
                f"enable_gqa: k and v must have the same number of heads, dividing q's; got {hq}, {hk}, {hv}")
        k_ids = np.repeat(k_ids, hq // hk, axis=-1)
        v_ids = np.repeat(v_ids, hq // hk, axis=-1)
    bias = None
    mask_lead: Tuple[int, ...] = ()
    if attn_mask is not None:
        mask = attn_mask
        if mask.ndim < 2:
            mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
        mq, mk = mask.shape[-2:]
        if mq not in (1, Lq) or mk not in (1, Lk):
            raise ValueError(
                f"attn_mask must broadcast to (..., {Lq}, {Lk}), got shape {attn_mask.shape}")
        mask_lead = mask.shape[:-2]
        if mask.dtype == np.bool_:
            bias = np.where(mask, np.float32(0.0), np.float32(-np.inf))
        else:
            bias = mask
        if mk != Lk:
            bias = np.broadcast_to(bias, mask_lead + (mq, Lk))
        bias = np.ascontiguousarray(bias, dtype=np.float32)
    try:
        batch_shape = np.broadcast_shapes(q_lead, k_ids.shape, v_ids.shape, mask_lead)
    except ValueError:
        raise ValueError(
            f"the leading dimensions of q {q.shape}, k {k.shape}, v {v.shape}"
            + (f" and attn_mask {attn_mask.shape}" if attn_mask is not None else "") + " do not broadcast"
        ) from None
    k_index = np.ascontiguousarray(np.broadcast_to(k_ids, batch_shape)).reshape(-1)
    v_index = np.ascontiguousarray(np.broadcast_to(v_ids, batch_shape)).reshape(-1)
    bias_index = None
    row_stride = 0
    if bias is not None:
        bias_index = _lead_index(mask_lead, batch_shape)
        row_stride = Lk if bias.shape[-2] == Lq and Lq > 1 else 0
        bias = bias.reshape((math.prod(mask_lead),) + bias.shape[-2:])
    return AttentionPlan(tuple(batch_shape), Lq, Lk, E, Ev, _lead_index(q_lead, batch_shape), k_index, v_index,
                         bias, bias_index, row_stride, check_scale(scale, E))


def _items(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """a as a C-contiguous (n, rows, cols) array (a copy only when a is not contiguous)."""
    return np.ascontiguousarray(a).reshape(math.prod(a.shape[:-2]), rows, cols)


def _core_args(pl: AttentionPlan, q, k, v):
    q3, k3, v3 = _items(q, pl.Lq, pl.E), _items(k, pl.Lk, pl.E), _items(v, pl.Lk, pl.Ev)
    q_off = pl.q_index * (pl.Lq * pl.E)
    k_off = pl.k_index * (pl.Lk * pl.E)
    v_off = pl.v_index * (pl.Lk * pl.Ev)
    bias = bias_off = None
    if pl.bias is not None:
        bias = pl.bias.reshape(-1)
        bias_off = pl.bias_index * (pl.bias.shape[-2] * pl.Lk)
    return q3, k3, v3, q_off, k_off, v_off, bias, bias_off


def forward_checked(pl: AttentionPlan, q, k, v, causal: bool, masked: bool, p: float, seed: int, offset: int):
    """(out (batch, Lq, Ev), lse (batch, Lq)) from checked float32 inputs."""
    q3, k3, v3, q_off, k_off, v_off, bias, bias_off = _core_args(pl, q, k, v)
    out = np.empty((pl.batch, pl.Lq, pl.Ev), np.float32)
    lse = np.empty((pl.batch, pl.Lq), np.float32)
    _core.attention_forward(q3, k3, v3, q_off, k_off, v_off, bias, bias_off, pl.bias_row_stride, bool(causal),
                            pl.scale, masked, seed, offset, threshold(p), dropout_scale(p, np.float32), out, lse)
    return out, lse


def _sum_items(g: np.ndarray, index: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """Per-item gradients (batch, L, E) summed onto the input's own items, in item order."""
    n = math.prod(shape[:-2])
    if index.shape[0] == n and np.array_equal(index, np.arange(n)):
        return g.reshape(shape)
    total = np.zeros((n,) + g.shape[1:], np.float32)
    np.add.at(total, index, g)
    return total.reshape(shape)


def backward_checked(pl: AttentionPlan, grad_out, q, k, v, out, lse, causal: bool, masked: bool, p: float,
                     seed: int, offset: int):
    q3, k3, v3, q_off, k_off, v_off, bias, bias_off = _core_args(pl, q, k, v)
    go = np.ascontiguousarray(grad_out).reshape(pl.batch, pl.Lq, pl.Ev)
    o = np.ascontiguousarray(out).reshape(pl.batch, pl.Lq, pl.Ev)
    ls = np.ascontiguousarray(lse).reshape(pl.batch, pl.Lq)
    gq = np.empty((pl.batch, pl.Lq, pl.E), np.float32)
    gk = np.empty((pl.batch, pl.Lk, pl.E), np.float32)
    gv = np.empty((pl.batch, pl.Lk, pl.Ev), np.float32)
    _core.attention_backward(go, q3, k3, v3, o, ls, q_off, k_off, v_off, bias, bias_off, pl.bias_row_stride,
                             bool(causal), pl.scale, masked, seed, offset, threshold(p),
                             dropout_scale(p, np.float32), gq, gk, gv)
    return (_sum_items(gq, pl.q_index, q.shape), _sum_items(gk, pl.k_index, k.shape),
            _sum_items(gv, pl.v_index, v.shape))


def _check_mask(attn_mask: Any) -> Optional[np.ndarray]:
    if attn_mask is None:
        return None
    return check_float_array(attn_mask, "attn_mask", (np.bool_, np.float32))


def _check_inputs(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    q = check_float_array(q, "q", (np.float32,))
    k = check_float_array(k, "k", (np.float32,))
    v = check_float_array(v, "v", (np.float32,))
    mask = _check_mask(attn_mask)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and mask is not None:
        raise ValueError("give either attn_mask or is_causal=True, not both (as torch's scaled_dot_product_attention)")
    return q, k, v, plan(q, k, v, mask, scale, bool(enable_gqa))


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    p: float = 0.0,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[Generator] = None,
    attn_mask: Optional[np.ndarray] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    training: bool = True,
    return_lse: bool = False,
    return_stream: bool = False,
) -> Union[np.ndarray, tuple]:
    """Scaled dot-product attention with dropout on the probabilities, fused.

    ``out = dropout(softmax(q @ k^T * scale + bias), p) @ v`` computed tile by tile
    (FlashAttention-2's loops): neither the ``(..., Lq, Lk)`` probabilities nor their
    mask is ever stored.  Element ``(b..., i, j)`` of the probabilities, with flat C-order
    index ``n`` over their full broadcast shape ``(..., Lq, Lk)``, is kept exactly when
    element ``n`` of ``dropout_mask((..., Lq, Lk), p, seed=seed, offset=offset)`` is, and
    scaled by ``1 / (1 - p)`` (float32).  Results are bit-identical for any thread count.

    Parameters
    ----------
    q : float32 array of shape ``(..., Lq, E)``.
    k : float32 array of shape ``(..., Lk, E)``.
    v : float32 array of shape ``(..., Lk, Ev)``.  The leading dimensions of q, k, v
        (and ``attn_mask``) broadcast against each other, as in torch.
    p : dropout probability of the attention probabilities, in [0, 1].
    seed, offset : the Philox stream; when ``seed`` is None, ``(seed, offset)`` is drawn
        from ``generator`` (default: the package's default generator) for
        ``prod(batch) * Lq * Lk`` elements.
    attn_mask : optional bool array (False: the key is not attended) or float32 array
        (added to the scores), broadcastable to ``(..., Lq, Lk)``.
    is_causal : query ``i`` sees keys ``j <= i`` (torch's top-left alignment); not
        together with ``attn_mask``.
    scale : multiplies ``q @ k^T``; default ``1 / sqrt(E)``.
    enable_gqa : grouped-query attention as torch's: q has ``Hq`` heads at axis -3, k and v
        ``Hk`` heads dividing ``Hq``; query head ``h`` uses key head ``h // (Hq / Hk)``.
    training : False disables dropout (and draws nothing).
    return_lse : also return the log-sum-exp of each query row's scores (``-inf`` for a
        row whose keys are all masked), shape ``(..., Lq)``, float32: what
        :func:`attention_backward` needs besides ``out``.
    return_stream : also return the ``(seed, offset)`` used (``(None, None)`` without
        dropout), for :func:`attention_backward`.

    Returns
    -------
    ``out`` of shape ``(..., Lq, Ev)`` (float32), then ``lse`` and ``(seed, offset)`` when
    asked.  A query row whose keys are all masked gives zeros, not NaN.

    Raises
    ------
    TypeError
        q, k, v not float32 arrays (a torch tensor names ``fastdropout.torch``), a mask
        neither bool nor float32, non-integer ``seed``/``offset``, a non-real ``scale``.
    ValueError
        Shapes that do not fit or broadcast, ``p`` outside [0, 1], ``seed``/``offset``
        outside [0, 2**64), ``attn_mask`` with ``is_causal``, both ``seed`` and
        ``generator``, a ``scale`` that is not finite.

    References
    ----------
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", 2023 (the tiled loops).  A. Vaswani et al., "Attention Is All You
    Need", NeurIPS 2017 (attention dropout).

    Examples
    --------
    With ``v`` the identity, ``out`` shows the dropped probabilities (the kept ones doubled):

    >>> q = k = v = np.eye(4, dtype=np.float32)
    >>> fd.attention(q, k, v).round(3)[0]
    array([0.355, 0.215, 0.215, 0.215], dtype=float32)
    >>> fd.attention(q, k, v, 0.5, seed=3).round(3)[0]
    array([0.709, 0.   , 0.43 , 0.43 ], dtype=float32)
    """
    check_flags(is_causal=is_causal, training=training, return_lse=return_lse, return_stream=return_stream)
    q, k, v, pl = _check_inputs(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    p = check_p(p)
    seed, offset = check_stream(seed, offset, generator)
    masked = bool(training) and p > 0.0
    if masked and seed is None:
        seed, offset = (generator or default_generator).draw(pl.batch * pl.Lq * pl.Lk)
    out, lse = forward_checked(pl, q, k, v, bool(is_causal), masked, p, seed or 0, offset)
    result: tuple = (out.reshape(pl.batch_shape + (pl.Lq, pl.Ev)),)
    if return_lse:
        result += (lse.reshape(pl.batch_shape + (pl.Lq,)),)
    if return_stream:
        result += ((seed, offset) if masked else (None, None),)
    return result[0] if len(result) == 1 else result


def attention_backward(
    grad_out: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    p: float,
    *,
    seed: Optional[int],
    offset: int = 0,
    attn_mask: Optional[np.ndarray] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`attention`: ``(grad_q, grad_k, grad_v)``.

    The probabilities are recomputed tile by tile from ``lse`` and the mask regenerated
    from ``(seed, offset, p)`` (FlashAttention-2's backward); nothing of size
    ``Lq * Lk`` is stored.  With ``D = rowsum(grad_out * out)``:
    ``grad_v = dropout(P)^T @ grad_out``, ``dP = dropout_backward(grad_out @ v^T)``,
    ``dS = P * (dP - D)``, ``grad_q = scale * dS @ k``, ``grad_k = scale * dS^T @ q``,
    each summed over the items that broadcast its input.

    Parameters
    ----------
    grad_out : float32 array of ``out``'s shape ``(..., Lq, Ev)``, dL/dout.
    q, k, v, attn_mask, is_causal, scale, enable_gqa : the forward's.
    out, lse : the forward's output and its ``lse`` (``return_lse=True``).
    p, seed, offset : the forward's dropout (``seed`` may be None only when ``p`` is 0).

    Returns
    -------
    ``(grad_q, grad_k, grad_v)``: float32 arrays of q's, k's and v's shapes.

    Raises
    ------
    TypeError, ValueError
        As :func:`attention`; also ``grad_out``, ``out`` or ``lse`` of another shape or
        dtype, ``seed`` None with ``p > 0``.
    """
    check_flags(is_causal=is_causal)
    q, k, v, pl = _check_inputs(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    grad_out = check_float_array(grad_out, "grad_out", (np.float32,))
    out = check_float_array(out, "out", (np.float32,))
    lse = check_float_array(lse, "lse", (np.float32,))
    want_out = pl.batch_shape + (pl.Lq, pl.Ev)
    for name, a, shape in (("grad_out", grad_out, want_out), ("out", out, want_out),
                           ("lse", lse, pl.batch_shape + (pl.Lq,))):
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    p = check_p(p)
    offset = check_u64(offset, "offset")
    masked = p > 0.0
    if seed is None:
        if masked:
            raise ValueError("seed is required when p > 0: pass the (seed, offset) the forward used "
                             "(attention(..., return_stream=True) returns them)")
        seed = 0
    seed = check_u64(seed, "seed")
    return backward_checked(pl, grad_out, q, k, v, out, lse, bool(is_causal), masked, p, seed, offset)
