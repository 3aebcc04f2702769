"""Naive, obviously correct float64 BN formulas that every backend is compared against.

Written straight from the papers, one sample axis list at a time; no shared code with arraybn.
"""
import math

import numpy as np


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _bc(v, x):
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


def moments(x):
    """Per-channel mean and biased variance of x (N, C, *spatial) from correctly rounded sums."""
    channels = np.moveaxis(np.asarray(x, np.float64), 1, 0).reshape(x.shape[1], -1)
    mean = np.array([math.fsum(values.tolist()) / values.size for values in channels])
    var = np.array([math.fsum(((values - mu) ** 2).tolist()) / values.size
                    for values, mu in zip(channels, mean)])
    return mean, var


def bn_train(x, gamma, beta, eps, mean_only=False):
    x = np.asarray(x, np.float64)
    mu, var = moments(x)
    if mean_only:
        return _bc(gamma, x) * (x - _bc(mu, x)) + _bc(beta, x), mu, var
    xhat = (x - _bc(mu, x)) / np.sqrt(_bc(var, x) + eps)
    return _bc(gamma, x) * xhat + _bc(beta, x), mu, var


def bn_infer(x, gamma, beta, mean, var, eps, mean_only=False):
    x = np.asarray(x, np.float64)
    if mean_only:
        return _bc(gamma, x) * (x - _bc(mean, x)) + _bc(beta, x)
    return _bc(gamma, x) * (x - _bc(mean, x)) / np.sqrt(_bc(var, x) + eps) + _bc(beta, x)


def bn_renorm(x, gamma, beta, run_mean, run_var, eps, rmax, dmax):
    x = np.asarray(x, np.float64)
    mu, var = moments(x)
    sigma = np.sqrt(var + eps)
    sigma_run = np.sqrt(np.asarray(run_var, np.float64) + eps)
    r = np.clip(sigma / sigma_run, 1 / rmax, rmax)
    d = np.clip((mu - run_mean) / sigma_run, -dmax, dmax)
    xhat = (x - _bc(mu, x)) / _bc(sigma, x) * _bc(r, x) + _bc(d, x)
    return _bc(gamma, x) * xhat + _bc(beta, x)


def bn_ghost(x, gamma, beta, eps, ghost, mean_only=False):
    n = x.shape[0]
    parts = np.array_split(np.asarray(x, np.float64), -(-n // ghost))
    return np.concatenate([bn_train(p, gamma, beta, eps, mean_only)[0] for p in parts])


def bn_train_backward(x, gamma, gy, eps, mean_only=False):
    """Textbook (Ioffe & Szegedy 2015, eq. after Alg. 1) backward of bn_train."""
    x, gy = np.asarray(x, np.float64), np.asarray(gy, np.float64)
    axes = _axes(x)
    m = x.size // x.shape[1]
    mu, var = moments(x)
    xc = x - _bc(mu, x)
    if mean_only:
        gx = _bc(gamma, x) * (gy - _bc(gy.mean(axis=axes), x))
        return gx, (gy * xc).sum(axis=axes), gy.sum(axis=axes)
    inv = 1 / np.sqrt(var + eps)
    xhat = xc * _bc(inv, x)
    gxhat = gy * _bc(gamma, x)
    gvar = (gxhat * xc).sum(axis=axes) * -0.5 * inv ** 3
    gmu = -(gxhat * _bc(inv, x)).sum(axis=axes) + gvar * (-2 * xc).mean(axis=axes)
    gx = gxhat * _bc(inv, x) + _bc(gvar, x) * 2 * xc / m + _bc(gmu, x) / m
    return gx, (gy * xhat).sum(axis=axes), gy.sum(axis=axes)
