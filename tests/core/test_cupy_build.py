"""The CuPy backend's kernel build (arraybn.backends.cuda_build), on the CPU.

With NVRTC alone (``libnvrtc.so.12`` from the pip package nvidia-cuda-nvrtc-cu12, in the ``test``
extra; skipped when absent): the kernels compile with exactly the backend's options, ptxas
reports no spill for sm_90, no flush-to-zero instruction is generated (CuPy's own compile path
appends -ftz=true, which would), and a broken source is a KernelBuildError with NVRTC's log.
With a fake NVRTC: the disk cache (one compile per key, corrupt entries ignored, unwritable
directory tolerated), the choice of cubin or PTX, and create() turning a failed build into
BackendUnavailableError that ``arraybn info`` shows.
"""
import re
import sys

import pytest
from click.testing import CliRunner

from arraybn import backends
from arraybn.backends import BackendUnavailableError
from arraybn.backends import cuda_build
from arraybn.backends import cupy_backend as cb
from tests.core import nvrtc_ctypes
from tests.core.cuda_fakes import _FakeNVRTC, _fake_gpu_module
from tests.core.test_cupy_backend import spills

NVRTC = nvrtc_ctypes.load()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason="libnvrtc is not installed (pip install "
                                                        "nvidia-cuda-nvrtc-cu12)")


def _compile(options, kind="cubin", source=None):
    return cuda_build.compile_source(NVRTC, source or cb.kernel_source(), cb.NAME_EXPRESSIONS,
                                     options, kind)


# ---------------------------------------------------------------------------------------------
# Real NVRTC

@needs_nvrtc
def test_nvrtc_compiles_every_kernel_for_sm90_with_the_backend_options_and_no_spill():
    arch, kind = cuda_build.target_for(90, NVRTC.getSupportedArchs())
    assert (arch, kind) == ("-arch=sm_90", "cubin")
    image = _compile(cuda_build.OPTIONS + (arch, "--ptxas-options=-v"))
    assert image.data[:4] == b"\x7fELF"
    compiled = set(re.findall(r"Function properties for (\S+)", image.log))
    assert compiled == set(image.lowered.values()) | set(cb.EXTERN_C_KERNELS)
    assert spills(image.log) == {}, image.log


@needs_nvrtc
def test_no_flush_to_zero_in_the_generated_code():
    ptx = _compile(cuda_build.OPTIONS + ("-arch=compute_90",), "ptx").data.decode()
    assert "cvt.f64.f32" in ptx                       # float32 data is widened...
    assert ".ftz" not in ptx                          # ...without flushing subnormals
    flushed = _compile(cuda_build.OPTIONS + ("-arch=compute_90", "-ftz=true"), "ptx").data.decode()
    assert "cvt.ftz.f64.f32" in flushed               # what CuPy's RawModule(code=...) gave


@needs_nvrtc
def test_a_source_nvrtc_rejects_is_a_build_error_with_its_log():
    broken = cb.kernel_source() + "\n__global__ void oops() { undefined_name = 1; }\n"
    with pytest.raises(cuda_build.KernelBuildError, match=r"(?s)-ftz=false.*undefined_name"):
        _compile(cuda_build.OPTIONS + ("-arch=sm_90",), source=broken)


@needs_nvrtc
def test_build_with_real_nvrtc_stores_a_loadable_entry(tmp_path):
    path, image = cuda_build.build(NVRTC, cb.kernel_source(), cb.NAME_EXPRESSIONS, "90", tmp_path)
    assert path.suffix == ".cubin" and path.read_bytes() == image.data
    again_path, again = cuda_build.build(NVRTC, cb.kernel_source(), cb.NAME_EXPRESSIONS, "90",
                                         tmp_path)
    assert again_path == path and again.lowered == image.lowered


# ---------------------------------------------------------------------------------------------
# Cache and targets, with a fake NVRTC

def test_target_is_a_cubin_when_nvrtc_knows_the_device_else_ptx_of_an_older_one():
    assert cuda_build.target_for("90", (80, 90)) == ("-arch=sm_90", "cubin")
    assert cuda_build.target_for(100, (80, 90)) == ("-arch=compute_90", "ptx")
    with pytest.raises(cuda_build.KernelBuildError, match="compute capability 70"):
        cuda_build.target_for(70, (80, 90))


def _build(nvrtc, directory):
    return cuda_build.build(nvrtc, cb.kernel_source(), cb.NAME_EXPRESSIONS, 90, directory)


def test_one_compile_per_key_and_the_entry_is_reused(tmp_path):
    nvrtc = _FakeNVRTC()
    first, image = _build(nvrtc, tmp_path)
    second, again = _build(nvrtc, tmp_path)
    assert nvrtc.compiled == 1 and first == second and again == image
    assert image.lowered["bn_affine<float,4,true>"] == "lowered:bn_affine<float,4,true>"


def test_the_key_covers_source_options_names_and_nvrtc_version():
    base = (cb.kernel_source(), cuda_build.OPTIONS, cb.NAME_EXPRESSIONS, (12, 9))
    key = cuda_build.cache_key(*base)
    for changed in [(base[0] + " ",) + base[1:], (base[0], base[1] + ("-arch=sm_80",)) + base[2:],
                    base[:2] + (base[2][1:],) + base[3:], base[:3] + ((12, 8),)]:
        assert cuda_build.cache_key(*changed) != key


def test_a_corrupt_entry_is_compiled_again(tmp_path):
    nvrtc = _FakeNVRTC()
    path, _ = _build(nvrtc, tmp_path)
    path.write_bytes(b"truncated")
    again, image = _build(nvrtc, tmp_path)
    assert nvrtc.compiled == 2 and again.read_bytes() == image.data == _FakeNVRTC.CUBIN


def test_an_unwritable_cache_directory_falls_back_to_a_temporary_one(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path, image = _build(_FakeNVRTC(), blocker / "cache")
    assert path.read_bytes() == image.data and not str(path).startswith(str(blocker))


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path / "here"))
    assert cuda_build.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv(cuda_build.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cuda_build.default_cache_dir() == tmp_path / "arraybn" / "cuda"


# ---------------------------------------------------------------------------------------------
# create(): the kernels are built before the backend is handed out

class _BrokenNVRTC(_FakeNVRTC):
    def compileProgram(self, prog, options):
        raise RuntimeError("NVRTC_ERROR_COMPILATION (6)")

    def getProgramLog(self, prog):
        return "bn_kernels.cu(12): error: identifier \"double2\" is undefined"


def _install_fake_cuda(monkeypatch, nvrtc):
    fake = _fake_gpu_module([])
    fake.cuda.runtime.getDeviceCount = lambda: 1
    fake.arange = lambda n: _Probe()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", nvrtc)
    monkeypatch.delitem(backends._instances, "cupy", raising=False)


class _Probe:
    """cupy.arange(4) + 1 ... .sum().item() of _check_cuda's probe."""

    def __add__(self, other):
        return self

    def sum(self):
        return self

    def item(self):
        return 10


def test_create_compiles_now_and_a_broken_toolkit_makes_cupy_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    _install_fake_cuda(monkeypatch, _FakeNVRTC())
    assert cb.create().name == "cupy"                 # built (into tmp_path) by create()
    assert list(tmp_path.glob("*.cubin"))
    _install_fake_cuda(monkeypatch, _BrokenNVRTC())
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(BackendUnavailableError, match=r"(?s)could not be built.*double2"):
        cb.create()


def test_arraybn_info_shows_why_cupy_is_unavailable(monkeypatch, tmp_path):
    from arraybn_cli.main import cli
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    _install_fake_cuda(monkeypatch, _BrokenNVRTC())
    result = CliRunner().invoke(cli, ["info"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.strip().startswith("cupy"))
    assert "CUDA kernels of bn_kernels.cu could not be built" in line
    assert "NVRTC_ERROR_COMPILATION" in line
