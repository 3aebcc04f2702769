"""'Flat' convolutions (stride 1, no padding: LeNet-5's) image by image, without the GIL.

``arraybn.nn.conv`` runs such a convolution per image on the flattened plane: a window is one
contiguous run of it, im2col copies runs, and each image is one GEMM. On NumPy every chunk of the
batch costs Python calls that hold the GIL, so a second thread did not pay (LeNet-5's
convolutions on two chunk threads took 1.09-1.15x as long). These kernels do the same per image
without the GIL: im2col, the GEMMs and the copies in and out, all chunks in one Numba call that
shares them out among Numba's threads (``prange`` over the chunks; the same OpenMP workers as
the BN kernels', which stay awake between layers, see ``numba_backend._start_threads``; a
thread pool of Python threads next to them fought them for the cores).

The GEMMs are the calls ``np.matmul`` makes: ``cblas_sgemm``/``cblas_dgemm`` of the OpenBLAS
that NumPy itself loaded (found in NumPy's ``numpy.libs`` folder; its address is an argument of
the kernels, so they stay cacheable, and ``cblas_gemm`` calls it). Same library, same arguments:
the results equal the NumPy path bit for bit, on any number of threads (each image's work is its
own; each chunk's per-image weight-gradient products are added up in batch order, as NumPy's
``sum(axis=0)`` adds them on the NumPy path, and the caller adds the chunks' in chunk order).
The copy loops index with unsigned integers (``uidx``): LeNet-5's conv1 forward + backward
1.62 -> 0.71 ms, conv2 2.26 -> 1.36 ms (batch 128, one thread). Where NumPy's BLAS is another
one (not found there), ``available`` is False and the NumPy path runs.
"""
import ctypes
import functools
import glob
import os

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from arraybn.backends.numba_config import jit, uidx

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112          # CBLAS enums


def _numpy_openblas():
    """The OpenBLAS in NumPy's wheel (64-bit integers) as a ctypes library, or None."""
    folder = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(folder, "libscipy_openblas64_*.so"))):
        return ctypes.CDLL(path)                       # already loaded by NumPy: the same one
    return None


def _numpy_gemms(lib):
    """{dtype: ctypes cblas_?gemm} of ``lib`` (NumPy's OpenBLAS), or {}."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    gemms = {}
    if lib is not None:
        for dtype, scalar, name in ((np.float32, ctypes.c_float, "scipy_cblas_sgemm64_"),
                                    (np.float64, ctypes.c_double, "scipy_cblas_dgemm64_")):
            proto = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64,
                                     i64, scalar, ptr, i64, ptr, i64, scalar, ptr, i64)
            if hasattr(lib, name):
                gemms[np.dtype(dtype)] = proto((name, lib))
    return gemms


_OPENBLAS = _numpy_openblas()
GEMMS = _numpy_gemms(_OPENBLAS)
_BLAS_THREADS = getattr(_OPENBLAS, "scipy_openblas_get_num_threads64_", None)


def blas_threads():
    """How many threads NumPy's OpenBLAS runs a GEMM on now (None where unknown)."""
    return None if _BLAS_THREADS is None else _BLAS_THREADS()


def available(dtype):
    """Whether the kernels can run for arrays of ``dtype``."""
    return np.dtype(dtype) in GEMMS


@functools.lru_cache(maxsize=None)
def gemm_args(dtype):
    """(the cblas GEMM's address, 1, 0) in ``dtype``: the kernels' ``gemm`` argument (for
    ``cblas_gemm``) and its alpha and beta."""
    dtype = np.dtype(dtype)
    return ctypes.cast(GEMMS[dtype], ctypes.c_void_p).value, dtype.type(1), dtype.type(0)


@intrinsic
def cblas_gemm(typingctx, gemm, order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
               ldc):
    """Call the ``cblas_?gemm`` at address ``gemm`` (``gemm_args``) with the CBLAS arguments
    that follow: enums as C ints, sizes as 64-bit integers, a, b and c as addresses
    (``array.ctypes.data``), alpha and beta in the GEMM's float type. Passed as a ctypes
    function instead, the GEMM cost 1.2 us of argument unboxing per kernel call (an integer:
    0.2) and more on the way in (``ctypes.cast`` and Numba's pointer lookup each call): LeNet-5's
    batch-2 step took 0.269 ms with the function, 0.257 with its address (one thread, 4
    interleaved runs)."""
    if alpha not in (types.float32, types.float64) or beta != alpha:
        return None
    i32, i64, address = types.int32, types.int64, types.uintp
    signature = types.void(address, i32, i32, i32, i64, i64, i64, alpha, address, i64, address,
                           i64, alpha, address, i64)

    def codegen(context, builder, sig, args):
        kinds = [context.get_value_type(t) for t in sig.args[1:]]
        pointer = ir.IntType(8).as_pointer()
        kinds = [pointer if t is address else kind for t, kind in zip(sig.args[1:], kinds)]
        values = [builder.inttoptr(value, kind) if kind is pointer else value
                  for value, kind in zip(args[1:], kinds)]
        function = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), kinds).as_pointer())
        builder.call(function, values)
        return context.get_dummy_value()
    return signature, codegen


@jit()
def _fill(image, kh, kw, run, cols):
    """The flat columns of one (C, H, W) image: ``cols[(c*kh + ki)*kw + kj, :run]`` is the run
    of the flattened plane c from ki*W + kj (``arraybn.nn.conv.fill_flat_columns``)."""
    c, h, w = image.shape
    planes = image.reshape(c, h * w)
    for ch in range(c):
        for ki in range(kh):
            for kj in range(kw):
                row, start = uidx((ch * kh + ki) * kw + kj), ki * w + kj
                for q in range(run):
                    cols[row, uidx(q)] = planes[uidx(ch), uidx(start + q)]


@jit()
def _columns(rows, width, run, dtype):
    """A buffer for ``_fill``'s columns: (rows, width), its last width - run columns (which
    ``_fill`` never writes) zero. Zeroing only those, not the whole buffer, saved the
    memset of 84-90 KB a chunk (LeNet-5's conv1 and conv2, per call and chunk)."""
    cols = np.empty((rows, width), dtype)
    cols[:, run:] = 0
    return cols


@jit()
def _forward(x, w2, bias, has_bias, kh, kw, gemm, one, zero, lo, hi, y):
    """y[lo:hi] (images lo..hi-1) of ``flat_conv_forward``."""
    h, w = x.shape[2:]
    o, rows = w2.shape
    oh, ow = y.shape[2], y.shape[3]
    width, run = oh * w, (h - kh) * w + w - kw + 1
    cols = _columns(rows, width, run, x.dtype)
    out = np.empty((o, width), x.dtype)
    for i in range(lo, hi):
        _fill(x[i], kh, kw, run, cols)
        cblas_gemm(gemm, ROW_MAJOR, NO_TRANS, NO_TRANS, o, width, rows, one, w2.ctypes.data,
                   rows, cols.ctypes.data, width, zero, out.ctypes.data, width)
        for p in range(o):
            for r in range(oh):
                for q in range(ow):
                    value = out[uidx(p), uidx(r * w + q)]
                    y[uidx(i), uidx(p), uidx(r), uidx(q)] = value + bias[p] if has_bias else value


@jit()
def _backward(gy, x, w2, kh, kw, need_gx, gemm, one, zero, lo, hi, partial, gx):
    """Images lo..hi-1 of ``flat_conv_backward``: ``partial`` = the sum of their transposed
    weight gradients, image by image in batch order (as NumPy's ``sum(axis=0)`` of the per-image
    products), and gx[i] if need_gx."""
    o, oh, ow, w = gy.shape[1], gy.shape[2], gy.shape[3], x.shape[3]
    cols, gy_flat, product, gcols = backward_buffers(x, w2, kh, kw, oh, ow, need_gx)
    if hi <= lo:
        partial[:, :] = 0                              # an empty chunk (an empty batch)
    for i in range(lo, hi):
        for p in range(o):
            for r in range(oh):
                for q in range(ow):
                    gy_flat[uidx(p), uidx(r * w + q)] = gy[uidx(i), uidx(p), uidx(r), uidx(q)]
        image_backward(x, i, lo, w2, kh, kw, need_gx, gemm, one, zero, cols, gy_flat, product,
                       gcols, partial, gx)


@jit()
def backward_buffers(x, w2, kh, kw, oh, ow, need_gx):
    """(columns, gy on the flattened plane with its wrapped-around columns zero, product,
    column gradients) for ``image_backward``."""
    h, w = x.shape[2], x.shape[3]
    o, rows = w2.shape
    width, run = oh * w, (h - kh) * w + w - kw + 1
    gy_flat = np.empty((o, width), x.dtype)
    for r in range(oh):
        gy_flat[:, r * w + ow:(r + 1) * w] = 0
    return (_columns(rows, width, run, x.dtype), gy_flat, np.empty((rows, o), x.dtype),
            np.empty((rows, width) if need_gx else (0, 0), x.dtype))


@jit()
def image_backward(x, i, lo, w2, kh, kw, need_gx, gemm, one, zero, cols, gy_flat, product,
                   gcols, partial, gx):
    """Image i's backward from its output gradient on the flattened plane (``gy_flat``): its
    columns, its transposed weight gradient into ``partial`` (the chunk's first image ``lo``)
    or added to it, and gx[i] if need_gx."""
    h, w = x.shape[2], x.shape[3]
    o, rows = w2.shape
    width, run = gy_flat.shape[1], (h - kh) * w + w - kw + 1
    _fill(x[i], kh, kw, run, cols)
    cblas_gemm(gemm, ROW_MAJOR, NO_TRANS, TRANS, rows, o, width, one, cols.ctypes.data, width,
               gy_flat.ctypes.data, width, zero, (partial if i == lo else product).ctypes.data,
               o)
    if i > lo:
        add_to(partial, product)
    if need_gx:
        input_gradient(w2, gy_flat, kh, kw, gemm, one, zero, gcols, gx[i])


@jit()
def input_gradient(w2, gy_flat, kh, kw, gemm, one, zero, gcols, gx_image):
    """gx_image (C, H, W) of one image: the column gradients W.T @ gy_flat (into ``gcols``)
    added back onto the planes (col2im, windows in (ki, kj) order)."""
    c, h, w = gx_image.shape
    o, rows = w2.shape
    width, run = gy_flat.shape[1], (h - kh) * w + w - kw + 1
    cblas_gemm(gemm, ROW_MAJOR, TRANS, NO_TRANS, rows, width, o, one, w2.ctypes.data, rows,
               gy_flat.ctypes.data, width, zero, gcols.ctypes.data, width)
    planes = gx_image.reshape(c, h * w)
    for ch in range(c):
        for q in range(h * w):
            planes[ch, q] = 0
        for ki in range(kh):
            for kj in range(kw):
                row, start = uidx((ch * kh + ki) * kw + kj), ki * w + kj
                for q in range(run):
                    planes[uidx(ch), uidx(start + q)] += gcols[row, uidx(q)]


@jit()
def add_to(total, term):
    """total += term, element by element (2-D arrays of one shape)."""
    flat_total, flat_term = total.reshape(total.size), term.reshape(term.size)
    for q in range(flat_total.size):
        flat_total[uidx(q)] += flat_term[uidx(q)]


@jit(parallel=True)
def _forward_tasks(x, w2, bias, has_bias, kh, kw, gemm, one, zero, bounds, y):
    """``_forward`` of every chunk [bounds[t], bounds[t + 1]), the chunks shared out among
    Numba's threads."""
    for t in prange(bounds.size - 1):
        _forward(x, w2, bias, has_bias, kh, kw, gemm, one, zero, bounds[t], bounds[t + 1], y)


@jit(parallel=True)
def _backward_tasks(gy, x, w2, kh, kw, need_gx, gemm, one, zero, bounds, partials, gx):
    """``_backward`` of every chunk into partials[t], the chunks shared out among Numba's
    threads."""
    for t in prange(bounds.size - 1):
        _backward(gy, x, w2, kh, kw, need_gx, gemm, one, zero, bounds[t], bounds[t + 1],
                  partials[t], gx)


def check_arrays(*arrays):
    """TypeError unless the arrays are C-contiguous, of one float dtype the GEMMs take."""
    dtype = arrays[0].dtype
    mixed = False
    for a in arrays:              # a loop, not any(): this runs on every kernel call
        mixed = mixed or a.dtype != dtype or not a.flags.c_contiguous
    if mixed or dtype not in GEMMS:
        raise TypeError("convolution kernels: x, weight, y/gy and gx must be C-contiguous and all "
                        "float32 or all float64 (with NumPy's OpenBLAS found); got "
                        + ", ".join(f"{a.dtype}" for a in arrays))


def check_prepared(kernel, names, shapes, prepared, dtype, arrays):
    """ValueError unless the call's arrays ``names`` have the ``prepared`` shapes (None for an
    array left out); TypeError unless ``arrays`` (x first) are C-contiguous, of the prepared
    ``dtype`` (``check_arrays``). For the kernels prepared for one geometry."""
    if shapes != prepared:
        raise ValueError(f"{kernel}: {names} have shapes {shapes}; prepared for {prepared}")
    if arrays[0].dtype != dtype:
        raise TypeError(f"{kernel}: x is {arrays[0].dtype}, prepared for {dtype}")
    check_arrays(*arrays)


def chunk_bounds(chunks):
    """The chunks (slices of the batch, in order, end to end) as the kernels' bounds array:
    chunk t is [bounds[t], bounds[t + 1]); none (an empty batch) is [0]."""
    return np.array([chunks[0].start if chunks else 0] + [part.stop for part in chunks],
                    dtype=np.int64)


def flat_conv_forward(x, weight, bias, chunks, y):
    """y = the convolution of x (N, C, H, W) with weight (O, C, kh, kw), plus bias (O,) if not
    None; stride 1, no padding, y (N, O, H-kh+1, W-kw+1); for the images of ``chunks`` (slices
    of the batch), shared out among Numba's threads. Releases the GIL."""
    check_arrays(x, weight, y)
    FlatConvForward(x.shape, weight.shape, x.dtype, chunks, bias is not None)(x, weight, bias, y)


class FlatConvForward:
    """``flat_conv_forward`` prepared for one geometry: x (N, C, H, W), weight (O, C, kh, kw),
    dtype, chunks and whether there is a bias. Its checks, the chunks' bounds and the GEMM
    arguments are worked out once; a call checks that its arrays have the prepared shapes,
    dtype and layout and runs the kernel. ``arraybn.nn.conv`` keeps one per layer and input
    shape with the forward's geometry: LeNet-5's batch-2 step, one thread, 0.285 -> 0.270 ms
    (the convolutions' forward had 6-10 us of Python each besides their kernels' 8-11)."""

    def __init__(self, x_shape, weight_shape, dtype, chunks, has_bias):
        (n, c, h, w), (o, c_w, kh, kw) = x_shape, weight_shape
        if c_w != c or not (1 <= kh <= h and 1 <= kw <= w):
            raise ValueError(f"flat convolution: weight {weight_shape} does not fit x {x_shape}: "
                             "it needs x's channels and a kernel no larger than x's plane")
        self.dtype = np.dtype(dtype)
        if not available(self.dtype):
            raise TypeError(f"flat convolution: {self.dtype} is not a dtype the GEMMs take")
        self.shapes = (tuple(x_shape), tuple(weight_shape), (n, o, h - kh + 1, w - kw + 1),
                       (o,) if has_bias else None)
        self.bounds, self.gemm = chunk_bounds(chunks), gemm_args(self.dtype)
        self.no_bias = np.zeros(o, self.dtype)

    def __call__(self, x, weight, bias, y):
        """As ``flat_conv_forward``, for arrays of the prepared geometry."""
        check_prepared("flat convolution", "x, weight, y and bias",
                       (x.shape, weight.shape, y.shape, None if bias is None else bias.shape),
                       self.shapes, self.dtype, (x, weight, y) + (() if bias is None else (bias,)))
        o, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
        _forward_tasks(x, weight.reshape(o, -1), self.no_bias if bias is None else bias,
                       bias is not None, kh, kw, *self.gemm, self.bounds, y)


def flat_conv_backward(gy, x, weight, chunks, gx):
    """Per chunk of ``chunks``, the sum of its images' weight gradients, transposed as in
    ``arraybn.nn.conv``: (chunks, C*kh*kw, O) (the caller adds them in chunk order, as the NumPy
    path does); and gx written for the chunks' images unless gx is None. The chunks are shared
    out among Numba's threads. Releases the GIL."""
    check_arrays(x, weight, gy, *(() if gx is None else (gx,)))
    o, c, kh, kw = weight.shape
    partials = np.empty((len(chunks), c * kh * kw, o), x.dtype)
    _backward_tasks(gy, x, weight.reshape(o, -1), kh, kw, gx is not None, *gemm_args(x.dtype),
                    chunk_bounds(chunks), partials,
                    np.empty((0,) + x.shape[1:], x.dtype) if gx is None else gx)
    return partials
