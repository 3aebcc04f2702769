"""Convolutions whose windows are read in place across a chunk of images (``numba_gemm``'s
``gemm_windows``), for ``numba_im2col_conv``'s 'chunk' layout: no im2col columns in the
forward, no col2im in the input gradient.

A chunk of images is copied phase by phase (``phase_major``): with stride s, input row
s*i + a and column s*j + b of channel c go to plane (c*s + a)*s + b at position (i, j), so
each plane is an output-sized (OH x OW) grid, the chunk's planes of one phase one after
another. Window offset (ki, kj) reads input row s*i + ki - pad = s*(i + di) + a: plane
(c, a, b) shifted by (di, dj), inside where 0 <= i + di < OH (``taps``). With stride 1 the
planes are the channels and the shifts those of a 'same' convolution. This needs the input to
be exactly s times the output (H = s*OH, W = s*OW: ``applies``), so that the planes hold every
input value once: ResNet's 'same' 3x3 convolutions and its stride-2 ones on even sizes.

The input gradient of phase (a, b) is a convolution of gy with that phase's window offsets
(ki, kj), shifted by (-di, -dj) (``gx_windows``): one ``gemm_windows`` per phase, its product
scattered onto the phase's rows and columns of gx. With stride 1 that is the forward
convolution of gy with the weights flipped in space and transposed in channels, offsets in
that order (the same sums as ``arraybn.nn.conv._input_gradient``'s on the columns).
"""
import functools

import numpy as np

from arraybn.backends import numba_gemm
from arraybn.backends.numba_config import jit, uidx


def applies(dtype, per_image, stride, h, w, oh, ow):
    """Whether a convolution runs here: float32 on a CPU where ``numba_gemm`` runs at speed,
    one GEMM per chunk (not ``per_image``), input exactly ``stride`` times the output.
    One thread, batch 100, ms, forward and backward, on columns (OpenBLAS from 64 channels;
    32 channels image by image in place) -> across the chunk: ResNet-20's 32-channel 14x14
    convolution 2.84 -> 2.61 and 6.83 -> 6.79, its 64-channel 7x7 one 3.21 -> 2.43 and
    6.58 -> 6.15, its stride-2 ones 16 -> 32 channels 3.23 -> 1.92 and 6.20 -> 5.00, 32 -> 64
    2.63 -> 1.75 and 5.21 -> 4.23; VGG-8's 64-channel 14x14 one 13.05 -> 11.14 and 26.31 ->
    26.67, its 128-channel 7x7 one 12.37 -> 10.39 and 24.62 -> 24.55 (the weight gradient, on
    columns as before, is most of the backward). Not ResNet's 1x1 stride-2 shortcuts ('image'
    layout; across the chunk forward 0.56 -> 0.96, backward 1.08 -> 2.32: three of the four
    phases copied for nothing)."""
    return (dtype == np.float32 and numba_gemm.available() and not per_image
            and h == stride * oh and w == stride * ow)


def taps(kh, kw, stride, pad):
    """Per window offset t = ki*kw + kj: its phase (a, b) (two (kh*kw,) arrays) and shift
    (di, dj) ((kh*kw, 2)): input row s*i + ki - pad = s*(i + di) + a, columns alike."""
    ki, kj = np.divmod(np.arange(kh * kw), kw)
    return ((ki - pad) % stride, (kj - pad) % stride,
            np.stack([(ki - pad) // stride, (kj - pad) // stride], axis=1).astype(np.int64))


@functools.lru_cache(maxsize=256)
def forward_windows(c, kh, kw, stride, pad, oh, ow, images):
    """``gemm_windows``' (offsets, table, table rows) for the im2col rows (ch, ki, kj) of chunks
    of at most ``images`` images, copied by ``phase_major``. Cached, as the other windows of a
    geometry (every step asks for the same): the arrays are shared, never to be written."""
    a, b, shifts = taps(kh, kw, stride, pad)
    ch, t = np.divmod(np.arange(c * kh * kw), kh * kw)
    offsets, table_rows = numba_gemm.shifted_offsets((ch * stride + a[t]) * stride + b[t], t,
                                                     shifts, oh, ow, images)
    return offsets, numba_gemm.shift_table(shifts, oh, ow, images), table_rows


def gx_windows(weight, stride, pad, oh, ow, images):
    """The input gradient's GEMMs, phase after phase (a, b) in the order (0, 0), (0, 1), ...:
    (A (C, rows) packed for ``numba_gemm``, offsets, table, table rows, bounds): phase p's
    rows are [bounds[p], bounds[p + 1]), (o, t) for the output channels o and the phase's
    window offsets t in descending order, reading gy's plane o (``phase_major`` with stride
    1) shifted by minus the offset's shift; A[c, (o, t)] = weight[o, c, ki, kj]."""
    o, c, kh, kw = weight.shape
    plane, tap, *windows = _gx_rows(o, kh, kw, stride, pad, oh, ow, images)
    a_rows = weight.reshape(o, c, kh * kw)[plane, :, tap].T            # (C, rows)
    packed = np.empty(numba_gemm.packed_shape(*a_rows.shape), np.float32)
    numba_gemm.pack_rows(a_rows, packed)
    return (packed, *windows)


@functools.lru_cache(maxsize=256)
def _gx_rows(o, kh, kw, stride, pad, oh, ow, images):
    """``gx_windows``' rows (their planes and window offsets) and (offsets, table, table rows,
    bounds), which depend on the geometry only."""
    a, b, shifts = taps(kh, kw, stride, pad)
    plane, tap, bounds = [], [], [0]
    for pa in range(stride):
        for pb in range(stride):
            offsets = [t for t in range(kh * kw - 1, -1, -1) if a[t] == pa and b[t] == pb]
            for och in range(o):
                plane += [och] * len(offsets)
                tap += offsets
            bounds.append(len(tap))
    plane, tap = np.array(plane, np.int64), np.array(tap, np.int64)
    offsets, table_rows = numba_gemm.shifted_offsets(plane, tap, -shifts, oh, ow, images)
    return (plane, tap, offsets, numba_gemm.shift_table(-shifts, oh, ow, images), table_rows,
            np.array(bounds, np.int64))


@jit()
def phase_major(a, lo, hi, stride, planes):
    """planes[(ch*s + pa)*s + pb, (i - lo)*P + r*OW + q] = a[i, ch, s*r + pa, s*q + pb] for
    the images i = lo..hi-1 of a (N, C, s*OH, s*OW), P = OH*OW."""
    c, oh, ow = a.shape[1], a.shape[2] // stride, a.shape[3] // stride
    positions = oh * ow
    for i in range(lo, hi):
        for ch in range(c):
            for pa in range(stride):
                for pb in range(stride):
                    row = uidx((ch * stride + pa) * stride + pb)
                    for r in range(oh):
                        base = (i - lo) * positions + r * ow
                        for q in range(ow):
                            planes[row, uidx(base + q)] = a[uidx(i), uidx(ch),
                                                            uidx(stride * r + pa),
                                                            uidx(stride * q + pb)]


@jit()
def fill_columns(planes, windows, cols):
    """cols[k, q] = planes.flat[offsets[k] + q] where table.flat[table_rows[k] + q], else 0
    (``windows``: (offsets, table, table rows)): the im2col columns the windows stand for."""
    offsets, table, table_rows = windows
    flat, flags = planes.reshape(planes.size), table.reshape(table.size)
    width = cols.shape[1]
    for k in range(cols.shape[0]):
        offset, flag0 = offsets[k], table_rows[k]
        lo = min(max(0, -offset), width)
        hi = max(lo, min(width, flat.size - offset))
        for q in range(lo):
            cols[k, uidx(q)] = 0
        for q in range(lo, hi):
            value = flat[uidx(offset + q)]
            cols[k, uidx(q)] = value if flags[uidx(flag0 + q)] else 0
        for q in range(hi, width):
            cols[k, uidx(q)] = 0


@jit()
def product(packed, m, planes, windows, width):
    """A (packed, m rows) @ the first ``width`` columns that ``windows`` stand for on
    ``planes``: (m, width)."""
    out = np.empty((m, width), planes.dtype)
    offsets, table, table_rows = windows
    numba_gemm.gemm_windows(packed, m, planes, offsets, table, table_rows, out)
    return out


@jit()
def input_gradient(gx_gemms, gy_planes, lo, hi, stride, gx):
    """gx[lo:hi] from the chunk's gy (``phase_major`` with stride 1) by ``gx_windows``' GEMMs,
    each phase's product scattered onto its rows and columns."""
    packed, offsets, table, table_rows, bounds = gx_gemms
    c, oh, ow = gx.shape[1], gx.shape[2] // stride, gx.shape[3] // stride
    positions = oh * ow
    product = np.empty((c, (hi - lo) * positions), gx.dtype)
    for p in range(stride * stride):
        k0, k1 = bounds[p], bounds[p + 1]
        pa, pb = p // stride, p % stride
        numba_gemm.gemm_windows(packed[:, k0:k1], c, gy_planes, offsets[k0:k1], table,
                                table_rows[k0:k1], product)
        for i in range(lo, hi):
            for ch in range(c):
                for r in range(oh):
                    base = (i - lo) * positions + r * ow
                    for q in range(ow):
                        gx[uidx(i), uidx(ch), uidx(stride * r + pa), uidx(stride * q + pb)] = (
                            product[uidx(ch), uidx(base + q)])


def tap_dots_apply(dtype, c, across, stride):
    """Whether the weight gradient of a convolution read across the chunk (``applies``) and
    otherwise on ``numba_gemm.gemm_nt`` runs on ``numba_gemm.gemm_taps`` (``tap_dots``):
    float32, stride 1 and a multiple of the vector width of input channels. One thread,
    batch 100, backward, ms, on columns -> by taps: ResNet-20's 32-channel 14x14 convolution
    7.81 -> 6.68 (its gemm_nt on columns ran at 83 GFLOP/s, gemm_taps at 115); not its
    stride-2 16 -> 32 one (5.20 -> 5.56: its input copied position by position is four times
    the output positions), nor 16 channels image by image (6.54 -> 7.75: the copies and the
    packing of gy every image), nor against OpenBLAS from 64 channels (a tie or a loss)."""
    return (dtype == np.float32 and numba_gemm.available() and c % numba_gemm.LANES == 0
            and across and stride == 1)


@functools.lru_cache(maxsize=256)
def tap_windows(c, kh, kw, stride, pad, oh, ow, images):
    """``numba_gemm.gemm_taps``' (tap offsets, table, tap rows) for the weight gradient of
    chunks of at most ``images`` images of c channels stored position by position
    (``position_major``): window offset t reads the planes of its phase shifted by its shift
    (``taps``), C values a position."""
    a, b, shifts = taps(kh, kw, stride, pad)
    offsets, tap_rows = numba_gemm.shifted_offsets(a * stride + b, np.arange(kh * kw), shifts,
                                                   oh, ow, images)
    return offsets * c, numba_gemm.shift_table(shifts, oh, ow, images), tap_rows


@jit()
def position_major(a, lo, hi, stride, out):
    """out[((pa*s + pb)*M + i - lo)*P + r*OW + q, ch] = a[i, ch, s*r + pa, s*q + pb] for the
    images i = lo..hi-1 of a (N, C, s*OH, s*OW), M = out.shape[0] / (s*s*P): the chunk's
    phase planes (``phase_major``) stored position by position."""
    c, oh, ow = a.shape[1], a.shape[2] // stride, a.shape[3] // stride
    positions = oh * ow
    size = out.shape[0] // (stride * stride)
    for i in range(lo, hi):
        for ch in range(c):
            for pa in range(stride):
                for pb in range(stride):
                    for r in range(oh):
                        base = (pa * stride + pb) * size + (i - lo) * positions + r * ow
                        for q in range(ow):
                            out[uidx(base + q), uidx(ch)] = a[uidx(i), uidx(ch),
                                                              uidx(stride * r + pa),
                                                              uidx(stride * q + pb)]


@jit()
def tap_dots(x, lo, hi, stride, gy2, tap_gemms, partial):
    """partial (C*T, O) = the transposed weight gradient of images lo..hi-1 (gy2: their gy,
    (O, positions), rows contiguous) by ``numba_gemm.gemm_taps`` with ``tap_gemms``
    (``tap_windows``)."""
    offsets, table, tap_rows = tap_gemms
    o, width = gy2.shape
    c, count = x.shape[1], offsets.size
    planes = np.empty((stride * stride * (table.shape[1] - numba_gemm.NR), c), x.dtype)
    position_major(x, lo, hi, stride, planes)
    packed = np.empty((-(-o // numba_gemm.MR), width, numba_gemm.MR), x.dtype)
    numba_gemm.pack_rows(gy2, packed)
    product = np.empty((o, count * c), x.dtype)
    numba_gemm.gemm_taps(packed, o, planes, c, offsets, table, tap_rows, width, product)
    for ch in range(c):
        for t in range(count):
            for p in range(o):
                partial[uidx(ch * count + t), uidx(p)] = product[uidx(p), uidx(t * c + ch)]
