"""Private Numba kernels of the numba backend; they write into preallocated outputs.

Shapes: data ``x3``/``gy3``/``y3`` is (N, C, M) C-contiguous float32 or float64; per-channel arrays
are float64 (C,). All arithmetic is float64 and each element is rounded once, when stored.

The kernels see the data as rows: ``x2 = x3.reshape(N, C * M)``, where channel c owns the columns
c*M .. (c+1)*M - 1 of every row. A *block* is a run of whole channels c0..c1-1, i.e. the columns
k0 = c0*M .. k1 = c1*M, and every pass walks the rows in order over the columns of one block:

- Each channel has ``P = min(M, LANES)`` float64 lanes; lane j takes the channel's elements
  j, j + P, j + 2P, ... of every row, ``ROWS`` rows added together before they reach it, and the
  lanes are folded pairwise at the end. The order of the additions depends on the shape only, so
  results are bit-identical for any number of threads and any blocking, and the lane loops
  vectorize without reassociation.
- Short rows (M <= LANES, dense data included): a block holds several channels, so a row's block
  is one long contiguous loop over all their lanes, however small M is. Passes after the first
  read a block (``BLOCK_BYTES``) from L2/L3. 1 MiB measured ~10% faster than 256 KiB, which
  cut rows into shorter runs, on 256x16x121 and the same on 128x16x121; 2 MiB no better.
- Long rows (M > LANES): a block is one channel, its lanes wrap around each row.

Every pass reads memory in address order: ``ROWS`` rows at a time, each across the block's
columns (walking a long channel column by column, all rows per column, halved the speed: it defeats
the hardware prefetcher).

Statistics read each block once from memory: rows are cut into chunks of at least ``ROWS`` rows
and about ``CHUNK`` values per channel; each chunk gets a two-pass mean and sum of squared
deviations (its second pass hits cache), merged in order with Chan et al.'s pairwise update, as
stable as two passes over the whole channel.

The element-wise passes (y, gx) loop over each channel's M values of a row with the coefficients
in registers once M >= ``SCALAR_MIN``: on 128x16x121 that took 45% less time than lane arrays of
coefficients, which cost three or four more loads per value. Below it, the per-lane arrays
``center``, ``a``, ``b`` hold each channel's coefficient in all of its lanes.

Each kernel exists as ``*_range`` (channels lo..hi-1 on the calling thread, for small inputs) and
``*_parallel`` (channel ranges shared out with ``prange``).

Compile flags come from ``numba_config.jit`` only: cached on disk; of fastmath only FMA
contraction, which rounds once where a multiply-add would round twice (no reassociation: these are
statistics).
"""
import numpy as np
from numba import prange

from arraybn.backends.numba_config import jit as _jit

LANES = 128                      # lanes per channel at most (long rows wrap around them)
ROWS = 4                         # rows added together before they reach the lanes
CHUNK = 16384                    # values per channel in one chunk of the statistics
BLOCK_BYTES = 1 << 20            # data of one short-row block: re-read from L2/L3 between passes
SCALAR_MIN = 32                  # M from which element-wise passes loop per channel and row
BLOCK_LANES = 4096               # lanes of one short-row block at most (32 KiB per lane array)


# ----------------------------------------------------------------------------- lane passes
# Over the columns k0..k1-1 of rows n0..n1-1 of x2; lane j (of L = len(lanes)) takes the columns
# k0 + j, k0 + j + L, ... A short-row block has L = k1 - k0, a long-row channel L = LANES.

@_jit()
def _sum_rows(x2, n0, n1, k0, k1, lanes):
    """lanes[j] += sum of the lane's elements, in float64."""
    width = lanes.shape[0]
    n4 = n1 - (n1 - n0) % ROWS
    for n in range(n0, n4, ROWS):
        for start in range(k0, k1, width):
            stop = min(start + width, k1)
            p0, p1 = x2[n, start:stop], x2[n + 1, start:stop]
            p2, p3 = x2[n + 2, start:stop], x2[n + 3, start:stop]
            for j in range(p0.shape[0]):
                lanes[j] += (np.float64(p0[j]) + p1[j]) + (np.float64(p2[j]) + p3[j])
    for n in range(n4, n1):
        for start in range(k0, k1, width):
            part = x2[n, start:min(start + width, k1)]
            for j in range(part.shape[0]):
                lanes[j] += part[j]


@_jit()
def _sum_sq_dev_rows(x2, n0, n1, k0, k1, center, lanes):
    """lanes[j] += sum of (element - center[j])**2, in float64."""
    width = lanes.shape[0]
    n4 = n1 - (n1 - n0) % ROWS
    for n in range(n0, n4, ROWS):
        for start in range(k0, k1, width):
            stop = min(start + width, k1)
            p0, p1 = x2[n, start:stop], x2[n + 1, start:stop]
            p2, p3 = x2[n + 2, start:stop], x2[n + 3, start:stop]
            for j in range(p0.shape[0]):
                mu = center[j]
                d0, d1, d2, d3 = p0[j] - mu, p1[j] - mu, p2[j] - mu, p3[j] - mu
                lanes[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for n in range(n4, n1):
        for start in range(k0, k1, width):
            part = x2[n, start:min(start + width, k1)]
            for j in range(part.shape[0]):
                d = part[j] - center[j]
                lanes[j] += d * d


@_jit()
def _sum_grad_rows(gy2, x2, k0, k1, center, lanes_gy, lanes_gy_xc):
    """lanes_gy[j] += sum of gy, lanes_gy_xc[j] += sum of gy * (x - center[j]), all rows."""
    width, n1 = lanes_gy.shape[0], x2.shape[0]
    n4 = n1 - n1 % ROWS
    for n in range(0, n4, ROWS):
        for start in range(k0, k1, width):
            stop = min(start + width, k1)
            g0, g1 = gy2[n, start:stop], gy2[n + 1, start:stop]
            g2, g3 = gy2[n + 2, start:stop], gy2[n + 3, start:stop]
            p0, p1 = x2[n, start:stop], x2[n + 1, start:stop]
            p2, p3 = x2[n + 2, start:stop], x2[n + 3, start:stop]
            for j in range(p0.shape[0]):
                mu = center[j]
                a0, a1 = np.float64(g0[j]), np.float64(g1[j])
                a2, a3 = np.float64(g2[j]), np.float64(g3[j])
                lanes_gy[j] += (a0 + a1) + (a2 + a3)
                lanes_gy_xc[j] += ((a0 * (p0[j] - mu) + a1 * (p1[j] - mu))
                                   + (a2 * (p2[j] - mu) + a3 * (p3[j] - mu)))
    for n in range(n4, n1):
        for start in range(k0, k1, width):
            stop = min(start + width, k1)
            grow, xrow = gy2[n, start:stop], x2[n, start:stop]
            for j in range(xrow.shape[0]):
                g = np.float64(grow[j])
                lanes_gy[j] += g
                lanes_gy_xc[j] += g * (xrow[j] - center[j])


@_jit()
def _affine_rows(x2, k0, k1, center, a, b, y2):
    """y2 = (x2 - center[j]) * a[j] + b[j] over the columns, all rows (M < SCALAR_MIN)."""
    for n in range(x2.shape[0]):
        row, out = x2[n, k0:k1], y2[n, k0:k1]
        for j in range(row.shape[0]):
            out[j] = (np.float64(row[j]) - center[j]) * a[j] + b[j]


@_jit()
def _gx_rows(gy2, x2, k0, k1, center, a_gy, a_x, b, gx2):
    """gx2 = a_gy[j] * gy + ((x - center[j]) * a_x[j] + b[j]) over the columns, all rows."""
    for n in range(x2.shape[0]):
        grow, xrow, out = gy2[n, k0:k1], x2[n, k0:k1], gx2[n, k0:k1]
        for j in range(xrow.shape[0]):
            out[j] = a_gy[j] * np.float64(grow[j]) + (
                (np.float64(xrow[j]) - center[j]) * a_x[j] + b[j])


@_jit()
def _affine_channels(x2, m, c0, c1, center, a, b, y2):
    """y2 = (x2 - center[c]) * a[c] + b[c] for channels c0..c1-1, all rows, in address order:
    a loop of M values per channel and row, with the coefficients in registers."""
    for n in range(x2.shape[0]):
        for c in range(c0, c1):
            row, out = x2[n, c * m:(c + 1) * m], y2[n, c * m:(c + 1) * m]
            mu, ac, bc = center[c], a[c], b[c]
            for j in range(m):
                out[j] = (np.float64(row[j]) - mu) * ac + bc


@_jit()
def _gx_channels(gy2, x2, m, c0, c1, center, a_gy, a_x, b, gx2):
    """gx2 = a_gy[c] * gy + ((x - center[c]) * a_x[c] + b[c]), like ``_affine_channels``."""
    for n in range(x2.shape[0]):
        for c in range(c0, c1):
            lo, hi = c * m, (c + 1) * m
            grow, xrow, out = gy2[n, lo:hi], x2[n, lo:hi], gx2[n, lo:hi]
            mu, ag, ax, bc = center[c], a_gy[c], a_x[c], b[c]
            for j in range(m):
                out[j] = ag * np.float64(grow[j]) + ((np.float64(xrow[j]) - mu) * ax + bc)


# ----------------------------------------------------------------------------- lanes <-> channels

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
def _fold_channels(lanes, per, out, c0):
    """out[c0 + i] = folded sum of channel i's ``per`` lanes, for every channel of the block.

    ``out`` may be ``lanes`` itself with c0 = 0: channel i's sum lands at or before its lanes.
    """
    if per == 1:                               # dense data: a lane is a channel
        for i in range(lanes.shape[0]):        # a loop: an array-to-array slice assignment
            out[c0 + i] = lanes[i]             # costs Numba ~1.8 s more to compile
        return
    for i in range(lanes.shape[0] // per):
        out[c0 + i] = _fold(lanes[i * per:(i + 1) * per])


@_jit()
def _spread(values, c0, per, lanes):
    """Every lane of the block's channel i gets values[c0 + i]."""
    if per == 1:
        for i in range(lanes.shape[0]):        # a loop, as in ``_fold_channels``
            lanes[i] = values[c0 + i]
        return
    for i in range(lanes.shape[0] // per):
        lanes[i * per:(i + 1) * per] = values[c0 + i]


@_jit()
def _rows(x3):
    """(N, C, M) data as its (N, C * M) rows."""
    return x3.reshape(x3.shape[0], x3.shape[1] * x3.shape[2])


@_jit()
def _per_channel_lanes(x3):
    return max(1, min(x3.shape[2], LANES))


@_jit()
def _block_size(x3):
    """Channels per block: one for long rows, as many as fit ``BLOCK_BYTES`` for short ones."""
    n, m = x3.shape[0], x3.shape[2]
    if m > LANES or m == 0:
        return 1
    fit = BLOCK_BYTES // max(1, n * m * x3.itemsize)
    return max(1, min(fit, BLOCK_LANES // m))


@_jit()
def _scratch(x3, count):
    """``count`` lane arrays as rows of one array, wide enough for any block of x3."""
    return np.empty((count, _block_size(x3) * _per_channel_lanes(x3)))


@_jit()
def _lanes_of(scratch, i, x3, c0, c1):
    """Lane array i of the scratch, cut to the block c0..c1-1."""
    return scratch[i, :(c1 - c0) * _per_channel_lanes(x3)]


# ----------------------------------------------------------------------------- blocks

@_jit()
def _block_moments(x3, c0, c1, scratch, mean, var):
    """mean[c], var[c] (biased) for the block c0..c1-1, reading it once from memory."""
    x2, m = _rows(x3), x3.shape[2]
    per, k0, k1 = _per_channel_lanes(x3), c0 * m, c1 * m
    lanes, center = _lanes_of(scratch, 0, x3, c0, c1), _lanes_of(scratch, 1, x3, c0, c1)
    rows = max(ROWS, CHUNK // max(m, 1))
    mean[c0:c1] = 0.0
    var[c0:c1] = 0.0                       # holds M2, the sum of squared deviations, until the end
    count = 0.0
    for n0 in range(0, x3.shape[0], rows):
        n1 = min(n0 + rows, x3.shape[0])
        k = float((n1 - n0) * m)
        total = count + k
        lanes[:] = 0.0
        _sum_rows(x2, n0, n1, k0, k1, lanes)
        _fold_channels(lanes, per, center, 0)
        _spread(center[:c1 - c0] / k, 0, per, center)
        lanes[:] = 0.0
        _sum_sq_dev_rows(x2, n0, n1, k0, k1, center, lanes)
        _fold_channels(lanes, per, lanes, 0)            # lanes[i]: M2 of the chunk's channel i
        for i in range(c1 - c0):
            c, mean_k = c0 + i, center[i * per]
            delta = mean_k - mean[c]
            mean[c] += delta * (k / total)
            var[c] += lanes[i] + delta * delta * (count * k / total)
        count = total
    for c in range(c0, c1):
        if count > 0:
            var[c] /= count
        else:
            mean[c] = var[c] = np.nan


@_jit()
def _block_affine(x3, c0, c1, scratch, center, a, b, y3):
    """y = (x - center[c]) * a[c] + b[c] for the block's channels."""
    x2, y2, m, per = _rows(x3), _rows(y3), x3.shape[2], _per_channel_lanes(x3)
    if m >= SCALAR_MIN:
        _affine_channels(x2, m, c0, c1, center, a, b, y2)
        return
    center_l, a_l, b_l = (_lanes_of(scratch, 0, x3, c0, c1), _lanes_of(scratch, 1, x3, c0, c1),
                          _lanes_of(scratch, 2, x3, c0, c1))
    _spread(center, c0, per, center_l)
    _spread(a, c0, per, a_l)
    _spread(b, c0, per, b_l)
    _affine_rows(x2, c0 * m, c1 * m, center_l, a_l, b_l, y2)


@_jit()
def _block_backward(gy3, x3, mean, scale, w, centered, c0, c1, scratch, gx3, sum_gy, sum_gy_xc):
    gy2, x2, gx2 = _rows(gy3), _rows(x3), _rows(gx3)
    m, per, count = x3.shape[2], _per_channel_lanes(x3), x3.shape[0] * x3.shape[2]
    center, lanes_gy = _lanes_of(scratch, 0, x3, c0, c1), _lanes_of(scratch, 1, x3, c0, c1)
    lanes_gy_xc = _lanes_of(scratch, 2, x3, c0, c1)
    _spread(mean, c0, per, center)
    lanes_gy[:] = 0.0
    lanes_gy_xc[:] = 0.0
    _sum_grad_rows(gy2, x2, c0 * m, c1 * m, center, lanes_gy, lanes_gy_xc)
    _fold_channels(lanes_gy, per, sum_gy, c0)
    _fold_channels(lanes_gy_xc, per, sum_gy_xc, c0)
    b = np.zeros(x3.shape[1])
    if not centered:                       # gx = scale * gy
        _block_affine(gy3, c0, c1, scratch, b, scale, b, gx3)
        return
    a_x = np.empty(x3.shape[1])            # gx = scale * (gy - k_gy - k_xc * (x - mean))
    for c in range(c0, c1):
        a_x[c] = -scale[c] * (w[c] * sum_gy_xc[c] / count)
        b[c] = -scale[c] * (sum_gy[c] / count)
    if m >= SCALAR_MIN:
        _gx_channels(gy2, x2, m, c0, c1, mean, scale, a_x, b, gx2)
    else:
        a_gy, a_x_l, b_l = lanes_gy, lanes_gy_xc, _lanes_of(scratch, 3, x3, c0, c1)
        _spread(scale, c0, per, a_gy)        # the sums are folded out: reuse their lanes
        _spread(a_x, c0, per, a_x_l)
        _spread(b, c0, per, b_l)
        _gx_rows(gy2, x2, c0 * m, c1 * m, center, a_gy, a_x_l, b_l, gx2)


# ----------------------------------------------------------------------------- channel ranges

@_jit()
def moments_range(x3, lo, hi, mean, var):
    """mean[lo:hi], var[lo:hi] (biased) of channels lo..hi-1."""
    scratch, size = _scratch(x3, 2), _block_size(x3)
    for c0 in range(lo, hi, size):
        _block_moments(x3, c0, min(c0 + size, hi), scratch, mean, var)


@_jit()
def forward_range(x3, gamma, beta, eps, center_only, lo, hi, y3, mean, var):
    """Training forward of channels lo..hi-1: statistics into mean/var, y into y3."""
    scratch, size = _scratch(x3, 3), _block_size(x3)
    a = np.empty(x3.shape[1])
    for c0 in range(lo, hi, size):
        c1 = min(c0 + size, hi)
        _block_moments(x3, c0, c1, scratch, mean, var)
        for c in range(c0, c1):
            a[c] = gamma[c] if center_only else gamma[c] / np.sqrt(var[c] + eps)
        _block_affine(x3, c0, c1, scratch, mean, a, beta, y3)


@_jit()
def affine_range(x3, a, b, lo, hi, y3):
    """y3 = a[c] * x3 + b[c] for channels lo..hi-1."""
    scratch, size = _scratch(x3, 3), _block_size(x3)
    zero = np.zeros(x3.shape[1])
    for c0 in range(lo, hi, size):
        _block_affine(x3, c0, min(c0 + size, hi), scratch, zero, a, b, y3)


@_jit()
def backward_range(gy3, x3, mean, scale, w, centered, lo, hi, gx3, sum_gy, sum_gy_xc):
    """Backward sums and gx (see ``arraybn.backends.base``) of channels lo..hi-1."""
    scratch, size = _scratch(x3, 4), _block_size(x3)
    for c0 in range(lo, hi, size):
        _block_backward(gy3, x3, mean, scale, w, centered, c0, min(c0 + size, hi), scratch,
                        gx3, sum_gy, sum_gy_xc)


@_jit()
def forward_finish_range(x3, gamma, beta, eps, center_only, momentum, running_mean, running_var,
                         y3, mean, var, inv_std):
    """``forward_finish_parallel`` on the calling thread.

    Not one kernel with a thread-count switch: a cached function that calls a ``parallel=True``
    one crashes when Numba loads it from its cache (numba/numba#8578).
    """
    forward_range(x3, gamma, beta, eps, center_only, 0, x3.shape[1], y3, mean, var)
    return finish_statistics(mean, var, eps, momentum, float(x3.shape[0] * x3.shape[2]),
                             running_mean, running_var, inv_std)


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
# ``tasks`` channel ranges are shared out among Numba's threads; results do not depend on it.

@_jit()
def _task_range(task, tasks, channels):
    """Channel range [lo, hi) of task ``task`` out of ``tasks`` nearly equal ranges."""
    return task * channels // tasks, (task + 1) * channels // tasks


@_jit(parallel=True)
def moments_parallel(x3, tasks, mean, var):
    for task in prange(tasks):
        lo, hi = _task_range(task, tasks, x3.shape[1])
        moments_range(x3, lo, hi, mean, var)


@_jit(parallel=True)
def forward_finish_parallel(x3, gamma, beta, eps, center_only, tasks, momentum, running_mean,
                            running_var, y3, mean, var, inv_std):
    """The training forward on ``tasks`` threads, then ``finish_statistics`` (count = N * M),
    in one call from Python. Returns its finite flag."""
    for task in prange(tasks):
        lo, hi = _task_range(task, tasks, x3.shape[1])
        forward_range(x3, gamma, beta, eps, center_only, lo, hi, y3, mean, var)
    return finish_statistics(mean, var, eps, momentum, float(x3.shape[0] * x3.shape[2]),
                             running_mean, running_var, inv_std)


@_jit(parallel=True)
def affine_parallel(x3, a, b, tasks, y3):
    for task in prange(tasks):
        lo, hi = _task_range(task, tasks, x3.shape[1])
        affine_range(x3, a, b, lo, hi, y3)


@_jit(parallel=True)
def backward_parallel(gy3, x3, mean, scale, w, centered, tasks, gx3, sum_gy, sum_gy_xc):
    for task in prange(tasks):
        lo, hi = _task_range(task, tasks, x3.shape[1])
        backward_range(gy3, x3, mean, scale, w, centered, lo, hi, gx3, sum_gy, sum_gy_xc)

