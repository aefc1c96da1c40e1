"""Loading the native core, and how its idle OpenMP threads wait.

An OpenMP runtime keeps its idle threads spinning for milliseconds after each
parallel region (libgomp: 300,000 pause loops, about 8-20 ms).  Next to NumPy's
OpenBLAS or PyTorch, whose threads need the same cores right after, that made a
NumPy matmul following a fastdropout call up to 8x slower (and the reverse).  So,
while ``fastdropout._core`` loads, fastdropout sets ``OMP_WAIT_POLICY=passive``
(idle threads sleep at once; the standard OpenMP setting) and then restores the
environment, but only where the runtime it loads is its own:

- the user set ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME``: theirs is kept;
- a wheel bundles a private copy of the runtime (``fastdropout.libs``): passive;
- a source build loads the system runtime, which another library can share (PyTorch's
  ``libgomp.so.1`` is the same runtime by name): passive only when no OpenMP
  runtime is loaded yet and PyTorch is not installed, since a runtime's wait policy
  is read once, when it loads, and would then hold for PyTorch's threads too
  (measured: 30% slower small PyTorch ops).  Otherwise the runtime's own policy stays.

``python -m fastdropout info`` says which case holds and which runtime is in use.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
from typing import Dict, Optional

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_RUNTIME_NAMES = ("libgomp", "libomp", "libiomp5", "vcomp")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

#: What was decided when the core loaded: ``wait`` ("passive" or "runtime default"
#: or "user"), ``why``, a sentence.
wait_policy: Dict[str, str] = {}


def bundled_runtime_dirs():
    """Folders where a repaired wheel keeps its private OpenMP runtime."""
    return [os.path.join(os.path.dirname(_PACKAGE_DIR), "fastdropout.libs"), os.path.join(_PACKAGE_DIR, ".dylibs")]


def _has_bundled_runtime() -> bool:
    for folder in bundled_runtime_dirs():
        for path in glob.glob(os.path.join(folder, "*")):
            if os.path.basename(path).startswith(_RUNTIME_NAMES):
                return True
    return False


def _runtime_loaded() -> Optional[bool]:
    """Whether an OpenMP runtime is mapped into this process (None where unknown)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            text = maps.read()
    except OSError:
        return None
    return any(name in text for name in _RUNTIME_NAMES)


def _decide() -> Dict[str, str]:
    user = [f"{v}={os.environ[v]}" for v in WAIT_VARIABLES if v in os.environ]
    if user:
        return {"wait": "user", "why": f"as set in the environment ({', '.join(user)})"}
    if _has_bundled_runtime():
        return {"wait": "passive", "why": "passive: set for the wheel's own bundled OpenMP runtime"}
    if _runtime_loaded() is not False:
        return {"wait": "runtime default", "why": (
            "the runtime's own: an OpenMP runtime was already loaded (possibly shared with another "
            "library), so fastdropout leaves it alone; OMP_WAIT_POLICY=passive makes idle threads sleep")}
    if importlib.util.find_spec("torch") is not None:
        return {"wait": "runtime default", "why": (
            "the runtime's own: this source build loads the system OpenMP runtime, which PyTorch "
            "shares, so fastdropout leaves it alone; OMP_WAIT_POLICY=passive makes idle threads sleep")}
    return {"wait": "passive", "why": (
        "passive: set while loading the system OpenMP runtime (no other was loaded and PyTorch "
        "is not installed; a library loading the same runtime later shares it)")}


def load_core():
    """Import ``fastdropout._core`` under the wait policy decided above."""
    decision = _decide()
    wait_policy.clear()
    wait_policy.update(decision)
    if decision["wait"] != "passive":
        return importlib.import_module("fastdropout._core")
    os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        # The core's module init queries the runtime, so a runtime that reads its
        # environment lazily (LLVM's libomp) has read it before this returns.
        return importlib.import_module("fastdropout._core")
    finally:
        del os.environ["OMP_WAIT_POLICY"]
