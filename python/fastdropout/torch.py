"""PyTorch modules over the fused kernels: drop-in ``Dropout`` and ``DropoutLinear``.

Install with ``pip install "fastdropout[torch]"``.  Every module and function here
runs on PyTorch custom operators (``torch.library``, see ``fastdropout._torch_ops``):
``torch.compile(model, fullgraph=True)``, ``torch.export``, ``torch.func`` (``grad``,
``functional_call``, ``vmap`` with ``randomness="different"`` or ``"same"``) and
second derivatives work as they do with ``torch.nn``.

Randomness: every training-mode call draws one 63-bit Philox seed from torch's
default CPU generator, inside the op when it runs (offset 0), so
``torch.manual_seed(s)`` makes a run reproducible, compiled or not, and
``model.eval()`` turns dropout off (and draws nothing).  The backward regenerates
the mask from that seed; no mask is stored.  Give ``seed=`` (and ``offset=``) to
:func:`dropout` or :func:`dropout_linear` for a fixed stream: the mask is then exactly
``fastdropout.dropout_mask(x.shape, p, seed=seed, offset=offset)``.

Supported inputs: dense CPU tensors.  :class:`Dropout` and :func:`dropout`: float32,
float64, float16 and bfloat16 (a kept value is ``x * s`` in float32, rounded once).
:class:`DropoutLinear` and :func:`dropout_linear`: float32, bfloat16 and float16,
computed in float32 (inputs and parameters of one dtype, as ``torch.nn.Linear``
requires); under ``torch.autocast("cpu", dtype=d)`` (bfloat16 or float16) they take
and return d as ``nn.Linear`` does.  Anything else (a CUDA tensor, an integer dtype, a sparse
tensor, ...) raises ``TypeError``: there is no silent fallback.

Example::

    import torch, fastdropout.torch as fdt
    model = torch.nn.Sequential(fdt.DropoutLinear(64, 512, p=0.1, activation="relu"),
                                fdt.DropoutLinear(512, 10, p=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(32, 64)), torch.randint(0, 10, (32,)))
    opt.zero_grad(); loss.backward(); opt.step()
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, List, Optional, Tuple

try:
    import torch
except ImportError as exc:  # pragma: no cover - only without torch
    raise ImportError(
        f"fastdropout.torch needs PyTorch ({exc}); install it with `pip install \"fastdropout[torch]\"`"
    ) from exc

from . import _torch_ops as _ops
from ._checks import ACTIVATIONS, check_activation, check_flags, check_p, check_u64

__all__ = ["AlphaDropout", "DropConnectLinear", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "DropoutAddLayerNorm",
           "DropoutLinear", "FeatureAlphaDropout", "GaussianDropout", "LockedDropout", "alpha_dropout", "convert", "dropout",
           "dropout1d", "dropout2d", "dropout3d", "dropout_linear", "feature_alpha_dropout", "gaussian_dropout",
           "register_transformers", "scaled_dot_product_attention"]

_DROPOUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(t, name: str, dtypes: Tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "meta") or t.layout != torch.strided:  # meta: shapes only (the ops' fake kernels)
        raise TypeError(
            f"{name} must be a dense CPU tensor, got one on {t.device} with layout {t.layout}; "
            "fastdropout.torch runs on the CPU only (move it with .cpu(), or use torch.nn.Dropout/Linear)"
        )
    if t.dtype not in dtypes:
        want = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}; got {t.dtype}")


def _broadcasts_to(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a's shape broadcasts to b's (torch's rule)."""
    try:
        return torch.broadcast_shapes(a.shape, b.shape) == b.shape
    except RuntimeError:
        return False


def _check_inplace(x: torch.Tensor) -> None:
    """An in-place result needs one memory location per element (torch raises the same)."""
    if any(stride == 0 and size > 1 for size, stride in zip(x.shape, x.stride())):
        raise ValueError("inplace=True: more than one element of the input refers to a single memory location "
                         "(an expanded view); clone() it first or use inplace=False")


def _fixed_state(seed: Optional[int], offset: int) -> Optional[torch.Tensor]:
    """None (the op draws a seed) or the state of a fixed (seed, offset)."""
    offset = check_u64(offset, "offset")
    if seed is None:
        return None
    return _ops.make_state(check_u64(seed, "seed"), offset)


def _check_factory(device, dtype, dtypes, what: str) -> None:
    """Module construction: refuse a device or dtype the kernels cannot run, with what to pass."""
    if device is not None and torch.device(device).type not in ("cpu", "meta"):
        raise TypeError(f"{what} runs on the CPU only; got device={device!r} (pass device='cpu', 'meta' or None)")
    if dtype is not None and dtype not in dtypes:
        want = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{what} supports dtype {want} (or None for the default); got dtype={dtype}")


# --------------------------------------------------------------------------- functional forms


def dropout(
    input: torch.Tensor,  # noqa: A002 (torch.nn.functional.dropout's name)
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Inverted dropout, as ``torch.nn.functional.dropout`` but with fastdropout's mask.

    Parameters
    ----------
    input : CPU tensor of float32, float64, float16 or bfloat16, any shape and memory format
        (the result keeps it).
    p : drop probability in [0, 1].
    training : False (or p = 0) returns ``input`` itself and draws nothing, as torch does.
    inplace : write the result into ``input`` (returned).  Where autograd needs the
        input's graph (``input`` requires grad and grad mode is on) the result is computed
        aside and copied in, so autograd sees an in-place copy, as with torch.
    seed, offset : a fixed Philox stream (64-bit); with ``seed=None`` a seed is drawn
        from torch's default generator when the op runs.

    Raises
    ------
    TypeError
        ``input`` is not a dense CPU tensor of a supported dtype, ``seed``/``offset`` are not
        ints, or ``training``/``inplace`` are not bools (or 1/0), as torch's dropout refuses them.
    ValueError
        ``p`` outside [0, 1] or NaN; ``seed``/``offset`` outside [0, 2**64); ``inplace`` on an
        expanded view (several elements at one memory location).
    """
    x = input
    _check_tensor(x, "x", _DROPOUT_DTYPES)
    p = check_p(p)
    check_flags(training=training, inplace=inplace)
    state = _fixed_state(seed, offset)
    if not training or p == 0.0:  # x itself, no draw (as torch's dropout)
        return x
    if inplace:
        _check_inplace(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return x.copy_(_ops.call_dropout(x, p, state)[0])
        _ops.dropout_inplace_op(x, p, state)
        return x
    return _ops.dropout(x, p, None if state is None else seed, offset)


def dropout_linear(
    input: torch.Tensor,  # noqa: A002 (torch.nn.functional.linear's name)
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    p: float = 0.5,
    training: bool = True,
    activation: Optional[str] = None,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Fused ``act(F.linear(F.dropout(input, p), weight, bias))`` on the CPU (Srivastava et al.,
    "Dropout: A Simple Way to Prevent Neural Networks from Overfitting", JMLR 15, 2014).

    Parameters
    ----------
    input : tensor of shape ``(..., in_features)`` (``x`` below).
    weight : ``(out_features, in_features)`` (``torch.nn.Linear``'s layout).
    bias : ``(out_features,)`` or None.
    p : drop probability in [0, 1], on ``x``.
    training : False skips dropout and draws nothing.
    activation : None, ``"relu"`` or ``"gelu"`` (the erf form, as ``torch.nn.GELU()``).
    seed, offset : a fixed Philox stream; the mask over ``x`` is then exactly
        ``fastdropout.dropout_mask(x.shape, p, seed=seed, offset=offset)``.

    Returns
    -------
    Tensor of shape ``(..., out_features)`` and ``x``'s dtype.  float32, bfloat16 and
    float16 are computed in float32 (products accumulated in float32) and rounded once.

    Raises
    ------
    TypeError
        Not dense CPU tensors, unsupported or mixed dtypes, bad ``activation`` type,
        ``training`` not a bool (or 1/0), as torch's functions refuse it.
    ValueError
        Shapes that do not fit, ``p`` outside [0, 1], unknown ``activation``.
    """
    x = input
    p = _check_linear(x, weight, bias, p, activation)
    if seed is not None or offset != 0:
        offset = check_u64(offset, "offset")
        seed = None if seed is None else check_u64(seed, "seed")
    if type(training) is not bool:
        check_flags(training=training)
    masked = bool(training) and p > 0.0
    return _ops.dropout_linear(x, weight, bias, p, seed, offset, ACTIVATIONS[activation], masked)


def _shape_checks():
    """The context of an argument check that compares shapes: nothing, except while
    torch.jit.trace records, where those are the example input's and the tracer warns that a
    Python bool of them will not follow other inputs.  The check guards this call only and the
    traced graph calls the op, whose kernel checks the shapes of each call again, so there the
    tracer's warnings are dropped."""
    return _quiet_tracer() if torch.jit.is_tracing() else contextlib.nullcontext()


@contextlib.contextmanager
def _quiet_tracer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _check_linear(x, weight, bias, p, activation) -> float:
    """The arguments of a fused linear layer, checked (the common case in one go); returns p."""
    with _shape_checks():
        return _linear_args(x, weight, bias, p, activation)


def _linear_args(x, weight, bias, p, activation) -> float:
    if _usual_linear_call(x, weight, bias, p, activation):
        return p
    _check_tensor(x, "x", _LINEAR_DTYPES)
    _check_tensor(weight, "weight", _LINEAR_DTYPES)
    if bias is not None:
        _check_tensor(bias, "bias", _LINEAR_DTYPES)
    if not torch.is_autocast_enabled("cpu"):
        dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
        if len(dtypes) > 1:
            raise TypeError(
                "x, weight and bias must have one dtype (as torch.nn.Linear needs), got x "
                f"{x.dtype}, weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}"))
    p = check_p(p)
    check_activation(activation)
    if weight.dim() != 2 or x.dim() < 1 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"expected x of shape (..., in_features) and weight of shape (out_features, in_features), "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return p


def _usual_linear_call(x, weight, bias, p, activation) -> bool:
    """True for the everyday call (float32 CPU tensors of fitting shapes, a float p in
    [0, 1], a known activation); anything else goes through the detailed checks."""
    return (type(p) is float and 0.0 <= p <= 1.0 and activation in ACTIVATIONS
            and isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and x.dtype is torch.float32 and weight.dtype is torch.float32
            and x.is_cpu and weight.is_cpu  # (is_cpu: a tenth of device.type's cost)
            and x.layout is torch.strided and weight.layout is torch.strided
            and weight.dim() == 2 and x.dim() >= 1 and weight.shape[1] == x.shape[-1]
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype is torch.float32
                                  and bias.is_cpu and bias.layout is torch.strided
                                  and bias.shape == weight.shape[:1])))


# --------------------------------------------------------------------------- modules


class Dropout(torch.nn.Module):
    """Drop-in for ``torch.nn.Dropout(p, inplace)`` on CPU tensors (float32, float64,
    float16, bfloat16).

    In training mode each call draws a seed from torch's default generator;
    in eval mode it returns its input unchanged.  ``p`` assigned after construction
    is checked at the next call (ValueError).

    Parameters
    ----------
    p : drop probability in [0, 1]; kept elements are scaled by ``1 / (1 - p)``.
    inplace : write the result into the input, as ``torch.nn.Dropout(inplace=True)``.

    Raises
    ------
    TypeError
        A non-real ``p``; at the call, what :func:`dropout` refuses.
    ValueError
        ``p`` outside [0, 1] or NaN.

    Notes
    -----
    An eager call on a contiguous float32, bfloat16 or float16 tensor runs fastdropout's C++ layer, compiled
    against the installed torch the first time a process needs it (about a minute for a new
    torch version, announced on stderr, then cached; see :class:`DropoutLinear`); other dtypes
    and memory formats, and ``inplace``, take the Python route.  The same bits either way.

    References
    ----------
    N. Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting",
    JMLR 15 (2014).
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = check_p(p)
        self.inplace = bool(inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class DropoutLinear(torch.nn.Module):
    """``act(Linear(Dropout(x)))`` fused into one CPU kernel: dropout on the layer's *input*.

    Computes what ``torch.nn.Sequential(torch.nn.Dropout(p), torch.nn.Linear(
    in_features, out_features, bias))`` computes (then ReLU or GELU when
    ``activation`` is ``"relu"`` or ``"gelu"``), with the parameters named,
    shaped and initialised exactly as ``torch.nn.Linear``'s, so a state dict
    loads either way.  ``dtype`` may be float32 (the default), bfloat16 or float16
    (computed in float32); ``device`` the CPU or meta.  Anything else raises
    ``TypeError`` here, at construction.  ``p`` assigned after construction is
    checked at the next call (ValueError).  The input has shape ``(..., in_features)``, the
    output ``(..., out_features)`` and the input's dtype (autocast's under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` or ``float16``, as ``nn.Linear``'s).

    For the backward the layer keeps its input (the mask is regenerated, not stored) and,
    with GELU, the pre-activation; with ReLU and a float32 output it keeps the output, as
    ``torch.relu`` does, so changing that output in place before the backward raises
    torch's "modified by an inplace operation" error, as after ``nn.ReLU``.

    Parameters
    ----------
    in_features, out_features, bias, device, dtype : as ``torch.nn.Linear``'s.
    p : drop probability in [0, 1] on the layer's input.
    activation : None, ``"relu"`` or ``"gelu"`` (the erf form, as ``torch.nn.GELU()``), fused
        after the bias.

    Raises
    ------
    TypeError
        ``dtype`` other than float32/bfloat16/float16, ``device`` other than the CPU or
        meta, a non-real ``p``, an activation that is not a string; at the call, what
        :func:`dropout_linear` refuses.
    ValueError
        ``p`` outside [0, 1], an unknown activation.

    Notes
    -----
    Float32, bfloat16 and float16 calls run fastdropout's C++ layer, compiled against the installed torch the first
    time a process needs it: the first ``DropoutLinear`` of a new torch version may take about a
    minute (announced on stderr; cached under ``$FASTDROPOUT_CACHE_DIR``, default
    ``~/.cache/fastdropout``).  ``FASTDROPOUT_TORCH_NATIVE=0`` keeps the Python route; the
    results are the same bits either way (``fastdropout._torch_native``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        p: float = 0.5,
        bias: bool = True,
        activation: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_factory(device, dtype, _LINEAR_DTYPES, type(self).__name__)
        self.in_features = in_features
        self.out_features = out_features
        self.p = check_p(p)
        check_activation(activation)
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        # the C++ layer (fastdropout._torch_native), built on first use: here, so that a model
        # that only ever runs compiled (a route that never builds it) finds it too
        _ops._torch_native.module()

    def reset_parameters(self) -> None:
        """``torch.nn.Linear.reset_parameters``: kaiming_uniform_(a=sqrt(5)) and a uniform bias."""
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout_linear(x, self.weight, self.bias, self.p, self.training, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, p={self.p}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )


# --------------------------------------------------------------------------- converting a model


def convert(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module, torch.nn.Module]]:
    """Replace, in place, the dropout of an existing model with fastdropout's.

    Walks every submodule of ``model``.  Inside an ``nn.Sequential``, an
    ``nn.Dropout`` directly followed by an ``nn.Linear`` becomes one
    :class:`DropoutLinear` at the Linear's place (the Dropout's place takes an
    ``nn.Identity``).  Only there: a Dropout whose output a custom ``forward`` hands to a
    Linear is not fused (that data flow is code, not structure) and becomes
    :class:`Dropout`.  The fused module holds the *same* ``weight`` and ``bias``
    Parameter objects, so an optimizer built before keeps working and the state dict
    is unchanged (it loads into the original model and back).  A pair is not fused where
    either module has hooks (a hook on the Linear sees the dropped input, which the fused
    layer never makes) or the Linear's parameters are of a kind ``DropoutLinear`` does not
    take (float64, another device): its Dropout is swapped as below and the Linear kept.
    Every other ``nn.Dropout`` becomes :class:`Dropout`, and each of torch's ``nn.Dropout1d``,
    ``nn.Dropout2d``, ``nn.Dropout3d``, ``nn.AlphaDropout`` and ``nn.FeatureAlphaDropout``
    becomes fastdropout's module of the same name, each with its ``p``, ``inplace``, training
    mode and hooks (these hold no parameters or buffers).  Subclasses of these torch
    modules are left alone: their ``forward`` may do more.

    Returns
    -------
    list of ``(qualified name, old module, new module)``, in the order replaced.

    Raises
    ------
    TypeError
        ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    replaced: List[Tuple[str, torch.nn.Module, torch.nn.Module]] = []

    def qualified(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def walk(module: torch.nn.Module, prefix: str) -> None:
        names = list(module._modules)
        if isinstance(module, torch.nn.Sequential):
            for i in range(len(names) - 1):
                first, second = module._modules[names[i]], module._modules[names[i + 1]]
                if type(first) is torch.nn.Dropout and type(second) is torch.nn.Linear and _fusable(first, second):
                    fused = _fused_from(first, second)
                    module._modules[names[i]] = torch.nn.Identity().train(first.training)
                    module._modules[names[i + 1]] = fused
                    replaced.append((qualified(prefix, names[i + 1]), second, fused))
                    replaced.append((qualified(prefix, names[i]), first, module._modules[names[i]]))
        for name in names:
            child = module._modules[name]
            if child is None:
                continue
            swap = _CONVERTED.get(type(child))
            if swap is not None:
                new = swap(child.p, inplace=child.inplace)
                new.train(child.training)
                for name_ in _HOOK_DICTS:  # its hooks, the same dicts: their handles still remove them
                    if hasattr(child, name_):
                        setattr(new, name_, getattr(child, name_))
                module._modules[name] = new
                replaced.append((qualified(prefix, name), child, new))
            else:
                walk(child, qualified(prefix, name))

    walk(model, "")
    return replaced


# A module's hooks (torch 2.x keeps them in these dicts).
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")


def _fusable(drop: torch.nn.Dropout, linear: torch.nn.Linear) -> bool:
    """Whether Dropout -> Linear can become one DropoutLinear: no hooks on either (a hook on the
    Linear sees the dropped input, which the fused layer never makes) and parameters that
    DropoutLinear takes (CPU or meta; float32, bfloat16 or float16; a float64 model keeps its Linear)."""
    hooked = any(getattr(m, name, None) for m in (drop, linear) for name in _HOOK_DICTS if name != "_is_full_backward_hook")
    w = linear.weight
    return not hooked and w.device.type in ("cpu", "meta") and w.dtype in _LINEAR_DTYPES


def _fused_from(drop: torch.nn.Dropout, linear: torch.nn.Linear) -> "DropoutLinear":
    fused = DropoutLinear.__new__(DropoutLinear)
    torch.nn.Module.__init__(fused)
    fused.in_features, fused.out_features = linear.in_features, linear.out_features
    fused.p = check_p(drop.p)
    fused.activation = None
    fused.weight = linear.weight  # the same Parameter objects: optimizers and state dicts carry over
    if linear.bias is not None:
        fused.bias = linear.bias
    else:
        fused.register_parameter("bias", None)
    fused.train(linear.training and drop.training)
    return fused


# --------------------------------------------------------------------------- attention


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with the dropout fused in.

    The same signature and semantics as torch's: ``softmax(query @ key^T * scale + bias)``
    with dropout ``dropout_p`` on the probabilities, times ``value``; ``attn_mask`` bool
    (False: not attended) or float (added), broadcastable to ``(..., L, S)``;
    ``is_causal`` with torch's top-left alignment; ``enable_gqa`` for grouped-query
    attention.  Like torch's function it drops whenever ``dropout_p > 0`` (pass
    ``dropout_p=0.0`` in evaluation, as ``self.dropout if self.training else 0.0``).  It
    runs the fused kernel of :func:`fastdropout.attention` as the custom operator
    ``fastdropout::attention``: ``torch.compile``, ``torch.export`` and autograd see one
    op; the ``(L, S)`` probabilities and their mask are never stored (forward and
    backward keep ``out`` and one log-sum-exp per query row).  The mask is drawn from a
    seed taken from torch's default generator, so ``torch.manual_seed`` reproduces it;
    a query row whose keys are all masked gives zeros (as torch 2.13's CPU kernels do; its
    math reference gives NaN).

    Parameters
    ----------
    query : CPU tensor ``(..., L, E)``; key ``(..., S, E)``; value ``(..., S, Ev)``:
        float32, bfloat16 or float16, one dtype (computed in float32; the output in that dtype).
    attn_mask, dropout_p, is_causal, scale, enable_gqa : as torch's.

    Returns
    -------
    Tensor ``(..., L, Ev)`` of query's dtype.

    Raises
    ------
    TypeError
        Not dense CPU tensors of a supported dtype, mixed dtypes, a mask neither bool
        nor float32 nor of query's dtype.
    ValueError
        Shapes that do not fit or broadcast, ``dropout_p`` outside [0, 1], both
        ``attn_mask`` and ``is_causal``.
    NotImplementedError
        An ``attn_mask`` that requires grad (no gradient for the mask here).
    RuntimeError
        A second derivative through it (``create_graph=True`` and differentiating the
        gradient): raised, never silently zero.

    References
    ----------
    T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning", 2023.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(t, name, _ATTENTION_DTYPES)
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must have one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if attn_mask is not None:
        _check_tensor(attn_mask, "attn_mask", (torch.bool, query.dtype, torch.float32))
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError("fastdropout's attention gives no gradient for attn_mask; "
                                      "use torch's scaled_dot_product_attention for a learned mask")
    dropout_p = check_p(dropout_p)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if is_causal and attn_mask is not None:
        raise ValueError("give either attn_mask or is_causal=True, not both (as torch's scaled_dot_product_attention)")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
    return _ops.call_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, None)[0]


# Keywords transformers' models pass to an attention function that change what it computes
# (softcapping, T5's bias, attention sinks as in GPT-OSS, sparse indices, a head mask): refused.
_HF_UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks", "indices", "head_mask")


def _transformers_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """The attention function transformers calls for ``attn_implementation="fastdropout"``:
    query, key, value ``(batch, heads, length, head_dim)``; returns ``(batch, length, heads,
    head_dim)`` and no attention weights."""
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='fastdropout' does not return attention weights; use 'eager'")
    unsupported = [k for k in _HF_UNSUPPORTED if kwargs.get(k) is not None]
    if unsupported:  # what the kernel cannot honour must not be dropped silently
        raise ValueError(f"attn_implementation='fastdropout' does not support {', '.join(unsupported)} "
                         "(softcapping, a position bias, attention sinks, sparse indices or a head mask); use 'eager'")
    groups = getattr(module, "num_key_value_groups", 1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    causal = bool(causal) and attention_mask is None and query.shape[2] > 1
    if attention_mask is not None and attention_mask.dtype not in (torch.bool, query.dtype):
        attention_mask = attention_mask.to(query.dtype)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                                       is_causal=causal, scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def register_transformers(name: str = "fastdropout") -> str:
    """Register :func:`scaled_dot_product_attention` with Hugging Face transformers as an
    attention implementation, so that ``AutoModel.from_config(config,
    attn_implementation="fastdropout")`` (or ``from_pretrained``) runs its attention,
    dropout included, through the fused kernel.  Returns the name.

    With transformers 4.53 and later the name is also registered for mask creation (sdpa's
    boolean masks), without which transformers hands the function no padding mask at all.
    Padding, causal and sliding-window masks, grouped-query attention, cross-attention and
    KV-cache generation work as with ``"sdpa"``; attention weights (``output_attentions``),
    softcapping (Gemma 2), a position bias (T5), attention sinks (GPT-OSS), sparse indices
    and a head mask raise ``ValueError`` when a model asks for them.

    Raises
    ------
    ImportError
        transformers is not installed, or too old to have ``AttentionInterface`` (4.48+).
    """
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError(f"register_transformers needs transformers >= 4.48 with AttentionInterface ({exc}); "
                          "pip install transformers") from exc
    AttentionInterface.register(name, _transformers_attention)
    try:  # transformers >= 4.53 builds each implementation's mask by name: ours takes sdpa's (a boolean mask)
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older: the models build an sdpa-style mask themselves
        pass
    else:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


# --------------------------------------------------------------------------- the dropout family

# The family's modules: float16 and bfloat16 computed in float32, rounded once.
_FAMILY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _FamilyDropout(torch.nn.Module):
    """Shared body of the channel, locked and alpha dropout modules."""

    kind = _ops.FAMILY_DROPOUT

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = check_p(p)
        self.inplace = bool(inplace)

    def noise_shape(self, x: torch.Tensor) -> Optional[List[int]]:
        """The mask's shape for x (None: x's own): 1 where one mask value is shared along a
        dimension, -1 where the mask follows x's size there.  The op reads x's sizes when it
        runs, so a torch.jit.trace of the module follows the shape of each input."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _family(x, self.p, self.training, self.inplace, self.kind, self.noise_shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


def _family(x: torch.Tensor, p: float, training: bool, inplace: bool, kind: int,
            noise_shape: Callable[[torch.Tensor], Optional[List[int]]]) -> torch.Tensor:
    """The family's modules and functional forms: checks first (the input's rank even in eval
    mode), then ``x`` itself when not training or p = 0, else the op (into ``x`` with inplace)."""
    _check_tensor(x, "input", _FAMILY_DTYPES)
    p = check_p(p)
    check_flags(training=training, inplace=inplace)
    noise = noise_shape(x)
    if not training or p == 0.0:
        return x
    if inplace:
        _check_inplace(x)
    y = _ops.call_family(x, p, kind, noise, None)[0]
    return x.copy_(y) if inplace else y


def _channel_noise(x: torch.Tensor, spatial: int, name: str) -> List[int]:
    ranks = (spatial + 1, spatial + 2)
    if x.dim() not in ranks:
        raise ValueError(f"{name}: expected a {ranks[0]}-D (unbatched) or {ranks[1]}-D input, got shape {tuple(x.shape)}")
    return [-1] * (x.dim() - spatial) + [1] * spatial


def _noise_2d(x: torch.Tensor, name: str) -> List[int]:
    if x.dim() == 3:
        import warnings

        warnings.warn(f"{name}: a 3-D input is taken as (N, C, L) (channel-wise 1-D dropout), as torch's "
                      f"{name} does; use {name.replace('2', '1')} for that", UserWarning, stacklevel=5)
        return [-1, -1, 1]
    return _channel_noise(x, 2, name)


def _feature_noise(x: torch.Tensor, name: str) -> List[int]:
    if x.dim() < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions, got shape {tuple(x.shape)}")
    return [-1, -1] + [1] * (x.dim() - 2)


class Dropout1d(_FamilyDropout):
    """``torch.nn.Dropout1d``: zeroes whole channels of ``(N, C, L)`` or ``(C, L)`` inputs, with
    fastdropout's broadcast mask (one Philox word per channel); ``ValueError`` for other ranks (torch
    raises RuntimeError).  float32 and float64; float16 and bfloat16 computed in float32 and rounded
    once to the dtype (as every module of the family).

    References
    ----------
    J. Tompson et al., "Efficient Object Localization Using Convolutional Networks", CVPR 2015.
    """

    def noise_shape(self, x):
        return _channel_noise(x, 1, "Dropout1d")


class Dropout2d(_FamilyDropout):
    """``torch.nn.Dropout2d`` for ``(N, C, H, W)`` or ``(C, H, W)`` inputs.  As torch (2.x) does, a
    3-D input is taken as ``(N, C, L)`` (channel-wise 1-D dropout) with torch's warning."""

    def noise_shape(self, x):
        return _noise_2d(x, "Dropout2d")


class Dropout3d(_FamilyDropout):
    """``torch.nn.Dropout3d`` for ``(N, C, D, H, W)`` or ``(C, D, H, W)`` inputs."""

    def noise_shape(self, x):
        return _channel_noise(x, 3, "Dropout3d")


class LockedDropout(_FamilyDropout):
    """One mask shared along ``dim`` (e.g. time): variational dropout of recurrent networks (Gal and
    Ghahramani, NeurIPS 2016; AWD-LSTM's locked dropout), ``noise_shape`` = the input's shape with 1
    at ``dim``.  float32, float64, float16 and bfloat16."""

    def __init__(self, p: float = 0.5, dim: int = 0, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        self.dim = dim

    def noise_shape(self, x):
        if not -x.dim() <= self.dim < x.dim():
            raise ValueError(f"LockedDropout: dim {self.dim} out of range for shape {tuple(x.shape)}")
        shape = [-1] * x.dim()
        shape[self.dim % x.dim()] = 1
        return shape

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}, inplace={self.inplace}"


class AlphaDropout(_FamilyDropout):
    """``torch.nn.AlphaDropout`` (SELU networks) with fastdropout's mask; float32 and float64
    (float16 and bfloat16: the float32 result rounded once).

    References
    ----------
    G. Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
    """

    kind = _ops.FAMILY_ALPHA


class FeatureAlphaDropout(AlphaDropout):
    """``torch.nn.FeatureAlphaDropout``: alpha dropout of whole channels of ``(N, C, ...)`` inputs."""

    def noise_shape(self, x):
        return _feature_noise(x, "FeatureAlphaDropout")


class GaussianDropout(_FamilyDropout):
    """Multiplicative Gaussian noise ``x * (1 + sigma * z)``, ``sigma = sqrt(p / (1 - p))`` (Keras's
    ``GaussianDropout``; :func:`fastdropout.gaussian_dropout`); identity in eval mode; float32 and
    float64 (float16 and bfloat16: the float32 result rounded once); ``p`` in [0, 1)."""

    kind = _ops.FAMILY_GAUSSIAN

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        if self.p == 1.0:
            raise ValueError("GaussianDropout needs p < 1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if check_p(self.p) == 1.0:
            raise ValueError("GaussianDropout needs p < 1")
        return super().forward(x)


class DropConnectLinear(DropoutLinear):
    """``act(F.linear(x, F.dropout(weight, p), bias))``: DropConnect (Wan et al., ICML 2013) as one
    CPU kernel, the weight's mask applied while the GEMM packs the weight and regenerated in the
    backward (one mask per call).  ``torch.nn.Linear``'s parameters and initialization; float32,
    bfloat16 and float16 (computed in float32).  Second derivatives hold (the backward is written
    with differentiable ops)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = _check_linear(x, self.weight, self.bias, self.p, self.activation)
        masked = self.training and p > 0.0
        return _ops.call_dropconnect_linear(x, self.weight, self.bias, p, None, ACTIVATIONS[self.activation], masked)[0]


class DropoutAddLayerNorm(torch.nn.Module):
    """``LayerNorm(residual + dropout(x))`` (``norm="rms"``: RMSNorm) in one pass per row, the ending of a
    transformer block: ``forward(x, residual)``.  ``weight`` and ``bias`` are ``torch.nn.LayerNorm``'s
    (ones, zeros; no bias for RMS), ``normalized_shape`` an int (the last dimension).  float32 and
    float64; float16 and bfloat16 inputs or parameters are widened to float32 and the result
    rounded once to ``torch.promote_types(x.dtype, residual.dtype)`` (as torch's
    ``LayerNorm(residual + h)`` under autocast, where ``h`` is bfloat16 and the residual may be
    float32).  ``residual`` has x's shape or one that broadcasts to it (a bias-like residual, as
    torch's ``residual + h`` broadcasts; its gradient is summed over the broadcast dimensions).
    The mask is regenerated in the backward.  No second derivative (raises).

    References
    ----------
    J. Ba, J. Kiros, G. Hinton, "Layer Normalization", 2016; B. Zhang, R. Sennrich, "Root Mean
    Square Layer Normalization", NeurIPS 2019.
    """

    def __init__(self, normalized_shape: int, p: float = 0.1, eps: float = 1e-5, elementwise_affine: bool = True,
                 norm: str = "layer", device=None, dtype=None) -> None:
        super().__init__()
        _check_factory(device, dtype, _FAMILY_DTYPES, "DropoutAddLayerNorm")
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError("DropoutAddLayerNorm normalizes the last dimension only: give an int")
            normalized_shape = normalized_shape[0]
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        self.normalized_shape = (int(normalized_shape),)
        self.p = check_p(p)
        self.eps = float(eps)
        self.norm = norm
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(self.normalized_shape, **factory))
            if norm == "layer":
                self.bias = torch.nn.Parameter(torch.zeros(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        _check_tensor(x, "x", _FAMILY_DTYPES)
        _check_tensor(residual, "residual", _FAMILY_DTYPES)
        with _shape_checks():
            if x.shape[-1:] != self.normalized_shape or not _broadcasts_to(residual, x):
                raise ValueError(f"x must have shape (..., {self.normalized_shape[0]}) and residual x's shape or "
                                 f"one that broadcasts to it, got {tuple(x.shape)} and {tuple(residual.shape)}")
        residual = residual.expand(x.shape)  # residual + dropout(x) broadcasts it, as torch's add (x's shape: itself)
        p = check_p(self.p)
        out = torch.promote_types(x.dtype, residual.dtype)
        work = torch.float64 if out == torch.float64 else torch.float32  # (.to is a no-op where it matches)
        weight, bias = (None if t is None else t.to(work) for t in (self.weight, self.bias))
        y = _ops.call_add_norm(x.to(work).contiguous(), residual.to(work).contiguous(), weight, bias, p, self.eps,
                               self.norm == "rms", None, self.training and p > 0.0)[0]
        return y.to(out)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, p={self.p}, eps={self.eps}, norm={self.norm!r}"


# --------------------------------------------------------------------------- the family's functional forms


def _no_noise(x: torch.Tensor) -> None:
    return None


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.dropout1d`` with fastdropout's mask: :class:`Dropout1d` as a function
    (whole channels of ``(N, C, L)`` or ``(C, L)``; ``ValueError`` for other ranks, ``TypeError`` for
    other dtypes or devices, ``ValueError`` for ``p`` outside [0, 1])."""
    return _family(input, p, training, inplace, _ops.FAMILY_DROPOUT, lambda x: _channel_noise(x, 1, "dropout1d"))


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.dropout2d``: :class:`Dropout2d` as a function (``(N, C, H, W)`` or
    ``(C, H, W)``; a 3-D input taken as ``(N, C, L)`` with torch's warning)."""
    return _family(input, p, training, inplace, _ops.FAMILY_DROPOUT, lambda x: _noise_2d(x, "dropout2d"))


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.dropout3d``: :class:`Dropout3d` as a function (``(N, C, D, H, W)`` or
    ``(C, D, H, W)``)."""
    return _family(input, p, training, inplace, _ops.FAMILY_DROPOUT, lambda x: _channel_noise(x, 3, "dropout3d"))


def alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.alpha_dropout`` (SELU networks; Klambauer et al., NeurIPS 2017) with
    fastdropout's mask: :class:`AlphaDropout` as a function.  As torch's, ``training`` defaults to
    False (the input is returned)."""
    return _family(input, p, training, inplace, _ops.FAMILY_ALPHA, _no_noise)


def feature_alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False,
                          inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.feature_alpha_dropout``: :class:`FeatureAlphaDropout` as a function
    (whole channels of ``(N, C, ...)``; ``training`` defaults to False, as torch's)."""
    return _family(input, p, training, inplace, _ops.FAMILY_ALPHA, 
                   lambda x: _feature_noise(x, "feature_alpha_dropout"))


def gaussian_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Multiplicative Gaussian noise ``x * (1 + sigma * z)``, ``sigma = sqrt(p / (1 - p))``:
    :class:`GaussianDropout` as a function (Srivastava et al., JMLR 2014, section 10); ``p`` in
    [0, 1) (``ValueError`` for p = 1)."""
    if check_p(p) == 1.0:
        raise ValueError("gaussian_dropout needs p < 1")
    return _family(input, p, training, inplace, _ops.FAMILY_GAUSSIAN, _no_noise)


# What convert() swaps: each torch dropout module (exactly that type) for fastdropout's of the
# same name and constructor (p, inplace).
_CONVERTED = {torch.nn.Dropout: Dropout, torch.nn.Dropout1d: Dropout1d, torch.nn.Dropout2d: Dropout2d,
              torch.nn.Dropout3d: Dropout3d, torch.nn.AlphaDropout: AlphaDropout,
              torch.nn.FeatureAlphaDropout: FeatureAlphaDropout}
