"""Seeded mini-batch order: a fresh shuffle each epoch that depends only on (seed, epoch).

Because the order is a pure function of the seed and the epoch number, training that resumes
in the middle of an epoch sees exactly the batches it would have seen without the interruption.
"""
import numpy as np

from arraybn.errors import ConfigError


def epoch_order(n, seed, epoch, shuffle=True):
    """The sample order of ``epoch``: a permutation of ``range(n)`` (identity without shuffle)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, 2, epoch]).permutation(n)


def num_batches(n, batch_size, drop_last):
    """How many batches ``batch_indices`` yields for ``n`` samples."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_indices(n, batch_size, *, seed=0, epoch=0, shuffle=True, drop_last=False, start=0):
    """Yield index arrays of the batches of one epoch, from batch number ``start`` on.

    ``drop_last`` leaves out a final batch smaller than ``batch_size`` (training: every BN batch
    has the same size).
    """
    count = num_batches(n, batch_size, drop_last)
    if count == 0:
        raise ConfigError(f"batch size {batch_size} is larger than the {n} samples available; "
                         "use a smaller --batch-size")
    order = epoch_order(n, seed, epoch, shuffle)
    for b in range(start, count):
        yield order[b * batch_size:(b + 1) * batch_size]


def step_rng(seed, epoch, step, stream=3):
    """A generator for the random choices of one training step (e.g. augmentation)."""
    return np.random.default_rng([seed, stream, epoch, step])
