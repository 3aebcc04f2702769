"""Weight initialisation of ``build_model`` (its ``init`` option).

``kaiming-uniform`` (the default): PyTorch's default for ``nn.Conv2d`` and ``nn.Linear``,
``kaiming_uniform_(a=sqrt(5))``: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn
by the layers themselves when they are made (``arraybn.nn.layers.kaiming_uniform``).

``kaiming-normal``: He et al. 2015's fan-in initialisation for ReLU nets, every convolution and
dense weight N(0, 2 / fan_in) and every bias 0 (what ``torch.nn.init.kaiming_normal_(w,
mode='fan_in', nonlinearity='relu')`` draws). A ReLU layer multiplies the second moment of its
pre-activations by ``fan_in * Var(w) / 2``: 1 with this init, 1/6 with the default (Var(w) =
1/(3 fan_in)), so without BN a 20-layer plain net's signal would shrink by 6**20 at the start.
BN normalises that away, so comparisons of BN with no BN in deep nets use this init.
It re-draws the weights after the model is built, from its own stream of the model's seed, so
the default's draws (and hence its weights) are unchanged.
"""
import math

import numpy as np

from arraybn.nn.conv import Conv2d
from arraybn.nn.layers import Dense

INIT_SCHEMES = ("kaiming-uniform", "kaiming-normal")


def kaiming_normal(rng, shape, fan_in, dtype):
    """N(0, 2 / fan_in) of ``shape`` from the numpy Generator ``rng`` (drawn in float64, then
    cast to ``dtype``). Host numpy array."""
    return (rng.standard_normal(size=shape) * math.sqrt(2.0 / fan_in)).astype(dtype)


def initialise(layers, scheme, rng, xp):
    """Apply ``scheme`` (one of INIT_SCHEMES) to the convolution and dense ``layers`` (leaf
    layers in model order; others are skipped) in place, drawing from the numpy Generator ``rng``
    on the host (the same weights on every backend); ``xp``: the layers' array module.

    'kaiming-uniform' leaves the layers as they were made; 'kaiming-normal' re-draws each weight
    as N(0, 2 / fan_in), fan_in = in_features or in_channels * kh * kw, and zeroes each bias.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init={scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
    if scheme == "kaiming-uniform":
        return
    for layer in layers:
        if not isinstance(layer, (Conv2d, Dense)):
            continue
        weight = layer.weight.data
        fan_in = math.prod(weight.shape[1:])
        drawn = kaiming_normal(rng, weight.shape, fan_in, np.dtype(weight.dtype))
        weight[...] = xp.asarray(drawn)
        if layer.bias is not None:
            layer.bias.data[...] = 0
