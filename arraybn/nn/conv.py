"""2-D convolution (im2col + GEMMs over chunks of the batch) and max pooling, NCHW like PyTorch.

``im2col`` lays out a batch (or chunk) for one GEMM: it writes
cols (C*kh*kw, N*OH*OW), rows ordered (c, ki, kj) like ``weight.reshape(O, -1)`` and columns
(n, i, j), so the forward is ``W (O, C*kh*kw) @ cols -> (O, N*OH*OW)``, the weight gradient
``gy (O, N*OH*OW) @ cols.T`` and the input gradient ``W.T @ gy -> gcols``. Keeping each output
row contiguous in the columns makes the switch between (O, N, OH*OW) and NCHW a copy of
contiguous rows (fused with the bias add in the forward), a small fraction of the GEMM's work.

Chunks of the batch (``batch_chunks``) use one of three layouts (``_layout``): one GEMM per
chunk as above, one GEMM per image (columns (m, C*kh*kw, OH*OW)), or, per image with stride 1
and no padding, one GEMM per image on the flattened plane (columns (m, C*kh*kw, OH*W): a window
is one contiguous run of the plane, so im2col and col2im move runs of (OH-1)*W + OW values, not
rows of OW; LeNet-5 conv2's forward + backward 3.4 -> 2.6 ms, 1 thread).
im2col reads the input in place and zeroes the entries on the padding (no padded copy), col2im
adds into the unpadded gradient; both are strided slice copies on any ``xp`` (numpy or cupy),
as fast as Numba loops with unsigned indices (``numba_config.uidx``), but holding the GIL
between copies: the numba backend's kernels do the same work without it. A backend whose
``conv_ops()`` offers one-pass pooling has MaxPool2d call it. A Conv2d layer reuses its buffers
from step to step (only the latest forward's cache is ever used by backward, so nothing else
sees them), one set per chunk thread: on the NumPy path a large layer's chunks run on several
threads (``chunk_threads``). A backend with its own convolution kernels (numba:
``numba_flat_conv``, ``numba_im2col_conv``; without the GIL, the same results bit for bit or,
in float32 with few channels, on its own GEMM within rounding; see ``_kernels``) runs all of a
layer's chunks in one call, shared out among its threads. The input
gradient of a 'same' convolution (stride 1, padding (k-1)/2) in a per-image layout is a forward
convolution of the output gradient with the flipped weights, not a col2im.
"""
import functools
import math

import numpy as np

from arraybn.nn import chunk_threads
from arraybn.nn.chunk_threads import (CHUNK_MULTIPLE, one_blas_thread, parallel_chunks,
                                      run_chunks)
from arraybn.nn.layers import Layer, Parameter, kaiming_uniform

CHUNK_BYTES = 1 << 20         # im2col columns per chunk of the batch: about one core's L2 cache
MIN_CHUNK_COLUMNS = 256       # output positions per chunk at least (a wide enough GEMM); see
                              # batch_chunks for why not 1024
PER_IMAGE_MIN_POSITIONS = 256  # one GEMM per image from this many output positions per image
PER_IMAGE_MAX_ROWS = 64        # or up to this many im2col rows (C*kh*kw); see _per_image


def _out_size(size, k, stride, pad):
    out = (size + 2 * pad - k) // stride + 1
    if out < 1:
        raise ValueError(f"input size {size} is too small for kernel {k} with padding {pad}; "
                         "use a larger input or a smaller kernel")
    return out


def _buffer(workspace, key, shape, dtype, xp, zeros=False):
    """A reusable array from ``workspace`` (a dict, or None for a fresh one each call); a new
    one is zero-filled when ``zeros``."""
    buf = None if workspace is None else workspace.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
        buf = (xp.zeros if zeros else xp.empty)(shape, dtype=dtype)
        if workspace is not None:
            workspace[key] = buf
    return buf


def batch_chunks(n, column_bytes, positions, xp, multiple=1):
    """Slices of the batch, sizes as equal as possible, for chunked im2col.

    On the CPU a chunk's columns take about ``CHUNK_BYTES`` (they stay in cache from im2col to
    the GEMM) with at least ``MIN_CHUNK_COLUMNS`` output positions (a GEMM wide enough to run
    at speed); ``column_bytes`` and ``positions`` are one image's. The floor was 1024 until the
    ninth session: it made VGG-8's 7x7 layers 4 chunks of 25 images, up to 5.6 MB of columns
    each, far past the cache; with 256 (12 and 16 chunks) the VGG-8 step took 239 ms instead of
    242-251 on one thread and 117-125 instead of 130-131 on two (two runs each; 128 no better).
    The number of chunks is a ``multiple`` (as the batch allows), so that threads get equal
    shares: rounded down (chunks a little over the cache budget keep the GEMMs wide), or up from
    fewer. On a GPU the whole batch is one chunk.
    """
    if xp is not np:
        return [slice(0, n)]
    size = max(1, CHUNK_BYTES // column_bytes, -(-MIN_CHUNK_COLUMNS // positions))
    count = -(-n // size)
    count = max(1, count // multiple * multiple if count >= multiple else min(n, multiple))
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def _valid(offset, stride, size, out):
    """Output positions [lo, hi) whose input position ``o * stride + offset`` is in [0, size)."""
    lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
    hi = min(out, (size - 1 - offset) // stride + 1) if size - 1 - offset >= 0 else 0
    return lo, max(lo, hi)


@functools.lru_cache(maxsize=4096)
def _window_slices(ki, kj, stride, pad, in_hw, out_hw):
    """For the window offset (ki, kj): the output slices that read inside the input (the rest
    reads the zero padding) and the input slices they read; None if all of it is padding.
    Cached: im2col asks for the same few geometries chunk after chunk (ResNet-20: 11,000
    calls a step, 30 ms of Python at one thread)."""
    (h, w), (oh, ow) = in_hw, out_hw
    i0, i1 = _valid(ki - pad, stride, h, oh)
    j0, j1 = _valid(kj - pad, stride, w, ow)
    if i0 == i1 or j0 == j1:
        return None
    out = (slice(i0, i1), slice(j0, j1))
    src = (slice(i0 * stride + ki - pad, (i1 - 1) * stride + ki - pad + 1, stride),
           slice(j0 * stride + kj - pad, (j1 - 1) * stride + kj - pad + 1, stride))
    return out, src


def fill_columns(x, cols6, stride, pad, padding_zeroed=False):
    """Write the windows of x (N, C, H, W) into ``cols6``, a (C, kh, kw, N, OH, OW) array or
    view: ``cols6[c, ki, kj, n, i, j] = x_padded[n, c, i*stride + ki, j*stride + kj]``.

    Reads x in place (no padded copy): the entries on the padding are zeroed, unless
    ``padding_zeroed`` says they are zero already (they lie at the same places for the same
    geometry, so a reused buffer zeroed once stays so).
    """
    h, w = x.shape[2:]
    kh, kw, _, oh, ow = cols6.shape[1:]
    planes = x.transpose(1, 0, 2, 3)                              # (C, N, H, W) view
    for ki in range(kh):
        for kj in range(kw):
            window = _window_slices(ki, kj, stride, pad, (h, w), (oh, ow))
            dst = cols6[:, ki, kj]
            if window is None:
                if not padding_zeroed:
                    dst[...] = 0
                continue
            (rows, columns), (src_rows, src_columns) = window
            if pad and not padding_zeroed:
                dst[:, :, :rows.start] = 0
                dst[:, :, rows.stop:] = 0
                dst[:, :, rows, :columns.start] = 0
                dst[:, :, rows, columns.stop:] = 0
            dst[:, :, rows, columns] = planes[:, :, src_rows, src_columns]


def add_columns(cols6, gx, stride, pad):
    """Adjoint of ``fill_columns``: add the windows of ``cols6`` (C, kh, kw, N, OH, OW) into
    gx (N, C, H, W), overlaps summed in the order (ki, kj); the padding's share is dropped."""
    h, w = gx.shape[2:]
    kh, kw, _, oh, ow = cols6.shape[1:]
    planes = gx.transpose(1, 0, 2, 3)                             # (C, N, H, W) view
    for ki in range(kh):
        for kj in range(kw):
            window = _window_slices(ki, kj, stride, pad, (h, w), (oh, ow))
            if window is not None:
                (rows, columns), (src_rows, src_columns) = window
                planes[:, :, src_rows, src_columns] += cols6[:, ki, kj, :, rows, columns]


def fill_flat_columns(x, cols5):
    """Stride 1, no padding: write the windows of x (N, C, H, W) into ``cols5``
    (N, C, kh, kw, OH*W) on the flattened plane, ``cols5[n, c, ki, kj, i*W + j] =
    x[n, c, i + ki, j + kj]``: one contiguous run of (OH-1)*W + OW values per (n, c, ki, kj).

    Columns with j >= OW wrap into the next input row; the last W - OW are left as they are
    (zero in a buffer allocated with zeros). Their products are never used (see
    ``conv2d_backward``)."""
    m, c, h, w = x.shape
    kh, kw = cols5.shape[2:4]
    run = (h - kh) * w + w - kw + 1                               # (OH-1)*W + OW
    planes = x.reshape(m, c, h * w)
    for ki in range(kh):
        for kj in range(kw):
            start = ki * w + kj
            cols5[:, :, ki, kj, :run] = planes[:, :, start:start + run]


def add_flat_columns(cols5, gx):
    """Adjoint of ``fill_flat_columns`` for columns that are zero where j >= OW: add the
    windows of ``cols5`` (N, C, kh, kw, OH*W) into the contiguous gx (N, C, H, W), overlaps
    summed in the order (ki, kj) (the order of ``add_columns``, so the sums are the same)."""
    m, c, h, w = gx.shape
    kh, kw = cols5.shape[2:4]
    run = (h - kh) * w + w - kw + 1
    planes = gx.reshape(m, c, h * w)
    for ki in range(kh):
        for kj in range(kw):
            start = ki * w + kj
            planes[:, :, start:start + run] += cols5[:, :, ki, kj, :run]


def im2col(x, kh, kw, stride, pad, xp, out=None):
    """x: (N, C, H, W) -> cols (C*kh*kw, N*OH*OW), rows (c, ki, kj) like
    ``weight.reshape(O, -1)``, columns (n, i, j); out: optional (C, kh, kw, N, OH, OW) array
    to write into."""
    n, c, h, w = x.shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    cols = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype) if out is None else out
    fill_columns(x, cols, stride, pad)
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im(gcols, x_shape, kh, kw, stride, pad, xp):
    """Adjoint of ``im2col``: gcols (C*kh*kw, N*OH*OW) -> gx (N, C, H, W)."""
    n, c, h, w = x_shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    gx = xp.zeros(x_shape, dtype=gcols.dtype)
    add_columns(gcols.reshape(c, kh, kw, n, oh, ow), gx, stride, pad)
    return gx


def _per_image(rows, positions):
    """The chunk layout: one GEMM per image (columns (m, C*kh*kw, OH*OW), the product lands
    in NCHW as is) when an image has ``PER_IMAGE_MIN_POSITIONS`` output positions or more, or
    the columns have at most ``PER_IMAGE_MAX_ROWS`` rows (GEMMs so small that copying their
    products into NCHW would cost more than they do); else one GEMM per chunk (columns
    (C*kh*kw, m*OH*OW), the product copied into NCHW)."""
    return positions >= PER_IMAGE_MIN_POSITIONS or rows <= PER_IMAGE_MAX_ROWS


def _flat_windows(stride, pad):
    """Whether a per-image layout uses the flattened plane (``fill_flat_columns``): with
    stride 1 and no padding a window is one contiguous run of the plane, so im2col and col2im
    copy and add runs of (OH-1)*W + OW values instead of OH runs of OW (LeNet-5 conv2: 141
    instead of 11), for GEMMs W/OW times as wide (13/11)."""
    return stride == 1 and pad == 0


def _layout(c, kh, kw, stride, pad, positions):
    """'flat', 'image' (one GEMM per image) or 'chunk' (one GEMM per chunk); see
    ``_per_image`` and ``_flat_windows``."""
    if not _per_image(c * kh * kw, positions):
        return "chunk"
    return "flat" if _flat_windows(stride, pad) else "image"


def _chunk_columns(x, kh, kw, stride, pad, xp, workspace):
    """im2col of one chunk of the batch into the workspace's buffer for its size, in the
    layout ``_layout`` picks: (m, C*kh*kw, OH*W) ('flat'), (m, C*kh*kw, P) ('image') or
    (C*kh*kw, m*P) ('chunk')."""
    m, c, h, w = x.shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    layout = _layout(c, kh, kw, stride, pad, oh * ow)
    if layout == "flat":
        buf = _buffer(workspace, ("cols", m), (m, c, kh, kw, oh * w), x.dtype, xp, zeros=True)
        fill_flat_columns(x, buf)
        return buf.reshape(m, c * kh * kw, oh * w)
    if layout == "image":
        buf = _buffer(workspace, ("cols", m), (m, c, kh, kw, oh, ow), x.dtype, xp, zeros=True)
        fill_columns(x, buf.transpose(1, 2, 3, 0, 4, 5), stride, pad, padding_zeroed=True)
        return buf.reshape(m, c * kh * kw, oh * ow)
    buf = _buffer(workspace, ("cols", m), (c, kh, kw, m, oh, ow), x.dtype, xp, zeros=True)
    fill_columns(x, buf, stride, pad, padding_zeroed=True)
    return buf.reshape(c * kh * kw, m * oh * ow)


def _column_view(cols, m, c, kh, kw, oh, ow):
    """The (C, kh, kw, m, OH, OW) view of a chunk's columns in either layout."""
    if cols.ndim == 3:
        return cols.reshape(m, c, kh, kw, oh, ow).transpose(1, 2, 3, 0, 4, 5)
    return cols.reshape(c, kh, kw, m, oh, ow)


def _slot_workspace(workspace, slot):
    """The buffers of chunk thread ``slot`` (see ``run_chunks``) in a layer's workspace."""
    return None if workspace is None else workspace.setdefault(("thread", slot), {})


def _chunks(x, weight_shape, stride, pad, xp):
    """The chunks of the batch (``batch_chunks``), a multiple of ``CHUNK_MULTIPLE`` of them
    (equal shares for 1, 2 or 4 threads: the backend's kernels share every layer's chunks out,
    and LeNet-5's conv1 forward in 3 chunks gained 1.5x from a second thread, in 4 chunks 2.0x:
    0.250 -> 0.127 ms), and whether the NumPy path runs them on several threads
    (``parallel_chunks``). Not a function of the number of threads, so neither are the
    results."""
    settings = (batch_chunks, CHUNK_BYTES, MIN_CHUNK_COLUMNS, CHUNK_MULTIPLE,
                chunk_threads.MIN_PARALLEL_FLOPS)
    return _chunk_plan(x.shape, tuple(weight_shape), stride, pad, x.dtype.itemsize, xp, settings)


@functools.lru_cache(maxsize=1024)
def _chunk_plan(x_shape, weight_shape, stride, pad, itemsize, xp, settings):
    """``_chunks`` by geometry, the chunks as a tuple: computed once, not in every forward and
    backward of every step (LeNet-5's batch-2 step, one thread: 18 us of 0.31 ms). ``settings``,
    the module values the plan depends on, are part of the key, so that a changed one (tests
    change them) is seen."""
    n, c, h, w = x_shape
    o, _, kh, kw = weight_shape
    positions = _out_size(h, kh, stride, pad) * _out_size(w, kw, stride, pad)
    rows = c * kh * kw
    parallel = parallel_chunks(2 * n * positions * o * rows)     # the forward GEMMs' flops
    parts = batch_chunks(n, rows * positions * itemsize, positions, xp, CHUNK_MULTIPLE)
    return tuple(parts), parallel


def _kernels(ops, dtype, gemm_dims):
    """Whether the backend's ``conv_ops()`` runs this convolution's chunks in its own kernels,
    without the GIL and with the same results bit for bit (numba: ``numba_flat_conv`` for the
    'flat' layout, ``numba_im2col_conv`` for the others; within float32 rounding where they run
    ``numba_gemm``, see ``numba_im2col_conv.own_gemm``), all chunks in one call that shares them
    out among Numba's threads. Not where a GEMM dimension (``gemm_dims``: O, C*kh*kw and
    the positions per image, OH*W when flat) is 1: there NumPy's matmul calls GEMV, whose sums
    differ from GEMM's in the last bit. In every layout: Numba's workers spin between parallel
    kernels (``arraybn.backends.numba_backend``), so chunks on the chunk threads would fight
    them for the cores (VGG-8 epoch, two threads, with the 'chunk' layout's forward on the
    chunk threads 15.8 s, in the kernels 11.8 s). Until the ninth session the 'chunk' layout's
    forward stayed on NumPy's slice copies on one thread, where the kernels' row-by-row im2col
    of 14x14 and 7x7 planes lost; with 'same' windows copied as shifted runs and cache-sized
    chunks the kernels win at 14x14 (VGG-8's 64-channel layer 15.8 -> 14.2 ms, one thread) and
    tie at 7x7."""
    available = getattr(ops, "conv_kernels_available", None)
    return available is not None and available(dtype) and min(gemm_dims) > 1


def _gemm_dims(o, c, kh, kw, oh, ow, w, layout):
    """(O, C*kh*kw, positions per image's GEMM) for ``_kernels``."""
    return o, c * kh * kw, oh * (w if layout == "flat" else ow)


def conv2d_forward(x, weight, bias, stride, pad, xp, workspace=None, ops=None):
    """x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> y: (N, O, OH, OW).

    Chunk by chunk of the batch (``batch_chunks``): the chunk's im2col columns, then weights
    times columns in the layout ``_layout`` picks ('flat': products on the flattened plane,
    copied into NCHW without the wrapped-around columns). The cache keeps x, not the columns:
    backward recomputes them chunk by chunk, which costs less than a round trip of the whole
    batch's columns through memory.
    workspace: optional dict of buffers reused from call to call (the layer's); ops: the
    backend's ``conv_ops()``, whose convolution kernels, where they apply (``_kernels``), run
    all the chunks in one call.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow, layout, kernels, prepared = _forward_plan(x, weight, bias is not None, stride, pad,
                                                      ops, workspace)
    w2 = weight.reshape(o, -1)
    y = xp.empty((n, o, oh, ow), dtype=x.dtype)
    if kernels:
        x = _run_kernels(x, weight, bias, stride, pad, xp, ops, layout, y, prepared=prepared)
        return y, (x, weight, stride, pad, bias is not None)

    def forward_chunk(part, slot):
        m, ws = part.stop - part.start, _slot_workspace(workspace, slot)
        cols = _chunk_columns(x[part], kh, kw, stride, pad, xp, ws)
        y_part = y[part].reshape(m, o, oh * ow)
        if layout == "image":
            xp.matmul(w2, cols, out=y_part)                  # one GEMM per image
            if bias is not None:
                y_part += bias[:, None]
        elif layout == "flat":
            y_flat = _buffer(ws, ("y", m), (m, o, oh, w), x.dtype, xp)
            xp.matmul(w2, cols, out=y_flat.reshape(m, o, oh * w))   # one GEMM per image
            _copy_out(y_flat[..., :ow], bias, y[part], xp)
        else:
            y_om = _buffer(ws, ("y", m), (o, m * oh * ow), x.dtype, xp)
            xp.matmul(w2, cols, out=y_om)                    # one GEMM per chunk
            _copy_out(y_om.reshape(o, m, oh * ow), bias, y_part.transpose(1, 0, 2), xp)

    run_chunks(forward_chunk, *_chunks(x, weight.shape, stride, pad, xp))
    return y, (x, weight, stride, pad, bias is not None)


def _forward_plan(x, weight, has_bias, stride, pad, ops, workspace):
    """(OH, OW, layout, kernels, prepared) of a forward of x: ``_geometry``'s and, where the
    backend's 'flat' kernels run it, its ``FlatConvForward`` prepared for x's chunks (else
    None). Kept in ``workspace`` (if given) per shape and dtype of x, so that a layer works
    them out at its first forward of each input shape, not in every step (the chunking and
    layout settings are read then)."""
    key = ("forward plan", x.shape, x.dtype, has_bias)
    plan = None if workspace is None else workspace.get(key)
    if plan is None:
        oh, ow, layout, kernels = _geometry(x, weight, stride, pad, ops)
        prepare = getattr(ops, "FlatConvForward", None)
        prepared = None
        if kernels and layout == "flat" and prepare is not None:
            chunks = _chunks(x, weight.shape, stride, pad, np)[0]
            prepared = prepare(x.shape, weight.shape, x.dtype, chunks, has_bias)
        plan = (oh, ow, layout, kernels, prepared)
        if workspace is not None:
            workspace[key] = plan
    return plan


def _geometry(x, weight, stride, pad, ops):
    """(OH, OW, ``_layout``, whether the backend's kernels run it (``_kernels``)) of a
    convolution of x with weight."""
    _, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    layout = _layout(c, kh, kw, stride, pad, oh * ow)
    return oh, ow, layout, _kernels(ops, x.dtype, _gemm_dims(o, c, kh, kw, oh, ow, w, layout))


def _run_kernels(x, weight, bias, stride, pad, xp, ops, layout, y, *epilogue, prepared=None):
    """The backend's kernels write y (and apply ``epilogue`` if given), ``prepared`` (a
    ``_forward_plan``'s) if given; returns x as they took it (C-contiguous)."""
    x = xp.ascontiguousarray(x)
    one_blas_thread()
    if prepared is not None:
        prepared(x, weight, bias, y)
    else:
        ops.conv_forward(x, weight, bias, _chunks(x, weight.shape, stride, pad, xp)[0], stride,
                         pad, layout, y, *epilogue)
    return x


def conv2d_inference(x, weight, bias, stride, pad, xp, ops, epilogue):
    """``conv2d_forward``'s y with ``epilogue`` (center, a, b, relu, skip) applied to each
    image's output inside the backend's kernels, right after its GEMM (numba:
    ``numba_conv_epilogue``), where they run this convolution in the 'image' or 'chunk' layout
    and the skip (if any) has y's shape and dtype; else None. No cache: nothing for a
    backward."""
    oh, ow, layout, kernels = _geometry(x, weight, stride, pad, ops)
    shape, skip = (x.shape[0], weight.shape[0], oh, ow), epilogue[-1]
    if not kernels or layout == "flat" or (
            skip is not None and (skip.shape != shape or skip.dtype != x.dtype)):
        return None
    y = xp.empty(shape, dtype=x.dtype)
    _run_kernels(x, weight, bias, stride, pad, xp, ops, layout, y, epilogue)
    return y


def _copy_out(product, bias, out, xp):
    """out[...] = product, plus bias (O,) along product's third axis from the end, if given:
    the O of (O, m, P) and of (m, O, OH, OW)."""
    if bias is None:
        out[...] = product
    else:
        xp.add(product, bias[:, None, None], out=out)


def conv2d_backward(gy, cache, xp, need_gx=True, workspace=None, ops=None):
    """gy: (N, O, OH, OW) -> (gx (N, C, H, W) or None, gweight (O, C, kh, kw), gbias or None).

    Chunk by chunk as in the forward; the weight gradient adds the chunks' in batch order. It
    is computed transposed, columns @ gy.T -> (C*kh*kw, O): OpenBLAS runs that orientation
    faster than gy @ columns.T wherever O is small next to C*kh*kw (one thread, GFLOP/s:
    ResNet-20's 16-channel layer 47 -> 74, VGG-8 conv2 69 -> 101, 64 channels at 14x14
    106 -> 131; LeNet-5's a tie). The
    input gradient of a 'same' convolution in a per-image layout is a forward convolution of gy
    (``_input_gradient``, see ``_transposed_input_gradient``); of any other, the column
    gradients W.T @ gy added back by col2im. In the 'flat' layout gy
    is copied onto the flattened plane with zeros in the wrapped-around columns, so those
    columns add nothing to the weight gradient and their column gradients are zero
    (``add_flat_columns`` adds them; the sums equal ``add_columns``'). With the kernels of
    ``ops`` (``_kernels``) each chunk's weight gradient comes from them (its per-image products
    summed in batch order, as NumPy's ``sum(axis=0)`` here), and the chunks' are added here in
    chunk order, as on the NumPy path.
    """
    x, weight, stride, pad, has_bias = cache
    n, o, oh, ow = gy.shape
    c, h, w = x.shape[1:]
    kh, kw = weight.shape[2:]
    layout = _layout(c, kh, kw, stride, pad, oh * ow)
    w2 = weight.reshape(o, -1)
    transposed = need_gx and _transposed_input_gradient(kh, kw, stride, pad, layout)
    columns_gx = need_gx and not transposed
    gx = xp.empty(x.shape, dtype=gy.dtype) if columns_gx else None
    kernels = _kernels(ops, gy.dtype, _gemm_dims(o, c, kh, kw, oh, ow, w, layout))
    gy = xp.ascontiguousarray(gy) if kernels else gy

    def backward_chunk(part, slot):
        """This chunk's weight (and bias) gradient; writes its rows of gx."""
        m, ws = part.stop - part.start, _slot_workspace(workspace, slot)
        gy3 = gy[part].reshape(m, o, oh * ow)
        gbias = _chunk_bias_gradient(gy, part) if has_bias else None
        cols = _chunk_columns(x[part], kh, kw, stride, pad, xp, ws)
        if layout == "flat":
            gy_flat = _buffer(ws, ("gy flat", m), (m, o, oh, w), gy.dtype, xp, zeros=True)
            gy_flat[..., :ow] = gy[part]                     # the rest stays zero
            gy2 = gy_flat.reshape(m, o, oh * w)
        else:
            gy2 = gy3
        if layout != "chunk":                                # one GEMM per image
            gweight = xp.matmul(cols, gy2.transpose(0, 2, 1)).sum(axis=0)
        else:                                                # one GEMM per chunk
            gy_om = _buffer(ws, ("gy", m), (o, m, oh * ow), gy.dtype, xp)
            gy_om[...] = gy3.transpose(1, 0, 2)
            gy2 = gy_om.reshape(o, m * oh * ow)
            gweight = xp.matmul(cols, gy2.T)                 # BLAS reads gy2.T in place
        if columns_gx:
            gcols = _buffer(ws, ("gcols", m), cols.shape, cols.dtype, xp)
            xp.matmul(w2.T, gy2, out=gcols)
            gx[part] = 0
            if layout == "flat":
                add_flat_columns(gcols.reshape(m, c, kh, kw, oh * w), gx[part])
            else:
                add_columns(_column_view(gcols, m, c, kh, kw, oh, ow), gx[part], stride, pad)
        return gweight, gbias

    parts, parallel = _chunks(x, weight.shape, stride, pad, xp)
    if kernels:
        one_blas_thread()
        gbiases = [_chunk_bias_gradient(gy, part) if has_bias else None for part in parts]
        partials = zip(ops.conv_backward(gy, x, weight, parts, stride, pad, layout, gx), gbiases)
    else:
        partials = run_chunks(backward_chunk, parts, parallel)
    chunk_gweights, chunk_gbiases = zip(*partials) if parts else ((), ())
    gbias = xp.zeros(o, dtype=gy.dtype) if has_bias else None
    for chunk_gbias in chunk_gbiases if has_bias else ():      # in batch order
        gbias += chunk_gbias
    if transposed:
        gx = _input_gradient(gy, weight, pad, xp, workspace, ops)
    return gx, summed_weight_gradient(chunk_gweights, weight.shape, gy.dtype, xp), gbias


def flat_kernel_chunks(cache, ops, need_gx):
    """The chunks of the batch (``_chunks``) when the convolution of ``cache`` (a forward's)
    ran on the backend's 'flat' kernels (stride 1, no padding, per image, ``_kernels``), has
    no bias and, if ``need_gx``, takes its input gradient by col2im (not a 1 x 1 kernel's
    ``_input_gradient``), else None: where ``ops.flat_conv_bn_backward`` can take the
    convolution's part of a ``ConvBNBlock``'s backward, with the same results."""
    x, weight, stride, pad, has_bias = cache
    o, c, kh, kw = weight.shape
    h, w = x.shape[2:]
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    layout = _layout(c, kh, kw, stride, pad, oh * ow)
    if (has_bias or layout != "flat"
            or (need_gx and _transposed_input_gradient(kh, kw, stride, pad, layout))
            or not _kernels(ops, x.dtype, _gemm_dims(o, c, kh, kw, oh, ow, w, layout))):
        return None
    return _chunks(x, weight.shape, stride, pad, np)[0]


def summed_weight_gradient(partials, weight_shape, dtype, xp, out=None):
    """The weight gradient from the chunks' transposed partials (C*kh*kw, O), added in chunk
    order from zero as ``conv2d_backward`` adds them; written into ``out`` (C-contiguous, of
    the weight's shape and ``dtype``: a ``grad_out``) if given."""
    gweight = xp.zeros((math.prod(weight_shape[1:]), weight_shape[0]), dtype=dtype)
    for partial in partials:                                    # in batch order
        gweight += partial
    if out is None:
        return xp.ascontiguousarray(gweight.T).reshape(weight_shape)
    out.reshape(weight_shape[0], -1)[...] = gweight.T
    return out


def _chunk_bias_gradient(gy, part):
    """The bias gradient of the chunk ``part``: gy[part] summed over images and positions."""
    n, o, oh, ow = gy[part].shape
    return gy[part].reshape(n, o, oh * ow).sum(axis=(0, 2))


def _same_padding(kh, kw, stride, pad):
    """Whether the input gradient can be the forward convolution of gy that ``_input_gradient``
    computes: stride 1, a square kernel and 'same' padding (2 * pad == k - 1), so that it has
    the forward's geometry with the channels swapped."""
    return stride == 1 and kh == kw and 2 * pad == kh - 1


def _transposed_input_gradient(kh, kw, stride, pad, layout):
    """Whether the input gradient is ``_input_gradient``'s forward convolution of gy, not the
    column gradients' col2im: for a 'same' convolution (``_same_padding``) in a per-image
    layout, whose GEMMs are narrow in O (the column gradients' GEMM, of depth O, runs slowly
    there). In the 'chunk' layout O is large enough, and the column gradients' GEMM reuses
    the weight gradient's transposed gy where the forward convolution makes another im2col
    and copy of gy. Backward, one thread, forward convolution -> col2im: VGG-8's 14x14 and 7x7
    convolutions ('chunk') 19.8 -> 15.9, 33.8 -> 31.3, 17.9 -> 14.2 and 32.2 -> 28.8 ms;
    its 32-channel 28x28 one ('image') 38.2 -> 38.9 ms, ResNet-20's 16-channel one 17.2 ->
    17.4 (batch 100 and 128)."""
    return _same_padding(kh, kw, stride, pad) and layout != "chunk"


def _input_gradient(gy, weight, pad, xp, workspace, ops):
    """gx = gy convolved with the weights flipped in space and transposed in channels, for a
    'same' convolution (``_same_padding``): gx[n, c, i, j] = sum over (o, ki, kj) of
    gy[n, o, i + pad - ki, j + pad - kj] * weight[o, c, ki, kj]. One GEMM of depth O*kh*kw
    per chunk instead of depth O plus a col2im of kh*kw strided adds: ResNet-20's 16-channel
    convolution 13.1 -> 7.0 ms, VGG-8 conv2 30.9 -> 19.4 ms (1 thread). Not used without
    'same' padding: LeNet-5's conv2 (3x3, no padding) would pad gy by 2, 1.07 -> 2.09 ms."""
    flipped = xp.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    ws = None if workspace is None else workspace.setdefault("input gradient", {})
    return conv2d_forward(gy, flipped, None, 1, pad, xp, ws, ops)[0]


class Conv2d(Layer):
    """PyTorch ``nn.Conv2d`` layout and init: weight (out, in, kh, kw), bias (out,)."""

    def __init__(self, name, in_channels, out_channels, kernel_size, *, stride=1, padding=0,
                 bias, rng, backend, dtype):
        if stride < 1 or padding < 0 or kernel_size < 1:
            raise ValueError(f"{name}: need kernel_size >= 1, stride >= 1 and padding >= 0; got "
                             f"{kernel_size}, {stride}, {padding}")
        self.name, self.stride, self.padding = name, int(stride), int(padding)
        self.backend, self.xp = backend, backend.xp
        fan_in = in_channels * kernel_size * kernel_size
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = Parameter(f"{name}.weight", self.xp.asarray(
            kaiming_uniform(rng, shape, fan_in, dtype)))
        self.bias = None
        if bias:
            self.bias = Parameter(f"{name}.bias", self.xp.asarray(
                kaiming_uniform(rng, (out_channels,), fan_in, dtype)))
        self._workspace = {}     # im2col buffers, reused while shapes stay the same
        self._ops = backend.conv_ops()

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def forward(self, x, training):
        bias = None if self.bias is None else self.bias.data
        y, self._cache = conv2d_forward(x, self.weight.data, bias, self.stride, self.padding,
                                        self.xp, self._workspace, self._ops)
        return y

    def forward_inference(self, x, epilogue):
        """The inference output with ``epilogue`` applied in the backend's kernels
        (``conv2d_inference``), or None where they do not apply; keeps no cache."""
        bias = None if self.bias is None else self.bias.data
        return conv2d_inference(x, self.weight.data, bias, self.stride, self.padding, self.xp,
                                self._ops, epilogue)

    def backward(self, gy):
        gx, self.weight.grad, gbias = conv2d_backward(gy, self._take_cache(), self.xp,
                                                      self.need_input_grad, self._workspace,
                                                      self._ops)
        if self.bias is not None:
            self.bias.grad = gbias
        return gx


# --- max pooling --------------------------------------------------------------------------------

def _window_offsets(k, oh, ow):
    """(offset number, row slice, column slice) picking each window's (di, dj) element."""
    for o in range(k * k):
        di, dj = divmod(o, k)
        yield o, slice(di, di + k * (oh - 1) + 1, k), slice(dj, dj + k * (ow - 1) + 1, k)


def maxpool2d_forward(x, k, xp):
    """Non-overlapping k x k max pooling (stride k, floor mode like PyTorch).

    x: (N, C, H, W) -> y: (N, C, H//k, W//k). Works on k*k strided views of x, no window copy;
    the cache holds each window's argmax offset (the first maximum in row-major order, as in
    PyTorch) as uint8 (N, C, H//k, W//k).
    """
    n, c, h, w = x.shape
    oh, ow = h // k, w // k
    if oh < 1 or ow < 1:
        raise ValueError(f"max pooling {k}x{k} needs inputs of at least {k}x{k}; got {h}x{w}")
    y = argmax = None
    for o, rows, cols in _window_offsets(k, oh, ow):
        view = x[:, :, rows, cols]
        if y is None:
            y, argmax = view.copy(), xp.zeros(view.shape, dtype=np.uint8)
            continue
        better = view > y                                  # strict: the first maximum wins
        argmax += better * (np.uint8(o) - argmax)          # arithmetic: masked writes are slower
        xp.maximum(y, view, out=y)
    return y, (argmax, x.shape, k)


def maxpool2d_backward(gy, cache, xp):
    """gy: (N, C, OH, OW) -> gx (N, C, H, W): each gradient goes to its window's maximum."""
    argmax, x_shape, k = cache
    gx = xp.zeros(x_shape, dtype=gy.dtype)
    for o, rows, cols in _window_offsets(k, *gy.shape[2:]):
        gx[:, :, rows, cols] = gy * (argmax == o)
    return gx


class MaxPool2d(Layer):
    """k x k max pooling with stride k (``nn.MaxPool2d(k)``); no parameters."""

    def __init__(self, kernel_size, backend):
        self.k, self.xp = int(kernel_size), backend.xp
        self._fused = backend.conv_ops()

    def forward(self, x, training):
        if self._fused is not None:
            y, argmax = self._fused.maxpool2d_forward(x, self.k)
            self._cache = (argmax, x.shape)
            return y
        y, self._cache = maxpool2d_forward(x, self.k, self.xp)
        return y

    def backward(self, gy):
        cache = self._take_cache()
        if self._fused is not None:
            argmax, x_shape = cache
            return self._fused.maxpool2d_backward(gy, argmax, x_shape, self.k)
        return maxpool2d_backward(gy, cache, self.xp)
