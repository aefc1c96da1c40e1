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
HEADER_FIELDS = {
    "cpu", "cpu_vendor", "caches", "gemm_path", "openmp_wait", "adapt_threads", "isa", "backend", "available_backends",
    "threads", "fastdropout", "numpy", "torch", "jax", "date", "notes",
}


def test_bench_tiny_writes_documented_json(tmp_path, capsys, backend):
    path = tmp_path / "bench.json"
    assert cli_main(["bench", "--tiny", "--json", str(path), "--backend", backend, "--threads", "2"]) == 0
    report = capsys.readouterr().out
    assert "fastdropout benchmark" in report and "Thread scaling" in report and "neighbours:" in report
    data = json.loads(path.read_text())
    assert data["schema"] == 1
    assert HEADER_FIELDS <= set(data["header"])
    assert data["header"]["backend"] == backend
    rows = data["results"]
    assert rows and all(set(r) == RESULT_FIELDS for r in rows)
    groups = {"elementwise", "dense", "threads", "mixed", "attention", "memory", "family"} | ({"training"} if _have_torch() else set())
    assert {r["group"] for r in rows} == groups
    memory = [r for r in rows if r["group"] == "memory"]  # peak MiB, measured in fresh processes
    assert {r["impl"] for r in memory} == {"fastdropout"} | ({"torch sdpa"} if _have_torch() else set())
    assert all(r["unit"] == "MiB" and r["rate"] >= 0 for r in memory) and "Attention peak memory" in report
    rows = [r for r in rows if r["group"] != "memory"]
    for r in rows:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["rate"] > 0 and r["unit"] in ("Gelem/s", "GFLOP/s")
    ours = [r for r in rows if r["impl"].startswith("fastdropout") and r["group"] != "threads"]
    # every fastdropout row is compared with a peer doing the same work in the same run
    # (a forward+backward has peers only where torch or jax is installed)
    have_fwd_bwd_peer = _have_torch() or _bench._have("jax")
    def has_peer(r):  # attention's peers and the family's forward+backward peers are torch's
        if r["group"] in ("attention", "family") and ("fwd+bwd" in r["kernel"] or r["group"] == "attention"):
            return _have_torch()
        return "forward+backward" not in r["kernel"] or have_fwd_bwd_peer

    assert ours and all(r["ratios"] for r in ours if has_peer(r))
    copy = next(r for r in rows if r["impl"] == "numpy copyto")
    drop = next(r for r in rows if r["impl"] == "fastdropout (out=)" and r["kernel"] == "dropout forward")
    assert drop["ratios"]["numpy copyto"] == pytest.approx(copy["median_s"] / drop["median_s"])
    assert {r["threads"] for r in rows if r["group"] == "threads"} >= {1}
    # like with like: a forward+backward is compared with forward+backward peers only
    fwd_bwd = [r for r in ours if r["kernel"] == "forward+backward"]
    assert all(not any("numpy" in k for k in r["ratios"]) for r in fwd_bwd)
    # the mixed rows: every call after its own kind (slowdown 1) and after each other library's call
    mixed = [r for r in rows if r["group"] == "mixed"]
    assert {r["impl"] for r in mixed} >= {"fastdropout dropout_dense", "numpy x @ W.T + b"}
    for r in mixed:
        assert r["kernel"].startswith("after ")
        if r["kernel"] == "after " + r["impl"] or r["kernel"].startswith(f"after {r['impl']} ("):
            assert r["ratios"] == {"after its own kind": 1.0}
    # fastdropout is timed in a loop with each other library: its own-kind time once per loop
    assert {r["kernel"] for r in mixed if r["impl"] == "fastdropout dropout_dense"} >= {
        "after fastdropout dropout_dense (numpy loop)", "after numpy x @ W.T + b"}
    assert "Mixed process" in report and "Notes:" in report
    assert "1 threads" not in report


def _have_torch() -> bool:
    return _bench._have("torch")


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    info, results = _bench.run(element_sizes={"a": 256, "b": 4096}, dense_shapes=[(2, 3, 4)], repeats=1, scaling=False,
                               progress=False, mixed_shapes=[], train_batches=[], attention=[], memory_lengths=[], family={})
    _bench.plot(results, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_cli_usage_and_errors(capsys):
    assert cli_main([]) == 2
    assert cli_main(["nope"]) == 2
    assert cli_main(["info"]) == 0
    assert fd.backend() in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["bench", "--threads", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["info", "--bogus"])


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "positive integer"), (["--repeats", "-1"], "positive integer"),
    (["--json", "/nonexistent-folder/b.json"], "does not exist"), (["--plot", "/nonexistent-folder/b.png"], "does not exist"),
])
def test_bench_refuses_bad_options_before_running(argv, message, capsys):
    """Each bad option exits with usage at once (a missing output folder too, not after the run)."""
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bench_refuses_a_backend_this_cpu_lacks(capsys):
    missing = [b for b in fd._core.compiled_backends() if b not in fd.available_backends()]
    if not missing:
        pytest.skip("this CPU runs every compiled backend")
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "--backend", missing[0]])
    assert info.value.code == 2 and "this CPU has" in capsys.readouterr().err


def test_bench_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    assert "``" not in capsys.readouterr().out


@pytest.mark.skipif(not _have_torch(), reason="needs torch")
def test_training_step_rows_compare_the_same_model():
    info, results = _bench.run(element_sizes={"a": 256}, dense_shapes=[(2, 3, 4)], repeats=1, scaling=False,
                               progress=False, mixed_shapes=[], train_batches=[4], mlp=(6, 8, 3), compile_torch=False,
                               attention=[], memory_lengths=[], family={})
    rows = [r for r in results if r.group == "training"]
    assert [r.impl for r in rows] == ["fastdropout.torch", "torch eager"]
    assert set(rows[0].ratios) == {"torch eager"}


@pytest.mark.skipif(not _have_torch(), reason="needs torch")
def test_training_step_rows_time_the_compiled_models_too():
    """With torch.compile: the torch model compiled, and the fastdropout model compiled with
    fullgraph=True, whose row is also compared with the same model run eagerly."""
    info, results = _bench.run(element_sizes={"a": 256}, dense_shapes=[(2, 3, 4)], repeats=1, scaling=False,
                               progress=False, mixed_shapes=[], train_batches=[4], mlp=(6, 8, 3), compile_torch=True,
                               attention=[], memory_lengths=[], family={})
    rows = {r.impl: r for r in results if r.group == "training"}
    assert list(rows) == ["fastdropout.torch", "torch eager", "torch.compile", _bench.COMPILED_FD]
    assert set(rows[_bench.COMPILED_FD].ratios) == {"torch eager", "torch.compile", "fastdropout.torch"}
    assert set(rows["fastdropout.torch"].ratios) == {"torch eager", "torch.compile"}
