"""Numba kernels for BN under a communicator: the fused passes' steps, taken apart.

Under ``comm=`` the group's statistics and backward sums come from every rank, so the fused
training forward and backward of ``numba_kernels`` cannot run in one call. These kernels are
the steps in between, built from the same block passes (same blocking, lanes and order of
additions, so the sums equal the fused backward's bit for bit and gx agrees with it when given the
same sums and count):

- ``center_affine_*``: ``y = (x - center[c]) * a[c] + b[c]``;
- ``backward_sums_*``: ``sum(gy)`` and ``sum(gy * (x - mean))`` per channel;
- ``backward_gx_*``: the centred gx from given sums and count.

Each comes as ``*_range`` (channels lo..hi-1 on the calling thread) and ``*_parallel``.
"""
import numpy as np
from numba import prange

from arraybn.backends.numba_config import jit as _jit
from arraybn.backends.numba_kernels import (SCALAR_MIN, _block_affine, _block_size,
                                            _fold_channels, _gx_channels, _gx_rows, _lanes_of,
                                            _per_channel_lanes, _rows, _scratch, _spread,
                                            _sum_grad_rows, _task_range)


@_jit()
def _block_grad_sums(gy3, x3, mean, c0, c1, scratch, sum_gy, sum_gy_xc):
    m, per = x3.shape[2], _per_channel_lanes(x3)
    center, lanes_gy = _lanes_of(scratch, 0, x3, c0, c1), _lanes_of(scratch, 1, x3, c0, c1)
    lanes_gy_xc = _lanes_of(scratch, 2, x3, c0, c1)
    _spread(mean, c0, per, center)
    lanes_gy[:] = 0.0
    lanes_gy_xc[:] = 0.0
    _sum_grad_rows(_rows(gy3), _rows(x3), c0 * m, c1 * m, center, lanes_gy, lanes_gy_xc)
    _fold_channels(lanes_gy, per, sum_gy, c0)
    _fold_channels(lanes_gy_xc, per, sum_gy_xc, c0)


@_jit()
def _block_gx(gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, count, c0, c1, scratch, gx3):
    """gx = scale * (gy - sum_gy / count - w * (x - mean) * sum_gy_xc / count) for the block."""
    gy2, x2, gx2 = _rows(gy3), _rows(x3), _rows(gx3)
    m, per = x3.shape[2], _per_channel_lanes(x3)
    a_x, b = np.empty(x3.shape[1]), np.empty(x3.shape[1])
    for c in range(c0, c1):
        a_x[c] = -scale[c] * (w[c] * sum_gy_xc[c] / count)
        b[c] = -scale[c] * (sum_gy[c] / count)
    if m >= SCALAR_MIN:
        _gx_channels(gy2, x2, m, c0, c1, mean, scale, a_x, b, gx2)
        return
    center, a_gy = _lanes_of(scratch, 0, x3, c0, c1), _lanes_of(scratch, 1, x3, c0, c1)
    a_x_l, b_l = _lanes_of(scratch, 2, x3, c0, c1), _lanes_of(scratch, 3, x3, c0, c1)
    _spread(mean, c0, per, center)
    _spread(scale, c0, per, a_gy)
    _spread(a_x, c0, per, a_x_l)
    _spread(b, c0, per, b_l)
    _gx_rows(gy2, x2, c0 * m, c1 * m, center, a_gy, a_x_l, b_l, gx2)


@_jit()
def center_affine_range(x3, center, a, b, lo, hi, y3):
    """y3 = (x3 - center[c]) * a[c] + b[c] for channels lo..hi-1."""
    scratch, size = _scratch(x3, 3), _block_size(x3)
    for c0 in range(lo, hi, size):
        _block_affine(x3, c0, min(c0 + size, hi), scratch, center, a, b, y3)


@_jit()
def backward_sums_range(gy3, x3, mean, lo, hi, sum_gy, sum_gy_xc):
    scratch, size = _scratch(x3, 3), _block_size(x3)
    for c0 in range(lo, hi, size):
        _block_grad_sums(gy3, x3, mean, c0, min(c0 + size, hi), scratch, sum_gy, sum_gy_xc)


@_jit()
def backward_gx_range(gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, count, lo, hi, gx3):
    scratch, size = _scratch(x3, 4), _block_size(x3)
    for c0 in range(lo, hi, size):
        _block_gx(gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, count, c0, min(c0 + size, hi),
                  scratch, gx3)


@_jit(parallel=True)
def center_affine_parallel(x3, center, a, b, tasks, y3):
    for task in prange(tasks):
        lo, hi = _task_range(task, tasks, x3.shape[1])
        center_affine_range(x3, center, a, b, lo, hi, y3)


@_jit(parallel=True)
def backward_sums_parallel(gy3, x3, mean, tasks, sum_gy, sum_gy_xc):
    for task in prange(tasks):
        lo, hi = _task_range(task, tasks, x3.shape[1])
        backward_sums_range(gy3, x3, mean, lo, hi, sum_gy, sum_gy_xc)


@_jit(parallel=True)
def backward_gx_parallel(gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, count, tasks, gx3):
    for task in prange(tasks):
        lo, hi = _task_range(task, tasks, x3.shape[1])
        backward_gx_range(gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, count, lo, hi, gx3)
