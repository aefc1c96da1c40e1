"""PyTorch modules over the fused kernels: drop-in ``Dropout`` and ``DropoutLinear``.

Install with ``pip install "fastdropout[torch]"``.  Each op is a
``torch.autograd.Function`` whose forward and backward call the native kernels
on ``tensor.numpy()`` views, so contiguous CPU float32 tensors are never copied.

Randomness: every training-mode call draws one 63-bit Philox seed from torch's
default CPU generator (``torch.randint(0, 2**63 - 1, ())``) and uses offset 0,
so ``torch.manual_seed(s)`` makes a run reproducible, and ``model.eval()`` turns
dropout off (and draws nothing).  The backward regenerates the mask from that
seed; no mask is stored.

Supported inputs: CPU tensors with the strided layout; ``float32`` for
:class:`DropoutLinear` and :func:`dropout_linear`, ``float32`` or ``float64``
for :class:`Dropout` and :func:`dropout`.  Anything else (a CUDA tensor,
``float16``/``bfloat16``, a sparse tensor, ...) raises ``TypeError``: there is
no silent fallback, so a result always comes from these kernels.  Second
derivatives are not supported.

Example::

    import torch, fastdropout.torch as fdt
    model = torch.nn.Sequential(fdt.DropoutLinear(64, 512, p=0.1, activation="relu"),
                                fdt.DropoutLinear(512, 10, p=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(32, 64)), torch.randint(0, 10, (32,)))
    opt.zero_grad(); loss.backward(); opt.step()
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

try:
    import torch
except ImportError as exc:  # pragma: no cover - only without torch
    raise ImportError(
        f"fastdropout.torch needs PyTorch ({exc}); install it with `pip install \"fastdropout[torch]\"`"
    ) from exc

from torch.autograd.function import once_differentiable

from ._api import dropout as _np_dropout
from ._api import dropout_backward as _np_dropout_backward
from ._api import dropout_dense as _np_dropout_dense
from ._api import dropout_dense_backward as _np_dropout_dense_backward
from ._checks import check_activation, check_p, check_u64

__all__ = ["Dropout", "DropoutLinear", "dropout", "dropout_linear"]

_SEED_BOUND = 2**63 - 1


def _draw_seed() -> int:
    """One Philox seed from torch's default CPU generator (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64).item())


def _check_tensor(t, name: str, dtypes: Tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu" or t.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense CPU tensor, got one on {t.device} with layout {t.layout}; "
            "fastdropout.torch runs on the CPU only (move it with .cpu(), or use torch.nn.Dropout/Linear)"
        )
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")


def _view(t: torch.Tensor):
    """A NumPy view of a CPU tensor's data (no copy; strides are kept)."""
    return t.detach().resolve_neg().numpy()


def _stream(seed: Optional[int], offset: int) -> Tuple[int, int]:
    if seed is None:
        return _draw_seed(), 0
    return check_u64(seed, "seed"), check_u64(offset, "offset")


# --------------------------------------------------------------------------- autograd functions


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
        ctx.stream = (p, seed, offset, x.dtype)
        return torch.from_numpy(_np_dropout(_view(x), p, seed=seed, offset=offset))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        p, seed, offset, dtype = ctx.stream
        grad_x = _np_dropout_backward(_view(grad.to(dtype)), p, seed=seed, offset=offset)
        return torch.from_numpy(grad_x), None, None, None


class _DropoutLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p, seed, offset, activation, training):
        out = _np_dropout_dense(
            _view(x), _view(weight), None if bias is None else _view(bias), p, seed=seed, offset=offset,
            activation=activation, training=training, return_preactivation=activation is not None,
        )
        y, z = out if activation is not None else (out, None)
        z = None if z is None else torch.from_numpy(z)
        ctx.save_for_backward(x, weight, z)
        ctx.options = (p, seed, offset, activation, training, bias is not None)
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, z = ctx.saved_tensors
        p, seed, offset, activation, training, has_bias = ctx.options
        # only what autograd asks for: no grad_x for a first layer, no grad_weight for frozen weights
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _np_dropout_dense_backward(
            _view(grad_y.to(torch.float32)), _view(x), _view(weight), p, seed=seed, offset=offset,
            activation=activation, preactivation=None if z is None else _view(z), bias=has_bias, training=training,
            output_mask=(need_x, need_w, need_b and has_bias),
        )
        return tuple(None if g is None else torch.from_numpy(g) for g in grads) + (None,) * 5


# --------------------------------------------------------------------------- functional forms


def dropout(
    x: torch.Tensor, p: float = 0.5, training: bool = True, *, seed: Optional[int] = None, offset: int = 0
) -> torch.Tensor:
    """Inverted dropout, as ``torch.nn.functional.dropout`` but with fastdropout's mask.

    ``x`` is a CPU float32 or float64 tensor of any shape.  With ``seed=None``
    a seed is drawn from torch's default generator; give ``seed`` and
    ``offset`` to use a fixed Philox stream (the mask is then exactly
    ``fastdropout.dropout_mask(x.shape, p, seed=seed, offset=offset)``).
    ``training=False`` returns ``x`` itself and draws nothing.
    """
    _check_tensor(x, "x", (torch.float32, torch.float64))
    p = check_p(p)
    if not training:
        return x
    seed, offset = _stream(seed, offset)
    return _DropoutFunction.apply(x, p, seed, offset)


def dropout_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    p: float = 0.5,
    training: bool = True,
    activation: Optional[str] = None,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Fused ``act(F.linear(F.dropout(x, p), weight, bias))`` on the CPU in float32.

    ``x`` has shape ``(..., in_features)``, ``weight`` ``(out_features,
    in_features)`` and ``bias`` ``(out_features,)`` (``torch.nn.Linear``'s
    layout); ``activation`` is None, ``"relu"`` or ``"gelu"`` (erf form).  The
    mask over ``x`` is exactly ``fastdropout.dropout_mask(x.shape, p, seed=...,
    offset=...)``; with ``seed=None`` the seed comes from torch's default
    generator.  ``training=False`` skips dropout and draws nothing.
    """
    _check_tensor(x, "x", (torch.float32,))
    _check_tensor(weight, "weight", (torch.float32,))
    if bias is not None:
        _check_tensor(bias, "bias", (torch.float32,))
    p = check_p(p)
    check_activation(activation)
    if weight.dim() != 2 or x.dim() < 1 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"expected x of shape (..., in_features) and weight of shape (out_features, in_features), "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    masked = bool(training) and p > 0.0
    seed, offset = _stream(seed, offset) if training else (0, 0)
    return _DropoutLinearFunction.apply(x, weight, bias, p, seed, offset, activation, masked)


# --------------------------------------------------------------------------- modules


class Dropout(torch.nn.Module):
    """Drop-in for ``torch.nn.Dropout(p)`` on CPU float32/float64 tensors.

    In training mode each call draws a seed from torch's default generator;
    in eval mode it returns its input unchanged.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropoutLinear(torch.nn.Module):
    """``act(Linear(Dropout(x)))`` fused into one CPU kernel: dropout on the layer's *input*.

    Computes what ``torch.nn.Sequential(torch.nn.Dropout(p), torch.nn.Linear(
    in_features, out_features, bias))`` computes (then ReLU or GELU when
    ``activation`` is ``"relu"`` or ``"gelu"``), with the parameters named,
    shaped and initialised exactly as ``torch.nn.Linear``'s, so a state dict
    loads either way.  Requires CPU float32 parameters and inputs; ``device``
    and ``dtype`` are accepted for signature parity, but anything other than
    CPU float32 raises ``TypeError`` in ``forward``.
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
