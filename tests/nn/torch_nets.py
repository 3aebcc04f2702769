"""The deep models written independently in PyTorch, with the attribute names that make
arraybn's ``state_dict`` load with ``strict=True`` (used by the parity tests and the speed
benchmark). ``norm``: 'none', 'full' (BatchNorm) or 'group' (GroupNorm); ``position``: the
normalization 'before' or 'after' the ReLU. Import only where torch is installed."""
import math

import torch
from torch import nn
from torch.nn import functional as F

MAX_GROUPS = 32


def _groups(channels):
    """Wu & He's G = 32 when 32 divides C, else the largest divisor of C below 32."""
    return max(g for g in range(1, MAX_GROUPS + 1) if channels % g == 0)


def make_norm(norm, channels, conv=True, momentum=0.1, eps=1e-5):
    if norm == "none":
        return None
    if norm == "group":
        return nn.GroupNorm(_groups(channels), channels, eps=eps)
    if norm == "full":
        return (nn.BatchNorm2d if conv else nn.BatchNorm1d)(channels, momentum=momentum, eps=eps)
    raise ValueError(f"no PyTorch twin for normalization {norm!r}")


class _Net(nn.Module):
    def __init__(self, norm, position, momentum):
        super().__init__()
        self.norm, self.position, self.momentum = norm, position, momentum

    def _bias(self):
        return self.norm == "none" or self.position == "after"

    def _norm(self, channels, conv=True):
        return make_norm(self.norm, channels, conv, self.momentum)

    def _act(self, h, norm):
        if norm is None:
            return F.relu(h)
        return F.relu(norm(h)) if self.position == "before" else norm(F.relu(h))


class TorchVGG8(_Net):
    """conv 32-32, pool, 64-64, pool, 128-128, pool, fc 256, fc classes."""

    def __init__(self, norm="full", position="before", momentum=0.1, size=28, classes=10):
        super().__init__(norm, position, momentum)
        cin = 1
        for i, cout in enumerate((32, 32, 64, 64, 128, 128), start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=self._bias()))
            setattr(self, f"bn{i}", self._norm(cout))
            cin = cout
        self.fc1 = nn.Linear(128 * (size // 8) ** 2, 256, bias=self._bias())
        self.bn7 = self._norm(256, conv=False)
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x):
        h = x
        for i in range(1, 7):
            h = self._act(getattr(self, f"conv{i}")(h), getattr(self, f"bn{i}"))
            if i % 2 == 0:
                h = F.max_pool2d(h, 2)
        return self.fc2(self._act(self.fc1(h.flatten(1)), self.bn7))


class TorchPlain(_Net):
    """depth 3x3 convolutions; stride 2 and doubled width at ceil(D/3) and ceil(2D/3)."""

    def __init__(self, depth, width, norm="full", position="before", momentum=0.1, classes=10):
        super().__init__(norm, position, momentum)
        self.depth = depth
        starts = (math.ceil(depth / 3), math.ceil(2 * depth / 3))
        cin, cout = 1, width
        self.strides = []
        for i in range(depth):
            stride = 2 if i in starts else 1
            cout = cout * stride
            self.strides.append(stride)
            setattr(self, f"conv{i + 1}", nn.Conv2d(cin, cout, 3, stride=stride, padding=1,
                                                    bias=self._bias()))
            setattr(self, f"bn{i + 1}", self._norm(cout))
            cin = cout
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        h = x
        for i in range(1, self.depth + 1):
            h = self._act(getattr(self, f"conv{i}")(h), getattr(self, f"bn{i}"))
        return self.fc(h.mean(dim=(2, 3)))


class _Projection(nn.Module):
    def __init__(self, net, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, stride=stride, bias=net.norm == "none")
        self.bn1 = net._norm(cout)

    def forward(self, x):
        h = self.conv1(x)
        return h if self.bn1 is None else self.bn1(h)


class _Block(nn.Module):
    def __init__(self, net, cin, cout, stride):
        super().__init__()
        self.net = [net]                  # a list: not registered as a sub-module
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=net._bias())
        self.bn1 = net._norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=net.norm == "none")
        self.bn2 = net._norm(cout)
        self.shortcut = (_Projection(net, cin, cout, stride) if stride != 1 or cin != cout
                         else None)

    def forward(self, x):
        h = self.conv2(self.net[0]._act(self.conv1(x), self.bn1))
        if self.bn2 is not None:
            h = self.bn2(h)
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class TorchResNet(_Net):
    """He et al.'s CIFAR ResNet (option B projections) for 1-channel input."""

    def __init__(self, depth, width=16, norm="full", position="before", momentum=0.1,
                 classes=10):
        super().__init__(norm, position, momentum)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=self._bias())
        self.bn1 = self._norm(width)
        cin = width
        for stage in range(3):
            cout = width * 2 ** stage
            blocks = []
            for j in range(n):
                blocks.append(_Block(self, cin, cout, 2 if stage > 0 and j == 0 else 1))
                cin = cout
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        h = self._act(self.conv1(x), self.bn1)
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(h.mean(dim=(2, 3)))


def twin(config):
    """The PyTorch twin of an arraybn ``model.config`` (float32; call ``.double()`` as needed)."""
    common = dict(norm=config["bn"], position=config["bn_position"],
                  momentum=config["bn_momentum"], classes=config["num_classes"])
    if config["name"] == "vgg8":
        return TorchVGG8(size=config["in_shape"][1], **common)
    if config["name"] == "plain":
        return TorchPlain(config["depth"], config["width"], **common)
    if config["name"] == "resnet":
        return TorchResNet(config["depth"], config["width"], **common)
    raise ValueError(f"no PyTorch twin for model {config['name']!r}")


def load_arraybn_state(net, state):
    """``net.load_state_dict`` of arraybn's host arrays with ``strict=True``; returns ``net``."""
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    return net
