"""Numba kernels for the trainer's CPU hot spots: max pooling (and the fused BN blocks', the
convolutions', the residual blocks' and the dense layers' kernels).

Used by ``MaxPool2d`` (and ``arraybn.nn.fused``, ``ResidualBlock``: ``numba_residual_kernels``,
``Conv2d``: ``numba_flat_conv`` for the 'flat' convolutions, ``numba_im2col_conv`` for the others,
``ConvBNBlock``: ``numba_conv_bn_kernels``, and ``Dense``: ``numba_dense_kernels``) on the
'numba' backend only. The convolutions keep
``arraybn.nn.conv``'s im2col + BLAS GEMMs over cache-sized chunks of the batch: a direct
convolution loop in Numba was 3-10x slower; in the tenth session one with unsigned indices, the
nine taps of a 3x3 window in one vectorised loop and two output channels a pass (its sums the
GEMM's, bit for bit, where OpenBLAS sums K in one chain) took, against the GEMM path, 0.79x for 16
channels at 28x28, 1.06-2.7x for 32 and 64 channels and 1.3x for LeNet-5's conv2 (forward, one
thread), about 3% of a ResNet-20 step, so it was not kept. Their kernels run a chunk's im2col,
GEMMs and col2im in one call without the GIL. Numba loops for im2col were once 2-2.5x slower than
NumPy's slice copies (third and fourth sessions): signed indices made Numba wrap negative ones
around on every access, which kept the copies scalar; unsigned ones make them as fast as NumPy's
(see ``numba_im2col_conv``). The public functions are plain Python that validate and allocate; the
``@njit`` kernels are private and write into preallocated outputs, in parallel over the batch.
Compile flags come from ``numba_config.jit``, shared with the BN kernels.
"""
import numba
import numpy as np

from arraybn.backends.numba_config import jit, uidx
from arraybn.backends.numba_conv_bn_kernels import (FlatConvBNBackward,  # noqa: F401
                                                   flat_conv_bn_backward)
from arraybn.backends.numba_dense_bn_kernels import (bn_dense_backward,  # noqa: F401
                                                     bn_dense_forward, bn_dense_train_forward)
from arraybn.backends.numba_dense_kernels import (dense_backward_applies,  # noqa: F401
                                                  dense_backward_gemms, dense_forward_applies,
                                                  dense_forward_gemm)
from arraybn.backends.numba_flat_conv import available as conv_kernels_available  # noqa: F401
from arraybn.backends.numba_flat_conv import FlatConvForward  # noqa: F401
from arraybn.backends.numba_flat_conv import flat_conv_backward, flat_conv_forward
from arraybn.backends.numba_im2col_conv import conv_backward as im2col_conv_backward
from arraybn.backends.numba_im2col_conv import conv_forward as im2col_conv_forward
from arraybn.backends.numba_fused_kernels import (bn_pool_backward,  # noqa: F401
                                                  bn_pool_train_forward)
from arraybn.backends.numba_fused_kernels import bn_pool_forward, offset_tables
from arraybn.backends.numba_loss_kernels import (softmax_cross_entropy,  # noqa: F401
                                                 softmax_cross_entropy_applies)
from arraybn.backends.numba_optim_kernels import (adam_update, adam_update_applies,  # noqa: F401
                                                  sgd_update, sgd_update_applies)
from arraybn.backends.numba_residual_kernels import (add, add_relu,  # noqa: F401
                                                    elementwise_applies, relu_gradient)


@jit(parallel=True)
def _maxpool_forward(x, k, y, argmax):
    n_batch, n_ch, oh, ow = y.shape
    for n in numba.prange(n_batch):
        for c in range(n_ch):
            for i in range(oh):
                for j in range(ow):
                    best = x[n, c, i * k, j * k]
                    best_at = 0
                    for di in range(k):
                        for dj in range(k):
                            v = x[n, c, i * k + di, j * k + dj]
                            if v > best:           # strict: the first maximum wins, like PyTorch
                                best, best_at = v, di * k + dj
                    y[n, c, i, j] = best
                    argmax[n, c, i, j] = best_at


@jit(parallel=True)
def _maxpool_backward(gy, argmax, k, gx):
    """gx = 0, then each window's gradient at its argmax offset: (at >> 1, at & 1) at k = 2,
    else from tables (an integer division by k per window cost 1.5-1.9x at k = 2: LeNet-5's
    first pool 0.235 -> 0.126 ms, one thread)."""
    n_batch, n_ch, oh, ow = gy.shape
    w = gx.shape[3]
    di, dj = offset_tables(k)
    planes = gx.reshape(n_batch, n_ch, gx.shape[2] * w)
    for n in numba.prange(n_batch):
        gx[n] = 0
        for c in range(n_ch):
            for i in range(oh):
                for j in range(ow):
                    at = np.int64(argmax[n, c, i, j])
                    row, col = (at >> 1, at & 1) if k == 2 else (di[at], dj[at])
                    planes[uidx(n), uidx(c), uidx((k * i + row) * w + k * j + col)] = gy[
                        uidx(n), uidx(c), uidx(i), uidx(j)]


def conv_forward(x, weight, bias, chunks, stride, pad, layout, y, epilogue=None):
    """y of the convolution, chunk by chunk of ``chunks`` (slices of the batch) in
    ``arraybn.nn.conv``'s ``layout`` ('flat': stride 1, no padding; 'image' or 'chunk': one GEMM
    per image or per chunk), the chunks shared out among Numba's threads; without the GIL.
    epilogue: (center, a, b, relu, skip) of ``numba_conv_epilogue``, applied to every image's
    output as soon as it is written ('image' and 'chunk' layouts only)."""
    if layout == "flat":
        if epilogue is not None:
            raise ValueError("convolution kernels: the 'flat' layout takes no epilogue")
        flat_conv_forward(x, weight, bias, chunks, y)
    else:
        im2col_conv_forward(x, weight, bias, chunks, stride, pad, layout == "image", y,
                            epilogue)


def conv_backward(gy, x, weight, chunks, stride, pad, layout, gx):
    """The transposed weight gradient of each chunk, (chunks, C*kh*kw, O) (the caller adds
    them in chunk order), and gx unless gx is None."""
    if layout == "flat":
        return flat_conv_backward(gy, x, weight, chunks, gx)
    return im2col_conv_backward(gy, x, weight, chunks, stride, pad, layout == "image", gx)


def maxpool2d_forward(x, k):
    """x: (N, C, H, W) -> (y (N, C, H//k, W//k), argmax uint8 window offsets).

    2 x 2 pooling runs the fused BN block's vectorised window loop (``bn_pool_forward``) with
    the identity for its affine map: (x - 0) * 1 + (-0.0) is x exactly, signed zeros and
    infinities included, so y holds x's values (LeNet-5's first pool, 128 x 6 x 26 x 26, one
    thread: 0.34 -> 0.16 ms; VGG-8's first, 100 x 32 x 28 x 28: 1.83 -> 0.68 ms)."""
    n, c, h, w = x.shape
    if h < k or w < k:
        raise ValueError(f"max pooling {k}x{k} needs inputs of at least {k}x{k}; got {h}x{w}")
    if k == 2 and x.dtype in (np.float32, np.float64):    # the fused kernel's dtypes
        zeros = np.zeros(c)
        return bn_pool_forward(np.ascontiguousarray(x), zeros, np.ones(c), -zeros, False, 2)
    y = np.empty((n, c, h // k, w // k), dtype=x.dtype)
    argmax = np.empty(y.shape, dtype=np.uint8 if k * k < 256 else np.int32)
    _maxpool_forward(np.ascontiguousarray(x), k, y, argmax)
    return y, argmax


def maxpool2d_backward(gy, argmax, x_shape, k):
    gx = np.empty(x_shape, dtype=gy.dtype)
    _maxpool_backward(np.ascontiguousarray(gy), argmax, k, gx)
    return gx
