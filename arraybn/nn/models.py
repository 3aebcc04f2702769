"""The model family: LeNet-5 with BN (the seed text's network) and MLPs, built by ``build_model``,
which also builds the deeper vgg8, plain and resnet of ``arraybn.nn.deep_models``.

A ``Network`` is a list of layers run in order; ``backward`` runs them in reverse and fills every
parameter's ``.grad``. Parameter and buffer names follow the equivalent PyTorch module's
``state_dict`` (conv1, bn1, conv2, bn2, fc1, bn3, ...), so weights load into PyTorch unchanged.
"""
import numpy as np

from arraybn.backends import get_backend
from arraybn.backends.arrays import to_host
from arraybn.nn import defaults
from arraybn.nn.batchnorm import BN_KINDS, BatchNorm
from arraybn.nn.conv import Conv2d, MaxPool2d
from arraybn.nn.conv_bn_block import fuse_layers
from arraybn.nn.deep_models import DEEP_MODEL_NAMES, build_deep, check_config
from arraybn.nn.groupnorm import GroupNorm
from arraybn.nn.initialisation import INIT_SCHEMES, initialise
from arraybn.nn.layers import Dense, Dropout, Flatten, ReLU

MODEL_NAMES = ("lenet5", "mlp") + DEEP_MODEL_NAMES
BN_CHOICES = ("none",) + BN_KINDS + ("group",)      # 'group': GroupNorm in place of BN
BN_POSITIONS = ("before", "after")


def _leaf_layers(layers):
    """The layers in order, each composite layer replaced by its sub-layers (recursively)."""
    for layer in layers:
        yield from _leaf_layers(layer.sublayers()) if layer.sublayers() else (layer,)


class Network:
    """Layers in forward order; see ``build_model`` for how to make one."""

    def __init__(self, layers, config, backend, dtype, rng):
        # where the backend has the kernels: fused BN blocks, then each conv + its block as one
        self.layers = layers = fuse_layers(layers, backend)
        self.config = config
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.rng = rng                      # numpy Generator for dropout masks
        self.in_shape = tuple(config["in_shape"])
        # backward stops at the first layer with parameters: no one needs d loss / d input
        trainable = [i for i, layer in enumerate(layers) if layer.parameters()]
        self._backward_from = trainable[0] if trainable else len(layers)
        if trainable:
            layers[self._backward_from].need_input_grad = False

    def forward(self, x, training=True):
        """x: (N, *in_shape) on ``backend.xp`` (host arrays are moved) -> logits (N, classes).

        N = 0 is allowed: a rank with an empty shard still takes part in synchronised BN."""
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"input must have shape (N, {', '.join(map(str, self.in_shape))}); "
                             f"got {tuple(x.shape)}")
        x = self.backend.xp.asarray(x, dtype=self.dtype)
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, g_logits):
        """Back-propagate dL/dlogits (N, classes); fills (overwrites) every parameter's grad."""
        g = self.backend.xp.asarray(g_logits, dtype=self.dtype)
        for layer in reversed(self.layers[self._backward_from:]):
            g = layer.backward(g)

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def bn_layers(self):
        return [(layer.name, layer) for layer in _leaf_layers(self.layers)
                if isinstance(layer, BatchNorm)]

    def state_dict(self):
        """Host copies in PyTorch ``state_dict`` order, names and layouts."""
        state = {}
        for layer in _leaf_layers(self.layers):
            for p in layer.parameters():
                state[p.name] = to_host(p.data, copy=True)
            if isinstance(layer, BatchNorm):
                for key, value in layer.buffers():
                    state[key] = (np.array(value, dtype=np.int64) if isinstance(value, int)
                                  else to_host(value, copy=True))
        return state

    def load_state_dict(self, state):
        """Copy ``state`` (as from ``state_dict`` or a PyTorch module) into this model.

        Raises ValueError naming every missing, unexpected or mis-shaped key; nothing is changed
        then.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        misshaped = [f"{k} {tuple(np.shape(state[k]))} (expected {own[k].shape})"
                     for k in own if k in state and tuple(np.shape(state[k])) != own[k].shape]
        problems = [f"{what}: {', '.join(items)}" for what, items in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("wrong shapes", misshaped)) if items]
        if problems:
            raise ValueError("state does not fit this model (" + "; ".join(problems) + "); was it "
                             "saved from a model with the same config?")
        xp = self.backend.xp
        params = {p.name: p for p in self.parameters()}
        for name, bn in self.bn_layers():
            if bn.track_running_stats:
                bn.running_mean[...] = xp.asarray(np.asarray(state[f"{name}.running_mean"]))
                bn.running_var[...] = xp.asarray(np.asarray(state[f"{name}.running_var"]))
                bn.num_batches_tracked = int(np.asarray(state[f"{name}.num_batches_tracked"]))
        for name, p in params.items():
            p.data[...] = xp.asarray(np.asarray(state[name]), dtype=p.data.dtype)


# --- builders -----------------------------------------------------------------------------------

class _Builder:
    """Appends layers with PyTorch names; knows where BN goes and whether a bias is needed."""

    def __init__(self, cfg, backend, dtype, init_rng, dropout_rng, prefix=""):
        self.cfg, self.backend, self.dtype = cfg, backend, dtype
        self.init_rng, self.dropout_rng = init_rng, dropout_rng
        self.layers, self.bn_count, self.prefix = [], 0, prefix

    def nested(self, prefix):
        """A builder for a sub-module (names start with this one's prefix + ``prefix``)."""
        return _Builder(self.cfg, self.backend, self.dtype, self.init_rng, self.dropout_rng,
                        self.prefix + prefix)

    def _bn(self, channels):
        cfg = self.cfg
        self.bn_count += 1
        name = f"{self.prefix}bn{self.bn_count}"
        if cfg["bn"] == "group":
            return GroupNorm(name, channels, eps=cfg["bn_eps"], backend=self.backend,
                             dtype=self.dtype)
        return BatchNorm(name, channels, kind=cfg["bn"], backend=self.backend,
                         dtype=self.dtype, momentum=cfg["bn_momentum"], eps=cfg["bn_eps"],
                         ghost_batch_size=cfg["ghost_batch_size"], rmax=cfg["renorm_rmax"],
                         dmax=cfg["renorm_dmax"], track_running_stats=cfg["track_running_stats"])

    def block(self, make_layer, channels, dropout=False):
        """make_layer(bias) -> linear layer; then BN/ReLU in the configured order (+ dropout)."""
        use_bn = self.cfg["bn"] != "none"
        before = use_bn and self.cfg["bn_position"] == "before"
        self.layers.append(make_layer(not before))
        relu = ReLU(self.backend.xp, inplace=True)     # its input is a fresh, unshared array
        if use_bn:
            self.layers += [self._bn(channels), relu] if before else [relu, self._bn(channels)]
        else:
            self.layers.append(relu)
        if dropout and self.cfg["dropout"] > 0:
            self.layers.append(Dropout(self.cfg["dropout"], self.dropout_rng, self.backend.xp))

    def linear_norm(self, make_layer, channels):
        """make_layer(bias) and its BN, no ReLU (a residual branch's last layer, a projection)."""
        use_bn = self.cfg["bn"] != "none"
        self.layers.append(make_layer(not use_bn))
        if use_bn:
            self.layers.append(self._bn(channels))

    def conv(self, name, cin, cout, k, stride=1, padding=0):
        return lambda bias: Conv2d(self.prefix + name, cin, cout, k, stride=stride,
                                   padding=padding, bias=bias, rng=self.init_rng,
                                   backend=self.backend, dtype=self.dtype)

    def dense(self, name, fin, fout):
        return lambda bias: Dense(self.prefix + name, fin, fout, bias=bias, rng=self.init_rng,
                                  xp=self.backend.xp, dtype=self.dtype,
                                  ops=self.backend.conv_ops())


def _lenet5(b, in_shape, num_classes):
    channels, h, w = in_shape
    b.block(b.conv("conv1", channels, 6, 3), 6)
    b.layers.append(MaxPool2d(2, b.backend))
    h, w = (h - 2) // 2, (w - 2) // 2
    b.block(b.conv("conv2", 6, 16, 3), 16)
    b.layers.append(MaxPool2d(2, b.backend))
    h, w = (h - 2) // 2, (w - 2) // 2
    if h < 1 or w < 1:
        raise ValueError(f"lenet5 needs inputs of at least 10x10 pixels; got {in_shape}")
    b.layers.append(Flatten())
    b.block(b.dense("fc1", 16 * h * w, 120), 120, dropout=True)
    b.block(b.dense("fc2", 120, 84), 84, dropout=True)
    b.layers.append(b.dense("fc3", 84, num_classes)(True))


def _mlp(b, in_shape, num_classes, hidden):
    b.layers.append(Flatten())
    width = int(np.prod(in_shape))
    for i, units in enumerate(hidden, start=1):
        b.block(b.dense(f"fc{i}", width, units), units, dropout=True)
        width = units
    b.layers.append(b.dense(f"fc{len(hidden) + 1}", width, num_classes)(True))


def _check_config(cfg):
    checks = [("name", MODEL_NAMES), ("bn", BN_CHOICES), ("bn_position", BN_POSITIONS),
              ("dtype", ("float32", "float64")), ("init", INIT_SCHEMES)]
    for key, allowed in checks:
        if cfg[key] not in allowed:
            raise ValueError(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    if len(cfg["in_shape"]) != 3 or min(cfg["in_shape"]) < 1:
        raise ValueError(f"in_shape must be (channels, height, width); got {cfg['in_shape']}")
    if int(cfg["num_classes"]) < 2:
        raise ValueError(f"num_classes must be >= 2, got {cfg['num_classes']}")
    if not cfg["hidden"] or min(cfg["hidden"]) < 1:
        raise ValueError(f"hidden must list one or more positive widths, got {cfg['hidden']}")
    check_config(cfg)


def build_model(name, *, bn=defaults.BN, bn_position=defaults.BN_POSITION, backend=None, seed=0,
                num_classes=10, in_shape=(1, 28, 28), dropout=defaults.DROPOUT,
                ghost_batch_size=defaults.GHOST_BATCH_SIZE, bn_momentum=defaults.BN_MOMENTUM,
                bn_eps=defaults.BN_EPS, renorm_rmax=defaults.RENORM_RMAX,
                renorm_dmax=defaults.RENORM_DMAX, track_running_stats=True,
                hidden=defaults.MLP_HIDDEN, depth=defaults.DEPTH, width=defaults.WIDTH,
                dtype="float32", init=defaults.INIT):
    """Build a model of MODEL_NAMES; weights from Generators seeded by ``seed``.

    lenet5 (seed text): conv1 6@3x3, BN, ReLU, maxpool 2 -> conv2 16@3x3, BN, ReLU, maxpool 2 ->
    flatten -> fc1 120, BN, ReLU -> fc2 84, BN, ReLU -> fc3 num_classes (logits).
    mlp: flatten -> for each width in ``hidden``: fc, BN, ReLU -> fc num_classes.
    vgg8, plain (``depth`` convolutions, ``width``), resnet (``depth`` 6n+2, ``width``): see
    ``arraybn.nn.deep_models``; ``hidden``, ``depth`` and ``width`` apply where they are named.
    bn: 'none' | 'full' | 'mean-only' | 'ghost' | 'renorm' | 'group' (GroupNorm, see
    ``arraybn.nn.groupnorm``); bn_position 'before'/'after' the ReLU
    (a layer followed directly by BN has no bias). Dropout follows each hidden dense block.
    init: 'kaiming-uniform' (PyTorch's default) or 'kaiming-normal' (He et al. 2015, for deep
    nets without BN); see ``arraybn.nn.initialisation``.
    ``model.config`` records every argument except the backend.
    """
    config = dict(name=name, bn=bn, bn_position=bn_position, seed=int(seed),
                  num_classes=int(num_classes), in_shape=[int(s) for s in in_shape],
                  dropout=float(dropout), ghost_batch_size=int(ghost_batch_size),
                  bn_momentum=None if bn_momentum is None else float(bn_momentum),
                  bn_eps=float(bn_eps), renorm_rmax=float(renorm_rmax),
                  renorm_dmax=float(renorm_dmax), track_running_stats=bool(track_running_stats),
                  hidden=[int(h) for h in hidden], depth=int(depth), width=int(width),
                  dtype=np.dtype(dtype).name, init=init)
    _check_config(config)
    be = get_backend(backend)
    # streams of the seed: the layers' default init, dropout masks, a non-default init
    seeds = np.random.SeedSequence(config["seed"]).spawn(3)
    builder = _Builder(config, be, np.dtype(dtype), np.random.default_rng(seeds[0]),
                       np.random.default_rng(seeds[1]))
    if name == "lenet5":
        _lenet5(builder, tuple(config["in_shape"]), config["num_classes"])
    elif name == "mlp":
        _mlp(builder, tuple(config["in_shape"]), config["num_classes"], config["hidden"])
    else:
        build_deep(builder, name, tuple(config["in_shape"]), config["num_classes"],
                   config["depth"], config["width"])
    initialise(_leaf_layers(builder.layers), init, np.random.default_rng(seeds[2]), be.xp)
    return Network(builder.layers, config, be, dtype, builder.dropout_rng)
