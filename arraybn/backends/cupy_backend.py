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

The kernels are compiled by NVRTC with arraybn's own options (``cuda_build``: no ``-ftz=true``
from CuPy), once per architecture and cached on disk, in :func:`create`, so that a toolkit that
cannot compile them makes the backend unavailable instead of failing at the first BN call.

No host synchronisation in a BN call: the finite check of the batch statistics happens in the
merge kernel, which sets a flag in device memory, and the running buffers' update in one more
small kernel after it that reads the flag: all channels are updated or none, as on the CPU. The
running statistics of inference are checked in the kernel that makes the inference
coefficients. Where a failure surfaces: ``take_deferred_failures`` (one device-to-host copy),
which the trainer calls once per training step and ``stages.common.evaluate`` once per
evaluation (``arraybn.core.deferred.raise_deferred_errors``); until then a NaN batch leaves
every running buffer alone and gives NaN outputs, and so do non-finite or negative running
statistics in inference (its outputs are NaN).
"""
import contextlib
import importlib
import importlib.resources

import numpy as np

from arraybn.backends import cuda_build
from arraybn.backends.base import Backend, BackendUnavailableError
from arraybn.backends.cupy_augment import CupyAugmentKernels
from arraybn.backends.cupy_deferred import SINK, DeferredChecks
from arraybn.backends.cupy_geometry import (MAX_THREADS, VECTOR_BYTES, ceil_div, elementwise_vec,
                                            reduction_layout, reduction_plan)

KERNEL_FILE = "bn_kernels.cu"
INSTALL_HINT = ("pip install 'arraybn[gpu]' (installs cupy-cuda12x; needs an NVIDIA GPU and a "
                "driver for CUDA 12)")
INDEX_LIMIT = 2**30       # C and M are 32-bit in the kernels' index walks
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
EXTERN_C_KERNELS = ("bn_merge_moments", "bn_merge_backward", "bn_merge_train",
                    "bn_finish_statistics")
PER_CHANNEL_KERNELS = ("bn_update_running", "bn_inference_coefficients")


def _name_expressions():
    names = []
    for dtype, ctype in C_TYPES.items():
        for vec in (VECTOR_BYTES // dtype.itemsize, 1):
            names += [f"bn_moments_rows<{ctype},{vec}>", f"bn_backward_rows<{ctype},{vec}>",
                      f"bn_affine<{ctype},{vec},true>", f"bn_affine<{ctype},{vec},false>",
                      f"bn_grad_input<{ctype},{vec}>"]
        names += [f"bn_moments_cols<{ctype}>", f"bn_backward_cols<{ctype}>"]
    for kernel in PER_CHANNEL_KERNELS:     # templated on the running buffers' types
        names += [f"{kernel}<{rm},{rv}>" for rm in C_TYPES.values() for rv in C_TYPES.values()]
    return tuple(names)


NAME_EXPRESSIONS = _name_expressions()


def kernel_source():
    """The CUDA C source shipped in the package ``arraybn.cuda``."""
    return importlib.resources.files("arraybn.cuda").joinpath(KERNEL_FILE).read_text()


# ----------------------------------------------------------------------------------------------

def _i64(v):
    return np.int64(v)


def _i32(v):
    return np.int32(v)


def _unbias(count):
    """count / (count - 1): biased -> unbiased variance (0 for a single value: never used)."""
    return count / (count - 1) if count > 1 else 0.0


def _channel_grid(channels):
    return (ceil_div(channels, MAX_THREADS),)


class CupyBackend(Backend):
    """BN kernels on the current CUDA device; arrays are ``cupy.ndarray``."""
    name = "cupy"

    def __init__(self, cupy, nvrtc, cache_dir=None):
        """Compiles (or loads from the disk cache) the kernels for the current device now."""
        self.xp = cupy
        self._nvrtc, self._cache_dir = nvrtc, cache_dir
        self._modules = {}        # device id -> (RawModule of the cached binary, lowered names)
        self._kernels = {}        # (device id, name) -> RawKernel
        self._resident = {}       # (device id, name) -> blocks of MAX_THREADS resident at once
        self._checks = {}         # device id -> DeferredChecks
        self._label = None
        self._augment = None      # CupyAugmentKernels, made when a job first augments
        self._module(cupy.cuda.runtime.getDevice())

    def augment_ops(self):
        """``cupy_augment.CupyAugmentKernels``: the affine warp and random crop in one pass."""
        if self._augment is None:
            self._augment = CupyAugmentKernels(self.xp, self._nvrtc, self._cache_dir)
        return self._augment

    # -- the four kernels of the contract ---------------------------------------------------

    def moments(self, x3):
        n, c, m = self._check_data(x3, "x3")
        stats = self.xp.empty((2, c), dtype=np.float64)
        plan, part = self._partial_moments(x3)
        self._launch("bn_merge_moments", (c,), plan.merge_block,
                     self._part_args(plan, part) + (stats[0], stats[1]))
        return stats[0], stats[1]

    def forward_train(self, x3, gamma, beta, eps, center_only=False, out=None):
        y, mean, var, _ = self._forward(x3, gamma, beta, eps, center_only, 0.0, None, None, out,
                                        checked=False)
        return y, mean, var

    def forward_train_finish(self, x3, gamma, beta, eps, center_only=False, momentum=0.1,
                             running_mean=None, running_var=None, out=None):
        """forward_train and finish_statistics in one merge kernel; inv_std is never None here:
        non-finite statistics are reported by take_deferred_failures."""
        return self._forward(x3, gamma, beta, eps, center_only, momentum, running_mean,
                             running_var, out, checked=True)

    def _forward(self, x3, gamma, beta, eps, center_only, momentum, running_mean, running_var,
                 out, checked):
        n, c, m = self._check_data(x3, "x3")
        self._check_channel(gamma, "gamma", c)
        self._check_channel(beta, "beta", c)
        y = self._output(out, x3, (x3,))
        stats = self.xp.empty((4, c), dtype=np.float64)      # mean, var, inv_std, scale
        buffers, update = self._running_buffers(running_mean, running_var, c, stats[0])
        slot = self._slot("batch statistics", (stats[0], stats[1]), checked)
        plan, part = self._partial_moments(x3)
        self._launch("bn_merge_train", (c,), plan.merge_block,
                     self._part_args(plan, part) + (gamma, np.float64(eps), _i32(bool(center_only)))
                     + (stats[0], stats[1], stats[2], stats[3]) + slot)
        self._update_running(stats[0], stats[1], momentum, n * m, buffers, update, slot)
        self._elementwise("bn_affine", ",true", x3, y, (x3,), (stats[3], stats[0], beta))
        return y, stats[0], stats[1], stats[2]

    def finish_statistics(self, mean, var, eps, momentum, count, running_mean=None,
                          running_var=None):
        """(None, inv_std): finiteness is known later, from take_deferred_failures."""
        c = mean.shape[0]
        for arr, what in ((mean, "mean"), (var, "var")):
            self._check_channel(arr, what, c)
        inv_std = self.xp.empty(c, dtype=np.float64)
        buffers, update = self._running_buffers(running_mean, running_var, c, inv_std)
        slot = self._slot("batch statistics", (mean, var), True)
        self._launch("bn_finish_statistics", _channel_grid(c), (MAX_THREADS,),
                     (mean, var, _i64(c), np.float64(eps), inv_std) + slot)
        self._update_running(mean, var, momentum, count, buffers, update, slot)
        return None, inv_std

    def _update_running(self, mean, var, momentum, count, buffers, update, slot):
        """Launch bn_update_running after the kernel that flags ``slot``: every buffer in
        ``update`` moves towards (mean, var), or none does if a channel was not finite."""
        if not update:
            return
        self._launch(self._name_for("bn_update_running", *buffers), _channel_grid(mean.shape[0]),
                     (MAX_THREADS,),
                     (mean, var, _i64(mean.shape[0]), np.float64(momentum),
                      np.float64(_unbias(count)), _i32(update)) + buffers + slot)

    def inference_coefficients(self, gamma, beta, running_mean, running_var, eps, check):
        """As Backend's, validated in the kernel (``check`` is not called here): unusable
        statistics give NaN outputs and a failure in take_deferred_failures."""
        c = gamma.shape[0]
        self._check_channel(gamma, "gamma", c)
        self._check_channel(beta, "beta", c)
        coef = self.xp.empty((4, c), dtype=np.float64)       # a, b, mean, scale
        buffers, _ = self._running_buffers(running_mean, running_var, c, coef[0])
        self._launch(self._name_for("bn_inference_coefficients", *buffers), _channel_grid(c),
                     (MAX_THREADS,),
                     (gamma, beta) + buffers + (_i64(c), np.float64(eps),
                                                _i32(running_var is None))
                     + (coef[0], coef[1], coef[2], coef[3])
                     + self._slot("running statistics", (running_mean, running_var), True))
        return coef[0], coef[1], coef[2], coef[3]

    # -- deferred checks ----------------------------------------------------------------------

    def owns(self, x):
        return type(x).__module__.split(".")[0] == "cupy"

    foreign_array_hint = "move it with cupy.asarray(x)"

    def take_deferred_failures(self):
        """[DeferredFailure] of every device's BN calls since the last call (one copy each)."""
        return [failure for checks in self._checks.values() for failure in checks.take()]

    @contextlib.contextmanager
    def labelled(self, label):
        outer, self._label = self._label, label
        try:
            yield self
        finally:
            self._label = outer

    def _slot(self, what, arrays, checked):
        """(status array, slot) kernel arguments for one BN call's validity flag."""
        device = self.xp.cuda.runtime.getDevice()
        checks = self._checks.get(device)
        if checks is None:
            checks = self._checks[device] = DeferredChecks(self.xp)
        slot = checks.slot(self._label, what, arrays) if checked else SINK
        return checks.status, _i32(slot)

    def _running_buffers(self, running_mean, running_var, channels, placeholder):
        """((mean buffer, var buffer), update bits); ``placeholder`` (float64, unread) stands
        in for an absent buffer, so that the kernel's pointer types are fixed."""
        update = 0
        buffers = []
        for bit, (buf, what) in enumerate(((running_mean, "running_mean"),
                                           (running_var, "running_var"))):
            if buf is None:
                buffers.append(placeholder)
                continue
            self._check_buffer(buf, what, channels)
            buffers.append(buf)
            update |= 1 << bit
        return tuple(buffers), update

    @staticmethod
    def _name_for(kernel, running_mean, running_var):
        return f"{kernel}<{C_TYPES[running_mean.dtype]},{C_TYPES[running_var.dtype]}>"

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
        blocks = max(1, min(ceil_div(vectors, MAX_THREADS), self._resident_blocks(name)))
        self._launch(name, (blocks,), (MAX_THREADS,),
                     inputs + (_i64(vectors), _i64(m // vec), _i64(c)) + coefficients + (out,))

    def _launch(self, name, grid, block, args):
        self._kernel(name)(grid, block, args)

    def _kernel(self, name):
        device = self.xp.cuda.runtime.getDevice()
        kernel = self._kernels.get((device, name))
        if kernel is None:
            module, lowered = self._module(device)
            kernel = self._kernels[device, name] = module.get_function(lowered.get(name, name))
        return kernel

    def _module(self, device):
        """(RawModule, lowered names) for ``device``: built once per device and process."""
        found = self._modules.get(device)
        if found is None:
            arch = self.xp.cuda.Device(device).compute_capability
            path, image = cuda_build.build(self._nvrtc, kernel_source(), NAME_EXPRESSIONS, arch,
                                           self._cache_dir)
            module = self.xp.RawModule(path=str(path))
            for name in NAME_EXPRESSIONS + EXTERN_C_KERNELS:     # loads it: fails here, not later
                module.get_function(image.lowered.get(name, name))
            found = self._modules[device] = (module, image.lowered)
        return found

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

    def _check_buffer(self, arr, what, channels):
        if (not isinstance(arr, self.xp.ndarray) or arr.dtype not in C_TYPES
                or arr.shape != (channels,) or not arr.flags.c_contiguous):
            raise ValueError(f"{what} must be a contiguous float32 or float64 cupy.ndarray of "
                             f"shape ({channels},), got {type(arr).__name__} "
                             f"{getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}; pass "
                             f"cupy.ascontiguousarray({what}) and copy the result back")
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


def _import_nvrtc():
    """CuPy's NVRTC bindings (the functions cuda_build calls)."""
    try:
        return importlib.import_module("cupy_backends.cuda.libs.nvrtc")
    except ImportError as exc:
        raise BackendUnavailableError(f"CuPy's NVRTC bindings failed to import ({exc}); "
                                      f"reinstall CuPy: {INSTALL_HINT}") from exc


def create(cache_dir=None):
    """The cupy backend with its kernels compiled for the current device, or
    BackendUnavailableError saying why this machine cannot run it (no CuPy, no device, a driver
    or NVRTC that fails, kernels that do not compile or load)."""
    cupy = _import_cupy()
    _check_cuda(cupy)
    nvrtc = _import_nvrtc()
    try:
        return CupyBackend(cupy, nvrtc, cache_dir)
    except (cuda_build.KernelBuildError, RuntimeError, OSError) as exc:
        raise BackendUnavailableError(f"the CUDA kernels of {KERNEL_FILE} could not be built or "
                                      f"loaded: {exc}; check that NVRTC (CUDA 12) matches the "
                                      f"driver, or remove the kernel cache "
                                      f"({cuda_build.default_cache_dir()})") from exc
