"""Numba kernels for the trainer's CPU hot spots: im2col/col2im with fused padding, max pooling.

Used by ``Conv2d``/``MaxPool2d`` on the 'numba' backend only (the GEMMs stay in BLAS: a direct
convolution loop in Numba measured 3-10x slower than im2col + GEMM for LeNet's layers). The public
functions are plain Python that validate and allocate; the ``@njit`` kernels are private and write
into preallocated outputs, in parallel over the batch. Compile flags come from ``_JIT``.
"""
import numba
import numpy as np

_JIT = dict(cache=True, nogil=True, fastmath=False)


@numba.njit(parallel=True, **_JIT)
def _im2col(x, kh, kw, stride, pad, cols):
    """cols[n, (c, ki, kj), (i, j)] = x[n, c, i*stride + ki - pad, j*stride + kj - pad] or 0."""
    n_batch, n_in, h, w = x.shape
    ow = (w + 2 * pad - kw) // stride + 1
    oh = cols.shape[2] // ow
    for n in numba.prange(n_batch):
        for c in range(n_in):
            for ki in range(kh):
                for kj in range(kw):
                    row = cols[n, (c * kh + ki) * kw + kj]
                    for i in range(oh):
                        src = i * stride + ki - pad
                        for j in range(ow):
                            col = j * stride + kj - pad
                            inside = 0 <= src < h and 0 <= col < w
                            row[i * ow + j] = x[n, c, src, col] if inside else 0


@numba.njit(parallel=True, **_JIT)
def _col2im(gcols, kh, kw, stride, pad, gx):
    """The adjoint of ``_im2col``: gx[n, c, y, x] = sum of the cols entries that read it."""
    n_batch, n_in, h, w = gx.shape
    ow = (w + 2 * pad - kw) // stride + 1
    oh = gcols.shape[2] // ow
    for n in numba.prange(n_batch):
        gx[n] = 0
        for c in range(n_in):
            for ki in range(kh):
                for kj in range(kw):
                    row = gcols[n, (c * kh + ki) * kw + kj]
                    for i in range(oh):
                        src = i * stride + ki - pad
                        if 0 <= src < h:
                            for j in range(ow):
                                col = j * stride + kj - pad
                                if 0 <= col < w:
                                    gx[n, c, src, col] += row[i * ow + j]


@numba.njit(parallel=True, **_JIT)
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


@numba.njit(parallel=True, **_JIT)
def _maxpool_backward(gy, argmax, k, gx):
    n_batch, n_ch, oh, ow = gy.shape
    for n in numba.prange(n_batch):
        gx[n] = 0
        for c in range(n_ch):
            for i in range(oh):
                for j in range(ow):
                    at = argmax[n, c, i, j]
                    gx[n, c, i * k + at // k, j * k + at % k] = gy[n, c, i, j]


def _out_size(size, k, stride, pad):
    out = (size + 2 * pad - k) // stride + 1
    if out < 1:
        raise ValueError(f"input size {size} is too small for kernel {k} with padding {pad}; "
                         "use a larger input or a smaller kernel")
    return out


def im2col(x, kh, kw, stride, pad):
    """x: (N, C, H, W) -> cols (N, C*kh*kw, OH*OW), zero padding fused (no padded copy)."""
    n, c, h, w = x.shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    cols = np.empty((n, c * kh * kw, oh * ow), dtype=x.dtype)
    _im2col(np.ascontiguousarray(x), kh, kw, stride, pad, cols)
    return cols


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
