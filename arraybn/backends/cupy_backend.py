"""The CuPy backend: hand-written CUDA C kernels (``cuda/bn_kernels.cu``) loaded with cupy.RawModule.

CuPy is imported only by :func:`create`. The kernels never check their arguments, so every
launch is preceded by explicit checks (dtype, C-contiguity, shape, device, no overlap between
input and output); scalars are passed as NumPy scalars of the kernel's C type.

Each reduction is two launches: a partial kernel in which every block reduces one piece of one
channel (so a LeNet layer with C=6 still fills the GPU), then a merge kernel with one block per
channel (Chan's parallel merge of count/mean/M2, or plain sums for backward). The partial kernel
uses one of two memory layouts (see the .cu file): 'rows' when a channel's rows of M values are
at least 128 bytes long (conv layers), 'cols' otherwise (dense layers: consecutive threads read
consecutive channels).
"""
import functools
import importlib.resources
from dataclasses import dataclass

import numpy as np

from arraybn.backends.base import Backend, BackendUnavailableError

KERNEL_FILE = "bn_kernels.cu"
COMPILE_OPTIONS = ("--std=c++17",)
INSTALL_HINT = ("pip install 'arraybn[gpu]' (installs cupy-cuda12x; needs an NVIDIA GPU and a "
                "driver for CUDA 12)")
BATCH = 8                 # BN_BATCH in the .cu: values a thread reduces per Chan merge
MAX_THREADS = 256         # BN_MAX_THREADS in the .cu
COLS_BELOW_BYTES = 128    # rows of M values shorter than this use the 'cols' layout
MIN_VALUES_PER_BLOCK = 2048
VECTOR_BYTES = 16         # float4 / double2 loads
INDEX_LIMIT = 2**30       # C and M are 32-bit in the kernels' index walks
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
EXTERN_C_KERNELS = ("bn_merge_moments", "bn_merge_moments_scale", "bn_merge_backward")


def _name_expressions():
    names = []
    for dtype, ctype in C_TYPES.items():
        for vec in (VECTOR_BYTES // dtype.itemsize, 1):
            names += [f"bn_moments_rows<{ctype},{vec}>", f"bn_backward_rows<{ctype},{vec}>",
                      f"bn_affine<{ctype},{vec},true>", f"bn_affine<{ctype},{vec},false>",
                      f"bn_grad_input<{ctype},{vec}>"]
        names += [f"bn_moments_cols<{ctype}>", f"bn_backward_cols<{ctype}>"]
    return tuple(names)


NAME_EXPRESSIONS = _name_expressions()


def kernel_source():
    """The CUDA C source shipped in the package ``arraybn.cuda``."""
    return importlib.resources.files("arraybn.cuda").joinpath(KERNEL_FILE).read_text()


def _ceil_div(a, b):
    return -(-a // b)


def _round_up(a, b):
    return _ceil_div(a, b) * b


# ----------------------------------------------------------------------------------------------
# Launch geometry: pure functions of the shape and the device size, memoized.

@dataclass(frozen=True)
class ReductionPlan:
    """How a partial kernel splits (N, C, M) and where the merge kernel finds each channel's parts.

    ``sizes`` are the layout's integer kernel arguments after the data pointers: rows:
    (N, C, M, chunk_len, chunks); cols: (N, K, M, TX, TY, rows_per_chunk). Channel c's parts are
    ``(p // group) * stride + c * group + p % group`` for p < ``parts_per_channel``, in arrays of
    ``parts`` entries per field.
    """
    layout: str
    vec: int
    grid: tuple
    block: tuple
    sizes: tuple
    parts: int
    parts_per_channel: int
    group: int
    stride: int

    @property
    def merge_block(self):
        return (min(MAX_THREADS, _round_up(self.parts_per_channel, 32)),)


def reduction_layout(m, itemsize, aligned):
    """('rows', values per load) for rows of at least 128 bytes, else ('cols', 1)."""
    if m * itemsize < COLS_BELOW_BYTES:
        return "cols", 1
    return "rows", elementwise_vec(m, itemsize, aligned)


@functools.lru_cache(maxsize=512)
def reduction_plan(n, c, m, itemsize, aligned, resident_blocks):
    """The partial-reduction geometry for x3 of shape (n, c, m); ``aligned``: 16-byte pointers.

    The grid is at most one wave of ``resident_blocks`` (blocks the device runs at once) where
    the shape allows: every block of a rows-layout reduction has the same work, so a second,
    partial wave would leave most of the GPU idle.
    """
    layout, vec = reduction_layout(m, itemsize, aligned)
    if layout == "cols":
        return _cols_plan(n, c, m, resident_blocks)
    return _rows_plan(n, c, m, vec, resident_blocks)


def _rows_plan(n, c, m, vec, resident_blocks):
    per_channel = n * m
    chunks = max(1, min(resident_blocks // c, _ceil_div(per_channel, MIN_VALUES_PER_BLOCK)))
    chunk_len = _round_up(_ceil_div(per_channel, chunks), vec)
    chunks = _ceil_div(per_channel, chunk_len)
    threads = min(MAX_THREADS, _round_up(_ceil_div(chunk_len, BATCH), 32))
    return ReductionPlan("rows", vec, (c * chunks,), (threads,), (n, c, m, chunk_len, chunks),
                         parts=c * chunks, parts_per_channel=chunks, group=chunks,
                         stride=c * chunks)


def _cols_plan(n, c, m, resident_blocks):
    k = c * m
    if k <= MAX_THREADS:
        tx = k
    else:
        tx = _round_up(_ceil_div(k, _ceil_div(k, MAX_THREADS)), 32)
    ty = max(1, MAX_THREADS // tx)
    tiles = _ceil_div(k, tx)
    chunks = max(1, min(resident_blocks // tiles, _ceil_div(n, ty * BATCH), 65535))
    rows_per_chunk = _ceil_div(n, chunks)
    chunks = _ceil_div(n, rows_per_chunk)
    return ReductionPlan("cols", 1, (tiles, chunks), (tx * ty,), (n, k, m, tx, ty, rows_per_chunk),
                         parts=chunks * k, parts_per_channel=chunks * m, group=m, stride=k)


def elementwise_vec(m, itemsize, aligned):
    """Values per load in the element-wise kernels: a 16-byte vector when rows allow it."""
    vec = VECTOR_BYTES // itemsize
    return vec if aligned and m % vec == 0 else 1


# ----------------------------------------------------------------------------------------------

def _i64(v):
    return np.int64(v)


def _i32(v):
    return np.int32(v)


class CupyBackend(Backend):
    """BN kernels on the current CUDA device; arrays are ``cupy.ndarray``."""
    name = "cupy"

    def __init__(self, cupy):
        self.xp = cupy
        self._module = cupy.RawModule(code=kernel_source(), options=COMPILE_OPTIONS,
                                      name_expressions=NAME_EXPRESSIONS)
        self._kernels = {}        # (device id, name) -> RawKernel; CuPy compiles once per device
        self._resident = {}       # (device id, name) -> blocks of MAX_THREADS resident at once

    # -- the four kernels of the contract ---------------------------------------------------

    def moments(self, x3):
        n, c, m = self._check_data(x3, "x3")
        stats = self.xp.empty((2, c), dtype=np.float64)
        plan, part = self._partial_moments(x3)
        self._launch("bn_merge_moments", (c,), plan.merge_block,
                     self._part_args(plan, part) + (stats[0], stats[1]))
        return stats[0], stats[1]

    def forward_train(self, x3, gamma, beta, eps, center_only=False, out=None):
        n, c, m = self._check_data(x3, "x3")
        self._check_channel(gamma, "gamma", c)
        self._check_channel(beta, "beta", c)
        y = self._output(out, x3, (x3,))
        stats = self.xp.empty((3, c), dtype=np.float64)      # mean, var, scale
        plan, part = self._partial_moments(x3)
        self._launch("bn_merge_moments_scale", (c,), plan.merge_block,
                     self._part_args(plan, part) + (gamma, np.float64(eps), _i32(bool(center_only)),
                                                    stats[0], stats[1], stats[2]))
        self._elementwise("bn_affine", ",true", x3, y, (x3,), (stats[2], stats[0], beta))
        return y, stats[0], stats[1]

    def affine(self, x3, a, b, out=None):
        n, c, m = self._check_data(x3, "x3")
        self._check_channel(a, "a", c)
        self._check_channel(b, "b", c)
        y = self._output(out, x3, (x3,))
        self._elementwise("bn_affine", ",false", x3, y, (x3,), (a, a, b))  # shift unread: a
        return y

    def backward(self, gy3, x3, mean, scale, w, centered=True, out=None):
        n, c, m = self._check_data(x3, "x3")
        self._check_data(gy3, "gy3")
        if gy3.shape != x3.shape or gy3.dtype != x3.dtype:
            raise ValueError(f"gy3 must match x3: got {gy3.shape} {gy3.dtype}, x3 is "
                             f"{x3.shape} {x3.dtype}")
        for arr, what in ((mean, "mean"), (scale, "scale"), (w, "w")):
            self._check_channel(arr, what, c)
        gx = self._output(out, x3, (x3, gy3))
        plan, name = self._plan(x3, (gy3, x3), "bn_backward")
        part = self.xp.empty((2, plan.parts), dtype=np.float64)
        self._launch(name, plan.grid, plan.block,
                     (gy3, x3, mean) + self._sizes(plan, True) + (part, _i64(plan.parts)))
        coef = self.xp.empty((4, c), dtype=np.float64)       # sum_gy, sum_gy_xc, k_gy, k_xc
        self._launch("bn_merge_backward", (c,), plan.merge_block,
                     self._part_args(plan, part) + (w, np.float64(n * m), _i32(bool(centered)),
                                                    coef[0], coef[1], coef[2], coef[3]))
        self._elementwise("bn_grad_input", "", x3, gx, (gy3, x3), (scale, mean, coef[2], coef[3]))
        return gx, coef[0], coef[1]

    # -- launches -----------------------------------------------------------------------------

    def _partial_moments(self, x3):
        plan, name = self._plan(x3, (x3,), "bn_moments")
        part = self.xp.empty((3, plan.parts), dtype=np.float64)
        self._launch(name, plan.grid, plan.block,
                     (x3,) + self._sizes(plan) + (part, _i64(plan.parts)))
        return plan, part

    def _plan(self, x3, inputs, base):
        """The reduction plan for kernel family ``base`` ('bn_moments', 'bn_backward')."""
        n, c, m = x3.shape
        aligned = _aligned(inputs)
        layout, vec = reduction_layout(m, x3.dtype.itemsize, aligned)
        name = self._name(base, x3, layout, vec)
        plan = reduction_plan(n, c, m, x3.dtype.itemsize, aligned, self._resident_blocks(name))
        return plan, name

    @staticmethod
    def _sizes(plan, channel_of_column=False):
        """The plan's integer kernel arguments; bn_backward_cols also needs M (column -> channel)."""
        if plan.layout == "rows":
            n, c, m, chunk_len, chunks = plan.sizes
            return (_i64(n), _i64(c), _i64(m), _i64(chunk_len), _i32(chunks))
        n, k, m, tx, ty, rows_per_chunk = plan.sizes
        return ((_i64(n), _i64(k)) + ((_i64(m),) if channel_of_column else ())
                + (_i32(tx), _i32(ty), _i64(rows_per_chunk)))

    @staticmethod
    def _part_args(plan, part):
        return (part, _i64(plan.parts), _i64(plan.parts_per_channel), _i64(plan.group),
                _i64(plan.stride))

    @staticmethod
    def _name(base, x3, layout, vec):
        ctype = C_TYPES[x3.dtype]
        if layout == "cols":
            return f"{base}_cols<{ctype}>"
        return f"{base}_rows<{ctype},{vec}>"

    def _elementwise(self, base, template_tail, x3, out, inputs, coefficients):
        """Kernel ``base<T,VEC{template_tail}>``: grid-stride over the vectors of (N, C, M)."""
        n, c, m = x3.shape
        vec = elementwise_vec(m, x3.dtype.itemsize, _aligned(inputs + (out,)))
        name = f"{base}<{C_TYPES[x3.dtype]},{vec}{template_tail}>"
        vectors = n * c * m // vec
        blocks = max(1, min(_ceil_div(vectors, MAX_THREADS), self._resident_blocks(name)))
        self._launch(name, (blocks,), (MAX_THREADS,),
                     inputs + (_i64(vectors), _i64(m // vec), _i64(c)) + coefficients + (out,))

    def _launch(self, name, grid, block, args):
        self._kernel(name)(grid, block, args)

    def _kernel(self, name):
        key = (self.xp.cuda.runtime.getDevice(), name)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = self._module.get_function(name)
        return kernel

    def _resident_blocks(self, name):
        """Blocks of MAX_THREADS threads of kernel ``name`` that the device runs at once."""
        device = self.xp.cuda.runtime.getDevice()
        key = (device, name)
        if key not in self._resident:
            per_sm = self.xp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                self._kernel(name).kernel.ptr, MAX_THREADS, 0)
            multiprocessors = self.xp.cuda.runtime.getDeviceProperties(device)[
                "multiProcessorCount"]
            self._resident[key] = max(1, per_sm) * int(multiprocessors)
        return self._resident[key]

    # -- argument checks (the kernels check nothing) --------------------------------------------

    def _check_data(self, arr, what):
        cp = self.xp
        if not isinstance(arr, cp.ndarray):
            raise TypeError(f"{what} must be a cupy.ndarray on the GPU, got {type(arr).__name__}; "
                            "move it with cupy.asarray()")
        if arr.ndim != 3:
            raise ValueError(f"{what} must have shape (N, C, M), got {arr.shape}; "
                             "reshape with x.reshape(N, C, -1)")
        if arr.dtype not in C_TYPES:
            raise TypeError(f"{what} must be float32 or float64, got {arr.dtype}")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{what} must be C-contiguous, got strides {arr.strides} for shape "
                             f"{arr.shape}; pass cupy.ascontiguousarray({what})")
        if arr.size == 0:
            raise ValueError(f"{what} of shape {arr.shape} is empty; BN needs values per channel")
        if max(arr.shape[1:]) >= INDEX_LIMIT:
            raise ValueError(f"{what} has shape {arr.shape}; the CUDA kernels need C and M (the "
                             f"product of the spatial axes) below 2**30")
        self._check_device(arr, what)
        return arr.shape

    def _check_channel(self, arr, what, channels):
        if not isinstance(arr, self.xp.ndarray) or arr.dtype != np.float64:
            kind = getattr(arr, "dtype", type(arr).__name__)
            raise TypeError(f"{what} must be a float64 cupy.ndarray of shape ({channels},), "
                            f"got {kind}")
        if arr.shape != (channels,) or not arr.flags.c_contiguous:
            raise ValueError(f"{what} must be a contiguous array of shape ({channels},), got shape "
                             f"{arr.shape} with strides {arr.strides}")
        self._check_device(arr, what)

    def _check_device(self, arr, what):
        current = self.xp.cuda.runtime.getDevice()
        if arr.device.id != current:
            raise ValueError(f"{what} lives on GPU {arr.device.id} but GPU {current} is current; "
                             f"run inside `with cupy.cuda.Device({arr.device.id}):`")

    def _output(self, out, x3, inputs):
        if out is None:
            return self.xp.empty_like(x3)
        if not isinstance(out, self.xp.ndarray) or out.shape != x3.shape or out.dtype != x3.dtype:
            raise ValueError(f"out must be a cupy.ndarray of shape {x3.shape} and dtype {x3.dtype}, "
                             f"got {type(out).__name__} {getattr(out, 'shape', '')} "
                             f"{getattr(out, 'dtype', '')}")
        if not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous, got strides {out.strides}")
        self._check_device(out, "out")
        if any(self.xp.may_share_memory(out, arr) for arr in inputs):
            raise ValueError("out must not overlap the inputs; pass a separate array")
        return out


def _aligned(arrays):
    return all(arr.data.ptr % VECTOR_BYTES == 0 for arr in arrays)


# ----------------------------------------------------------------------------------------------

def _import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"CuPy is not installed or failed to import ({exc}); "
                                      f"{INSTALL_HINT}") from exc
    return cupy


def _check_cuda(cupy):
    """Raise BackendUnavailableError unless a CUDA device works: driver, runtime and NVRTC."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except RuntimeError as exc:            # CUDARuntimeError / CUDADriverError
        raise BackendUnavailableError(f"CuPy is installed but the CUDA driver/runtime failed: "
                                      f"{exc}; check `nvidia-smi` and the driver version") from exc
    if count < 1:
        raise BackendUnavailableError("CuPy is installed but no CUDA device is visible "
                                      "(check CUDA_VISIBLE_DEVICES and `nvidia-smi`)")
    compile_error = getattr(getattr(cupy.cuda, "compiler", None), "CompileException", RuntimeError)
    try:
        (cupy.arange(4) + 1).sum().item()           # allocates, compiles with NVRTC, launches
    except (RuntimeError, OSError, ImportError, compile_error) as exc:
        raise BackendUnavailableError(f"the CUDA device does not run CuPy kernels: {exc}; check "
                                      "the driver and that NVRTC for CUDA 12 is installed") from exc


def create():
    """The cupy backend, or BackendUnavailableError saying why this machine cannot run it."""
    cupy = _import_cupy()
    _check_cuda(cupy)
    return CupyBackend(cupy)
