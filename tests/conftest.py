"""Shared fixtures: the backends to parametrise over, GPU skipping that never fails on a CPU box.

A test that takes the ``backend`` or ``cpu_backend`` fixture must run its BN calls on that backend:
an autouse spy records the backend every core call resolves and fails the test otherwise (a
forgotten ``backend=`` silently runs on the default backend, numba, under a ``[numpy]`` label).
"""
import numpy as np
import pytest

import arraybn
from arraybn.backends import BackendUnavailableError
from arraybn.backends.arrays import to_host  # noqa: F401  (tests import it from here)
from arraybn.core import batch_norm as core_batch_norm
from arraybn.core import population as core_population


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


class BackendSpy:
    """Records the name of every backend the BN core resolves (forward and estimators' update)."""

    MODULES = (core_batch_norm, core_population)

    def __init__(self, monkeypatch):
        self.used = []
        for module in self.MODULES:
            monkeypatch.setattr(module, "backend_for", self._recording(module.backend_for))

    def _recording(self, backend_for):
        def spy(x, backend=None):
            found = backend_for(x, backend)
            self.used.append(found.name)
            return found
        return spy

    def check(self, expected):
        strays = sorted(set(self.used) - {expected})
        if strays:
            pytest.fail(f"the test is parametrised with backend {expected!r} but its BN calls ran "
                        f"on {strays}; pass backend=backend.name", pytrace=False)


def _parametrised_backend(request):
    """The backend name a test is parametrised with (a fixture's backend or a plain name)."""
    for name in ("backend", "cpu_backend"):
        if name in request.fixturenames:
            value = request.getfixturevalue(name)
            return value if isinstance(value, str) else value.name
    return None


@pytest.fixture(autouse=True)
def bn_calls_run_on_the_parametrised_backend(request, monkeypatch):
    expected = _parametrised_backend(request)
    if expected is None:
        yield
        return
    spy = BackendSpy(monkeypatch)
    yield spy
    spy.check(expected)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tiny generated MNIST-format dataset (tests.stages.helpers.TINY), shared read-only."""
    from tests.stages.helpers import make_dataset
    return str(make_dataset(tmp_path_factory.mktemp("data")))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def to_backend(be, *arrays):
    """Move NumPy arrays onto ``be``'s device (no-op on CPU backends)."""
    out = tuple(be.xp.asarray(a) if a is not None else None for a in arrays)
    return out if len(out) > 1 else out[0]


@pytest.fixture
def chunk_threads(monkeypatch):
    """``chunk_threads(count)``: every convolution runs its chunks on ``count`` threads, however
    small (chunk threads, and Numba's threads up to its maximum, for the backend's kernels); the
    numbers of threads are restored afterwards."""
    from arraybn.experiments.process_pool import limit_threads
    from arraybn.nn import chunk_threads as module
    before = module.threads()

    def use(count):
        monkeypatch.setattr(module, "MIN_PARALLEL_FLOPS", 0)
        limit_threads(count)
    yield use
    limit_threads(before)
