"""fastdropout.torch's dropout family: torch's modules (Dropout1d/2d/3d, AlphaDropout,
FeatureAlphaDropout) with torch's ranks, eval behaviour and formulas under fastdropout's masks;
LockedDropout, DropConnectLinear and DropoutAddLayerNorm against the torch formula with the same mask;
custom operators under torch.compile; a BERT whose LayerNorm(residual + dropout(h)) endings are swapped."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import fastdropout as fd  # noqa: E402
import fastdropout.torch as fdt  # noqa: E402


def drawn_seed(s: int) -> int:
    """The seed an op draws right after torch.manual_seed(s)."""
    torch.manual_seed(s)
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("cls,shape,noise", [
    (fdt.Dropout1d, (4, 3, 10), (4, 3, 1)),
    (fdt.Dropout1d, (3, 10), (3, 1)),
    (fdt.Dropout2d, (2, 3, 4, 5), (2, 3, 1, 1)),
    (fdt.Dropout3d, (2, 3, 2, 4, 5), (2, 3, 1, 1, 1)),
    (fdt.Dropout3d, (3, 2, 4, 5), (3, 1, 1, 1)),
])
def test_channel_dropout(backend, cls, shape, noise):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    m = cls(0.4)
    torch.manual_seed(3)
    y = m(x)
    keep = torch.from_numpy(np.broadcast_to(fd.dropout_mask(noise, 0.4, seed=drawn_seed(3)), shape).copy())
    close(y, torch.where(keep, x / 0.6, 0.0))
    (g,) = torch.autograd.grad(y.sum(), x)
    close(g, torch.where(keep, 1 / 0.6, 0.0).to(x.dtype))
    m.eval()
    assert m(x) is x
    with pytest.raises(ValueError):
        cls(0.4)(torch.randn(2))


@pytest.mark.parametrize("fn,module,shape,torch_fn", [
    (fdt.dropout1d, fdt.Dropout1d, (2, 3, 5), F.dropout1d),
    (fdt.dropout2d, fdt.Dropout2d, (2, 3, 4, 5), F.dropout2d),
    (fdt.dropout3d, fdt.Dropout3d, (2, 3, 2, 4, 5), F.dropout3d),
    (fdt.alpha_dropout, fdt.AlphaDropout, (2, 3, 4), F.alpha_dropout),
    (fdt.feature_alpha_dropout, fdt.FeatureAlphaDropout, (2, 3, 4, 5), F.feature_alpha_dropout),
    (fdt.gaussian_dropout, fdt.GaussianDropout, (2, 3, 4), None),
], ids=lambda v: getattr(v, "__name__", "") if callable(v) and not isinstance(v, type) else "")
def test_functional_forms_are_the_modules(backend, fn, module, shape, torch_fn):
    """Each functional form with torch.nn.functional's signature and defaults (alpha dropout's
    ``training=False``) computes what its module does, with the same draw."""
    import inspect

    if torch_fn is not None:
        ours, theirs = inspect.signature(fn).parameters, inspect.signature(torch_fn).parameters
        assert [(k, v.default) for k, v in ours.items()] == [(k, v.default) for k, v in theirs.items()]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(9)
    expected = module(0.3)(x)
    torch.manual_seed(9)
    got = fn(x, 0.3, training=True)
    assert torch.equal(got, expected) and not torch.equal(got, x)
    assert fn(x, 0.3, training=False) is x and fn(x, 0.0, training=True) is x
    if torch_fn is not None and "alpha" in fn.__name__:
        assert fn(x, 0.3) is x  # torch's default: not training
    y = x.clone()
    torch.manual_seed(9)
    assert fn(y, 0.3, True, True) is y and torch.equal(y, expected)
    grads = []
    for call in (lambda t: fn(t, 0.3, training=True), module(0.3)):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(9)
        call(leaf).backward(torch.arange(leaf.numel(), dtype=torch.float32).view(shape))
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1]) and (grads[0] == 0).any()
    with pytest.raises(ValueError, match="p must be in"):
        fn(x, 1.5, training=True)
    with pytest.raises(TypeError):
        fn(x.numpy(), 0.3, training=True)


def _family_modules():
    return {"Dropout2d": (fdt.Dropout2d(0.4), (3, 2, 4, 5, 5)), "LockedDropout": (fdt.LockedDropout(0.4, dim=1), (3, 4, 5)),
            "AlphaDropout": (fdt.AlphaDropout(0.4), (3, 4, 5)), "FeatureAlphaDropout": (fdt.FeatureAlphaDropout(0.4), (3, 4, 5)),
            "GaussianDropout": (fdt.GaussianDropout(0.4), (3, 4, 5)), "DropConnectLinear": (fdt.DropConnectLinear(5, 6, p=0.4), (3, 4, 5))}


@pytest.mark.parametrize("name", sorted(_family_modules()))
def test_family_under_export_vmap_and_func(backend, name):
    """The family's custom ops under torch.export (train and eval: the eager result with the same
    draw), vmap (randomness "same": one draw for every item; "different": one per item) and
    torch.func.grad (autograd's gradient)."""
    from torch.func import grad, vmap

    module, shape = _family_modules()[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) + 3.0  # no zeros in x
    for train in (True, False):
        module.train(train)
        program = torch.export.export(torch.nn.Sequential(module), (x[0],))
        torch.manual_seed(6)
        exported = program.module()(x[0])
        torch.manual_seed(6)
        assert torch.equal(exported, module(x[0]))
    module.train()
    item = x[0]  # every item equal: then "same" gives equal outputs and "different" does not
    xs = item.expand(shape).contiguous()
    same, different = (vmap(module, randomness=r)(xs) for r in ("same", "different"))
    assert all(torch.equal(same[i], same[0]) for i in range(shape[0]))
    assert not all(torch.equal(different[i], different[0]) for i in range(shape[0]))
    torch.manual_seed(4)
    g = grad(lambda t: module(t).square().sum())(x[0])
    leaf = x[0].clone().requires_grad_()
    torch.manual_seed(4)
    module(leaf).square().sum().backward()
    close(g, leaf.grad)


def test_functional_form_errors():
    with pytest.raises(ValueError, match="dropout1d: expected a 2-D"):
        fdt.dropout1d(torch.ones(2, 3, 4, 5), 0.5)
    with pytest.raises(ValueError, match="feature_alpha_dropout: expected at least 2"):
        fdt.feature_alpha_dropout(torch.ones(3), 0.5, training=True)
    with pytest.raises(ValueError, match="p < 1"):
        fdt.gaussian_dropout(torch.ones(3), 1.0)
    with pytest.warns(UserWarning, match="N, C, L"):
        fdt.dropout2d(torch.ones(2, 3, 4), 0.5)


def test_dropout2d_takes_3d_as_torch_does():
    x = torch.ones(2, 3, 4)
    with pytest.warns(UserWarning, match="N, C, L"):
        y = fdt.Dropout2d(0.5)(x)
    assert all(len(set(row.tolist())) == 1 for row in y.reshape(6, 4))  # whole (N, C) rows kept or dropped
    with pytest.warns(UserWarning):
        torch.nn.Dropout2d(0.5)(x)  # torch's own warning: the same reading


@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_is_torchs_formula(backend, feature):
    x = torch.randn(4, 3, 50, requires_grad=True)
    m = fdt.FeatureAlphaDropout(0.3) if feature else fdt.AlphaDropout(0.3)
    torch.manual_seed(5)
    y = m(x)
    noise = (4, 3, 1) if feature else (4, 3, 50)
    keep = torch.from_numpy(np.broadcast_to(fd.dropout_mask(noise, 0.3, seed=drawn_seed(5)), x.shape).copy())
    alpha, p = 1.7580993408473766, 0.3  # torch's _dropout_impl: input * noise * a + b
    a = 1.0 / math.sqrt((alpha * alpha * p + 1) * (1 - p))
    b = (keep.double() - 1) * alpha * a + alpha * a * p
    close(y, (x.detach().double() * keep.double() * a + b).float())
    (g,) = torch.autograd.grad(y.sum(), x)
    close(g, keep.float() * a)
    m.eval()
    assert m(x) is x
    big = torch.randn(1 << 18)
    torch.manual_seed(1)
    ours, theirs = fdt.AlphaDropout(0.2)(big), F.alpha_dropout(big, 0.2, True)
    for stat in (torch.mean, torch.std):
        assert abs(stat(ours) - stat(theirs)) < 0.02


def test_locked_dropout_shares_the_mask_over_time():
    x = torch.randn(7, 3, 5, requires_grad=True)
    torch.manual_seed(2)
    y = fdt.LockedDropout(0.5, dim=0)(x)
    keep = torch.from_numpy(np.broadcast_to(fd.dropout_mask((1, 3, 5), 0.5, seed=drawn_seed(2)), x.shape).copy())
    close(y, torch.where(keep, x * 2, 0.0))


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_dropconnect_linear(backend, activation):
    torch.manual_seed(0)
    m = fdt.DropConnectLinear(12, 7, p=0.3, activation=activation)
    x = torch.randn(5, 12, requires_grad=True)
    torch.manual_seed(9)
    y = m(x)
    keep = torch.from_numpy(fd.dropout_mask((7, 12), 0.3, seed=drawn_seed(9)))
    expected = F.linear(x, m.weight * keep / 0.7, m.bias)
    expected = {None: expected, "relu": F.relu(expected), "gelu": F.gelu(expected)}[activation]
    close(y, expected)
    g = torch.randn_like(y)
    params = (x, m.weight, m.bias)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g)):
        close(a, b)
    act = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu}[activation]
    # second derivatives (a gradient penalty) are right
    torch.manual_seed(9)
    (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(act(F.linear(x, m.weight * keep / 0.7, m.bias)).square().sum(), x,
                                    create_graph=True)
    pen = torch.autograd.grad(gx.square().sum(), m.weight)[0]
    pen_ref = torch.autograd.grad(gx_ref.square().sum(), m.weight)[0]
    close(pen, pen_ref, rtol=1e-4, atol=1e-5)
    m.eval()
    close(m(x), act(F.linear(x, m.weight, m.bias)))


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_add_layer_norm(backend, norm, dtype):
    m = fdt.DropoutAddLayerNorm(16, p=0.2, norm=norm, dtype=dtype)
    with torch.no_grad():
        m.weight.normal_()
        if m.bias is not None:
            m.bias.normal_()
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    torch.manual_seed(4)
    y = m(x, r)
    keep = torch.from_numpy(fd.dropout_mask(x.shape, 0.2, seed=drawn_seed(4)))
    s = r + torch.where(keep, x * (1 / 0.8), 0.0)
    expected = F.layer_norm(s, (16,), m.weight, m.bias, 1e-5) if norm == "layer" else F.rms_norm(s, (16,), m.weight, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    close(y, expected, **tol)
    g = torch.randn_like(y)
    params = [x, r] + [p for p in (m.weight, m.bias) if p is not None]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g)):
        close(a, b, **({"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else tol))
    m.eval()
    ev = F.layer_norm(r + x, (16,), m.weight, m.bias, 1e-5) if norm == "layer" else F.rms_norm(r + x, (16,), m.weight, 1e-5)
    close(m(x, r), ev, **tol)


@pytest.mark.parametrize("residual_shape", [(16,), (5, 1), (1, 5, 16)], ids=lambda s: "x".join(map(str, s)))
def test_dropout_add_layer_norm_broadcasts_the_residual(backend, residual_shape):
    """residual + dropout(x) with a residual that broadcasts to x's shape, as torch's add: the
    output and every gradient (the residual's summed over the broadcast dimensions) as torch's."""
    m = fdt.DropoutAddLayerNorm(16, p=0.2)
    x = torch.randn(3, 5, 16, requires_grad=True)
    r = torch.randn(*residual_shape, requires_grad=True)
    torch.manual_seed(4)
    y = m(x, r)
    keep = torch.from_numpy(fd.dropout_mask(x.shape, 0.2, seed=drawn_seed(4)))
    expected = F.layer_norm(r + torch.where(keep, x * (1 / 0.8), 0.0), (16,), m.weight, m.bias, 1e-5)
    close(y, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, r], g), torch.autograd.grad(expected, [x, r], g)):
        assert a.shape == b.shape
        close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="broadcasts"):
        m(x, torch.randn(2, 5, 16))


def test_dropout_with_p_zero_is_the_input_itself_and_draws_nothing():
    x = torch.randn(3, 4)
    state = torch.get_rng_state()
    assert fdt.Dropout(0.0)(x) is x and fdt.dropout(x, 0.0) is x
    assert torch.equal(torch.get_rng_state(), state)  # as torch's dropout: no draw


def test_family_compiles_without_graph_breaks():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3, padding=1)
            self.drop = fdt.Dropout1d(0.2)
            self.alpha = fdt.AlphaDropout(0.1)
            self.lin = fdt.DropConnectLinear(10, 10, p=0.3)
            self.norm = fdt.DropoutAddLayerNorm(10, p=0.1)

        def forward(self, x):
            h = self.alpha(self.drop(self.conv(x)))
            return self.norm(self.lin(h), h)

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 4, 10)
    compiled = torch.compile(model, fullgraph=True)
    outs = []
    for m in (model, compiled):
        torch.manual_seed(8)
        y = m(x)
        outs.append((y, torch.autograd.grad(y.square().sum(), list(model.parameters()))))
    close(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1]):
        close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("make", [fdt.Dropout2d, fdt.AlphaDropout, fdt.FeatureAlphaDropout, fdt.GaussianDropout,
                                  lambda p: fdt.LockedDropout(p, dim=2)], ids=lambda m: getattr(m, "__name__", "Locked"))
def test_family_keeps_the_memory_format(backend, make, layout, dtype):
    """A channels-last or transposed input gives an output of the same layout, as torch's
    modules do, with the values (and gradient) of the same call on the contiguous input."""
    base = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(dtype)
    x = base.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else base.transpose(2, 3)
    logical = x.contiguous()
    module = make(0.4)
    results = []
    for t in (x, logical):
        leaf = t.clone(memory_format=torch.preserve_format).requires_grad_()
        torch.manual_seed(3)
        y = module(leaf)
        y.backward(torch.arange(y.numel(), dtype=dtype).view(y.shape) / 7)
        results.append((y, leaf.grad))
    (y, g), (y_ref, g_ref) = results
    assert y.stride() == torch.empty_like(x).stride() and g.stride() == x.stride()
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)


def test_channels_last_model_compiles_with_the_kernels_layout():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), fdt.Dropout2d(0.3), torch.nn.ReLU(inplace=True),
                                fdt.FeatureAlphaDropout(0.2)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    outs = []
    for m in (model, compiled):
        torch.manual_seed(4)
        y = m(x)
        outs.append((y, torch.autograd.grad(y.square().sum(), list(model.parameters()))))
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last)
    close(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1]):
        close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [
    lambda: fdt.Dropout1d(0.4), lambda: fdt.Dropout2d(0.4), lambda: fdt.LockedDropout(0.4, dim=1),
    lambda: fdt.AlphaDropout(0.4), lambda: fdt.FeatureAlphaDropout(0.4), lambda: fdt.GaussianDropout(0.4),
], ids=["Dropout1d", "Dropout2d", "LockedDropout", "AlphaDropout", "FeatureAlphaDropout", "GaussianDropout"])
def test_half_precision_is_the_float32_result_rounded_once(backend, make, dtype):
    """float16/bfloat16 inputs: the float32 module's output on the widened input, rounded once
    to the dtype (same draw, same mask and noise), forward and backward, eager and through the
    custom operator (autocast sends the call through the dispatcher)."""
    shape = (3, 4, 5) if isinstance(make(), fdt.Dropout1d) else (2, 3, 4, 5)
    x = torch.randn(shape).to(dtype)
    dy = torch.randn(shape).to(dtype)
    m = make()

    def run(inp, grad):
        inp = inp.detach().requires_grad_()
        torch.manual_seed(5)
        y = m(inp)
        (g,) = torch.autograd.grad(y, inp, grad)
        return y, g

    y32, g32 = run(x.float(), dy.float())
    y, g = run(x, dy)
    assert y.dtype == dtype and g.dtype == dtype
    assert torch.equal(y, y32.to(dtype)) and torch.equal(g, g32.to(dtype))
    assert not torch.equal(y, x)  # something was dropped or scaled
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, ga = run(x, dy)
    assert torch.equal(ya, y) and torch.equal(ga, g)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32, torch.float32),  # autocast: h bf16, residual f32
                                    (torch.float32, torch.float32, torch.bfloat16)],
                         ids=["bf16", "f16", "bf16+f32", "bf16 params"])
def test_add_norm_in_half_precision_is_the_float32_result_rounded_once(backend, norm, dtypes):
    """DropoutAddLayerNorm with 16-bit inputs or parameters: the float32 computation (the NumPy
    API) on the widened values with the same draw, the output rounded once to
    promote_types(x, residual), each gradient rounded once to its tensor's dtype."""
    x_dtype, r_dtype, p_dtype = dtypes
    x, r = torch.randn(6, 16).to(x_dtype), torch.randn(6, 16).to(r_dtype)
    dy = torch.randn(6, 16)
    m = fdt.DropoutAddLayerNorm(16, p=0.3, norm=norm)
    with torch.no_grad():
        m.weight.copy_(torch.randn(16))
        if m.bias is not None:
            m.bias.copy_(torch.randn(16))
    m = m.to(p_dtype)
    params = [t for t in (m.weight, m.bias) if t is not None]
    a, b = x.detach().requires_grad_(), r.detach().requires_grad_()
    torch.manual_seed(11)
    y = m(a, b)
    out = torch.promote_types(x_dtype, r_dtype)
    g = torch.autograd.grad(y, [a, b] + params, dy.to(out))
    # the float32 reference: the NumPy API on the widened values, with the seed the module drew
    f32 = [None if t is None else t.detach().float().numpy() for t in (x, r, m.weight, m.bias)]
    kw = dict(norm=norm, seed=drawn_seed(11))
    y32 = torch.from_numpy(fd.dropout_add_layer_norm(*f32, 0.3, **kw))
    g32 = fd.dropout_add_layer_norm_backward(dy.to(out).float().numpy(), *f32, 0.3, **kw)
    assert y.dtype == out and torch.equal(y, y32.to(out))
    for got, ref, t in zip(g, g32, [x, r] + params):
        assert got.dtype == t.dtype and torch.equal(got, torch.from_numpy(ref).to(t.dtype))
    plain = fd.dropout_add_layer_norm(*f32, 0.3, norm=norm, seed=0, training=False)
    assert not torch.equal(y32, torch.from_numpy(plain))  # the mask did something


def test_errors():
    with pytest.raises(TypeError):
        fdt.AlphaDropout(0.5)(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError):
        fdt.AlphaDropout(1.5)
    with pytest.raises(ValueError):
        fdt.FeatureAlphaDropout(0.5)(torch.ones(3))
    with pytest.raises(ValueError):
        fdt.LockedDropout(0.5, dim=3)(torch.ones(2, 2))
    with pytest.raises(ValueError):
        fdt.DropoutAddLayerNorm(8)(torch.ones(2, 8), torch.ones(2, 7))
    with pytest.raises(ValueError):
        fdt.DropoutAddLayerNorm(8, norm="batch")
    with pytest.raises(TypeError):
        fdt.DropoutAddLayerNorm(8, dtype=torch.int32)
    with pytest.raises(TypeError):
        fdt.DropoutAddLayerNorm(8)(torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8))
    m = fdt.DropoutAddLayerNorm(8)
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivative"):
        (gx,) = torch.autograd.grad(m(x, x.detach()).square().sum(), x, create_graph=True)
        gx.sum().backward()


def swap_add_layer_norm(model):
    """The README's recipe, as written there: each BertSelfOutput / BertOutput computes
    LayerNorm(dropout(dense(h)) + input); give that ending to one DropoutAddLayerNorm."""
    for m in model.modules():
        if type(m).__name__ in ("BertSelfOutput", "BertOutput"):
            fused = fdt.DropoutAddLayerNorm(m.LayerNorm.normalized_shape[0], p=m.dropout.p, eps=m.LayerNorm.eps)
            fused.load_state_dict(m.LayerNorm.state_dict())
            m.add_norm = fused.train(m.training)
            m.forward = (lambda m: lambda h, inp: m.add_norm(m.dense(h), inp))(m)
    return model


def test_bert_with_fused_add_layer_norm():
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.0, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 60, (16, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    before = model(input_ids=ids).logits
    swap_add_layer_norm(model)
    close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)  # eval: unchanged
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(3)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


def test_gaussian_dropout_module():
    x = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(6)
    y = fdt.GaussianDropout(0.3)(x)
    close(y, torch.from_numpy(fd.gaussian_dropout(x.detach().numpy(), 0.3, seed=drawn_seed(6))))
    (g,) = torch.autograd.grad(y.sum(), x)
    close(g * x.detach(), y.detach())  # dy/dx = 1 + sigma z = y / x
    m = fdt.GaussianDropout(0.3).eval()
    assert m(x) is x
    with pytest.raises(ValueError):
        fdt.GaussianDropout(1.0)
