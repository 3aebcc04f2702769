"""im2col convolutions ('image' and 'chunk' layouts: any stride and padding) without the GIL.

The counterpart of ``numba_flat_conv`` for the convolutions that are not 'flat': VGG-8's and
ResNet's padded 3x3 convolutions and ResNet's strided ones. ``arraybn.nn.conv`` runs them chunk
by chunk of the batch, one GEMM per image ('image' layout) or per chunk ('chunk'); on NumPy each
chunk's im2col is nine strided slice copies whose Python holds the GIL, so two chunk threads
wait on each other. Here the chunks run without the GIL, all in one Numba call that shares them
out among Numba's threads (as in ``numba_flat_conv``): per chunk im2col (row by row, zeros on
the padding), the GEMMs, the copies in and out, col2im.

Indices in the copy loops are unsigned (``uidx``): with signed ones Numba adds a negative-index
wrap-around to every access, which kept LLVM from vectorising the copies (im2col of two
16-channel 28x28 images: 0.137 ms signed, 0.048 unsigned, NumPy's slice copies 0.046).

The GEMMs are the calls ``np.matmul`` makes in ``arraybn.nn.conv``, with the same shapes,
transposes and leading dimensions, to the same OpenBLAS (``numba_flat_conv.GEMMS``); bias adds
and col2im's sums run in the same order. So the results equal the NumPy path bit for bit, on any
number of threads, except where a float32 convolution has at most 32 output channels or im2col
rows (``own_gemm``): there W @ columns and W.T @ gy run on ``numba_gemm``, which
OpenBLAS is slow at, the weight gradient too (``own_dots``), and 'same' convolutions read their
windows in place (ResNet-20's 16- and 32-channel convolutions, forward + backward, one thread:
19.1 -> 11.8 and 14.9 -> 12.1 ms); and except where a float32 convolution in the 'chunk'
layout has an input exactly stride times its output ('same' ones, ResNet's stride-2 ones;
``across_chunk.applies``): its forward and input gradient read their windows in place across
the chunk, with any number of channels, and so does the weight gradient of some
(``across_chunk.tap_dots_apply``). There the results are within float32 rounding of the NumPy
path's, still the same bits on any number of threads. (Where a GEMM dimension is 1 NumPy
calls GEMV: the caller keeps the NumPy path there.)
"""
import numpy as np
from numba import prange

from arraybn.backends import numba_across_chunk as across_chunk
from arraybn.backends import numba_conv_epilogue as epilogues
from arraybn.backends import numba_gemm
from arraybn.backends.numba_config import jit, uidx
from arraybn.backends.numba_flat_conv import (NO_TRANS, ROW_MAJOR, TRANS, add_to, cblas_gemm,
                                              check_arrays, chunk_bounds, gemm_args)

OWN_GEMM_MAX = 32     # numba_gemm where the output channels or im2col rows are this few or fewer
# Per-image weight gradients on numba_gemm read their windows in place with at most this many
# output channels (each group of 4 masks the windows anew). Weight gradient of 100 images, one
# thread, columns -> in place: 16 x 28 x 28 (ResNet-20) 4.8 -> 3.9 ms, 32 x 28 x 28 (VGG-8
# conv2) 16.9 -> 17.3; ResNet-20's 32 x 14 x 14 ('chunk' layout) 5.1 on the chunk's columns,
# 5.3 in place image by image.
WINDOW_DOTS_MAX = 16


def own_gemm(dtype, o, rows):
    """Whether a convolution's W @ columns and W.T @ gy run on ``numba_gemm`` (float32, with O
    or C*kh*kw at most ``OWN_GEMM_MAX``), not OpenBLAS. One thread, GFLOP/s, numba_gemm against
    OpenBLAS: 16 x 144 x 784 (ResNet-20's 16-channel forward per image) 133 / 91, 32 x 288 x 784
    (VGG-8 conv2's, ResNet-20's 32-channel chunk) 146 / 109, W.T @ gy 288 x 32 x 784 125 / 112,
    144 x 16 x 784 127 / 88; where both are wider OpenBLAS wins or ties: 64 x 576 x 784 116 /
    123, 128 x 1152 x 294 113 / 122, 576 x 64 x 441 128 / 127. (Not in the 'flat' kernels of
    ``numba_flat_conv``: LeNet-5's conv1, 6 x 25 x 672 per image, took 0.85 -> 1.05 ms forward +
    backward with it, conv2 a tie.)"""
    return dtype == np.float32 and numba_gemm.available() and min(o, rows) <= OWN_GEMM_MAX


def pack_weights(a, own):
    """``a`` packed for ``numba_gemm.gemm`` if ``own``, else an empty placeholder."""
    if not own:
        return np.zeros((0, 1, numba_gemm.MR), np.float32)
    packed = np.empty(numba_gemm.packed_shape(*a.shape), np.float32)
    numba_gemm.pack_rows(a, packed)
    return packed


@jit()
def weights_times(own, packed, w2, transpose, gemm, one, zero, b, out):
    """out = w2 @ b, or w2.T @ b if ``transpose`` (b and out 2-D, contiguous): on
    ``numba_gemm`` with ``packed`` (w2 or w2.T packed) if ``own``, else OpenBLAS."""
    if own:
        numba_gemm.gemm(packed, out.shape[0], b, out)
        return
    o, rows = w2.shape
    n = b.shape[1]
    m, k = (rows, o) if transpose else (o, rows)
    cblas_gemm(gemm, ROW_MAJOR, TRANS if transpose else NO_TRANS, NO_TRANS, m, n, k, one,
               w2.ctypes.data, rows, b.ctypes.data, n, zero, out.ctypes.data, n)


@jit()
def _valid(offset, stride, size, out):
    """Output positions [lo, hi) whose input position ``o * stride + offset`` is in [0, size)
    (``arraybn.nn.conv._valid``)."""
    lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
    hi = min(out, (size - 1 - offset) // stride + 1) if size - 1 - offset >= 0 else 0
    return lo, max(lo, hi)


@jit()
def _column_masks(kw, pad, oh, ow):
    """masks[kj, i*OW + j]: whether output position (i, j) of a 'same' convolution reads
    inside its image row in window column kj (0 <= j + kj - pad < OW), for ``_fill_same`` and
    ``_add_same``."""
    masks = np.empty((kw, oh * ow), np.bool_)
    for kj in range(kw):
        for i in range(oh):
            for j in range(ow):
                masks[kj, i * ow + j] = 0 <= j + kj - pad < ow
    return masks


@jit()
def _same(stride, h, w, oh, ow):
    """Whether a convolution is 'same' (stride 1, output as large as the input)."""
    return stride == 1 and oh == h and ow == w


@jit()
def _fill(image, kh, kw, stride, pad, oh, ow, cols, col0, masks):
    """The windows of one (C, H, W) image into columns col0 .. col0 + OH*OW - 1 of ``cols``
    (C*kh*kw, *): ``cols[(c*kh + ki)*kw + kj, col0 + i*OW + j] = padded[c, i*stride + ki,
    j*stride + kj]``, zero on the padding. masks: ``_column_masks``, used if 'same'."""
    c, h, w = image.shape
    if _same(stride, h, w, oh, ow):
        _fill_same(image, kh, kw, pad, cols, col0, masks)
        return
    for ch in range(c):
        for ki in range(kh):
            for kj in range(kw):
                row = uidx((ch * kh + ki) * kw + kj)
                j0, j1 = _valid(kj - pad, stride, w, ow)
                for i in range(oh):
                    src, base = i * stride + ki - pad, col0 + i * ow
                    if src < 0 or src >= h:
                        for j in range(ow):
                            cols[row, uidx(base + j)] = 0
                        continue
                    for j in range(j0):
                        cols[row, uidx(base + j)] = 0
                    for j in range(j1, ow):
                        cols[row, uidx(base + j)] = 0
                    for j in range(j0, j1):
                        source = uidx(j * stride + kj - pad)
                        cols[row, uidx(base + j)] = image[uidx(ch), uidx(src), source]


@jit()
def _fill_same(image, kh, kw, pad, cols, col0, masks):
    """``_fill`` for a 'same' convolution (stride 1, output as large as the input): a window
    row (c, ki, kj) is the flattened plane c shifted by (ki - pad) * W + kj - pad, so it is one
    contiguous run with zeros before and after (the rows off the image), and zeros where
    ``masks[kj]`` says a column wrapped around a row's end: a select in the run's loop, which
    vectorises. Per output row, as the general loop copies, VGG-8's 14x14 and 7x7 planes cost
    0.45 and 0.74 ns a value against 0.2 at 28x28 (one thread); zeroing the wrapped columns
    after the copy, row by row, im2col of the batch took 1.93 and 2.08 ms for VGG-8's 64-channel
    14x14 and 128-channel 7x7 layers, with the select 1.45 and 1.40 ms."""
    c, h, w = image.shape
    size = h * w
    planes = image.reshape(c, size)
    for ch in range(c):
        for ki in range(kh):
            for kj in range(kw):
                row, shift = uidx((ch * kh + ki) * kw + kj), (ki - pad) * w + kj - pad
                lo, hi = min(max(0, -shift), size), max(0, min(size, size - shift))
                for q in range(lo):
                    cols[row, uidx(col0 + q)] = 0
                for q in range(lo, hi):
                    value = planes[uidx(ch), uidx(q + shift)]
                    cols[row, uidx(col0 + q)] = value if masks[uidx(kj), uidx(q)] else 0
                for q in range(max(lo, hi), size):
                    cols[row, uidx(col0 + q)] = 0


@jit()
def _add(gcols, col0, kh, kw, stride, pad, oh, ow, gimage, masks):
    """Adjoint of ``_fill``: gimage (C, H, W) = the windows of ``gcols`` added up, overlaps in
    the order (ki, kj) from zero (``arraybn.nn.conv.add_columns``); the padding's share is
    dropped. masks: ``_column_masks``, used if 'same'."""
    c, h, w = gimage.shape
    if _same(stride, h, w, oh, ow):
        _add_same(gcols, col0, kh, kw, pad, gimage, masks)
        return
    for ch in range(c):
        gimage[ch] = 0
        for ki in range(kh):
            for kj in range(kw):
                row = uidx((ch * kh + ki) * kw + kj)
                j0, j1 = _valid(kj - pad, stride, w, ow)
                i0, i1 = _valid(ki - pad, stride, h, oh)
                for i in range(i0, i1):
                    src, base = uidx(i * stride + ki - pad), col0 + i * ow
                    for j in range(j0, j1):
                        target = uidx(j * stride + kj - pad)
                        gimage[uidx(ch), src, target] += gcols[row, uidx(base + j)]


@jit()
def _add_same(gcols, col0, kh, kw, pad, gimage, masks):
    """``_add`` for a 'same' convolution: window row (c, ki, kj) added to the flattened plane
    c shifted by (ki - pad) * W + kj - pad as one run, where ``masks[kj]`` says the column did
    not wrap around a row's end (a select of the sum or the old value: the same bits as
    skipping it, signed zeros included). Row by row, col2im of the batch took 2.81 and 2.33
    ms for VGG-8's 64-channel 14x14 and 128-channel 7x7 layers, as runs 1.22 and 1.28 ms."""
    c, h, w = gimage.shape
    size = h * w
    planes = gimage.reshape(c, size)
    for ch in range(c):
        planes[ch] = 0
        for ki in range(kh):
            for kj in range(kw):
                row, shift = uidx((ch * kh + ki) * kw + kj), (ki - pad) * w + kj - pad
                lo, hi = min(max(0, -shift), size), max(0, min(size, size - shift))
                for q in range(lo, hi):
                    old = planes[uidx(ch), uidx(q + shift)]
                    new = old + gcols[row, uidx(col0 + q)]
                    planes[uidx(ch), uidx(q + shift)] = new if masks[uidx(kj), uidx(q)] else old


@jit()
def _copy_out(out, col0, bias, has_bias, plane):
    """plane (O, P) = out[:, col0:col0 + P] (+ bias[o])."""
    o, positions = plane.shape
    for p in range(o):
        for q in range(positions):
            value = out[uidx(p), uidx(col0 + q)]
            plane[uidx(p), uidx(q)] = value + bias[p] if has_bias else value


def own_dots(dtype, o, rows):
    """Whether a convolution's weight gradient, columns @ gy.T, runs on ``numba_gemm.gemm_nt``
    (float32, at most ``OWN_GEMM_MAX`` output channels and more im2col rows), not OpenBLAS.
    One thread, GFLOP/s, against OpenBLAS: 144 x 16 x 784 (ResNet-20's 16 channels, per image)
    97 / 69, 288 x 32 x 784 121 / 96, 144 x 32 x 784 101 / 87; with 64 or more channels
    OpenBLAS wins (576 x 64 x 441: 94 / 120), and with few rows (VGG-8 conv1's 9: 84 / 90)."""
    return (dtype == np.float32 and numba_gemm.available()
            and o <= OWN_GEMM_MAX < rows)


@jit()
def _columns_times_gy(own, gemm, one, zero, cols, gy2, accumulate, product, partial):
    """partial (rows, O) = cols (rows, P) @ gy2 (O, P).T, or partial += that if
    ``accumulate`` (OpenBLAS's product written into ``product`` first, then added): on
    ``numba_gemm.gemm_nt`` if ``own``, else OpenBLAS. cols contiguous, gy2's rows contiguous
    (any row stride)."""
    if own:
        numba_gemm.gemm_nt(cols, gy2, partial, accumulate)
        return
    rows, positions = cols.shape
    o = gy2.shape[0]
    target = product if accumulate else partial
    cblas_gemm(gemm, ROW_MAJOR, NO_TRANS, TRANS, rows, o, positions, one, cols.ctypes.data,
               positions, gy2.ctypes.data, gy2.strides[0] // gy2.itemsize, zero,
               target.ctypes.data, o)
    if accumulate:
        add_to(partial, product)


@jit()
def _forward(x, w2, bias, has_bias, kh, kw, stride, pad, per_image, gemm, one, zero, lo, hi,
             masks, own, packed, windows, across, epilogue, y):
    """y[lo:hi] of ``conv_forward``: W @ columns per image (into y) or per chunk (copied). A
    'same' convolution on ``numba_gemm`` reads its windows in place (``numba_gemm.gemm_windows``
    with ``windows``, the offsets, table and table rows of ``conv_forward``, empty where not):
    across the chunk if ``across`` (``across_chunk.applies``; strided ones too), else image by
    image; no columns written, the same sums bit for bit as on the columns.
    Forward + backward, one thread, batch 100, columns -> in place: ResNet-20's 16-channel
    convolution 14.9 -> 11.8 ms (its input gradient is such a forward convolution too), VGG-8
    conv2 48.6 -> 44.4, ResNet-20's 32-channel one ('chunk': 196 positions an image, against
    784 a chunk's GEMM) 12.8 -> 12.1."""
    o, rows = w2.shape
    oh, ow = y.shape[2], y.shape[3]
    positions = oh * ow
    in_place = windows[0].size > 0 and not across    # offsets: empty unless in place
    if per_image or in_place:
        cols = np.empty((0 if in_place else rows, positions), x.dtype)
        offsets, table, table_rows = windows
        for i in range(lo, hi):
            plane = y[i].reshape(o, positions)
            if in_place:
                numba_gemm.gemm_windows(packed, o, x[i], offsets, table, table_rows, plane)
            else:
                _fill(x[i], kh, kw, stride, pad, oh, ow, cols, 0, masks)
                weights_times(own, packed, w2, False, gemm, one, zero, cols, plane)
            if has_bias:
                _copy_out(plane, 0, bias, True, plane)
            epilogues.apply(epilogue, y, i)
        return
    width = (hi - lo) * positions
    if across:
        out = across_chunk.product(packed, o, _planes(x, lo, hi, stride, windows), windows,
                                   width)
    else:
        cols = np.empty((rows, width), x.dtype)
        out = np.empty((o, width), x.dtype)
        for i in range(lo, hi):
            _fill(x[i], kh, kw, stride, pad, oh, ow, cols, (i - lo) * positions, masks)
        weights_times(own, packed, w2, False, gemm, one, zero, cols, out)
    for i in range(lo, hi):
        _copy_out(out, (i - lo) * positions, bias, has_bias, y[i].reshape(o, positions))
        epilogues.apply(epilogue, y, i)


@jit()
def _planes(a, lo, hi, stride, windows):
    """The chunk lo..hi-1 of a (N, C, H, W) copied phase by phase (``across_chunk.phase_major``)
    into planes as long as ``windows``' table rows take."""
    planes = np.empty((a.shape[1] * stride * stride, windows[1].shape[1] - numba_gemm.NR),
                      a.dtype)
    across_chunk.phase_major(a, lo, hi, stride, planes)
    return planes


@jit()
def _backward(gy, x, w2, kh, kw, stride, pad, per_image, need_gx, gemm, one, zero, lo, hi,
              masks, own, packed, own_dots, windows, across, gx_gemms, tap_gemms, partial,
              gx):
    """Images lo..hi-1 of ``conv_backward``: ``partial`` = their transposed weight gradient
    (per image, added up in batch order as NumPy's ``sum(axis=0)``, or the chunk's one GEMM),
    and gx[i] if need_gx. A 'same' convolution whose weight gradient runs on ``numba_gemm`` in
    the per-image layout with at most ``WINDOW_DOTS_MAX`` output channels reads its windows in
    place (``numba_gemm.gemm_nt_windows``, ``windows`` as in ``_forward``): no columns
    written, the same bits as on the columns. If ``across`` (``across_chunk.applies``), the
    chunk's columns come from its phase planes and ``windows`` (``across_chunk.fill_columns``)
    and gx from ``gx_gemms`` (``across_chunk.gx_windows``) on the chunk's gy copied channel
    by channel, which the weight gradient's GEMM reads too."""
    o, rows = w2.shape
    oh, ow = gy.shape[2], gy.shape[3]
    positions = oh * ow
    if hi <= lo:
        partial[:, :] = 0                              # an empty chunk (an empty batch)
        return
    if per_image:
        in_place = windows[0].size > 0                 # offsets: empty unless in place
        cols = np.empty((0 if in_place else rows, positions), x.dtype)
        gcols = np.empty((rows, positions), x.dtype)
        product = np.empty((rows, o), x.dtype)
        offsets, table, table_rows = windows
        for i in range(lo, hi):
            if in_place:
                numba_gemm.gemm_nt_windows(x[i], offsets, table, table_rows,
                                           gy[i].reshape(o, positions), partial, i > lo)
            else:
                _fill(x[i], kh, kw, stride, pad, oh, ow, cols, 0, masks)
                _columns_times_gy(own_dots, gemm, one, zero, cols,
                                  gy[i].reshape(o, positions), i > lo, product, partial)
            if need_gx:
                weights_times(own, packed, w2, True, gemm, one, zero,
                               gy[i].reshape(o, positions), gcols)
                _add(gcols, 0, kh, kw, stride, pad, oh, ow, gx[i], masks)
        return
    width = (hi - lo) * positions
    by_taps = tap_gemms[0].size > 0
    cols = np.empty((0 if by_taps else rows, width), x.dtype)
    if across:
        if not by_taps:
            across_chunk.fill_columns(_planes(x, lo, hi, stride, windows), windows, cols)
        planes = _planes(gy, lo, hi, 1, windows)
    else:
        for i in range(lo, hi):
            _fill(x[i], kh, kw, stride, pad, oh, ow, cols, (i - lo) * positions, masks)
        planes = np.empty((o, width), x.dtype)
        across_chunk.phase_major(gy, lo, hi, 1, planes)
    gy_om = planes[:, :width]
    if by_taps:
        across_chunk.tap_dots(x, lo, hi, stride, gy_om, tap_gemms, partial)
    else:
        _columns_times_gy(own_dots, gemm, one, zero, cols, gy_om, False, partial, partial)
    if need_gx and across:
        across_chunk.input_gradient(gx_gemms, planes, lo, hi, stride, gx)
    elif need_gx:
        gcols = np.empty((rows, width), x.dtype)
        weights_times(own, packed, w2, True, gemm, one, zero, gy_om, gcols)
        for i in range(lo, hi):
            _add(gcols, (i - lo) * positions, kh, kw, stride, pad, oh, ow, gx[i], masks)


@jit()
def _windows(c, kh, kw, pad, oh, ow, images):
    """(offsets, table, table rows) of ``numba_gemm``'s in-place windows for chunks of at most
    ``images`` (c, oh, ow) images channel by channel (``window_offsets``; one image: an image
    as it is), or empty arrays of the same types if ``images`` is 0."""
    offsets, table_rows = numba_gemm.window_offsets(c if images else 0, kh, kw, pad, oh, ow,
                                                    images)
    return offsets, numba_gemm.window_table(kh if images else 0, kw, pad, oh, ow,
                                            images), table_rows


# gx_gemms where there are none (no input gradient across the chunk)
NO_GEMMS = (np.zeros((0, 0, numba_gemm.MR), np.float32), np.zeros(0, np.int64),
            np.zeros((0, 0), np.uint8), np.zeros(0, np.int64), np.zeros(1, np.int64))


# tap_gemms where the weight gradient is not by taps
NO_TAPS = (np.zeros(0, np.int64), np.zeros((0, 0), np.uint8), np.zeros(0, np.int64))


@jit(parallel=True)
def _forward_tasks(x, w2, bias, has_bias, kh, kw, stride, pad, per_image, gemm, one, zero,
                   bounds, own, packed, windows, across, epilogue, y):
    """``_forward`` of every chunk [bounds[t], bounds[t + 1]), the chunks shared out among
    Numba's threads."""
    masks = _column_masks(kw, pad, y.shape[2], y.shape[3])
    for t in prange(bounds.size - 1):
        _forward(x, w2, bias, has_bias, kh, kw, stride, pad, per_image, gemm, one, zero,
                 bounds[t], bounds[t + 1], masks, own, packed, windows, across, epilogue, y)


@jit(parallel=True)
def _backward_tasks(gy, x, w2, kh, kw, stride, pad, per_image, need_gx, gemm, one, zero,
                    bounds, own, packed, own_dots, windows, across, gx_gemms, tap_gemms, partials,
                    gx):
    """``_backward`` of every chunk into partials[t], the chunks shared out among Numba's
    threads."""
    masks = _column_masks(kw, pad, gy.shape[2], gy.shape[3])
    for t in prange(bounds.size - 1):
        _backward(gy, x, w2, kh, kw, stride, pad, per_image, need_gx, gemm, one, zero,
                  bounds[t], bounds[t + 1], masks, own, packed, own_dots, windows, across,
                  gx_gemms, tap_gemms, partials[t], gx)


def _geometry(x, out, per_image, stride, chunks):
    """(bounds of the chunks, whether the windows are read across the chunk
    (``across_chunk.applies``), the most images of a chunk) for a convolution of x into out
    (y or gy)."""
    bounds = chunk_bounds(chunks)
    across = across_chunk.applies(x.dtype, per_image, stride, *x.shape[2:], *out.shape[2:])
    return bounds, across, int(max(np.diff(bounds), default=0))


def conv_forward(x, weight, bias, chunks, stride, pad, per_image, y, epilogue=None):
    """y = the convolution of x (N, C, H, W) with weight (O, C, kh, kw), plus bias (O,) if not
    None, with ``stride`` and zero padding ``pad``, for the images of ``chunks`` (slices of the
    batch); one GEMM per image if ``per_image``, else one per chunk; the chunks shared out among
    Numba's threads. epilogue: None, or (center, a, b, relu, skip) for ``numba_conv_epilogue``
    to apply to each image's output right after it is written. Releases the GIL."""
    check_arrays(x, weight, y)
    o, c, kh, kw = weight.shape
    oh, ow = y.shape[2:]
    w2 = weight.reshape(o, -1)
    bounds, across, images = _geometry(x, y, per_image, stride, chunks)
    own = own_gemm(x.dtype, *w2.shape) or across
    windows = (across_chunk.forward_windows(c, kh, kw, stride, pad, oh, ow, images) if across
               else _windows(c, kh, kw, pad, oh, ow,
                             int(own and _same(stride, *x.shape[2:], oh, ow))))
    _forward_tasks(x, w2, np.zeros(o, x.dtype) if bias is None else bias,
                   bias is not None, kh, kw, stride, pad, per_image, *gemm_args(x.dtype),
                   bounds, own, pack_weights(w2, own), windows, across,
                   epilogues.kernel_argument(epilogue, y), y)


def conv_backward(gy, x, weight, chunks, stride, pad, per_image, gx):
    """Per chunk of ``chunks``, its weight gradient, transposed as in ``arraybn.nn.conv``:
    (chunks, C*kh*kw, O) (the caller adds them in chunk order, as the NumPy path does); gx
    written for the chunks' images unless gx is None. Releases the GIL."""
    check_arrays(x, weight, gy, *(() if gx is None else (gx,)))
    o, c, kh, kw = weight.shape
    oh, ow = gy.shape[2:]
    partials = np.empty((len(chunks), c * kh * kw, o), x.dtype)
    w2 = weight.reshape(o, -1)
    bounds, across, images = _geometry(x, gy, per_image, stride, chunks)
    own = gx is not None and own_gemm(x.dtype, *w2.shape) and not across
    dots = own_dots(x.dtype, *w2.shape)
    if across:
        windows = across_chunk.forward_windows(c, kh, kw, stride, pad, oh, ow, images)
    else:                                   # the weight gradient's windows in place per image
        windows = _windows(c, kh, kw, pad, oh, ow, int(
            dots and per_image and o <= WINDOW_DOTS_MAX and _same(stride, *x.shape[2:], oh, ow)))
    gx_gemms = (across_chunk.gx_windows(weight, stride, pad, oh, ow, images)
                if across and gx is not None else NO_GEMMS)
    tap_gemms = (across_chunk.tap_windows(c, kh, kw, stride, pad, oh, ow, images)
                 if dots and across_chunk.tap_dots_apply(x.dtype, c, across, stride)
                 else NO_TAPS)
    _backward_tasks(gy, x, w2, kh, kw, stride, pad, per_image, gx is not None,
                    *gemm_args(x.dtype), bounds, own, pack_weights(w2.T, own), dots, windows,
                    across, gx_gemms, tap_gemms, partials,
                    np.empty((0,) + x.shape[1:], x.dtype) if gx is None else gx)
    return partials
