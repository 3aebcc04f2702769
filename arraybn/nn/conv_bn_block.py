"""A convolution and the fused BN block after it as one layer (``ConvBNBlock``), whose backward
never writes the BN's input gradient.

In LeNet-5 conv1 (6 channels, 26 x 26 at 28 x 28 inputs) and conv2 are each followed by BN +
ReLU + pooling (a ``FusedBNBlock``). Unfused, the block's backward writes its gradient with
respect to the convolution's output (conv1's: 2.1 MB at batch 128) and the convolution's
backward reads it back image by image for its GEMMs. ``fuse_conv_bn_blocks`` makes the two one
layer where the backend's ``conv_ops()`` has ``flat_conv_bn_backward`` (numba:
``numba_conv_bn_kernels``), which writes each image's part of that gradient where the
convolution's GEMMs read it. The results are the two layers' own, bit for bit, so the layers
stay as they were (names, parameters, state dict, layer tracking see them through
``sublayers()``) and the forward is theirs. The backward runs the two layers one after the
other (the reference) whenever the kernel does not cover the call: the block went the unfused
way (ghost batches, renorm, an observer, a communicator, ``unfused``), the convolution did not
run on the 'flat' kernels (``conv.flat_kernel_chunks``), or ``fused`` is False. Not built where a
ReLU comes before the BN (the convolution then has a bias) or the convolution is padded or
strided (VGG-8, ResNet, plain nets: never on the 'flat' kernels).
"""
import numpy as np

from arraybn.nn.conv import Conv2d, flat_kernel_chunks, summed_weight_gradient
from arraybn.nn.fused import FusedBNBlock
from arraybn.nn.layers import Layer

_KERNEL = "flat_conv_bn_backward"


def fuse_conv_bn_blocks(layers, backend):
    """``layers`` with each Conv2d (stride 1, no padding, no bias) and the conv block's
    ``FusedBNBlock`` after it (no ReLU before its BN) as one ``ConvBNBlock``, where the backend
    has the kernel."""
    ops = backend.conv_ops()
    if not hasattr(ops, _KERNEL):
        return layers
    out, i = [], 0
    while i < len(layers):
        pair = layers[i:i + 2]
        if len(pair) == 2 and _fits(*pair):
            out.append(ConvBNBlock(*pair, ops))
            i += 2
        else:
            out.append(layers[i])
            i += 1
    return out


def _fits(conv, block):
    return (type(conv) is Conv2d and conv.bias is None and conv.stride == 1
            and conv.padding == 0 and type(block) is FusedBNBlock and not block.dense
            and not block.relu_before)


class ConvBNBlock(Layer):
    """``conv`` then ``block`` (see the module)."""

    def __init__(self, conv, block, ops):
        self.conv, self.block, self.name = conv, block, conv.name
        self._ops, self._kernel = ops, getattr(ops, _KERNEL)
        self.fused = True           # False: always the two layers' own backward (the reference)

    @property
    def need_input_grad(self):
        return self.conv.need_input_grad

    @need_input_grad.setter
    def need_input_grad(self, value):
        self.conv.need_input_grad = value

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
        gx = np.empty_like(x) if self.need_input_grad else None
        partials, sum_gy, sum_gy_xc = self._kernel(gy, y, argmax, mean, scale, w, centered,
                                                   self.block.k, x, weight, chunks, gx)
        self.block.set_gradients(sum_gy, sum_gy_xc, xhat_scale)
        self.conv.weight.grad = summed_weight_gradient(partials, weight.shape, y.dtype, np)
        return gx

    def _fused_chunks(self):
        """The convolution's chunks when the kernel covers this backward, else None."""
        conv_cache = getattr(self.conv, "_cache", None)
        block_cache = getattr(self.block, "_cache", None)
        if not self.fused or conv_cache is None or block_cache is None or (
                block_cache[0] != "fused"):
            return None
        return flat_kernel_chunks(conv_cache, self._ops, self.need_input_grad)
