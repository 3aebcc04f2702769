"""A network's first convolution and the fused BN block after it as one layer (``ConvBNBlock``),
whose backward never writes the BN's input gradient.

LeNet-5 starts with conv1 (6 channels, 26 x 26 at 28 x 28 inputs) and bn1 + ReLU + pooling (a
``FusedBNBlock``). Unfused, bn1's backward writes its gradient with respect to conv1's output,
2.1 MB at batch 128, and conv1's backward reads it back image by image for its weight
gradient. ``fuse_first_conv`` makes the two one layer where the backend's ``conv_ops()`` has
``flat_conv_bn_backward`` (numba: ``numba_conv_bn_kernels``), which writes each image's part of
that gradient where conv1's GEMM reads it. The results are the two layers' own, bit for bit, so
the layers stay as they were (names, parameters, state dict, layer tracking see them through
``sublayers()``) and the forward is theirs. The backward runs the two layers one after the
other (the reference) whenever the kernel does not cover the call: the block went the unfused
way (ghost batches, renorm, an observer, a communicator, ``unfused``), a ReLU comes before the
BN (the convolution then has a bias), the convolution did not run on the 'flat' kernels
(``conv.flat_kernel_chunks``), or ``fused`` is False.

Only the first layer with parameters: the network needs no gradient with respect to its input.
"""
import numpy as np

from arraybn.nn.conv import Conv2d, flat_kernel_chunks, summed_weight_gradient
from arraybn.nn.fused import FusedBNBlock
from arraybn.nn.layers import Layer

_KERNEL = "flat_conv_bn_backward"


def fuse_first_conv(layers, backend):
    """``layers`` with the first layer with parameters and the layer after it as one
    ``ConvBNBlock`` where they are a Conv2d (stride 1, no padding, no bias) and a conv block's
    ``FusedBNBlock`` without a ReLU before its BN, and the backend has the kernel; else
    ``layers`` as they are."""
    ops = backend.conv_ops()
    first = next((i for i, layer in enumerate(layers) if layer.parameters()), None)
    if first is None or first + 1 >= len(layers) or not hasattr(ops, _KERNEL):
        return layers
    conv, block = layers[first], layers[first + 1]
    if not (type(conv) is Conv2d and conv.bias is None and conv.stride == 1
            and conv.padding == 0 and type(block) is FusedBNBlock and not block.dense
            and not block.relu_before):
        return layers
    return layers[:first] + [ConvBNBlock(conv, block, ops)] + layers[first + 2:]


class ConvBNBlock(Layer):
    """``conv`` then ``block`` (see the module); the first layer of a network."""

    def __init__(self, conv, block, ops):
        self.conv, self.block, self.name = conv, block, conv.name
        self._ops, self._kernel = ops, getattr(ops, _KERNEL)
        conv.need_input_grad = self.need_input_grad = False
        self.fused = True           # False: always the two layers' own backward (the reference)

    def sublayers(self):
        return [self.conv, self.block]

    def parameters(self):
        return self.conv.parameters() + self.block.parameters()

    def forward(self, x, training):
        return self.block.forward(self.conv.forward(x, training), training)

    def backward(self, gy):
        chunks = self._fused_chunks()
        if chunks is None:
            return self.conv.backward(self.block.backward(gy))
        x, weight = self.conv._take_cache()[:2]
        _, y, argmax, mean, scale, w, xhat_scale, centered = self.block._take_cache()
        partials, sum_gy, sum_gy_xc = self._kernel(gy, y, argmax, mean, scale, w, centered,
                                                   self.block.k, x, weight, chunks)
        self.block.set_gradients(sum_gy, sum_gy_xc, xhat_scale)
        self.conv.weight.grad = summed_weight_gradient(partials, weight.shape, y.dtype, np)
        return None

    def _fused_chunks(self):
        """The convolution's chunks when the kernel covers this backward, else None."""
        conv_cache = getattr(self.conv, "_cache", None)
        block_cache = getattr(self.block, "_cache", None)
        if not self.fused or conv_cache is None or block_cache is None:
            return None
        if block_cache[0] != "fused":
            return None
        return flat_kernel_chunks(conv_cache, self._ops)
