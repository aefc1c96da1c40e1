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
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_environment_is_restored_after_the_import():
    code = "import os, fastdropout; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _in_fresh_interpreter(code) == "None"
    assert _in_fresh_interpreter(code, OMP_WAIT_POLICY="active") == "active"


def test_import_leaves_ml_dtypes_to_the_user():
    # ml_dtypes' import cost about 1.4 s of CPU time: fastdropout does not import it, and takes
    # bfloat16 arrays once the user has (an array of that dtype needs it)
    code = ("import sys, numpy as np, fastdropout as fd; before = 'ml_dtypes' in sys.modules; "
            "fd.dropout(np.ones(4, np.float32), 0.5, seed=1); fd.dense(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)); "
            "import ml_dtypes; x = np.ones((2, 3), ml_dtypes.bfloat16); "
            "same = np.array_equal(fd.dropout(x, 0.5, seed=1), fd.reference.dropout(x, 0.5, seed=1)); "
            "y = fd.dense(x, x); print(before, same, y.dtype)")
    assert _in_fresh_interpreter(code).split() == ["False", "True", "bfloat16"]


@pytest.mark.skipif(not fd._core.has_openmp(), reason="built without OpenMP")
def test_info_names_the_runtime_and_the_wait_policy():
    out = _in_fresh_interpreter("from fastdropout.__main__ import main; main(['info'])")
    assert "OpenMP runtime" in out and "idle threads wait" in out
    if sys.platform.startswith("linux"):
        assert "omp" in fd._core.openmp_runtime()


def test_info_says_whether_threads_give_way_to_neighbours():
    out = _in_fresh_interpreter("from fastdropout.__main__ import main; main(['info'])", FASTDROPOUT_ADAPT_THREADS="1")
    line = next(ln for ln in out.splitlines() if ln.startswith("neighbours"))
    if sys.platform.startswith("linux"):  # a per-thread CPU clock: threads give way unless told not to
        assert "threads give way" in line and "do not" not in line
    off = _in_fresh_interpreter("from fastdropout.__main__ import main; main(['info'])", FASTDROPOUT_ADAPT_THREADS="0")
    line = next(ln for ln in off.splitlines() if ln.startswith("neighbours"))
    assert "threads do not give way" in line


def _neighbour_check():
    """In a fresh interpreter: a neighbour seen, small GEMMs go to one thread, large ones keep
    their threads, and the results are the bits computed before."""
    import numpy as np
    import fastdropout as fd
    fd.set_num_threads(2)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((64, 256), dtype=np.float32), rng.standard_normal((320, 256), dtype=np.float32)
    before = fd.dropout_dense(x, w, None, 0.5, seed=9)
    for _ in range(200):  # a region disturbed by another process measures nothing
        unit = fd._core.neighbours()["unit_ns_flops"]
        if unit > 0:
            break
        fd.dropout_dense(x, w, None, 0.5, seed=9)
    assert unit > 0, "the calls measured their cost per unit"
    fd._core._note_neighbour(0)  # forget any real neighbour (this host may be busy)
    assert fd._core._gemm_threads(1 << 30) == 2 and fd._core.neighbours()["one_thread_ns_left"] == 0
    fd._core._note_neighbour(2_000_000)
    state = fd._core.neighbours()
    assert state["one_thread_ns_left"] > 0 and state["lost_ns"] == 2_000_000
    small = (2 << 20) if unit * 2 < 8_000_000 else (1 << 20)
    assert fd._core._gemm_threads(small) == 1
    huge = (8_000_000 // unit + 2) << 21
    assert fd._core._gemm_threads(huge) == 2
    after = fd.dropout_dense(x, w, None, 0.5, seed=9)
    assert after.tobytes() == before.tobytes()
    print("ok")


@pytest.mark.skipif(not (fd._core.has_openmp() and fd._core.neighbours()["adapting"]),
                    reason="needs a build with OpenMP and a per-thread CPU clock")
def test_a_neighbour_sends_small_problems_to_one_thread_without_changing_a_bit():
    import inspect
    src = inspect.getsource(_neighbour_check)
    assert _in_fresh_interpreter(src + "\n_neighbour_check()").strip().endswith("ok")


@pytest.mark.skipif(not fd._core.has_openmp(), reason="needs a build with OpenMP")
def test_threads_do_not_adapt_when_turned_off():
    code = ("import fastdropout as fd; fd.set_num_threads(2); fd._core._note_neighbour(10**9); "
            "print(fd._core.neighbours()['adapting'], fd._core._gemm_threads(1 << 21))")
    assert _in_fresh_interpreter(code, FASTDROPOUT_ADAPT_THREADS="0").split() == ["False", "2"]
