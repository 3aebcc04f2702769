"""A convolution and the fused BN block after it as one layer (``ConvBNBlock``): in training its
backward never writes the BN's input gradient, in inference its forward never writes the BN's
input.

Backward: in LeNet-5 conv1 (6 channels, 26 x 26 at 28 x 28 inputs) and conv2 are each followed by
BN + ReLU + pooling (a ``FusedBNBlock``). Unfused, the block's backward writes its gradient with
respect to the convolution's output (conv1's: 2.1 MB at batch 128) and the convolution's
backward reads it back image by image for its GEMMs. Where the backend's ``conv_ops()`` has
``flat_conv_bn_backward`` (numba: ``numba_conv_bn_kernels``) that kernel writes each image's
part of that gradient where the convolution's GEMMs read it. Only where the convolution ran on
the 'flat' kernels (stride 1, no padding, no bias: ``conv.flat_kernel_chunks``), the block went
the fused way and ``fused`` is True; otherwise the two layers' own backward runs (the
reference). The kernel comes prepared for the input's shape (``FlatConvBNBackward``: its
checks, chunks and buffers' shapes worked out once), kept per input shape, dtype and
whether the input gradient is wanted, so the chunking settings are read at a block's first
backward of each shape; a backward with the same shape only checks its arrays and runs the
kernel (LeNet-5's batch-2 step, one thread: 0.301 -> 0.285 ms, 8 interleaved runs).

Inference forward: where the block normalises without pooling (VGG-8's, ResNet's and the plain
nets' BN + ReLU, a residual branch's last BN) and the convolution runs on the backend's kernels
outside the 'flat' layout, the BN (and ReLU) is the convolution's epilogue, applied to each
image's output right after its GEMM while it is in the cache (``conv.conv2d_inference``; numba:
``numba_conv_epilogue``), instead of a pass that reads the whole batch back from memory. A
residual block asks for the sum with its shortcut and the final ReLU there too
(``forward_sum``): ResNet-20 validates 3,000 images in 2.14 s instead of 2.43 on one thread
(numbers in ``numba_conv_epilogue``).
Nothing is kept for a backward then; a backward after such a forward (gradients of an
evaluated model) runs the two layers' forward again from the kept input first.

The results are the two layers' own, bit for bit, so the layers stay as they were (names,
parameters, state dict, layer tracking see them through ``sublayers()``). Not built where a
ReLU comes before the BN (the convolution then has a bias).
"""
import numpy as np

from arraybn.nn.conv import Conv2d, flat_kernel_chunks, summed_weight_gradient
from arraybn.nn.fused import FusedBNBlock, fuse_bn_blocks
from arraybn.nn.layers import Layer, grad_out

_KERNEL = "FlatConvBNBackward"
_KEEP = 8          # prepared kernels a block keeps (input shapes: a batch size and the last
                   # batch's, usually)


def fuse_layers(layers, backend):
    """``layers`` with their fused BN blocks (``fuse_bn_blocks``), then each conv + block pair
    as one ``ConvBNBlock``: how a model, and each residual block inside it, fuses its layers
    where the backend has the kernels."""
    return fuse_conv_bn_blocks(fuse_bn_blocks(layers, backend), backend)


def fuse_conv_bn_blocks(layers, backend):
    """``layers`` with each Conv2d and the conv block's ``FusedBNBlock`` after it (no ReLU
    before its BN) as one ``ConvBNBlock``, where the backend has the kernel."""
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
    return (type(conv) is Conv2d and type(block) is FusedBNBlock and not block.dense
            and not block.relu_before)


class ConvBNBlock(Layer):
    """``conv`` then ``block`` (see the module)."""

    def __init__(self, conv, block, ops):
        self.conv, self.block, self.name = conv, block, conv.name
        self._ops, self._prepare = ops, getattr(ops, _KERNEL)
        self._prepared = {}    # (x.shape, dtype, need_input_grad) -> the prepared kernel or None
        self.fused = True      # False: always the layers' own forward and backward (the reference)

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
        y = None if training else self._inference(x, None)
        if y is None:
            self._cache = None
            y = self.block.forward(self.conv.forward(x, training), training)
        return y

    def forward_sum(self, x, skip):
        """The inference output plus ``skip`` (an array of its shape), then a ReLU as
        ``numba_residual_kernels.add_relu``, in the convolution's epilogue; None where that
        does not apply (the caller runs the layers and the sum itself)."""
        return self._inference(x, skip)

    def _inference(self, x, skip):
        """The inference forward (plus skip and a ReLU if given) with the block as the
        convolution's epilogue, or None where it does not apply."""
        epilogue = self.block.inference_epilogue(x.shape[0]) if self.fused else None
        if epilogue is None:
            return None
        y = self.conv.forward_inference(x, epilogue + (skip,))
        if y is not None:
            self.conv._cache = self.block._cache = None
            self._cache = ("inference", x)
        return y

    def backward(self, gy):
        cache = getattr(self, "_cache", None)
        if cache is not None:                 # after an inference forward: run it unfused
            self._cache = None
            self.block.forward(self.conv.forward(cache[1], False), False)
        kernel = self._fused_kernel()
        if kernel is None:
            return self.conv.backward(self.block.backward(gy))
        x, weight = self.conv._take_cache()[:2]
        _, y, argmax, mean, scale, w, xhat_scale, centered = self.block._take_cache()
        gx = np.empty_like(x) if self.need_input_grad else None
        partials, sum_gy, sum_gy_xc = kernel(gy, y, argmax, mean, scale, w, centered, x, weight,
                                             gx)
        self.block.set_gradients(sum_gy, sum_gy_xc, xhat_scale)
        self.conv.weight.grad = summed_weight_gradient(partials, weight.shape, y.dtype, np,
                                                       grad_out(self.conv.weight, y.dtype))
        return gx

    def _fused_kernel(self):
        """The kernel prepared for this backward when it covers it, else None."""
        conv_cache = getattr(self.conv, "_cache", None)
        block_cache = getattr(self.block, "_cache", None)
        if not self.fused or conv_cache is None or block_cache is None or (
                block_cache[0] != "fused"):
            return None
        x, weight, y = conv_cache[0], conv_cache[1], block_cache[1]
        key = (x.shape, x.dtype, self.need_input_grad)
        if key not in self._prepared:
            if len(self._prepared) >= _KEEP:
                self._prepared.clear()
            chunks = flat_kernel_chunks(conv_cache, self._ops, self.need_input_grad)
            self._prepared[key] = None if chunks is None else self._prepare(
                x.shape, weight.shape, y.shape, x.dtype, self.block.k, chunks,
                self.need_input_grad)
        return self._prepared[key]
