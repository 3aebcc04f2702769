"""Data-parallel LeNet-5+BN epochs: K = 1 process with 2 threads vs K = 2 with 1 thread each.

    python3 benchmarks/distributed.py --epoch [--repeats 5]

Each configuration is a fresh job (``mpiexec -n K`` for K > 1) that trains two epochs of
LeNet-5 with BN (Fashion-MNIST, 8000 training images, global batch 128, numba, float32) and
times the second (the first pays the numba compile): the sum of the step-to-step intervals,
the first step after validation left out and scaled back in. A communicator wrapper
(``TimedCommunicator``) times every collective on rank 0 (``allgather``; ``allreduce_sum``
goes through it), split into waiting for the other rank (a barrier first) and the collective
itself; shares are of the step time. Rounds are interleaved (every configuration once per
round) and the table gives medians.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from timing import markdown_table

from arraybn.distributed import Communicator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"K=1, 2 threads": (1, 2, "all"), "K=2 x 1 thread, sync all": (2, 1, "all"),
           "K=2 x 1 thread, local": (2, 1, "local")}
TRAIN = dict(model="lenet5", bn="full", batch_size=128, train_subset=8000, epochs=2,
             backend="numba", seed=0)


class TimedCommunicator(Communicator):
    """Wraps an MPI communicator; counts its collectives (every ``allgather``, which
    ``allreduce_sum`` uses). Each is preceded by a barrier, timed apart: ``wait`` is the time
    until the slowest rank arrives (load imbalance, a busy core), ``transfer`` the collective
    once all are there."""

    def __init__(self, inner):
        self.inner, self.rank, self.size = inner, inner.rank, inner.size
        self.reset()

    def reset(self):
        self.calls, self.wait, self.transfer = 0, 0.0, 0.0

    def _allgather(self, vector):
        start = time.perf_counter()
        self.inner.barrier()
        arrived = time.perf_counter()
        gathered = self.inner._allgather(vector)
        self.wait += arrived - start
        self.transfer += time.perf_counter() - arrived
        self.calls += 1
        return gathered

    def _split(self, group_size):
        return self.inner.split(group_size)

    def barrier(self):
        self.inner.barrier()


def time_one_job(bn_sync):
    """This job's second epoch: ``{epoch_s, steps, comm_s, comm_calls}`` (rank 0's)."""
    from arraybn import get_backend
    from arraybn.distributed import world
    from arraybn.stages.common import load_data, make_model
    from arraybn.stages.config import TrainConfig
    from arraybn.stages.parallel import DataParallel
    from arraybn.stages.training_loop import Trainer

    comm = world()
    config = TrainConfig(bn_sync=bn_sync, **TRAIN)
    raw, splits, norm = load_data(config)
    model = make_model(config, raw.train_images.shape[1:], get_backend(config.backend))
    timed = None if comm is None else TimedCommunicator(comm)
    stamps = []

    def on_step(info):
        if info["epoch"] == 2 and info["step"] == 1 and timed is not None:
            timed.reset()                           # epoch 2 from here on
        if info["epoch"] == 2:
            stamps.append(time.perf_counter())

    trainer = Trainer(model, config, splits, fill=-norm[0] / norm[1], on_step=on_step)
    if comm is not None:
        trainer.parallel = DataParallel(timed, model, bn_sync)
    trainer.fit()
    steps = trainer.steps_per_epoch
    measured = stamps[-1] - stamps[0]                  # steps 2..N of epoch 2
    rank, wait, transfer, calls = ((0, 0.0, 0.0, 0) if timed is None else
                                   (timed.rank, timed.wait, timed.transfer, timed.calls))
    return {"rank": rank, "epoch_s": measured * steps / (steps - 1), "steps": steps,
            "wait_share": wait / measured, "transfer_share": transfer / measured,
            "comm_calls_per_step": calls / (steps - 1)}


def _launch(ranks, threads, bn_sync):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=REPO)
    command = [sys.executable, os.path.abspath(__file__), bn_sync]
    if ranks > 1:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        command = [mpiexec, "-n", str(ranks), "--oversubscribe"] + command
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _percent(runs, key):
    return f"{100 * statistics.median(r[key] for r in runs):.1f}%"


def compare_epochs(repeats):
    """Interleaved rounds of every configuration; prints the table."""
    results = {name: [] for name in CONFIGS}
    for round_number in range(repeats):
        for name, (ranks, threads, bn_sync) in CONFIGS.items():
            results[name].append(_launch(ranks, threads, bn_sync))
        print(f"round {round_number + 1}/{repeats}: " + ", ".join(
            f"{name} {results[name][-1]['epoch_s']:.2f} s" for name in CONFIGS), flush=True)
    base = [r["epoch_s"] for r in results["K=1, 2 threads"]]
    rows = []
    for name, runs in results.items():
        epochs = [r["epoch_s"] for r in runs]
        ratios = [e / b for e, b in zip(epochs, base)]
        rows.append([name, f"{statistics.median(epochs):.2f} s",
                     f"{min(epochs):.2f}-{max(epochs):.2f} s",
                     f"{statistics.median(ratios):.2f}",
                     _percent(runs, "wait_share"), _percent(runs, "transfer_share"),
                     f"{runs[0]['comm_calls_per_step']:.0f}"])
    print(f"LeNet-5+BN, {TRAIN['train_subset']} images, batch {TRAIN['batch_size']}, "
          f"{base and results['K=1, 2 threads'][0]['steps']} steps/epoch, {repeats} rounds")
    print(markdown_table(["configuration", "epoch (median)", "range", "ratio to K=1 (median "
                          "of rounds)", "waiting for the other rank", "in the collectives",
                          "collectives/step"],
                         rows))


if __name__ == "__main__":
    job = time_one_job(sys.argv[1])
    if job["rank"] == 0:
        print(json.dumps(job))
