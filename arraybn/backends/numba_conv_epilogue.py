"""An inference epilogue for the convolution kernels: the BN, ReLU and residual sum that follow a
convolution, applied to each chunk's output right after its GEMM, while it is in the cache.

In inference a convolution's output feeds only the fused BN block after it (and, for a residual
branch's last one, the block's sum with the shortcut and its ReLU): three passes over memory
that each read and write the whole batch. Here they run on each image's output as soon as the
convolution has written it, with the same operations in the same order, so the results equal
the separate layers' bit for bit:

- ``(x - center[c]) * a[c] + b[c]`` in float64, rounded once to x's dtype, as
  ``numba_fused_kernels``' k = 1 pass; then, if ``relu``, zero where that is not > 0, as the
  fused block's ReLU (NaN becomes 0 there);
- if ``skip`` is given: the sum with skip rounded once, then NumPy's ``maximum(v, 0)`` (NaN
  passes, -0.0 becomes +0.0), as ``numba_residual_kernels.add_relu``.

Measured (batch 256, ms, the convolution alone / convolution, block and sum as separate passes /
with the epilogue; one thread, then two): ResNet-20's 16-channel convolution with BN + ReLU
7.40 / 9.16 / 7.94, 3.67 / 4.60 / 4.00; with BN and the residual sum 8.67 / 13.46 / 10.04,
3.79 / 6.04 / 4.71; the 32-channel ones 8.09 / 8.94 / 8.45 and 7.96 / 9.93 / 8.94 (one thread).
The whole inference forward of 3,000 validation images: ResNet-20 2.43 -> 2.14 s on one
thread, 1.29 -> 1.08 s on two; VGG-8 (half its blocks pool: not covered) 1.86 -> 1.78 s and
0.97 -> 0.92 s.
"""
import numpy as np

from arraybn.backends.numba_config import jit, uidx


def kernel_argument(epilogue, y):
    """The kernels' form of ``epilogue`` for the convolution output y (N, O, OH, OW):
    (center, a, b, relu, skip, has skip), center, a and b contiguous float64 (O,) arrays, skip
    y's shape and dtype or an empty stand-in; all empty for None (no epilogue). ValueError for
    values of another shape or a skip that does not fit y."""
    if epilogue is None:
        empty = np.zeros(0)
        return empty, empty, empty, False, np.zeros((0,) * 4, y.dtype), False
    center, a, b, relu, skip = epilogue
    channels = y.shape[1]
    values = tuple(np.ascontiguousarray(v, dtype=np.float64) for v in (center, a, b))
    if any(v.shape != (channels,) for v in values):
        raise ValueError(f"convolution epilogue: center, a and b must have shape ({channels},); "
                         f"got {', '.join(str(v.shape) for v in values)}")
    if skip is not None and not (isinstance(skip, np.ndarray) and skip.shape == y.shape
                                 and skip.dtype == y.dtype and skip.flags.c_contiguous):
        raise ValueError(f"convolution epilogue: the skip must be a C-contiguous {y.dtype} array "
                         f"of the output's shape {y.shape}; got {type(skip).__name__} "
                         f"{getattr(skip, 'dtype', '')} {getattr(skip, 'shape', '')}")
    has_skip = skip is not None
    return values + (bool(relu), skip if has_skip else np.zeros((0,) * 4, y.dtype), has_skip)


@jit()
def apply(epilogue, y, i):
    """The epilogue (``kernel_argument``) on image i of y (N, O, OH, OW), in place; nothing if
    its center is empty."""
    center, a, b, relu, skip, has_skip = epilogue
    if center.size == 0:
        return
    o = y.shape[1]
    size = y.shape[2] * y.shape[3]
    planes = y[i].reshape(o, size)
    zero = y.dtype.type(0)
    for c in range(o):
        mu, ac, bc = center[c], a[c], b[c]
        row = planes[uidx(c)]
        for q in range(size):
            row[uidx(q)] = (np.float64(row[uidx(q)]) - mu) * ac + bc
        if relu:
            for q in range(size):
                row[uidx(q)] = row[uidx(q)] if row[uidx(q)] > 0 else zero
        if has_skip:
            other = skip[i].reshape(o, size)[uidx(c)]
            for q in range(size):
                v = row[uidx(q)] + other[uidx(q)]
                row[uidx(q)] = v if (v > 0 or v != v) else zero
