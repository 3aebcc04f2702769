"""Numba kernels of a fused conv block: BN's normalisation, a ReLU and max pooling in one pass.

Used by ``arraybn.nn.fused.FusedBNBlock`` through ``Backend.conv_ops()`` on the numba backend. The
per-channel statistics and running-buffer updates stay the backend's own kernels (``moments``,
``finish_statistics``), so they are bit-identical to the unfused path; these kernels replace the
element-wise passes around them. In training one call (``bn_pool_train_forward``) runs the
statistics, the coefficients and the pass below for each thread's channels, and one call
(``bn_pool_backward``) the sums, the coefficients and gx: a parallel region each way instead of
two, no per-channel array back in Python in between (LeNet-5 bare step, against the separate
calls: 5.31 -> 5.07 ms on one thread, 3.74 -> 3.46 ms on two; 5 interleaved rounds):

- forward: ``y = (x - center[c]) * a[c] + b[c]`` rounded once to x's dtype (the unfused
  ``affine``), then the ReLU (``relu_after``), then k x k max pooling (stride k, floor mode; k = 1
  is no pooling). Only the pooled output is written, with each window's argmax offset (the first
  maximum in row-major order, as PyTorch), or ``INACTIVE`` where the ReLU let no gradient through.
- backward: the BN sums ``sum(g)`` and ``sum(g * (x - mean))`` over the pooled positions only
  (every other position of the unpooled gradient is zero), in float64; then one pass writes
  ``gx = a_gy[c] * g + ((x - mean[c]) * a_x[c] + b[c])`` (the unfused BN backward's formula),
  zeroed where ``x <= 0`` when a ReLU came before the BN (``relu_before``: x is its output).

Blocks without pooling (k = 1: VGG-8's and ResNet's BN + ReLU) take one-pass kernels with the
same roundings as the window kernels at k = 1 (the window loops cost 10x in the forward and
2.8x in the backward at VGG-8's conv1 size, 100 x 32 x 28 x 28, one thread: 8.7 -> 0.83 ms and
14.8 -> 5.3 ms); their backward sums add by position over the batch, then fold (``_sums``),
so those differ from the window kernels' in the last bits. Where no ReLU follows the BN
either (a residual branch's last BN, a shortcut's), every position passes its gradient and the
block keeps no argmax (``untracked``): ResNet-20's step, one thread, 297-299 -> 293-296 ms.

The public functions validate and allocate; the ``@njit`` kernels write into preallocated arrays.
Blocks of at least ``PARALLEL_MIN_SIZE`` values, with or without pooling, share their channels
among Numba's threads (``*_parallel``); each channel's sums are added in the same order as on
one thread, so the results are bit-identical for any number of threads. From 2^16 values: at
batch 128 both of LeNet-5's blocks (519,168 and 247,808 values) share out. That pays since
Numba's workers spin between kernels (``numba_backend._start_threads``): the 2-thread step with
2^18 (the second block on one thread) 3.69 ms, 2^16 3.29-3.45, 2^14 3.31-3.34, 2^12 3.37
(``benchmarks/profile_step.py``, 300 steps). With workers that slept at once, the second block
had been slower on two threads (forward 0.30 -> 0.34 ms, backward 0.32 -> 0.40).
"""
import numba
import numpy as np
from numba import prange

from arraybn.backends.numba_backend import _running_buffer
from arraybn.backends.numba_config import jit, uidx
from arraybn.backends.numba_kernels import _fold, finish_statistics, moments_range

PARALLEL_MIN_SIZE = 1 << 16   # values from which a block shares out its channels
POOL_WINDOWS = 512      # 2x2 windows per pooling loop at least (see _normalize_pool2)
BLOCK_BYTES = 1 << 20     # data of a block of channels between a kernel's two passes
INACTIVE = 255          # argmax value of a window whose maximum the ReLU zeroed (no gradient)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@jit()
def _normalize_pool(x, center, a, b, relu_after, k, lo, hi, y, argmax):
    """y, argmax of the pooled, normalised (and ReLU'd) x, for channels lo..hi-1 (any k).

    Each (n, c) plane is normalised into a scratch plane (one contiguous, vectorised loop; the
    store rounds once), then pooled from there (cache-resident).
    """
    n_ch, size = x.shape[1], x.shape[2] * x.shape[3]
    x2, y2, am2 = _planes(x), _planes(y), _planes(argmax)
    plane = np.empty((x.shape[2], x.shape[3]), x.dtype)
    flat = plane.reshape(size)
    for n in range(x.shape[0]):
        for c in range(lo, hi):
            p, mu, ac, bc = uidx(n * n_ch + c), center[c], a[c], b[c]
            for q in range(size):
                flat[uidx(q)] = (np.float64(x2[p, uidx(q)]) - mu) * ac + bc
            _pool(plane, relu_after, k, y2[p], am2[p])


@jit()
def _normalize_pool2(x, center, a, b, relu_after, lo, hi, y, argmax):
    """k = 2: ``_normalize_pool`` with the windows of several planes in one loop (``_pool2``),
    which LLVM vectorises; a loop over one row's windows (13 in LeNet-5's first block) was too
    short for that and ran scalar (that block, 128 x 6 x 26 x 26 on one thread: 0.33 -> 0.16 ms;
    the second, 128 x 16 x 11 x 11: 0.15 -> 0.09 ms).

    The rows 2i and 2i + 1 of each plane (their first 2 * OW values) are normalised into
    ``top`` and ``bottom``, so that window t of a group of an image's planes is top[2t],
    top[2t + 1], bottom[2t], bottom[2t + 1], and its output is y's value t from the group's
    first plane on (y's planes are contiguous). A group holds at least ``POOL_WINDOWS`` windows
    (whole planes) so that the loop is long, and no more planes than that needs, so that the
    scratch stays in the cache (16 x 64 x 112 x 112, one thread: all 64 planes of an image in
    one group, 3 MB of scratch, 7.7 ms; a plane a group 4.0 ms; the per-row loops 4.4 ms)."""
    n_ch, h, w = x.shape[1], x.shape[2], x.shape[3]
    oh, ow = h // 2, w // 2
    width, plane_windows = 2 * ow, oh * ow
    group = max(1, min(hi - lo, -(-POOL_WINDOWS // max(plane_windows, 1))))
    x2, y1, am1 = _planes(x), y.reshape(y.size), argmax.reshape(argmax.size)
    top = np.empty(2 * group * plane_windows, x.dtype)
    bottom = np.empty(2 * group * plane_windows, x.dtype)
    for n in range(x.shape[0]):
        for c0 in range(lo, hi, group):
            c1 = min(c0 + group, hi)
            for c in range(c0, c1):
                p, mu, ac, bc = uidx(n * n_ch + c), center[c], a[c], b[c]
                for i in range(oh):
                    r0, r1 = uidx(2 * i * w), uidx((2 * i + 1) * w)
                    o = uidx(((c - c0) * oh + i) * width)
                    for q in range(width):
                        top[o + uidx(q)] = (np.float64(x2[p, r0 + uidx(q)]) - mu) * ac + bc
                    for q in range(width):
                        bottom[o + uidx(q)] = (np.float64(x2[p, r1 + uidx(q)]) - mu) * ac + bc
            start = uidx((n * n_ch + c0) * plane_windows)
            _pool2(top, bottom, (c1 - c0) * plane_windows, relu_after, y1[start:], am1[start:])


@jit()
def _forward(x, center, a, b, relu_after, k, lo, hi, y, argmax):
    """The forward of channels lo..hi-1: one pass per plane at k = 1, the windows of groups of
    planes in one loop at k = 2, else the window loops of each plane."""
    if k == 1:
        _normalize_relu(x, center, a, b, relu_after, lo, hi, y, argmax)
    elif k == 2:
        _normalize_pool2(x, center, a, b, relu_after, lo, hi, y, argmax)
    else:
        _normalize_pool(x, center, a, b, relu_after, k, lo, hi, y, argmax)


@jit(parallel=True)
def _forward_parallel(x, center, a, b, relu_after, k, tasks, y, argmax):
    """``_forward`` with the channels shared out among ``tasks``."""
    n_ch = x.shape[1]
    for t in prange(tasks):
        _forward(x, center, a, b, relu_after, k, t * n_ch // tasks, (t + 1) * n_ch // tasks, y,
                 argmax)


@jit()
def _block_channels(x, k, lo, hi, bytes_per_value):
    """Channels per block of a two-pass kernel (statistics or sums, then the output) on
    channels lo..hi-1. At k = 1 as many as keep ``bytes_per_value`` bytes a value of theirs
    within ``BLOCK_BYTES`` (at least one), so that the second pass reads them from the core's
    L2, not from memory; pooled blocks (k > 1) take lo..hi in one block, whose ``_pool2``
    groups of planes would be cut short at the blocks' edges (LeNet-5's first block)."""
    if k != 1:
        return max(1, hi - lo)
    return max(1, BLOCK_BYTES // max(1, x.shape[0] * x.shape[2] * x.shape[3] * bytes_per_value))


@jit()
def _train_forward(x, gamma, beta, eps, center_only, relu_after, k, lo, hi, y, argmax, mean,
                   var, a):
    """Channels lo..hi-1 of a training forward: their statistics (the backend's ``moments``
    kernel: the unfused BN's bits), ``a = gamma / sqrt(var + eps)`` (gamma when
    ``center_only``), then ``_forward`` centred on the batch mean with shift beta; block by
    block of channels (``_block_channels``)."""
    x3 = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
    step = _block_channels(x, k, lo, hi, 5)                      # x, y, argmax
    for c0 in range(lo, hi, step):
        c1 = min(c0 + step, hi)
        moments_range(x3, c0, c1, mean, var)
        for c in range(c0, c1):
            a[c] = gamma[c] if center_only else gamma[c] / np.sqrt(var[c] + eps)
        _forward(x, mean, a, beta, relu_after, k, c0, c1, y, argmax)


@jit()
def _train_forward_serial(x, gamma, beta, eps, center_only, relu_after, k, momentum,
                          running_mean, running_var, y, argmax, mean, var, a, inv_std):
    """``_train_forward`` of every channel, then ``finish_statistics`` (count = N*H*W): its
    finite flag. Not one kernel with a thread-count switch: see
    ``numba_kernels.forward_finish_range``."""
    _train_forward(x, gamma, beta, eps, center_only, relu_after, k, 0, x.shape[1], y, argmax,
                   mean, var, a)
    return finish_statistics(mean, var, eps, momentum, float(x.shape[0] * x.shape[2] * x.shape[3]),
                             running_mean, running_var, inv_std)


@jit(parallel=True)
def _train_forward_parallel(x, gamma, beta, eps, center_only, relu_after, k, momentum,
                            running_mean, running_var, tasks, y, argmax, mean, var, a, inv_std):
    """``_train_forward_serial`` with the channels shared out among ``tasks``: each thread's
    channels go from statistics to pooled output without waiting for the others."""
    n_ch = x.shape[1]
    for t in prange(tasks):
        _train_forward(x, gamma, beta, eps, center_only, relu_after, k, t * n_ch // tasks,
                       (t + 1) * n_ch // tasks, y, argmax, mean, var, a)
    return finish_statistics(mean, var, eps, momentum, float(x.shape[0] * x.shape[2] * x.shape[3]),
                             running_mean, running_var, inv_std)


@jit()
def _normalize_relu(x, center, a, b, relu_after, lo, hi, y, argmax):
    """k = 1 (no pooling): ``_normalize_pool`` in one pass per plane, no window loops, for
    channels lo..hi-1. Without a ReLU and with an empty argmax (``untracked``) only y."""
    n_ch = x.shape[1]
    x2, y2, am2 = _planes(x), _planes(y), _planes(argmax)
    for n in range(x.shape[0]):
        for c in range(lo, hi):
            p, mu, ac, bc = uidx(n * n_ch + c), center[c], a[c], b[c]
            if argmax.size == 0:
                for q in range(x2.shape[1]):
                    y2[p, uidx(q)] = (np.float64(x2[p, uidx(q)]) - mu) * ac + bc
                continue
            for q in range(x2.shape[1]):
                u = uidx(q)
                y2[p, u] = (np.float64(x2[p, u]) - mu) * ac + bc    # rounds once, as the plane
                inactive = relu_after and not y2[p, u] > 0
                y2[p, u] = 0 if inactive else y2[p, u]
                am2[p, u] = INACTIVE if inactive else 0


@jit()
def _pool2(top, bottom, windows, relu_after, y, argmax):
    """2 x 2 windows t = 0..windows-1 (top[2t], top[2t + 1], bottom[2t], bottom[2t + 1]) into
    y[t], argmax[t], branch-free; ties go to the first maximum in row-major order, like
    PyTorch."""
    for t in range(windows):
        u = uidx(2 * t)
        v0, v1, v2, v3 = top[u], top[u + 1], bottom[u], bottom[u + 1]
        right, lower_right = v1 > v0, v3 > v2
        m01 = v1 if right else v0
        m23 = v3 if lower_right else v2
        lower = m23 > m01
        best = m23 if lower else m01
        at = np.int32(lower) * 2 + (np.int32(lower_right) if lower else np.int32(right))
        inactive = relu_after & (not best > 0)
        y[uidx(t)] = 0 if inactive else best
        argmax[uidx(t)] = INACTIVE if inactive else at


@jit()
def _pool(plane, relu_after, k, y, argmax):
    """k x k pooling of one plane (k = 1: the ReLU alone), first maximum in row-major order."""
    oh, ow = plane.shape[0] // k, plane.shape[1] // k
    for i in range(oh):
        for j in range(ow):
            best, at = plane[i * k, j * k], 0
            for di in range(k):
                for dj in range(k):
                    v = plane[i * k + di, j * k + dj]
                    if v > best:
                        best, at = v, di * k + dj
            if relu_after and not best > 0:
                best, at = 0, INACTIVE
            y[i * ow + j] = best
            argmax[i * ow + j] = at


@jit()
def offset_tables(k):
    """(row, column) offset in the window of each argmax value (no division per element)."""
    di, dj = np.empty(k * k, np.int64), np.empty(k * k, np.int64)
    for at in range(k * k):
        di[at], dj[at] = at // k, at % k
    return di, dj


@jit()
def _active(at, g):
    """(argmax offset, gradient as float64) of a window; (0, 0.0) for an INACTIVE one.

    Branch-free: a zero gradient adds nothing to the sums, so inactive windows need no test.
    """
    active = at != INACTIVE
    return (np.int64(at) if active else 0), (np.float64(g) if active else 0.0)


@jit()
def _planes(a):
    """(N, C, H, W) as (N * C, H * W): one view, indexed directly (no view per plane)."""
    return a.reshape(a.shape[0] * a.shape[1], a.shape[2] * a.shape[3])


@jit()
def _pooled_sums(gy, x, argmax, mean, k, lo, hi, sum_gy, sum_gy_xc):
    """Per channel lo..hi-1, in float64: sum of gy and of gy * (x - mean) at each window's
    argmax (each channel's planes in batch order)."""
    di, dj = offset_tables(k)
    n_ch, oh, ow, w = gy.shape[1], gy.shape[2], gy.shape[3], x.shape[3]
    x2, gy2, am2 = _planes(x), _planes(gy), _planes(argmax)
    sum_gy[lo:hi] = 0.0
    sum_gy_xc[lo:hi] = 0.0
    for n in range(x.shape[0]):
        for c in range(lo, hi):
            p, mu, s, s_xc = uidx(n * n_ch + c), mean[c], 0.0, 0.0
            for i in range(oh):
                for j in range(ow):
                    at, g = _active(am2[p, uidx(i * ow + j)], gy2[p, uidx(i * ow + j)])
                    s += g
                    s_xc += g * (np.float64(x2[p, uidx((i * k + di[at]) * w + j * k + dj[at])])
                                 - mu)
            sum_gy[c] += s
            sum_gy_xc[c] += s_xc


@jit()
def _sums(gy, x, argmax, mean, lo, hi, sum_gy, sum_gy_xc):
    """k = 1: the sums of ``_pooled_sums`` for channels lo..hi-1, channel by channel: the
    gradient (zero where the ReLU let none through) and its product with x - mean added up
    position by position over the channel's planes (in batch order; element-wise loops that
    LLVM vectorises), then each position array folded pairwise (``numba_kernels._fold``).
    100 x 16 x 28 x 28 (a ResNet-20 block), one thread: 0.96 -> 0.47 ms against each plane
    gathered and then summed in four scalar lanes (which had taken 1.78 -> 0.92 ms against one
    chain). The pooled blocks keep one chain a plane (gathering the windows' maxima cost more
    than lanes saved), so at k = 1 the two kernels' sums differ in the last bits."""
    n_ch, size = gy.shape[1], x.shape[2] * x.shape[3]
    x2, gy2, am2 = _planes(x), _planes(gy), _planes(argmax)
    untracked = argmax.size == 0                       # every position active
    s, s_xc = np.empty(size), np.empty(size)
    for c in range(lo, hi):
        mu = mean[c]
        s[:] = 0.0
        s_xc[:] = 0.0
        for n in range(x.shape[0]):
            p = uidx(n * n_ch + c)
            for q in range(size):
                u = uidx(q)
                g = np.float64(gy2[p, u]) if untracked or am2[p, u] != INACTIVE else 0.0
                s[u] += g
                s_xc[u] += g * (np.float64(x2[p, u]) - mu)
        sum_gy[c] = _fold(s)
        sum_gy_xc[c] = _fold(s_xc)


@jit()
def _channel_sums(gy, x, argmax, mean, k, lo, hi, sum_gy, sum_gy_xc):
    """The backward's sums of channels lo..hi-1: one pass per plane at k = 1, else over the
    windows' maxima."""
    if k == 1:
        _sums(gy, x, argmax, mean, lo, hi, sum_gy, sum_gy_xc)
    else:
        _pooled_sums(gy, x, argmax, mean, k, lo, hi, sum_gy, sum_gy_xc)


@jit()
def _backward(gy, x, argmax, mean, scale, w, centered, relu_before, k, lo, hi, sum_gy,
              sum_gy_xc, a_x, b, gx):
    """The backward of channels lo..hi-1: their sums, their gx coefficients (the unfused BN
    backward's formula, as ``bn_pool_backward`` documents), then their gx; block by block of
    channels (``_block_channels``)."""
    step = _block_channels(x, k, lo, hi, 9)                  # x, gy, gx, argmax
    for c0 in range(lo, hi, step):
        c1 = min(c0 + step, hi)
        sums_and_coefficients(gy, x, argmax, mean, scale, w, centered, k, c0, c1, sum_gy,
                              sum_gy_xc, a_x, b)
        _gx(gy, x, argmax, mean, scale, a_x, b, k, relu_before, c0, c1, gx)


@jit()
def sums_and_coefficients(gy, x, argmax, mean, scale, w, centered, k, lo, hi, sum_gy,
                          sum_gy_xc, a_x, b):
    """Channels lo..hi-1: the backward's sums (``_channel_sums``), then the coefficients of
    ``gx = scale * g + ((x - mean) * a_x + b)`` (the unfused BN backward's formula)."""
    count = float(x.shape[0] * x.shape[2] * x.shape[3])
    _channel_sums(gy, x, argmax, mean, k, lo, hi, sum_gy, sum_gy_xc)
    for c in range(lo, hi):
        a_x[c] = -scale[c] * (w[c] * sum_gy_xc[c] / count) if centered else 0.0
        b[c] = -scale[c] * (sum_gy[c] / count) if centered else 0.0


@jit(parallel=True)
def _backward_parallel(gy, x, argmax, mean, scale, w, centered, relu_before, k, tasks, sum_gy,
                       sum_gy_xc, a_x, b, gx):
    """``_backward`` with the channels shared out among ``tasks`` (each channel's sums as on
    one thread)."""
    n_ch = x.shape[1]
    for t in prange(tasks):
        _backward(gy, x, argmax, mean, scale, w, centered, relu_before, k, t * n_ch // tasks,
                  (t + 1) * n_ch // tasks, sum_gy, sum_gy_xc, a_x, b, gx)


@jit()
def _bn_gx(gy, x, argmax, mean, a_gy, a_x, b, relu_before, lo, hi, gx):
    """k = 1: ``_unpool_gx`` in one pass per plane, for channels lo..hi-1."""
    n_ch = x.shape[1]
    x2, gy2, am2, gx2 = _planes(x), _planes(gy), _planes(argmax), _planes(gx)
    untracked = argmax.size == 0
    for n in range(x.shape[0]):
        for c in range(lo, hi):
            p, mu, ag, ax, bc = uidx(n * n_ch + c), mean[c], a_gy[c], a_x[c], b[c]
            for q in range(x2.shape[1]):
                u = uidx(q)
                rest = (np.float64(x2[p, u]) - mu) * ax + bc
                active = untracked or am2[p, u] != INACTIVE
                value = ag * np.float64(gy2[p, u]) + rest if active else rest
                gx2[p, u] = 0 if relu_before and not x2[p, u] > 0 else value


@jit()
def _unpool_gx(gy, x, argmax, mean, a_gy, a_x, b, k, relu_before, lo, hi, gx):
    """gx = a_gy * g + ((x - mean) * a_x + b), g the unpooled gradient; 0 where x <= 0 if
    ``relu_before``; for channels lo..hi-1. Every position gets the second term (one
    vectorised pass), then each window's argmax gets the whole formula."""
    di, dj = offset_tables(k)
    n_ch, oh, ow, w = gy.shape[1], gy.shape[2], gy.shape[3], x.shape[3]
    x2, gy2, am2, gx2 = _planes(x), _planes(gy), _planes(argmax), _planes(gx)
    size = x2.shape[1]
    for n in range(x.shape[0]):
        for c in range(lo, hi):
            p, mu, ag, ax, bc = uidx(n * n_ch + c), mean[c], a_gy[c], a_x[c], b[c]
            for q in range(size):
                gx2[p, uidx(q)] = (np.float64(x2[p, uidx(q)]) - mu) * ax + bc
            for i in range(oh):
                for j in range(ow):
                    at = np.int64(am2[p, uidx(i * ow + j)])
                    if at != INACTIVE:
                        u = uidx((i * k + di[at]) * w + j * k + dj[at])
                        gx2[p, u] = ag * np.float64(gy2[p, uidx(i * ow + j)]) + (
                            (np.float64(x2[p, u]) - mu) * ax + bc)
            if relu_before:
                for q in range(size):
                    gx2[p, uidx(q)] = gx2[p, uidx(q)] if x2[p, uidx(q)] > 0 else 0


@jit()
def _gx(gy, x, argmax, mean, a_gy, a_x, b, k, relu_before, lo, hi, gx):
    """gx of channels lo..hi-1: one pass per plane at k = 1, else with the windows' maxima."""
    if k == 1:
        _bn_gx(gy, x, argmax, mean, a_gy, a_x, b, relu_before, lo, hi, gx)
    else:
        _unpool_gx(gy, x, argmax, mean, a_gy, a_x, b, k, relu_before, lo, hi, gx)


def _tasks(x):
    """Channel ranges to share among Numba's threads for a block; 0: run on
    the calling thread (below ``PARALLEL_MIN_SIZE`` values, or one thread)."""
    if x.size < PARALLEL_MIN_SIZE:
        return 0
    tasks = min(numba.get_num_threads(), x.shape[1])
    return tasks if tasks > 1 else 0


def check_input(x, ndim=4):
    """TypeError unless x is a C-contiguous float32/float64 NumPy array of ``ndim`` dimensions:
    (N, C, H, W), or (N, C) for a dense block."""
    if not (isinstance(x, np.ndarray) and x.ndim == ndim and x.dtype in _FLOATS
            and x.flags.c_contiguous):
        shape = "(N, C, H, W)" if ndim == 4 else "(N, C)"
        raise TypeError(f"fused BN block: x must be a C-contiguous float32/float64 NumPy array of "
                        f"shape {shape}; got {type(x).__name__} {getattr(x, 'dtype', '')} "
                        f"{getattr(x, 'shape', '')}")


def channel_values(values, channels):
    """``values`` as a contiguous float64 (C,) array; ValueError for another shape."""
    arr = np.ascontiguousarray(values, dtype=np.float64)
    if arr.shape != (channels,):
        raise ValueError(f"fused BN block: per-channel values must have shape ({channels},); "
                         f"got {arr.shape}")
    return arr


def _pooled_outputs(x, k, relu_after):
    """Empty y and argmax, (N, C, H//k, W//k), for a checked x and pooling size k; argmax
    empty, (0, 0, 0, 0), where it would be all zeros (``untracked``)."""
    check_input(x)
    n, c, h, w = x.shape
    if h < k or w < k or not 1 <= k * k < INACTIVE:
        raise ValueError(f"fused BN block: pooling {k}x{k} needs inputs of at least {k}x{k} and "
                         f"k*k < {INACTIVE}; got {h}x{w}")
    y = np.empty((n, c, h // k, w // k), dtype=x.dtype)
    return y, np.empty((0,) * 4 if untracked(k, relu_after) else y.shape, dtype=np.uint8)


def check_argmax(gy, argmax, shape, k):
    """ValueError unless gy has the pooled shape of ``shape`` (N, C, H, W) and argmax that or,
    at k = 1, (0, 0, 0, 0) (``untracked``)."""
    pooled = (shape[0], shape[1], shape[2] // k, shape[3] // k)
    if (gy.shape != pooled or argmax.dtype != np.uint8
            or argmax.shape not in (pooled, (0,) * 4 if k == 1 else pooled)):
        raise ValueError(f"fused BN block: gy {gy.shape} and argmax {argmax.shape} (uint8) must "
                         f"have the pooled shape of {shape} with k = {k} (argmax (0, 0, 0, 0) "
                         f"at k = 1 without a ReLU after the BN)")


def untracked(k, relu_after):
    """Whether a block keeps no argmax: no pooling and no ReLU after the BN, so every position
    passes its gradient (a residual branch's last BN, a shortcut's). Its argmax would be all
    zeros: ResNet-20 (batch 100) wrote 1.25 MB of them per 16-channel block and read them twice
    in the backward."""
    return k == 1 and not relu_after


def bn_pool_forward(x, center, a, b, relu_after, k):
    """x (N, C, H, W) -> (y (N, C, H//k, W//k), argmax uint8 (same shape)).

    ``y = pool(relu?((x - center) * a + b))``; argmax holds each window's offset ``di * k + dj``
    or ``INACTIVE`` where ``relu_after`` zeroed the window's maximum; it is empty where
    ``untracked(k, relu_after)`` (every position passes its gradient).
    """
    y, argmax = _pooled_outputs(x, k, relu_after)
    c = x.shape[1]
    center, a, b = (channel_values(v, c) for v in (center, a, b))
    tasks = _tasks(x)
    if tasks:
        _forward_parallel(x, center, a, b, bool(relu_after), int(k), tasks, y, argmax)
    else:
        _forward(x, center, a, b, bool(relu_after), int(k), 0, c, y, argmax)
    return y, argmax


def bn_pool_train_forward(x, gamma, beta, eps, center_only, momentum, running_mean, running_var,
                          relu_after, k):
    """The training forward of a fused block in one call: the batch statistics, the running
    buffers' update and ``bn_pool_forward`` centred on the batch mean with
    ``a = gamma / sqrt(var + eps)`` (gamma when ``center_only``), ``b = beta``.

    Each thread takes its channels from statistics to pooled output, and no per-channel array
    goes back to Python in between (before, the statistics, their update, five NumPy
    operations on the coefficients and the pooling pass were separate calls). The statistics
    and the update are the numba backend's ``moments`` and ``finish_statistics`` kernels, so
    every value equals the unfused BN's. Running buffers: (C,) float arrays updated in place,
    or None. Returns ``(y, argmax, mean, var, inv_std)``; inv_std is None, and the buffers
    untouched, when a statistic is NaN or inf.
    """
    y, argmax = _pooled_outputs(x, k, relu_after)
    c = x.shape[1]
    gamma, beta = channel_values(gamma, c), channel_values(beta, c)
    buffers = (_running_buffer(running_mean, c, "running_mean"),
               _running_buffer(running_var, c, "running_var"))
    mean, var, a, inv_std = np.empty((4, c))
    options = (float(eps), bool(center_only), bool(relu_after), int(k), float(momentum))
    tasks = _tasks(x)
    if tasks:
        finite = _train_forward_parallel(x, gamma, beta, *options, *buffers, tasks, y, argmax,
                                         mean, var, a, inv_std)
    else:
        finite = _train_forward_serial(x, gamma, beta, *options, *buffers, y, argmax, mean, var,
                                       a, inv_std)
    return y, argmax, mean, var, (inv_std if finite else None)
def bn_pool_backward(gy, x, argmax, mean, scale, w, centered, relu_before, k):
    """The BN backward through the pooling (and ReLUs) of ``bn_pool_forward``.

    gy: (N, C, H//k, W//k) gradient of the pooled output; x: the BN's input (N, C, H, W);
    mean, scale (= gamma * xhat scale), w: the BN cache's per-channel values; ``centered``: the
    statistics came from this batch. Returns ``(gx, sum_gy, sum_gy_xc)`` like
    ``Backend.backward``, sums over the unpooled gradient g (float64), and
    ``gx = scale * (g - sum_gy / m - w * (x - mean) * sum_gy_xc / m)`` (m = N*H*W), or
    ``scale * g`` when the statistics were constants. Each thread takes its channels from the
    sums to gx in one parallel region.
    """
    check_input(x)
    gy = np.ascontiguousarray(gy, dtype=x.dtype)
    check_argmax(gy, argmax, x.shape, k)
    channels = x.shape[1]
    mean, scale, w = (channel_values(v, channels) for v in (mean, scale, w))
    sum_gy, sum_gy_xc, a_x, b = np.empty((4, channels))
    gx = np.empty_like(x)
    args = (gy, x, argmax, mean, scale, w, bool(centered), bool(relu_before), int(k))
    tasks = _tasks(x)
    if tasks:
        _backward_parallel(*args, tasks, sum_gy, sum_gy_xc, a_x, b, gx)
    else:
        _backward(*args, 0, channels, sum_gy, sum_gy_xc, a_x, b, gx)
    return gx, sum_gy, sum_gy_xc
