"""Per-channel moments as (count, mean, M2), merged with Chan et al.'s parallel formula.

M2 is the sum of squared deviations from the mean (biased variance = M2 / count). Merging two
sets' moments never forms sums of squares, so offset data (``1e4 + N(0, 1)`` in float32) keeps its
variance, and an empty set (count 0) merges exactly. Used by the exact population estimator
(batch after batch) and by the BN core under a communicator (rank after rank).
"""
import numpy as np


def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """(count, mean, M2) of the union of sets a and b, per channel, from each one's moments.

    Counts are numbers (the same for every channel); means and M2 are float64 (C,) arrays.
    Set a with count 0 returns b's moments exactly; both empty is the caller's to avoid.
    """
    total = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / total)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / total)
    return total, mean, m2


def group_moments(comm, count, mean, m2):
    """The whole group's (count, mean, M2) from this rank's, identical on every rank.

    ``mean`` and ``m2`` are host float64 (C,) arrays (any values when ``count`` is 0: an empty
    rank still takes part); one ``allgather``, then Chan merges in rank order. The group's count
    is 0, and mean and M2 zeros, when every rank is empty.
    """
    channels = mean.shape[0]
    local = np.concatenate(([float(count)], _zero_if_empty(count, mean),
                            _zero_if_empty(count, m2)))
    gathered = comm.allgather(local)
    total, group_mean, group_m2 = 0, np.zeros(channels), np.zeros(channels)
    for row in gathered:
        rank_count = int(row[0])
        if rank_count:
            total, group_mean, group_m2 = chan_merge(total, group_mean, group_m2, rank_count,
                                                     row[1:1 + channels], row[1 + channels:])
    return total, group_mean, group_m2


def _zero_if_empty(count, values):
    return np.zeros(values.shape[0]) if count == 0 else np.asarray(values, dtype=np.float64)
