"""Numba kernels of a dense layer's fused BN + ReLU block: (N, C) data, one call each way.

Used by ``arraybn.nn.fused.FusedBNBlock`` after a ``Dense`` layer (through ``conv_ops()`` on the
numba backend). The BN arithmetic is the numba backend's own dense kernels on (N, C, 1) data
(``forward_finish_range``, ``center_affine_range``, ``backward_range``, on the calling thread as
the backend runs dense BN), so every value equals the unfused ``BatchNorm``'s; the ReLU is
``arraybn.nn.layers``' to the bit: NumPy's ``maximum(y, 0)`` (NaN passes, -0.0 becomes +0.0),
its gradient ``gy * (y > 0)`` as a multiply (gy * 0 keeps NaN and the sign of zero). What the
fusion saves is the calls: LeNet-5's dense tail ran a BatchNorm layer (the core's checks and
cache) and a ReLU layer (two NumPy passes) each way, for 128 x 120 values.

``mask`` is 1 where the ReLU after the BN let the gradient through, 0 elsewhere (all 1 without a
ReLU after); a ReLU before the BN ran in place on x, which the backward reads. The public
functions take the conv blocks' (``numba_fused_kernels.bn_pool_*``) arguments, so that a block
calls either set the same way; ``k``, the pooling size, must be 1.
"""
import numpy as np

from arraybn.backends.numba_backend import _running_buffer
from arraybn.backends.numba_config import jit
from arraybn.backends.numba_fused_kernels import channel_values, check_input
from arraybn.backends.numba_kernels import backward_range, forward_finish_range
from arraybn.backends.numba_split_kernels import center_affine_range


@jit()
def _relu_mask(y2, relu_after, mask):
    """The ReLU after the BN, in place, and its mask (all 1 without one)."""
    for i in range(y2.shape[0]):
        for j in range(y2.shape[1]):
            v = y2[i, j]
            on = v > 0 or not relu_after
            y2[i, j] = v if on or v != v else 0          # NumPy's maximum(v, 0)
            mask[i, j] = on


@jit()
def _as3(a):
    """(N, C) as the backend kernels' (N, C, 1), a view. (Made here, not by the caller: a
    reshape in Python costs 0.25 us, four of them a backward call.)"""
    return a.reshape(a.shape[0], a.shape[1], 1)


@jit()
def _train_forward(x, gamma, beta, eps, center_only, momentum, running_mean, running_var,
                   relu_after, y, mask, mean, var, inv_std):
    """The backend's training forward (statistics, y, running buffers), then the ReLU: the
    statistics' finite flag."""
    finite = forward_finish_range(_as3(x), gamma, beta, eps, center_only, momentum, running_mean,
                                  running_var, _as3(y), mean, var, inv_std)
    _relu_mask(y, relu_after, mask)
    return finite


@jit()
def _forward(x, center, a, b, relu_after, y, mask):
    """``y = (x - center) * a + b`` (with center 0 the backend's ``affine``), then the ReLU."""
    center_affine_range(_as3(x), center, a, b, 0, x.shape[1], _as3(y))
    _relu_mask(y, relu_after, mask)


@jit()
def _backward(gy, x, mask, mean, scale, w, centered, relu_before, gx, sum_gy, sum_gy_xc):
    """g = gy * mask, the backend's BN backward of g, then gx *= (x > 0) for a ReLU before."""
    g = np.empty_like(gy)
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):      # times exactly 1 or 0: the same in any precision
            g[i, j] = gy[i, j] * (1.0 if mask[i, j] else 0.0)
    backward_range(_as3(g), _as3(x), mean, scale, w, centered, 0, x.shape[1], _as3(gx), sum_gy,
                   sum_gy_xc)
    if relu_before:
        for i in range(gx.shape[0]):
            for j in range(gx.shape[1]):
                gx[i, j] = gx[i, j] * (1.0 if x[i, j] > 0 else 0.0)


def _check_dense(x, k):
    """TypeError unless x is a C-contiguous float (N, C) array, ValueError unless k is 1."""
    check_input(x, ndim=2)
    if k != 1:
        raise ValueError(f"fused BN block: a dense block has no pooling (k = 1); got k = {k}")


def bn_dense_train_forward(x, gamma, beta, eps, center_only, momentum, running_mean, running_var,
                           relu_after, k=1):
    """The training forward of a fused dense block: ``bn_pool_train_forward``'s contract for
    (N, C) x without pooling. Returns ``(y, mask, mean, var, inv_std)``; inv_std is None, and the
    running buffers untouched, when a statistic is NaN or inf."""
    _check_dense(x, k)
    c = x.shape[1]
    y, mask = np.empty_like(x), np.empty(x.shape, np.uint8)
    mean, var, inv_std = np.empty((3, c))
    finite = _train_forward(x, channel_values(gamma, c), channel_values(beta, c), float(eps),
                            bool(center_only), float(momentum),
                            _running_buffer(running_mean, c, "running_mean"),
                            _running_buffer(running_var, c, "running_var"), bool(relu_after),
                            y, mask, mean, var, inv_std)
    return y, mask, mean, var, (inv_std if finite else None)


def bn_dense_forward(x, center, a, b, relu_after, k=1):
    """``(y, mask)`` of ``y = relu?((x - center[c]) * a[c] + b[c])`` for (N, C) x:
    ``bn_pool_forward``'s contract without pooling."""
    _check_dense(x, k)
    c = x.shape[1]
    y, mask = np.empty_like(x), np.empty(x.shape, np.uint8)
    _forward(x, channel_values(center, c), channel_values(a, c), channel_values(b, c),
             bool(relu_after), y, mask)
    return y, mask


def bn_dense_backward(gy, x, mask, mean, scale, w, centered, relu_before, k=1):
    """``(gx, sum_gy, sum_gy_xc)`` of the fused dense block: ``bn_pool_backward``'s contract for
    (N, C) x, ``mask`` from the forward."""
    _check_dense(x, k)
    c = x.shape[1]
    gy = np.ascontiguousarray(gy, dtype=x.dtype)
    if gy.shape != x.shape or mask.shape != x.shape:
        raise ValueError(f"fused BN block: gy {gy.shape} and mask {mask.shape} must have "
                         f"x's shape {x.shape}")
    sum_gy, sum_gy_xc = np.empty((2, c))
    gx = np.empty_like(x)
    _backward(gy, x, mask, channel_values(mean, c), channel_values(scale, c),
              channel_values(w, c), bool(centered), bool(relu_before), gx, sum_gy, sum_gy_xc)
    return gx, sum_gy, sum_gy_xc
