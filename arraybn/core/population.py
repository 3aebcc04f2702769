"""Population statistics for the post-processing stage: fed batches, they return ``(mean, var)``.

Every estimator returns ``var`` in the running buffers' convention, the unbiased one (what
training's running statistics, PyTorch and Chainer store), so it can replace ``running_var`` as
is: after one batch of n values per channel, ``var = x.var() * n / (n - 1)``.

- ``ExactStatistics``: the mean and unbiased variance ``M2 / (count - 1)`` of all values seen
  (count over every batch), merged per batch with Chan's parallel formula in float64; batch order
  and batch size do not change the result. ``torch.var(all_values, unbiased=True)``.
- ``AverageStatistics``: the equal-weight average of per-batch means and unbiased variances, what
  PyTorch's ``momentum=None`` and ``torch.optim.swa_utils.update_bn`` store.
- ``EMAStatistics``: ``s = decay * s + (1 - decay) * s_batch`` from given initial values, averaging
  either the unbiased batch variance or, as the first seed text does, its square root (the
  standard deviation; ``result()`` returns its square).

An empty batch (N = 0) changes nothing; a batch must keep the channel count of the first one.
"""
import numpy as np

from arraybn.backends import backend_for
from arraybn.backends.arrays import to_host
from arraybn.core import validation as v
from arraybn.core.moments import chan_merge


class PopulationStatistics:
    """Base class: ``update(x)`` with batches of shape (N, C, *spatial), then ``result()``."""

    def __init__(self, backend=None):
        self._backend = backend
        self.batches = 0
        self.count = 0              # values per channel seen
        self.channels = None        # set by the first batch

    def update(self, x):
        """Add the batch ``x``, of shape (N, C, *spatial); an empty batch changes nothing."""
        v.check_array(x, "x")
        be = backend_for(x, self._backend)
        x3 = v.as_nc_m(x, be.xp)
        self._check_channels(x3.shape[1])
        n = x3.shape[0] * x3.shape[2]
        if n == 0:
            return self
        mean, var = be.moments(x3)
        v.check_finite(be.xp, [mean, var], "batch statistics")
        self._merge(be.xp, n, mean, var)
        self.batches += 1
        self.count += n
        return self

    def _check_channels(self, channels):
        if self.channels is None:
            self.channels = channels
        elif channels != self.channels:
            raise ValueError(f"{type(self).__name__} was started with {self.channels} channels and "
                             f"got {channels}; use one estimator per BN layer")

    def result(self):
        """``(mean, var)``, float64 (C,), var unbiased like the running buffers."""
        if self.batches == 0:
            raise ValueError(f"{type(self).__name__} has seen no batch; call update(x) first")
        return self._result()


class ExactStatistics(PopulationStatistics):
    def __init__(self, backend=None):
        super().__init__(backend)
        self._mean = self._m2 = None

    def _merge(self, xp, n, mean, var):
        m2 = var * n
        if self._mean is None:
            self._mean, self._m2 = mean, m2
            return
        _, self._mean, self._m2 = chan_merge(self.count, self._mean, self._m2, n, mean, m2)

    def moments(self):
        """``(count, mean, M2)`` so far, host float64 (zeros before any value): what
        ``arraybn.core.moments.group_moments`` merges over a communicator's ranks."""
        if self._mean is None:
            return 0, np.zeros(self.channels or 0), np.zeros(self.channels or 0)
        return self.count, *(to_host(a, np.float64) for a in (self._mean, self._m2))

    def _result(self):
        if self.count < 2:
            raise ValueError(f"ExactStatistics needs at least two values per channel for an "
                             f"unbiased variance; it has seen {self.count}")
        return self._mean, self._m2 / (self.count - 1)


class AverageStatistics(PopulationStatistics):
    def __init__(self, backend=None):
        super().__init__(backend)
        self._mean_sum = self._var_sum = None

    def _merge(self, xp, n, mean, var):
        unbiased = _unbiased(var, n, "AverageStatistics")
        if self._mean_sum is None:
            self._mean_sum, self._var_sum = mean.copy(), unbiased
        else:
            self._mean_sum += mean
            self._var_sum += unbiased

    def _result(self):
        return self._mean_sum / self.batches, self._var_sum / self.batches


class EMAStatistics(PopulationStatistics):
    """Exponential moving average; ``stat='std'`` averages standard deviations (the seed text)."""

    def __init__(self, decay=0.9, stat="var", init_mean=0.0, init_scale=1.0, backend=None):
        super().__init__(backend)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if stat not in ("var", "std"):
            raise ValueError(f"stat must be 'var' or 'std', got {stat!r}")
        self.decay, self.stat = float(decay), stat
        self._init = (float(init_mean), float(init_scale))
        self._mean = self._scale = None

    def _merge(self, xp, n, mean, var):
        if self._mean is None:
            self._mean = xp.full(mean.shape, self._init[0])
            self._scale = xp.full(mean.shape, self._init[1])
        batch_var = _unbiased(var, n, "EMAStatistics")
        batch_scale = xp.sqrt(batch_var) if self.stat == "std" else batch_var
        self._mean = self.decay * self._mean + (1.0 - self.decay) * mean
        self._scale = self.decay * self._scale + (1.0 - self.decay) * batch_scale

    def _result(self):
        return self._mean, (self._scale ** 2 if self.stat == "std" else self._scale)


def _unbiased(var, n, estimator):
    if n < 2:
        raise ValueError(f"{estimator} needs more than one value per channel in each batch "
                         "(it averages unbiased batch variances)")
    return var * (n / (n - 1))


ESTIMATORS = {"exact": ExactStatistics, "average": AverageStatistics, "ema": EMAStatistics}


def make_estimator(method="exact", **options):
    """An estimator by name: 'exact', 'average' or 'ema'.

    Options (ema only): decay, stat, init_mean, init_scale; any estimator takes backend.
    """
    try:
        cls = ESTIMATORS[method]
    except KeyError:
        raise ValueError(f"unknown statistics method {method!r}; choose "
                         f"{', '.join(ESTIMATORS)}") from None
    return cls(**options)
