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
ROWS = 4                         # rows added together before they reach the lanes
CHUNK = 4096                     # values per chunk of the one-read channel statistics
_FLAGS = dict(fastmath={"contract"}, nogil=True, error_model="numpy", boundscheck=False)


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
# Sums run over "rows": x3[n, c, m0:m1] for n in n0..n1-1, the whole of a conv channel (c, 0, M)
# or a block of dense channels (data viewed as (N, 1, C), c = 0, m0:m1 = lo:hi). Lane j of
# ``lanes`` (L of them) takes elements m0 + j, m0 + j + L, ... of each row, and ROWS rows at a
# time are added together before they reach it, so the lanes are loaded and stored ROWS times less
# often. The order of the additions depends on the shape only.

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
def _add_rows(x3, c, n0, n1, m0, m1, lanes):
    """lanes[j] += sum of x3[n0:n1, c, m0 + j::L] in float64."""
    width = lanes.shape[0]
    n4 = n1 - (n1 - n0) % ROWS
    for start in range(m0, m1, width):
        stop = min(start + width, m1)
        for n in range(n0, n4, ROWS):
            p0, p1 = x3[n, c, start:stop], x3[n + 1, c, start:stop]
            p2, p3 = x3[n + 2, c, start:stop], x3[n + 3, c, start:stop]
            for j in range(p0.shape[0]):
                lanes[j] += (np.float64(p0[j]) + p1[j]) + (np.float64(p2[j]) + p3[j])
        for n in range(n4, n1):
            part = x3[n, c, start:stop]
            for j in range(part.shape[0]):
                lanes[j] += part[j]


@_jit()
def _add_sq_dev_rows(x3, c, n0, n1, m0, m1, center, lanes):
    """lanes[j] += sum of (x3[n0:n1, c, m0 + j::L] - center[j])**2 in float64."""
    width = lanes.shape[0]
    n4 = n1 - (n1 - n0) % ROWS
    for start in range(m0, m1, width):
        stop = min(start + width, m1)
        for n in range(n0, n4, ROWS):
            p0, p1 = x3[n, c, start:stop], x3[n + 1, c, start:stop]
            p2, p3 = x3[n + 2, c, start:stop], x3[n + 3, c, start:stop]
            for j in range(p0.shape[0]):
                mu = center[j]
                d0, d1, d2, d3 = p0[j] - mu, p1[j] - mu, p2[j] - mu, p3[j] - mu
                lanes[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for n in range(n4, n1):
            part = x3[n, c, start:stop]
            for j in range(part.shape[0]):
                d = part[j] - center[j]
                lanes[j] += d * d


@_jit()
def _add_grad_rows(gy3, x3, c, m0, m1, center, lanes_gy, lanes_gy_xc):
    """lanes_gy[j] += sum of gy, lanes_gy_xc[j] += sum of gy * (x - center[j]) over all rows of
    gy3/x3[:, c, m0 + j::L], in float64."""
    width, n1 = lanes_gy.shape[0], x3.shape[0]
    n4 = n1 - n1 % ROWS
    for start in range(m0, m1, width):
        stop = min(start + width, m1)
        for n in range(0, n4, ROWS):
            g0, g1 = gy3[n, c, start:stop], gy3[n + 1, c, start:stop]
            g2, g3 = gy3[n + 2, c, start:stop], gy3[n + 3, c, start:stop]
            p0, p1 = x3[n, c, start:stop], x3[n + 1, c, start:stop]
            p2, p3 = x3[n + 2, c, start:stop], x3[n + 3, c, start:stop]
            for j in range(p0.shape[0]):
                mu = center[j]
                a0, a1 = np.float64(g0[j]), np.float64(g1[j])
                a2, a3 = np.float64(g2[j]), np.float64(g3[j])
                lanes_gy[j] += (a0 + a1) + (a2 + a3)
                lanes_gy_xc[j] += ((a0 * (p0[j] - mu) + a1 * (p1[j] - mu))
                                   + (a2 * (p2[j] - mu) + a3 * (p3[j] - mu)))
        for n in range(n4, n1):
            grow, xrow = gy3[n, c, start:stop], x3[n, c, start:stop]
            for j in range(xrow.shape[0]):
                g = np.float64(grow[j])
                lanes_gy[j] += g
                lanes_gy_xc[j] += g * (xrow[j] - center[j])


@_jit()
def _channel_moments(x3, c, lanes, center):
    """(mean, biased var) of conv channel c, reading it once from memory.

    The channel is cut into chunks of about ``CHUNK`` values (whole rows). Each chunk gets a
    two-pass mean and sum of squared deviations (its second pass hits L1/L2), and the
    chunks are merged in order with Chan et al.'s pairwise update, which is as stable as two
    passes over the whole channel. ``lanes``/``center`` are scratch of length min(M, LANES).
    """
    width = x3.shape[2]
    rows = max(1, CHUNK // max(width, 1))
    count, mean, m2 = 0.0, 0.0, 0.0
    for n0 in range(0, x3.shape[0], rows):
        n1 = min(n0 + rows, x3.shape[0])
        k = float((n1 - n0) * width)
        lanes[:] = 0.0
        _add_rows(x3, c, n0, n1, 0, width, lanes)
        mean_k = _fold(lanes) / k
        lanes[:] = 0.0
        center[:] = mean_k
        _add_sq_dev_rows(x3, c, n0, n1, 0, width, center, lanes)
        m2_k = _fold(lanes)
        total = count + k
        delta = mean_k - mean
        mean += delta * (k / total)
        m2 += m2_k + delta * delta * (count * k / total)
        count = total
    return (mean, m2 / count) if count > 0 else (np.nan, np.nan)


@_jit()
def _channel_grad_sums(gy3, x3, c, center, lanes_gy, lanes_gy_xc):
    """(sum gy, sum gy * (x - center)) over conv channel c; ``center`` is scratch (see above)."""
    lanes_gy[:] = 0.0
    lanes_gy_xc[:] = 0.0
    _add_grad_rows(gy3, x3, c, 0, x3.shape[2], center, lanes_gy, lanes_gy_xc)
    return _fold(lanes_gy), _fold(lanes_gy_xc)


@_jit()
def _channel_affine(x3, c, a, b, y3):
    """y3[n, c, :] = x3[n, c, :] * a + b."""
    for n in range(x3.shape[0]):
        row, out = x3[n, c], y3[n, c]
        for m in range(row.shape[0]):
            out[m] = np.float64(row[m]) * a + b


@_jit()
def _channel_gx(gy3, x3, c, a_gy, a_x, b, gx3):
    """gx3[n, c, :] = a_gy * gy + (a_x * x + b)."""
    for n in range(x3.shape[0]):
        grow, xrow, out = gy3[n, c], x3[n, c], gx3[n, c]
        for m in range(xrow.shape[0]):
            out[m] = a_gy * np.float64(grow[m]) + (a_x * np.float64(xrow[m]) + b)


# ----------------------------------------------------------------------------- dense (M == 1)
# Channels are the lanes: the block lo..hi of each row is one contiguous run.

@_jit()
def _as_row(x3):
    """(N, C, 1) data as (N, 1, C): one "channel" whose rows hold all the channels."""
    return x3.reshape(x3.shape[0], 1, x3.shape[1])


@_jit()
def _dense_moments_block(x3, lo, hi, mean, var):
    """mean[lo:hi], var[lo:hi] (biased) of dense x3 (N, C, 1) by two passes over the rows."""
    xr, n_rows = _as_row(x3), x3.shape[0]
    mean_b, var_b = mean[lo:hi], var[lo:hi]
    mean_b[:] = 0.0
    _add_rows(xr, 0, 0, n_rows, lo, hi, mean_b)
    mean_b /= n_rows
    var_b[:] = 0.0
    _add_sq_dev_rows(xr, 0, 0, n_rows, lo, hi, mean_b, var_b)
    var_b /= n_rows


@_jit()
def _dense_affine_block(x3, lo, hi, a, b, y3):
    """y[:, lo:hi] = x[:, lo:hi] * a[lo:hi] + b[lo:hi] for dense x3, y3 (N, C, 1)."""
    xr, yr, a_b, b_b = _as_row(x3), _as_row(y3), a[lo:hi], b[lo:hi]
    for n in range(x3.shape[0]):
        row, out = xr[n, 0, lo:hi], yr[n, 0, lo:hi]
        for j in range(row.shape[0]):
            out[j] = np.float64(row[j]) * a_b[j] + b_b[j]


@_jit()
def _dense_backward_block(gy3, x3, mean, scale, w, centered, lo, hi, gx3, sum_gy, sum_gy_xc):
    gyr, xr, gxr, n_rows = _as_row(gy3), _as_row(x3), _as_row(gx3), x3.shape[0]
    s_gy, s_gy_xc = sum_gy[lo:hi], sum_gy_xc[lo:hi]
    s_gy[:] = 0.0
    s_gy_xc[:] = 0.0
    _add_grad_rows(gyr, xr, 0, lo, hi, mean[lo:hi], s_gy, s_gy_xc)
    if not centered:
        _dense_affine_block(gy3, lo, hi, scale, np.zeros(x3.shape[1]), gx3)
        return
    a_x, b = np.empty(hi - lo), np.empty(hi - lo)
    for j in range(hi - lo):
        c = lo + j
        a_x[j], b[j] = _gx_coefficients(scale[c], mean[c], s_gy[j] / n_rows,
                                        w[c] * s_gy_xc[j] / n_rows)
    a_gy = scale[lo:hi]
    for n in range(n_rows):
        grow, xrow, out = gyr[n, 0, lo:hi], xr[n, 0, lo:hi], gxr[n, 0, lo:hi]
        for j in range(xrow.shape[0]):
            out[j] = a_gy[j] * np.float64(grow[j]) + (a_x[j] * np.float64(xrow[j]) + b[j])


@_jit()
def _gx_coefficients(scale, mean, k_gy, k_xc):
    """(a_x, b) of gx = scale * (gy - k_gy - k_xc * (x - mean)) = scale * gy + (a_x * x + b)."""
    return -scale * k_xc, scale * (k_xc * mean - k_gy)


# ----------------------------------------------------------------------------- channel ranges

@_jit()
def moments_range(x3, lo, hi, mean, var):
    """mean[lo:hi], var[lo:hi] (biased) of channels lo..hi-1."""
    if x3.shape[2] == 1:
        _dense_moments_block(x3, lo, hi, mean, var)
        return
    lanes, center = _scratch(x3), _scratch(x3)
    for c in range(lo, hi):
        mean[c], var[c] = _channel_moments(x3, c, lanes, center)


@_jit()
def _scratch(x3):
    return np.empty(min(LANES, x3.shape[2]))


@_jit()
def forward_range(x3, gamma, beta, eps, center_only, lo, hi, y3, mean, var):
    """Training forward of channels lo..hi-1: statistics into mean/var, y into y3."""
    if x3.shape[2] == 1:
        _dense_moments_block(x3, lo, hi, mean, var)
        a, b = np.empty(x3.shape[1]), np.empty(x3.shape[1])
        for c in range(lo, hi):
            a[c] = gamma[c] if center_only else gamma[c] / np.sqrt(var[c] + eps)
            b[c] = beta[c] - mean[c] * a[c]
        _dense_affine_block(x3, lo, hi, a, b, y3)
        return
    lanes, center = _scratch(x3), _scratch(x3)
    for c in range(lo, hi):
        mu, sigma2 = _channel_moments(x3, c, lanes, center)
        a_c = gamma[c] if center_only else gamma[c] / np.sqrt(sigma2 + eps)
        _channel_affine(x3, c, a_c, beta[c] - mu * a_c, y3)
        mean[c], var[c] = mu, sigma2


@_jit()
def affine_range(x3, a, b, lo, hi, y3):
    """y3 = a[c] * x3 + b[c] for channels lo..hi-1."""
    if x3.shape[2] == 1:
        _dense_affine_block(x3, lo, hi, a, b, y3)
        return
    for c in range(lo, hi):
        _channel_affine(x3, c, a[c], b[c], y3)


@_jit()
def backward_range(gy3, x3, mean, scale, w, centered, lo, hi, gx3, sum_gy, sum_gy_xc):
    """Backward sums and gx (see ``arraybn.backends.base``) of channels lo..hi-1."""
    if x3.shape[2] == 1:
        _dense_backward_block(gy3, x3, mean, scale, w, centered, lo, hi, gx3, sum_gy, sum_gy_xc)
        return
    count = x3.shape[0] * x3.shape[2]
    lanes_gy, lanes_gy_xc, center = _scratch(x3), _scratch(x3), _scratch(x3)
    for c in range(lo, hi):
        center[:] = mean[c]
        s_gy, s_gy_xc = _channel_grad_sums(gy3, x3, c, center, lanes_gy, lanes_gy_xc)
        if centered:
            a_x, b = _gx_coefficients(scale[c], mean[c], s_gy / count, w[c] * s_gy_xc / count)
            _channel_gx(gy3, x3, c, scale[c], a_x, b, gx3)
        else:
            _channel_affine(gy3, c, scale[c], 0.0, gx3)
        sum_gy[c], sum_gy_xc[c] = s_gy, s_gy_xc


# ----------------------------------------------------------------------------- per channel

@_jit()
def finish_statistics(mean, var, eps, momentum, count, running_mean, running_var, inv_std):
    """inv_std and the running-buffer updates of ``Backend.finish_statistics``, in one call.

    An empty buffer stands for "no buffer". Returns False, having written nothing, when any
    mean or var is NaN/inf.
    """
    channels = mean.shape[0]
    for c in range(channels):
        if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            return False
    keep, unbias = 1.0 - momentum, count / (count - 1.0)
    for c in range(channels):
        inv_std[c] = 1.0 / np.sqrt(var[c] + eps)
    for c in range(running_mean.shape[0]):
        running_mean[c] = keep * np.float64(running_mean[c]) + momentum * mean[c]
    for c in range(running_var.shape[0]):
        running_var[c] = keep * np.float64(running_var[c]) + momentum * (var[c] * unbias)
    return True


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
