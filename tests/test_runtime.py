"""How fastdropout loads its core and chooses how idle OpenMP threads wait."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastdropout as fd
from fastdropout import _runtime


@pytest.fixture
def clean_env(monkeypatch):
    for name in _runtime.WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_runtime, "bundled_runtime_dirs", lambda: [])
    monkeypatch.setattr(_runtime, "_runtime_loaded", lambda: False)
    monkeypatch.setattr(_runtime.importlib.util, "find_spec", lambda name: None)
    return monkeypatch


@pytest.mark.parametrize("name", _runtime.WAIT_VARIABLES)
def test_a_wait_setting_of_the_user_is_kept(clean_env, name):
    clean_env.setenv(name, "active" if name == "OMP_WAIT_POLICY" else "100")
    assert _runtime._decide()["wait"] == "user"


def test_a_bundled_private_runtime_waits_passively(clean_env, tmp_path):
    (tmp_path / "libgomp-1a2b3c4d.so.1.0.0").write_bytes(b"")
    clean_env.setattr(_runtime, "bundled_runtime_dirs", lambda: [str(tmp_path)])
    clean_env.setattr(_runtime, "_runtime_loaded", lambda: True)  # private: loaded or not
    assert _runtime._decide()["wait"] == "passive"


def test_a_runtime_already_loaded_is_left_alone(clean_env):
    clean_env.setattr(_runtime, "_runtime_loaded", lambda: True)
    assert _runtime._decide()["wait"] == "runtime default"
    clean_env.setattr(_runtime, "_runtime_loaded", lambda: None)  # cannot tell: leave it alone too
    assert _runtime._decide()["wait"] == "runtime default"


def test_a_system_runtime_that_pytorch_shares_is_left_alone(clean_env):
    clean_env.setattr(_runtime.importlib.util, "find_spec", lambda name: object() if name == "torch" else None)
    assert _runtime._decide()["wait"] == "runtime default"


def test_a_system_runtime_of_its_own_waits_passively(clean_env):
    assert _runtime._decide()["wait"] == "passive"


def _in_fresh_interpreter(code: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in _runtime.WAIT_VARIABLES}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True).stdout.strip()


def test_the_environment_is_restored_after_the_import():
    code = "import os, fastdropout; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _in_fresh_interpreter(code) == "None"
    assert _in_fresh_interpreter(code, OMP_WAIT_POLICY="active") == "active"


@pytest.mark.skipif(not fd._core.has_openmp(), reason="built without OpenMP")
def test_info_names_the_runtime_and_the_wait_policy():
    out = _in_fresh_interpreter("from fastdropout.__main__ import main; main(['info'])")
    assert "OpenMP runtime" in out and "idle threads wait" in out
    if sys.platform.startswith("linux"):
        assert "omp" in fd._core.openmp_runtime()
