"""The dropout family (the contract's broadcast masks, alpha dropout, DropConnect, dropout + residual
+ normalization) against the NumPy reference, on every backend and for 1-3 threads.

* broadcast masks and alpha dropout: bit for bit (channel, spatial, locked-over-time and arbitrary
  noise shapes; ``noise_shape = x.shape`` is plain dropout bit for bit; offsets that wrap 2**64);
* DropConnect: forward and gradients within float32 GEMM tolerance (``max|a - b| / max|b| <=
  max(4 K 2**-24, 2**-20)``), the weight's mask exactly (identity inputs expose it);
* dropout + residual + LayerNorm/RMSNorm: within ``2**-20`` of the float64 computation relative to
  the output scale (the statistics are taken in float64; float32 rounding of s and y remains), float32
  and float64; gradients by the same bound;
* bit-identical results for 1, 2 and 3 threads; errors before any work.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import EDGE_OFFSETS

import fastdropout as fd
from fastdropout import reference as ref


def values(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def bits_equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


NOISE = [
    ((4, 3, 5, 6), (4, 3, 1, 1)),      # channel dropout (Dropout2d)
    ((2, 3, 70), (2, 3, 1)),           # Dropout1d
    ((2, 5, 3, 4, 4), (2, 5, 1, 1, 1)),  # Dropout3d
    ((7, 3, 33), (1, 3, 33)),          # locked over time (time first)
    ((3, 7, 33), (3, 1, 33)),          # locked over time (batch first)
    ((5, 6, 7), (1, 6, 1)),
    ((5, 6, 7), (5, 1, 7)),
    ((1, 200, 3), (1, 200, 1)),
    ((64, 65), (1, 1)),
    ((3, 1, 70), (3, 1, 1)),
]


@pytest.mark.parametrize("shape,noise", NOISE, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_broadcast_dropout_bit_for_bit(backend, threads, shape, noise, dtype):
    x = values(shape, dtype)
    for p, offset in ((0.3, 5), (0.5, 2**64 - 7), (1.0, 0)):
        y = fd.dropout(x, p, seed=9, offset=offset, noise_shape=noise)
        bits_equal(y, ref.dropout(x, p, seed=9, offset=offset, noise_shape=noise))
        g = fd.dropout_backward(x, p, seed=9, offset=offset, noise_shape=noise)
        bits_equal(g, ref.dropout_backward(x, p, seed=9, offset=offset, noise_shape=noise))


def test_noise_shape_equal_to_x_is_plain_dropout(backend):
    x = values((5, 6, 7))
    bits_equal(fd.dropout(x, 0.4, seed=3, noise_shape=x.shape), fd.dropout(x, 0.4, seed=3))


def test_broadcast_draws_one_word_per_noise_element():
    x = values((4, 3, 5, 6))
    g = fd.Generator(seed=2)
    y, (seed, offset) = fd.dropout(x, 0.5, generator=g, noise_shape=(4, 3, 1, 1), return_stream=True)
    assert g.offset == 12
    bits_equal(y, ref.dropout(x, 0.5, seed=seed, offset=offset, noise_shape=(4, 3, 1, 1)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9, 1.0])
def test_alpha_dropout_bit_for_bit(backend, threads, dtype, p):
    x = values((3, 1000 + 7), dtype)
    x[0, :4] = [np.inf, -np.inf, np.nan, -0.0]
    for offset in (0, 3, 2**64 - 1):
        with np.errstate(invalid="ignore"):
            y = fd.alpha_dropout(x, p, seed=4, offset=offset)
            expected = ref.alpha_dropout(x, p, seed=4, offset=offset)
        bits_equal(y, expected)
        g = fd.alpha_dropout_backward(x, p, seed=4, offset=offset)
        bits_equal(g, ref.alpha_dropout_backward(x, p, seed=4, offset=offset))
    noise = (3, 1)
    bits_equal(fd.alpha_dropout(x, p, seed=4, noise_shape=noise), ref.alpha_dropout(x, p, seed=4, noise_shape=noise))
    bits_equal(fd.alpha_dropout_backward(x, p, seed=4, noise_shape=noise),
               ref.alpha_dropout_backward(x, p, seed=4, noise_shape=noise))


def test_alpha_dropout_keeps_selu_statistics():
    x = values(1 << 20, np.float64)
    y = fd.alpha_dropout(x, 0.2, seed=1)
    assert abs(y.mean()) < 0.01 and abs(y.std() - 1.0) < 0.01


def gemm_close(a, b, k):
    tol = max(4 * k * 2.0**-24, 2.0**-20)
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    assert np.abs(a - b).max(initial=0.0) <= tol * scale


@pytest.mark.parametrize("shape", [(1, 3, 17), (64, 255, 33), (300, 129, 1025)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5])
def test_dropconnect_matches_reference(backend, threads, shape, activation, p):
    m, k, n = shape
    x, w, b = values((m, k)), values((n, k), seed=1) * 0.1, values(n, seed=2)
    y, z = fd.dropconnect_dense(x, w, b, p, seed=6, offset=3, activation=activation, return_preactivation=True)
    ry, rz = ref.dropconnect_dense(x, w, b, p, seed=6, offset=3, activation=activation, return_preactivation=True)
    gemm_close(z, rz, k)
    gemm_close(y, ry, k)
    dy = values((m, n), seed=3)
    grads = fd.dropconnect_dense_backward(dy, x, w, p, seed=6, offset=3, activation=activation, preactivation=z)
    rgrads = ref.dropconnect_dense_backward(dy, x, w, p, seed=6, offset=3, activation=activation, preactivation=z)
    for got, want, depth in zip(grads, rgrads, (n, m, m)):
        gemm_close(got, want, depth)


def test_dropconnect_mask_is_the_weight_mask(backend):
    n, k = 37, 70
    w = np.ones((n, k), np.float32)
    for offset in EDGE_OFFSETS[:6]:
        y = fd.dropconnect_dense(np.eye(k, dtype=np.float32), w, None, 0.4, seed=8, offset=offset)
        keep = ref.dropout_mask((n, k), 0.4, seed=8, offset=offset)
        assert np.array_equal(y.T != 0, keep)
        _, gw, _ = fd.dropconnect_dense_backward(np.ones((k, n), np.float32), np.ones((k, k), np.float32), w, 0.4,
                                                 seed=8, offset=offset)
        assert np.array_equal(gw != 0, keep)


def norm_close(a, b):
    scale = max(np.abs(b).max(initial=0.0), 1.0)
    assert np.abs(a.astype(np.float64) - b).max(initial=0.0) <= 2.0**-20 * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 64), (40, 1000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout_add_layer_norm_matches_reference(backend, threads, dtype, norm, shape, p):
    x, r = values(shape, dtype), values(shape, dtype, seed=1)
    D = shape[-1]
    w, b = values(D, dtype, seed=2), (values(D, dtype, seed=3) if norm == "layer" else None)
    y, s = fd.dropout_add_layer_norm(x, r, w, b, p, seed=7, offset=1, norm=norm, return_sum=True)
    ry, rs = ref.dropout_add_layer_norm(x, r, w, b, p, seed=7, offset=1, norm=norm, return_sum=True)
    assert y.dtype == dtype and y.shape == x.shape
    bits_equal(s, rs.astype(dtype))  # residual + dropout(x) in the dtype, exactly
    norm_close(y, ry)
    dy = values(shape, dtype, seed=4)
    got = fd.dropout_add_layer_norm_backward(dy, x, r, w, b, p, seed=7, offset=1, norm=norm)
    want = ref.dropout_add_layer_norm_backward(dy, x, r, w, b, p, seed=7, offset=1, norm=norm)
    assert len(got) == (3 if norm == "rms" else 4)
    for g, e in zip(got, want):
        norm_close(g, e)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("r_shape", [(16,), (1, 16), (5, 1, 16), (1, 3, 1)], ids=lambda s: "x".join(map(str, s)))
def test_dropout_add_layer_norm_broadcasts_the_residual(backend, threads, norm, r_shape):
    """residual + dropout(x) broadcasts the residual as NumPy's + does: the output is the one of
    the residual broadcast by hand (bit for bit), grad_residual is dL/ds summed over the
    broadcast dimensions into the residual's shape (as autograd), the reference agrees."""
    shape = (5, 3, 16)
    x, r = values(shape), values(r_shape, seed=1)
    w, b = values(16, seed=2), (values(16, seed=3) if norm == "layer" else None)
    full = np.ascontiguousarray(np.broadcast_to(r, shape))
    y = fd.dropout_add_layer_norm(x, r, w, b, 0.3, seed=7, norm=norm)
    bits_equal(y, fd.dropout_add_layer_norm(x, full, w, b, 0.3, seed=7, norm=norm))
    norm_close(y, ref.dropout_add_layer_norm(x, r, w, b, 0.3, seed=7, norm=norm))
    dy = values(shape, seed=4)
    got = fd.dropout_add_layer_norm_backward(dy, x, r, w, b, 0.3, seed=7, norm=norm)
    by_hand = fd.dropout_add_layer_norm_backward(dy, x, full, w, b, 0.3, seed=7, norm=norm)
    want = ref.dropout_add_layer_norm_backward(dy, x, r, w, b, 0.3, seed=7, norm=norm)
    assert got[1].shape == r_shape and got[1].dtype == np.float32 and want[1].shape == r_shape
    bits_equal(got[0], by_hand[0])
    lead = len(shape) - len(r_shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(r_shape) if n == 1)
    bits_equal(got[1], by_hand[1].sum(axis=axes, dtype=np.float64).reshape(r_shape).astype(np.float32))
    for g, e in zip(got, want):
        norm_close(g, e)
    with pytest.raises(ValueError, match="broadcasts"):
        fd.dropout_add_layer_norm(x, values((2, 16), seed=1), w, b, 0.3, seed=7, norm=norm)
    with pytest.raises(ValueError, match="broadcasts"):
        fd.dropout_add_layer_norm(x, values((1, 5, 3, 16), seed=1), w, b, 0.3, seed=7, norm=norm)


def test_dropout_add_layer_norm_without_affine_and_eval(backend):
    x, r = values((4, 9)), values((4, 9), seed=1)
    y = fd.dropout_add_layer_norm(x, r, None, None, 0.3, seed=2, training=False)
    norm_close(y, ref.dropout_add_layer_norm(x, r, None, None, 0.3, seed=2, training=False))
    gx, gr, gw, gb = fd.dropout_add_layer_norm_backward(values((4, 9), seed=5), x, r, None, None, 0.3, seed=2)
    assert gw is None and gb is None


def test_bit_identical_across_threads(backend):
    x, r = values((300, 257)), values((300, 257), seed=1)
    w, b = values(257, seed=2), values(257, seed=3)
    dy = values((300, 257), seed=4)
    results = []
    for t in (1, 2, 3):
        fd._core.set_num_threads(t)
        try:
            results.append((
                fd.dropout(x, 0.3, seed=1, noise_shape=(300, 1)),
                fd.alpha_dropout(x, 0.3, seed=1),
                fd.dropconnect_dense(x, w.reshape(1, -1).repeat(5, 0), None, 0.5, seed=2),
                fd.dropout_add_layer_norm(x, r, w, b, 0.2, seed=3),
            ) + fd.dropout_add_layer_norm_backward(dy, x, r, w, b, 0.2, seed=3))
        finally:
            fd._core.set_num_threads(2)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            bits_equal(a, b_)


def test_errors_before_any_work():
    x = values((4, 6))
    gen = fd.Generator(seed=1)
    with pytest.raises(ValueError, match="noise_shape"):
        fd.dropout(x, 0.5, generator=gen, noise_shape=(4, 3))
    with pytest.raises(ValueError, match="rank"):
        fd.dropout(x, 0.5, generator=gen, noise_shape=(4,))
    with pytest.raises(TypeError):
        fd.dropout(x.astype(np.float16), 0.5, generator=gen, noise_shape=(4, 1))
    with pytest.raises(TypeError):
        fd.alpha_dropout(x.astype(np.float16), 0.5, generator=gen)
    with pytest.raises(ValueError):
        fd.alpha_dropout(x, 1.5, generator=gen)
    assert gen.offset == 0
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError):
        fd.alpha_dropout(x, 0.5, seed=1, noise_shape=(2, 6), out=out)
    assert np.all(out == 7.0)
    w = values((3, 6))
    with pytest.raises(ValueError):
        fd.dropconnect_dense(x, w[:, :5], None, 0.5, seed=1)
    with pytest.raises(TypeError):
        fd.dropconnect_dense(x.astype(np.float64), w, None, 0.5, seed=1)
    with pytest.raises(ValueError, match="norm"):
        fd.dropout_add_layer_norm(x, x, None, None, 0.1, seed=1, norm="batch")
    with pytest.raises(ValueError, match="rms"):
        fd.dropout_add_layer_norm(x, x, np.ones(6, np.float32), np.ones(6, np.float32), 0.1, seed=1, norm="rms")
    with pytest.raises(TypeError):
        fd.dropout_add_layer_norm(x, x.astype(np.float64), None, None, 0.1, seed=1)
    with pytest.raises(ValueError):
        fd.dropout_add_layer_norm(x, x, np.ones(5, np.float32), None, 0.1, seed=1)
    with pytest.raises(ValueError):
        fd.dropout_add_layer_norm(x, x, None, None, 0.1, seed=1, eps=-1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_gaussian_dropout_within_the_contract_bound(backend, threads, dtype, p):
    x = values((3, 2001), dtype)
    eps = np.finfo(dtype).eps
    for offset in (0, 1, 5, 2**64 - 3):
        y = fd.gaussian_dropout(x, p, seed=12, offset=offset)
        y64 = ref.gaussian_dropout(x, p, seed=12, offset=offset)
        z = ref.gaussian_noise(x.shape, p, seed=12, offset=offset)
        sigma = np.sqrt(p / (1 - p))
        bound = 8 * eps * np.abs(x.astype(np.float64)) * (1 + sigma * np.abs(z))
        assert y.dtype == dtype
        assert np.all(np.abs(y - y64) <= bound)
        g = fd.gaussian_dropout_backward(x, p, seed=12, offset=offset)
        assert np.array_equal(g.view(np.uint8), y.view(np.uint8))


def edge_word_pairs():
    """Word pairs at the transform's seams, each first word against each second word, then random
    ones: u1 at 0, near 1/2 and near 1 (where ln u1 switches to its log1p form) and at the
    logarithm's mantissa split (1.41421356f, bits 0x3fb504f3/0x3fb504f4) in several binades; u2 at
    the boundaries between quarter turns (where the sine and cosine swap and change sign)."""
    w1 = [0, 1, 2, 3, 0x40000000, 0x7FFFFFFE, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xBFFFFFFF, 0xC0000000,
          0xFFFFFFFE, 0xFFFFFFFF]
    for shift in range(8):
        for mantissa in (0xB504F2, 0xB504F3, 0xB504F4, 0xB504F5):
            w1 += [mantissa << shift, 0xFFFFFFFF - (mantissa << shift)]
    w2 = sorted({(q * 0x20000000 + d) % 2**32 for q in range(8) for d in (-2, -1, 0, 1, 2)})
    first = np.repeat(np.array(w1, np.uint64), len(w2))
    second = np.tile(np.array(w2, np.uint64), len(w1))
    rng = np.random.default_rng(5)
    first = np.concatenate([first, rng.integers(0, 2**32, 50_000, dtype=np.uint64)])
    second = np.concatenate([second, rng.integers(0, 2**32, 50_000, dtype=np.uint64)])
    words = np.empty(2 * first.size, np.uint32)
    words[0::2], words[1::2] = first, second
    return words


def test_gaussian_transform_at_its_seams(backend):
    """The float32 Box-Muller transform of chosen words: every backend bit for bit equal to the
    portable code, and within ``4 eps (|z64| + 0.01)`` of the float64 transform.  That is what the
    contract's bound on y needs: ``8 eps |x| (1 + sigma |z|)`` leaves about 5 eps of it to
    ``sigma |z - z64|`` after the rounding of ``sigma z``, ``1 + sigma z`` and the product with x,
    and ``4 eps sigma (|z| + 0.01) <= 4 eps (1 + sigma |z|)`` for sigma up to 100."""
    words = edge_word_pairs()
    z = fd._core.normal_pairs(words)
    fd._core.set_backend("scalar")
    portable = fd._core.normal_pairs(words)
    bits_equal(z, portable)
    u1 = (words[0::2].astype(np.float64) + 0.5) * 2.0**-32
    u2 = (words[1::2].astype(np.float64) + 0.5) * 2.0**-32
    r = np.sqrt(-2.0 * np.log(u1))
    z64 = np.empty(words.size)
    z64[0::2], z64[1::2] = r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)
    eps = np.finfo(np.float32).eps
    assert np.all(np.abs(z - z64) <= 4 * eps * (np.abs(z64) + 0.01))


def test_gaussian_dropout_draws_the_transform_of_its_words(backend, threads):
    """Gaussian dropout of ones at p = 0.5 (sigma = 1) is 1 + z of the stream's word pairs: the
    64-element groups a SIMD backend transforms where the words are generated, the unaligned head
    and tail, and a start in the middle of a pair."""
    n, seed = 4099, 21
    for offset in (0, 1, 63, 64, 2**64 - 67):
        first = offset & ~1  # the first element's pair
        k = offset - first
        words = ref.random_words(k + n + (k + n) % 2, seed, first)
        z = fd._core.normal_pairs(words)[k:k + n]
        y = fd.gaussian_dropout(np.ones(n, np.float32), 0.5, seed=seed, offset=offset)
        bits_equal(y, (np.float32(1.0) + z).astype(np.float32))


def test_gaussian_noise_is_standard_normal():
    z = ref.gaussian_noise(1 << 16, 0.5, seed=3)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    y = fd.gaussian_dropout(np.ones(1 << 20, np.float32), 0.5, seed=3)
    assert abs(y.mean() - 1) < 0.005 and abs(y.var() - 1) < 0.01  # mean 1, variance p / (1 - p)


@pytest.mark.parametrize("kind", ["gaussian", "gaussian_backward", "alpha", "alpha_backward", "channel"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_partially_overlapping_the_input_reads_the_input_first(backend, kind, dtype):
    """NumPy's rule for out=: the result is as if the input had been read before anything was
    written, also when out is the input shifted by one element."""
    call = {"gaussian": lambda a, **kw: fd.gaussian_dropout(a, 0.3, seed=4, offset=1, **kw),
            "gaussian_backward": lambda a, **kw: fd.gaussian_dropout_backward(a, 0.3, seed=4, offset=1, **kw),
            "alpha": lambda a, **kw: fd.alpha_dropout(a, 0.3, seed=4, offset=1, **kw),
            "alpha_backward": lambda a, **kw: fd.alpha_dropout_backward(a, 0.3, seed=4, offset=1, **kw),
            "channel": lambda a, **kw: fd.dropout(a.reshape(-1, 7), 0.3, seed=4, noise_shape=(1, 7), **kw)}[kind]
    buffer = np.random.default_rng(0).standard_normal(7 * 1431 + 1).astype(dtype)
    x, out = buffer[:-1], buffer[1:]
    expected = call(x.copy())
    if kind == "channel":
        x, out = x.reshape(-1, 7), out.reshape(-1, 7)
    assert call(x, out=out) is out
    assert np.array_equal(out.reshape(expected.shape), expected)


def test_gaussian_errors():
    with pytest.raises(ValueError, match="p < 1"):
        fd.gaussian_dropout(values(4), 1.0, seed=1)
    with pytest.raises(TypeError):
        fd.gaussian_dropout(values(4).astype(np.float16), 0.5, seed=1)


@pytest.mark.parametrize("fn", [fd.dropout, fd.alpha_dropout], ids=["dropout", "alpha_dropout"])
def test_noise_shape_as_an_int_draws_from_the_generator(fn):
    """A bare int noise_shape is a 1-d shape, with a seed or drawn from a generator alike."""
    x = np.arange(1, 6, dtype=np.float32)
    g = fd.Generator(seed=3)
    y, (seed, offset) = fn(x, 0.5, noise_shape=5, generator=g, return_stream=True)
    assert g.offset >= offset + 5  # (the generator hands out whole Philox blocks)
    assert np.array_equal(y, fn(x, 0.5, noise_shape=(5,), seed=seed, offset=offset))


@pytest.mark.parametrize("fn,bwd", [(fd.alpha_dropout, fd.alpha_dropout_backward),
                                    (fd.gaussian_dropout, fd.gaussian_dropout_backward)], ids=["alpha", "gaussian"])
def test_p_zero_in_training_returns_a_stream_its_backward_takes(backend, fn, bwd):
    """As dropout: at p = 0 the output is x, and return_stream gives a (seed, offset) drawn
    from the generator that the backward accepts (the identity gradient)."""
    x = np.linspace(-2, 2, 12, dtype=np.float32)
    g = fd.Generator(seed=9)
    y, (seed, offset) = fn(x, 0.0, generator=g, return_stream=True)
    assert np.array_equal(y, x) and seed == 9 and g.offset > offset
    assert np.array_equal(bwd(np.ones_like(x), 0.0, seed=seed, offset=offset), np.ones_like(x))
    assert fn(x, 0.3, training=False, return_stream=True)[1] == (None, None)
