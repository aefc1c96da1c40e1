"""``python -m fastdropout demo`` in its shortened form (``--quick``).

Checks that every section is printed (progress per epoch, results of both runs, MC dropout),
that two runs print the same text, that the thread count changes nothing but the line that
reports it, the options, and the message when scikit-learn is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

import fastdropout as fd  # noqa: E402
from fastdropout import _demo  # noqa: E402


def run(capsys, *argv):
    assert _demo.main(list(argv)) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_quick_demo_prints_every_section(capsys):
    out = run(capsys, "--quick")
    for text in (
        "scikit-learn's handwritten digits",
        "200 training images, 1597 test images",
        "training without dropout",
        "training with dropout",
        "plain epoch 1/3",
        "plain epoch 3/3",
        "dropout epoch 3/3",
        "results (dropout off for evaluation)",
        "train-test accuracy gap",
        "MC dropout: 5 passes",
        "most certain tenth  (159 images",
        "least certain tenth (159 images",
    ):
        assert text in out, text
    results = [line for line in out.splitlines() if line.strip().startswith(("without dropout", "with dropout"))]
    assert len(results) == 2 and all("%" in line and "pts" in line for line in results)


def test_demo_is_reproducible_and_thread_independent(capsys):
    first = run(capsys, "--quick", "--epochs", "2")
    second = run(capsys, "--quick", "--epochs", "2")
    assert first == second
    threaded = run(capsys, "--quick", "--epochs", "2", "--threads", "2")

    def numbers(text):
        return [line for line in text.splitlines() if "kernels:" not in line]

    assert numbers(threaded) == numbers(first)
    assert "plain epoch 2/2" in first


def test_demo_restores_thread_count(capsys):
    before = fd.get_num_threads()
    run(capsys, "--quick", "--epochs", "1", "--threads", "3")
    assert fd.get_num_threads() == before


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epochs", "x"], ["--seed", "-1"], ["--bogus"],
                                  ["--plot", "/nonexistent-folder/demo.png"], ["--threads", "0"]])
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _demo.main(argv)
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_missing_scikit_learn(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert _demo.main(["--quick"]) == 1
    assert "fastdropout[demo]" in capsys.readouterr().err


def test_command_line_entry_point():
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "fastdropout", "demo", "--quick", "--epochs", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "least certain tenth" in result.stdout


def test_demo_plot_draws_both_ensembles(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "ensembles.png"
    assert _demo.main(["--quick", "--plot", str(path)]) == 0
    assert path.stat().st_size > 10_000 and f"wrote {path}" in capsys.readouterr().out
    # two one-hot members: the first right twice; with the second the average ties on image 2
    acc, ent, _ = _demo._growing([np.eye(10)[[0, 1]], np.eye(10)[[0, 2]]], np.array([0, 1]))
    assert acc.tolist() == [1.0, 1.0] and ent[0] == pytest.approx(0.0, abs=1e-9) and ent[1] > 0
