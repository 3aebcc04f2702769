"""The train stage: ``run_train(RUN, config)`` writes ``RUN/train/`` atomically.

``RUN/train/``: model.npz (PyTorch state_dict names), history.csv, checkpoint.npz +
checkpoint.json (final state, to train further with ``--resume --epochs M``), manifest.json.
While training runs, ``RUN/train-checkpoint/`` holds the checkpoint of the last finished epoch
(or of the step where Ctrl-C stopped it); ``--resume`` continues from it exactly, and it is
removed once the stage is complete. A run that diverges leaves
``RUN/train-checkpoint/diverged.json`` (``read_divergence``): where it diverged, the error and
the config, also when it diverged before its first checkpoint; a diverged run is a result (of a
learning-rate sweep, say), and ``arraybn report`` shows it. Until a new run's checkpoint replaces
the record, ``--resume`` refuses the checkpoint it followed and a fresh ``train`` needs
``--force``.
"""
import contextlib
import csv
import json
import os
import shutil
import time

import arraybn
from arraybn.core import NonFiniteStatisticsError
from arraybn.data import sha256_file
from arraybn.stages.artifacts import (StageError, check_can_write, load_npz, output_digests,
                                      read_json_if_exists, read_manifest, replacing, save_npz,
                                      stage_dir, staging, verify_artifact, write_json,
                                      write_json_atomic)
from arraybn.stages.common import base_manifest, dataset_record, load_data, make_model, now_utc
from arraybn.stages.config import RESUMABLE_CHANGES, TrainConfig
from arraybn.stages.divergence import TrainingDiverged
from arraybn.stages.interrupts import SIGNAL_NAMES, StageInterrupted, interruptible_stage
from arraybn.stages.layer_tracking import (LAYERS_CSV, check_tracking_world,
                                           tracking_record, write_layers_csv)
from arraybn.stages.parallel import DataParallel, check_resume_world, parallel_record
from arraybn.stages.run_lock import holding_run_lock
from arraybn.stages.training_loop import HISTORY_FIELDS, ForcedInterrupt, Trainer

PARTIAL_DIR = "train-checkpoint"
CHECKPOINT_NPZ, CHECKPOINT_JSON = "checkpoint.npz", "checkpoint.json"
# The record of a run that diverged (after its checkpoint, if any: resuming would diverge again).
DIVERGED_JSON = "diverged.json"


class TrainingInterrupted(StageInterrupted):
    """Training stopped by Ctrl-C or SIGTERM after saving a checkpoint (or, on a second signal,
    at once); the message says how to resume."""


@holding_run_lock()
@interruptible_stage("train")
def run_train(run_dir, config=None, *, force=False, resume=False, echo=print, on_step=None,
              comm=None):
    """Train a model and store ``RUN/train/``; returns the manifest dict.

    config: a TrainConfig, a dict of TrainConfig fields, or None (defaults). With ``resume``,
        the configuration comes from the checkpoint; ``config`` may then only change epochs,
        backend and data_dir (a dict lists just the options to change).
    force: replace an existing train stage (only once the new one is complete).
    resume: continue from ``RUN/train-checkpoint/`` (interrupted run; the result is identical
        to an uninterrupted run) or from ``RUN/train/`` with more epochs (the learning-rate
        schedule then spans the new total, so this is not the same as training that long).
    echo: prints one line per epoch. on_step: called after every step (see ``Trainer``).
    comm: an ``arraybn.distributed`` communicator (``world()`` under mpiexec or srun): train
        data-parallel over its ranks (``arraybn.stages.parallel``); rank 0 holds the run lock,
        writes and echoes, the other ranks write and print nothing.
    Raises StageError (with the command that fixes it), TrainingInterrupted on Ctrl-C.
    """
    run_dir = os.fspath(run_dir)
    writer = comm is None or comm.rank == 0
    echo = echo if writer else _silent
    if resume:
        arrays, info, config = _resume_point(run_dir, config)
        check_resume_world(info, comm, run_dir)
    else:
        config, arrays, info = fresh_config(config), None, None
        _check_fresh(run_dir, force)
    check_tracking_world(config, comm)
    started = time.perf_counter()
    backend = arraybn.get_backend(config.backend)
    raw, splits, norm = load_data(config)
    if info is not None and info["dataset_fingerprint"] != raw.fingerprint:
        raise StageError(f"the dataset in {raw.directory} differs from the one the checkpoint "
                         f"was trained on; pass the original --data-dir, or start over with "
                         f"`arraybn train {run_dir} --force`")
    model = make_model(config, raw.train_images.shape[1:], backend)
    saver = _PartialSaver(run_dir, config, raw.fingerprint, norm)
    saver.world_size = 1 if comm is None else comm.size
    trainer = Trainer(model, config, splits, fill=-norm[0] / norm[1], on_step=on_step,
                      on_epoch=lambda row: echo(format_history_row(row, config.epochs)),
                      save_checkpoint=saver if writer else None)
    if comm is not None:
        trainer.parallel = DataParallel(comm, model, config.bn_sync)
    if arrays is not None:
        _restore(trainer, arrays, info, run_dir)
    try:
        trainer.fit()
    except ForcedInterrupt:
        last = ("the checkpoint of the last finished epoch is in " + saver.directory
                if has_checkpoint(run_dir) else "no checkpoint was saved")
        raise TrainingInterrupted(f"training aborted by a second "
                                  f"{SIGNAL_NAMES[trainer.stopped_by]}; {last}. "
                                  f"Resume with `arraybn train {run_dir} --resume`",
                                  trainer.stopped_by) from None
    except (TrainingDiverged, NonFiniteStatisticsError) as exc:
        raise _with_advice(exc, _after_divergence(run_dir, exc, trainer, writer)) from None
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"training interrupted by {SIGNAL_NAMES[trainer.stopped_by]} at epoch "
            f"{trainer.epoch + 1}, step {trainer.step}; checkpoint saved in {saver.directory}. "
            f"Continue exactly where it stopped with `arraybn train {run_dir} --resume`",
            trainer.stopped_by) from None
    manifest = base_manifest("train", config, backend)
    manifest.update(dataset=dataset_record(raw, splits, norm), resumed=bool(resume),
                    num_classes=model.config["num_classes"],
                    inputs={os.path.basename(p): sha256_file(p) for p in raw.files.values()},
                    parallel=parallel_record(comm, config.bn_sync))
    if comm is not None:
        comm.barrier()              # every rank finished: a rank that failed aborted the job
    if writer:
        manifest = _write_stage(run_dir, trainer, saver, manifest, started, force or resume)
        shutil.rmtree(saver.directory, ignore_errors=True)
    if comm is not None:
        comm.barrier()              # every rank returns once rank 0 has written the stage
    return manifest


def _silent(*_):
    """The echo of the ranks other than 0."""


def fresh_config(config):
    """``config`` (a TrainConfig, a dict of its fields, or None: the defaults) as a TrainConfig."""
    if config is None:
        return TrainConfig()
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    return config


def _check_fresh(run_dir, force):
    check_can_write(run_dir, "train", force)
    diverged = read_divergence(run_dir)
    if diverged and not force:
        raise StageError(f"{os.path.join(run_dir, PARTIAL_DIR)} holds a run that diverged "
                         f"({diverged['error']}); start over with a lower --lr and --force")
    if has_checkpoint(run_dir) and not force:
        raise StageError(f"{os.path.join(run_dir, PARTIAL_DIR)} holds an interrupted training "
                         f"run; continue it with `arraybn train {run_dir} --resume`, or start "
                         f"over with --force")


def _after_divergence(run_dir, error, trainer, writer):
    """Record the divergence (``read_divergence``; the writing rank only) and say what is kept
    and what to do."""
    path = os.path.join(run_dir, PARTIAL_DIR, DIVERGED_JSON)
    if writer:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, _divergence_record(error, trainer))
    kept = (f"{stage_dir(run_dir, 'train')} is as it was"
            if os.path.isdir(stage_dir(run_dir, "train")) else "no model was written")
    return (f"{kept}; the divergence is recorded in {path}. Lower --lr (it was "
            f"{trainer.config.lr:g}) and start over with "
            f"`arraybn train {run_dir} --force --lr ...`")


def _divergence_record(error, trainer):
    """Where training diverged (epoch, step: 1-based; step None: in the validation at the end of
    the epoch), the error and the run's config."""
    in_validation = trainer.step >= trainer.steps_per_epoch
    return {"error": str(error), "epoch": trainer.epoch + 1,
            "step": None if in_validation else trainer.step + 1,
            "config": trainer.config.to_dict(), "created": now_utc()}


def _with_advice(error, advice):
    """The divergence ``error`` (its type kept) with ``advice`` added to its message."""
    if isinstance(error, NonFiniteStatisticsError):
        return NonFiniteStatisticsError(f"{error.detail}. {advice}", error.channels, error.where)
    return TrainingDiverged(f"{error}. {advice}")


def read_divergence(run_dir):
    """The record of the latest training of ``run_dir`` if it diverged, else None: a dict with
    'error' and, unless it was written by an older arraybn, 'epoch', 'step' (see
    ``_divergence_record``) and 'config'."""
    record = read_json_if_exists(os.path.join(run_dir, PARTIAL_DIR, DIVERGED_JSON))
    return None if record is None else {"error": "training diverged", **record}


def has_checkpoint(run_dir):
    """Whether ``RUN/train-checkpoint/`` holds a checkpoint: the one test of an interrupted run
    that both ``--resume`` and a fresh ``train`` use."""
    return os.path.isfile(os.path.join(run_dir, PARTIAL_DIR, CHECKPOINT_JSON))


# --- checkpoints --------------------------------------------------------------------------------

class _PartialSaver:
    """Writes the trainer's state to ``RUN/train-checkpoint/``: both files are complete before
    either replaces its predecessor, so a failed save (a full disk) keeps the previous
    checkpoint whole, and leaves no partial file behind."""

    def __init__(self, run_dir, config, fingerprint, norm):
        self.run_dir = run_dir
        self.directory = os.path.join(run_dir, PARTIAL_DIR)
        self.config, self.fingerprint, self.norm = config, fingerprint, norm

    def __call__(self, trainer):
        arrays, info = self.checkpoint(trainer)
        os.makedirs(self.directory, exist_ok=True)
        npz_path = os.path.join(self.directory, CHECKPOINT_NPZ)
        with _saving(npz_path, self.run_dir, trainer):
            with replacing(npz_path) as npz_tmp, \
                    replacing(os.path.join(self.directory, CHECKPOINT_JSON)) as json_tmp:
                save_npz(npz_tmp, arrays)
                info["npz_sha256"] = sha256_file(npz_tmp)
                write_json(json_tmp, info)
        with contextlib.suppress(FileNotFoundError):        # this checkpoint has not diverged
            os.remove(os.path.join(self.directory, DIVERGED_JSON))

    world_size = 1                  # processes that train together (data-parallel under MPI)

    def checkpoint(self, trainer):
        arrays, info = trainer.state()
        info.update(config=self.config.to_dict(), dataset_fingerprint=self.fingerprint,
                    world_size=self.world_size,
                    normalisation=list(self.norm), arraybn_version=arraybn.__version__)
        return arrays, info


def _position(epoch, step):
    """Words for a trainer position (``epoch`` finished epochs, ``step`` steps into the next)."""
    return f"the end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"


@contextlib.contextmanager
def _saving(path, run_dir, trainer):
    """Turn an OSError (a full disk) while writing ``path`` into a StageError that names the
    file, the position in training, the state the run is left in and what to do."""
    try:
        yield
    except OSError as exc:
        raise StageError(f"could not save {path} at {_position(trainer.epoch, trainer.step)}: "
                         f"{exc.strerror or exc}; {_what_is_left(run_dir)}") from None


def _what_is_left(run_dir):
    """The state of an interrupted run after a failed save, and the command that goes on."""
    partial = os.path.join(run_dir, PARTIAL_DIR)
    info = read_json_if_exists(os.path.join(partial, CHECKPOINT_JSON))
    if info is None:
        with contextlib.suppress(OSError):
            os.rmdir(partial)             # only when empty: nothing to resume, nothing left
        again = " --force" if os.path.isdir(stage_dir(run_dir, "train")) else ""
        return (f"no checkpoint was kept. Free space on that disk, then start again with "
                f"`arraybn train {run_dir}{again}`")
    return (f"the checkpoint of {_position(info['epoch'], info['step'])} in {partial} is intact. "
            f"Free space on that disk, then continue from it with `arraybn train {run_dir} "
            f"--resume`, or start over with `arraybn train {run_dir} --force`")


def _read_checkpoint(directory, run_dir):
    json_path = os.path.join(directory, CHECKPOINT_JSON)
    try:
        with open(json_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise StageError(f"{json_path} is unreadable ({exc}); start over with "
                         f"`arraybn train {run_dir} --force`") from None
    npz_path = os.path.join(directory, CHECKPOINT_NPZ)
    if not os.path.isfile(npz_path) or sha256_file(npz_path) != info.get("npz_sha256"):
        raise StageError(f"{npz_path} is missing or does not match {json_path} (SHA-256); "
                         f"start over with `arraybn train {run_dir} --force`")
    return load_npz(npz_path, "checkpoint", run_dir, "train"), info


def _resume_point(run_dir, requested):
    """``(arrays, info, config)`` to continue from: the interrupted run, else the finished one."""
    diverged = read_divergence(run_dir)
    checkpoint = has_checkpoint(run_dir)
    if diverged and (checkpoint or not os.path.isdir(stage_dir(run_dir, "train"))):
        when = "after its checkpoint" if checkpoint else "before its first checkpoint"
        raise StageError(f"cannot resume {run_dir}: the run diverged {when} "
                         f"({diverged['error']}), and with the same settings it would diverge "
                         f"again; start over with a lower --lr: `arraybn train {run_dir} --force "
                         f"--lr ...`")
    if has_checkpoint(run_dir):
        arrays, info = _read_checkpoint(os.path.join(run_dir, PARTIAL_DIR), run_dir)
        return arrays, info, _resume_config(info["config"], requested, run_dir)
    if not os.path.isdir(stage_dir(run_dir, "train")):
        raise StageError(f"nothing to resume in {run_dir}: no checkpoint in {PARTIAL_DIR}/ and "
                         f"no train/; start with `arraybn train {run_dir}`")
    manifest = read_manifest(run_dir, "train")
    for name in (CHECKPOINT_NPZ, CHECKPOINT_JSON):
        verify_artifact(run_dir, "train", name, manifest)
    arrays, info = _read_checkpoint(stage_dir(run_dir, "train"), run_dir)
    config = _resume_config(info["config"], requested, run_dir)
    done = len(info["history"])
    if config.epochs <= done:
        raise StageError(f"{run_dir} is already trained for {done} epochs; pass --epochs M with "
                         f"M > {done} to train further, or --force to start over")
    return arrays, info, config


def _resume_config(stored, requested, run_dir):
    """The checkpoint's config with the allowed changes of ``requested`` applied."""
    base = TrainConfig.from_dict(stored)
    if requested is None:
        return base
    changes = requested if isinstance(requested, dict) else requested.to_dict()
    current = base.to_dict()
    conflicts = [f"{k}={v!r} (checkpoint: {current[k]!r})" for k, v in changes.items()
                 if k not in RESUMABLE_CHANGES and k in current and _normal(v) != current[k]]
    if conflicts:
        raise StageError(f"cannot resume {run_dir} with different settings: "
                         f"{', '.join(sorted(conflicts))}. Only {', '.join(RESUMABLE_CHANGES)} "
                         f"may change; start over with --force to use new settings")
    current.update({k: v for k, v in changes.items() if k in RESUMABLE_CHANGES})
    return TrainConfig.from_dict(current)


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _restore(trainer, arrays, info, run_dir):
    try:
        trainer.restore(arrays, info)
    except (KeyError, ValueError) as exc:
        raise StageError(f"the checkpoint in {run_dir} does not fit this run ({exc}); start over "
                         f"with `arraybn train {run_dir} --force`") from None


# --- the stage's files --------------------------------------------------------------------------

def format_history_row(row, epochs):
    val = ("" if row["val_loss"] is None
           else f"  val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%")
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc "
            f"{100 * row['train_acc']:.2f}%{val}  lr {row['lr']:.3g}  {row['seconds']:.1f} s")


def write_history(path, history):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in HISTORY_FIELDS})


def _write_stage(run_dir, trainer, saver, manifest, started, force):
    last = trainer.history[-1]
    manifest["metrics"] = {"epochs": len(trainer.history),
                           **{k: last[k] for k in ("train_loss", "train_acc", "val_loss",
                                                   "val_acc")}}
    with staging(run_dir, "train", force=force) as tmp:
        def save(name, write, data):
            with _saving(os.path.join(stage_dir(run_dir, "train"), name), run_dir, trainer):
                write(os.path.join(tmp, name), data)
        save("model.npz", save_npz, trainer.model.state_dict())
        save("history.csv", write_history, trainer.history)
        names = ["model.npz", "history.csv", CHECKPOINT_NPZ, CHECKPOINT_JSON]
        if trainer.tracker is not None:
            save(LAYERS_CSV, write_layers_csv, trainer.tracker.rows)
            names.append(LAYERS_CSV)
            manifest["layer_tracking"] = tracking_record(trainer.tracker)
        arrays, info = saver.checkpoint(trainer)
        save(CHECKPOINT_NPZ, save_npz, arrays)
        info["npz_sha256"] = sha256_file(os.path.join(tmp, CHECKPOINT_NPZ))
        save(CHECKPOINT_JSON, write_json, info)
        manifest["outputs"] = output_digests(tmp, names)
        manifest["timings"] = {"train_seconds": sum(r["seconds"] for r in trainer.history),
                               "wall_seconds": time.perf_counter() - started}
        save("manifest.json", write_json, manifest)
    return manifest
