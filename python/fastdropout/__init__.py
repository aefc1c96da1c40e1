"""fastdropout: fused, SIMD, bit-reproducible dropout and dropout->dense layers."""
from __future__ import annotations

try:
    from ._runtime import load_core as _load_core

    _core = _load_core()
except ImportError as exc:  # pragma: no cover - only without a build
    if "FASTDROPOUT_" in str(exc):  # a bad FASTDROPOUT_BACKEND, _GEMM_PATH or _BF16_GEMM
        raise
    raise ImportError(
        "fastdropout's native core (fastdropout._core) is missing or failed to load: "
        f"{exc}. Did you forget to compile it? Install with `pip install .` from the "
        "source tree rather than importing the checkout."
    ) from exc

from . import reference
from ._generator import Generator, default_generator, manual_seed
from ._attention import attention, attention_backward
from ._family import (
    alpha_dropout,
    alpha_dropout_backward,
    dropconnect_dense,
    dropconnect_dense_backward,
    dropout_add_layer_norm,
    dropout_add_layer_norm_backward,
    gaussian_dropout,
    gaussian_dropout_backward,
)
from ._api import (
    OversubscriptionWarning,
    available_backends,
    backend,
    dense,
    dropout,
    dropout_backward,
    dropout_dense,
    dropout_dense_backward,
    dropout_mask,
    get_num_threads,
    set_num_threads,
)

__version__ = "0.1.0"

__all__ = [
    "Generator",
    "alpha_dropout",
    "alpha_dropout_backward",
    "dropconnect_dense",
    "dropconnect_dense_backward",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_backward",
    "gaussian_dropout",
    "gaussian_dropout_backward",
    "OversubscriptionWarning",
    "attention",
    "attention_backward",
    "available_backends",
    "backend",
    "default_generator",
    "dense",
    "dropout",
    "dropout_backward",
    "dropout_dense",
    "dropout_dense_backward",
    "dropout_mask",
    "get_num_threads",
    "manual_seed",
    "reference",
    "set_num_threads",
]
