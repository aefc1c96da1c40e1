"""fastdropout.torch.scaled_dot_product_attention: torch's signature and results (the math formula
with the same mask), the custom operator under torch.compile, torch.export, torch.func and vmap,
bfloat16, errors, and Hugging Face transformers' attention interface."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import fastdropout as fd  # noqa: E402
import fastdropout.torch as fdt  # noqa: E402
from fastdropout import _torch_ops  # noqa: E402


def qkv(shape=(2, 3, 17, 16), lk=None, ev=None, dtype=torch.float32, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, lq, e = shape
    lk, ev = lk or lq, ev or e
    q = torch.randn(b, h, lq, e, generator=g).to(dtype)
    k = torch.randn(b, h, lk, e, generator=g).to(dtype)
    v = torch.randn(b, h, lk, ev, generator=g).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def math_formula(q, k, v, keep, p, attn_mask=None, is_causal=False, scale=None):
    """torch's documented reference formula for SDPA, with a given keep mask."""
    lq, lk = q.shape[-2], k.shape[-2]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    bias = torch.zeros(lq, lk, dtype=q.dtype)
    if is_causal:
        bias = bias.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        bias = attn_mask.logical_not().float().masked_fill(attn_mask.logical_not(), float("-inf")) \
            if attn_mask.dtype == torch.bool else attn_mask + bias
    w = torch.softmax(q @ k.transpose(-2, -1) * scale + bias, dim=-1)
    w = w * keep / (1 - p) if p > 0 else w
    return w @ v


def close(a, b, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_without_dropout(backend, causal):
    q, k, v = qkv(lk=17)
    out = fdt.scaled_dot_product_attention(q, k, v, is_causal=causal)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    close(out, expected)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        close(a, b)


@pytest.mark.parametrize("mask_kind", [None, "causal", "bool", "float"])
def test_same_mask_gives_the_math_formula(backend, mask_kind):
    q, k, v = qkv((2, 3, 19, 16), lk=23, ev=8)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 19, 23, generator=torch.Generator().manual_seed(1)) < 0.8
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(19, 23)
    causal = mask_kind == "causal"
    torch.manual_seed(7)
    out, _, state = _torch_ops.call_attention(q, k, v, mask, 0.3, causal, None, False, None)
    seed, offset = _torch_ops.read_state(state)
    keep = torch.from_numpy(fd.dropout_mask((2, 3, 19, 23), 0.3, seed=seed, offset=offset))
    expected = math_formula(q, k, v, keep, 0.3, mask, causal)
    close(out, expected)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        close(a, b)
    torch.manual_seed(7)  # the public function draws the same seed
    close(fdt.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3, is_causal=causal), out)


def test_grouped_query_attention():
    q, _, _ = qkv((2, 4, 9, 8))
    _, k, v = qkv((2, 2, 9, 8), seed=1)
    out = fdt.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    close(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
        close(a, b)


def test_bfloat16():
    q, k, v = qkv(dtype=torch.bfloat16)
    out = fdt.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    close(out.float(), expected, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 for g in grads)


def test_compile_fullgraph_and_seeds():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            y = fdt.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0, is_causal=True)
            return y.transpose(1, 2).reshape(x.shape)

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 11, 16)
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for m in (model, compiled):
        torch.manual_seed(5)
        out = m(x)
        results.append((out, torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        close(a, b)
    model.eval()
    close(compiled(x), model(x))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_export(p):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return fdt.scaled_dot_product_attention(q, k, v, dropout_p=p)

    q, k, v = qkv(grad=False)
    ep = torch.export.export(Attn(), (q, k, v))
    assert any("fastdropout.attention" in str(n.target) for n in ep.graph.nodes)
    torch.manual_seed(2)
    a = ep.module()(q, k, v)
    torch.manual_seed(2)
    close(a, Attn()(q, k, v))


def test_vmap_randomness():
    from torch.func import vmap

    q, k, v = qkv((4, 2, 5, 8), grad=False)
    f = lambda a, b, c: fdt.scaled_dot_product_attention(a, b, c, dropout_p=0.5)  # noqa: E731
    same = vmap(f, randomness="same")(q, k, v)
    diff = vmap(f, randomness="different")(q, k, v)
    assert same.shape == diff.shape == (4, 2, 5, 8)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(f, randomness="error")(q, k, v)
    plain = vmap(lambda a, b, c: fdt.scaled_dot_product_attention(a, b, c))(q, k, v)
    close(plain, F.scaled_dot_product_attention(q, k, v))


def test_torch_func_grad():
    from torch.func import grad

    q, k, v = qkv(grad=False)
    g = grad(lambda a: fdt.scaled_dot_product_attention(a, k, v, is_causal=True).square().sum())(q)
    qq = q.clone().requires_grad_(True)
    expected, = torch.autograd.grad(F.scaled_dot_product_attention(qq, k, v, is_causal=True).square().sum(), qq)
    close(g, expected)


def test_second_derivative_raises():
    q, k, v = qkv()
    out = fdt.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="second derivative"):  # a gradient penalty: never silently zero
        (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        gq.square().sum().backward()


def test_errors():
    q, k, v = qkv(grad=False)
    with pytest.raises(TypeError):
        fdt.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError):
        fdt.scaled_dot_product_attention(q, k.bfloat16(), v)
    with pytest.raises(TypeError):
        fdt.scaled_dot_product_attention(q.numpy(), k, v)
    with pytest.raises(ValueError):
        fdt.scaled_dot_product_attention(q, k[..., :3], v)
    with pytest.raises(ValueError):
        fdt.scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError):
        fdt.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(17, 17, dtype=torch.bool), is_causal=True)
    mask = torch.zeros(17, 17, requires_grad=True)
    with pytest.raises(NotImplementedError):
        fdt.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_transformers_bert_training_step():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface, AutoModel, BertConfig

    name = fdt.register_transformers()

    def eager_with_fastdropout_mask(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        """transformers' eager attention, with the keep mask fastdropout's op draws for the same call."""
        assert attention_mask is not None  # the padding below must reach both implementations
        state = _torch_ops._draw_state() if dropout > 0 else None
        scores = query @ key.transpose(2, 3) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(scores).masked_fill(~attention_mask, float("-inf"))
        scores = scores + attention_mask
        w = torch.softmax(scores, dim=-1)
        if dropout > 0:
            seed, offset = _torch_ops.read_state(state)
            keep = torch.from_numpy(fd.dropout_mask(tuple(w.shape), dropout, seed=seed, offset=offset))
            w = w * keep / (1 - dropout)
        return (w @ value).transpose(1, 2).contiguous(), None

    AttentionInterface.register("eager_fastdropout_mask", eager_with_fastdropout_mask)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionMaskInterface.register("eager_fastdropout_mask", sdpa_mask)
    except ImportError:
        pass
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.25)
    torch.manual_seed(0)
    fast = AutoModel.from_config(config, attn_implementation="fastdropout")
    eager = AutoModel.from_config(config, attn_implementation="eager_fastdropout_mask")
    eager.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 9:] = 0
    results = []
    for model in (fast, eager):
        model.train()
        torch.manual_seed(11)
        out = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        loss = out.square().mean()
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        if a is None or b is None:
            assert a is None and b is None
            continue
        close(a, b, rtol=1e-4, atol=1e-6)
    fast.eval()
    eager.eval()
    close(fast(input_ids=ids, attention_mask=attention_mask).last_hidden_state,
          eager(input_ids=ids, attention_mask=attention_mask).last_hidden_state, rtol=1e-5, atol=1e-5)
    sdpa = AutoModel.from_config(config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(fast.state_dict())
    close(fast(input_ids=ids, attention_mask=attention_mask).last_hidden_state,
          sdpa(input_ids=ids, attention_mask=attention_mask).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert name == "fastdropout"


@pytest.mark.parametrize("keyword", ["softcap", "position_bias", "s_aux", "sinks", "indices", "head_mask"])
def test_transformers_attention_refuses_what_it_cannot_compute(keyword):
    """A keyword that changes the attention (softcapping, T5's bias, GPT-OSS's attention sinks,
    sparse indices, a head mask) raises instead of being dropped silently; None is fine."""
    pytest.importorskip("transformers")
    name = fdt.register_transformers()
    from transformers import AttentionInterface

    attention = AttentionInterface()[name]
    q = torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    out, _ = attention(module, q, q, q, None, **{keyword: None})
    assert out.shape == (1, 4, 2, 8)
    with pytest.raises(ValueError, match=keyword):
        attention(module, q, q, q, None, **{keyword: torch.zeros(2)})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_causal_models_with_padding_match_sdpa(family):
    """Causal decoders (Llama with grouped-query attention, GPT-2) with left and right padding:
    the registered implementation gets transformers' padding mask and gives sdpa's outputs."""
    pytest.importorskip("transformers")
    import copy

    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    name = fdt.register_transformers()
    if family == "llama":
        config, cls = LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64), LlamaModel
    else:
        config, cls = GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4, n_positions=32), GPT2Model
    torch.manual_seed(0)
    sdpa = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    fast = cls._from_config(copy.deepcopy(config), attn_implementation=name).eval()
    fast.load_state_dict(sdpa.state_dict())
    ids = torch.randint(1, 60, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        b = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
