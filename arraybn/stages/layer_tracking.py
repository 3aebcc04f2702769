"""Per-layer measurements during training (``--track-layers``): the quantities of the internal
covariate shift (ICS) debate, measured on the model being trained.

Every ``every`` steps (global steps 0, K, 2K, ...), before that step's update and on that step's
own batch (after augmentation, with the step's dropout masks), ``LayerTracker.measure`` records,
for each weight layer (Conv2d or Dense, in the order of the model's parameters):

``p15``, ``p50``, ``p85``
    Percentiles (numpy's linear interpolation) of the layer's pre-activation, the input of the
    ReLU that follows it: the BN output with BN before the ReLU, the conv/fc output with BN after
    it or without BN. Taken over ALL values of the batch (every unit or channel, position and
    image), not one unit as in Ioffe & Szegedy (2015, Fig. 1). Layers without a ReLU of their
    own (the logits layer, a residual branch's second convolution, whose ReLU follows the sum)
    have none.
``grad_norm``
    ``||G||``, G = d loss / d (the layer's weight) at the current parameters.
``ics_l2``, ``ics_cos``
    The ICS measure of Santurkar et al. (2018): ``||G - G'||`` and ``cos(G, G')``, where G' is
    the same gradient after the layers before this one take this step's update (the trainer's
    optimizer rule, lr and state; "before" = every parameter that precedes the layer's weight in
    the model's parameter order: earlier weights, biases and BN/GN scales and shifts), on the
    same batch with the same dropout masks. Not recorded for the first weight layer (no layer
    comes before it).

The measurement runs extra forward/backward passes in training mode (BN normalises with batch
statistics, fused blocks run their reference layers one by one) and then puts back everything
it touched: parameters, running statistics and their batch counts, the optimizer state and the
dropout generator, so a run trains bit-identically with or without tracking. Cost at a measured
step: 1 + (number of weight layers - 1) forward/backward passes and one optimizer step.
"""
import contextlib
import csv

import numpy as np

from arraybn.backends.arrays import to_host
from arraybn.core import NonFiniteStatisticsError
from arraybn.core.deferred import raise_deferred_errors
from arraybn.errors import ConfigError
from arraybn.nn.batchnorm import BatchNorm
from arraybn.nn.conv import Conv2d
from arraybn.nn.fused import FusedBNBlock
from arraybn.nn.layers import Dense, ReLU
from arraybn.stages.parallel import loss_share

PERCENTILES = (15, 50, 85)
METRICS = ("p15", "p50", "p85", "grad_norm", "ics_l2", "ics_cos")
FIELDS = ("step", "epoch", "layer", "metric", "value")
LAYERS_CSV = "layers.csv"
_STATE_PREFIX = "layers/"


def _walk(layers):
    """Every layer, composite ones (residual blocks, fused blocks) followed by their parts."""
    for layer in layers:
        yield layer
        yield from _walk(layer.sublayers())


def _leaves(layers):
    for layer in layers:
        yield from _leaves(layer.sublayers()) if layer.sublayers() else (layer,)


class _Tracked:
    """A weight layer: its name, weight, the ReLU after it (or None) and the parameters that
    come before its weight."""

    def __init__(self, layer, earlier):
        self.name, self.weight, self.earlier = layer.name, layer.weight, earlier
        self.relu = None


def tracked_layers(model):
    """The model's weight layers in parameter order, each with its ReLU and earlier parameters."""
    tracked, seen = [], []
    for leaf in _leaves(model.layers):
        if isinstance(leaf, (Conv2d, Dense)):
            tracked.append(_Tracked(leaf, list(seen)))
        elif isinstance(leaf, ReLU) and tracked and tracked[-1].relu is None:
            tracked[-1].relu = leaf
        seen += leaf.parameters()
    return tracked


class _Snapshot:
    """Everything a measurement pass changes, to put back afterwards."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = [(p, p.data.copy()) for p in model.parameters()]
        self.bns = [(bn, bn.running_mean.copy() if bn.running_mean is not None else None,
                     bn.running_var.copy() if bn.running_var is not None else None,
                     bn.num_batches_tracked)
                    for bn in _leaves(model.layers) if isinstance(bn, BatchNorm)]
        self.rng_state = model.rng.bit_generator.state
        self.optimizer_state = optimizer.state_dict()

    def restore_statistics(self):
        """Running statistics, batch counts and the dropout generator as they were."""
        for bn, mean, var, count in self.bns:
            if mean is not None:
                bn.running_mean[...] = mean
            if var is not None:
                bn.running_var[...] = var
            bn.num_batches_tracked = count
        self.model.rng.bit_generator.state = self.rng_state

    def restore_parameters(self):
        for p, data in self.params:
            p.data[...] = data          # in place: parameters may be views of a flat array

    def restore(self):
        self.restore_statistics()
        self.restore_parameters()
        self.optimizer.load_state_dict(self.optimizer_state)


@contextlib.contextmanager
def _reference_path(model):
    """Fused blocks run their layers one by one, so that every ReLU sees its input."""
    blocks = [layer for layer in _walk(model.layers) if isinstance(layer, FusedBNBlock)]
    before = [block.unfused for block in blocks]
    for block in blocks:
        block.unfused = True
    try:
        yield
    finally:
        for block, flag in zip(blocks, before):
            block.unfused = flag


@contextlib.contextmanager
def _observing_relus(tracked, record):
    """Within the block each tracked ReLU hands its input to ``record(name, x)`` before it runs
    (the ReLUs work in place and overwrite it)."""
    relus = [(layer.name, layer.relu) for layer in tracked if layer.relu is not None]

    def observed(name, relu):
        def forward(x, training):
            record(name, x)
            return type(relu).forward(relu, x, training)
        return forward

    for name, relu in relus:
        relu.forward = observed(name, relu)      # shadows the method for this instance only
    try:
        yield
    finally:
        for _, relu in relus:
            del relu.forward


def pre_activation_percentiles(x):
    """The PERCENTILES of all values of ``x`` (host float64)."""
    return np.percentile(to_host(x).astype(np.float64), PERCENTILES)


def _flat64(array):
    return to_host(array).astype(np.float64).ravel()


def gradient_shift(g, g_after):
    """``(||g - g_after||, cos(g, g_after))`` of two gradients (NaN cosine if one is zero)."""
    g, g_after = _flat64(g), _flat64(g_after)
    norms = np.linalg.norm(g) * np.linalg.norm(g_after)
    cos = float(g @ g_after / norms) if norms > 0 else float("nan")
    return float(np.linalg.norm(g - g_after)), cos


class LayerTracker:
    """Measures a model every ``every`` steps (see the module) and keeps the rows
    ``(step, epoch, layer, metric, value)``; ``state``/``restore`` carry them in checkpoints."""

    def __init__(self, model, every):
        self.model, self.every = model, int(every)
        self.layers = tracked_layers(model)
        self.rows = []

    def due(self, global_step):
        return global_step % self.every == 0

    def measure(self, optimizer, images, labels, n_global, step, epoch):
        """Record the measurements of global ``step`` (``epoch`` 1-based) on this batch
        (``images``/``labels`` on the model's backend). A batch whose loss or statistics are
        not finite records nothing: the training step reports it."""
        snapshot = _Snapshot(self.model, optimizer)
        rows = []
        try:
            with _reference_path(self.model):
                rows = self._measurements(optimizer, images, labels, n_global, snapshot)
        except (FloatingPointError, NonFiniteStatisticsError):
            rows = []
        finally:
            snapshot.restore()
        self.rows += [(step, epoch, layer, metric, value) for layer, metric, value in rows]

    def _measurements(self, optimizer, images, labels, n_global, snapshot):
        percentiles = {}

        def record(name, x):
            percentiles[name] = pre_activation_percentiles(x)

        with _observing_relus(self.layers, record):
            grads = self._gradients(images, labels, n_global)
        rows = [(name, f"p{q}", float(value)) for name, values in percentiles.items()
                for q, value in zip(PERCENTILES, values)]
        rows += [(layer.name, "grad_norm", float(np.linalg.norm(g)))
                 for layer, g in zip(self.layers, grads)]
        optimizer.step()                            # the step's update of every parameter
        updated = {id(p): p.data.copy() for p, _ in snapshot.params}
        snapshot.restore_parameters()
        for layer, g in list(zip(self.layers, grads))[1:]:
            for p in layer.earlier:
                p.data[...] = updated[id(p)]
            snapshot.restore_statistics()
            g_after = self._gradients(images, labels, n_global, only=layer)
            l2, cos = gradient_shift(g, g_after)
            rows += [(layer.name, "ics_l2", l2), (layer.name, "ics_cos", cos)]
        return rows

    def _gradients(self, images, labels, n_global, only=None):
        """One forward/backward pass; host float64 copies of the weight gradients (of
        ``only``'s alone when given)."""
        model = self.model
        logits = model.forward(images, training=True)
        raise_deferred_errors(model.backend)
        _, g_logits = loss_share(logits, labels, n_global, model.backend.conv_ops())
        model.backward(g_logits)
        if only is not None:
            return _flat64(only.weight.grad)
        return [_flat64(layer.weight.grad) for layer in self.layers]

    # --- checkpoints and the CSV --------------------------------------------------------------

    def state(self):
        """The rows as arrays for a checkpoint .npz (keys 'layers/<field>')."""
        columns = list(zip(*self.rows)) if self.rows else [()] * len(FIELDS)
        types = (np.int64, np.int64, np.str_, np.str_, np.float64)
        return {_STATE_PREFIX + field: np.asarray(column, dtype=kind)
                for field, column, kind in zip(FIELDS, columns, types)}

    def restore(self, arrays):
        """Continue the rows of a checkpoint (none in one made without tracking)."""
        if _STATE_PREFIX + FIELDS[0] not in arrays:
            self.rows = []
            return
        columns = [arrays[_STATE_PREFIX + field].tolist() for field in FIELDS]
        self.rows = [tuple(row) for row in zip(*columns)]


def write_layers_csv(path, rows):
    """The rows ``(step, epoch, layer, metric, value)`` as CSV (values round-trip exactly)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows((step, epoch, layer, metric, repr(float(value)))
                         for step, epoch, layer, metric, value in rows)


def read_layers_csv(path):
    """``{metric: {layer: (steps, values)}}`` from a layers.csv, layers in file order."""
    table = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            steps, values = table.setdefault(row["metric"], {}).setdefault(row["layer"],
                                                                           ([], []))
            steps.append(int(row["step"]))
            values.append(float(row["value"]))
    return table


def tracking_record(tracker):
    """What the train manifest says about the measurements in layers.csv."""
    return {"file": LAYERS_CSV, "every": tracker.every, "percentiles": list(PERCENTILES),
            "percentiles_over": "all values of the batch at the ReLU's input",
            "metrics": list(METRICS), "layers": [layer.name for layer in tracker.layers]}


def check_tracking_world(config, comm):
    """--track-layers measures one process's gradients: refuse it for data-parallel training."""
    if config.track_layers and comm is not None and comm.size > 1:
        raise ConfigError(f"--track-layers measures gradients on one process; under mpiexec "
                          f"({comm.size} processes) train without it, or track the same run "
                          f"on one process (it gives the same model)")
