"""Layers of the deep models: global average pooling and the residual block.

``ResidualBlock`` is a composite layer: it holds its sub-layers (the branch and the shortcut) and
runs them itself, so the model stays a plain list of layers. ``sublayers()`` lists them for the
model's ``state_dict`` and ``bn_layers``.
"""
import numpy as np

from arraybn.nn.layers import Layer, relu_backward, relu_forward


# --- global average pooling ---------------------------------------------------------------------

def global_avg_pool_forward(x):
    """x: (N, C, H, W) -> y: (N, C), the mean over the spatial axes (float64 accumulation)."""
    y = x.mean(axis=(2, 3), dtype=np.float64).astype(x.dtype)
    return y, x.shape


def global_avg_pool_backward(gy, x_shape, xp):
    """gy: (N, C) -> gx: (N, C, H, W), each position gets gy / (H * W)."""
    n, c, h, w = x_shape
    scaled = gy * gy.dtype.type(1.0 / (h * w))
    return xp.broadcast_to(scaled[:, :, None, None], x_shape).copy()


class GlobalAvgPool2d(Layer):
    """``nn.AdaptiveAvgPool2d(1)`` followed by ``flatten(1)``: (N, C, H, W) -> (N, C)."""

    def __init__(self, xp):
        self.xp = xp

    def forward(self, x, training):
        if x.ndim != 4:
            raise ValueError(f"global average pooling expects (N, C, H, W); got shape "
                             f"{tuple(x.shape)}")
        y, self._cache = global_avg_pool_forward(x)
        return y

    def backward(self, gy):
        return global_avg_pool_backward(gy, self._take_cache(), self.xp)


# --- residual block -----------------------------------------------------------------------------

def _run_forward(layers, x, training):
    for layer in layers:
        x = layer.forward(x, training)
    return x


def _run_backward(layers, g):
    for layer in reversed(layers):
        g = layer.backward(g)
    return g


class ResidualBlock(Layer):
    """``y = relu(branch(x) + shortcut(x))`` (He et al. 2016); no parameters of its own.

    branch, shortcut: lists of layers run in order; an empty shortcut is the identity.
    The sum is a fresh array, so the final ReLU works in place. ops: the backend's
    ``conv_ops()``; where it has ``add_relu`` (numba: ``numba_residual_kernels``) the sum and
    ReLU, the ReLU's gradient and the sum of the gradients run in its parallel kernels, with
    the same results. In inference, where the branch ends in a ``ConvBNBlock`` that covers it,
    the sum and ReLU are that convolution's epilogue (``ConvBNBlock.forward_sum``).
    """

    def __init__(self, branch, shortcut, xp, ops=None):
        if not branch:
            raise ValueError("a residual block needs at least one layer in its branch")
        self.branch, self.shortcut, self.xp = list(branch), list(shortcut), xp
        self._ops = ops if hasattr(ops, "add_relu") else None

    def sublayers(self):
        return self.branch + self.shortcut

    def parameters(self):
        return [p for layer in self.sublayers() for p in layer.parameters()]

    def forward(self, x, training):
        skip = _run_forward(self.shortcut, x, training)
        out = _run_forward(self.branch[:-1], x, training)
        last = self.branch[-1]
        if not training and hasattr(last, "forward_sum") and self._kernels(skip):
            y = self._cache = last.forward_sum(out, skip)
            if y is not None:
                return y
        out = last.forward(out, training)
        if out.shape != skip.shape:
            raise ValueError(f"residual block: the branch gives {tuple(out.shape)} but the "
                             f"shortcut {tuple(skip.shape)}; a block that changes the shape "
                             "needs a projection shortcut")
        if self._kernels(out, skip):
            y = self._cache = self._ops.add_relu(out, skip)
        else:
            y, self._cache = relu_forward(out + skip, self.xp, inplace=True)
        return y

    def backward(self, gy):
        y = self._take_cache()
        g = (self._ops.relu_gradient(gy, y) if self._kernels(gy, y)
             else relu_backward(gy, y, self.xp))
        g_skip = _run_backward(self.shortcut, g)      # the identity passes g itself through
        g_branch = _run_backward(self.branch, g)
        if self._kernels(g_branch, g_skip):
            return self._ops.add(g_branch, g_skip)
        return g_branch + g_skip

    def _kernels(self, *arrays):
        return self._ops is not None and self._ops.elementwise_applies(*arrays)
