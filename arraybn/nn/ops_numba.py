"""Numba kernels for the trainer's CPU hot spots: direct 2-D convolution and max pooling.

Used by ``Conv2d``/``MaxPool2d`` on the 'numba' backend only. The public functions are plain
Python that validate, pad and allocate; the ``@njit`` kernels are private and write into
preallocated outputs. Loops run over the batch in parallel (``prange``) with the innermost loop
along the contiguous output row, so it vectorizes. Compile flags come from ``_JIT``.
"""
import numba
import numpy as np

_JIT = dict(cache=True, nogil=True, fastmath=False)


@numba.njit(parallel=True, **_JIT)
def _conv_forward(x, w, b, stride, y):
    n_batch, n_in, _, _ = x.shape
    n_out, _, kh, kw = w.shape
    oh, ow = y.shape[2], y.shape[3]
    for n in numba.prange(n_batch):
        for o in range(n_out):
            acc = y[n, o]
            acc[:, :] = b[o]
            for c in range(n_in):
                for ki in range(kh):
                    for kj in range(kw):
                        wv = w[o, c, ki, kj]
                        for i in range(oh):
                            row = x[n, c, i * stride + ki]
                            out_row = acc[i]
                            for j in range(ow):
                                out_row[j] += wv * row[j * stride + kj]


@numba.njit(parallel=True, **_JIT)
def _conv_backward_input(gy, w, stride, gx):
    n_batch, n_out, oh, ow = gy.shape
    _, n_in, kh, kw = w.shape
    for n in numba.prange(n_batch):
        gx[n] = 0
        for o in range(n_out):
            for c in range(n_in):
                for ki in range(kh):
                    for kj in range(kw):
                        wv = w[o, c, ki, kj]
                        for i in range(oh):
                            g_row = gy[n, o, i]
                            x_row = gx[n, c, i * stride + ki]
                            for j in range(ow):
                                x_row[j * stride + kj] += wv * g_row[j]


@numba.njit(parallel=True, **_JIT)
def _conv_backward_weight(gy, x, stride, partial):
    """partial: (chunks, O, C, kh, kw) float64; chunk t sums the samples t, t+chunks, ..."""
    n_batch, n_out, oh, ow = gy.shape
    chunks, _, n_in, kh, kw = partial.shape
    for t in numba.prange(chunks):
        part = partial[t]
        part[...] = 0.0
        for n in range(t, n_batch, chunks):
            for o in range(n_out):
                for c in range(n_in):
                    for ki in range(kh):
                        for kj in range(kw):
                            acc = 0.0
                            for i in range(oh):
                                g_row = gy[n, o, i]
                                x_row = x[n, c, i * stride + ki]
                                for j in range(ow):
                                    acc += g_row[j] * x_row[j * stride + kj]
                            part[o, c, ki, kj] += acc


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


def _pad(x, pad):
    if pad == 0:
        return np.ascontiguousarray(x)
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def conv2d_forward(x, weight, bias, stride, pad):
    """x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> y: (N, O, OH, OW)."""
    xp_ = _pad(x, pad)
    o, _, kh, kw = weight.shape
    oh = (xp_.shape[2] - kh) // stride + 1
    ow = (xp_.shape[3] - kw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is too small for a {kh}x{kw} kernel "
                         f"with padding {pad}")
    y = np.empty((x.shape[0], o, oh, ow), dtype=x.dtype)
    b = np.zeros(o, dtype=x.dtype) if bias is None else bias
    _conv_forward(xp_, np.ascontiguousarray(weight), b, stride, y)
    return y


def conv2d_backward(gy, x, weight, stride, pad, has_bias, need_gx=True):
    """(gx or None, gweight, gbias or None) for ``conv2d_forward``; gweight summed in float64."""
    gy = np.ascontiguousarray(gy)
    xp_ = _pad(x, pad)
    chunks = min(numba.get_num_threads(), gy.shape[0])
    partial = np.empty((chunks,) + weight.shape, dtype=np.float64)
    _conv_backward_weight(gy, xp_, stride, partial)
    gweight = partial.sum(axis=0).astype(weight.dtype)
    gbias = gy.sum(axis=(0, 2, 3)) if has_bias else None
    gx = None
    if need_gx:
        gx = np.empty(xp_.shape, dtype=gy.dtype)
        _conv_backward_input(gy, np.ascontiguousarray(weight), stride, gx)
        if pad:
            gx = gx[:, :, pad:-pad, pad:-pad]
    return gx, gweight, gbias


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
