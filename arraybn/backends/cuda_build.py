"""Compiling ``cuda/*.cu`` with NVRTC ourselves, once per architecture, cached on disk.

Why not ``cupy.RawModule(code=...)``: every CuPy source compile goes through
``cupy.cuda.compiler._compile_with_cache_cuda``, which appends ``-ftz=true`` after the caller's
options (CuPy 13.6: ``options += ('-ftz=true',)``; NVRTC takes the last value of an option), so
float32 subnormals would be flushed to zero on the GPU and kept by the CPU backends. CuPy also
skips its disk cache whenever ``name_expressions`` are given, so the module was recompiled in every
process. Here NVRTC gets exactly :data:`OPTIONS`; the binary (a cubin for the device's
architecture, or PTX when this NVRTC does not know the architecture) and the lowered names of the
template kernels are written to a disk cache keyed by the SHA-256 of the source, the options,
the architecture, the NVRTC version and the name expressions; the backend loads the file with
``cupy.RawModule(path=...)``, which compiles nothing.

``nvrtc`` below is any object with the functions of ``cupy_backends.cuda.libs.nvrtc``
(``getVersion``, ``getSupportedArchs``, ``createProgram``, ``addNameExpression``,
``compileProgram``, ``getLoweredName``, ``getCUBIN``, ``getPTX``, ``getProgramLog``,
``destroyProgram``); the tests pass a ctypes binding of ``libnvrtc.so.12`` with the same
functions, so the real compile runs on machines without a GPU.
"""
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

# -ftz=false keeps float32 subnormals (the CPU backends do); IEEE division and square root;
# FMA contraction stays on (the numba kernels allow it too). No -arch here: see target_for.
OPTIONS = ("--std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")
CACHE_ENV = "ARRAYBN_CUDA_CACHE"
CACHE_FORMAT = 1


class KernelBuildError(RuntimeError):
    """NVRTC refused the source, or its output could not be stored or read."""


@dataclass(frozen=True)
class KernelImage:
    """What NVRTC made of the source: the binary and how to find each kernel in it."""
    data: bytes           # cubin or PTX
    kind: str             # 'cubin' | 'ptx'
    lowered: dict         # name expression -> symbol in the binary (not extern "C" names)
    log: str              # NVRTC's log (ptxas output when OPTIONS ask for it)


def target_for(compute_capability, supported_archs):
    """(NVRTC -arch option, 'cubin' | 'ptx') for a device of ``compute_capability`` (e.g. 90).

    A cubin when this NVRTC generates code for the device (no JIT by the driver, and the binary
    the spill check looked at is the one that runs); else PTX of the newest architecture it
    knows, which the driver compiles for the device.
    """
    cc = int(compute_capability)
    if cc in supported_archs:
        return f"-arch=sm_{cc}", "cubin"
    older = [arch for arch in supported_archs if arch <= cc]
    if not older:
        raise KernelBuildError(f"NVRTC supports architectures {sorted(supported_archs)}, none "
                               f"of which runs on a device of compute capability {cc}; install "
                               "an NVRTC (CUDA toolkit) that knows this GPU")
    return f"-arch=compute_{max(older)}", "ptx"


def compile_source(nvrtc, source, name_expressions, options, kind, filename="bn_kernels.cu"):
    """Compile ``source`` with exactly ``options``: a KernelImage, or KernelBuildError + log."""
    prog = nvrtc.createProgram(source, filename, (), ())
    try:
        for name in name_expressions:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, list(options))
        except RuntimeError as exc:                     # NVRTCError is a RuntimeError
            log = nvrtc.getProgramLog(prog)
            raise KernelBuildError(f"NVRTC could not compile {filename} with options "
                                   f"{' '.join(options)}: {exc}\n{log}") from exc
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in name_expressions}
        data = nvrtc.getCUBIN(prog) if kind == "cubin" else nvrtc.getPTX(prog)
        return KernelImage(data, kind, lowered, nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


def default_cache_dir():
    """$ARRAYBN_CUDA_CACHE, else $XDG_CACHE_HOME/arraybn/cuda, else ~/.cache/arraybn/cuda."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arraybn" / "cuda"


def cache_key(source, options, name_expressions, nvrtc_version):
    """SHA-256 over everything that changes the binary."""
    text = json.dumps({"format": CACHE_FORMAT, "source": source, "options": list(options),
                       "names": list(name_expressions), "nvrtc": list(nvrtc_version)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class KernelCache:
    """``<key>.<kind>`` (the binary) and ``<key>.json`` (kind, lowered names, the binary's SHA-256)
    in one directory. Both are written to a temporary name and renamed, the JSON last, so a
    reader sees a whole entry or none; an entry whose binary does not match its hash is ignored."""

    def __init__(self, directory):
        self.directory = Path(directory)

    def binary_path(self, key, kind):
        return self.directory / f"{key}.{kind}"

    def load(self, key):
        """(path of the binary, KernelImage), or None when there is no intact entry."""
        try:
            meta = json.loads((self.directory / f"{key}.json").read_text())
            path = self.binary_path(key, meta["kind"])
            data = path.read_bytes()
        except (OSError, ValueError, KeyError):
            return None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None
        return path, KernelImage(data, meta["kind"], dict(meta["lowered"]), meta.get("log", ""))

    def store(self, key, image):
        """Write ``image``; the path of its binary."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.binary_path(key, image.kind)
        _write_atomically(path, image.data)
        meta = {"kind": image.kind, "lowered": image.lowered, "log": image.log,
                "sha256": hashlib.sha256(image.data).hexdigest()}
        _write_atomically(self.directory / f"{key}.json", json.dumps(meta, indent=1).encode())
        return path


def _write_atomically(path, data):
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def build(nvrtc, source, name_expressions, compute_capability, cache_dir=None,
          filename="bn_kernels.cu"):
    """(path of the binary to load, KernelImage) for a device of ``compute_capability``;
    ``filename`` names the source in NVRTC's messages.

    From the disk cache when an intact entry exists, else compiled and stored. When the cache
    directory cannot be written, the binary goes to a private temporary directory instead.
    """
    arch_option, kind = target_for(compute_capability, tuple(nvrtc.getSupportedArchs()))
    options = OPTIONS + (arch_option,)
    key = cache_key(source, options, name_expressions, nvrtc.getVersion())
    cache = KernelCache(default_cache_dir() if cache_dir is None else cache_dir)
    found = cache.load(key)
    if found is not None:
        return found
    image = compile_source(nvrtc, source, name_expressions, options, kind, filename)
    try:
        return cache.store(key, image), image
    except OSError:
        return KernelCache(tempfile.mkdtemp(prefix="arraybn-cuda-")).store(key, image), image
