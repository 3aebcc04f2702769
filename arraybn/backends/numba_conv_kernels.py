"""Numba kernels for the trainer's CPU hot spots: col2im with fused padding, and max pooling.

Used by ``Conv2d``/``MaxPool2d`` on the 'numba' backend only. Measured on LeNet-5's layers
(batch 128, one thread): the GEMMs stay in BLAS (a direct convolution loop in Numba was 3-10x
slower than im2col + GEMM), and im2col stays the plain NumPy one (nine strided slice copies beat
a Numba loop 2-3x), while col2im's scatter-add and pooling are 1.5-10x faster here. The public
functions are plain Python that validate and allocate; the ``@njit`` kernels are private and write
into preallocated outputs, in parallel over the batch. Compile flags come from
``numba_config.jit``, shared with the BN kernels.
"""
import numba
import numpy as np

from arraybn.backends.numba_config import jit
from arraybn.backends.numba_fused_kernels import bn_pool_backward, bn_pool_forward  # noqa: F401


@jit()
def _valid_columns(offset, stride, width, ow):
    """Output columns j in [j0, j1) whose input column j * stride + offset lies in [0, width)."""
    j0 = 0 if offset >= 0 else (-offset + stride - 1) // stride
    j1 = min(ow, (width - 1 - offset) // stride + 1) if width - 1 - offset >= 0 else 0
    return j0, max(j0, j1)


@jit(parallel=True)
def _col2im(gcols, kh, kw, stride, pad, gx):
    """The adjoint of ``arraybn.nn.conv.im2col``: gx[n, c, y, x] = sum of the cols entries that
    read it."""
    n_batch, n_in, h, w = gx.shape
    ow = (w + 2 * pad - kw) // stride + 1
    oh = gcols.shape[2] // ow
    for n in numba.prange(n_batch):
        gx[n] = 0
        for c in range(n_in):
            for ki in range(kh):
                for kj in range(kw):
                    r = (c * kh + ki) * kw + kj
                    off = kj - pad
                    j0, j1 = _valid_columns(off, stride, w, ow)
                    for i in range(oh):
                        src, base = i * stride + ki - pad, i * ow
                        if src < 0 or src >= h:
                            continue
                        if stride == 1:
                            for j in range(j0, j1):
                                gx[n, c, src, j + off] += gcols[n, r, base + j]
                        else:
                            for j in range(j0, j1):
                                gx[n, c, src, j * stride + off] += gcols[n, r, base + j]


@jit(parallel=True)
def _maxpool_forward(x, k, y, argmax):
    n_batch, n_ch, oh, ow = y.shape
    for n in numba.prange(n_batch):
        for c in range(n_ch):
            for i in range(oh):
                for j in range(ow):
                    best = x[n, c, i * k, j * k]
                    best_at = 0
                    for di in range(k):
                        for dj in range(k):
                            v = x[n, c, i * k + di, j * k + dj]
                            if v > best:           # strict: the first maximum wins, like PyTorch
                                best, best_at = v, di * k + dj
                    y[n, c, i, j] = best
                    argmax[n, c, i, j] = best_at


@jit(parallel=True)
def _maxpool_backward(gy, argmax, k, gx):
    n_batch, n_ch, oh, ow = gy.shape
    for n in numba.prange(n_batch):
        gx[n] = 0
        for c in range(n_ch):
            for i in range(oh):
                for j in range(ow):
                    at = argmax[n, c, i, j]
                    gx[n, c, i * k + at // k, j * k + at % k] = gy[n, c, i, j]


def col2im(gcols, x_shape, kh, kw, stride, pad):
    """gcols (N, C*kh*kw, OH*OW) -> gx (N, C, H, W), overlapping contributions summed."""
    gx = np.empty(x_shape, dtype=gcols.dtype)
    _col2im(np.ascontiguousarray(gcols), kh, kw, stride, pad, gx)
    return gx


def maxpool2d_forward(x, k):
    """x: (N, C, H, W) -> (y (N, C, H//k, W//k), argmax uint8 window offsets)."""
    n, c, h, w = x.shape
    if h < k or w < k:
        raise ValueError(f"max pooling {k}x{k} needs inputs of at least {k}x{k}; got {h}x{w}")
    y = np.empty((n, c, h // k, w // k), dtype=x.dtype)
    argmax = np.empty(y.shape, dtype=np.uint8 if k * k < 256 else np.int32)
    _maxpool_forward(np.ascontiguousarray(x), k, y, argmax)
    return y, argmax


def maxpool2d_backward(gy, argmax, x_shape, k):
    gx = np.empty(x_shape, dtype=gy.dtype)
    _maxpool_backward(np.ascontiguousarray(gy), argmax, k, gx)
    return gx
