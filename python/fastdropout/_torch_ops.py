"""Every PyTorch custom operator of fastdropout, registered in one place.

Each op has a schema (inferred with ``torch.library.infer_schema`` and defined with
``torch.library.Library``; see _Op), a fake implementation for
shapes (so ``torch.compile`` and ``torch.export`` trace it without running it),
an autograd formula and a vmap rule.  The modules and functional forms in
:mod:`fastdropout.torch` are thin wrappers over these ops.

The random stream.  An op that drops takes ``state``: an int64 tensor
``[seed, offset]`` (the two's complements of the 64-bit values), or None, in which
case the op itself draws a seed from torch's default CPU generator when it runs
(offset 0).  Drawing inside the op keeps the draw out of any traced graph, so a
compiled model draws exactly what the eager one draws, and ``torch.manual_seed``
reproduces both.  The op returns the state it used; the backward regenerates the
mask from it.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _core, _torch_native
from ._api import dense_backward_checked, dense_forward_checked
from ._api import dropout as _np_dropout
from ._checks import U64
from ._checks import scale as _scale
from ._checks import threshold as _threshold

_SEED_BOUND = 2**63 - 1
_HALF = (torch.float16, torch.bfloat16)
_SEEDED = (torch.Tag.nondeterministic_seeded,)  # never merged or reordered as if pure
_NO_STATE = torch.zeros(2, dtype=torch.int64)  # evaluation mode: nothing drawn

VMAP_RANDOMNESS_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use the 'same' or "
    "'different' randomness flags on vmap or perform the randomness operation out of vmap"
)


# --------------------------------------------------------------------------- the stream state


def make_state(seed: int, offset: int) -> torch.Tensor:
    """An int64 state tensor from 64-bit unsigned ``seed`` and ``offset``."""
    return torch.from_numpy(np.array([seed, offset], dtype=np.uint64).view(np.int64))


def read_state(state: torch.Tensor) -> Tuple[int, int]:
    """(seed, offset) of a state tensor, as 64-bit unsigned integers."""
    seed, offset = state.tolist()
    return seed % U64, offset % U64


def _draw_seed() -> int:
    """A seed from torch's default generator (one draw per call, on every route)."""
    return int(torch.randint(0, _SEED_BOUND, (), dtype=torch.int64))


def _draw_state() -> torch.Tensor:
    return make_state(_draw_seed(), 0)


# --------------------------------------------------------------------------- registration

_LIB = torch.library.Library("fastdropout", "FRAGMENT")
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_CPU = torch._C.DispatchKey.CPU


def _fresh_state(impl):
    """The implementation as an op body: an op's outputs may not alias its inputs."""
    @functools.wraps(impl)  # (the schema is inferred from impl's signature)
    def body(*args):
        out = impl(*args)
        return out[:-1] + (out[-1].clone(),) if any(out[-1] is a for a in args) else out
    return body


class _Op:
    """A functional custom operator ``fastdropout::<name>``: the schema inferred from
    `impl`'s annotations (``torch.library.infer_schema``), `impl` as its CPU kernel, and
    ``register_fake`` / ``register_autograd`` / ``register_vmap`` / ``register_autocast``
    as on ``torch.library.custom_op``'s ops.  The difference is the cost of a call:
    custom_op routes each call through Python wrappers (the autograd layer, a redispatch,
    a backend wrapper checking aliasing) that cost ~65 us a call here, paid by every op in
    a torch.compile'd graph; this registers the CPU kernel and a lean autograd kernel with
    torch.library.Library directly, and the autograd kernel calls the CPU kernel itself
    when that is all the dispatcher would reach (~15 us; torch 2.13).  A `seeded` op
    (it draws from the stream when its state is None) is tagged nondeterministic_seeded
    and returns a fresh state tensor (_fresh_state): no output of an op aliases an input."""

    def __init__(self, name: str, impl, seeded: bool = False):
        impl = _fresh_state(impl) if seeded else impl
        _LIB.define(name + torch.library.infer_schema(impl, mutates_args=()), tags=_SEEDED if seeded else ())
        _LIB.impl(name, impl, "CPU")
        self.name = name
        self.impl = impl
        self.overload = getattr(torch.ops.fastdropout, name).default

    def __call__(self, *args):
        return self.overload(*args)

    def register_fake(self, fn):
        torch.library.register_fake(self.overload, fn, lib=_LIB)
        return fn

    def register_vmap(self, rule) -> None:
        torch.library.register_vmap(self.overload, rule, lib=_LIB)

    def register_autograd(self, backward, setup_context) -> None:
        """The formula as on custom_op: setup_context(ctx, inputs, output) after the
        forward, backward(ctx, *grads) -> a gradient (or None) per input.  The dispatch
        key set travels as the Function's last input, so ctx.needs_input_grad keeps the
        op's inputs at their indices."""
        overload, impl = self.overload, self.impl

        def below_autograd(keyset, args):
            below = keyset & _BELOW_AUTOGRAD
            if below.highestPriorityTypeId() == _CPU:  # nothing else to pass: the CPU kernel itself
                return impl(*args)
            with torch._C._AutoDispatchBelowAutograd():  # fake tensors, modes, ...: the dispatcher
                return overload.redispatch(below, *args)

        def forward(ctx, *args):
            out = below_autograd(args[-1], args[:-1])
            setup_context(ctx, args[:-1], out)
            return out

        def backward_with_keyset(ctx, *grads):
            grads_in = backward(ctx, *grads)
            return (*grads_in, None) if isinstance(grads_in, tuple) else (grads_in, None)

        function = type(f"{self.name}_autograd", (torch.autograd.Function,),
                        {"forward": staticmethod(forward), "backward": staticmethod(backward_with_keyset)})

        def kernel(keyset, *args):
            if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
                return function.apply(*args, keyset)
            return below_autograd(keyset, args)

        _LIB.impl(self.name, kernel, "Autograd", with_keyset=True)
        self.autograd_kernel = kernel

    def register_autocast(self) -> None:
        """Under ``torch.autocast("cpu", dtype=d)`` the op runs on its floating inputs cast to d
        (float64 and non-floating tensors as they are), as torch's lower-precision ops such as
        ``linear`` and ``scaled_dot_product_attention`` do: d is read at each call, bfloat16
        or float16 (``torch.library.register_autocast`` fixes one dtype for every autocast).
        Registered for the C++ dispatcher and as the Python kernel that tracing consults."""
        overload = self.overload
        autocast = torch._C.DispatchKey.AutocastCPU

        def run(*args):
            cast = _autocast_args(args)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(autocast)):
                return overload(*cast)

        overload.py_impl(autocast)(run)
        _LIB.impl(self.name, run, "AutocastCPU")
        _AUTOCAST_CASTS.add(self.name)


#: The ops whose autocast kernel casts their inputs (register_autocast): a plain eager call
#: under autocast casts them the same way itself before the fast route (_autocast_for).
_AUTOCAST_CASTS = set()


def _autocast_args(args):
    """args as an op runs on them under ``torch.autocast("cpu")``: floating CPU tensors cast
    to autocast's dtype, float64 ones and everything else as they are (_Op.register_autocast)."""
    dtype = torch.get_autocast_dtype("cpu")
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.is_cpu
                 and a.dtype is not torch.float64 else a for a in args)


def _autocast_for(name: str, args):
    """args for op `name` on the fast route: cast as its autocast kernel would where autocast
    is on and the op has one, else as they are."""
    return _autocast_args(args) if name in _AUTOCAST_CASTS and torch.is_autocast_enabled("cpu") else args


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's data (no copy; strides are kept).  (Detached only when
    it requires grad: each step here is paid on every call of a layer.)"""
    if t.requires_grad:
        t = t.detach()
    return (t.resolve_neg() if t.is_neg() else t).numpy()


def _from_numpy(a: np.ndarray, shape) -> torch.Tensor:
    """A tensor owning the kernel's result `a`, in `shape`: reshaped on the NumPy side, so that
    the tensor is not an autograd view (an op output that is a view of a tensor made inside
    the op refuses in-place changes: ``Sequential(Dropout2d, ReLU(inplace=True))``)."""
    return torch.from_numpy(a.reshape(tuple(shape)))


def _savable(t: torch.Tensor) -> torch.Tensor:
    """An input kept for the backward: an inference tensor (made under torch.inference_mode)
    cannot be, so a copy is (torch's Dropout -> Linear keeps the dropout's new output, never
    the input, and so takes such inputs; the fused layer must too)."""
    return t.clone() if t.is_inference() else t


def _apply_dropout(x: torch.Tensor, p: float, state: torch.Tensor, out: torch.Tensor) -> None:
    """out = dropout(x) under `state` (any strides; out may be x)."""
    seed, offset = read_state(state)
    _dropout_stream(x, p, seed, offset, out)


def _dropout_stream(x: torch.Tensor, p: float, seed: int, offset: int, out: torch.Tensor) -> None:
    """out = dropout(x) under the stream (seed, offset) (any strides; out may be x)."""
    if (x.dtype is torch.float32 or x.dtype is torch.float64) and x.is_contiguous() and out.is_contiguous():
        src, dst = _numpy(x).reshape(-1), _numpy(out).reshape(-1)  # (the common case: straight to the kernel)
        _core.dropout(src, dst, seed, offset, _threshold(p), _scale(p, src.dtype))
        return
    if x.dtype in _HALF:
        src = x.contiguous()
        dst = out if out.is_contiguous() else torch.empty_like(src)
        _core.dropout_h16(_numpy(src.view(torch.int16)).reshape(-1).view(np.uint16),
                          _numpy(dst.view(torch.int16)).reshape(-1).view(np.uint16),
                          seed, offset, _threshold(p), _scale(p, np.float32), x.dtype == torch.bfloat16)
        if dst is not out:
            out.copy_(dst)
        return
    _np_dropout(_numpy(x), p, seed=seed, offset=offset, out=_numpy(out))


# --------------------------------------------------------------------------- dropout


def _dropout_impl(x: torch.Tensor, p: float, state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    state = _draw_state() if state is None else state
    y = torch.empty_like(x)  # keeps x's memory format
    _apply_dropout(x, p, state, y)
    return y, state


dropout_op = _Op("dropout", _dropout_impl, seeded=True)


@dropout_op.register_fake
def _(x, p, state):
    return torch.empty_like(x), x.new_empty((2,), dtype=torch.int64)


@torch.library.custom_op("fastdropout::dropout_", mutates_args=("x",), device_types="cpu", tags=_SEEDED)
def dropout_inplace_op(x: torch.Tensor, p: float, state: Optional[torch.Tensor]) -> torch.Tensor:
    state = _draw_state() if state is None else state.clone()
    _apply_dropout(x, p, state, x)
    return state  # (a fresh tensor: an op's output may not alias its input)


@dropout_inplace_op.register_fake
def _(x, p, state):
    return x.new_empty((2,), dtype=torch.int64)


def _dropout_backward_impl(grad: torch.Tensor, p: float, state: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(grad)
    _apply_dropout(grad, p, state, out)
    return out


dropout_backward_op = _Op("dropout_backward", _dropout_backward_impl)


@dropout_backward_op.register_fake
def _(grad, p, state):
    return torch.empty_like(grad)


def _dropout_setup(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _dropout_bwd(ctx, grad_y, grad_state):
    (state,) = ctx.saved_tensors
    return call_dropout_backward(grad_y, ctx.p, state), None, None


def _dropout_backward_setup(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(inputs[2])


def _dropout_backward_bwd(ctx, gg):
    (state,) = ctx.saved_tensors  # the map grad -> mask * grad * s is its own adjoint
    return call_dropout_backward(gg, ctx.p, state), None, None


dropout_op.register_autograd(_dropout_bwd, setup_context=_dropout_setup)
dropout_backward_op.register_autograd(_dropout_backward_bwd, setup_context=_dropout_backward_setup)


class _EagerDropout(torch.autograd.Function):
    """dropout for a plain eager call under autograd, the stream as two integers (see
    _EagerDropoutLinear).  The map x -> mask * x * s is its own adjoint, so the backward
    is this Function again (differentiable when create_graph asks for it)."""

    @staticmethod
    def forward(ctx, x, p, seed, offset):  # type: ignore[override]
        y = torch.empty_like(x)  # keeps x's memory format
        _dropout_stream(x, p, seed, offset, y)
        ctx.stream = (p, seed, offset)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        p, seed, offset = ctx.stream
        if torch.is_grad_enabled():
            return _EagerDropout.apply(grad_y, p, seed, offset), None, None, None
        grad_x = torch.empty_like(grad_y)
        _dropout_stream(grad_y, p, seed, offset, grad_x)
        return grad_x, None, None, None


#: The dtypes in which an eager dropout or dropout_linear call takes the C++ layer (all
#: operands alike; dropout's a contiguous tensor).
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dropout(x: torch.Tensor, p: float, seed: Optional[int], offset: int) -> torch.Tensor:
    """y of fastdropout::dropout: with seed None the stream is drawn from torch's
    generator (one draw, whatever the route), else (seed, offset)."""
    if _route(x) == "fast":
        if seed is None:
            seed, offset = _draw_seed(), 0
        if x.dtype in _NATIVE_DTYPES and x.is_contiguous():
            native = _torch_native.module()  # the same Function in C++ (_torch_native), once built
            if native is not None:
                return native.dropout(x, p, seed, offset)
        if torch.is_grad_enabled() and x.requires_grad:
            return _EagerDropout.apply(x, p, seed, offset)
        y = torch.empty_like(x)
        _dropout_stream(x, p, seed, offset, y)
        return y
    return call_dropout(x, p, None if seed is None else make_state(seed, offset))[0]


# --------------------------------------------------------------------------- dropout -> linear


def _as_f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else (t if t.dtype is torch.float32 else t.float())


def _operand(t: torch.Tensor) -> np.ndarray:
    """A GEMM operand for the core: bfloat16 as its uint16 bits (widened while packed, no
    float32 copy), float32 as is, float16 converted to float32."""
    if t.dtype == torch.bfloat16:
        return _numpy(t.contiguous().view(torch.int16)).view(np.uint16)
    return _numpy(_as_f32(t))


def _linear_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], p: float, state: Optional[torch.Tensor],
    activation: int, train: bool, on_weight: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, state): y = act(dropout(x) @ weight.T + bias), or with `on_weight`
    act(x @ dropout(weight).T + bias), in float32 arithmetic on the operands as they are
    (bfloat16 widened in the GEMM's packing); z the pre-activation where dropout_linear's
    backward needs it (_keeps_z; empty otherwise, and always with `on_weight`, whose
    backward recomputes it), and the stream state used."""
    state = (_draw_state() if state is None else state) if train else _NO_STATE.clone()
    seed, offset = read_state(state)
    keep_z = not on_weight and _keeps_z(activation, x.dtype)
    y, z = _linear_tensors(x, weight, bias, p, seed, offset, activation, train, on_weight, keep_z)
    return y, torch.empty(0) if z is None else z, state


def _keeps_z(activation: int, dtype: torch.dtype) -> bool:
    """Whether dropout_linear keeps the pre-activation z for its backward.  GELU's derivative
    needs z.  ReLU's is read from a float32 output instead, as torch's relu keeps its result:
    y = max(z, 0) > 0 exactly where z > 0, so the gradients are the same bits, and z is
    neither stored nor kept.  A half-precision output is not enough (a tiny positive z can
    round to 0), so there z is kept."""
    return activation == 2 or (activation == 1 and dtype != torch.float32)


def _backward_z(activation: int, dtype: torch.dtype, y, z):
    """What dropout_linear's backward reads as z: ReLU's output y where z is not kept
    (_keeps_z), else z (None or empty without an activation)."""
    return y if activation and not _keeps_z(activation, dtype) else z


def _linear_tensors(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], p: float, seed: int, offset: int,
    activation: int, train: bool, on_weight: bool, keep_z: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y, z) of _linear_impl under the stream (seed, offset); z None unless `keep_z`."""
    w, b = _operand(weight), None if bias is None else _numpy(_as_f32(bias))
    y2, z2 = dense_forward_checked(_operand(x), np.ascontiguousarray(w), None if b is None else np.ascontiguousarray(b),
                                   p, seed, offset, activation, train, keep_z, on_weight)
    out_shape = x.shape[:-1] + (weight.shape[0],)
    y, z = _from_numpy(y2, out_shape), None if z2 is None else _from_numpy(z2, out_shape)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y, z


def _dropout_linear_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], p: float, state: Optional[torch.Tensor],
    activation: int, train: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, state) of act(dropout(x) @ weight.T + bias) (see _linear_impl)."""
    return _linear_impl(x, weight, bias, p, state, activation, train, False)


dropout_linear_op = _Op("dropout_linear", _dropout_linear_impl, seeded=True)


@dropout_linear_op.register_fake
def _(x, weight, bias, p, state, activation, train):
    y = x.new_empty(x.shape[:-1] + (weight.shape[0],))
    z = x.new_empty(y.shape if _keeps_z(activation, x.dtype) else (0,), dtype=torch.float32)
    return y, z, x.new_empty((2,), dtype=torch.int64)


def _dropout_linear_backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, p: float, state: torch.Tensor,
    activation: int, train: bool, has_bias: bool, output_mask: Sequence[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) in x's, weight's and weight's dtype; an entry
    that output_mask leaves out is an empty tensor."""
    seed, offset = read_state(state)
    return _linear_backward_tensors(grad_y, x, weight, z if activation else None, p, seed, offset, activation, train,
                                    has_bias, output_mask)


def _linear_backward_tensors(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, z: Optional[torch.Tensor], p: float, seed: int,
    offset: int, activation: int, train: bool, has_bias: bool, output_mask: Sequence[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_dropout_linear_backward_impl under the stream (seed, offset)."""
    want = (bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) and has_bias)
    grads = dense_backward_checked(
        _operand(grad_y), _operand(x), np.ascontiguousarray(_operand(weight)),
        None if z is None else _numpy(z), p, seed, offset, activation, train, want,
    )
    dtypes = (x.dtype, weight.dtype, weight.dtype)
    return tuple(  # type: ignore[return-value]
        torch.empty(0, dtype=d) if g is None else (torch.from_numpy(g) if d == torch.float32 else torch.from_numpy(g).to(d))
        for g, d in zip(grads, dtypes)
    )


dropout_linear_backward_op = _Op("dropout_linear_backward", _dropout_linear_backward_impl)


@dropout_linear_backward_op.register_fake
def _(grad_y, x, weight, z, p, state, activation, train, has_bias, output_mask):
    shapes = (x.shape, weight.shape, weight.shape[:1])
    dtypes = (x.dtype, weight.dtype, weight.dtype)
    return tuple(x.new_empty(s if keep else (0,), dtype=d) for s, d, keep in zip(shapes, dtypes, output_mask))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, p, _, activation, train = inputs
    ctx.options = (p, activation, train, bias is not None)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(_savable(x), weight, bias, _backward_z(activation, x.dtype, output[0], output[1]), output[2])


def _activation_grad(z: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == 1:
        return (z > 0).to(z.dtype)
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def _linear_bwd(ctx, grad_y, grad_z, grad_state):
    x, weight, bias, z, state = ctx.saved_tensors
    p, activation, train, has_bias = ctx.options
    need = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        # create_graph: the same gradients from differentiable pieces (this op's dropout,
        # torch's matmuls), so that second derivatives (a gradient penalty) are right
        return _linear_bwd_composite(grad_y, x, weight, bias, p, state, activation, train)
    fused = _dropout_linear_backward_impl if _route(grad_y, x, weight, z) == "fast" else dropout_linear_backward_op
    gx, gw, gb = fused(grad_y, x, weight, z, p, state, activation, train, has_bias, [bool(n) for n in need])
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] and has_bias else None,
            None, None, None, None)


def _linear_bwd_composite(grad_y, x, weight, bias, p, state, activation, train):
    xd = call_dropout(x, p, state)[0] if train and p > 0 else x
    dz = grad_y
    if activation:
        zz = torch.nn.functional.linear(xd, weight, bias)
        dz = grad_y * _activation_grad(zz, activation)
    gx = dz @ weight
    if train and p > 0:
        gx = call_dropout_backward(gx, p, state)
    dz2, xd2 = dz.reshape(-1, dz.shape[-1]), xd.reshape(-1, xd.shape[-1])
    gw = dz2.t() @ xd2
    gb = dz2.sum(0) if bias is not None else None
    return gx, gw, gb, None, None, None, None


dropout_linear_op.register_autograd(_linear_bwd, setup_context=_linear_setup)
dropout_linear_op.register_autocast()


# --------------------------------------------------------------------------- autograd.Function forms


def _function(name: str, op, setup, backward):
    """The op as a torch.autograd.Function in setup_context style, with the same
    formula as its register_autograd: the form that torch.func's transforms (grad,
    jacrev, ...) accept, where (torch 2.13) an op's register_autograd is not."""
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,  # vmap runs forward and backward over the ops' own vmap rules
    })


# Under torch.func transforms: Functions around the ops (whose vmap rules vmap needs).
_FUNC = {
    "dropout": _function("Dropout", dropout_op, _dropout_setup, _dropout_bwd),
    "dropout_backward": _function("DropoutBackward", dropout_backward_op, _dropout_backward_setup, _dropout_backward_bwd),
    "dropout_linear": _function("DropoutLinear", dropout_linear_op, _linear_setup, _linear_bwd),
}
def _fast_function(name: str, impl, setup, backward):
    """The implementation as a ctx-style Function with the same formula: for plain eager
    calls, past the dispatcher (whose Python custom-op path costs ~75 us a call) and past
    the signature binding that setup_context-style Functions do on every call (~60 us;
    both measured with torch 2.13)."""
    def forward(ctx, *args):
        out = impl(*args)
        setup(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_FAST = {
    "dropout": _fast_function("FastDropout", _dropout_impl, _dropout_setup, _dropout_bwd),
    "dropout_backward": _fast_function("FastDropoutBackward", _dropout_backward_impl, _dropout_backward_setup,
                                       _dropout_backward_bwd),
    "dropout_linear": _fast_function("FastDropoutLinear", _dropout_linear_impl, _linear_setup, _linear_bwd),
}
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor subclasses beyond these go through the dispatcher
_OPS = {"dropout": dropout_op, "dropout_backward": dropout_backward_op, "dropout_linear": dropout_linear_op}


def _route(*tensors) -> str:
    """How to call an op here: "op" while torch.compile, torch.export or torch.jit.trace
    traces, with tensor subclasses or a dispatch mode (the dispatcher must see it: a trace
    that did not would keep the kernel's result as a constant); "func" under a torch.func
    transform; else "fast", autocast or not (an op with an autocast kernel then takes its
    inputs cast as that kernel would: _autocast_for)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return "op"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "func"
    if torch._C._is_torch_function_mode_enabled() or _get_current_dispatch_mode() is not None:
        return "op"
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return "op"  # (meta tensors: the ops' fake kernels give the shapes)
    return "fast"


_IMPLS = {"dropout": _dropout_impl, "dropout_backward": _dropout_backward_impl, "dropout_linear": _dropout_linear_impl}


def _call(name: str, tensors, args):
    how = _route(*tensors)
    if how == "op":
        return _OPS[name](*args)
    if how == "fast":
        args = _autocast_for(name, args)
    if how == "fast" and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return _IMPLS[name](*args)  # nothing to differentiate: no autograd node at all
    return (_FAST if how == "fast" else _FUNC)[name].apply(*args)


def call_dropout(x, p, state):
    """(y, state) of fastdropout::dropout, by the route that fits the call."""
    return _call("dropout", (x, state), (x, p, state))


def call_dropout_backward(grad, p, state):
    return _call("dropout_backward", (grad, state), (grad, p, state))


def call_dropout_linear(x, weight, bias, p, state, activation, train):
    """(y, z, state) of fastdropout::dropout_linear, by the route that fits the call."""
    return _call("dropout_linear", (x, weight, bias, state), (x, weight, bias, p, state, activation, train))


class _EagerDropoutLinear(torch.autograd.Function):
    """dropout_linear for a plain eager call under autograd: the op's formula with the
    stream as two integers, one output and nothing else in the graph.  What a layer
    costs beyond its kernels is Python; this route runs the least of it (the state
    tensor, its second and third outputs and the routing of the general Function cost
    about half of a small layer's time around the kernels)."""

    @staticmethod
    def forward(ctx, x, weight, bias, p, seed, offset, activation, train):  # type: ignore[override]
        y, z = _linear_tensors(x, weight, bias, p, seed, offset, activation, train, False,
                               _keeps_z(activation, x.dtype))
        ctx.save_for_backward(_savable(x), weight, bias, _backward_z(activation, x.dtype, y, z))
        ctx.options = (p, seed, offset, activation, train)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, bias, z = ctx.saved_tensors
        p, seed, offset, activation, train = ctx.options
        if torch.is_grad_enabled():  # create_graph: differentiable pieces, as the op's backward
            return _linear_bwd_composite(grad_y, x, weight, bias, p, make_state(seed, offset), activation,
                                         train)[:3] + (None,) * 5
        need = ctx.needs_input_grad
        gx, gw, gb = _linear_backward_tensors(grad_y, x, weight, z, p, seed, offset, activation, train,
                                              bias is not None, need[:3])
        return (gx if need[0] else None, gw if need[1] else None, gb if need[2] and bias is not None else None,
                None, None, None, None, None)


def _native_composite(grad_y, x, weight, bias, p, seed, offset, activation, train):
    """The C++ layer's backward under create_graph: the op's differentiable formula."""
    return _linear_bwd_composite(grad_y, x, weight, bias, p, make_state(seed, offset), activation, train)[:3]


_torch_native.set_python_parts(_native_composite, dropout_linear_op.impl, dropout_linear_backward_op.impl,
                               dropout_linear_op.autograd_kernel)
_torch_native.load_if_built()


def dropout_linear(x, weight, bias, p, seed: Optional[int], offset: int, activation, train) -> torch.Tensor:
    """y of fastdropout::dropout_linear: with seed None the stream is drawn from torch's
    generator (one draw when `train`, whatever the route), else (seed, offset).  Under
    autocast a plain eager call casts its operands as the op's autocast kernel would, then
    takes the same fast route (the C++ layer where built) as a call in that dtype."""
    if _route(x, weight, bias) == "fast":
        x, weight, bias = _autocast_for("dropout_linear", (x, weight, bias))
        if not train:
            seed, offset = 0, 0
        elif seed is None:
            seed, offset = _draw_seed(), 0
        if x.dtype in _NATIVE_DTYPES and weight.dtype is x.dtype and (bias is None or bias.dtype is x.dtype):
            native = _torch_native.module()  # the same layer in C++ (_torch_native), once built
            if native is not None:
                return native.dropout_linear(x, weight, bias, p, seed, offset, activation, train)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _EagerDropoutLinear.apply(x, weight, bias, p, seed, offset, activation, train)
        return _linear_tensors(x, weight, bias, p, seed, offset, activation, train, False, False)[0]
    state = None if seed is None else make_state(seed, offset)
    return call_dropout_linear(x, weight, bias, p, state, activation, train)[0]


# --------------------------------------------------------------------------- vmap


def _slice(a, dim, b):
    return a.select(dim, b) if dim is not None else a


def _vmap_loop(op, state_index: Optional[int], draws_if=None):
    """A vmap rule that runs the op once per batch element and stacks the results.

    For an op that draws (state None, and `draws_if(args)` when given), vmap's randomness decides: "different" draws
    per element, "same" draws once and reuses that state, "error" raises torch's error.
    """
    def rule(info, in_dims, *args):
        draws = state_index is not None and args[state_index] is None and (draws_if is None or draws_if(args))
        if draws and info.randomness == "error":
            raise RuntimeError(VMAP_RANDOMNESS_ERROR)
        if info.batch_size == 0:
            raise ValueError("fastdropout ops under vmap need a batch of at least one element")
        outs: List[object] = []
        shared = None
        for b in range(info.batch_size):
            call = [_slice(a, d, b) if isinstance(a, torch.Tensor) else a for a, d in zip(args, in_dims)]
            if draws and info.randomness == "same" and shared is not None:
                call[state_index] = shared
            out = op(*call)
            if draws and info.randomness == "same" and shared is None:
                shared = out[-1] if isinstance(out, tuple) else out
            outs.append(out)
        if isinstance(outs[0], tuple):
            stacked = tuple(torch.stack([o[i] for o in outs]) for i in range(len(outs[0])))
            return stacked, tuple(0 for _ in stacked)
        return torch.stack(outs), 0
    return rule


dropout_op.register_vmap(_vmap_loop(dropout_op, 2))
dropout_backward_op.register_vmap(_vmap_loop(dropout_backward_op, None))
dropout_linear_op.register_vmap(_vmap_loop(dropout_linear_op, 4))
dropout_linear_backward_op.register_vmap(_vmap_loop(dropout_linear_backward_op, None))


# --------------------------------------------------------------------------- attention


def _attention_plan(q, k, v, attn_mask, scale, enable_gqa):
    from ._attention import plan

    mask = None if attn_mask is None else _numpy(attn_mask if attn_mask.dtype == torch.bool else _as_f32(attn_mask))
    return plan(_numpy(q), _numpy(k), _numpy(v), mask, scale, enable_gqa)


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], dropout_p: float,
    is_causal: bool, scale: Optional[float], enable_gqa: bool, state: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, state): attention in float32 arithmetic, out in q's dtype, lse float32."""
    from ._attention import forward_checked

    train = dropout_p > 0.0
    state = (_draw_state() if state is None else state) if train else _NO_STATE.clone()
    seed, offset = read_state(state)
    q32, k32, v32 = _as_f32(q), _as_f32(k), _as_f32(v)
    pl = _attention_plan(q32, k32, v32, attn_mask, scale, enable_gqa)
    out, lse = forward_checked(pl, _numpy(q32), _numpy(k32), _numpy(v32), is_causal, train, dropout_p, seed, offset)
    out_t = _from_numpy(out, pl.batch_shape + (pl.Lq, pl.Ev))
    if q.dtype != torch.float32:
        out_t = out_t.to(q.dtype)
    return out_t, _from_numpy(lse, pl.batch_shape + (pl.Lq,)), state


attention_op = _Op("attention", _attention_impl, seeded=True)


def _attention_batch(q, k, v, attn_mask, enable_gqa):
    k_lead, v_lead = list(k.shape[:-2]), list(v.shape[:-2])
    if enable_gqa:
        k_lead[-1] = v_lead[-1] = q.shape[-3]
    shapes = [tuple(q.shape[:-2]), tuple(k_lead), tuple(v_lead)]
    if attn_mask is not None:
        shapes.append(tuple(attn_mask.shape[:-2]))
    return torch.broadcast_shapes(*shapes)


@attention_op.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, state):
    batch = tuple(_attention_batch(q, k, v, attn_mask, enable_gqa))
    return (q.new_empty(batch + (q.shape[-2], v.shape[-1])), q.new_empty(batch + (q.shape[-2],), dtype=torch.float32),
            q.new_empty((2,), dtype=torch.int64))


def _attention_backward_impl(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    attn_mask: Optional[torch.Tensor], dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
    state: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v) in q's, k's and v's dtypes."""
    from ._attention import backward_checked

    seed, offset = read_state(state)
    q32, k32, v32 = _as_f32(q), _as_f32(k), _as_f32(v)
    pl = _attention_plan(q32, k32, v32, attn_mask, scale, enable_gqa)
    grads = backward_checked(pl, _numpy(_as_f32(grad_out)), _numpy(q32), _numpy(k32), _numpy(v32), _numpy(_as_f32(out)),
                             _numpy(lse), is_causal, dropout_p > 0.0, dropout_p, seed, offset)
    out_grads = []
    for g, t in zip(grads, (q, k, v)):
        gt = torch.empty_like(t)  # t's memory layout, as the fake says
        gt.copy_(torch.from_numpy(np.ascontiguousarray(g)))
        out_grads.append(gt)
    return tuple(out_grads)  # type: ignore[return-value]


attention_backward_op = _Op("attention_backward", _attention_backward_impl)


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, enable_gqa, state):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, _ = inputs
    ctx.options = (dropout_p, is_causal, scale, enable_gqa)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(q, k, v, attn_mask, output[0], output[1], output[2])


DOUBLE_BACKWARD_ERROR = (
    "fastdropout's attention has no second derivative (its backward is one fused kernel); "
    "use torch.nn.functional.scaled_dot_product_attention where a gradient of a gradient is needed"
)


def _attention_bwd(ctx, grad_out, grad_lse, grad_state):
    q, k, v, attn_mask, out, lse, state = ctx.saved_tensors
    dropout_p, is_causal, scale, enable_gqa = ctx.options
    args = (grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, enable_gqa, state)
    how = _route(grad_out, q, k, v, attn_mask)
    if torch.is_grad_enabled():
        # the gradient may itself be differentiated (create_graph, torch.func): go through
        # the backward op, whose own derivative raises DOUBLE_BACKWARD_ERROR when asked
        gq, gk, gv = _FUNC["attention_backward"].apply(*args) if how == "func" else attention_backward_op(*args)
    else:
        gq, gk, gv = (_attention_backward_impl if how == "fast" else attention_backward_op)(*args)
    return gq, gk, gv, None, None, None, None, None, None


def _attention_backward_bwd(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _attention_backward_setup(ctx, inputs, output):
    pass


attention_op.register_autograd(_attention_bwd, setup_context=_attention_setup)
# under torch.autocast("cpu", dtype=d) as torch's scaled_dot_product_attention: inputs cast to d, output d
attention_op.register_autocast()
attention_backward_op.register_autograd(_attention_backward_bwd, setup_context=_attention_backward_setup)
attention_op.register_vmap(_vmap_loop(attention_op, 8, draws_if=lambda args: args[4] > 0.0))
attention_backward_op.register_vmap(_vmap_loop(attention_backward_op, None))

_OPS["attention"] = attention_op
_IMPLS["attention"] = _attention_impl
_FAST["attention"] = _fast_function("FastAttention", _attention_impl, _attention_setup, _attention_bwd)
_FUNC["attention"] = _function("Attention", attention_op, _attention_setup, _attention_bwd)
_FUNC["attention_backward"] = _function("AttentionBackward", attention_backward_op, _attention_backward_setup,
                                        _attention_backward_bwd)


def call_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, state):
    """(out, lse, state) of fastdropout::attention, by the route that fits the call."""
    return _call("attention", (q, k, v, attn_mask, state),
                 (q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, state))


# --------------------------------------------------------------------------- the dropout family

FAMILY_DROPOUT, FAMILY_ALPHA, FAMILY_GAUSSIAN = 0, 1, 2


def _family_numpy(x: np.ndarray, p: float, kind: int, noise: Optional[Sequence[int]], seed: int, offset: int,
                  backward: bool, out: Optional[np.ndarray] = None) -> np.ndarray:
    from ._family import alpha_dropout, alpha_dropout_backward, gaussian_dropout, gaussian_dropout_backward

    if noise is None or len(noise) == 0:
        noise = None
    else:  # -1: x's size along that dimension, read here, at each call (see _FamilyDropout.noise_shape)
        noise = tuple(x.shape[i] if d == -1 and len(noise) == x.ndim else d for i, d in enumerate(noise))
    if kind == FAMILY_GAUSSIAN:
        if backward:
            return gaussian_dropout_backward(x, p, seed=seed, offset=offset, out=out)
        return gaussian_dropout(x, p, seed=seed, offset=offset, out=out)
    if kind == FAMILY_ALPHA:
        if backward:
            return alpha_dropout_backward(x, p, seed=seed, offset=offset, noise_shape=noise, out=out)
        return alpha_dropout(x, p, seed=seed, offset=offset, noise_shape=noise, out=out)
    return _np_dropout(x, p, seed=seed, offset=offset, noise_shape=noise, out=out)


def _family_tensor(x: torch.Tensor, p: float, kind: int, noise_shape: Optional[List[int]], seed: int, offset: int,
                   backward: bool) -> torch.Tensor:
    """The family op (or its backward) of a tensor, in x's memory format (channels-last, a
    transposed view: as torch's ops keep it; the mask follows the logical index either way).
    float16 and bfloat16: the float32 op on the widened values, its result rounded once to the
    dtype (the float32 mask and noise)."""
    half = x.dtype in _HALF
    src = x.float() if half else x  # (keeps the memory format)
    if src.is_contiguous() and src.numel() > 0:
        y = _from_numpy(_family_numpy(_numpy(src), p, kind, noise_shape, seed, offset, backward), x.shape)
    else:
        y = torch.empty_like(src)
        _family_numpy(_numpy(src), p, kind, noise_shape, seed, offset, backward, out=_numpy(y))
    return y.to(x.dtype) if half else y


def _family_impl(x: torch.Tensor, p: float, kind: int, noise_shape: Optional[List[int]],
                 state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, state): a dropout-family op (kind: dropout, alpha or Gaussian) with an optional broadcast mask."""
    state = _draw_state() if state is None else state
    seed, offset = read_state(state)
    return _family_tensor(x, p, kind, noise_shape, seed, offset, False), state


family_op = _Op("dropout_family", _family_impl, seeded=True)


@family_op.register_fake
def _(x, p, kind, noise_shape, state):
    return torch.empty_like(x), x.new_empty((2,), dtype=torch.int64)  # x's memory format, as the kernel's


def _family_backward_impl(grad: torch.Tensor, p: float, kind: int, noise_shape: Optional[List[int]],
                          state: torch.Tensor) -> torch.Tensor:
    seed, offset = read_state(state)
    return _family_tensor(grad, p, kind, noise_shape, seed, offset, True)


family_backward_op = _Op("dropout_family_backward", _family_backward_impl)


@family_backward_op.register_fake
def _(grad, p, kind, noise_shape, state):
    return torch.empty_like(grad)


def _family_setup(ctx, inputs, output):
    ctx.options = (inputs[1], inputs[2], inputs[3])
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _family_bwd(ctx, grad_y, grad_state):
    (state,) = ctx.saved_tensors
    p, kind, noise = ctx.options
    return call_family_backward(grad_y, p, kind, noise, state), None, None, None, None


def _family_backward_setup(ctx, inputs, output):
    ctx.options = (inputs[1], inputs[2], inputs[3])
    ctx.save_for_backward(inputs[4])


def _family_backward_bwd(ctx, gg):
    (state,) = ctx.saved_tensors  # grad -> keep * grad * a is linear and its own adjoint
    p, kind, noise = ctx.options
    return call_family_backward(gg, p, kind, noise, state), None, None, None, None


family_op.register_autograd(_family_bwd, setup_context=_family_setup)
family_backward_op.register_autograd(_family_backward_bwd, setup_context=_family_backward_setup)
family_op.register_vmap(_vmap_loop(family_op, 4))
family_backward_op.register_vmap(_vmap_loop(family_backward_op, None))
_OPS.update(family=family_op, family_backward=family_backward_op)
_IMPLS.update(family=_family_impl, family_backward=_family_backward_impl)
_FAST.update(family=_fast_function("FastDropoutFamily", _family_impl, _family_setup, _family_bwd),
             family_backward=_fast_function("FastDropoutFamilyBackward", _family_backward_impl,
                                            _family_backward_setup, _family_backward_bwd))
_FUNC.update(family=_function("DropoutFamily", family_op, _family_setup, _family_bwd),
             family_backward=_function("DropoutFamilyBackward", family_backward_op, _family_backward_setup,
                                       _family_backward_bwd))


def call_family(x, p, kind, noise_shape, state):
    return _call("family", (x, state), (x, p, kind, noise_shape, state))


def call_family_backward(grad, p, kind, noise_shape, state):
    return _call("family_backward", (grad, state), (grad, p, kind, noise_shape, state))


# --------------------------------------------------------------------------- DropConnect


def _dropconnect_linear_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], p: float, state: Optional[torch.Tensor],
    activation: int, train: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, state) of act(x @ dropout(weight).T + bias) (see _linear_impl)."""
    return _linear_impl(x, weight, bias, p, state, activation, train, True)


dropconnect_linear_op = _Op("dropconnect_linear", _dropconnect_linear_impl, seeded=True)


@dropconnect_linear_op.register_fake
def _(x, weight, bias, p, state, activation, train):
    y = x.new_empty(x.shape[:-1] + (weight.shape[0],))
    return y, x.new_empty((0,), dtype=torch.float32), x.new_empty((2,), dtype=torch.int64)  # (no z: see _linear_impl)


def _dropconnect_setup(ctx, inputs, output):
    x, weight, bias, p, _, activation, train = inputs
    ctx.options = (p, activation, train)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, bias, output[2])


def _dropconnect_bwd(ctx, grad_y, grad_z, grad_state):
    """Composite: the weight's dropout through this package's differentiable dropout op and
    torch's matmuls, so first and second derivatives both hold."""
    x, weight, bias, state = ctx.saved_tensors
    p, activation, train = ctx.options
    wd = call_dropout(weight, p, state)[0] if train and p > 0 else weight
    dz = grad_y
    if activation:
        dz = grad_y * _activation_grad(torch.nn.functional.linear(x, wd, bias), activation)
    gx = dz @ wd
    dz2, x2 = dz.reshape(-1, dz.shape[-1]), x.reshape(-1, x.shape[-1])
    gw = dz2.t() @ x2
    if train and p > 0:
        gw = call_dropout_backward(gw, p, state)
    gb = dz2.sum(0) if bias is not None else None
    return gx, gw, gb, None, None, None, None


dropconnect_linear_op.register_autograd(_dropconnect_bwd, setup_context=_dropconnect_setup)
dropconnect_linear_op.register_autocast()  # as nn.Linear
dropconnect_linear_op.register_vmap(_vmap_loop(dropconnect_linear_op, 4))
_OPS["dropconnect_linear"] = dropconnect_linear_op
_IMPLS["dropconnect_linear"] = _dropconnect_linear_impl
_FAST["dropconnect_linear"] = _fast_function("FastDropConnectLinear", _dropconnect_linear_impl, _dropconnect_setup,
                                             _dropconnect_bwd)
_FUNC["dropconnect_linear"] = _function("DropConnectLinear", dropconnect_linear_op, _dropconnect_setup, _dropconnect_bwd)


def call_dropconnect_linear(x, weight, bias, p, state, activation, train):
    return _call("dropconnect_linear", (x, weight, bias, state), (x, weight, bias, p, state, activation, train))


# --------------------------------------------------------------------------- dropout + residual + norm


def _add_norm_impl(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], p: float,
    eps: float, rms: bool, state: Optional[torch.Tensor], train: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    from ._family import dropout_add_layer_norm

    state = (_draw_state() if state is None else state) if train and p > 0 else _NO_STATE.clone()
    seed, offset = read_state(state)
    y = dropout_add_layer_norm(_numpy(x), _numpy(residual), None if weight is None else _numpy(weight),
                               None if bias is None else _numpy(bias), p, eps=eps, norm="rms" if rms else "layer",
                               seed=seed, offset=offset, training=train and p > 0)
    return torch.from_numpy(y), state


add_norm_op = _Op("dropout_add_layer_norm", _add_norm_impl, seeded=True)


@add_norm_op.register_fake
def _(x, residual, weight, bias, p, eps, rms, state, train):
    return x.new_empty(x.shape), x.new_empty((2,), dtype=torch.int64)


def _add_norm_backward_impl(
    grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], p: float, eps: float, rms: bool, state: torch.Tensor, train: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_residual, grad_weight, grad_bias); an absent parameter's gradient is empty."""
    from ._family import dropout_add_layer_norm_backward

    seed, offset = read_state(state)
    g = dropout_add_layer_norm_backward(_numpy(grad), _numpy(x), _numpy(residual),
                                        None if weight is None else _numpy(weight),
                                        None if bias is None else _numpy(bias), p if train else 0.0, eps=eps,
                                        norm="rms" if rms else "layer", seed=seed, offset=offset)
    g = tuple(g) + ((None,) if rms else ())
    return tuple(torch.empty(0, dtype=x.dtype) if a is None else torch.from_numpy(np.ascontiguousarray(a))
                 for a in g)  # type: ignore[return-value]


add_norm_backward_op = _Op("dropout_add_layer_norm_backward", _add_norm_backward_impl)


@add_norm_backward_op.register_fake
def _(grad, x, residual, weight, bias, p, eps, rms, state, train):
    def like(t, ref):
        return ref.new_empty(t.shape) if t is not None else ref.new_empty((0,))
    return x.new_empty(x.shape), x.new_empty(x.shape), like(weight, x), like(bias, x)


def _add_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, p, eps, rms, _, train = inputs
    ctx.options = (p, eps, rms, train)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(_savable(x), _savable(residual), weight, bias, output[1])


ADD_NORM_DOUBLE_BACKWARD_ERROR = ("fastdropout's dropout_add_layer_norm has no second derivative; use "
                                  "torch.nn.functional.layer_norm(residual + dropout(x)) where one is needed")


def _add_norm_bwd(ctx, grad_y, grad_state):
    x, residual, weight, bias, state = ctx.saved_tensors
    p, eps, rms, train = ctx.options
    args = (grad_y, x, residual, weight, bias, p, eps, rms, state, train)
    how = _route(grad_y, x, residual, weight, bias)
    if torch.is_grad_enabled():
        g = _FUNC["add_norm_backward"].apply(*args) if how == "func" else add_norm_backward_op(*args)
    else:
        g = (_add_norm_backward_impl if how == "fast" else add_norm_backward_op)(*args)
    return g[0], g[1], (g[2] if weight is not None else None), (g[3] if bias is not None else None), \
        None, None, None, None, None


def _add_norm_backward_bwd(ctx, *grads):
    raise RuntimeError(ADD_NORM_DOUBLE_BACKWARD_ERROR)


add_norm_op.register_autograd(_add_norm_bwd, setup_context=_add_norm_setup)
add_norm_backward_op.register_autograd(_add_norm_backward_bwd, setup_context=lambda ctx, inputs, output: None)
add_norm_op.register_vmap(_vmap_loop(add_norm_op, 7))
_OPS["add_norm"] = add_norm_op
_IMPLS["add_norm"] = _add_norm_impl
_FAST["add_norm"] = _fast_function("FastDropoutAddLayerNorm", _add_norm_impl, _add_norm_setup, _add_norm_bwd)
_FUNC["add_norm"] = _function("DropoutAddLayerNorm", add_norm_op, _add_norm_setup, _add_norm_bwd)
_FUNC["add_norm_backward"] = _function("DropoutAddLayerNormBackward", add_norm_backward_op,
                                       lambda ctx, inputs, output: None, _add_norm_backward_bwd)


def call_add_norm(x, residual, weight, bias, p, eps, rms, state, train):
    return _call("add_norm", (x, residual, weight, bias, state), (x, residual, weight, bias, p, eps, rms, state, train))
