"""A fake CuPy (and NVRTC) over NumPy, for driving the cupy backend on the CPU.

``_fake_gpu_module`` records every kernel launch (and runs it on the emulator of
test_cupy_backend when one is given); ``_FakeNVRTC`` checks that the backend compiles with
exactly cuda_build.OPTIONS and returns a placeholder binary that the fake RawModule loads.
``_FakeArray`` has enough of cupy.ndarray (its type lives in a module named cupy, operators,
reshape, astype) for the BN core to run on it, and within :func:`no_host_transfers` every
device-to-host transfer (``.get()``, ``bool()``, ``float()``, ``int()``, ``.item()``,
``__array__``, ``cupy.asnumpy``) raises: a CuPy call that would synchronise with the host.
"""
import contextlib
import types
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from arraybn.backends import cuda_build
from arraybn.backends import cupy_backend as cb

_transfers = {"forbidden": None}        # what is running while transfers are forbidden


class HostSyncError(AssertionError):
    """A device-to-host transfer where none may happen."""


@contextlib.contextmanager
def no_host_transfers(during):
    """Within the block, any device-to-host transfer of a _FakeArray raises HostSyncError."""
    outer, _transfers["forbidden"] = _transfers["forbidden"], during
    try:
        yield
    finally:
        _transfers["forbidden"] = outer


def _transfer(what):
    if _transfers["forbidden"] is not None:
        raise HostSyncError(f"{what}: a device-to-host transfer (host sync) during "
                            f"{_transfers['forbidden']}")


def _device(a):
    return a.a if isinstance(a, _FakeArray) else a


def _on_device(result):
    return _FakeArray(result) if isinstance(result, (np.ndarray, np.generic)) else result


class _FakeArray(NDArrayOperatorsMixin):
    """Enough of cupy.ndarray for the backend and the BN core, over a NumPy array."""

    def __init__(self, a):
        a = np.asarray(a)
        self.a = a
        self.shape, self.dtype, self.ndim, self.size = a.shape, a.dtype, a.ndim, a.size
        self.strides, self.flags = a.strides, types.SimpleNamespace(c_contiguous=a.flags.c_contiguous)
        self.data = types.SimpleNamespace(ptr=a.__array_interface__["data"][0])
        self.device = types.SimpleNamespace(id=0)

    def __getitem__(self, index):
        return _FakeArray(self.a[index])

    def __setitem__(self, index, value):
        self.a[index] = _device(value)

    def __len__(self):
        return len(self.a)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_device(o) for o in out)
        result = getattr(ufunc, method)(*(_device(i) for i in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _on_device(result)

    def fill(self, value):
        self.a.fill(value)

    def reshape(self, *shape):
        return _FakeArray(self.a.reshape(*shape))

    def astype(self, dtype, copy=True):
        return _FakeArray(self.a.astype(dtype, copy=copy))

    def copy(self):
        return _FakeArray(self.a.copy())

    def all(self):
        return _FakeArray(self.a.all())

    def argmax(self, axis=None):
        return _FakeArray(self.a.argmax(axis=axis))

    def get(self):
        _transfer("ndarray.get()")
        return self.a.copy()                # a copy on the host, as cupy.ndarray.get()

    def item(self):
        _transfer("ndarray.item()")
        return self.a.item()

    def __array__(self, dtype=None, copy=None):
        _transfer("ndarray.__array__")
        return self.a if dtype is None else self.a.astype(dtype)

    def __bool__(self):
        _transfer("bool(ndarray)")
        return bool(self.a)

    def __float__(self):
        _transfer("float(ndarray)")
        return float(self.a)

    def __int__(self):
        _transfer("int(ndarray)")
        return int(self.a)


_FakeArray.__module__ = "cupy._fake"     # how arraybn recognises a CuPy array


class _FakeKernel:
    """Records each launch; runs it on the CPU emulator when one is given."""

    def __init__(self, name, launches, emulator):
        self.name, self.launches, self.emulator = name, launches, emulator
        self.kernel = types.SimpleNamespace(ptr=id(self))

    def __call__(self, grid, block, args):
        self.launches.append((self.name, grid, block, args))
        if self.emulator is not None:
            self.emulator.launch(self.name, grid, block, args)


class _FakeNVRTC:
    """NVRTC as cuda_build calls it; checks the options and 'compiles' a placeholder binary."""
    CUBIN = b"fake cubin"

    def __init__(self):
        self.compiled = 0

    def getVersion(self):
        return (12, 9)

    def getSupportedArchs(self):
        return (80, 90)

    def createProgram(self, source, name, headers, include_names):
        assert source == cb.kernel_source()
        return 1

    def addNameExpression(self, prog, name):
        assert name in cb.NAME_EXPRESSIONS

    def compileProgram(self, prog, options):
        assert tuple(options) == cuda_build.OPTIONS + ("-arch=sm_90",)
        self.compiled += 1

    def getLoweredName(self, prog, name):
        return "lowered:" + name

    def getCUBIN(self, prog):
        return self.CUBIN

    def getProgramLog(self, prog):
        return ""

    def destroyProgram(self, prog):
        pass


def _fake_gpu_module(launches, emulator=None):
    def raw_module(path):
        assert Path(path).read_bytes() == _FakeNVRTC.CUBIN

        def get_function(symbol):
            name = symbol.removeprefix("lowered:")
            assert symbol.startswith("lowered:") == (name in cb.NAME_EXPRESSIONS), symbol
            assert name in cb.NAME_EXPRESSIONS + cb.EXTERN_C_KERNELS, f"{name} is not compiled"
            return _FakeKernel(name, launches, emulator)
        return types.SimpleNamespace(get_function=get_function)

    runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceProperties=lambda d: {
        "multiProcessorCount": 4})
    driver = types.SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=lambda f, t, s: 6)
    device = lambda d: types.SimpleNamespace(compute_capability="90")
    return types.SimpleNamespace(
        __name__="cupy", ndarray=_FakeArray, RawModule=raw_module,
        cuda=types.SimpleNamespace(runtime=runtime, driver=driver, Device=device),
        **_array_functions())


def _as_device_array(a, dtype=None):
    """cupy.asarray: a host array is copied to the device (no host sync); a device one kept."""
    if isinstance(a, _FakeArray):
        return a if dtype is None else a.astype(dtype, copy=False)
    return _FakeArray(np.array(a, dtype=dtype))


def _asnumpy(a):
    _transfer("cupy.asnumpy")
    return _device(a).copy()


def _array_functions():
    """The cupy functions the backend and the BN core call, over NumPy."""
    def on_device(function):
        return lambda *args, **kwargs: _on_device(
            function(*(_device(a) for a in args), **{k: _device(v) for k, v in kwargs.items()}))
    functions = {name: on_device(getattr(np, name)) for name in (
        "empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ascontiguousarray",
        "isfinite", "sqrt", "clip", "concatenate")}
    return dict(functions, asarray=_as_device_array, asnumpy=_asnumpy,
                may_share_memory=lambda a, b: np.may_share_memory(_device(a), _device(b)))


def _fake_backend(tmp_path, launches, emulator=None):
    return cb.CupyBackend(_fake_gpu_module(launches, emulator), _FakeNVRTC(), cache_dir=tmp_path)
