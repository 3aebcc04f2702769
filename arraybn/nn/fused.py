"""Fused BN blocks: a conv layer's BN, its ReLU (before or after the BN) and max pooling as one
layer, and a dense layer's BN and ReLU, on backends whose ``conv_ops()`` offers the kernels
(``bn_pool_*`` for conv blocks, ``bn_dense_*`` for dense ones).

``fuse_bn_blocks(layers, backend)`` replaces every run ``Conv2d, [ReLU], BatchNorm, [ReLU],
[MaxPool2d]`` and ``Dense, [ReLU], BatchNorm, [ReLU]`` (one ReLU at most) by the Conv2d or Dense
and a ``FusedBNBlock`` holding the run's layers, which stay the reference: the block runs them
one by one (the unfused path) whenever the fused kernels do not cover the call, and
``unfused = True`` forces that. What the fused path covers: BN kinds "full" and "mean-only",
training (batch statistics, running buffers updated exactly as the core does: same statistics
kernel, same update kernel) and inference (running or batch statistics), with or without running
buffers. Anything else (ghost batches, renorm, an observer, a communicator, one value per
channel) goes the unfused way.

Forward: the backend's statistics pass, then one pass that normalises, applies the ReLU and
pools, writing only the pooled output and the argmax; in training both run in one kernel call
(``bn_pool_train_forward``). Backward: the BN sums over the pooled positions only, then one pass
that writes the input gradient, also one call (see ``numba_fused_kernels``). A dense block runs
the backend's own dense BN kernels and the ReLU in one call each way, equal to the unfused layers
bit for bit (``numba_dense_bn_kernels``; LeNet-5's two dense blocks in the two-thread step:
0.216 -> 0.143 ms forward and backward together).
"""
import math

import numpy as np

from arraybn.core import validation as v
from arraybn.nn.batchnorm import BatchNorm
from arraybn.nn.conv import Conv2d, MaxPool2d
from arraybn.nn.layers import Dense, Layer, ReLU, grad_out

FUSED_KINDS = ("full", "mean-only")
_FUSED_OPTIONS = {"training", "variant", "eps", "momentum", "running_mean", "running_var"}


_KERNELS = {Conv2d: "bn_pool_forward", Dense: "bn_dense_forward"}   # what each block needs


def fuse_bn_blocks(layers, backend):
    """``layers`` with each fusable BN run after a Conv2d or a Dense layer replaced by a
    ``FusedBNBlock``, where the backend's ``conv_ops()`` has the kernels for it."""
    ops = backend.conv_ops()
    out, i = [], 0
    while i < len(layers):
        before = type(layers[i - 1]) if i else None
        fusable = before in _KERNELS and hasattr(ops, _KERNELS[before])
        run = _fusable_run(layers, i, pool=before is Conv2d) if fusable else None
        if run is None:
            out.append(layers[i])
            i += 1
        else:
            out.append(FusedBNBlock(run, ops, dense=before is Dense))
            i += len(run)
    return out


def _fusable_run(layers, start, pool):
    """The layers [ReLU], BatchNorm, [ReLU], [MaxPool2d if ``pool``] from ``start``, or None."""
    j = start
    relu_before = j < len(layers) and _is_inplace_relu(layers[j])
    j += relu_before
    if not (j < len(layers) and isinstance(layers[j], BatchNorm)
            and layers[j].kind in FUSED_KINDS):
        return None
    j += 1
    if not relu_before and j < len(layers) and _is_inplace_relu(layers[j]):
        j += 1
    if pool and j < len(layers) and isinstance(layers[j], MaxPool2d):
        j += 1
    return layers[start:j]


def _is_inplace_relu(layer):
    return type(layer) is ReLU and layer.inplace


class FusedBNBlock(Layer):
    """[ReLU], BatchNorm, [ReLU], [MaxPool2d] of a conv block, or [ReLU], BatchNorm, [ReLU] of a
    dense one (``dense=True``: (N, C) inputs), as one layer (see the module)."""

    def __init__(self, layers, ops, dense=False):
        self.layers, self.dense = list(layers), dense
        kernels = "bn_dense" if dense else "bn_pool"     # the same arguments either way
        self._train_kernel = getattr(ops, kernels + "_train_forward")
        self._forward_kernel = getattr(ops, kernels + "_forward")
        self._backward_kernel = getattr(ops, kernels + "_backward")
        kinds = [type(layer) for layer in self.layers]
        self.bn = next(layer for layer in self.layers if isinstance(layer, BatchNorm))
        self.name = self.bn.name
        at = self.layers.index(self.bn)
        self.relu_before = ReLU in kinds[:at]
        self.relu_after = ReLU in kinds[at + 1:]
        self.k = self.layers[-1].k if kinds[-1] is MaxPool2d else 1
        self.unfused = False            # True: always run the layers one by one (the reference)

    def sublayers(self):
        return list(self.layers)

    def parameters(self):
        return self.bn.parameters()

    def forward(self, x, training):
        options = None if self.unfused else self._fusable_options(x, training)
        if options is None:
            self._cache = ("unfused",)
            for layer in self.layers:
                x = layer.forward(x, training)
            return x
        if self.relu_before:
            x = np.maximum(x, 0, out=x)              # in place, as the unfused ReLU(inplace=True)
        if options["training"]:
            y, argmax, cache = self._train_forward(x, options)
        else:
            center, a, b, cache = self._inference_coefficients(options)
            y, argmax = self._forward_kernel(x, center, a, b, self.relu_after, self.k)
        self._cache = ("fused", x, argmax) + cache
        return y

    def backward(self, gy):
        cache = self._take_cache()
        if cache[0] == "unfused":
            for layer in reversed(self.layers):
                gy = layer.backward(gy)
            return gy
        _, x, argmax, mean, scale, w, xhat_scale, centered = cache
        gx, sum_gy, sum_gy_xc = self._backward_kernel(gy, x, argmax, mean, scale, w, centered,
                                                      self.relu_before, self.k)
        self.set_gradients(sum_gy, sum_gy_xc, xhat_scale)
        return gx

    def set_gradients(self, sum_gy, sum_gy_xc, xhat_scale):
        """The BN's weight and bias gradients from a fused backward's sums (float64), rounded
        once to the parameters' dtype (into their ``grad_buffer`` where they have one)."""
        weight, bias = self.bn.weight, self.bn.bias
        dtype = weight.data.dtype
        weight_out, bias_out = grad_out(weight, dtype), grad_out(bias, dtype)
        if weight_out is None:
            weight.grad = (sum_gy_xc * xhat_scale).astype(dtype, copy=False)
        else:               # the float64 product, rounded once on the way out
            weight.grad = np.multiply(sum_gy_xc, xhat_scale, out=weight_out, casting="same_kind")
        if bias_out is None:
            bias.grad = sum_gy.astype(dtype, copy=False)
        else:
            bias_out[...] = sum_gy
            bias.grad = bias_out

    # --- the BN's statistics and coefficients -----------------------------------------------

    def inference_epilogue(self, n):
        """(center, a, b, relu) of ``y = relu?((x - center) * a + b)``, this block's whole
        inference forward of a batch of n conv outputs, where the fused kernels cover it and
        the block neither pools nor has a ReLU before its BN; else None. A convolution can
        apply it to its output (``arraybn.nn.conv_bn_block``)."""
        if self.unfused or self.dense or self.k != 1 or self.relu_before:
            return None
        options = self._covered_options(False, n, 1)
        if options is None or options["training"]:
            return None
        center, a, b, _ = self._inference_coefficients(options)
        return center, a, b, self.relu_after

    def _fusable_options(self, x, training):
        """The BN core options of this call when the fused kernels cover it, else None."""
        if (not isinstance(x, np.ndarray) or x.ndim != (2 if self.dense else 4)
                or not x.flags.c_contiguous):
            return None
        return self._covered_options(training, x.shape[0], math.prod(x.shape[2:]))

    def _covered_options(self, training, n, per_image):
        """The BN core options of a call on n inputs of ``per_image`` values a channel when the
        fused kernels cover it, else None."""
        bn = self.bn
        if bn._observer is not None or n == 0:
            return None
        options = bn._core_options(training)
        if options.pop("comm", None) is not None or set(options) - _FUSED_OPTIONS:
            return None
        if options["training"] and n * per_image < 2:
            return None                      # the core's error for one value per channel
        return options

    def _train_forward(self, x, options):
        """(y, argmax, backward cache) of a training call: batch statistics, running buffers
        updated, exactly as ``batch_norm_forward`` on this backend does, in one kernel call
        (``bn_pool_train_forward``)."""
        bn = self.bn
        gamma = bn.weight.data.astype(np.float64)
        center_only = options["variant"] == "mean_only"
        rm, rv = options["running_mean"], options["running_var"]
        y, argmax, mean, var, inv_std = self._train_kernel(
            x, gamma, bn.bias.data.astype(np.float64), options["eps"], center_only,
            options.get("momentum", 0.0), rm, None if center_only else rv, self.relu_after,
            self.k)
        if inv_std is None:
            raise v.non_finite_error(np, [mean, var], "batch statistics").located(bn.name)
        if bn.track_running_stats and rm is not None:
            bn.num_batches_tracked += 1
        if center_only:
            return y, argmax, (mean, gamma, np.zeros_like(mean), np.ones_like(mean), True)
        return y, argmax, (mean, gamma * inv_std, inv_std * inv_std, inv_std, True)

    def _inference_coefficients(self, options):
        """(center, a, b, backward cache) of ``y = (x - center) * a + b`` in inference, as
        ``batch_norm_forward`` on this backend computes them."""
        bn = self.bn
        gamma = bn.weight.data.astype(np.float64)
        center_only = options["variant"] == "mean_only"
        rv = None if center_only else options["running_var"]
        a, shift, mean, scale = bn.backend.inference_coefficients(
            gamma, bn.bias.data.astype(np.float64), options["running_mean"], rv, options["eps"],
            v.check_running_statistics)
        cache = (mean, gamma * scale, np.zeros_like(mean), scale, False)
        return np.zeros_like(mean), a, shift, cache
