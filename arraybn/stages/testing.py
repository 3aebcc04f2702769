"""The test stage: evaluate the trained model on the test split; writes ``RUN/test/metrics.json``.

Which statistics BN normalises with (``stats``):
- 'postproc': the population statistics of ``RUN/postproc/bn_stats.npz`` (default when present);
- 'running': the running averages stored in model.npz (default otherwise);
- 'batch': each test batch's own statistics (results then depend on the batch size).
"""
import os
import time

import numpy as np

from arraybn.data import CLASS_NAMES
from arraybn.stages.artifacts import (StageError, check_can_write, load_npz, read_manifest,
                                      stage_dir, staging, verify_artifact, write_json)
from arraybn.stages.common import TrainedRun, base_manifest, evaluate, set_eval_stats
from arraybn.stages.config import TestConfig
from arraybn.stages.parallel import evaluate_sharded, synchronise_bn
from arraybn.stages.interrupts import interruptible_stage
from arraybn.stages.run_lock import holding_run_lock


def load_postproc_stats(run):
    """``(bn_stats, sha256)`` of ``RUN/postproc/`` after checking it belongs to run's model.npz."""
    manifest = read_manifest(run.run_dir, "postproc")
    path, sha = verify_artifact(run.run_dir, "postproc", "bn_stats.npz", manifest)
    if manifest.get("inputs", {}).get("train/model.npz") != run.model_sha:
        raise StageError(f"{path} was computed for a different model.npz (the model was "
                         f"retrained since); make it again with "
                         f"`arraybn postproc {run.run_dir} --force`")
    return load_npz(path, "BN statistics", run.run_dir, "postproc"), sha


def apply_bn_stats(model, stats, where):
    """Make every BN layer normalise with ``stats`` (``bnK.running_mean``/``_var``) in inference.

    This also works for a model trained without running statistics (``--stats none``).
    """
    for name, bn in model.bn_layers():
        keys = (f"{name}.running_mean", f"{name}.running_var")
        missing = [k for k in keys if k not in stats]
        if missing:
            raise StageError(f"{where} lacks {', '.join(missing)}; it does not fit this model")
        try:
            bn.use_statistics(stats[keys[0]], stats[keys[1]])
        except ValueError as exc:
            raise StageError(f"{where} does not fit this model: {exc}") from None


def _choose_stats(run, requested):
    has_postproc = os.path.isdir(stage_dir(run.run_dir, "postproc"))
    stats = requested or ("postproc" if has_postproc else "running")
    if stats == "postproc" and not has_postproc:
        raise StageError(f"{run.run_dir} has no postproc stage; make it with "
                         f"`arraybn postproc {run.run_dir}`, or test with --stats running|batch")
    return stats


def prepare_model(run, stats):
    """The trained model set up to normalise with ``stats``; ``(model, inputs used)``."""
    model = run.model()
    inputs = {"train/model.npz": run.model_sha}
    if stats == "postproc" and model.bn_layers():
        bn_stats, sha = load_postproc_stats(run)
        apply_bn_stats(model, bn_stats, f"{run.run_dir}/postproc/bn_stats.npz")
        inputs["postproc/bn_stats.npz"] = sha
    elif stats == "running":
        untracked = [name for name, bn in model.bn_layers() if not bn.track_running_stats]
        if untracked:
            raise StageError(f"the model in {run.run_dir} was trained with --stats none and has "
                             f"no running statistics ({', '.join(untracked)}); run "
                             f"`arraybn postproc {run.run_dir}` and test with --stats postproc, "
                             "or test with --stats batch")
    elif stats == "batch":
        set_eval_stats(model, "batch")
    return model, inputs


def classification_metrics(labels, predictions, num_classes, names):
    """Accuracy, per-class accuracy and the confusion matrix (rows: true class, cols: predicted)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = {names[k]: (float(confusion[k, k] / support[k]) if support[k] else None)
                 for k in range(num_classes)}
    return {"accuracy": float((labels == predictions).mean()), "per_class_accuracy": per_class,
            "confusion_matrix": confusion.tolist(), "class_names": list(names)}


@holding_run_lock(create=False)
@interruptible_stage("test")
def run_test(run_dir, config=None, *, data_dir=None, force=False, echo=print, comm=None,
             **options):
    """Evaluate on the test split and write ``RUN/test/metrics.json``; returns the metrics dict.

    config: a TestConfig, or None for ``TestConfig(**options)`` (stats, batch_size, backend;
    see there).
    """
    started = time.perf_counter()
    config = TestConfig(**options) if config is None else config
    run = TrainedRun(run_dir, config.backend, data_dir)
    stats = _choose_stats(run, config.stats)
    check_can_write(run_dir, "test", force)
    batch_size = config.batch_size or run.config.eval_batch_size
    model, inputs = prepare_model(run, stats)
    raw, splits, _ = run.data()
    test = splits["test"]
    if stats == "batch" and model.bn_layers() and len(test) % batch_size == 1:
        raise StageError(f"with --stats batch the last test batch would hold one image (no "
                         f"batch statistics); choose a --batch-size that does not leave "
                         f"{len(test)} % batch size == 1")
    if comm is None:
        loss, _, predictions = evaluate(model, test, batch_size)
    else:                               # each rank its slice of every batch; rank 0 writes
        if stats == "batch":
            synchronise_bn(model, comm)
        loss, _, predictions = evaluate_sharded(model, test, batch_size, comm)
        if comm.rank != 0:
            comm.barrier()
            return None
    result = base_manifest("test", run.config, run.backend)
    result.update(classification_metrics(test.labels, predictions, 10, CLASS_NAMES[raw.name]))
    result.update(loss=loss, stats=stats if model.bn_layers() else _no_bn_label(run.config),
                  batch_size=batch_size, images=len(test), inputs=inputs,
                  dataset={"fingerprint": raw.fingerprint})
    with staging(run_dir, "test", force=force) as tmp:
        result["timings"] = {"seconds": time.perf_counter() - started}
        write_json(os.path.join(tmp, "metrics.json"), result)
    echo(f"test: loss {loss:.4f}  accuracy {100 * result['accuracy']:.2f}% on {len(test)} "
         f"images ({result['stats']} statistics)")
    if comm is not None:
        comm.barrier()
    return result


def _no_bn_label(config):
    """What normalises a model without BN layers at test time, for the metrics' ``stats``."""
    if config.bn == "group":
        return "none (group normalization: each image's own statistics)"
    return "none (model has no BN)"
