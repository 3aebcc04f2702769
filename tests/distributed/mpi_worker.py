"""Run by ``test_mpi.py`` under ``mpiexec -n K python -m tests.distributed.mpi_worker MODE``.

check SIZES: rank r takes SIZES[r] consecutive rows of a batch (e.g. ``4,0,6``: uneven, one
    rank empty) and runs BN forward and backward with the MPI world as ``comm``, for every
    variant, CPU backend and layout; each rank compares its rows with the one-process result
    (computed locally on the whole batch), the summed ggamma/gbeta with the one-process
    gradients, and checks that its running buffers are bit-identical to every other rank's.
    Prints one ``ok`` line per rank.
fail: rank 1 raises while the others wait in a collective; ``abort_on_error`` must end the job.
"""
import sys

import numpy as np

import arraybn
from arraybn.distributed import world
from tests.distributed.test_sync_batch_norm import (RTOL, SHAPES, VARIANTS, assert_close,
                                                     make_problem, run_bn)


def check(comm, sizes):
    if len(sizes) != comm.size:
        raise ValueError(f"{len(sizes)} shard sizes given for {comm.size} ranks")
    n, start = sum(sizes), sum(sizes[:comm.rank])
    mine = slice(start, start + sizes[comm.rank])
    cases = 0
    for backend in arraybn.available_backends():
        for shape in SHAPES:
            problem = make_problem((n,) + shape[1:], np.float64)
            for options in VARIANTS.values():
                whole = run_bn(problem, backend, options)
                rank = run_bn(problem, backend, options, comm, mine)
                compare(comm, rank, whole, mine, f"{backend} {shape} {options}")
                cases += 1
    print(f"rank {comm.rank} of {comm.size}: {cases} cases ok ({mine.stop - mine.start} rows)",
          flush=True)


def compare(comm, rank, whole, mine, label):
    rtol = RTOL[np.float64]
    try:
        for key in ("y", "gx"):
            assert_close(rank[key], whole[key][mine], rtol)
        for key in ("ggamma", "gbeta"):
            assert_close(comm.allreduce_sum(rank[key]), whole[key], rtol)
        for key in ("running_mean", "running_var"):
            assert_close(rank[key], whole[key], rtol)
            gathered = comm.allgather(rank[key])
            assert (gathered == gathered[0]).all(), f"{key} differs between ranks"
    except AssertionError as exc:
        raise AssertionError(f"{label}: {exc}") from None


def fail(comm):
    if comm.rank == 1:
        raise ValueError("rank 1 failed on purpose")
    comm.barrier()                       # would wait forever for rank 1 without the abort


def main(argv):
    comm = world()
    if comm is None:
        sys.exit("mpi_worker must run under mpiexec with more than one process")
    with comm.abort_on_error():
        if argv[0] == "check":
            check(comm, [int(size) for size in argv[1].split(",")])
        else:
            fail(comm)


if __name__ == "__main__":
    main(sys.argv[1:])
