"""The benchmark code paths, in a tiny configuration, so they cannot rot."""
from __future__ import annotations

import json

import pytest

import fastdropout as fd
from fastdropout import _bench
from fastdropout.__main__ import main as cli_main

RESULT_FIELDS = {
    "group", "kernel", "impl", "size", "threads", "median_s", "min_s", "max_s", "repeats", "rate", "unit", "ratios",
}
HEADER_FIELDS = {"cpu", "isa", "backend", "available_backends", "threads", "fastdropout", "numpy", "torch", "jax", "date"}


def test_bench_tiny_writes_documented_json(tmp_path, capsys, backend):
    path = tmp_path / "bench.json"
    assert cli_main(["bench", "--tiny", "--json", str(path), "--backend", backend, "--threads", "2"]) == 0
    report = capsys.readouterr().out
    assert "fastdropout benchmark" in report and "Thread scaling" in report
    data = json.loads(path.read_text())
    assert data["schema"] == 1
    assert HEADER_FIELDS <= set(data["header"])
    assert data["header"]["backend"] == backend
    rows = data["results"]
    assert rows and all(set(r) == RESULT_FIELDS for r in rows)
    assert {r["group"] for r in rows} == {"elementwise", "dense", "threads"}
    for r in rows:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["rate"] > 0 and r["unit"] in ("Gelem/s", "GFLOP/s")
    ours = [r for r in rows if r["impl"].startswith("fastdropout") and r["group"] != "threads"]
    # every fastdropout row is compared with a peer doing the same work in the same run
    assert ours and all(r["ratios"] for r in ours)
    copy = next(r for r in rows if r["impl"] == "numpy copyto")
    drop = next(r for r in rows if r["impl"] == "fastdropout (out=)" and r["kernel"] == "dropout forward")
    assert drop["ratios"]["numpy copyto"] == pytest.approx(copy["median_s"] / drop["median_s"])
    assert {r["threads"] for r in rows if r["group"] == "threads"} >= {1}


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    info, results = _bench.run(element_sizes={"a": 256, "b": 4096}, dense_shapes=[(2, 3, 4)], repeats=1, scaling=False, progress=False, settle_s=0.0)
    _bench.plot(results, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_cli_usage_and_errors(capsys):
    assert cli_main([]) == 2
    assert cli_main(["nope"]) == 2
    assert cli_main(["info"]) == 0
    assert fd.backend() in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["bench", "--threads", "0"])
