"""Private Numba kernels of the numba backend; they write into preallocated outputs.

Shapes: data ``x3``/``gy3``/``y3`` is (N, C, M) C-contiguous float32 or float64; per-channel arrays
are float64 (C,). All arithmetic is float64 and each element is rounded once, when stored.

Two layouts, picked by the caller:

- conv (M > 1): ``prange`` over channels; one thread owns a whole channel and makes all its passes
  back to back, so after the first pass the channel is read from cache, not DRAM. Sums run into
  ``LANES`` float64 accumulators (lane j takes elements j, j + LANES, ... of each row, rows in
  order) that are folded pairwise. The order depends on the shape only, so results are
  bit-identical for any number of threads, and the lane loops vectorize without fastmath.
- dense (M == 1, data viewed as (N, C)): channel-wise strided access would be slow, so the rows
  are walked in order over a block of channels, with one accumulator per channel; the sum of each
  channel still runs over n in order, whatever the blocks are.

Each kernel exists as ``*_range`` (channels lo..hi-1 on the calling thread, for small inputs) and
``*_parallel`` (blocks of channels shared out with ``prange``).

Compile flags come from ``_jit`` only: cached on disk, fastmath off (these are statistics).
"""
import functools
import warnings

import numpy as np
from numba import njit, prange

LANES = 128                      # float64 accumulators per channel: 1 KiB, stays in L1
CHUNK = 4096                     # values per chunk of the one-read channel statistics
_FLAGS = dict(fastmath=False, nogil=True, error_model="numpy", boundscheck=False)


def _jit(parallel=False):
    """The one place compile flags are set: ``cache=True``, and ``parallel`` where it pays.

    Numba writes its cache next to this module, or in its user-wide cache directory when that is
    read-only; if neither can be written, the kernels still work, compiled once per process.
    """
    def decorate(func):
        try:
            return njit(cache=True, parallel=parallel, **_FLAGS)(func)
        except RuntimeError:                 # numba: "cannot cache function ...: no locator"
            _warn_not_cached()
            return njit(cache=False, parallel=parallel, **_FLAGS)(func)
    return decorate


@functools.lru_cache(maxsize=None)
def _warn_not_cached():
    warnings.warn(f"arraybn: no writable Numba cache directory for {__file__}, so its kernels "
                  "are compiled again in every process; set NUMBA_CACHE_DIR to a writable "
                  "directory to keep them", UserWarning, stacklevel=4)


# ----------------------------------------------------------------------------- lane helpers

@_jit()
def _fold(acc):
    """Sum of ``acc`` by pairwise folding in place (fixed order, vectorizable); destroys acc."""
    length = acc.shape[0]
    if length == 0:
        return 0.0
    while length > 1:
        half = length // 2
        rest = length - half
        for i in range(half):
            acc[i] += acc[rest + i]
        length = rest
    return acc[0]


@_jit()
def _lane_sum(x3, c, n0, n1, acc):
    """sum of x3[n0:n1, c, :] in float64."""
    lanes = acc[:min(LANES, x3.shape[2])]
    lanes[:] = 0.0
    for n in range(n0, n1):
        row = x3[n, c]
        for start in range(0, row.shape[0], LANES):
            part = row[start:start + LANES]
            for j in range(part.shape[0]):
                lanes[j] += part[j]
    return _fold(lanes)


@_jit()
def _lane_sq_dev(x3, c, n0, n1, mean, acc):
    """sum of (x3[n0:n1, c, :] - mean)**2 in float64."""
    lanes = acc[:min(LANES, x3.shape[2])]
    lanes[:] = 0.0
    for n in range(n0, n1):
        row = x3[n, c]
        for start in range(0, row.shape[0], LANES):
            part = row[start:start + LANES]
            for j in range(part.shape[0]):
                d = part[j] - mean
                lanes[j] += d * d
    return _fold(lanes)


@_jit()
def _channel_moments(x3, c, acc):
    """(mean, biased var) of channel c, reading it once from memory.

    The channel is cut into chunks of about ``CHUNK`` values (whole rows). Each chunk gets an
    two-pass mean and sum of squared deviations (its second pass hits L1/L2), and the
    chunks are merged in order with Chan et al.'s pairwise update, which is as stable as two
    passes over the whole channel.
    """
    width = x3.shape[2]
    rows = max(1, CHUNK // max(width, 1))
    count, mean, m2 = 0.0, 0.0, 0.0
    for n0 in range(0, x3.shape[0], rows):
        n1 = min(n0 + rows, x3.shape[0])
        k = float((n1 - n0) * width)
        mean_k = _lane_sum(x3, c, n0, n1, acc) / k
        m2_k = _lane_sq_dev(x3, c, n0, n1, mean_k, acc)
        total = count + k
        delta = mean_k - mean
        mean += delta * (k / total)
        m2 += m2_k + delta * delta * (count * k / total)
        count = total
    return (mean, m2 / count) if count > 0 else (np.nan, np.nan)


@_jit()
def _channel_centered_affine(x3, c, center, a, b, y3):
    """y3[n, c, :] = (x3[n, c, :] - center) * a + b."""
    for n in range(x3.shape[0]):
        row, out = x3[n, c], y3[n, c]
        for m in range(row.shape[0]):
            out[m] = (row[m] - center) * a + b


@_jit()
def _channel_grad_sums(gy3, x3, c, center, acc_gy, acc_gy_xc):
    """(sum gy, sum gy * (x - center)) over channel c."""
    lanes_gy, lanes_gy_xc = acc_gy[:min(LANES, x3.shape[2])], acc_gy_xc[:min(LANES, x3.shape[2])]
    lanes_gy[:] = 0.0
    lanes_gy_xc[:] = 0.0
    for n in range(x3.shape[0]):
        grow, xrow = gy3[n, c], x3[n, c]
        for start in range(0, xrow.shape[0], LANES):
            gpart, xpart = grow[start:start + LANES], xrow[start:start + LANES]
            for j in range(xpart.shape[0]):
                g = np.float64(gpart[j])
                lanes_gy[j] += g
                lanes_gy_xc[j] += g * (xpart[j] - center)
    return _fold(lanes_gy), _fold(lanes_gy_xc)


@_jit()
def _channel_gx(gy3, x3, c, center, scale, k_gy, k_xc, gx3):
    """gx3[n, c, :] = scale * (gy - k_gy - k_xc * (x - center))."""
    for n in range(x3.shape[0]):
        grow, xrow, out = gy3[n, c], x3[n, c], gx3[n, c]
        for m in range(xrow.shape[0]):
            out[m] = scale * (grow[m] - k_gy - k_xc * (xrow[m] - center))


# ----------------------------------------------------------------------------- dense (M == 1)

@_jit()
def _dense_moments_block(x2, lo, hi, mean, var):
    """mean[lo:hi], var[lo:hi] of x2 (N, C) by row-wise passes.

    Loops run over slices from index 0 so that Numba drops negative-index handling and vectorizes.
    """
    n_rows = x2.shape[0]
    mean_b, var_b = mean[lo:hi], var[lo:hi]
    mean_b[:] = 0.0
    var_b[:] = 0.0
    for n in range(n_rows):
        row = x2[n, lo:hi]
        for j in range(row.shape[0]):
            mean_b[j] += row[j]
    for j in range(mean_b.shape[0]):
        mean_b[j] /= n_rows
    for n in range(n_rows):
        row = x2[n, lo:hi]
        for j in range(row.shape[0]):
            d = row[j] - mean_b[j]
            var_b[j] += d * d
    for j in range(var_b.shape[0]):
        var_b[j] /= n_rows


@_jit()
def _dense_centered_affine_block(x2, lo, hi, center, a, b, y2):
    """y2[:, lo:hi] = (x2[:, lo:hi] - center[lo:hi]) * a[lo:hi] + b[lo:hi]."""
    center_b, a_b, b_b = center[lo:hi], a[lo:hi], b[lo:hi]
    for n in range(x2.shape[0]):
        row, out = x2[n, lo:hi], y2[n, lo:hi]
        for j in range(row.shape[0]):
            out[j] = (row[j] - center_b[j]) * a_b[j] + b_b[j]


@_jit()
def _dense_grad_sums_block(gy2, x2, lo, hi, mean, sum_gy, sum_gy_xc):
    """sum_gy[lo:hi], sum_gy_xc[lo:hi] over the rows of gy2, x2 (N, C)."""
    mean_b, s_gy, s_gy_xc = mean[lo:hi], sum_gy[lo:hi], sum_gy_xc[lo:hi]
    s_gy[:] = 0.0
    s_gy_xc[:] = 0.0
    for n in range(x2.shape[0]):
        grow, xrow = gy2[n, lo:hi], x2[n, lo:hi]
        for j in range(xrow.shape[0]):
            g = np.float64(grow[j])
            s_gy[j] += g
            s_gy_xc[j] += g * (xrow[j] - mean_b[j])


@_jit()
def _dense_gx_block(gy2, x2, lo, hi, mean, scale, k_gy, k_xc, gx2):
    """gx2[:, lo:hi] = scale * (gy - k_gy - k_xc * (x - mean)), per channel coefficients."""
    mean_b, scale_b, k_gy_b, k_xc_b = mean[lo:hi], scale[lo:hi], k_gy[lo:hi], k_xc[lo:hi]
    for n in range(x2.shape[0]):
        grow, xrow, out = gy2[n, lo:hi], x2[n, lo:hi], gx2[n, lo:hi]
        for j in range(xrow.shape[0]):
            out[j] = scale_b[j] * (grow[j] - k_gy_b[j] - k_xc_b[j] * (xrow[j] - mean_b[j]))


@_jit()
def _dense_backward_block(gy2, x2, mean, scale, w, centered, lo, hi, gx2, sum_gy, sum_gy_xc):
    n_rows = x2.shape[0]
    _dense_grad_sums_block(gy2, x2, lo, hi, mean, sum_gy, sum_gy_xc)
    k_gy, k_xc = np.zeros(x2.shape[1]), np.zeros(x2.shape[1])
    if centered:
        for c in range(lo, hi):
            k_gy[c] = sum_gy[c] / n_rows
            k_xc[c] = w[c] * sum_gy_xc[c] / n_rows
        _dense_gx_block(gy2, x2, lo, hi, mean, scale, k_gy, k_xc, gx2)
    else:
        _dense_centered_affine_block(gy2, lo, hi, k_gy, scale, k_xc, gx2)


# ----------------------------------------------------------------------------- channel ranges

@_jit()
def _rows(x3):
    """(N, C, 1) data as its (N, C) view."""
    return x3.reshape(x3.shape[0], x3.shape[1])


@_jit()
def moments_range(x3, lo, hi, mean, var):
    """mean[lo:hi], var[lo:hi] (biased) of channels lo..hi-1."""
    if x3.shape[2] == 1:
        _dense_moments_block(_rows(x3), lo, hi, mean, var)
        return
    acc = np.empty(LANES)
    for c in range(lo, hi):
        mean[c], var[c] = _channel_moments(x3, c, acc)


@_jit()
def forward_range(x3, gamma, beta, eps, center_only, lo, hi, y3, mean, var):
    """Training forward of channels lo..hi-1: statistics into mean/var, y into y3."""
    if x3.shape[2] == 1:
        _dense_moments_block(_rows(x3), lo, hi, mean, var)
        a = np.empty(x3.shape[1])
        for c in range(lo, hi):
            a[c] = gamma[c] if center_only else gamma[c] / np.sqrt(var[c] + eps)
        _dense_centered_affine_block(_rows(x3), lo, hi, mean, a, beta, _rows(y3))
        return
    acc = np.empty(LANES)
    for c in range(lo, hi):
        mu, sigma2 = _channel_moments(x3, c, acc)
        a_c = gamma[c] if center_only else gamma[c] / np.sqrt(sigma2 + eps)
        _channel_centered_affine(x3, c, mu, a_c, beta[c], y3)
        mean[c], var[c] = mu, sigma2


@_jit()
def affine_range(x3, a, b, lo, hi, y3):
    """y3 = a[c] * x3 + b[c] for channels lo..hi-1."""
    if x3.shape[2] == 1:
        zero = np.zeros(x3.shape[1])
        _dense_centered_affine_block(_rows(x3), lo, hi, zero, a, b, _rows(y3))
        return
    for c in range(lo, hi):
        _channel_centered_affine(x3, c, 0.0, a[c], b[c], y3)


@_jit()
def backward_range(gy3, x3, mean, scale, w, centered, lo, hi, gx3, sum_gy, sum_gy_xc):
    """Backward sums and gx (see ``arraybn.backends.base``) of channels lo..hi-1."""
    count = x3.shape[0] * x3.shape[2]
    if x3.shape[2] == 1:
        _dense_backward_block(_rows(gy3), _rows(x3), mean, scale, w, centered, lo, hi,
                              _rows(gx3), sum_gy, sum_gy_xc)
        return
    acc_gy, acc_gy_xc = np.empty(LANES), np.empty(LANES)
    for c in range(lo, hi):
        s_gy, s_gy_xc = _channel_grad_sums(gy3, x3, c, mean[c], acc_gy, acc_gy_xc)
        if centered:
            _channel_gx(gy3, x3, c, mean[c], scale[c], s_gy / count, w[c] * s_gy_xc / count, gx3)
        else:
            _channel_centered_affine(gy3, c, 0.0, scale[c], 0.0, gx3)
        sum_gy[c], sum_gy_xc[c] = s_gy, s_gy_xc


# ----------------------------------------------------------------------------- parallel drivers
# ``tasks`` channel blocks are shared out among Numba's threads; the caller picks one block per
# channel for conv data and one per thread for dense data. Results do not depend on ``tasks``.

@_jit()
def _block(task, tasks, channels):
    """Channel range [lo, hi) of task ``task`` out of ``tasks`` nearly equal blocks."""
    return task * channels // tasks, (task + 1) * channels // tasks


@_jit(parallel=True)
def moments_parallel(x3, tasks, mean, var):
    for task in prange(tasks):
        lo, hi = _block(task, tasks, x3.shape[1])
        moments_range(x3, lo, hi, mean, var)


@_jit(parallel=True)
def forward_parallel(x3, gamma, beta, eps, center_only, tasks, y3, mean, var):
    for task in prange(tasks):
        lo, hi = _block(task, tasks, x3.shape[1])
        forward_range(x3, gamma, beta, eps, center_only, lo, hi, y3, mean, var)


@_jit(parallel=True)
def affine_parallel(x3, a, b, tasks, y3):
    for task in prange(tasks):
        lo, hi = _block(task, tasks, x3.shape[1])
        affine_range(x3, a, b, lo, hi, y3)


@_jit(parallel=True)
def backward_parallel(gy3, x3, mean, scale, w, centered, tasks, gx3, sum_gy, sum_gy_xc):
    for task in prange(tasks):
        lo, hi = _block(task, tasks, x3.shape[1])
        backward_range(gy3, x3, mean, scale, w, centered, lo, hi, gx3, sum_gy, sum_gy_xc)
