"""Parameters and the simple layers: Dense, ReLU, Flatten, Dropout.

Each op has a pure ``*_forward`` returning ``(out, cache)`` and a ``*_backward(gy, cache)`` beside
it (cs231n style). The layer objects own parameters and keep the last cache so that a model can run
``forward`` then ``backward``. Array maths goes through ``xp`` (numpy or cupy), never a fixed
module.
"""
import abc
import math

import numpy as np


class Parameter:
    """A trainable array: ``name`` (PyTorch state_dict key), ``data`` and ``grad`` (same shape).

    ``grad`` is overwritten by every backward pass (never accumulated); None before the first.
    ``grad_buffer``: None, or where a backward may write ``grad`` in place: an optimizer whose
    parameters share one flat array (``arraybn.nn.flat``) gives each a view of its flat
    gradient, and the layers that can compute their gradient into it do (``out=``), which spares
    the optimizer a copy of every gradient per step. ``grad`` may then be the same array from
    one step to the next, as in PyTorch: copy it to keep a step's gradient.
    """
    __slots__ = ("name", "data", "grad", "grad_buffer")

    def __init__(self, name, data):
        self.name = name
        self.data = data
        self.grad = None
        self.grad_buffer = None

    def __repr__(self):
        return f"Parameter({self.name!r}, shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


def grad_out(param, dtype):
    """``param.grad_buffer`` where a gradient computed in ``dtype`` can be written into it as
    it is (the same dtype), else None (also for ``param`` None)."""
    buffer = None if param is None else param.grad_buffer
    return buffer if buffer is not None and buffer.dtype == dtype else None


def kaiming_uniform(rng, shape, fan_in, dtype):
    """PyTorch's default Linear/Conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (``kaiming_uniform_(a=sqrt(5))`` reduces to exactly this bound.) Host numpy array.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Layer(abc.ABC):
    """Base class: ``forward(x, training)`` stores what ``backward(gy)`` needs and returns y."""
    name = None
    need_input_grad = True        # the model clears this on its first layer to skip gx

    def parameters(self):
        return []

    def sublayers(self):
        """The layers a composite layer runs inside itself (e.g. a residual block); [] here."""
        return []

    @abc.abstractmethod
    def forward(self, x, training):
        """y for input x; keeps in ``self._cache`` what backward needs."""

    @abc.abstractmethod
    def backward(self, gy):
        """d loss / d input from ``gy = d loss / d y``; fills the parameters' ``.grad``."""

    def _take_cache(self):
        cache = getattr(self, "_cache", None)
        if cache is None:
            raise RuntimeError(f"{type(self).__name__} {self.name or ''}: backward called without "
                               "a forward pass before it; run model.forward(x) first")
        self._cache = None
        return cache


# --- Dense ------------------------------------------------------------------------------------

def dense_forward(x, weight, bias, ops=None):
    """y = x @ W.T + b.  x: (N, in), weight: (out, in), bias: (out,) or None -> y: (N, out).

    ops: the backend's ``conv_ops()``; where it has ``dense_forward_gemm`` (numba) and that
    applies, the GEMM runs in two halves side by side, with the same results."""
    applies = getattr(ops, "dense_forward_applies", None)
    y = ops.dense_forward_gemm(x, weight) if applies and applies(x, weight) else x @ weight.T
    if bias is not None:
        y += bias
    return y, (x, weight, bias is not None)


def dense_backward(gy, cache, need_gx=True, ops=None, out=(None, None)):
    """gy: (N, out) -> (gx (N, in) or None, gweight (out, in), gbias (out,) or None).

    ops: the backend's ``conv_ops()``; where it has ``dense_backward_gemms`` (numba) and that
    applies, the two GEMMs run side by side, with the same results. out: NumPy arrays of gy's
    dtype for gweight and gbias to be written into (``grad_out``), or None each."""
    x, weight, has_bias = cache
    gweight_out, gbias_out = out
    applies = getattr(ops, "dense_backward_applies", None)
    if need_gx and applies is not None and applies(gy, x, weight):
        gx, gweight = ops.dense_backward_gemms(gy, x, weight, gweight_out)
    else:
        gx = gy @ weight if need_gx else None
        gweight = gy.T @ x if gweight_out is None else np.matmul(gy.T, x, out=gweight_out)
    gbias = gy.sum(axis=0, out=gbias_out) if has_bias else None
    return gx, gweight, gbias


class Dense(Layer):
    """Fully connected layer; PyTorch ``nn.Linear`` layout and init (weight (out, in))."""

    def __init__(self, name, in_features, out_features, *, bias, rng, xp, dtype, ops=None):
        self.name, self._ops = name, ops       # ops: see dense_forward, dense_backward
        self.weight = Parameter(f"{name}.weight", xp.asarray(
            kaiming_uniform(rng, (out_features, in_features), in_features, dtype)))
        self.bias = None
        if bias:
            self.bias = Parameter(f"{name}.bias", xp.asarray(
                kaiming_uniform(rng, (out_features,), in_features, dtype)))

    def parameters(self):
        return [p for p in (self.weight, self.bias) if p is not None]

    def forward(self, x, training):
        y, self._cache = dense_forward(x, self.weight.data,
                                       None if self.bias is None else self.bias.data, self._ops)
        return y

    def backward(self, gy):
        out = grad_out(self.weight, gy.dtype), grad_out(self.bias, gy.dtype)
        gx, self.weight.grad, gbias = dense_backward(gy, self._take_cache(), self.need_input_grad,
                                                     self._ops, out)
        if self.bias is not None:
            self.bias.grad = gbias
        return gx


# --- ReLU, Flatten ------------------------------------------------------------------------------

def relu_forward(x, xp, inplace=False):
    """y = max(x, 0), any shape; the cache is y itself (y > 0 marks where gradients pass).

    inplace=True overwrites x (allowed only when nothing else keeps x, as in the model's blocks).
    """
    y = xp.maximum(x, 0, out=x if inplace else None)
    return y, y


def relu_backward(gy, y, xp, inplace=False):
    """gx = gy where y > 0, else 0; inplace=True overwrites gy."""
    return xp.multiply(gy, y > 0, out=gy if inplace else None)


class ReLU(Layer):
    """ReLU; ``inplace=True`` reuses the input and incoming-gradient arrays (like PyTorch's
    ``nn.ReLU(inplace=True)``): only for inputs that no one else keeps."""

    def __init__(self, xp, inplace=False):
        self.xp, self.inplace = xp, inplace

    def forward(self, x, training):
        y, self._cache = relu_forward(x, self.xp, self.inplace)
        return y

    def backward(self, gy):
        return relu_backward(gy, self._take_cache(), self.xp, self.inplace)


class Flatten(Layer):
    """(N, *shape) -> (N, prod(shape)), C order like ``torch.flatten(x, 1)``."""

    def forward(self, x, training):
        self._cache = x.shape
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))     # -1 fails for N = 0

    def backward(self, gy):
        return gy.reshape(self._take_cache())


# --- Dropout ------------------------------------------------------------------------------------

def dropout_forward(x, p, rng, xp, shard=None):
    """Inverted dropout: zero each value with probability p, scale the rest by 1/(1-p).

    The mask is drawn on the host from the numpy Generator ``rng`` (reproducible on every
    backend), then moved to ``xp``. Returns (y, scaled_mask).
    shard ``(start, total)``: x is rows start.. of a batch of ``total`` rows (data-parallel
    training); the mask is drawn for the whole batch and x gets its rows, so every rank's
    generator stays in step and the masks are those one process draws.
    """
    start, total = (0, x.shape[0]) if shard is None else shard
    keep = rng.random((total,) + x.shape[1:], dtype=np.float32)[start:start + x.shape[0]] >= p
    mask = xp.asarray(keep.astype(x.dtype) * np.asarray(1.0 / (1.0 - p), dtype=x.dtype))
    return x * mask, mask


class Dropout(Layer):
    """Dropout with probability ``p`` in training; identity in evaluation. ``rng``: numpy Generator
    owned by the model, so a seed fixes every mask. ``shard``: see ``dropout_forward``."""
    shard = None

    def __init__(self, p, rng, xp):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.rng, self.xp = p, rng, xp

    def forward(self, x, training):
        if not training or self.p == 0.0:
            self._cache = False
            return x
        y, self._cache = dropout_forward(x, self.p, self.rng, self.xp, self.shard)
        return y

    def backward(self, gy):
        mask = self._take_cache()
        return gy if mask is False else gy * mask
