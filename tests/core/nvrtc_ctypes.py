"""A ctypes binding of NVRTC with the functions of ``cupy_backends.cuda.libs.nvrtc``.

NVRTC compiles (it does not run) CUDA C++ on any machine: the pip package
``nvidia-cuda-nvrtc-cu12`` (in the ``test`` extra) ships ``libnvrtc.so.12``, so the backend's
real compile path (:mod:`arraybn.backends.cuda_build`) is tested without a GPU or CuPy.
"""
import ctypes
import ctypes.util
from pathlib import Path


class NVRTCError(RuntimeError):
    """Like cupy_backends' NVRTCError: a RuntimeError with NVRTC's status text."""


def find_library():
    """Path of libnvrtc: the pip package nvidia-cuda-nvrtc-cu12 first, then the system; or None."""
    try:
        import nvidia.cuda_nvrtc as package
    except ImportError:
        package = None
    if package is not None:
        for directory in package.__path__:
            found = sorted(Path(directory, "lib").glob("libnvrtc.so.*"))
            found = [path for path in found
                     if "alt" not in path.name and "builtins" not in path.name]
            if found:
                return str(found[0])
    return ctypes.util.find_library("nvrtc")


class CtypesNVRTC:
    """NVRTC through ctypes; method names and arguments as in cupy_backends.cuda.libs.nvrtc."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, status):
        if status != 0:
            raise NVRTCError(f"{self.lib.nvrtcGetErrorString(status).decode()} ({status})")

    def getVersion(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        return major.value, minor.value

    def getSupportedArchs(self):
        count = ctypes.c_int()
        self._check(self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)))
        archs = (ctypes.c_int * count.value)()
        self._check(self.lib.nvrtcGetSupportedArchs(archs))
        return tuple(archs)

    def createProgram(self, source, name, headers, include_names):
        assert not headers and not include_names
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(),
                                                0, None, None))
        return prog.value

    def destroyProgram(self, prog):
        self._check(self.lib.nvrtcDestroyProgram(ctypes.byref(ctypes.c_void_p(prog))))

    def addNameExpression(self, prog, name):
        self._check(self.lib.nvrtcAddNameExpression(ctypes.c_void_p(prog), name.encode()))

    def compileProgram(self, prog, options):
        encoded = [option.encode() for option in options]
        argv = (ctypes.c_char_p * len(encoded))(*encoded)
        self._check(self.lib.nvrtcCompileProgram(ctypes.c_void_p(prog), len(encoded), argv))

    def getLoweredName(self, prog, name):
        lowered = ctypes.c_char_p()
        self._check(self.lib.nvrtcGetLoweredName(ctypes.c_void_p(prog), name.encode(),
                                                 ctypes.byref(lowered)))
        return lowered.value.decode()

    def _bytes(self, prog, size_function, get_function):
        size = ctypes.c_size_t()
        self._check(size_function(ctypes.c_void_p(prog), ctypes.byref(size)))
        buffer = ctypes.create_string_buffer(size.value)
        self._check(get_function(ctypes.c_void_p(prog), buffer))
        return buffer.raw[:max(size.value - 1, 0)]          # without the trailing NUL, as CuPy

    def getPTX(self, prog):
        return self._bytes(prog, self.lib.nvrtcGetPTXSize, self.lib.nvrtcGetPTX)

    def getCUBIN(self, prog):
        return self._bytes(prog, self.lib.nvrtcGetCUBINSize, self.lib.nvrtcGetCUBIN)

    def getProgramLog(self, prog):
        return self._bytes(prog, self.lib.nvrtcGetProgramLogSize,
                           self.lib.nvrtcGetProgramLog).decode()


def load():
    """A CtypesNVRTC, or None when no libnvrtc is installed."""
    path = find_library()
    return CtypesNVRTC(path) if path else None
