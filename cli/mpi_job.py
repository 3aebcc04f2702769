"""Commands under ``mpiexec``/``srun``: the MPI world, and errors that end every rank.

Without an MPI launcher ``world()`` is None and ``ending_every_rank`` does nothing.
"""
import contextlib

import click

from arraybn.distributed import world

# Exit codes of a stage stopped by Ctrl-C or SIGTERM: every rank stops at the same step (the
# flag is agreed on in the step's all-reduce), so each exits by itself, after rank 0 saved.
INTERRUPTED_EXIT_CODES = (130, 143)


def mpi_world():
    """This job's ``MPICommunicator``, or None when the command runs as one process."""
    return world()


@contextlib.contextmanager
def ending_every_rank(comm):
    """Run the block; under MPI an error on this rank ends the whole job (``MPI_Abort``) with
    this rank's message: a user error's one line, any other error's traceback. Without this,
    the other ranks would wait in their next collective forever."""
    if comm is None:
        yield
        return
    interrupted = None
    with comm.abort_on_error():
        try:
            yield
        except click.ClickException as exc:
            if exc.exit_code not in INTERRUPTED_EXIT_CODES:
                comm.abort(exc.format_message(), exc.exit_code or 1)
            interrupted = exc
    if interrupted is not None:
        raise interrupted
