"""2-D convolution (im2col + batched GEMM) and max pooling, NCHW like PyTorch.

The plain path works on any ``xp`` (numpy or cupy). A backend whose ``conv_ops()`` offers its
own helpers (the numba backend: col2im with fused padding, one-pass pooling) has the layers call
those instead; the GEMMs are BLAS calls on every backend. A Conv2d layer reuses its im2col
buffers from step to step (only the latest forward's cache is ever used by backward, so nothing
else sees them).
"""
import numpy as np

from arraybn.nn.layers import Layer, Parameter, kaiming_uniform


def _out_size(size, k, stride, pad):
    out = (size + 2 * pad - k) // stride + 1
    if out < 1:
        raise ValueError(f"input size {size} is too small for kernel {k} with padding {pad}; "
                         "use a larger input or a smaller kernel")
    return out


def _pad(x, pad, xp):
    if pad == 0:
        return x
    return xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def _buffer(workspace, key, shape, dtype, xp):
    """A reusable array from ``workspace`` (a dict, or None for a fresh one each call)."""
    if workspace is None:
        return xp.empty(shape, dtype=dtype)
    buf = workspace.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
        buf = workspace[key] = xp.empty(shape, dtype=dtype)
    return buf


def im2col(x, kh, kw, stride, pad, xp, workspace=None):
    """x: (N, C, H, W) -> cols (N, C*kh*kw, OH*OW), rows ordered (c, ki, kj) like weight.reshape.

    workspace: optional dict whose "cols" buffer is reused (and overwritten) when shapes match.
    """
    n, c, h, w = x.shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    xp_ = _pad(x, pad, xp)
    cols = _buffer(workspace, "cols", (n, c, kh, kw, oh, ow), x.dtype, xp)
    for ki in range(kh):
        for kj in range(kw):
            cols[:, :, ki, kj] = xp_[:, :, ki:ki + stride * (oh - 1) + 1:stride,
                                     kj:kj + stride * (ow - 1) + 1:stride]
    return cols.reshape(n, c * kh * kw, oh * ow)


def col2im(cols, x_shape, kh, kw, stride, pad, xp):
    """Adjoint of ``im2col``: cols (N, C*kh*kw, OH*OW) -> (N, C, H, W), overlaps summed."""
    n, c, h, w = x_shape
    oh, ow = _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad)
    cols6 = cols.reshape(n, c, kh, kw, oh, ow)
    gx = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for ki in range(kh):
        for kj in range(kw):
            gx[:, :, ki:ki + stride * (oh - 1) + 1:stride,
               kj:kj + stride * (ow - 1) + 1:stride] += cols6[:, :, ki, kj]
    return gx[:, :, pad:pad + h, pad:pad + w] if pad else gx


def conv2d_forward(x, weight, bias, stride, pad, xp, workspace=None):
    """x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> y: (N, O, OH, OW).

    workspace: optional dict of buffers reused from call to call (the layer's), see ``im2col``.
    """
    n = x.shape[0]
    o, _, kh, kw = weight.shape
    oh = _out_size(x.shape[2], kh, stride, pad)
    ow = _out_size(x.shape[3], kw, stride, pad)
    cols = im2col(x, kh, kw, stride, pad, xp, workspace)
    y = xp.matmul(weight.reshape(o, -1), cols)                # (N, O, OH*OW)
    if bias is not None:
        y += bias[:, None]
    return y.reshape(n, o, oh, ow), (cols, x.shape, weight, stride, pad, bias is not None)


def conv2d_backward(gy, cache, xp, need_gx=True, col2im_fn=None, workspace=None):
    """gy: (N, O, OH, OW) -> (gx (N, C, H, W) or None, gweight (O, C, kh, kw), gbias or None).

    col2im_fn: optional replacement for ``col2im`` without its xp argument (the Numba kernel).
    """
    cols, x_shape, weight, stride, pad, has_bias = cache
    o, _, kh, kw = weight.shape
    gy3 = gy.reshape(gy.shape[0], o, gy.shape[2] * gy.shape[3])   # (N, O, P)
    # batched GEMMs then a sum: BLAS reads cols transposed in place (tensordot would copy it)
    gweight = xp.matmul(gy3, cols.transpose(0, 2, 1)).sum(axis=0).reshape(weight.shape)
    gbias = gy3.sum(axis=(0, 2)) if has_bias else None
    gx = None
    if need_gx:
        gcols = _buffer(workspace, "gcols", cols.shape, cols.dtype, xp)
        xp.matmul(weight.reshape(o, -1).T, gy3, out=gcols)     # (N, C*kh*kw, P)
        if col2im_fn is None:
            gx = col2im(gcols, x_shape, kh, kw, stride, pad, xp)
        else:
            gx = col2im_fn(gcols, x_shape, kh, kw, stride, pad)
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
        ops = backend.conv_ops()
        self._col2im = None if ops is None else ops.col2im
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
                                                      self.need_input_grad, self._col2im,
                                                      self._workspace)
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
