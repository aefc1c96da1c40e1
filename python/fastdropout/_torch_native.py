"""fastdropout.torch's layer in C++: building, caching and loading it.

A plain eager call of :func:`fastdropout.torch.dropout_linear` (or a
:class:`~fastdropout.torch.DropoutLinear` layer) on float32, bfloat16 or float16 tensors (all
operands of one dtype), and of
:func:`fastdropout.torch.dropout` (or :class:`~fastdropout.torch.Dropout`) on a contiguous
tensor of those dtypes, goes through a ``torch.autograd.Function`` written in C++
(``_native/torch_ops.cpp``) that calls the
engine through ``_core``'s C interface, instead of through Python: the same kernels, the
same masks and gradients bit for bit, at a third to three quarters of the Python route's cost
around them (README, *Measured*: "The PyTorch layer in C++").  Everything else (compiled and exported graphs,
torch.func, autocast, tensor subclasses) keeps the registered ops of ``_torch_ops``, whose CPU
kernels are C++ too for those dtypes.

torch's C++ API has no stable ABI, so no build shipped in the wheel could serve every torch:
the source is compiled against the torch at hand by ``torch.utils.cpp_extension`` (g++ or the
compiler torch names, ninja) the first time a process needs it, about a minute on two cores,
and cached under ``$FASTDROPOUT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fastdropout`` or
``~/.cache/fastdropout``), one build per torch version, Python version and source.

It is built (or a cached build loaded) when a ``DropoutLinear`` is constructed or at the first
eager call, whichever comes first; a cached build also loads when
``fastdropout.torch`` is imported.  ``FASTDROPOUT_TORCH_NATIVE`` chooses: ``auto`` (default)
builds when needed and falls back to the Python route when it cannot (no compiler, no ninja,
no Python headers), saying why on stderr and leaving the reason in the cache folder
(``failed.txt``), which ``python -m fastdropout info`` shows and which keeps later processes
from trying again until it is deleted; ``0`` never uses it; ``1`` requires it (a failure raises,
and it tries again whatever an earlier failure left).  Results never depend on the choice.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from . import _core

_ENV = "FASTDROPOUT_TORCH_NATIVE"
_SETTINGS = ("auto", "0", "1")
_lock = threading.Lock()
_module = None  # the loaded extension, once loaded
_status = "not loaded yet (built or loaded by the first DropoutLinear or eager call)"
_tried = False
_enabled = True  # tests switch the route off and on (set_enabled)
_composite: Optional[Callable] = None
_python_kernels: tuple = ()


def setting() -> str:
    """FASTDROPOUT_TORCH_NATIVE: "auto" (default), "0" or "1"; ValueError for anything else."""
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value not in _SETTINGS:
        raise ValueError(f"{_ENV} must be one of {', '.join(_SETTINGS)}, got {value!r}")
    return value


def source_dir() -> Path:
    """The C++ source shipped in the package (fastdropout/_native)."""
    return Path(_core.__file__).resolve().parent / "_native"


def cache_root() -> Path:
    """$FASTDROPOUT_CACHE_DIR, else $XDG_CACHE_HOME/fastdropout, else ~/.cache/fastdropout."""
    if os.environ.get("FASTDROPOUT_CACHE_DIR"):
        return Path(os.environ["FASTDROPOUT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdropout"


def build_key() -> str:
    """What a build depends on: its sources, torch's version and commit, Python's ABI."""
    h = hashlib.sha256()
    for name in ("torch_ops.cpp", "engine_abi.h"):
        h.update((source_dir() / name).read_bytes())
    h.update(f"{torch.__version__}|{torch.version.git_version}|{sys.implementation.cache_tag}|"
             f"{sys.platform}|{torch._C._GLIBCXX_USE_CXX11_ABI}".encode())
    return h.hexdigest()[:16]


def _import_built(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paths():
    """(module name, its cache folder, the built module, the file a failed build leaves)."""
    name = "fastdropout_torch_ops_" + build_key()
    folder = cache_root() / "torch_ops" / name
    return name, folder, folder / f"{name}.so", folder / "failed.txt"


def describe() -> str:
    """For ``python -m fastdropout info``: the eager layer's route, without building anything."""
    mode = setting()
    if mode == "0":
        return f"Python (the C++ layer is off: {_ENV}=0)"
    if _module is not None or _tried:
        return ("C++: " if _module is not None else "Python: C++ layer ") + _status
    built, failed = _paths()[2:]
    if failed.exists() and not built.exists():
        return (f"Python: building the C++ layer failed ({failed.read_text().strip()}); "
                f"delete {failed} to try again")
    return (f"C++ (built for torch {torch.__version__}: {built})" if built.exists() else
            f"C++ once built (by the first DropoutLinear or eager call, about a minute, into "
            f"{built.parent}; {_ENV}=0: Python)")


def _build_or_load():
    name, folder, built, failed = _paths()
    if built.exists():
        return _import_built(name, built)
    if failed.exists() and setting() != "1":
        raise RuntimeError(f"an earlier build failed: {failed.read_text().strip()}")
    from torch.utils.cpp_extension import load

    folder.mkdir(parents=True, exist_ok=True)
    print(f"fastdropout: compiling its PyTorch layer for torch {torch.__version__} (once, about a minute), "
          f"into {folder}", file=sys.stderr, flush=True)
    return load(name, [str(source_dir() / "torch_ops.cpp")], extra_include_paths=[str(source_dir())],
                extra_cflags=["-O2"], build_directory=str(folder), verbose=False)


def module():
    """The extension, loaded (and built if need be) on first use; None where it is off or
    could not be built (``status()`` says why; with ``FASTDROPOUT_TORCH_NATIVE=1`` that raises)."""
    global _module, _status, _tried
    if _module is not None:
        return _module if _enabled else None
    if _tried or not _enabled:
        return None
    # first the Python parts the C++ layer calls back (set_python_parts); outside the lock,
    # as that import itself loads a cached build (load_if_built)
    from . import _torch_ops  # noqa: F401

    if _module is not None or _tried:
        return _module if _enabled else None
    with _lock:
        if _tried:
            return _module
        mode = setting()
        if mode == "0":
            _status, _tried = f"off ({_ENV}=0)", True
            return None
        try:
            m = _build_or_load()
            m.init(_core._engine_abi, _composite, *_python_kernels)
        except Exception as e:  # no compiler, ninja or headers: the Python route serves
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            _status, _tried = f"unavailable, the Python route serves ({reason})", True
            if mode == "1":
                raise RuntimeError(f"{_ENV}=1 but fastdropout's C++ PyTorch layer could not be built or loaded") from e
            _record_failure(reason)
            return None
        _module, _tried = m, True
        _status = f"loaded ({Path(m.__file__).parent})"
        return _module if _enabled else None


def _record_failure(reason: str) -> None:
    """Say on stderr why the C++ layer is not used, and leave the reason where later processes
    (and ``info``) find it, so that they do not spend the build's minute again."""
    try:
        _, folder, _, failed = _paths()
        if not failed.exists():
            folder.mkdir(parents=True, exist_ok=True)
            failed.write_text(reason + "\n")
        print(f"fastdropout: its C++ PyTorch layer is not available ({reason}); the Python route serves, "
              f"with the same results. The reason is kept in {failed}: delete it to try again, or set "
              f"{_ENV}=0.", file=sys.stderr, flush=True)
    except OSError:
        pass


def load_if_built() -> None:
    """At import of fastdropout.torch: load a build that is already cached (so that compiled
    graphs, which never take the eager route, find the C++ kernels too); build nothing."""
    if _module is None and not _tried and setting() != "0" and _paths()[2].exists():
        module()


def status() -> str:
    """This process's route: loaded (where from), off, not loaded yet, or why it is unavailable."""
    if not _enabled:
        return "switched off in this process"
    return f"off ({_ENV}=0)" if _module is None and setting() == "0" else _status


def set_enabled(on: bool) -> bool:
    """For tests and benchmarks: use (True) or bypass (False) the C++ route; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(on)
    if _module is not None:
        _module._set_cpp_kernels(_enabled)
    return previous


def set_python_parts(composite: Callable, linear: Callable, linear_backward: Callable,
                     linear_autograd: Callable) -> None:
    """What the C++ layer calls back (set by _torch_ops at import): the Python backward under
    create_graph, the registered ops' Python CPU kernels, which the C++ kernels replace for
    float32 and call for other dtypes, and dropout_linear's Python autograd kernel, which
    the C++ one calls wherever a graph is recorded or the call is not a plain CPU one."""
    global _composite, _python_kernels
    _composite, _python_kernels = composite, (linear, linear_backward, linear_autograd)
