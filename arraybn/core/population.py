"""Population statistics for the post-processing stage: fed batches, they return ``(mean, var)``.

- ``ExactStatistics``: the mean and (biased) variance of all values seen, merged per batch with
  Chan's parallel formula in float64; batch order and batch size do not change the result.
- ``AverageStatistics``: the equal-weight average of per-batch means and unbiased variances, what
  PyTorch's ``momentum=None`` and ``torch.optim.swa_utils.update_bn`` store.
- ``EMAStatistics``: ``s = decay * s + (1 - decay) * s_batch`` from given initial values, averaging
  either the variance or, as the first seed text does, the standard deviation.
"""
from arraybn.backends import backend_for
from arraybn.core import validation as v
from arraybn.core.moments import chan_merge


class PopulationStatistics:
    """Base class: ``update(x)`` with batches of shape (N, C, *spatial), then ``result()``."""

    def __init__(self, backend=None):
        self._backend = backend
        self.batches = 0
        self.count = 0              # values per channel seen

    def update(self, x):
        be = backend_for(x, self._backend)
        x3 = v.as_nc_m(x, be.xp)
        n = x3.shape[0] * x3.shape[2]
        mean, var = be.moments(x3)
        v.check_finite(be.xp, [mean, var], "batch statistics")
        self._merge(be.xp, n, mean, var)
        self.batches += 1
        self.count += n
        return self

    def result(self):
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

    def _result(self):
        return self._mean, self._m2 / self.count


class AverageStatistics(PopulationStatistics):
    def __init__(self, backend=None):
        super().__init__(backend)
        self._mean_sum = self._var_sum = None

    def _merge(self, xp, n, mean, var):
        if n < 2:
            raise ValueError("AverageStatistics needs more than one value per channel in each batch "
                             "(it averages unbiased batch variances)")
        unbiased = var * (n / (n - 1))
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
        batch_var = var * (n / (n - 1)) if n > 1 else var
        batch_scale = xp.sqrt(batch_var) if self.stat == "std" else batch_var
        self._mean = self.decay * self._mean + (1.0 - self.decay) * mean
        self._scale = self.decay * self._scale + (1.0 - self.decay) * batch_scale

    def _result(self):
        return self._mean, (self._scale ** 2 if self.stat == "std" else self._scale)


ESTIMATORS = {"exact": ExactStatistics, "average": AverageStatistics, "ema": EMAStatistics}


def make_estimator(method="exact", **options):
    """An estimator by name: 'exact', 'average' or 'ema' (options: decay, stat, init_mean, init_scale)."""
    try:
        cls = ESTIMATORS[method]
    except KeyError:
        raise ValueError(f"unknown statistics method {method!r}; choose "
                         f"{', '.join(ESTIMATORS)}") from None
    return cls(**options)
