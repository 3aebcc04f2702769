"""The backend registry: names, 'auto', the environment override, array ownership."""
import numpy as np
import pytest

import arraybn
from arraybn.backends import backend_for
from tests.conftest import BackendSpy


def test_numpy_is_always_available_and_cupy_only_with_a_gpu():
    names = arraybn.available_backends()
    assert names[0] == "numpy"
    assert set(names) <= {"numpy", "numba", "cupy"}


def test_backend_objects_expose_name_and_array_module():
    be = arraybn.get_backend("numpy")
    assert be.name == "numpy" and be.xp is np
    assert arraybn.get_backend(be) is be


def test_auto_prefers_compiled_backends(monkeypatch):
    monkeypatch.delenv("ARRAYBN_BACKEND", raising=False)
    expected = [n for n in ("cupy", "numba", "numpy") if n in arraybn.available_backends()][0]
    assert arraybn.get_backend("auto").name == expected


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("ARRAYBN_BACKEND", "numpy")
    assert arraybn.get_backend().name == "numpy"
    monkeypatch.setenv("ARRAYBN_BACKEND", "quantum")
    with pytest.raises(ValueError, match="unknown backend 'quantum'"):
        arraybn.get_backend("auto")


def test_numpy_arrays_run_on_a_cpu_backend(monkeypatch):
    monkeypatch.delenv("ARRAYBN_BACKEND", raising=False)
    assert backend_for(np.ones((2, 2))).name in ("numpy", "numba")
    assert backend_for(np.ones((2, 2)), "numpy").name == "numpy"


def test_the_default_follows_the_environment_variable_from_call_to_call(monkeypatch):
    x = np.ones((2, 2))
    monkeypatch.setenv("ARRAYBN_BACKEND", "numpy")
    assert backend_for(x).name == "numpy"
    monkeypatch.delenv("ARRAYBN_BACKEND")
    best = [n for n in ("numba", "numpy") if n in arraybn.available_backends()][0]
    assert backend_for(x).name == best
    monkeypatch.setenv("ARRAYBN_BACKEND", "quantum")
    with pytest.raises(ValueError, match="unknown backend 'quantum'"):
        backend_for(x)


def test_cupy_unavailable_is_a_readable_error_here():
    if "cupy" in arraybn.available_backends():
        pytest.skip("a CUDA GPU works here")
    # what is missing (CuPy, a CUDA device) and what to do (install it, check the driver)
    with pytest.raises(arraybn.BackendUnavailableError,
                       match=r"(?s)CuPy.*(pip install|nvidia-smi|driver)"):
        arraybn.get_backend("cupy")


@pytest.mark.gpu
def test_a_numpy_array_is_refused_by_the_cupy_backend_with_advice():
    with pytest.raises(TypeError, match="cupy.asarray"):
        arraybn.batch_norm_forward(np.ones((4, 2)), None, None, backend="cupy")


def test_an_unavailable_backend_is_probed_once_per_process(monkeypatch):
    from arraybn import backends
    from arraybn.backends import cupy_backend
    calls = []

    def create():
        calls.append(1)
        raise backends.BackendUnavailableError("no CUDA device is visible (test)")

    monkeypatch.delitem(backends._instances, "cupy", raising=False)
    monkeypatch.setattr(cupy_backend, "create", create)
    for _ in range(3):
        with pytest.raises(backends.BackendUnavailableError, match="no CUDA device is visible"):
            arraybn.get_backend("cupy")
    monkeypatch.setenv("ARRAYBN_BACKEND", "auto")
    assert arraybn.get_backend().name != "cupy"
    assert calls == [1]


def test_the_backend_spy_fails_a_test_whose_bn_calls_ran_on_another_backend(monkeypatch, rng):
    """The autouse spy of tests/conftest.py: every BN call of a backend-parametrised test must
    run on that backend (forward and the estimators' update both resolve one)."""
    spy = BackendSpy(monkeypatch)
    arraybn.batch_norm_forward(rng.normal(size=(4, 2)), None, None, backend="numpy")
    arraybn.ExactStatistics(backend="numpy").update(rng.normal(size=(4, 2)))
    assert spy.used == ["numpy", "numpy"]
    spy.check("numpy")
    with pytest.raises(pytest.fail.Exception, match=r"parametrised with backend 'numba' but its "
                                                    r"BN calls ran on \['numpy'\]"):
        spy.check("numba")
