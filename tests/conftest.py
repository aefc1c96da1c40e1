"""Shared fixtures: every test that touches a kernel runs on every backend this CPU has."""

from __future__ import annotations

import os
import sys

import pytest

import fastdropout as fd

# FASTDROPOUT_BACKEND pins the whole run to one backend (CI runs the suite once per
# backend that way); otherwise every kernel test runs on every backend the CPU has.
BACKENDS = [os.environ["FASTDROPOUT_BACKEND"]] if os.environ.get("FASTDROPOUT_BACKEND") else fd.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force one kernel backend for the test, then restore the previous one."""
    previous = fd.backend()
    fd._core.set_backend(request.param)
    try:
        yield request.param
    finally:
        fd._core.set_backend(previous)


@pytest.fixture(params=["sparse", "dense"])
def gemm_path(request):
    """Force the GEMM path (on a backend with the sparse path; elsewhere both are dense)."""
    fd._core.set_gemm_path(request.param)
    try:
        yield request.param
    finally:
        fd._core.set_gemm_path(os.environ.get("FASTDROPOUT_GEMM_PATH") or "auto")


@pytest.fixture(params=["dot", "float32"])
def bf16_gemm(request):
    """Force the bfloat16 GEMM kernel: the dot-product one (where the backend has it and the CPU
    the instruction; elsewhere both are the float32 kernels) or the float32 one."""
    fd._core.set_bf16_gemm(request.param)
    try:
        yield request.param
    finally:
        fd._core.set_bf16_gemm(os.environ.get("FASTDROPOUT_BF16_GEMM") or "auto")


@pytest.fixture(params=["native", "python"])
def torch_route(request):
    """Run the test through each route of fastdropout.torch's eager layer: the C++ autograd
    function (fastdropout/_torch_native.py, built on first use) and the Python one.  The
    native route is skipped only where it cannot be built (no compiler or ninja) and
    FASTDROPOUT_TORCH_NATIVE is not 1."""
    from fastdropout import _torch_native

    if request.param == "native" and _torch_native.module() is None:
        pytest.skip(f"fastdropout's C++ torch layer: {_torch_native.status()}")
    previous = _torch_native.set_enabled(request.param == "native")
    try:
        yield request.param
    finally:
        _torch_native.set_enabled(previous)


def pytest_report_header(config):
    return (
        f"fastdropout {fd.__version__} from {os.path.dirname(fd.__file__)}; backend {fd.backend()}; "
        f"testing backends {', '.join(BACKENDS)}; cpu: {fd._core.cpu_features()} {fd._core.cpu_id()}; "
        f"gemm path: {fd._core.gemm_path()[1]}; bfloat16 gemm: {fd._core.bf16_gemm()[1]}"
    )


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    """Run the test with 1, 2 and 3 worker threads, then restore the previous count."""
    previous = fd.get_num_threads()
    fd.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        fd.set_num_threads(previous)


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-examples", type=int, default=None, metavar="N",
        help="tests/test_fuzz.py: run each fuzz test with N examples per backend from a fixed "
        "hypothesis seed (FASTDROPOUT_FUZZ_SEED, default 20240606) instead of the default count",
    )


def pytest_configure(config):
    n = config.getoption("--fuzz-examples")
    if n is not None:
        if n < 1:
            raise pytest.UsageError(f"--fuzz-examples must be >= 1, got {n}")
        os.environ["FASTDROPOUT_FUZZ_EXAMPLES"] = str(n)


def pytest_terminal_summary(terminalreporter):
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", None)
        if isinstance(name, str) and name.rpartition(".")[2] == "test_fuzz" and getattr(module, "CASES", None):
            terminalreporter.write_sep("-", "fuzz")
            terminalreporter.write_line(module.summary_line())
