"""The backward of an unpadded stride-1 convolution and the fused BN block after it, in one call.

Used by ``arraybn.nn.conv_bn_block.ConvBNBlock`` (LeNet-5's conv1 + bn1 and conv2 + bn2, each with
ReLU and pooling) through ``conv_ops()`` on the numba backend. Unfused, the BN block's backward
(``bn_pool_backward``) writes its input gradient, (N, O, OH, OW), and the convolution's
(``flat_conv_backward``) reads it back, copying each image's planes onto the flattened plane for
its GEMMs. Here the BN's per-channel sums come first (each thread's channels,
``sums_and_coefficients``), then each image's BN gradient is written straight onto that
flattened plane (``_gx_plane``: the values of ``bn_pool_backward``'s ``_unpool_gx``, the same
float64 formula rounded once) and goes into the same GEMMs (``numba_flat_conv.image_backward``:
the weight gradient and, where the convolution needs one, its input gradient), so the BN
gradient never exists as an array and the results equal the two unfused calls bit for bit: the
BN sums, the weight gradient's per-chunk partials (images added in batch order) and gx.
LeNet-5's first block, batch 128, bn1 + conv1 backward against the unfused calls: 0.90 -> 0.80
ms on one thread, 0.55 -> 0.43 ms on two (isolated; 2.1 MB less written and read).

No convolution bias: a BN right after the convolution makes it redundant, so the model builds
none.
"""
import math

import numba
import numpy as np
from numba import prange

from arraybn.backends.numba_config import jit, uidx
from arraybn.backends.numba_flat_conv import (available, backward_buffers, check_arrays,
                                              check_prepared, chunk_bounds, gemm_args,
                                              image_backward)
from arraybn.backends.numba_fused_kernels import (INACTIVE, _planes, channel_values,
                                                  check_argmax, offset_tables,
                                                  sums_and_coefficients)


@jit()
def _gx_plane(gy2, y2, am2, p, mu, a_gy, a_x, b, k, di, dj, oh, ow, w, plane, out):
    """BN gx of plane p (OH x OW) into ``plane`` (OH * OW scratch), as ``_unpool_gx`` writes it:
    ``(y - mean) * a_x + b`` everywhere (one vectorised pass), then at each window's argmax
    ``a_gy * g + ((y - mean) * a_x + b)``, each rounded once; then copied in rows at stride W
    onto the flattened plane ``out`` (its wrapped-around columns untouched)."""
    if am2.size == 0:                       # untracked (``check_argmax``): all active
        for q in range(oh * ow):
            plane[uidx(q)] = a_gy * np.float64(gy2[p, uidx(q)]) + (
                (np.float64(y2[p, uidx(q)]) - mu) * a_x + b)
    else:
        for q in range(oh * ow):
            plane[uidx(q)] = (np.float64(y2[p, uidx(q)]) - mu) * a_x + b
    pw = ow // k if am2.size else 0
    for i in range(oh // k):
        for j in range(pw):
            at = np.int64(am2[p, uidx(i * pw + j)])
            if at != INACTIVE:
                u = uidx((i * k + di[at]) * ow + j * k + dj[at])
                plane[u] = a_gy * np.float64(gy2[p, uidx(i * pw + j)]) + (
                    (np.float64(y2[p, u]) - mu) * a_x + b)
    for r in range(oh):
        for q in range(ow):
            out[uidx(r * w + q)] = plane[uidx(r * ow + q)]


@jit()
def _chunk(gy, y, argmax, mean, scale, a_x, b, k, x, w2, kh, kw, need_gx, gemm, one, zero, lo,
           hi, partial, gx):
    """Images lo..hi-1: each one's BN gx onto the flattened plane, then its part of
    ``numba_flat_conv``'s backward from there (``image_backward``: the weight gradients' sum in
    batch order into ``partial``, and the convolution's gx[i] if need_gx)."""
    o, oh, ow, w = y.shape[1], y.shape[2], y.shape[3], x.shape[3]
    cols, gx_flat, product, gcols = backward_buffers(x, w2, kh, kw, oh, ow, need_gx)
    plane = np.empty(oh * ow, x.dtype)
    di, dj = offset_tables(k)
    gy2, y2, am2 = _planes(gy), _planes(y), _planes(argmax)
    if hi <= lo:
        partial[:, :] = 0                              # an empty chunk (an empty batch)
    for i in range(lo, hi):
        for ch in range(o):
            _gx_plane(gy2, y2, am2, uidx(i * o + ch), mean[ch], scale[ch], a_x[ch], b[ch], k,
                      di, dj, oh, ow, w, plane, gx_flat[ch])
        image_backward(x, i, lo, w2, kh, kw, need_gx, gemm, one, zero, cols, gx_flat, product,
                       gcols, partial, gx)


@jit(parallel=True)
def _backward(gy, y, argmax, mean, scale, w, centered, k, x, w2, kh, kw, need_gx, gemm, one,
              zero, tasks, bounds, sum_gy, sum_gy_xc, a_x, b, partials, gx):
    """The BN sums and gx coefficients of each of ``tasks`` channel ranges (as
    ``numba_fused_kernels._backward``), then the chunks [bounds[t], bounds[t + 1]) shared out
    among Numba's threads."""
    n_ch = y.shape[1]
    for t in prange(tasks):
        sums_and_coefficients(gy, y, argmax, mean, scale, w, centered, k, t * n_ch // tasks,
                              (t + 1) * n_ch // tasks, sum_gy, sum_gy_xc, a_x, b)
    for t in prange(bounds.size - 1):
        _chunk(gy, y, argmax, mean, scale, a_x, b, k, x, w2, kh, kw, need_gx, gemm, one, zero,
               bounds[t], bounds[t + 1], partials[t], gx)


def flat_conv_bn_backward(gy, y, argmax, mean, scale, w, centered, k, x, weight, chunks, gx):
    """``bn_pool_backward`` (without a ReLU before the BN) and then ``flat_conv_backward``, in
    one call that never writes the BN's gx.

    gy: (N, O, OH//k, OW//k) gradient of the block's pooled output; y: the convolution's output
    (the BN's input), (N, O, OH, OW); argmax, mean, scale, w, centered, k: the fused block's
    forward cache (see ``bn_pool_backward``); x (N, C, H, W) and weight (O, C, kh, kw): the
    convolution's input and weight (stride 1, no padding); chunks: slices of the batch, as for
    ``flat_conv_backward``; gx: x's shape, for the convolution's input gradient, or None.
    Returns ``(partials, sum_gy, sum_gy_xc)``: the chunks' transposed weight gradients
    (chunks, C*kh*kw, O) and the BN sums (float64); all equal to the unfused calls' bit for bit.
    """
    check_arrays(x, weight, y, *(() if gx is None else (gx,)))
    prepared = FlatConvBNBackward(x.shape, weight.shape, y.shape, x.dtype, k, chunks,
                                  gx is not None)
    return prepared(gy, y, argmax, mean, scale, w, centered, x, weight, gx)


class FlatConvBNBackward:
    """``flat_conv_bn_backward`` prepared for one geometry: x (N, C, H, W), weight
    (O, C, kh, kw), y (N, O, OH, OW), dtype, k, chunks and whether gx is wanted. What depends
    only on those (their checks, the chunks' bounds, the GEMM arguments, the shapes of the
    outputs) is done once; a call checks that its arrays have the prepared shapes, dtype and
    layout and runs the kernel. ``ConvBNBlock`` keeps one per input shape: in LeNet-5's batch-2
    step (one thread) each block's backward spent 24-37 us in Python besides its kernel's
    19-32, and the step took 0.301 ms, 0.285 with the kernels kept."""

    def __init__(self, x_shape, weight_shape, y_shape, dtype, k, chunks, need_gx):
        n, o, oh, ow = y_shape
        if (weight_shape[0] != o or x_shape[0] != n or oh != x_shape[2] - weight_shape[2] + 1
                or ow != x_shape[3] - weight_shape[3] + 1 or weight_shape[1] != x_shape[1]):
            raise ValueError(f"conv + BN backward: y {y_shape} must be the stride-1, unpadded "
                             f"convolution output of x {x_shape} with weight {weight_shape}")
        self.dtype, self.k, self.need_gx = np.dtype(dtype), int(k), bool(need_gx)
        if not available(self.dtype):
            raise TypeError(f"conv + BN backward: {self.dtype} is not a dtype the GEMMs take")
        self.shapes = (tuple(x_shape), tuple(weight_shape), tuple(y_shape),
                       tuple(x_shape) if need_gx else None)        # gx: x's shape, if wanted
        self.bounds = chunk_bounds(chunks)
        self.partials_shape = (len(chunks), math.prod(weight_shape[1:]), o)
        self.gemm = gemm_args(self.dtype)
        self.no_gx = np.empty((0,) + tuple(x_shape[1:]), self.dtype)

    def __call__(self, gy, y, argmax, mean, scale, w, centered, x, weight, gx):
        """As ``flat_conv_bn_backward``, for arrays of the prepared geometry."""
        check_prepared("conv + BN backward", "x, weight, y and gx (x's shape or None)",
                       (x.shape, weight.shape, y.shape, None if gx is None else gx.shape),
                       self.shapes, self.dtype, (x, weight, y) + (() if gx is None else (gx,)))
        gy = np.ascontiguousarray(gy, dtype=self.dtype)
        check_argmax(gy, argmax, y.shape, self.k)
        o = y.shape[1]
        mean, scale, w = channel_values(mean, o), channel_values(scale, o), channel_values(w, o)
        sum_gy, sum_gy_xc, a_x, b = np.empty((4, o))
        partials = np.empty(self.partials_shape, self.dtype)
        tasks = max(1, min(numba.get_num_threads(), o))
        _backward(gy, y, argmax, mean, scale, w, bool(centered), self.k, x,
                  weight.reshape(o, -1), weight.shape[2], weight.shape[3], self.need_gx,
                  *self.gemm, tasks, self.bounds, sum_gy, sum_gy_xc, a_x, b, partials,
                  self.no_gx if gx is None else gx)
        return partials, sum_gy, sum_gy_xc
