"""The BatchNorm layer: parameters and running statistics around ``arraybn.batch_norm_forward``.

Per-feature after a Dense layer (input (N, C)), per-channel after a convolution (input
(N, C, H, W)); the core decides from the input's shape. Every variant goes through the core:

=============  ====================================================================
bn             core call in training
=============  ====================================================================
"full"         variant="full"
"mean-only"    variant="mean_only" (running_var is kept but never updated)
"ghost"        variant="full", ghost_batch_size=...
"renorm"       variant="full", renorm=True, rmax=..., dmax=...
=============  ====================================================================
"""
import contextlib

import numpy as np

from arraybn.core import NonFiniteStatisticsError, batch_norm_backward, batch_norm_forward
from arraybn.nn import defaults
from arraybn.nn.layers import Layer, Parameter

BN_KINDS = ("full", "mean-only", "ghost", "renorm")
EVAL_STATS = ("running", "batch")


class BatchNorm(Layer):
    """Batch normalization over ``num_features`` channels, PyTorch semantics.

    momentum: running = (1 - momentum) * running + momentum * batch; None gives the cumulative
        (equal-weight) average over the batches seen, like PyTorch's ``momentum=None``.
    track_running_stats=False: no running buffers; every forward normalizes with batch statistics.
    eval_stats: what ``forward(training=False)`` normalizes with: "running" or "batch".
    ``use_statistics(mean, var)`` sets the statistics inference uses (post-processing);
    ``with observing(callback):`` shows every input to ``callback`` before it is normalized.
    """

    def __init__(self, name, num_features, *, kind=defaults.BN, backend, dtype=np.float32,
                 momentum=defaults.BN_MOMENTUM, eps=defaults.BN_EPS,
                 ghost_batch_size=defaults.GHOST_BATCH_SIZE, rmax=defaults.RENORM_RMAX,
                 dmax=defaults.RENORM_DMAX, track_running_stats=True, comm=None):
        if kind not in BN_KINDS:
            raise ValueError(f"{name}: unknown BN kind {kind!r}; "
                             f"choose one of {', '.join(BN_KINDS)}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        if kind == "renorm" and not track_running_stats:
            raise ValueError(f"{name}: batch renormalization needs running statistics; "
                             "use track_running_stats=True")
        if kind == "ghost" and momentum is None:
            raise ValueError(f"{name}: momentum=None (cumulative average) is not defined for ghost "
                             "batches, which update the running statistics once per ghost batch; "
                             "give a momentum in (0, 1]")
        self.name, self.kind, self.backend = name, kind, backend
        xp = backend.xp
        self.momentum, self.eps = momentum, float(eps)
        self.ghost_batch_size, self.rmax, self.dmax = ghost_batch_size, float(rmax), float(dmax)
        self.weight = Parameter(f"{name}.weight", xp.ones(num_features, dtype=dtype))
        self.bias = Parameter(f"{name}.bias", xp.zeros(num_features, dtype=dtype))
        self.track_running_stats = bool(track_running_stats)
        self.running_mean = self.running_var = None
        if self.track_running_stats:
            self.running_mean = xp.zeros(num_features, dtype=dtype)
            self.running_var = xp.ones(num_features, dtype=dtype)
        self.num_batches_tracked = 0
        self._eval_stats = "running"
        self._observer = None
        self.comm = None
        self.set_communicator(comm)

    def set_communicator(self, comm):
        """Compute batch statistics over the group of processes of ``comm`` (an
        ``arraybn.distributed`` communicator; None: this process's batch alone). Applies to
        training and to inference with ``eval_stats='batch'``; ghost batches are local by
        definition and refuse a communicator."""
        if comm is not None and self.kind == "ghost":
            raise ValueError(f"{self.name}: ghost batches are local by definition and cannot "
                             "take a communicator; use comm=None (each rank's ghost batches)")
        self.comm = comm

    @property
    def num_features(self):
        return self.weight.data.shape[0]

    @property
    def eval_stats(self):
        return self._eval_stats

    @eval_stats.setter
    def eval_stats(self, value):
        if value not in EVAL_STATS:
            raise ValueError(f"{self.name}: eval_stats must be 'running' or 'batch', got {value!r}")
        self._eval_stats = value

    def use_statistics(self, mean, var):
        """Normalize with ``mean``/``var`` (unbiased, one value per channel) in inference.

        They become the running buffers, copied in the layer's dtype, also for a layer made
        without running statistics; ``eval_stats`` becomes "running".
        """
        xp, dtype = self.backend.xp, self.weight.data.dtype
        mean, var = xp.asarray(mean, dtype=dtype), xp.asarray(var, dtype=dtype)
        if mean.shape != (self.num_features,) or var.shape != (self.num_features,):
            raise ValueError(f"{self.name}: statistics must hold one value for each of the "
                             f"{self.num_features} channels; got mean {mean.shape} and var "
                             f"{var.shape}")
        self.track_running_stats = True
        self.running_mean, self.running_var = mean.copy(), var.copy()
        self.eval_stats = "running"

    @contextlib.contextmanager
    def observing(self, callback):
        """Within the block every ``forward`` first calls ``callback(x)`` with its input
        (e.g. ``PopulationStatistics.update``); the callback is dropped on leaving, also on
        an error."""
        self._observer = callback
        try:
            yield self
        finally:
            self._observer = None

    def parameters(self):
        return [self.weight, self.bias]

    def buffers(self):
        """[(state_dict key, value)] of the running statistics (empty when not tracked)."""
        if not self.track_running_stats:
            return []
        return [(f"{self.name}.running_mean", self.running_mean),
                (f"{self.name}.running_var", self.running_var),
                (f"{self.name}.num_batches_tracked", self.num_batches_tracked)]

    def forward(self, x, training):
        if self._observer is not None:
            self._observer(x)
        try:
            with self.backend.labelled(self.name):    # names a GPU backend's deferred failures
                y, self._cache = batch_norm_forward(x, self.weight.data, self.bias.data,
                                                    backend=self.backend,
                                                    **self._core_options(training))
        except NonFiniteStatisticsError as exc:
            raise exc.located(self.name) from None
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from exc
        if training and self.track_running_stats:
            self.num_batches_tracked += 1
        return y

    def _core_options(self, training):
        variant = "mean_only" if self.kind == "mean-only" else "full"
        if not training:
            use_running = self.track_running_stats and self._eval_stats == "running"
            return dict(training=not use_running, variant=variant, eps=self.eps,
                        running_mean=self.running_mean if use_running else None,
                        running_var=self.running_var if use_running else None,
                        comm=None if use_running else self.comm)
        momentum = self.momentum
        if momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        options = dict(training=True, variant=variant, eps=self.eps, momentum=momentum,
                       running_mean=self.running_mean, running_var=self.running_var,
                       comm=self.comm)
        if self.kind == "ghost":
            options["ghost_batch_size"] = self.ghost_batch_size
        elif self.kind == "renorm":
            options.update(renorm=True, rmax=self.rmax, dmax=self.dmax)
        return options

    def backward(self, gy):
        gx, self.weight.grad, self.bias.grad = batch_norm_backward(gy, self._take_cache())
        return gx
