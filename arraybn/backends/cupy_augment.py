"""The CuPy backend's augmentation kernel (``cuda/augment_kernels.cu``): the affine warp and the
random crop of a batch in one element-wise pass on the GPU, with the NumPy reference's values
bit for bit (see the .cu file).

Built like the BN kernels (``cuda_build``: arraybn's NVRTC options, one compile per device
architecture, cached on disk), but from its own source file and only when a job augments.
The kernel checks nothing, so ``affine_crop`` checks every argument first; the transforms are
drawn on the host and go to the device in two small copies per batch.
"""
import importlib.resources

import numpy as np

from arraybn.backends import cuda_build
from arraybn.backends.arrays import to_host
from arraybn.backends.augment_args import check_affine_crop_args

KERNEL_FILE = "augment_kernels.cu"
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
NAME_EXPRESSIONS = tuple(f"augment_affine_crop<{ctype}>" for ctype in C_TYPES.values())
THREADS = 256              # AUG_MAX_THREADS in the .cu
MAX_BLOCKS = 4096          # the kernel strides over the pixels beyond this grid
INT32_LIMIT = 2**31


def kernel_source():
    """The CUDA C source shipped in the package ``arraybn.cuda``."""
    return importlib.resources.files("arraybn.cuda").joinpath(KERNEL_FILE).read_text()


class CupyAugmentKernels:
    """``affine_crop`` on the current CUDA device (see ``Backend.augment_ops``)."""

    def __init__(self, cupy, nvrtc, cache_dir=None):
        self.xp = cupy
        self._nvrtc, self._cache_dir = nvrtc, cache_dir
        self._kernels = {}        # (device id, name) -> RawKernel

    def affine_crop(self, images, inverse, offset, shift, fill=0.0):
        """``images`` (N, C, H, W) float32/float64 ``cupy.ndarray`` warped through the inverse
        maps and shifted by the crop windows in one pass; a new array of the input's shape and
        dtype. inverse (N, 2, 2), offset (N, 2) float64 and shift (N, 2) integers as in
        ``numba_augment_kernels.affine_crop`` (host or device arrays)."""
        cp = self.xp
        check_affine_crop_args(images, inverse, offset, shift, "cupy augmentation")
        if not isinstance(images, cp.ndarray):
            raise TypeError(f"cupy augmentation: images must be a cupy.ndarray on the GPU, got "
                            f"{type(images).__name__}; move them with cupy.asarray()")
        current = cp.cuda.runtime.getDevice()
        if images.device.id != current:
            raise ValueError(f"cupy augmentation: images live on GPU {images.device.id} but GPU "
                             f"{current} is current; run inside `with cupy.cuda.Device("
                             f"{images.device.id}):`")
        n, channels, height, width = images.shape
        if max(channels, height, width) >= INT32_LIMIT:
            raise ValueError(f"cupy augmentation: images of shape {images.shape} are too large "
                             "for the kernel's 32-bit channel and pixel indices")
        images = cp.ascontiguousarray(images)
        out = cp.empty_like(images)
        if images.size == 0:
            return out
        maps = np.concatenate([to_host(inverse, np.float64).reshape(n, 4),
                               to_host(offset, np.float64)], axis=1)
        shifts = to_host(shift, np.int64)
        if np.abs(shifts).max() >= INT32_LIMIT:
            raise ValueError("cupy augmentation: crop shifts must be below 2**31 pixels")
        pixels = n * height * width
        blocks = min(MAX_BLOCKS, -(-pixels // THREADS))
        self._kernel(f"augment_affine_crop<{C_TYPES[images.dtype]}>")(
            (blocks,), (THREADS,),
            (images, cp.asarray(maps), cp.asarray(shifts.astype(np.int32)), np.float64(fill),
             np.int64(pixels), np.int32(channels), np.int32(height), np.int32(width), out))
        return out

    def _kernel(self, name):
        device = self.xp.cuda.runtime.getDevice()
        kernel = self._kernels.get((device, name))
        if kernel is None:
            arch = self.xp.cuda.Device(device).compute_capability
            path, image = cuda_build.build(self._nvrtc, kernel_source(), NAME_EXPRESSIONS, arch,
                                           self._cache_dir, filename=KERNEL_FILE)
            module = self.xp.RawModule(path=str(path))
            for each in NAME_EXPRESSIONS:
                self._kernels[device, each] = module.get_function(image.lowered[each])
            kernel = self._kernels[device, name]
        return kernel
