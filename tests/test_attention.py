"""fd.attention and fd.attention_backward (the contract's attention section) against the NumPy
reference, on every backend.

What is checked:

* outputs, log-sum-exp and the three gradients against ``fastdropout.reference`` (float64, explicit
  scores and mask) for Lq != Lk, lengths 1, 3, 17, 64, 127, 129 and 1000, E in {16, 64, 80, 128},
  causal or not, bool and float masks, p in {0, 0.1, 0.5, 1}, non-contiguous inputs, broadcast
  leading dimensions and grouped-query attention;
* the mask bit for bit: with q = 0 and v = I every kept probability shows in ``out``;
* a query row whose keys are all masked gives zeros, ``lse = -inf`` and zero gradients, no NaN;
* bit-identical results for 1, 2 and 3 threads, with more items than threads and fewer (where the
  backward splits the keys, then the queries, over the threads);
* bad shapes, dtypes and arguments raise before any work.

Tolerance: the classical bound of a float32 sum, ``max|a - b| <= rtol(K) * max(M)`` with
``rtol(K) = max(4 * K * 2**-24, 2**-20)``, K the length of the float32 sums behind a result (E + Lk for
``out`` and ``lse``: the scores, then the probability-weighted sum; E + Ev + Lq + Lk for the
gradients) and M the same product taken in absolute values: ``|dropout(P)| @ |v|`` for ``out``,
``|S|`` for ``lse``, ``(P * (|dP| + |D|)) @ |k| * scale`` for ``grad_q``, its transpose times ``|q|``
for ``grad_k`` and ``|dropout(P)|^T @ |grad_out|`` for ``grad_v``.  (Measuring against ``max|b|``
instead fails where a gradient cancels to zero, e.g. one key: P = 1, grad_q = 0 exactly.)
"""
from __future__ import annotations

import numpy as np
import pytest

import fastdropout as fd
from fastdropout import reference as ref


def rtol(k: int) -> float:
    return max(4 * k * 2.0**-24, 2.0**-20)


def assert_close(actual, expected, k: int, magnitude, what: str) -> None:
    assert actual.shape == expected.shape, what
    assert np.all(np.isfinite(actual) | ~np.isfinite(expected)), what
    fin = np.isfinite(expected)
    assert np.array_equal(actual[~fin], expected[~fin]), what
    if not fin.any():
        return
    bound = rtol(k) * max(float(np.max(magnitude, initial=0.0)), 1e-30)
    err = np.abs(actual[fin].astype(np.float64) - expected[fin]).max()
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g}"


def magnitudes(q, k, v, g, p, seed, offset, **kw):
    """|.| versions of the sums behind out, lse and the gradients (see the module docstring)."""
    scale = kw.pop("scale", None)
    gqa = kw.pop("enable_gqa", False)
    mask, causal = kw.pop("attn_mask", None), kw.pop("is_causal", False)
    assert not kw
    qq, kk, vv, scale, prob, keep, s_keep, _ = ref._attention_parts(
        q, k, v, p, seed, offset, mask, causal, scale, gqa, True)
    dropped = np.abs(np.where(keep, prob * s_keep, 0.0))
    gg = np.abs(g.astype(np.float64))
    dp = np.where(keep, gg @ np.abs(np.swapaxes(vv, -1, -2)) * s_keep, 0.0)
    ds = prob * (dp + (dp * prob).sum(-1, keepdims=True))
    scores = np.abs(qq @ np.swapaxes(kk, -1, -2) * scale)
    return (dropped @ np.abs(vv), scores, ds @ np.abs(kk) * scale,
            np.swapaxes(ds, -1, -2) @ np.abs(qq) * scale, np.swapaxes(dropped, -1, -2) @ gg)


def inputs(lead, Lq, Lk, E, Ev, seed=0, k_lead=None, v_lead=None):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead + (Lq, E), dtype=np.float32)
    k = rng.standard_normal((k_lead or lead) + (Lk, E), dtype=np.float32)
    v = rng.standard_normal((v_lead or lead) + (Lk, Ev), dtype=np.float32)
    return q, k, v


def check_against_reference(q, k, v, p, *, seed=11, offset=5, **kw):
    out, lse = fd.attention(q, k, v, p, seed=seed, offset=offset, return_lse=True, **kw)
    r_out, r_lse = ref.attention(q, k, v, p, seed=seed, offset=offset, return_lse=True, **kw)
    g = np.random.default_rng(3).standard_normal(out.shape, dtype=np.float32)
    m_out, m_lse, m_q, m_k, m_v = magnitudes(q, k, v, g, p, seed, offset, **kw)
    Lq, E = q.shape[-2:]
    Lk, Ev = v.shape[-2:]
    assert_close(out, r_out, E + Lk, m_out, "out")
    assert_close(lse, r_lse, E + Lk, m_lse, "lse")
    grads = fd.attention_backward(g, q, k, v, out, lse, p, seed=seed, offset=offset, **kw)
    r_grads = ref.attention_backward(g, q, k, v, p, seed=seed, offset=offset, **kw)
    for name, a, b, x, m in zip(("grad_q", "grad_k", "grad_v"), grads, r_grads, (q, k, v), (m_q, m_k, m_v)):
        assert a.shape == x.shape and a.dtype == np.float32, name
        assert_close(a, b, E + Ev + Lq + Lk, m, name)
    return out, lse, grads


SHAPES = [  # (lead, Lq, Lk, E, Ev)
    ((2,), 1, 1, 16, 16),
    ((1,), 3, 17, 16, 16),
    ((2, 2), 17, 3, 64, 64),
    ((1,), 64, 64, 80, 80),
    ((1,), 127, 129, 128, 64),
    ((2,), 129, 127, 16, 80),
    ((1,), 1000, 64, 64, 16),
    ((1,), 40, 1000, 16, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference(backend, shape, p, causal):
    lead, Lq, Lk, E, Ev = shape
    check_against_reference(*inputs(lead, Lq, Lk, E, Ev), p, is_causal=causal)


@pytest.mark.parametrize("kind", ["bool", "float", "bool per query", "float padding"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_masks(backend, kind, p):
    q, k, v = inputs((2, 3), 19, 33, 16, 24)
    rng = np.random.default_rng(7)
    if kind == "bool":
        mask = rng.random((2, 3, 19, 33)) < 0.7
    elif kind == "float":
        mask = rng.standard_normal((19, 33)).astype(np.float32)
    elif kind == "bool per query":
        mask = rng.random((3, 19, 1)) < 2  # all True, broadcast over the keys
    else:  # a BERT-style padding mask (batch, 1, 1, keys)
        mask = np.where(rng.random((2, 1, 1, 33)) < 0.8, 0.0, -np.inf).astype(np.float32)
        mask[..., 0] = 0.0
    check_against_reference(q, k, v, p, attn_mask=mask)


def test_fully_masked_rows_give_zeros(backend):
    q, k, v = inputs((2,), 9, 13, 16, 16)
    mask = np.ones((2, 9, 13), dtype=bool)
    mask[0, 3] = False
    mask[1, 8] = False
    out, lse, grads = check_against_reference(q, k, v, 0.2, attn_mask=mask)
    assert np.all(out[0, 3] == 0) and np.all(out[1, 8] == 0)
    assert lse[0, 3] == -np.inf and lse[1, 8] == -np.inf
    assert np.all(grads[0][0, 3] == 0) and np.all(grads[0][1, 8] == 0)
    for a in (out,) + tuple(grads):
        assert np.all(np.isfinite(a))
    fmask = np.where(mask, 0.0, -np.inf).astype(np.float32)  # the same through a float mask
    out_f = fd.attention(q, k, v, 0.2, seed=11, offset=5, attn_mask=fmask)
    assert np.array_equal(out_f, out)


def test_no_keys(backend):
    q, k, v = inputs((2,), 5, 0, 8, 4)
    out, lse = fd.attention(q, k, v, 0.5, seed=1, return_lse=True)
    assert out.shape == (2, 5, 4) and np.all(out == 0) and np.all(lse == -np.inf)
    gq, gk, gv = fd.attention_backward(np.ones_like(out), q, k, v, out, lse, 0.5, seed=1)
    assert np.all(gq == 0) and gk.shape == k.shape and gv.shape == v.shape


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_no_queries_with_a_mask(backend, mask):
    """Zero queries: an empty result whatever the mask (whose zero rows are never read)."""
    q, k, v = inputs((2,), 0, 6, 8, 4)
    attn_mask = np.ones((0, 6), bool) if mask == "bool" else np.zeros((2, 0, 6), np.float32)
    out, lse = fd.attention(q, k, v, 0.5, seed=1, attn_mask=attn_mask, return_lse=True)
    assert out.shape == (2, 0, 4) and lse.shape == (2, 0)
    gq, gk, gv = fd.attention_backward(np.ones_like(out), q, k, v, out, lse, 0.5, seed=1, attn_mask=attn_mask)
    assert gq.shape == q.shape and np.all(gk == 0) and np.all(gv == 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("offset", [0, 3, 2**64 - 7])
def test_mask_bit_for_bit(backend, causal, offset):
    """q = 0 makes every visible probability equal and positive; v = I copies P into out."""
    lead, L = (2, 3), 70
    q = np.zeros(lead + (L, 16), np.float32)
    k = np.random.default_rng(0).standard_normal(lead + (L, 16), dtype=np.float32)
    v = np.broadcast_to(np.eye(L, dtype=np.float32), lead + (L, L))
    out = fd.attention(q, k, v, 0.4, seed=2**64 - 1, offset=offset, is_causal=causal)
    keep = fd.reference.dropout_mask(lead + (L, L), 0.4, seed=2**64 - 1, offset=offset)
    visible = np.tril(np.ones((L, L), bool)) if causal else np.ones((L, L), bool)
    assert np.array_equal(out != 0, keep & visible)


def test_broadcast_and_grouped_query(backend):
    q, _, _ = inputs((2, 4), 21, 21, 16, 16)
    _, k, v = inputs((2, 2), 21, 21, 16, 16, seed=1)
    check_against_reference(q, k, v, 0.25, enable_gqa=True)
    q, k, v = inputs((2, 3), 21, 30, 16, 8, k_lead=(1, 3), v_lead=(3,))
    check_against_reference(q, k, v, 0.25)
    q, k, v = inputs((), 21, 30, 16, 8, k_lead=(2,), v_lead=(2,))  # q broadcast over k's batch
    check_against_reference(q, k, v, 0.25, is_causal=True)


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 40, 32), dtype=np.float32)[:, ::2, ::2]
    k = rng.standard_normal((2, 16, 33), dtype=np.float32).transpose(0, 2, 1)[:, :, :16].copy()[:, ::-1]
    v = np.asfortranarray(rng.standard_normal((2, 33, 12), dtype=np.float32))
    check_against_reference(q, k, v, 0.3, scale=0.37)


def _run(q, k, v, p, **kw):
    out, lse = fd.attention(q, k, v, p, seed=9, offset=1, return_lse=True, **kw)
    g = np.random.default_rng(5).standard_normal(out.shape, dtype=np.float32)
    return (out, lse) + fd.attention_backward(g, q, k, v, out, lse, p, seed=9, offset=1, **kw)


@pytest.mark.parametrize("lead", [(1,), (2,), (5,)], ids=["1 item", "2 items", "5 items"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bit_identical_across_threads(backend, lead, causal):
    q, k, v = inputs(lead, 300, 260, 64, 48)
    with _threads(1):
        expected = _run(q, k, v, 0.2, is_causal=causal)
    for t in (2, 3):
        with _threads(t):
            got = _run(q, k, v, 0.2, is_causal=causal)
        for a, b in zip(got, expected):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = fd.get_num_threads()
        fd._core.set_num_threads(self.n)

    def __exit__(self, *exc):
        fd._core.set_num_threads(self.before)


def test_generator_and_training_flag():
    q, k, v = inputs((2,), 8, 8, 8, 8)
    g1, g2 = fd.Generator(seed=5), fd.Generator(seed=5)
    a, (seed, offset) = fd.attention(q, k, v, 0.5, generator=g1, return_stream=True)
    assert (seed, offset) == (5, 0) and g1.offset == 2 * 8 * 8
    assert np.array_equal(a, fd.attention(q, k, v, 0.5, seed=seed, offset=offset))
    assert np.array_equal(fd.attention(q, k, v, 0.5, generator=g2), a)
    plain = fd.attention(q, k, v, 0.5, training=False, generator=g2)
    assert g2.offset == 2 * 8 * 8  # nothing drawn
    assert np.array_equal(plain, fd.attention(q, k, v))


def test_errors_before_any_work():
    q, k, v = inputs((2,), 8, 9, 16, 4)
    gen = fd.Generator(seed=1)
    bad = [
        (TypeError, dict(q=q.astype(np.float64))),
        (TypeError, dict(k=[[1.0]])),
        (TypeError, dict(attn_mask=np.zeros((8, 9), np.int32))),
        (ValueError, dict(k=k[..., :15])),
        (ValueError, dict(v=v[:, :8])),
        (ValueError, dict(q=q[0, 0])),
        (ValueError, dict(attn_mask=np.ones((8, 8), bool))),
        (ValueError, dict(attn_mask=np.ones((3, 8, 9), bool))),
        (ValueError, dict(attn_mask=np.ones((8, 9), bool), is_causal=True)),
        (ValueError, dict(p=1.5)),
        (ValueError, dict(scale=float("nan"))),
        (TypeError, dict(scale="1")),
        (TypeError, dict(is_causal=1)),
        (ValueError, dict(seed=-1)),
        (ValueError, dict(seed=1, generator=gen)),
        (ValueError, dict(k=np.concatenate([k, k[:1]]), v=np.concatenate([v, v[:1]]), enable_gqa=True)),
    ]
    for exc, change in bad:
        args = dict(q=q, k=k, v=v, p=0.1, generator=gen)
        if "seed" in change:
            args.pop("generator")
        args.update(change)
        with pytest.raises(exc):
            fd.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("p"), **args)
        assert gen.offset == 0, change  # nothing drawn before the error
    out, lse = fd.attention(q, k, v, 0.1, seed=1, return_lse=True)
    g = np.ones_like(out)
    with pytest.raises(ValueError, match="lse"):
        fd.attention_backward(g, q, k, v, out, lse[:, :7], 0.1, seed=1)
    with pytest.raises(ValueError, match="grad_out"):
        fd.attention_backward(g[:, :, :3], q, k, v, out, lse, 0.1, seed=1)
    with pytest.raises(ValueError, match="seed"):
        fd.attention_backward(g, q, k, v, out, lse, 0.1, seed=None)
    with pytest.raises(TypeError):
        fd.attention_backward(g.astype(np.float64), q, k, v, out, lse, 0.1, seed=1)
