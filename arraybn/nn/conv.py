"""2-D convolution (im2col + one GEMM over the whole batch) and max pooling, NCHW like PyTorch.

The batch is laid out for one GEMM per convolution (not one per sample): ``im2col`` writes
cols (C*kh*kw, N*OH*OW), rows ordered (c, ki, kj) like ``weight.reshape(O, -1)`` and columns
(n, i, j), so the forward is ``W (O, C*kh*kw) @ cols -> (O, N*OH*OW)``, the weight gradient
``gy (O, N*OH*OW) @ cols.T`` and the input gradient ``W.T @ gy -> gcols``. Keeping each output
row contiguous in the columns makes the switch between (O, N, OH*OW) and NCHW a copy of
contiguous rows (fused with the bias add in the forward), a small fraction of the GEMM's work.

im2col reads the input in place and zeroes the entries on the padding (no padded copy), col2im
adds into the unpadded gradient; both are strided slice copies on any ``xp`` (numpy or cupy),
which beat Numba loops over this layout (see ``numba_conv_kernels``). A backend whose
``conv_ops()`` offers one-pass pooling has MaxPool2d call it. A Conv2d layer reuses its buffers
from step to step (only the latest forward's cache is ever used by backward, so nothing else
sees them).
"""
import numpy as np

from arraybn.nn.layers import Layer, Parameter, kaiming_uniform


def _out_size(size, k, stride, pad):
    out = (size + 2 * pad - k) // stride + 1
    if out < 1:
        raise ValueError(f"input size {size} is too small for kernel {k} with padding {pad}; "
                         "use a larger input or a smaller kernel")
    return out


def _buffer(workspace, key, shape, dtype, xp):
    """A reusable array from ``workspace`` (a dict, or None for a fresh one each call)."""
    if workspace is None:
        return xp.empty(shape, dtype=dtype)
    buf = workspace.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
        buf = workspace[key] = xp.empty(shape, dtype=dtype)
    return buf


def _valid(offset, stride, size, out):
    """Output positions [lo, hi) whose input position ``o * stride + offset`` is in [0, size)."""
    lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
    hi = min(out, (size - 1 - offset) // stride + 1) if size - 1 - offset >= 0 else 0
    return lo, max(lo, hi)


def _window_slices(ki, kj, stride, pad, in_hw, out_hw):
    """For the window offset (ki, kj): the output slices that read inside the input (the rest
    reads the zero padding) and the input slices they read; None if all of it is padding."""
    (h, w), (oh, ow) = in_hw, out_hw
    i0, i1 = _valid(ki - pad, stride, h, oh)
    j0, j1 = _valid(kj - pad, stride, w, ow)
    if i0 == i1 or j0 == j1:
        return None
    out = (slice(i0, i1), slice(j0, j1))
    src = (slice(i0 * stride + ki - pad, (i1 - 1) * stride + ki - pad + 1, stride),
           slice(j0 * stride + kj - pad, (j1 - 1) * stride + kj - pad + 1, stride))
    return out, src


def im2col(x, kh, kw, stride, pad, xp, out=None):
    """x: (N, C, H, W) -> cols (C*kh*kw, N*OH*OW), rows (c, ki, kj), columns (n, i, j).

    Reads x in place (no padded copy): the entries that fall on the padding are zeroed.
    out: optional (C, kh, kw, N, OH, OW) array to write into (a reused buffer).
    """
    n, c, h, w = x.shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    planes = x.transpose(1, 0, 2, 3)                              # (C, N, H, W) view
    cols = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype) if out is None else out
    for ki in range(kh):
        for kj in range(kw):
            window = _window_slices(ki, kj, stride, pad, (h, w), (oh, ow))
            dst = cols[:, ki, kj]
            if window is None:
                dst[...] = 0
                continue
            (rows, columns), (src_rows, src_columns) = window
            if pad:
                dst[:, :, :rows.start] = 0
                dst[:, :, rows.stop:] = 0
                dst[:, :, rows, :columns.start] = 0
                dst[:, :, rows, columns.stop:] = 0
            dst[:, :, rows, columns] = planes[:, :, src_rows, src_columns]
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im(gcols, x_shape, kh, kw, stride, pad, xp):
    """Adjoint of ``im2col``: gcols (C*kh*kw, N*OH*OW) -> (N, C, H, W), overlaps summed in the
    order (ki, kj)."""
    n, c, h, w = x_shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    cols6 = gcols.reshape(c, kh, kw, n, oh, ow)
    gx = xp.zeros((c, n, h, w), dtype=gcols.dtype)
    for ki in range(kh):
        for kj in range(kw):
            window = _window_slices(ki, kj, stride, pad, (h, w), (oh, ow))
            if window is not None:
                (rows, columns), (src_rows, src_columns) = window
                gx[:, :, src_rows, src_columns] += cols6[:, ki, kj, :, rows, columns]
    return xp.ascontiguousarray(gx.transpose(1, 0, 2, 3))


def conv2d_forward(x, weight, bias, stride, pad, xp, workspace=None):
    """x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> y: (N, O, OH, OW).

    workspace: optional dict of buffers reused from call to call (the layer's).
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    out = _buffer(workspace, "cols", (c, kh, kw, n, oh, ow), x.dtype, xp)
    cols = im2col(x, kh, kw, stride, pad, xp, out)
    y_onp = _buffer(workspace, "y", (o, n * oh * ow), x.dtype, xp)
    xp.matmul(weight.reshape(o, -1), cols, out=y_onp)                     # one GEMM
    y_onp = y_onp.reshape(o, n, oh * ow)
    y = xp.empty((n, o, oh, ow), dtype=y_onp.dtype)
    y_nop = y.reshape(n, o, oh * ow).transpose(1, 0, 2)      # (O, N, P) view of the NCHW output
    if bias is None:
        y_nop[...] = y_onp
    else:
        xp.add(y_onp, bias[:, None, None], out=y_nop)
    return y, (cols, x.shape, weight, stride, pad, bias is not None)


def conv2d_backward(gy, cache, xp, need_gx=True, workspace=None):
    """gy: (N, O, OH, OW) -> (gx (N, C, H, W) or None, gweight (O, C, kh, kw), gbias or None)."""
    cols, x_shape, weight, stride, pad, has_bias = cache
    n, o, oh, ow = gy.shape
    gy_onp = _buffer(workspace, "gy", (o, n, oh * ow), gy.dtype, xp)
    gy_onp[...] = gy.reshape(n, o, oh * ow).transpose(1, 0, 2)
    gy2 = gy_onp.reshape(o, n * oh * ow)
    gweight = xp.matmul(gy2, cols.T).reshape(weight.shape)    # BLAS reads cols.T in place
    gbias = gy2.sum(axis=1) if has_bias else None
    gx = None
    if need_gx:
        gcols = _buffer(workspace, "gcols", cols.shape, cols.dtype, xp)
        xp.matmul(weight.reshape(o, -1).T, gy2, out=gcols)    # (C*kh*kw, N*OH*OW)
        gx = col2im(gcols, x_shape, *weight.shape[2:], stride, pad, xp)
    return gx, gweight, gbias


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

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def forward(self, x, training):
        bias = None if self.bias is None else self.bias.data
        y, self._cache = conv2d_forward(x, self.weight.data, bias, self.stride, self.padding,
                                        self.xp, self._workspace)
        return y

    def backward(self, gy):
        gx, self.weight.grad, gbias = conv2d_backward(gy, self._take_cache(), self.xp,
                                                      self.need_input_grad, self._workspace)
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
