"""Kernel-level tests of the cupy backend.

CPU-side (run everywhere): the CUDA sources ship in the package and compile with nvcc for sm_90
with exactly the instantiations the backend asks for; a missing CuPy / device / driver is a
BackendUnavailableError that says what to do; every launch matches its kernel's signature; the
kernels, compiled as host C++ with CUDA's built-ins emulated, agree with the NumPy backend.
GPU-side (``gpu`` marker, skipped without CUDA): the four kernels against float64 NumPy.
"""
import ctypes
import importlib.resources
import importlib.util
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import arraybn
from arraybn import backends
from arraybn.backends import BackendUnavailableError
from arraybn.backends import cuda_build
from arraybn.backends import cupy_backend as cb
from tests.benchmark_scripts import load_benchmark
from tests.conftest import CUPY_SKIP
from tests.core.cuda_fakes import _FakeArray, _fake_backend
from tests.reference import moments as _ref_moments

DTYPES = [np.float32, np.float64]


# ---------------------------------------------------------------------------------------------
# Sources and compilation

def _kernel_base(name):
    return name.split("<")[0]


def test_kernel_source_ships_in_the_package():
    source = importlib.resources.files("arraybn.cuda").joinpath(cb.KERNEL_FILE).read_text()
    assert source == cb.kernel_source()
    for name in {_kernel_base(n) for n in cb.NAME_EXPRESSIONS} | set(cb.EXTERN_C_KERNELS):
        assert re.search(rf"\b{name}\(", source), f"kernel {name} missing from {cb.KERNEL_FILE}"
    assert not re.search(r"^\s*#\s*include", source, re.M), "NVRTC compiles the file alone"


def test_name_expressions_cover_every_dtype_vector_and_layout():
    assert len(set(cb.NAME_EXPRESSIONS)) == len(cb.NAME_EXPRESSIONS) == 32
    assert "bn_moments_rows<float,4>" in cb.NAME_EXPRESSIONS
    assert "bn_affine<double,2,false>" in cb.NAME_EXPRESSIONS
    assert "bn_backward_cols<double>" in cb.NAME_EXPRESSIONS


def spills(ptxas_log):
    """{kernel: (spill store bytes, spill load bytes)} for every kernel that spills, from the
    output of ``ptxas -v`` (nvcc -Xptxas -v, or NVRTC --ptxas-options=-v)."""
    found = {}
    for name, stores, loads in re.findall(
            r"Function properties for (\S+)\s*\n(?:ptxas\s+\.\s+)?\s*\d+ bytes stack frame, "
            r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log):
        if int(stores) or int(loads):
            found[name] = (int(stores), int(loads))
    return found


def test_spill_parser_reads_nvcc_and_nvrtc_logs():
    nvcc = ("ptxas info    : Function properties for _Z9bn_affineIfLi4ELb0EEvPKT_xxxPKdS4_S4_PS0_\n"
            "    40 bytes stack frame, 76 bytes spill stores, 100 bytes spill loads\n"
            "ptxas info    : Function properties for bn_merge_moments\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    nvrtc = ("ptxas info    : Function properties for _Z9bn_affineIfLi4ELb0EE\n"
             "ptxas         .     0 bytes stack frame, 8 bytes spill stores, 0 bytes spill loads\n")
    assert spills(nvcc) == {"_Z9bn_affineIfLi4ELb0EEvPKT_xxxPKdS4_S4_PS0_": (76, 100)}
    assert spills(nvrtc) == {"_Z9bn_affineIfLi4ELb0EE": (8, 0)}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_kernels_compile_for_sm90_with_the_backend_instantiations_and_do_not_spill(tmp_path):
    with importlib.resources.as_file(
            importlib.resources.files("arraybn.cuda").joinpath(cb.KERNEL_FILE)) as source:
        table = ",\n".join(f"  (void*)&{name}" for name in cb.NAME_EXPRESSIONS + cb.EXTERN_C_KERNELS)
        wrapper = tmp_path / "instantiate.cu"
        wrapper.write_text(f'#include "{source}"\nvoid* arraybn_kernels[] = {{\n{table}\n}};\n')
        result = subprocess.run(
            ["nvcc", "-arch=sm_90", "-cubin", *cuda_build.OPTIONS, "-Xptxas", "-v",
             "-o", str(tmp_path / "bn.cubin"), str(wrapper)],
            capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "warning" not in log.lower(), log
    compiled = re.findall(r"Function properties for (\S+)", log)
    assert len(compiled) == len(cb.NAME_EXPRESSIONS) + len(cb.EXTERN_C_KERNELS), compiled
    for name in cb.EXTERN_C_KERNELS:
        assert name in compiled
    for base in {_kernel_base(n) for n in cb.NAME_EXPRESSIONS}:
        wanted = sum(_kernel_base(n) == base for n in cb.NAME_EXPRESSIONS)
        assert sum(f"{len(base)}{base}I" in c for c in compiled) == wanted, base
    assert spills(log) == {}, log


# ---------------------------------------------------------------------------------------------
# Availability

@pytest.fixture
def fresh_registry(monkeypatch):
    """Forget any cupy backend created earlier, so get_backend('cupy') runs create() again."""
    monkeypatch.delitem(backends._instances, "cupy", raising=False)


def test_missing_cupy_is_a_clear_unavailable_error(monkeypatch, fresh_registry):
    monkeypatch.setitem(sys.modules, "cupy", None)          # `import cupy` raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"CuPy is not installed.*arraybn\[gpu\]"):
        arraybn.get_backend("cupy")
    assert "cupy" not in arraybn.available_backends()


@pytest.mark.skipif(CUPY_SKIP is None, reason="a CUDA GPU works here")
def test_available_backends_omits_cupy_without_a_gpu():
    assert "cupy" not in arraybn.available_backends()
    assert arraybn.available_backends()[0] == "numpy"


def _fake_cupy(device_count=1, probe_error=None):
    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    def arange(n):
        if probe_error is not None:
            raise probe_error
        raise AssertionError("the probe should not run when no device is visible")

    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime), arange=arange)


@pytest.mark.parametrize("fake, message", [
    (_fake_cupy(device_count=0), "no CUDA device is visible"),
    (_fake_cupy(device_count=RuntimeError("cudaErrorInsufficientDriver")),
     "CUDA driver/runtime failed: cudaErrorInsufficientDriver"),
    (_fake_cupy(probe_error=OSError("libnvrtc.so.12: cannot open shared object file")),
     "does not run CuPy kernels: libnvrtc.so.12.*NVRTC"),
], ids=["no-device", "driver-error", "nvrtc-missing"])
def test_unusable_cuda_is_a_clear_unavailable_error(monkeypatch, fresh_registry, fake, message):
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendUnavailableError, match=message):
        cb.create()


def _load_cuda_benchmark():
    return load_benchmark("bn_kernels_cuda")


@pytest.mark.skipif(CUPY_SKIP is None, reason="a CUDA GPU works here: the benchmark would run")
def test_cuda_benchmark_parses_its_options_and_says_what_it_needs():
    benchmark = _load_cuda_benchmark()
    args = benchmark.parse_args(["--shapes", "128x6x26x26,1024x120", "--threads", "2"])
    assert args.shapes == [(128, 6, 26, 26), (1024, 120)]
    with pytest.raises(SystemExit, match=r"needs the cupy backend.*arraybn\[gpu\]"):
        benchmark.main(["--repeats", "1"])


# ---------------------------------------------------------------------------------------------
# Launch geometry

def test_small_rows_use_the_cols_layout_and_vectors_need_alignment():
    assert cb.reduction_plan(128, 120, 1, 4, True, 1056).layout == "cols"
    assert cb.reduction_plan(128, 16, 121, 4, True, 1056).vec == 1          # 121 % 4 != 0
    assert cb.reduction_plan(128, 6, 676, 4, True, 1056).vec == 4
    assert cb.reduction_plan(128, 6, 676, 4, False, 1056).vec == 1
    assert cb.reduction_plan(128, 6, 676, 8, True, 1056).vec == 2
    assert cb.elementwise_vec(676, 4, True) == 4 and cb.elementwise_vec(121, 4, True) == 1


# ---------------------------------------------------------------------------------------------
# Every launch, recorded by a fake CuPy on the CPU, against the kernel signatures in the .cu:
# CuPy does not check kernel arguments, so a wrong count or type would be silent garbage.

_POINTER_TYPES = {"float": np.float32, "double": np.float64, "int": np.int32}


def _kernel_params(source, name):
    """[(kind, dtype)] of kernel ``name``'s parameters: kind 'pointer' or 'scalar'; a pointer to
    a template type parameter (T, RM, RV) takes the type that ``name`` instantiates it with."""
    base, _, template = name.partition("<")
    found = re.search(rf'(?:template <([^>]*)>\s*)?(?:extern "C" )?__global__ void '
                      rf'__launch_bounds__\([^)]*\)\s*{base}\(([^)]*)\)\s*{{', source)
    declared, params = found.group(1), found.group(2)
    type_of = dict(_POINTER_TYPES)
    if declared:
        for param, arg in zip(declared.split(","), template.rstrip(">").split(",")):
            kind, param_name = param.split()
            if kind == "typename":
                type_of[param_name] = _POINTER_TYPES[arg.strip()]
    scalars = {"long long": np.int64, "int": np.int32, "double": np.float64}
    kinds = []
    for param in params.split(","):
        words = param.replace("*", " * ").replace("const", "").replace("__restrict__", "").split()
        if "*" in words:
            kinds.append(("pointer", type_of[words[0]]))
        else:
            kinds.append(("scalar", scalars[" ".join(words[:-1])]))
    return kinds


def _check_launch(source, name, grid, block, args):
    params = _kernel_params(source, name)
    assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
    for position, ((kind, dtype), arg) in enumerate(zip(params, args)):
        where = f"{name} argument {position}"
        if kind == "pointer":
            assert isinstance(arg, _FakeArray) and arg.dtype == dtype, where
            assert arg.flags.c_contiguous, where
        else:
            assert type(arg) is dtype, f"{where}: {type(arg).__name__}, not {dtype.__name__}"
    assert 0 < block[0] <= cb.MAX_THREADS and len(block) == 1
    assert all(g > 0 for g in grid) and (len(grid) == 1 or grid[1] <= 65535)


def _run_all_kernels(backend, rng, shape, dtype, misaligned):
    n, c, m = shape
    size = n * c * m
    buffers = [np.empty(size + 1, dtype)[1:] if misaligned else np.empty(size, dtype)
               for _ in range(3)]
    x, gy, out = (_FakeArray(b.reshape(shape)) for b in buffers)
    x.a[...], gy.a[...] = rng.standard_normal(shape), rng.standard_normal(shape)
    ch = _FakeArray(np.ones(c))
    backend.moments(x)
    backend.forward_train(x, ch, ch, 1e-5, center_only=True, out=out)
    backend.affine(x, ch, ch)
    backend.backward(gy, x, ch, ch, ch, centered=False)
    for rm_dtype in DTYPES:
        for rv_dtype in DTYPES:
            rm, rv = _FakeArray(np.zeros(c, rm_dtype)), _FakeArray(np.ones(c, rv_dtype))
            backend.forward_train_finish(x, ch, ch, 1e-5, False, 0.1, rm, rv)
            backend.finish_statistics(ch, ch, 1e-5, 0.1, 10, rm, rv)
            backend.inference_coefficients(ch, ch, rm, rv, 1e-5, None)
    backend.forward_train_finish(x, ch, ch, 1e-5, True, 0.1, _FakeArray(np.zeros(c)), None)


def test_every_launch_matches_its_kernel_signature(tmp_path, rng):
    launches = []
    backend = _fake_backend(tmp_path, launches)
    source = cb.kernel_source()
    for shape in [(16, 6, 676), (5, 3, 121), (256, 7, 1), (3, 5, 7), (2, 1, 1), (4, 2, 64)]:
        for dtype in DTYPES:
            for misaligned in (False, True):
                _run_all_kernels(backend, rng, shape, dtype, misaligned)
    for name, grid, block, args in launches:
        _check_launch(source, name, grid, block, args)
    assert {name for name, *_ in launches} == set(cb.NAME_EXPRESSIONS) | set(cb.EXTERN_C_KERNELS)


def test_fake_launch_check_catches_a_wrong_argument_list(rng):
    source = cb.kernel_source()
    x = _FakeArray(np.ones((2, 3, 4), np.float32))
    part = _FakeArray(np.ones((3, 5)))
    good = (x, np.int64(2), np.int64(12), np.int32(12), np.int32(1), np.int64(2), part, np.int64(5))
    _check_launch(source, "bn_moments_cols<float>", (1, 1), (12,), good)
    with pytest.raises(AssertionError, match="9 arguments for 8"):
        _check_launch(source, "bn_moments_cols<float>", (1, 1), (12,), good[:3] + good[2:])
    with pytest.raises(AssertionError, match="argument 3: int64, not int32"):
        _check_launch(source, "bn_moments_cols<float>", (1, 1), (12,),
                      good[:3] + (np.int64(12),) + good[4:])


# ---------------------------------------------------------------------------------------------
# The kernels themselves, run on the CPU: bn_kernels.cu compiled as host C++ with CUDA's built-ins
# emulated (one cooperative ucontext fiber per thread, __syncthreads = run every other thread of
# the block to the same barrier, in a shuffled order so that a race changes the result). This
# checks the kernels' index arithmetic, merges and barriers; it does not check what only a GPU
# shows (the memory model, NVRTC, speed).

_EMULATOR_PRELUDE = r"""
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
struct dim3 { unsigned x, y, z; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
struct float4 { float x, y, z, w; };
struct double2 { double x, y; };
static float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static double2 make_double2(double a, double b) { return {a, b}; }
using std::sqrt;
static std::vector<ucontext_t> fibers;
static std::vector<std::vector<char>> stacks;
static std::vector<char> finished;
static ucontext_t scheduler;
static unsigned current;
static std::function<void()> body;
static void __syncthreads() { swapcontext(&fibers[current], &scheduler); }
static void fiber_main() { body(); finished[current] = 1; }
static void launch(unsigned gx, unsigned gy, unsigned bx, std::function<void()> kernel) {
    body = kernel;
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    fibers.resize(bx);
    stacks.resize(bx, std::vector<char>(1 << 16));
    for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, 0};
        finished.assign(bx, 0);
        for (unsigned t = 0; t < bx; ++t) {
            getcontext(&fibers[t]);
            fibers[t].uc_stack.ss_sp = stacks[t].data();
            fibers[t].uc_stack.ss_size = stacks[t].size();
            fibers[t].uc_link = &scheduler;
            makecontext(&fibers[t], fiber_main, 0);
        }
        std::vector<unsigned> order(bx);
        std::iota(order.begin(), order.end(), 0u);
        std::minstd_rand shuffler(x + 7919u * y);
        while (std::count(finished.begin(), finished.end(), 0) > 0) {
            std::shuffle(order.begin(), order.end(), shuffler);     // any order: races show
            for (unsigned t : order) {
                if (finished[t]) continue;
                current = t;
                threadIdx = {t, 0, 0};
                swapcontext(&scheduler, &fibers[t]);
            }
        }
    }
}
"""
_C_TYPES = {np.int64: "long long", np.int32: "int", np.float64: "double"}
_CTYPES_SCALARS = {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.float64: ctypes.c_double}


class _Emulator:
    """bn_kernels.cu as a host shared library; ``launch`` mirrors a RawKernel call."""

    def __init__(self, directory):
        source = cb.kernel_source()
        self.names = cb.NAME_EXPRESSIONS + cb.EXTERN_C_KERNELS
        self.params = {name: _kernel_params(source, name) for name in self.names}
        wrappers = [self._wrapper(i, name) for i, name in enumerate(self.names)]
        cpp = directory / "emulated.cpp"
        cpp.write_text(_EMULATOR_PRELUDE + source + "\n".join(wrappers))
        library = directory / "emulated.so"
        subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-o", str(library),
                        str(cpp)], check=True, capture_output=True, timeout=300)
        self.library = ctypes.CDLL(str(library))

    def _wrapper(self, index, name):
        args = []
        for k, (kind, dtype) in enumerate(self.params[name]):
            if kind == "pointer":
                ctype = {np.float32: "float", np.float64: "double", np.int32: "int"}[dtype]
                args.append(f"*({ctype}**)a[{k}]")
            else:
                args.append(f"*({_C_TYPES[dtype]}*)a[{k}]")
        return (f'extern "C" void run_{index}(unsigned gx, unsigned gy, unsigned bx, void** a) '
                f'{{ launch(gx, gy, bx, [=] {{ {name}({", ".join(args)}); }}); }}\n')

    def launch(self, name, grid, block, args):
        values = [ctypes.c_void_p(arg.data.ptr) if kind == "pointer" else _CTYPES_SCALARS[dtype](arg)
                  for (kind, dtype), arg in zip(self.params[name], args)]
        argv = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        run = getattr(self.library, f"run_{self.names.index(name)}")
        run(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1] if len(grid) > 1 else 1),
            ctypes.c_uint(block[0]), argv)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The cupy backend with every kernel launch run by the CPU emulator."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    emulator = _Emulator(tmp_path_factory.mktemp("cuda_emulator"))
    return _fake_backend(tmp_path_factory.mktemp("kernel_cache"), [], emulator)


EMULATED_SHAPES = [(16, 6, 676), (5, 3, 121), (256, 7, 1), (3, 5, 7), (2, 1, 1), (40, 2, 64),
                   (700, 3, 2), (9, 300, 1)]


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EMULATED_SHAPES)
def test_emulated_kernels_match_the_numpy_backend(emulated, rng, shape, dtype, misaligned):
    n, c, m = shape
    size = n * c * m
    arrays = [np.empty(size + 1, dtype)[1:] if misaligned else np.empty(size, dtype)
              for _ in range(3)]
    x, gy, out = (_FakeArray(a.reshape(shape)) for a in arrays)
    x.a[...], gy.a[...] = rng.standard_normal(shape) + 1e3, rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    reference = arraybn.get_backend("numpy")
    tol = 2 * np.finfo(dtype).eps
    out.a[...] = np.nan
    y, mean, var = emulated.forward_train(x, _FakeArray(gamma), _FakeArray(beta), 1e-5, out=out)
    ref_mean, ref_var = reference.moments(x.a)
    np.testing.assert_allclose(mean.get(), ref_mean, rtol=1e-14)
    np.testing.assert_allclose(var.get(), ref_var, rtol=1e-9)
    # y from the kernel's own statistics (a last-bit change of a mean of 1e3 moves float64 y by
    # 1e-13), in the centred form the kernel uses: a * x + b would cancel at 1e3.
    a = gamma / np.sqrt(var.get() + 1e-5)
    ref_y = (a[:, None] * (x.a - mean.get()[:, None]) + beta[:, None]).astype(dtype)
    np.testing.assert_allclose(y.get(), ref_y, rtol=tol, atol=tol * np.abs(ref_y).max())
    scale, w = _FakeArray(a), _FakeArray(1 / (ref_var + 1e-5))
    for centered in (True, False):
        out.a[...] = np.nan
        gx, sum_gy, sum_gy_xc = emulated.backward(gy, x, mean, scale, w, centered, out=out)
        ref = reference.backward(gy.a, x.a, mean.get(), scale.a, w.a, centered)
        np.testing.assert_allclose(gx.get(), ref[0], rtol=tol, atol=tol * np.abs(ref[0]).max())
        np.testing.assert_allclose(sum_gy.get(), ref[1], rtol=1e-12, atol=1e-12 * size)
        np.testing.assert_allclose(sum_gy_xc.get(), ref[2], rtol=1e-9, atol=1e-12 * size)


# ---------------------------------------------------------------------------------------------
# GPU: the four kernels against float64 NumPy

SHAPES = [(16, 6, 676), (5, 3, 121), (256, 7, 1), (4096, 3, 1), (3, 5, 7), (64, 1, 100), (2, 1, 1),
          (64, 3, 1024), (20000, 5, 1), (33, 70, 4)]


@pytest.fixture
def gpu():
    return arraybn.get_backend("cupy")


def _close(actual, expected, dtype, scale=1.0):
    tol = 2 * np.finfo(dtype).eps
    np.testing.assert_allclose(actual.get(), expected, rtol=tol, atol=tol * scale)


def _data(rng, shape, dtype, offset=0.0):
    return (offset + rng.standard_normal(shape)).astype(dtype)


def _poisoned(cp, shape, dtype):
    return cp.full(shape, np.nan, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_moments_match_float64(gpu, rng, shape, dtype):
    x = _data(rng, shape, dtype, offset=3.0)
    mean, var = gpu.moments(gpu.xp.asarray(x))
    ref_mean, ref_var = _ref_moments(x)
    np.testing.assert_allclose(mean.get(), ref_mean, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(var.get(), ref_var, rtol=1e-13)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 6, 676), (20000, 3, 1), (5, 3, 121)])
def test_large_offset_float32_variance(gpu, rng, shape):
    x = _data(rng, shape, np.float32, offset=1e4)
    mean, var = gpu.moments(gpu.xp.asarray(x))
    ref_mean, ref_var = _ref_moments(x)
    assert np.isfinite(var.get()).all()
    np.testing.assert_allclose(mean.get(), ref_mean, rtol=1e-13)
    np.testing.assert_allclose(var.get(), ref_var, rtol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("center_only", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_train_matches_float64(gpu, rng, shape, dtype, center_only):
    cp, c = gpu.xp, shape[1]
    x = _data(rng, shape, dtype, offset=-2.0)
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.standard_normal(c)
    out = _poisoned(cp, shape, dtype)
    y, mean, var = gpu.forward_train(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), 1e-5,
                                     center_only, out=out)
    assert y is out
    ref_mean, ref_var = _ref_moments(x)
    np.testing.assert_allclose(mean.get(), ref_mean, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(var.get(), ref_var, rtol=1e-13)
    # y from the kernel's own statistics: in float64 a last-bit change of the mean moves y by
    # more than 2 ulp of y, so only the element-wise step is held to that.
    mean, var = mean.get(), var.get()
    a = gamma if center_only else gamma / np.sqrt(var + 1e-5)
    ref_y = a[None, :, None] * (x - mean[None, :, None]) + beta[None, :, None]
    _close(y, ref_y.astype(dtype), dtype, scale=np.abs(ref_y).max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_matches_float64(gpu, rng, shape, dtype):
    cp, c = gpu.xp, shape[1]
    x = _data(rng, shape, dtype)
    a, b = rng.standard_normal(c), rng.standard_normal(c)
    out = _poisoned(cp, shape, dtype)
    y = gpu.affine(cp.asarray(x), cp.asarray(a), cp.asarray(b), out=out)
    ref = a[None, :, None] * x.astype(np.float64) + b[None, :, None]
    _close(y, ref.astype(dtype), dtype, scale=np.abs(ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_float64(gpu, rng, shape, dtype, centered):
    cp, (n, c, m) = gpu.xp, shape
    x, gy = _data(rng, shape, dtype, offset=1.0), _data(rng, shape, dtype)
    mean = _ref_moments(x)[0]
    scale, w = rng.uniform(0.5, 2.0, c), rng.uniform(0.1, 1.0, c)
    out = _poisoned(cp, shape, dtype)
    gx, sum_gy, sum_gy_xc = gpu.backward(cp.asarray(gy), cp.asarray(x), cp.asarray(mean),
                                         cp.asarray(scale), cp.asarray(w), centered, out=out)
    g64, xc = gy.astype(np.float64), x.astype(np.float64) - mean[None, :, None]
    ref_sum_gy, ref_sum_gy_xc = g64.sum(axis=(0, 2)), (g64 * xc).sum(axis=(0, 2))
    if centered:
        ref_gx = scale[None, :, None] * (g64 - (ref_sum_gy / (n * m))[None, :, None]
                                         - (w * ref_sum_gy_xc / (n * m))[None, :, None] * xc)
    else:
        ref_gx = scale[None, :, None] * g64
    np.testing.assert_allclose(sum_gy.get(), ref_sum_gy, rtol=1e-10, atol=1e-10 * n * m)
    np.testing.assert_allclose(sum_gy_xc.get(), ref_sum_gy_xc, rtol=1e-10, atol=1e-10 * n * m)
    _close(gx, ref_gx.astype(dtype), dtype, scale=np.abs(ref_gx).max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_data_takes_the_scalar_path(gpu, rng, dtype):
    cp, shape = gpu.xp, (8, 4, 64)
    x = _data(rng, shape, dtype)
    buffer = cp.empty(x.size + 1, dtype=dtype)
    x_gpu = buffer[1:].reshape(shape)                      # contiguous, 16-byte misaligned
    x_gpu[...] = cp.asarray(x)
    mean, var = gpu.moments(x_gpu)
    np.testing.assert_allclose(var.get(), _ref_moments(x)[1], rtol=1e-11)
    a, b = cp.asarray(rng.standard_normal(4)), cp.asarray(rng.standard_normal(4))
    ref = a.get()[None, :, None] * x.astype(np.float64) + b.get()[None, :, None]
    _close(gpu.affine(x_gpu, a, b), ref.astype(dtype), dtype, scale=np.abs(ref).max())


@pytest.mark.gpu
def test_non_contiguous_input_is_rejected_by_every_kernel(gpu):
    cp = gpu.xp
    x = cp.ones((4, 3, 20), dtype=cp.float32)[:, :, ::2]
    ch = cp.ones(3, dtype=cp.float64)
    calls = [lambda: gpu.moments(x), lambda: gpu.forward_train(x, ch, ch, 1e-5),
             lambda: gpu.affine(x, ch, ch), lambda: gpu.backward(x, x, ch, ch, ch)]
    for call in calls:
        with pytest.raises(ValueError, match="must be C-contiguous.*ascontiguousarray"):
            call()


@pytest.mark.gpu
def test_bad_channel_arrays_and_outputs_are_rejected(gpu):
    cp = gpu.xp
    x = cp.ones((4, 3, 20), dtype=cp.float32)
    with pytest.raises(TypeError, match="a must be a float64"):
        gpu.affine(x, cp.ones(3, dtype=cp.float32), cp.ones(3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        gpu.affine(x, cp.ones(4), cp.ones(3))
    with pytest.raises(ValueError, match="must not overlap"):
        gpu.affine(x, cp.ones(3), cp.ones(3), out=x)
    with pytest.raises(ValueError, match="out must be"):
        gpu.affine(x, cp.ones(3), cp.ones(3), out=cp.empty((4, 3, 20), dtype=cp.float64))
