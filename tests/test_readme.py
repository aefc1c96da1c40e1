"""The README's examples run as written and print what they show."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # a complete example starts with its imports; a fragment (the DDP lines) does not
    return [b for b in blocks if b.startswith("import ")]


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
