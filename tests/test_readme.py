"""The README's examples run as written and print what they show."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _examples():
    # a complete example starts with its imports; the DDP script runs under torchrun (below)
    return [b for b in _blocks() if b.startswith("import ") and "init_process_group" not in b]


@pytest.mark.skipif(not README.exists(), reason="the README is not beside the tests (installed package)")
@pytest.mark.parametrize("index", range(6))
def test_readme_example_runs_and_prints(index):
    examples = _examples()
    assert len(examples) == 6, ("the README has one example for NumPy, fastdropout.nn, fastdropout.torch, "
                                "attention with NumPy and with torch, and the dropout family")
    code = examples[index]
    needs = [m for m in ("torch", "sklearn") if re.search(rf"^import .*\b{m}\b|^from {m}\b", code, flags=re.M)]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the example prints what it shows"


@pytest.mark.skipif(not README.exists(), reason="the README is not beside the tests (installed package)")
def test_readme_ddp_script_runs_under_torchrun(tmp_path):
    """The README's train.py, run as it says (torchrun, two processes, gloo on the loopback)."""
    pytest.importorskip("torch")
    scripts = [b for b in _blocks() if "init_process_group" in b]
    assert len(scripts) == 1, "the README has one DDP script"
    assert "torchrun --standalone --nproc-per-node 2 train.py" in README.read_text()
    script = tmp_path / "train.py"
    script.write_text(scripts[0])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: loss " in r.stdout and r.stdout.count("replicas identical: True") == 2, r.stdout
