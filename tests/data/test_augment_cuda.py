"""The CuPy augmentation kernel (``cuda/augment_kernels.cu``) on the CPU.

- NVRTC (``libnvrtc.so.12`` of the ``test`` extra; skipped when absent) compiles both
  instantiations with the backend's options for sm_90 without spills, and the PTX has no FMA:
  the products and sums are rounded one by one, as NumPy rounds them.
- The kernel compiled as host C++ with CUDA's built-ins emulated (the emulator of
  ``tests/core/test_cupy_backend.py``), driven through ``CupyAugmentKernels`` and a fake CuPy,
  equals the NumPy reference bit for bit; every launch matches the kernel's signature.
What only a GPU shows (the device's own arithmetic, NVRTC's binary running, speed) is checked
by the ``cupy`` cases of ``test_augment_kernels.py`` (``gpu`` marker).
"""
import ctypes
import importlib.resources
import re
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

from arraybn.backends import cuda_build
from arraybn.backends import cupy_augment as ca
from arraybn.data import apply_transforms, draw_transforms
from tests.core import nvrtc_ctypes
from tests.core.cuda_fakes import _array_functions, _FakeArray, _FakeKernel, _FakeNVRTC
from tests.core.test_cupy_backend import (_EMULATOR_PRELUDE, _check_launch, _Emulator,
                                          _kernel_params, spills)
from tests.data.test_augment_kernels import CASES, SHAPES, _images, _reference

NVRTC = nvrtc_ctypes.load()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason="libnvrtc is not installed (pip install "
                                                        "nvidia-cuda-nvrtc-cu12)")


def test_kernel_source_ships_in_the_package():
    source = importlib.resources.files("arraybn.cuda").joinpath(ca.KERNEL_FILE).read_text()
    assert source == ca.kernel_source()
    assert re.search(r"\baugment_affine_crop\(", source)
    assert not re.search(r"^\s*#\s*include", source, re.M), "NVRTC compiles the file alone"
    assert f"#define AUG_MAX_THREADS {ca.THREADS}" in source


def _compile(options, kind, source=None):
    return cuda_build.compile_source(NVRTC, source or ca.kernel_source(), ca.NAME_EXPRESSIONS,
                                     options, kind, ca.KERNEL_FILE)


@needs_nvrtc
def test_nvrtc_compiles_both_instantiations_for_sm90_without_spills():
    image = _compile(cuda_build.OPTIONS + ("-arch=sm_90", "--ptxas-options=-v"), "cubin")
    assert image.data[:4] == b"\x7fELF"
    compiled = set(re.findall(r"Function properties for (\S+)", image.log))
    assert compiled == {image.lowered[name] for name in ca.NAME_EXPRESSIONS}
    assert spills(image.log) == {}, image.log


@needs_nvrtc
def test_no_fma_contraction_in_the_generated_code():
    ptx = _compile(cuda_build.OPTIONS + ("-arch=compute_90",), "ptx").data.decode()
    assert "mul.rn.f64" in ptx and "mul.rn.f32" in ptx
    assert "fma." not in ptx and ".ftz" not in ptx
    plain = re.sub(r"return __[df](mul|add)_rn\(a, b\);",
                   lambda m: "return a * b;" if m.group(1) == "mul" else "return a + b;",
                   ca.kernel_source())
    assert "fma.rn" in _compile(cuda_build.OPTIONS + ("-arch=compute_90",), "ptx",
                                plain).data.decode()          # what -fmad=true would do


# ---------------------------------------------------------------------------------------------
# The kernel on the CPU

_HOST_INTRINSICS = r"""
static double __dmul_rn(double a, double b) { return a * b; }
static double __dadd_rn(double a, double b) { return a + b; }
static float __fmul_rn(float a, float b) { return a * b; }
static float __fadd_rn(float a, float b) { return a + b; }
"""


class _AugmentEmulator(_Emulator):
    """augment_kernels.cu as a host shared library (no FMA contraction on the host either)."""

    def __init__(self, directory):
        source = ca.kernel_source()
        self.names = ca.NAME_EXPRESSIONS
        self.params = {name: _kernel_params(source, name) for name in self.names}
        wrappers = [self._wrapper(i, name) for i, name in enumerate(self.names)]
        cpp = directory / "augment_emulated.cpp"
        cpp.write_text(_EMULATOR_PRELUDE + _HOST_INTRINSICS + source + "\n".join(wrappers))
        library = directory / "augment_emulated.so"
        subprocess.run(["g++", "-O1", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC",
                        "-o", str(library), str(cpp)], check=True, capture_output=True,
                       timeout=300)
        self.library = ctypes.CDLL(str(library))


class _AugmentNVRTC(_FakeNVRTC):
    """The fake NVRTC of the BN kernels' tests, for this source and its name expressions."""

    def createProgram(self, source, name, headers, include_names):
        assert source == ca.kernel_source() and name == ca.KERNEL_FILE
        return 1

    def addNameExpression(self, prog, name):
        assert name in ca.NAME_EXPRESSIONS


def _fake_cupy(launches, emulator):
    def raw_module(path):
        assert Path(path).read_bytes() == _FakeNVRTC.CUBIN

        def get_function(symbol):
            name = symbol.removeprefix("lowered:")
            assert name in ca.NAME_EXPRESSIONS, symbol
            return _FakeKernel(name, launches, emulator)
        return types.SimpleNamespace(get_function=get_function)

    cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0),
                                 Device=lambda d: types.SimpleNamespace(compute_capability="90"))
    return types.SimpleNamespace(ndarray=_FakeArray, RawModule=raw_module, cuda=cuda,
                                 **_array_functions())


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    return _AugmentEmulator(tmp_path_factory.mktemp("augment_emulator"))


@pytest.fixture
def launches():
    return []


@pytest.fixture
def kernels(emulator, launches, tmp_path):
    return ca.CupyAugmentKernels(_fake_cupy(launches, emulator), _AugmentNVRTC(), tmp_path)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_equals_the_numpy_reference(kernels, launches, rng, case, dtype, shape):
    images = _images(rng, shape, dtype)
    transforms = draw_transforms(shape[0], shape[2], shape[3], np.random.default_rng(7),
                                 CASES[case])
    got = kernels.affine_crop(_FakeArray(images), transforms.inverse, transforms.offset,
                              transforms.window_shifts(), -0.42)
    assert isinstance(got, _FakeArray) and got.dtype == dtype
    np.testing.assert_array_equal(got.a, _reference(images, transforms, -0.42))
    source = ca.kernel_source()
    for name, grid, block, args in launches:
        _check_launch(source, name, grid, block, args)
    assert [name for name, *_ in launches] == [f"augment_affine_crop<{ca.C_TYPES[images.dtype]}>"]


def test_a_grid_smaller_than_the_pixels_strides_over_them(kernels, launches, rng, monkeypatch):
    monkeypatch.setattr(ca, "MAX_BLOCKS", 3)
    images = _images(rng, (9, 2, 11, 10), np.float32)
    transforms = draw_transforms(9, 11, 10, np.random.default_rng(3), CASES["affine+crop"])
    got = kernels.affine_crop(_FakeArray(images), transforms.inverse, transforms.offset,
                              transforms.window_shifts(), 0.5)
    assert launches[0][1] == (3,)
    np.testing.assert_array_equal(got.a, _reference(images, transforms, 0.5))


def test_an_empty_batch_launches_nothing(kernels, launches):
    empty = np.zeros((0, 2))
    out = kernels.affine_crop(_FakeArray(np.zeros((0, 1, 4, 4), np.float32)),
                              np.zeros((0, 2, 2)), empty, empty, 0.0)
    assert out.shape == (0, 1, 4, 4) and launches == []


@pytest.mark.parametrize("images, error, message", [
    (np.zeros((2, 1, 4, 4), np.float32), TypeError, r"must be a cupy.ndarray.*cupy.asarray"),
    (_FakeArray(np.zeros((2, 4, 4), np.float32)), ValueError, r"shape \(N, C, H, W\)"),
    (_FakeArray(np.zeros((2, 1, 4, 4), np.int32)), TypeError, r"float32 or float64, got int32"),
], ids=["host array", "3-d", "int32"])
def test_bad_images_are_clear_errors(kernels, launches, images, error, message):
    identity, zeros = np.tile(np.eye(2), (2, 1, 1)), np.zeros((2, 2))
    with pytest.raises(error, match=message):
        kernels.affine_crop(images, identity, zeros, zeros, 0.0)
    assert launches == []


def test_the_trainers_host_batch_goes_to_the_device_and_through_the_kernel(kernels, launches,
                                                                           rng):
    """apply_transforms on a CuPy backend: the host batch is copied to the device, augmented
    there, and stays there for the forward pass."""
    backend = types.SimpleNamespace(xp=kernels.xp, augment_ops=lambda: kernels)
    images = _images(rng, (8, 1, 12, 12), np.float32)
    transforms = draw_transforms(8, 12, 12, np.random.default_rng(5), CASES["affine+crop"])
    got = apply_transforms(images, transforms, -0.3, backend)
    assert isinstance(got, _FakeArray) and len(launches) == 1
    np.testing.assert_array_equal(got.a, _reference(images, transforms, -0.3))
