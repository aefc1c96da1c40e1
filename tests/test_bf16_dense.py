"""The dense engine on bfloat16 operands (NumPy through ml_dtypes, and torch): operands widened to
float32 as they are packed, float32 sums, one rounding of the result.

Bound: against the float64 computation on the bfloat16 operands with the same mask (the dropped-out
x is ``reference.dropout`` of the bfloat16 x: ``x * s`` rounded once to bfloat16),
``|y - y64| <= 2**-8 |y64| + 4 K 2**-24 M`` elementwise, with ``M = |xd| @ |w|.T + |b|`` (K the
depth): one bfloat16 rounding (2**-9 relative), which a float32 sum error can push one bfloat16 ulp
further, plus that error.  Also: with p = 0, or p = 0.5 (an exact scale), the bfloat16 path equals
the float32 path on the widened operands bit for bit before its final rounding; bit-identical for
any thread count.
"""
from __future__ import annotations

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

import fastdropout as fd  # noqa: E402
from fastdropout import reference as ref  # noqa: E402

BF16 = ml_dtypes.bfloat16


def operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(BF16)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(BF16)
    b = rng.standard_normal(n).astype(np.float32)
    return x, w, b


def within(y, y64, mag, k):
    bound = 2.0**-8 * np.abs(y64) + 4 * k * 2.0**-24 * mag
    assert np.all(np.abs(y.astype(np.float64) - y64) <= bound)


@pytest.mark.parametrize("shape", [(1, 3, 5), (64, 300, 70), (257, 1030, 129)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_bf16_forward_and_backward(backend, threads, gemm_path, bf16_gemm, shape, p, activation):
    m, k, n = shape
    x, w, b = operands(m, k, n)
    y, z = fd.dropout_dense(x, w, b, p, seed=4, offset=1, activation=activation, return_preactivation=True)
    assert y.dtype == BF16 and z.dtype == np.float32
    xd = ref.dropout(x, p, seed=4, offset=1).astype(np.float64)
    w64 = w.astype(np.float64)
    z64 = xd @ w64.T + b
    mag = np.abs(xd) @ np.abs(w64).T + np.abs(b)
    within(z, z64, mag, k)
    within(y, np.maximum(z64, 0) if activation else z64, mag, k)
    dy = np.random.default_rng(2).standard_normal((m, n)).astype(BF16)
    gx, gw, gb = fd.dropout_dense_backward(dy, x, w, p, seed=4, offset=1, activation=activation, preactivation=z)
    assert gx.dtype == gw.dtype == gb.dtype == BF16
    dz = dy.astype(np.float64) * ((z > 0) if activation else 1.0)
    keep = ref.dropout_mask(x.shape, p, seed=4, offset=1)
    s = float(ref.dropout_scale(p, np.float32))
    within(gx, np.where(keep, (dz @ w64) * s, 0.0), np.where(keep, (np.abs(dz) @ np.abs(w64)) * s, 0.0), n)
    within(gw, dz.T @ xd, np.abs(dz).T @ np.abs(xd), m)
    within(gb, dz.sum(0), np.abs(dz).sum(0), m)


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("n", [40, 100])  # 100 columns: the sparse path at p = 0.5 on avx2 too
def test_bf16_path_is_the_float32_path_on_widened_operands(backend, gemm_path, bf16_gemm, p, n):
    x, w, b = operands(96, 520, n, seed=1)
    y = fd.dropout_dense(x, w, b, p, seed=7)
    y32 = fd.dropout_dense(x.astype(np.float32), w.astype(np.float32), b, p, seed=7)
    assert np.array_equal(y.view(np.uint16), y32.astype(BF16).view(np.uint16))


def test_bf16_threads_and_dropconnect(backend, bf16_gemm):
    x, w, b = operands(300, 257, 65, seed=3)
    results = []
    for t in (1, 2, 3):
        fd._core.set_num_threads(t)
        try:
            results.append((fd.dropout_dense(x, w, b, 0.4, seed=2),
                            fd.dropconnect_dense(x, w, b, 0.4, seed=2))
                           + fd.dropout_dense_backward(np.ones((300, 65), BF16), x, w, 0.4, seed=2))
        finally:
            fd._core.set_num_threads(2)
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert np.array_equal(a.view(np.uint16), e.view(np.uint16))
    wd = ref.dropout(w, 0.4, seed=2).astype(np.float64)
    within(results[0][1], x.astype(np.float64) @ wd.T + b, np.abs(x.astype(np.float64)) @ np.abs(wd).T + np.abs(b), 257)


def test_bf16_errors():
    x, w, b = operands(4, 8, 3)
    with pytest.raises(TypeError, match="one dtype"):
        fd.dropout_dense(x, w.astype(np.float32), b, 0.5, seed=1)
    with pytest.raises(TypeError):
        fd.dropout_dense(x.astype(np.float16), w.astype(np.float16), b, 0.5, seed=1)


# --- the bfloat16 dot-product kernel (vdpbf16ps, avx512 on CPUs with AVX512_BF16) ---------------
# It must give the float32 kernels' bits wherever it runs, and leave to them every block where it
# could not (subnormals, which it treats as zero; infs and NaNs; values that are not bfloat16).


def dot_runs() -> bool:
    """Whether the dot-product kernel can run on the active backend when forced."""
    previous = fd._core.bf16_gemm()
    fd._core.set_bf16_gemm("dot")
    try:
        return fd._core.bf16_gemm()[0]
    finally:
        fd._core.set_bf16_gemm("auto" if not previous[1].endswith("(FASTDROPOUT_BF16_GEMM)") else
                               ("dot" if previous[0] else "float32"))


def everything(x, w, b, p, activation, dy):
    """Forward (y, z), backward and DropConnect of one layer, as uint16/uint32 views."""
    y, z = fd.dropout_dense(x, w, b, p, seed=9, offset=3, activation=activation, return_preactivation=True)
    grads = fd.dropout_dense_backward(dy, x, w, p, seed=9, offset=3, activation=activation, preactivation=z)
    dc = fd.dropconnect_dense(x, w, b, p, seed=9, offset=3)
    return [y.view(np.uint16), z.view(np.uint32), dc.view(np.uint16)] + [g.view(np.uint16) for g in grads]


def both_kernels(*args):
    """everything() under the float32 kernels, then under the dot-product kernel, and how many
    blocks the latter computed."""
    out = {}
    try:
        for setting in ("float32", "dot"):
            fd._core.set_bf16_gemm(setting)
            before = fd._core._bf16_dot_blocks()
            out[setting] = everything(*args)
            blocks = fd._core._bf16_dot_blocks() - before
    finally:
        fd._core.set_bf16_gemm("auto")
    return out["float32"], out["dot"], blocks


@pytest.mark.parametrize("shape", [(33, 7, 45), (1030, 70, 33), (64, 1101, 100), (256, 513, 300), (5, 40, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_bf16_dot_kernel_gives_the_float32_bits(backend, threads, shape, p, activation):
    # shapes: an odd depth (a half-empty last pair), two row blocks (kMC 1024), three depth blocks
    # with an odd last one (kKC 512), edge tiles everywhere, a narrow output (taken transposed)
    m, k, n = shape
    x, w, b = operands(m, k, n, seed=11)
    dy = np.random.default_rng(12).standard_normal((m, n)).astype(BF16)
    f32, dot, blocks = both_kernels(x, w, b, p, activation, dy)
    for a, e in zip(f32, dot):
        assert np.array_equal(a, e)
    assert (blocks > 0) == dot_runs()


@pytest.mark.parametrize("case", ["subnormal_x", "subnormal_w", "inf", "nan", "tiny_products", "just_normal",
                                  "overflow"])
def test_bf16_dot_kernel_on_special_values(backend, case):
    # Each case in one block (64 x 96 x 40), so whether the dot-product kernel ran is known:
    # where an operand or a partial sum could be subnormal, or a value is not finite, the block
    # takes the float32 kernel; the bits never differ.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    w = rng.standard_normal((40, 96)).astype(np.float32)
    dot_expected = True
    if case == "subnormal_x":
        x[7, 3] = 2.0**-130  # a bfloat16 subnormal: vdpbf16ps would read it as zero
        dot_expected = False
    elif case == "subnormal_w":
        w[2, 95] = -(2.0**-128)
        dot_expected = False
    elif case == "inf":
        x[0, 0] = np.inf
        dot_expected = False
    elif case == "nan":
        w[5, 9] = np.nan
        dot_expected = False
    elif case == "tiny_products":
        # smallest exponent fields 63 + 78 = 141 < 142: products and sums may be subnormal
        x = np.ldexp(np.abs(x) + 1, -64).astype(np.float32) * np.sign(x)
        w = np.ldexp(np.abs(w) + 1, -49).astype(np.float32) * np.sign(w)
        dot_expected = False
    elif case == "just_normal":
        # 64 + 78 = 142: every product and partial sum a multiple of 2**-126, none subnormal
        x = np.ldexp(np.abs(x) + 1, -63).astype(np.float32) * np.sign(x)
        w = np.ldexp(np.abs(w) + 1, -49).astype(np.float32) * np.sign(w)
    elif case == "overflow":
        x = x * np.float32(2.0**100)
        w = w * np.float32(2.0**60)  # products of 2**160: the sums overflow to inf (and inf - inf)
    x, w = x.astype(BF16), w.astype(BF16)
    f32, dot, _ = both_kernels(x, w, None, 0.0, None, np.ones((64, 40), BF16))
    for a, e in zip(f32, dot):
        assert np.array_equal(a, e)
    if dot_runs():  # which kernel the forward's single block took
        fd._core.set_bf16_gemm("dot")
        try:
            before = fd._core._bf16_dot_blocks()
            fd.dropout_dense(x, w, None, 0.0, seed=1)
            assert (fd._core._bf16_dot_blocks() > before) == dot_expected
        finally:
            fd._core.set_bf16_gemm("auto")


def test_bf16_gemm_rule_and_setting():
    amd4, amd5, intel = ("AuthenticAMD", 0x19, 0x11), ("AuthenticAMD", 0x1A, 0x2), ("GenuineIntel", 6, 0xCF)
    assert fd._core.decide_bf16_gemm(*amd4, True, "")[0] is True
    assert fd._core.decide_bf16_gemm(*amd5, True, "auto")[0] is True
    assert fd._core.decide_bf16_gemm(*intel, True, "")[0] is False
    assert fd._core.decide_bf16_gemm("HygonGenuine", 0x18, 1, True, "")[0] is False
    assert fd._core.decide_bf16_gemm(*intel, True, "dot")[0] is True
    assert fd._core.decide_bf16_gemm(*amd4, True, "float32")[0] is False
    assert fd._core.decide_bf16_gemm(*amd4, False, "dot")[0] is False  # no instruction: never
    with pytest.raises(ValueError, match="FASTDROPOUT_BF16_GEMM"):
        fd._core.decide_bf16_gemm(*amd4, True, "fastest")
    with pytest.raises(ValueError):
        fd._core.set_bf16_gemm("")
    for backend in fd.available_backends():
        previous = fd.backend()
        fd._core.set_backend(backend)
        try:
            fd._core.set_bf16_gemm("dot")
            dot, why = fd._core.bf16_gemm()
            assert dot == (backend == "avx512" and "avx512bf16" in fd._core.cpu_features().split())
            assert why.startswith("dot" if dot else "float32")
        finally:
            fd._core.set_bf16_gemm("auto")
            fd._core.set_backend(previous)


def test_bad_bf16_gemm_environment_fails_the_import():
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTDROPOUT_BF16_GEMM="fastest")
    r = subprocess.run([sys.executable, "-c", "import fastdropout"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "FASTDROPOUT_BF16_GEMM" in r.stderr


# Any small shape, p, activation and operand scale: the dot-product kernel (where it runs) and
# the float32 kernels give the same bits.  The scales reach the exponent rule's boundary (smallest
# exponent fields summing to 142) from both sides, with cancelling signs, so that a wrong rule
# would let a subnormal partial sum through.
def test_bf16_dot_kernel_property(backend):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 70), p=st.sampled_from([0.0, 0.3, 0.5]),
           activation=st.sampled_from([None, "relu", "gelu"]), seed=st.integers(0, 2**32),
           ex=st.integers(-75, 10), ew=st.integers(-75, 10), cancel=st.booleans())
    def check(m, k, n, p, activation, seed, ex, ew, cancel):
        rng = np.random.default_rng(seed)
        x = np.ldexp(rng.uniform(1, 2, (m, k)), ex + rng.integers(0, 3, (m, k))) * rng.choice([-1, 1], (m, k))
        w = np.ldexp(rng.uniform(1, 2, (n, k)), ew + rng.integers(0, 3, (n, k))) * rng.choice([-1, 1], (n, k))
        if cancel and k >= 2:  # pairs of terms that cancel to a few ulps
            x[:, 1::2] = -x[:, 0:k - 1:2] * (1 + 2.0**-7)
            w[:, 1::2] = w[:, 0:k - 1:2]
        x, w = x.astype(BF16), w.astype(BF16)
        dy = rng.standard_normal((m, n)).astype(BF16)
        f32, dot, _ = both_kernels(x, w, None, p, activation, dy)
        for a, e in zip(f32, dot):
            assert np.array_equal(a, e)

    check()


@pytest.mark.parametrize("fields", [141, 142])
def test_bf16_dot_kernel_exponent_rule_is_tight(backend, fields):
    # Two products that cancel to 2**(fields - 268), the finest step products of bfloat16 values
    # with these smallest exponent fields can leave: at 142 that is 2**-126, the smallest normal
    # number, and the dot-product kernel may run; at 141 it is 2**-127, subnormal, which the
    # instruction would flush to zero: the block must take the float32 kernel.
    fx = 70
    fw = fields - fx
    x = np.array([[2.0 ** (fx - 127) * (1 + 2.0**-7), -(2.0 ** (fx - 127)) * (1 + 2.0**-6)]] * 3)
    w = np.array([[2.0 ** (fw - 127) * (1 + 2.0**-7), 2.0 ** (fw - 127)]] * 5)
    x, w = x.astype(BF16), w.astype(BF16)
    assert np.array_equal(x.astype(np.float64), np.asarray(x.astype(np.float32), np.float64))
    f32, dot, _ = both_kernels(x, w, None, 0.0, None, np.ones((3, 5), BF16))
    z = f32[1].view(np.float32)
    assert np.all(z == np.float32(2.0 ** (fields - 268)))  # exact, subnormal at 141
    for a, e in zip(f32, dot):
        assert np.array_equal(a, e)
    if dot_runs():
        fd._core.set_bf16_gemm("dot")
        try:
            before = fd._core._bf16_dot_blocks()
            fd.dropout_dense(x, w, None, 0.0, seed=1)
            assert (fd._core._bf16_dot_blocks() > before) == (fields >= 142)
        finally:
            fd._core.set_bf16_gemm("auto")
