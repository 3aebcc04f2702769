"""Deeper models for ``build_model``: an 8-layer VGG, deep plain CNNs and CIFAR-style ResNets.

Each builder appends layers to a ``models._Builder`` (``b``), which places the normalization
layer (any ``bn`` choice, before or after the ReLU) and names everything like the equivalent
PyTorch module, so ``model.npz`` loads into it with ``strict=True``. ``bn<k>`` is the k-th
normalization layer of its scope (BN, or GN for ``bn='group'``); a convolution or dense layer
followed directly by BN has no bias. Below, "conv c" is a 3x3 convolution with c output channels
and padding 1, "BN-ReLU" the configured normalization and ReLU in the configured order.

vgg8 (the second seed text's 8-layer VGG adapted to 28x28, 6 conv + 2 fc weight layers)::

    conv1 32, BN-ReLU, conv2 32, BN-ReLU, maxpool 2           28 -> 14
    conv3 64, BN-ReLU, conv4 64, BN-ReLU, maxpool 2           14 -> 7
    conv5 128, BN-ReLU, conv6 128, BN-ReLU, maxpool 2          7 -> 3 (floor)
    flatten (128*3*3 = 1152), fc1 256, BN-ReLU, dropout, fc2 num_classes (logits)

plain (``depth`` D >= 3 convolutions, ``width`` W; He et al.'s plain baseline)::

    D convolutions in three stages: conv i (1-based) is in stage floor(3 (i-1) / D), so the
    stages change at 1/3 and 2/3 of the depth; stage s has W * 2**s channels and its first
    convolution has stride 2 (28 -> 14 -> 7) in stages 1 and 2. Each: conv<i>, BN-ReLU.
    global average pool, fc num_classes.

resnet (``depth`` = 6n + 2: 8, 14, 20, 32, ...; He et al. 2016's CIFAR ResNet, 1-channel
28x28 input; ``width`` 16 gives the paper's 16/32/64 channels)::

    conv1 W, BN-ReLU                                            28x28
    layer1: n blocks of W channels                              28x28
    layer2: n blocks of 2W channels, the first with stride 2    14x14
    layer3: n blocks of 4W channels, the first with stride 2     7x7
    global average pool, fc num_classes

    block layer<s>.<j>: y = relu(branch(x) + shortcut(x)),
      branch = conv1 (stride 1 or 2), BN-ReLU, conv2, bn2 (BN only: the ReLU follows the sum)
      shortcut = identity, or where the shape changes option B of He et al.: a 1x1 convolution
      with stride 2 and its BN, named shortcut.conv1 and shortcut.bn1.

GroupNorm directly before the global average pool (plain, bn='group' after the ReLU) must not
have one channel per group: each channel's average would be 0 before the affine map, so the
output would not depend on the input; ``build_model`` refuses that (width <= 8).

Dropout (``dropout`` > 0) follows the hidden dense block as in LeNet-5; only vgg8 has one, so
plain and resnet refuse a non-zero dropout rather than ignore it.
"""
from arraybn.nn.conv import MaxPool2d
from arraybn.nn.conv_bn_block import fuse_layers
from arraybn.nn.groupnorm import default_groups
from arraybn.nn.layers import Flatten
from arraybn.nn.residual import GlobalAvgPool2d, ResidualBlock

DEEP_MODEL_NAMES = ("vgg8", "plain", "resnet")
VGG8_CHANNELS = (32, 64, 128)
VGG8_HIDDEN = 256


def check_config(cfg):
    """ValueError for a depth, width or dropout that the deep model ``cfg['name']`` cannot use."""
    name, depth, width = cfg["name"], cfg["depth"], cfg["width"]
    if name not in ("plain", "resnet"):
        return
    if width < 1:
        raise ValueError(f"{name}: width must be >= 1 channel, got {width}")
    if name == "plain" and depth < 3:
        raise ValueError(f"plain: depth must be >= 3 convolutions (one per stage), got {depth}")
    if name == "resnet" and (depth < 8 or (depth - 2) % 6):
        raise ValueError(f"resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), "
                         f"got {depth}")
    if cfg["dropout"] > 0:
        raise ValueError(f"{name} has no hidden dense layer for dropout; use dropout=0 "
                         "(vgg8, lenet5 and mlp take dropout)")
    last = 4 * width
    if (name == "plain" and cfg["bn"] == "group" and cfg["bn_position"] == "after"
            and default_groups(last) == last):
        raise ValueError(f"plain with bn='group' after the ReLU: the last GroupNorm has one of "
                         f"its {last} channels per group, and the global average of a channel "
                         "normalized over its own positions is beta for every input; use "
                         "bn_position='before' or width >= 9")


def build_deep(b, name, in_shape, num_classes, depth, width):
    """Append the layers of ``name`` (one of DEEP_MODEL_NAMES) to the builder ``b``."""
    if name == "vgg8":
        _vgg8(b, in_shape, num_classes)
    elif name == "plain":
        _plain(b, in_shape, num_classes, depth, width)
    else:
        _resnet(b, in_shape, num_classes, depth, width)


def _vgg8(b, in_shape, num_classes):
    channels, h, w = in_shape
    if h < 8 or w < 8:
        raise ValueError(f"vgg8 pools three times and needs inputs of at least 8x8 pixels; "
                         f"got {in_shape}")
    index = 0
    for cout in VGG8_CHANNELS:
        for _ in range(2):
            index += 1
            b.block(b.conv(f"conv{index}", channels, cout, 3, padding=1), cout)
            channels = cout
        b.layers.append(MaxPool2d(2, b.backend))
        h, w = h // 2, w // 2
    b.layers.append(Flatten())
    b.block(b.dense("fc1", channels * h * w, VGG8_HIDDEN), VGG8_HIDDEN, dropout=True)
    b.layers.append(b.dense("fc2", VGG8_HIDDEN, num_classes)(True))


def plain_stage(index, depth):
    """The stage (0, 1, 2) of the plain net's convolution ``index`` (0-based)."""
    return 3 * index // depth


def _plain(b, in_shape, num_classes, depth, width):
    channels = in_shape[0]
    for i in range(depth):
        stage = plain_stage(i, depth)
        stride = 2 if i > 0 and stage != plain_stage(i - 1, depth) else 1
        cout = width * 2 ** stage
        b.block(b.conv(f"conv{i + 1}", channels, cout, 3, stride=stride, padding=1), cout)
        channels = cout
    b.layers.append(GlobalAvgPool2d(b.backend.xp))
    b.layers.append(b.dense("fc", channels, num_classes)(True))


def _residual_block(b, prefix, cin, cout, stride):
    branch = b.nested(prefix)
    branch.block(branch.conv("conv1", cin, cout, 3, stride=stride, padding=1), cout)
    branch.linear_norm(branch.conv("conv2", cout, cout, 3, padding=1), cout)
    shortcut = b.nested(prefix + "shortcut.")
    if stride != 1 or cin != cout:
        shortcut.linear_norm(shortcut.conv("conv1", cin, cout, 1, stride=stride), cout)
    # the Network fuses top-level runs only; a block's runs are fused here (where the backend can)
    return ResidualBlock(fuse_layers(branch.layers, b.backend),
                         fuse_layers(shortcut.layers, b.backend), b.backend.xp,
                         b.backend.conv_ops())


def _resnet(b, in_shape, num_classes, depth, width):
    blocks_per_stage = (depth - 2) // 6
    b.block(b.conv("conv1", in_shape[0], width, 3, padding=1), width)
    channels = width
    for stage in range(3):
        cout = width * 2 ** stage
        for j in range(blocks_per_stage):
            stride = 2 if stage > 0 and j == 0 else 1
            b.layers.append(_residual_block(b, f"layer{stage + 1}.{j}.", channels, cout, stride))
            channels = cout
    b.layers.append(GlobalAvgPool2d(b.backend.xp))
    b.layers.append(b.dense("fc", channels, num_classes)(True))
