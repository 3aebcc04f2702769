"""Numba kernels of a fused conv block: BN's normalisation, a ReLU and max pooling in one pass.

Used by ``arraybn.nn.fused.FusedBNBlock`` through ``Backend.conv_ops()`` on the numba backend. The
per-channel statistics and running-buffer updates stay the backend's own kernels (``moments``,
``finish_statistics``), so they are bit-identical to the unfused path; these kernels replace the
element-wise passes around them:

- forward: ``y = (x - center[c]) * a[c] + b[c]`` rounded once to x's dtype (the unfused
  ``affine``), then the ReLU (``relu_after``), then k x k max pooling (stride k, floor mode; k = 1
  is no pooling). Only the pooled output is written, with each window's argmax offset (the first
  maximum in row-major order, as PyTorch), or ``INACTIVE`` where the ReLU let no gradient through.
- backward: the BN sums ``sum(g)`` and ``sum(g * (x - mean))`` over the pooled positions only
  (every other position of the unpooled gradient is zero), in float64; then one pass writes
  ``gx = a_gy[c] * g + ((x - mean[c]) * a_x[c] + b[c])`` (the unfused BN backward's formula),
  zeroed where ``x <= 0`` when a ReLU came before the BN (``relu_before``: x is its output).

The public functions validate and allocate; the ``@njit`` kernels write into preallocated arrays.
They run on the calling thread: at LeNet-5's sizes one pass costs less than waking a second one.
"""
import numpy as np

from arraybn.backends.numba_config import jit

INACTIVE = 255          # argmax value of a window whose maximum the ReLU zeroed (no gradient)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@jit()
def _normalize_pool(x, center, a, b, relu_after, k, rows, y, argmax):
    """y, argmax of the pooled, normalised (and ReLU'd) x; ``rows`` is (k, W) in x's dtype."""
    n_batch, n_ch, oh, ow = y.shape
    width = x.shape[3]
    for n in range(n_batch):
        for c in range(n_ch):
            mu, ac, bc = center[c], a[c], b[c]
            for i in range(oh):
                for di in range(k):
                    src, dst = x[n, c, i * k + di], rows[di]
                    for j in range(width):
                        dst[j] = (np.float64(src[j]) - mu) * ac + bc     # rounded once here
                for j in range(ow):
                    best = rows[0, j * k]
                    best_at = 0
                    for di in range(k):
                        for dj in range(k):
                            v = rows[di, j * k + dj]
                            if v > best:          # strict: the first maximum wins, like PyTorch
                                best, best_at = v, di * k + dj
                    if relu_after and not best > 0:
                        y[n, c, i, j] = 0
                        argmax[n, c, i, j] = INACTIVE
                    else:
                        y[n, c, i, j] = best
                        argmax[n, c, i, j] = best_at


@jit()
def _pooled_sums(gy, x, argmax, mean, k, sum_gy, sum_gy_xc):
    """Per channel, in float64: sum of gy and of gy * (x - mean) at each window's argmax."""
    n_batch, n_ch, oh, ow = gy.shape
    sum_gy[:] = 0.0
    sum_gy_xc[:] = 0.0
    for n in range(n_batch):
        for c in range(n_ch):
            mu, s, s_xc = mean[c], 0.0, 0.0
            for i in range(oh):
                for j in range(ow):
                    at = argmax[n, c, i, j]
                    if at == INACTIVE:
                        continue
                    g = np.float64(gy[n, c, i, j])
                    s += g
                    s_xc += g * (np.float64(x[n, c, i * k + at // k, j * k + at % k]) - mu)
            sum_gy[c] += s
            sum_gy_xc[c] += s_xc


@jit()
def _unpool_gx(gy, x, argmax, mean, a_gy, a_x, b, k, relu_before, gx):
    """gx = a_gy * g + ((x - mean) * a_x + b), g the unpooled gradient; 0 where x <= 0 if
    ``relu_before``."""
    n_batch, n_ch, h, w = x.shape
    oh, ow = gy.shape[2], gy.shape[3]
    for n in range(n_batch):
        for c in range(n_ch):
            mu, ag, ax, bc = mean[c], a_gy[c], a_x[c], b[c]
            for r in range(h):
                src, dst = x[n, c, r], gx[n, c, r]
                for j in range(w):
                    dst[j] = (np.float64(src[j]) - mu) * ax + bc
            for i in range(oh):
                for j in range(ow):
                    at = argmax[n, c, i, j]
                    if at == INACTIVE:
                        continue
                    r, col = i * k + at // k, j * k + at % k
                    gx[n, c, r, col] = ag * np.float64(gy[n, c, i, j]) + (
                        (np.float64(x[n, c, r, col]) - mu) * ax + bc)
            if relu_before:
                for r in range(h):
                    src, dst = x[n, c, r], gx[n, c, r]
                    for j in range(w):
                        if not src[j] > 0:
                            dst[j] = 0


def _check_input(x):
    if not (isinstance(x, np.ndarray) and x.ndim == 4 and x.dtype in _FLOATS
            and x.flags.c_contiguous):
        raise TypeError(f"fused BN block: x must be a C-contiguous float32/float64 NumPy array of "
                        f"shape (N, C, H, W); got {type(x).__name__} {getattr(x, 'dtype', '')} "
                        f"{getattr(x, 'shape', '')}")


def _channels(values, channels):
    arr = np.ascontiguousarray(values, dtype=np.float64)
    if arr.shape != (channels,):
        raise ValueError(f"fused BN block: per-channel values must have shape ({channels},); "
                         f"got {arr.shape}")
    return arr


def bn_pool_forward(x, center, a, b, relu_after, k):
    """x (N, C, H, W) -> (y (N, C, H//k, W//k), argmax uint8 (same shape)).

    ``y = pool(relu?((x - center) * a + b))``; argmax holds each window's offset ``di * k + dj``
    or ``INACTIVE`` where ``relu_after`` zeroed the window's maximum.
    """
    _check_input(x)
    n, c, h, w = x.shape
    if h < k or w < k or not 1 <= k * k < INACTIVE:
        raise ValueError(f"fused BN block: pooling {k}x{k} needs inputs of at least {k}x{k} and "
                         f"k*k < {INACTIVE}; got {h}x{w}")
    y = np.empty((n, c, h // k, w // k), dtype=x.dtype)
    argmax = np.empty(y.shape, dtype=np.uint8)
    rows = np.empty((k, w), dtype=x.dtype)
    _normalize_pool(x, _channels(center, c), _channels(a, c), _channels(b, c), bool(relu_after),
                    int(k), rows, y, argmax)
    return y, argmax


def bn_pool_backward(gy, x, argmax, mean, scale, w, centered, relu_before, k):
    """The BN backward through the pooling (and ReLUs) of ``bn_pool_forward``.

    gy: (N, C, H//k, W//k) gradient of the pooled output; x: the BN's input (N, C, H, W);
    mean, scale (= gamma * xhat scale), w: the BN cache's per-channel values; ``centered``: the
    statistics came from this batch. Returns ``(gx, sum_gy, sum_gy_xc)`` like
    ``Backend.backward``, sums over the unpooled gradient (float64).
    """
    _check_input(x)
    gy = np.ascontiguousarray(gy, dtype=x.dtype)
    if gy.shape != argmax.shape or argmax.shape[:2] != x.shape[:2]:
        raise ValueError(f"fused BN block: gy {gy.shape} and argmax {argmax.shape} must be the "
                         f"pooled shape of x {x.shape}")
    channels = x.shape[1]
    mean, scale, w = (_channels(v, channels) for v in (mean, scale, w))
    sum_gy, sum_gy_xc = np.empty(channels), np.empty(channels)
    _pooled_sums(gy, x, argmax, mean, int(k), sum_gy, sum_gy_xc)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if centered:          # gx = scale * (g - sum_gy / m - w * (x - mean) * sum_gy_xc / m)
        a_x, b = -scale * (w * sum_gy_xc / count), -scale * (sum_gy / count)
    else:                 # statistics are constants: gx = scale * g
        a_x = b = np.zeros(channels)
    gx = np.empty_like(x)
    _unpool_gx(gy, x, argmax, mean, scale, a_x, b, int(k), bool(relu_before), gx)
    return gx, sum_gy, sum_gy_xc
