"""Backend registry: pick the array module and the fused BN kernels.

Backends are imported only when asked for, so ``import arraybn`` never imports Numba or CuPy.
A CuPy array is recognised by its type's module name, without importing CuPy.
"""
import importlib
import os

from arraybn.backends.base import Backend, BackendUnavailableError
from arraybn.errors import ConfigError

_MODULES = {
    "numpy": "arraybn.backends.numpy_backend",
    "numba": "arraybn.backends.numba_backend",
    "cupy": "arraybn.backends.cupy_backend",
}
BACKEND_NAMES = tuple(_MODULES)
_AUTO_ORDER = ("cupy", "numba", "numpy")
_instances = {}     # name -> backend, or the BackendUnavailableError its create() raised

__all__ = ["Backend", "BackendUnavailableError", "BACKEND_NAMES", "get_backend",
           "available_backends", "backend_for"]


def _load(name):
    """The backend ``name``, created once per process; so is the verdict that it is unavailable
    (probing for a GPU costs ~50 us, too much to repeat on every ``auto`` call)."""
    if name not in _instances:
        try:
            _instances[name] = _create(name)
        except BackendUnavailableError as exc:
            _instances[name] = exc
    found = _instances[name]
    if isinstance(found, BackendUnavailableError):
        raise BackendUnavailableError(str(found))
    return found


def _create(name):
    try:
        module = importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name != _MODULES[name]:
            raise
        raise BackendUnavailableError(f"backend {name!r} is missing from this installation "
                                      "of arraybn; reinstall it") from exc
    return module.create()  # raises BackendUnavailableError with the reason


def available_backends():
    """Names of the backends that work on this machine, in registry order."""
    names = []
    for name in BACKEND_NAMES:
        try:
            _load(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def get_backend(name="auto"):
    """Return the backend called ``name`` ('numpy', 'numba', 'cupy' or 'auto').

    'auto' honours the environment variable ARRAYBN_BACKEND, else picks cupy if a CUDA GPU
    works, else numba, else numpy. A backend object passes through unchanged.
    """
    if isinstance(name, Backend):
        return name
    if name is None or name == "auto":
        forced = os.environ.get("ARRAYBN_BACKEND", "").strip().lower()
        if forced and forced != "auto":
            return get_backend(forced)
        for candidate in _AUTO_ORDER:
            try:
                return _load(candidate)
            except BackendUnavailableError:
                continue
        raise BackendUnavailableError("no backend works here; is NumPy installed?")
    if not isinstance(name, str) or name.lower() not in _MODULES:
        raise ConfigError(f"unknown backend {name!r}; choose one of "
                         f"{', '.join(BACKEND_NAMES)} or 'auto'")
    return _load(name.lower())


def is_cupy_array(x):
    return type(x).__module__.split(".")[0] == "cupy"


def backend_for(x, backend=None):
    """The backend to run ``x`` on: the one named, else cupy for a CuPy array, else the default.

    A NumPy array never goes to the cupy backend implicitly: when 'auto' would pick cupy, it
    runs on the best CPU backend instead.
    """
    if backend is not None:
        found = _instances.get(backend) if isinstance(backend, str) else None
        if found is None or isinstance(found, BackendUnavailableError):
            return get_backend(backend)
        return found                                  # the usual case: created already
    if is_cupy_array(x):
        return get_backend("cupy")
    forced = os.environ.get("ARRAYBN_BACKEND", "")
    found = _cpu_defaults.get(forced)
    if found is None:        # resolved once per value of the override: BN calls come by the 1000
        found = _cpu_defaults[forced] = _cpu_default()
    return found


_cpu_defaults = {}          # ARRAYBN_BACKEND value -> the CPU backend backend_for picks


def _cpu_default():
    default = get_backend("auto")
    if default.name != "cupy":
        return default
    for candidate in ("numba", "numpy"):
        try:
            return _load(candidate)
        except BackendUnavailableError:
            continue
    raise BackendUnavailableError("no CPU backend works here; is NumPy installed?")
