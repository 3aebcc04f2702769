"""All-reduce latency and bandwidth through arraybn's MPI communicator; data-parallel epochs.

    mpiexec -n 2 python3 benchmarks/distributed.py [--samples 30]
    python3 benchmarks/distributed.py --epoch [--repeats 5]      (starts its own mpiexec jobs)

Rows: ``allreduce_sum`` (Allgather, then a sum in rank order: bit-identical on every rank, what
BN under ``comm=`` uses) and, for comparison, mpi4py's plain ``Allreduce`` (MPI's order, not
promised the same on every rank), on 8 B (one float64: latency) and 1 MB (131072 float64:
bandwidth). Each sample times a burst of calls after a barrier; the table gives rank 0's median
time per call and the payload divided by it.

``--epoch`` (``benchmarks/distributed_epoch.py``): the LeNet-5+BN epoch on Fashion-MNIST at
K = 1 with 2 threads vs K = 2 with 1 thread each (``--bn-sync all`` and ``local``), and each
step's share spent in the communicator.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import format_seconds, markdown_table  # noqa: E402

from arraybn.distributed import import_mpi, world  # noqa: E402

PAYLOADS = {"8 B": 1, "1 MB": 131072}          # float64 values
CALLS = {"8 B": 200, "1 MB": 10}              # calls per sample


def time_per_call(comm, func, calls, samples):
    times = []
    for _ in range(samples + 1):                 # the first sample warms up and is dropped
        comm.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            func()
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--epoch", action="store_true", help="the data-parallel epoch benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="--epoch: interleaved rounds")
    args = parser.parse_args()
    if args.epoch:
        from distributed_epoch import compare_epochs
        compare_epochs(args.repeats)
        return
    comm = world()
    if comm is None:
        sys.exit("run it under MPI with more than one process: mpiexec -n 2 python3 "
                 "benchmarks/distributed.py")
    mpi = import_mpi()
    rows = []
    for label, values in PAYLOADS.items():
        send = np.full(values, float(comm.rank + 1))
        receive = np.empty_like(send)
        cases = {"allreduce_sum (rank order)": lambda: comm.allreduce_sum(send),
                 "MPI Allreduce": lambda: comm.mpi_comm.Allreduce(send, receive, op=mpi.SUM)}
        for name, func in cases.items():
            seconds = time_per_call(comm, func, CALLS[label], args.samples)
            rows.append([name, label, format_seconds(seconds),
                         f"{send.nbytes / seconds / 1e9:.3f} GB/s"])
    if comm.rank == 0:
        print(f"{comm.size} ranks, {args.samples} samples, median per call on rank 0")
        print(markdown_table(["operation", "payload", "time", "payload / time"], rows))


if __name__ == "__main__":
    main()
