"""Group normalization (Wu & He 2018): per-sample statistics over groups of channels.

Unlike BN, GN does not look across the batch: for each sample the C channels are split into G
groups of C/G consecutive channels, and each group is normalized over its channels and spatial
positions with its own mean and biased variance, then scaled and shifted per channel:
``y = gamma[c] * (x - mean[n, g]) / sqrt(var[n, g] + eps) + beta[c]`` (``torch.nn.GroupNorm``).
Training and inference compute the same thing, so there are no running statistics.

Groups: the largest divisor of C that is at most 32 (``default_groups``). That is Wu & He's
default G = 32 whenever 32 divides C (every layer of vgg8, resnet's 32- and 64-channel stages),
and G = C (one channel per group, like instance normalization) when C <= 32.

Numerics as for BN: the mean and variance accumulate in float64 and the variance is two-pass
(a corrected two-pass: the mean of the centred values is subtracted again), so float32 inputs
like ``1e4 + N(0, 1)`` keep their variance.
"""
import numpy as np

from arraybn.core import NonFiniteStatisticsError
from arraybn.nn import defaults
from arraybn.nn.layers import Layer, Parameter

MAX_GROUPS = 32


def default_groups(channels):
    """The largest divisor of ``channels`` that is at most 32 (Wu & He's G = 32 when it fits)."""
    return max(g for g in range(1, min(channels, MAX_GROUPS) + 1) if channels % g == 0)


def _per_channel(v, ndim):
    """(C,) -> (1, C, 1, ...) broadcasting against an (N, C, *spatial) array of ``ndim`` axes."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def group_norm_forward(x, gamma, beta, groups, eps, xp):
    """x: (N, C, *spatial), gamma/beta: (C,) -> (y like x, cache).

    Statistics per (sample, group) over C/groups channels times the spatial positions.
    Raises NonFiniteStatisticsError when a group's mean or variance is not finite.
    """
    n, c = x.shape[:2]
    x3 = x.reshape(n, groups, -1)
    mean = x3.mean(axis=2, dtype=np.float64, keepdims=True)
    xc = x3 - mean.astype(x.dtype)
    residual = xc.mean(axis=2, dtype=np.float64, keepdims=True)
    var = (xc * xc).mean(axis=2, dtype=np.float64, keepdims=True) - residual * residual
    if not bool(xp.isfinite(mean).all() & xp.isfinite(var).all()):
        raise NonFiniteStatisticsError("a group's mean or variance is NaN or infinite; the "
                                       "input holds non-finite values (diverged training?)")
    inv_std = (1.0 / xp.sqrt(var + eps)).astype(x.dtype)
    xc -= residual.astype(x.dtype)
    x_hat = xc * inv_std
    y = x_hat.reshape(x.shape) * _per_channel(gamma, x.ndim) + _per_channel(beta, x.ndim)
    return y, (x_hat, inv_std, gamma, x.shape)


def group_norm_backward(gy, cache):
    """gy: like x -> (gx like x, ggamma (C,), gbeta (C,))."""
    x_hat, inv_std, gamma, shape = cache
    n, groups = x_hat.shape[:2]
    axes = (0,) + tuple(range(2, len(shape)))
    gbeta = gy.sum(axis=axes)
    ggamma = (gy * x_hat.reshape(shape)).sum(axis=axes)
    g_hat = (gy * _per_channel(gamma, len(shape))).reshape(n, groups, -1)
    mean_g = g_hat.mean(axis=2, dtype=np.float64, keepdims=True).astype(gy.dtype)
    mean_gx = (g_hat * x_hat).mean(axis=2, dtype=np.float64, keepdims=True).astype(gy.dtype)
    gx = inv_std * (g_hat - mean_g - x_hat * mean_gx)
    return gx.reshape(shape), ggamma, gbeta


class GroupNorm(Layer):
    """``torch.nn.GroupNorm(groups, channels, eps)``: weight (C,) ones, bias (C,) zeros.

    groups: None picks ``default_groups(channels)``; otherwise it must divide ``channels``.
    Input (N, C) (features after a dense layer) or (N, C, *spatial); each group must hold at
    least two values, or every output would be just ``beta``.
    """

    def __init__(self, name, channels, *, groups=None, eps=defaults.BN_EPS, backend,
                 dtype=np.float32):
        groups = default_groups(channels) if groups is None else int(groups)
        if groups < 1 or channels % groups:
            raise ValueError(f"{name}: group normalization needs a number of groups that "
                             f"divides the {channels} channels; got {groups}")
        if not eps > 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps}")
        self.name, self.groups, self.eps = name, groups, float(eps)
        self.xp = backend.xp
        self.weight = Parameter(f"{name}.weight", self.xp.ones(channels, dtype=dtype))
        self.bias = Parameter(f"{name}.bias", self.xp.zeros(channels, dtype=dtype))

    @property
    def num_channels(self):
        return self.weight.data.shape[0]

    def parameters(self):
        return [self.weight, self.bias]

    def _check_input(self, x):
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"{self.name}: group normalization expects input (N, "
                             f"{self.num_channels}, ...); got shape {tuple(x.shape)}")
        values = (self.num_channels // self.groups) * int(np.prod(x.shape[2:], dtype=np.int64))
        if values < 2:
            raise ValueError(f"{self.name}: each of the {self.groups} groups holds a single "
                             f"value (input {tuple(x.shape)}), so it normalizes to 0; use fewer "
                             "groups or normalize a layer with more values per group")

    def forward(self, x, training):
        self._check_input(x)
        try:
            y, self._cache = group_norm_forward(x, self.weight.data, self.bias.data,
                                                self.groups, self.eps, self.xp)
        except NonFiniteStatisticsError as exc:
            raise exc.located(self.name) from None
        return y

    def backward(self, gy):
        gx, self.weight.grad, self.bias.grad = group_norm_backward(gy, self._take_cache())
        return gx
