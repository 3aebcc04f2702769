"""Shared fixtures: the backends to parametrise over, and GPU skipping that never fails on a CPU box."""
import numpy as np
import pytest

import arraybn
from arraybn.backends import BackendUnavailableError


def _cupy_reason():
    try:
        arraybn.get_backend("cupy")
    except BackendUnavailableError as exc:
        return str(exc)
    return None


CUPY_SKIP = _cupy_reason()
CPU_BACKENDS = [name for name in ("numpy", "numba") if name in arraybn.available_backends()]
ALL_BACKENDS = CPU_BACKENDS + [pytest.param("cupy", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if CUPY_SKIP is None:
        return
    skip = pytest.mark.skip(reason=f"no usable CUDA GPU: {CUPY_SKIP}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend usable here (cupy only where a CUDA GPU works)."""
    return arraybn.get_backend(request.param)


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    return arraybn.get_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def to_backend(be, *arrays):
    """Move NumPy arrays onto ``be``'s device (no-op on CPU backends)."""
    out = tuple(be.xp.asarray(a) if a is not None else None for a in arrays)
    return out if len(out) > 1 else out[0]


def to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)
