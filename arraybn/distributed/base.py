"""The communicator contract: what the BN core needs from a group of processes.

A communicator is one member (``rank`` out of ``size``) of a group that runs the same program.
Every collective (``allgather``, ``allreduce_sum``, ``barrier``, ``split``) must be called by
every member, in the same order, with arrays of the same shape: a rank with no data (an empty
shard) still takes part.

Results are bit-identical on every rank and reproducible from run to run: ``allreduce_sum``
gathers every rank's vector and adds them in rank order 0, 1, ..., K-1 on every rank. MPI's own
``Allreduce`` promises neither (its reduction order may differ between ranks and runs). The
vectors reduced here are per-channel statistics (a few KiB), so gathering them costs a
latency, not bandwidth.
"""
import abc

import numpy as np


class Communicator(abc.ABC):
    """One member of a group of processes (or, for tests, threads)."""

    rank = 0
    size = 1

    @abc.abstractmethod
    def _allgather(self, vector):
        """(size, len(vector)) float64: row r is rank r's vector."""

    @abc.abstractmethod
    def _split(self, group_size):
        """This rank's sub-communicator of ``group_size`` consecutive ranks."""

    @abc.abstractmethod
    def barrier(self):
        """Return once every rank has called it."""

    def allgather(self, array):
        """Every rank's ``array`` (host float64, same shape on all ranks), stacked along a new
        first axis in rank order; the same on every rank."""
        vector = _host_float64(array, "allgather")
        return self._allgather(vector.ravel()).reshape((self.size,) + vector.shape)

    def allreduce_sum(self, array):
        """The sum over ranks of ``array`` (host float64; several per-channel vectors may be
        stacked into one array to pay one latency), added in rank order: bit-identical on
        every rank."""
        gathered = self.allgather(array)
        total = gathered[0].copy()
        for row in gathered[1:]:
            total += row
        return total

    def split(self, group_size):
        """Sub-groups of ``group_size`` consecutive ranks (0..G-1, G..2G-1, ...); returns this
        rank's. Collective: every rank calls it with the same ``group_size``."""
        group_size = check_group_size(group_size, self.size)
        if group_size == self.size:
            return self
        return self._split(group_size)

    def __repr__(self):
        return f"<arraybn {type(self).__name__} rank {self.rank} of {self.size}>"


def check_group_size(group_size, size):
    """``group_size`` as an int that divides ``size``, or a ValueError saying which would."""
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group size must be a positive integer, got {group_size!r}")
    if size % int(group_size):
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise ValueError(f"group size {group_size} does not divide the {size} processes into "
                         f"equal groups of consecutive ranks; choose one of "
                         f"{', '.join(map(str, divisors))}")
    return int(group_size)


def _host_float64(array, what):
    if not isinstance(array, np.ndarray) or array.dtype != np.float64:
        raise TypeError(f"{what} takes a host (NumPy) float64 array, got "
                        f"{type(array).__name__} {getattr(array, 'dtype', '')}; convert it with "
                        "numpy.asarray(a, dtype=numpy.float64) (a CuPy array with a.get() first)")
    return np.ascontiguousarray(array)
