"""Framework-free layers over the fused kernels: build, train and run an MLP with NumPy alone.

Layers follow PyTorch's conventions where they can: ``Dense`` and ``DropoutDense``
store ``weight`` with shape ``(out_features, in_features)`` and ``bias`` with shape
``(out_features,)``, initialised as ``torch.nn.Linear`` does, and the keys of
:meth:`Module.state_dict` (``"0.weight"``, ``"0.bias"``, ...) are those of a
``torch.nn.Sequential`` with the same layers at the same places (a ``DropoutDense`` is one
layer, where torch's ``Dropout, Linear`` are two: index the torch model's keys accordingly,
or use ``fastdropout.torch.DropoutLinear``), so weights move between the two.

Each layer has ``forward(x)`` and ``backward(grad)``.  ``backward`` returns the
gradient with respect to the layer's input and *adds* the parameter gradients to
``grad_weight`` / ``grad_bias`` (call :meth:`Module.zero_grad` between steps, as in
PyTorch).  Between forward and backward a layer keeps only its input and, with an
activation, its pre-activation, plus the ``(seed, offset)`` its dropout drew: never
a mask, which the backward regenerates.  Do not modify the input in place between
the two calls.

Randomness: every layer takes ``seed=`` (an int: the layer gets its own
:class:`fastdropout.Generator`) or ``generator=`` (a shared one); with neither it
uses ``fastdropout.default_generator``, so ``fastdropout.manual_seed(s)`` before
building a model makes its initialisation and every later mask reproducible.

Example (scikit-learn's digits)::

    import numpy as np, fastdropout.nn as nn
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True); x = (x / 16).astype(np.float32)
    model = nn.Sequential(nn.DropoutDense(64, 512, p=0.1, activation="relu", seed=0),
                          nn.DropoutDense(512, 10, p=0.5, seed=1))
    opt = nn.SGD(model, lr=0.05, momentum=0.9)
    for epoch in range(20):
        for batch in np.array_split(np.random.default_rng(epoch).permutation(len(x)), 50):
            loss, grad = nn.cross_entropy(model(x[batch]), y[batch])
            model.zero_grad(); model.backward(grad); opt.step()
    probs, spread = nn.mc_predict(model, x[:5], samples=30, transform=nn.softmax)
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._api import dropout, dropout_backward, dropout_dense, dropout_dense_backward
from ._checks import check_activation, check_p, check_u64
from ._generator import Generator, default_generator

__all__ = [
    "Adam",
    "AlphaDropout",
    "Dense",
    "DropConnectDense",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutAddLayerNorm",
    "DropoutDense",
    "FeatureAlphaDropout",
    "GaussianDropout",
    "LockedDropout",
    "Module",
    "Optimizer",
    "SGD",
    "Sequential",
    "cross_entropy",
    "mc_predict",
    "mse_loss",
    "softmax",
]

ParamPair = Tuple[np.ndarray, np.ndarray]

_NOTHING_SAVED = object()  # no forward since the last backward
_IDENTITY = object()  # the last forward was the identity (eval mode or p = 0)


# --------------------------------------------------------------------------- helpers


def _resolve_generator(seed: Optional[int], generator: Optional[Generator]) -> Generator:
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, Generator):
            raise TypeError(f"generator must be a fastdropout.Generator, got {type(generator).__name__}")
        return generator
    if seed is not None:
        return Generator(check_u64(seed, "seed"))
    return default_generator


def _check_features(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _as_array(x: Any, name: str) -> np.ndarray:
    """An ndarray of real numbers (lists are converted); anything else is a TypeError."""
    if not isinstance(x, np.ndarray):
        if x is None or isinstance(x, (str, bytes)):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{name} must be array-like, got {type(x).__name__}: {exc}") from None
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x


def _as_float32(x: Any, name: str) -> np.ndarray:
    x = _as_array(x, name)
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _as_float(x: Any, name: str) -> np.ndarray:
    """float32 and float64 stay as they are; other real dtypes become float32."""
    x = _as_array(x, name)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _linear_init(generator: Generator, in_features: int, out_features: int, bias: bool):
    """``torch.nn.Linear``'s initialisation: kaiming_uniform_(a=sqrt(5)) and a uniform bias.

    Both reduce to U(-1/sqrt(in_features), 1/sqrt(in_features)).  The numbers come
    from a NumPy stream keyed by a ``(seed, offset)`` range drawn from ``generator``,
    so they are reproducible and no dropout mask ever reuses those random words.
    """
    n_weight = in_features * out_features
    seed, offset = generator.draw(n_weight + (out_features if bias else 0))
    rng = np.random.default_rng(np.random.SeedSequence([seed, offset]))
    bound = 1.0 / math.sqrt(in_features)
    weight = rng.uniform(-bound, bound, size=(out_features, in_features)).astype(np.float32)
    b = rng.uniform(-bound, bound, size=out_features).astype(np.float32) if bias else None
    return weight, b


# --------------------------------------------------------------------------- modules


class Module:
    """Base class: training flag, parameters, gradients and state dicts.

    Subclasses implement :meth:`forward` and :meth:`backward`, list their
    parameter names in ``_param_names`` (gradients live in ``grad_<name>``) and
    their sub-modules in :meth:`children`.
    """

    _param_names: Tuple[str, ...] = ()

    def __init__(self) -> None:
        self.training = True

    # -- computation
    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, grad: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    # -- structure
    def children(self) -> List["Module"]:
        return []

    def modules(self) -> Iterator["Module"]:
        """This module and every module inside it, depth first."""
        yield self
        for child in self.children():
            yield from child.modules()

    def train(self, mode: bool = True) -> "Module":
        """Set training mode (dropout active) on this module and all inside it; returns self."""
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self) -> "Module":
        """Evaluation mode: every dropout is the identity and draws nothing; returns self."""
        return self.train(False)

    # -- parameters
    def _named_pairs(self, prefix: str = "") -> List[Tuple[str, np.ndarray, np.ndarray]]:
        pairs = []
        for name in self._param_names:
            param = getattr(self, name)
            if param is not None:
                pairs.append((prefix + name, param, getattr(self, "grad_" + name)))
        for i, child in enumerate(self.children()):
            pairs.extend(child._named_pairs(f"{prefix}{i}."))
        return pairs

    def named_parameters(self) -> List[Tuple[str, np.ndarray]]:
        """``[(name, array)]`` with PyTorch's names (``"weight"``, ``"0.bias"``...)."""
        return [(name, param) for name, param, _ in self._named_pairs()]

    def parameters(self) -> List[np.ndarray]:
        """The parameter arrays themselves (float32); optimizers update them in place."""
        return [param for _, param, _ in self._named_pairs()]

    def gradients(self) -> List[np.ndarray]:
        """The gradient arrays, in the order of :meth:`parameters`."""
        return [grad for _, _, grad in self._named_pairs()]

    def zero_grad(self) -> None:
        """Set every accumulated parameter gradient to zero."""
        for grad in self.gradients():
            grad.fill(0.0)

    # -- state
    def state_dict(self) -> Dict[str, np.ndarray]:
        """A copy of every parameter, keyed as in PyTorch (``torch.nn.Sequential`` of ``Linear``)."""
        return {name: param.copy() for name, param in self.named_parameters()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Copy ``state`` into the parameters in place (so optimizers keep tracking them).

        The keys must match :meth:`state_dict` exactly and every shape must
        agree; values may be NumPy arrays or anything ``np.asarray`` accepts,
        e.g. the CPU tensors of a PyTorch state dict.  Nothing is written unless
        everything matches.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of arrays, got {type(state).__name__}")
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"state dict does not match the model: missing keys {missing}, unexpected keys {unexpected}")
        values = {}
        for name, param in params.items():
            value = _as_array(state[name], f"state[{name!r}]")
            if value.shape != param.shape:
                raise ValueError(f"state[{name!r}] must have shape {param.shape}, got {value.shape}")
            values[name] = value
        for name, param in params.items():
            np.copyto(param, values[name], casting="unsafe")

    def save(self, path) -> None:
        """Save :meth:`state_dict` to an ``.npz`` file (NumPy adds the suffix if missing)."""
        np.savez(path, **self.state_dict())

    def load(self, path) -> None:
        """Load parameters saved by :meth:`save` (see :meth:`load_state_dict`)."""
        with np.load(path, allow_pickle=False) as data:
            self.load_state_dict({name: data[name] for name in data.files})

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class _MaskedLayer(Module):
    """The shared body of the dropout layers: ``forward`` draws from the generator and applies
    ``_forward``, ``backward`` applies ``_backward`` with the same stream; subclasses choose the
    two functions and which noise shape an input gets (None: a mask over the whole input)."""

    _forward: Callable[..., np.ndarray] = staticmethod(dropout)
    _backward: Callable[..., np.ndarray] = staticmethod(dropout_backward)

    def __init__(self, p: float = 0.5, *, seed: Optional[int] = None, generator: Optional[Generator] = None) -> None:
        super().__init__()
        self.p = check_p(p)
        self.generator = _resolve_generator(seed, generator)
        self._saved: Any = _NOTHING_SAVED

    def noise_shape(self, shape: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
        return None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_float(x, "x")
        self.p = check_p(self.p)  # p may have been assigned since construction
        noise = self.noise_shape(x.shape)  # (an input of the wrong rank raises in eval mode too)
        if not (self.training and self.p > 0.0):
            self._saved = _IDENTITY
            return x
        seed, offset = self.generator.draw(int(np.prod(noise)) if noise is not None else x.size)
        y = type(self)._forward(x, self.p, seed=seed, offset=offset, noise_shape=noise)
        self._saved = (self.p, seed, offset, x.shape, noise)  # (p as the forward used it, whatever is assigned later)
        return y

    def backward(self, grad: np.ndarray) -> np.ndarray:
        saved = _take_saved(self)
        grad = _as_float(grad, "grad")
        if saved is _IDENTITY:
            return grad
        p, seed, offset, shape, noise = saved
        if grad.shape != shape:
            raise ValueError(f"grad must have the forward output's shape {shape}, got {grad.shape}")
        return type(self)._backward(grad, p, seed=seed, offset=offset, noise_shape=noise)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout(_MaskedLayer):
    """Inverted dropout: ``x / (1 - p)`` where kept, 0 where dropped; identity in eval mode.

    float32 and float64 inputs keep their dtype; other real dtypes become float32.
    Each training-mode forward with p > 0 draws ``x.size`` elements from the generator.

    Parameters
    ----------
    p : drop probability in [0, 1].
    seed : a fixed seed for this layer's own :class:`fastdropout.Generator` (reproducible
        masks); or
    generator : a :class:`fastdropout.Generator` to draw from (default: the package's).

    Raises
    ------
    TypeError
        A non-real ``p`` or a ``generator`` that is not a :class:`fastdropout.Generator`;
        at the call, a non-numeric ``x``.
    ValueError
        ``p`` outside [0, 1] or NaN (checked again at each call, so a ``p`` assigned later
        is checked too); both ``seed`` and ``generator``; a ``backward`` whose ``grad``
        does not have the forward output's shape.
    RuntimeError
        ``backward`` without a ``forward`` before it.

    References
    ----------
    N. Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
    Overfitting", JMLR 15 (2014).
    """


def _take_saved(layer: Module) -> Any:
    saved = layer._saved
    if saved is _NOTHING_SAVED:
        raise RuntimeError(
            f"{type(layer).__name__}.backward() needs a forward() first (each forward allows one backward)"
        )
    layer._saved = _NOTHING_SAVED
    return saved


class _DenseLayer(Module):
    """The shared implementation of :class:`DropoutDense`, :class:`Dense` and
    :class:`DropConnectDense`: the fused forward and backward functions, and how many stream
    elements a forward draws, are the subclass's."""

    _param_names = ("weight", "bias")
    _forward: Callable[..., Any] = staticmethod(dropout_dense)
    _backward: Callable[..., Any] = staticmethod(dropout_dense_backward)

    def _draw_size(self, x: np.ndarray) -> int:
        return x.size

    def __init__(self, in_features, out_features, p, bias, activation, seed, generator) -> None:
        super().__init__()
        self.in_features = _check_features(in_features, "in_features")
        self.out_features = _check_features(out_features, "out_features")
        self.p = check_p(p)
        check_activation(activation)
        self.activation = activation
        self.generator = _resolve_generator(seed, generator)
        self.weight, self.bias = _linear_init(self.generator, self.in_features, self.out_features, bool(bias))
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else np.zeros_like(self.bias)
        self._saved: Any = _NOTHING_SAVED

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = _as_float32(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self!r} expects x of shape (..., {self.in_features}), got {x.shape}")
        self.p = check_p(self.p)  # p may have been assigned since construction
        masked = self.training and self.p > 0.0
        seed, offset = self.generator.draw(self._draw_size(x)) if masked else (0, 0)
        out = type(self)._forward(
            x, self.weight, self.bias, self.p, seed=seed, offset=offset, activation=self.activation,
            training=masked, return_preactivation=self.activation is not None,
        )
        y, z = out if self.activation is not None else (out, None)
        self._saved = (x, z, seed, offset, masked, self.p, self.activation)  # (as the forward used them)
        return y

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x, z, seed, offset, masked, p, activation = _take_saved(self)
        grad = _as_float32(grad, "grad")
        grad_x, grad_w, grad_b = type(self)._backward(
            grad, x, self.weight, p, seed=seed, offset=offset, activation=activation,
            preactivation=z, bias=self.bias is not None, training=masked,
        )
        self.grad_weight += grad_w
        if grad_b is not None:
            self.grad_bias += grad_b
        return grad_x


class DropoutDense(_DenseLayer):
    """Fused ``act(dropout(x, p) @ weight.T + bias)``: dropout on the layer's *input*.

    ``DropoutDense(i, o, p)`` computes what ``torch.nn.Sequential(Dropout(p),
    Linear(i, o))`` does (followed by ReLU/GELU when ``activation`` is set), in
    one pass: the mask is generated inside the matrix multiply and regenerated
    in the backward, never stored.  Each training-mode forward with ``p > 0``
    draws ``x.size`` elements from the generator; eval mode draws nothing.

    Parameters
    ----------
    in_features, out_features : sizes; ``x`` has shape ``(..., in_features)``.
    p : drop probability of the input elements (0 makes a plain dense layer).
    bias : learn an additive bias.
    activation : None, ``"relu"`` or ``"gelu"`` (erf form, as ``torch.nn.GELU()``).
    seed, generator : randomness for initialisation and masks (see the module docs).

    Attributes ``weight`` (out, in) and ``bias`` (out,) are float32 arrays, and
    ``grad_weight`` / ``grad_bias`` accumulate their gradients.  Inputs of any
    real dtype are converted to float32; outputs and input gradients are float32.

    Raises
    ------
    TypeError
        Non-integer sizes, a non-real ``p``, an activation that is not a string.
    ValueError
        Negative sizes, ``p`` outside [0, 1] (checked again at each call), an unknown
        activation, both ``seed`` and ``generator``; at the call, ``x`` not of shape
        ``(..., in_features)``.
    RuntimeError
        ``backward`` without a ``forward`` before it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        p: float = 0.5,
        *,
        bias: bool = True,
        activation: Optional[str] = None,
        seed: Optional[int] = None,
        generator: Optional[Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, p, bias, activation, seed, generator)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, p={self.p}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )


class Dense(_DenseLayer):
    """``act(x @ weight.T + bias)``: a plain dense layer (``torch.nn.Linear`` plus activation).

    Same attributes, dtypes, initialisation and errors as :class:`DropoutDense`;
    ``seed`` / ``generator`` only drive the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        activation: Optional[str] = None,
        seed: Optional[int] = None,
        generator: Optional[Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, 0.0, bias, activation, seed, generator)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )


class Sequential(Module):
    """Layers applied in order; ``backward`` runs them in reverse.

    State-dict keys are prefixed with the layer's position (``"0.weight"``), as
    in ``torch.nn.Sequential``.  Raises ``TypeError`` when a layer is not a :class:`Module`.
    """

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"layer {i} must be a fastdropout.nn.Module, got {type(layer).__name__}")
        self.layers = list(layers)

    def children(self) -> List[Module]:
        return list(self.layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)" if self.layers else "Sequential()"


# --------------------------------------------------------------------------- losses


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (float32 and float64 keep their dtype; other
    inputs, float16 included, are computed and returned in float32).

    Raises ``TypeError`` for non-numeric input and ``numpy.AxisError`` (a ``ValueError``)
    for an ``axis`` the array does not have.
    """
    x = _as_float(x, "x")
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def cross_entropy(logits: np.ndarray, target: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean softmax cross-entropy of ``logits`` (N, C) against class indices ``target`` (N,).

    Returns ``(loss, grad)`` where ``grad`` = d loss / d logits (float32), ready
    for ``model.backward(grad)``; as ``torch.nn.functional.cross_entropy``.

    Raises
    ------
    TypeError
        ``target`` not of an integer dtype.
    ValueError
        ``logits`` not 2-D, ``target`` not of shape ``(N,)``, class indices outside
        ``[0, C)``, an empty batch.
    """
    logits = _as_array(logits, "logits").astype(np.float64)
    target = _as_array(target, "target")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {logits.shape}")
    n, c = logits.shape
    if target.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != (n,):
        raise ValueError(f"target must have shape ({n},) for logits of shape {logits.shape}, got {target.shape}")
    if n and (target.min() < 0 or target.max() >= c):
        raise ValueError(f"target must be class indices in [0, {c}), got values in [{target.min()}, {target.max()}]")
    if n == 0:
        raise ValueError("cross_entropy needs at least one sample (the mean of nothing is undefined)")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(n)
    loss = float(np.mean(log_z - shifted[rows, target]))
    grad = np.exp(shifted - log_z[:, None])
    grad[rows, target] -= 1.0
    return loss, (grad / n).astype(np.float32)


def mse_loss(prediction: np.ndarray, target: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean squared error and its gradient with respect to ``prediction`` (float32).

    Returns ``(loss, grad)``.  Raises ``ValueError`` when the shapes differ or are empty,
    ``TypeError`` for non-numeric input.
    """
    prediction = _as_array(prediction, "prediction").astype(np.float64)
    target = _as_array(target, "target").astype(np.float64)
    if prediction.shape != target.shape:
        raise ValueError(f"target must have the shape of prediction {prediction.shape}, got {target.shape}")
    if prediction.size == 0:
        raise ValueError("mse_loss needs at least one element")
    diff = prediction - target
    return float(np.mean(diff * diff)), (2.0 * diff / diff.size).astype(np.float32)


# --------------------------------------------------------------------------- optimizers


class Optimizer:
    """Updates parameters in place from their accumulated gradients.

    ``params`` is a :class:`Module` (its current parameters are read at each
    step) or a sequence of ``(parameter, gradient)`` array pairs.
    """

    def __init__(self, params: Union[Module, Sequence[ParamPair]], lr: float) -> None:
        if isinstance(params, Module):
            self._module: Optional[Module] = params
            self._fixed: List[ParamPair] = []
        else:
            self._module = None
            self._fixed = _check_pairs(params)
        self.lr = _check_nonnegative(lr, "lr")
        self._state: List[Dict[str, Any]] = [dict() for _ in self._pairs()]

    def _pairs(self) -> List[ParamPair]:
        if self._module is None:
            return self._fixed
        return list(zip(self._module.parameters(), self._module.gradients()))

    def zero_grad(self) -> None:
        """Set the gradients of every tracked parameter to zero."""
        for _, grad in self._pairs():
            grad.fill(0.0)

    def step(self) -> None:
        """Apply one update to every parameter."""
        pairs = self._pairs()
        if len(pairs) != len(self._state):
            raise RuntimeError(f"the model had {len(self._state)} parameters when the optimizer was made, now {len(pairs)}")
        for (param, grad), state in zip(pairs, self._state):
            self._update(param, grad, state)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: Dict[str, Any]) -> None:
        raise NotImplementedError


def _check_pairs(params: Any) -> List[ParamPair]:
    try:
        pairs = [tuple(pair) for pair in params]
    except TypeError:
        raise TypeError(
            f"params must be a fastdropout.nn.Module or a sequence of (parameter, gradient) pairs, "
            f"got {type(params).__name__}"
        ) from None
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(a, np.ndarray) for a in pair):
            raise TypeError(
                f"params[{i}] must be a (parameter, gradient) pair of NumPy arrays; "
                "pass the model itself (SGD(model, ...)) to train all its parameters"
            )
        if pair[0].shape != pair[1].shape:
            raise ValueError(f"params[{i}]: gradient shape {pair[1].shape} differs from parameter shape {pair[0].shape}")
        if not pair[0].flags.writeable:
            raise ValueError(f"params[{i}]: the parameter is read-only")
    return pairs


def _check_nonnegative(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__} {value!r}")
    value = float(value)
    if not value >= 0.0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and L2 weight decay, as ``torch.optim.SGD``.

    ``g = grad + weight_decay * param``; with momentum ``buf = momentum * buf + g``
    (``buf = g`` on the first step) and ``g = buf`` (or ``g + momentum * buf``
    with ``nesterov``); then ``param -= lr * g``.

    Raises
    ------
    TypeError
        ``params`` neither a :class:`Module` nor ``(param, grad)`` pairs of arrays; non-real
        hyperparameters.
    ValueError
        Negative ``lr``, ``momentum`` or ``weight_decay``; ``nesterov`` without momentum.
    """

    def __init__(
        self,
        params: Union[Module, Sequence[ParamPair]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(params, lr)
        self.momentum = _check_nonnegative(momentum, "momentum")
        self.weight_decay = _check_nonnegative(weight_decay, "weight_decay")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov needs momentum > 0")
        self.nesterov = bool(nesterov)

    def _update(self, param: np.ndarray, grad: np.ndarray, state: Dict[str, Any]) -> None:
        g = grad + self.weight_decay * param if self.weight_decay else grad.copy()
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += g
            if self.nesterov:
                g += self.momentum * buf
            else:
                g = buf
        param -= (self.lr * g).astype(param.dtype, copy=False)


class Adam(Optimizer):
    """Adam with L2 weight decay, as ``torch.optim.Adam``.

    Raises ``TypeError`` for ``params`` that are neither a :class:`Module` nor
    ``(param, grad)`` pairs, or non-real hyperparameters, and ``ValueError`` for a negative
    ``lr``/``eps``/``weight_decay`` or ``betas`` outside [0, 1).

    References
    ----------
    D. Kingma, J. Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """

    def __init__(
        self,
        params: Union[Module, Sequence[ParamPair]],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr)
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair of numbers in [0, 1), got {betas!r}") from None
        self.betas = (_check_beta(beta1, "betas[0]"), _check_beta(beta2, "betas[1]"))
        self.eps = _check_nonnegative(eps, "eps")
        self.weight_decay = _check_nonnegative(weight_decay, "weight_decay")

    def _update(self, param: np.ndarray, grad: np.ndarray, state: Dict[str, Any]) -> None:
        beta1, beta2 = self.betas
        g = grad + self.weight_decay * param if self.weight_decay else grad
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(param), exp_avg_sq=np.zeros_like(param))
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        m += (1.0 - beta1) * g
        v *= beta2
        v += (1.0 - beta2) * g * g
        denom = np.sqrt(v) / math.sqrt(1.0 - beta2**t) + self.eps
        param -= ((self.lr / (1.0 - beta1**t)) * m / denom).astype(param.dtype, copy=False)


def _check_beta(value: Any, name: str) -> float:
    value = _check_nonnegative(value, name)
    if value >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


# --------------------------------------------------------------------------- MC dropout


def mc_predict(
    model: Module,
    x: np.ndarray,
    samples: int = 30,
    *,
    transform: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Monte Carlo dropout (Gal & Ghahramani 2016): predictive mean and standard deviation.

    Runs ``samples`` forward passes with dropout active (each draws fresh masks
    from the layers' generators), applies ``transform`` to each output (e.g.
    :func:`softmax` to average class probabilities) and returns the mean and
    the population standard deviation (ddof = 0) over the passes, in the
    output's dtype.  The spread across this ensemble of thinned networks says
    how sure the model is.  The model's training flags are restored afterwards.

    Parameters
    ----------
    model : a :class:`Module` with dropout layers.
    x : its input.
    samples : number of forward passes, >= 1.
    transform : optional function applied to each output (e.g. :func:`softmax`).

    Returns
    -------
    ``(mean, std)``, each of the (transformed) output's shape.

    Raises
    ------
    TypeError
        ``model`` not a :class:`Module`, ``samples`` not an int, ``transform`` not callable.
    ValueError
        ``samples`` < 1.

    References
    ----------
    Y. Gal, Z. Ghahramani, "Dropout as a Bayesian Approximation: Representing Model
    Uncertainty in Deep Learning", ICML 2016.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a fastdropout.nn.Module, got {type(model).__name__}")
    if isinstance(samples, (bool, np.bool_)) or not isinstance(samples, numbers.Integral):
        raise TypeError(f"samples must be a positive int, got {type(samples).__name__} {samples!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        mean = m2 = None
        dtype = None
        for k in range(1, int(samples) + 1):
            out = model.forward(x)
            if transform is not None:
                out = np.asarray(transform(out))
            if mean is None:
                dtype = out.dtype if out.dtype.kind == "f" else np.dtype(np.float64)
                mean, m2 = np.zeros(out.shape), np.zeros(out.shape)
            delta = out - mean  # Welford: stable single-pass mean and variance
            mean += delta / k
            m2 += delta * (out - mean)
    finally:
        for m, mode in modes:
            m.training = mode
    return mean.astype(dtype), np.sqrt(m2 / samples).astype(dtype)


# The rest of the dropout family (channel, locked, alpha, DropConnect, dropout + add + norm).
from ._nn_family import (  # noqa: E402  (they build on the classes above)
    AlphaDropout,
    DropConnectDense,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    DropoutAddLayerNorm,
    FeatureAlphaDropout,
    GaussianDropout,
    LockedDropout,
)
