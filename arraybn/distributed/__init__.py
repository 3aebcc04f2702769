"""Communicators for data-parallel BN: K processes (or, in tests, threads) share statistics.

- ``Communicator``: the contract (``rank``, ``size``, ``allgather``, ``allreduce_sum``,
  ``barrier``, ``split``); every reduction adds in rank order, bit-identical on every rank.
- ``MPICommunicator``: over mpi4py (imported lazily), with ``abort_on_error()``; ``world()``
  returns one when an MPI launcher started this process, else None.
- ``run_ranks`` / ``ThreadCommunicator``: K threads in one process, for tests.
"""
from arraybn.distributed.base import Communicator, check_group_size
from arraybn.distributed.mpi import MPICommunicator, import_mpi, launched_size, world
from arraybn.distributed.threads import ThreadCommunicator, ThreadGroup, run_ranks

__all__ = ["Communicator", "check_group_size", "MPICommunicator", "import_mpi",
           "launched_size", "world", "ThreadCommunicator", "ThreadGroup", "run_ranks"]
