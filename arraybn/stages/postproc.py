"""The postproc stage: population statistics of every BN layer with the weights frozen.

The seed text's "Postproc" step: disable all weight updates, run each BN layer with batch
statistics over the training data, let an estimator accumulate each layer's mean/variance,
and store them beside the network (``RUN/postproc/bn_stats.npz`` with PyTorch buffer names).
"""
import contextlib
import os
import time

import numpy as np

from arraybn.core import make_estimator
from arraybn.data import batch_indices
from arraybn.stages.artifacts import (StageError, check_can_write, output_digests, save_npz,
                                      staging, write_json)
from arraybn.backends.arrays import to_host
from arraybn.stages.common import TrainedRun, base_manifest, set_eval_stats
from arraybn.stages.config import PostprocConfig
from arraybn.stages.parallel import merge_exact_statistics, shard_of_batch, synchronise_bn
from arraybn.stages.interrupts import interruptible_stage
from arraybn.stages.run_lock import holding_run_lock

POSTPROC_SEED_STREAM = 5


def _batches(n, batch_size, limit, seed):
    """Seeded shuffled batches of the training split, at most ``limit`` of them.

    A final batch of a single image is left out: batch statistics need two values.
    """
    if batch_size < 2:
        raise StageError(f"--batch-size must be >= 2 for batch statistics, got {batch_size}")
    if limit is not None and limit < 1:
        raise StageError(f"--batches must be >= 1, got {limit}")
    drop_last = n % batch_size == 1
    indices = batch_indices(n, batch_size, seed=seed, epoch=POSTPROC_SEED_STREAM,
                            drop_last=drop_last)
    for count, index in enumerate(indices):
        if limit is not None and count >= limit:
            return
        yield index


def collect_statistics(model, split, observers, batch_size, limit, seed, comm=None):
    """Feed ``split`` through ``model`` with every BN layer in batch-statistics mode.

    observers: {layer name: PopulationStatistics}. Returns ``(bn_stats, images_seen)`` with
    bn_stats {``name.running_mean``/``name.running_var``: host array in the model's dtype}.
    """
    xp = model.backend.xp
    set_eval_stats(model, "batch")
    seen = 0
    with contextlib.ExitStack() as observing:
        for name, bn in model.bn_layers():
            observing.enter_context(bn.observing(observers[name].update))
        for index in _batches(len(split), batch_size, limit, seed):
            seen += len(index)
            if comm is not None:                        # this rank's slice of the batch
                index = index[shard_of_batch(0, len(index), comm)]
            model.forward(xp.asarray(split.images[index]), training=False)
    results = ({name: observer.result() for name, observer in observers.items()}
               if comm is None else merge_exact_statistics(observers, comm))
    stats = {}
    for name, bn in model.bn_layers():
        mean, var = results[name]
        stats[f"{name}.running_mean"] = to_host(mean).astype(model.dtype)
        stats[f"{name}.running_var"] = to_host(var).astype(model.dtype)
    return stats, seen


@holding_run_lock(create=False)
@interruptible_stage("postproc")
def run_postproc(run_dir, config=None, *, backend=None, data_dir=None, force=False, echo=print,
                 comm=None, **options):
    """Estimate population BN statistics for the trained model; writes ``RUN/postproc/``.

    config: a PostprocConfig, or None for ``PostprocConfig(**options)`` (method, decay, stat,
    batches, batch_size; see there). Returns the manifest dict.
    comm: under MPI, rank r takes its slice of every batch, BN normalises with the whole
    batch's statistics, and the exact estimators are merged over the ranks (Chan): the
    one-process result. Rank 0 writes.
    """
    started = time.perf_counter()
    config = PostprocConfig(**options) if config is None else config
    method, batches, batch_size = config.method, config.batches, config.batch_size
    run = TrainedRun(run_dir, backend, data_dir)
    options = config.estimator_options()
    check_can_write(run_dir, "postproc", force)
    model = run.model()
    if not model.bn_layers():
        raise StageError(f"the model in {run_dir} has no BN layers (trained with --bn none or "
                         f"group); there is nothing to post-process: run `arraybn test {run_dir}`")
    _, splits, _ = run.data()
    if comm is not None:
        if method != "exact":
            raise StageError(f"postproc --method {method} runs as one process; under mpiexec "
                             "use --method exact")
        synchronise_bn(model, comm)
    observers = {name: make_estimator(method, **options) for name, _ in model.bn_layers()}
    stats, seen = collect_statistics(model, splits["train"], observers, batch_size, batches,
                                     run.config.seed, comm)
    if not (comm is None or comm.rank == 0):
        comm.barrier()                  # rank 0 writes
        return None
    echo(f"postproc: {method} statistics of {len(observers)} BN layers from {seen} "
         f"training images")
    manifest = base_manifest("postproc", run.config, run.backend)
    manifest.update(
        postproc={"method": method, **options, "batches": batches, "batch_size": batch_size,
                  "images_seen": seen},
        dataset={"fingerprint": run.manifest["dataset"]["fingerprint"]},
        inputs={"train/model.npz": run.model_sha},
        metrics={name: {"mean_abs_mean": float(np.abs(stats[f"{name}.running_mean"]).mean()),
                        "mean_var": float(stats[f"{name}.running_var"].mean())}
                 for name in observers})
    with staging(run_dir, "postproc", force=force) as tmp:
        save_npz(os.path.join(tmp, "bn_stats.npz"), stats)
        manifest["outputs"] = output_digests(tmp, ["bn_stats.npz"])
        manifest["timings"] = {"seconds": time.perf_counter() - started}
        write_json(os.path.join(tmp, "manifest.json"), manifest)
    if comm is not None:
        comm.barrier()
    return manifest
