"""Shared fixtures: every test that touches a kernel runs on every backend this CPU has."""

from __future__ import annotations

import os

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


def pytest_report_header(config):
    return (
        f"fastdropout {fd.__version__} from {os.path.dirname(fd.__file__)}; backend {fd.backend()}; "
        f"testing backends {', '.join(BACKENDS)}; cpu: {fd._core.cpu_features()}"
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
