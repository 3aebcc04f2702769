"""An in-process communicator: K threads stand for K processes (unit tests, notebooks).

``run_ranks(size, fn)`` calls ``fn(comm)`` on ``size`` threads, each with its own
``ThreadCommunicator``, and returns their results in rank order. Collectives meet at a barrier;
``allreduce_sum`` adds in rank order like every communicator, so results are bit-identical across
ranks and runs. A rank that raises breaks the barriers, so the others stop at their next
collective instead of waiting forever, and ``run_ranks`` re-raises that rank's exception.
"""
import threading

import numpy as np

from arraybn.distributed.base import Communicator


class ThreadGroup:
    """The state the threads of one group share: a barrier and one slot per rank."""

    def __init__(self, size, timeout=120.0):
        self.size = size
        self.timeout = timeout
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size
        self._lock = threading.Lock()
        self._splits = {}            # group size -> [ThreadGroup, ...] of consecutive ranks

    def subgroups(self, group_size):
        with self._lock:                 # the first rank to ask creates them for everyone
            if group_size not in self._splits:
                self._splits[group_size] = [ThreadGroup(group_size, self.timeout)
                                            for _ in range(self.size // group_size)]
            return self._splits[group_size]

    def abort(self):
        """Break this group's barriers and its sub-groups': waiting ranks raise."""
        self.barrier.abort()
        with self._lock:
            children = [g for groups in self._splits.values() for g in groups]
        for child in children:
            child.abort()


class ThreadCommunicator(Communicator):
    """Rank ``rank`` of a ``ThreadGroup``; use it from that rank's thread only."""

    def __init__(self, group, rank):
        self._group = group
        self.rank, self.size = rank, group.size

    def _allgather(self, vector):
        group = self._group
        group.slots[self.rank] = vector.copy()
        group.barrier.wait()                 # every slot is written
        gathered = np.stack(group.slots)
        group.barrier.wait()                 # every rank has read them: slots may be reused
        return gathered

    def _split(self, group_size):
        subgroup = self._group.subgroups(group_size)[self.rank // group_size]
        return ThreadCommunicator(subgroup, self.rank % group_size)

    def barrier(self):
        self._group.barrier.wait()


def run_ranks(size, fn, timeout=120.0):
    """``[fn(comm) for each rank]``, the ranks running at the same time on ``size`` threads.

    If a rank raises, the others are released from their collectives and the exception of the
    lowest rank that failed first-hand (not merely from a broken barrier) is re-raised.
    """
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    group = ThreadGroup(int(size), timeout)
    results, errors = [None] * size, [None] * size

    def rank_main(rank):
        try:
            results[rank] = fn(ThreadCommunicator(group, rank))
        except BaseException as exc:           # noqa: BLE001 - handed back to the caller
            errors[rank] = exc
            group.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"arraybn-rank-{r}")
               for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [e for e in errors if e is not None]
    first_hand = [e for e in failed if not isinstance(e, threading.BrokenBarrierError)]
    if failed:
        raise (first_hand or failed)[0]
    return results
