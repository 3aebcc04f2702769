"""A fake CuPy (and NVRTC) over NumPy, for driving the cupy backend on the CPU.

``_fake_gpu_module`` records every kernel launch (and runs it on the emulator of
test_cupy_backend when one is given); ``_FakeNVRTC`` checks that the backend compiles with
exactly cuda_build.OPTIONS and returns a placeholder binary that the fake RawModule loads.
"""
import types
from pathlib import Path

import numpy as np

from arraybn.backends import cuda_build
from arraybn.backends import cupy_backend as cb


class _FakeArray:
    """Just enough of cupy.ndarray for the backend's checks, over a NumPy array."""

    def __init__(self, a):
        self.a = a
        self.shape, self.dtype, self.ndim, self.size = a.shape, a.dtype, a.ndim, a.size
        self.strides, self.flags = a.strides, types.SimpleNamespace(c_contiguous=a.flags.c_contiguous)
        self.data = types.SimpleNamespace(ptr=a.__array_interface__["data"][0])
        self.device = types.SimpleNamespace(id=0)

    def __getitem__(self, index):
        return _FakeArray(self.a[index])

    def fill(self, value):
        self.a.fill(value)

    def get(self):
        return self.a.copy()                # a copy on the host, as cupy.ndarray.get()


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
        ndarray=_FakeArray, RawModule=raw_module,
        cuda=types.SimpleNamespace(runtime=runtime, driver=driver, Device=device),
        empty=lambda shape, dtype: _FakeArray(np.empty(shape, dtype)),
        zeros=lambda shape, dtype: _FakeArray(np.zeros(shape, dtype)),
        empty_like=lambda x: _FakeArray(np.empty_like(x.a)),
        may_share_memory=lambda a, b: np.may_share_memory(a.a, b.a))


def _fake_backend(tmp_path, launches, emulator=None):
    return cb.CupyBackend(_fake_gpu_module(launches, emulator), _FakeNVRTC(), cache_dir=tmp_path)
