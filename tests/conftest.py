"""Shared fixtures: every test that touches a kernel runs on every backend this CPU has."""

from __future__ import annotations

import pytest

import fastdropout as fd

BACKENDS = fd.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force one kernel backend for the test, then restore the previous one."""
    previous = fd.backend()
    fd._core.set_backend(request.param)
    try:
        yield request.param
    finally:
        fd._core.set_backend(previous)


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    """Run the test with 1, 2 and 3 worker threads, then restore the previous count."""
    previous = fd.get_num_threads()
    fd.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        fd.set_num_threads(previous)
