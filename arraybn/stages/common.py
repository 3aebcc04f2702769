"""Pieces every stage shares: data for a config, the model of a trained run, batch evaluation."""
import contextlib
import datetime
import os

import numpy as np

import arraybn
from arraybn.backends.arrays import to_host
from arraybn.core.deferred import raise_deferred_errors
from arraybn.data import Split, load_dataset, prepare_splits
from arraybn.nn import build_model, softmax_cross_entropy
from arraybn.stages.artifacts import StageError, load_npz, read_manifest, verify_artifact
from arraybn.stages.config import TrainConfig


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_data(config, normalisation=None, data_dir=None):
    """``(raw, splits, (mean, std))`` for ``config``; ``data_dir`` overrides ``config.data_dir``.

    The normalisation comes from the whole training split, also with ``config.train_subset``.
    """
    raw = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir)
    splits, norm = prepare_splits(raw, config.val_split, config.seed, normalisation)
    if config.train_subset is not None and config.train_subset < len(splits["train"]):
        train = splits["train"]
        keep = np.sort(np.random.default_rng([config.seed, 4]).choice(
            len(train), config.train_subset, replace=False))
        splits["train"] = Split(train.images[keep], train.labels[keep])
    return raw, splits, norm


def dataset_record(raw, splits, norm):
    """The manifest's description of the data a stage used."""
    return {"name": raw.name, "directory": raw.directory, "fingerprint": raw.fingerprint,
            "files": {role: os.path.basename(path) for role, path in raw.files.items()},
            "normalisation": {"mean": norm[0], "std": norm[1]},
            "sizes": {name: len(split) for name, split in splits.items()},
            "image_shape": list(raw.train_images.shape[1:])}


def make_model(config, image_shape, backend):
    """A fresh model for ``config`` on ``backend`` (weights seeded by ``config.seed``)."""
    return build_model(config.model, backend=backend, seed=config.seed, num_classes=10,
                       in_shape=(1,) + tuple(image_shape), **config.model_options())


def base_manifest(stage, config, backend):
    return {"stage": stage, "arraybn_version": arraybn.__version__, "created": now_utc(),
            "config": config.to_dict(), "backend": backend.name, "seed": config.seed}


class TrainedRun:
    """A completed train stage: its manifest, config, verified model.npz and data.

    Loading checks model.npz's SHA-256 against the manifest and the dataset's fingerprint
    against the one training used.
    """

    def __init__(self, run_dir, backend=None, data_dir=None):
        self.run_dir = os.fspath(run_dir)
        self.manifest = read_manifest(run_dir, "train")
        try:
            self.config = TrainConfig.from_dict(self.manifest["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StageError(f"{run_dir}/train/manifest.json has an unusable config ({exc}); "
                             f"retrain with `arraybn train {run_dir} --force`") from None
        self.model_path, self.model_sha = verify_artifact(run_dir, "train", "model.npz",
                                                          self.manifest)
        self.backend = arraybn.get_backend(backend or self.config.backend)
        self.data_dir = data_dir
        self._data = None

    def data(self):
        """``(raw, splits, norm)`` normalised as in training; a different dataset is an error."""
        if self._data is None:
            stored = self.manifest["dataset"]
            norm = (stored["normalisation"]["mean"], stored["normalisation"]["std"])
            raw, splits, norm = load_data(self.config, norm, self.data_dir)
            if raw.fingerprint != stored["fingerprint"]:
                raise StageError(
                    f"the {raw.name} files in {raw.directory} (fingerprint "
                    f"{raw.fingerprint[:12]}...) differ from those {self.run_dir} was trained on "
                    f"({stored['fingerprint'][:12]}...); pass --data-dir with the training data "
                    f"or retrain with `arraybn train {self.run_dir} --force`")
            self._data = raw, splits, norm
        return self._data

    def model(self):
        """The trained model with model.npz loaded."""
        image_shape = self.manifest["dataset"]["image_shape"]
        model = make_model(self.config, image_shape, self.backend)
        state = load_npz(self.model_path, "model", self.run_dir, "train")
        try:
            model.load_state_dict(state)
        except ValueError as exc:
            raise StageError(f"{self.model_path} does not fit the model in its manifest ({exc}); "
                             f"retrain with `arraybn train {self.run_dir} --force`") from None
        return model


def evaluate(model, split, batch_size):
    """Inference over ``split`` in order: ``(mean loss, accuracy, predictions (N,) int64)``.

    An empty split gives ``(None, None, empty)``. A backend that checks the BN statistics on
    the device (cupy) is asked once, after the last batch (or at a non-finite loss, which they
    explain), so that unusable statistics raise the error a CPU backend raises at the call.
    """
    with deferred_bn_errors(model.backend):
        loss_sum, predictions = _evaluate_batches(model, split, batch_size)
    if not predictions:
        return None, None, np.zeros(0, np.int64)
    predictions = np.concatenate(predictions)
    return loss_sum / len(split), float((predictions == split.labels).mean()), predictions


def _evaluate_batches(model, split, batch_size):
    xp = model.backend.xp
    loss_sum, predictions = 0.0, []
    for start in range(0, len(split), batch_size):
        x = xp.asarray(split.images[start:start + batch_size])
        y = split.labels[start:start + batch_size]
        logits = model.forward(x, training=False)
        loss, _ = softmax_cross_entropy(logits, xp.asarray(y), model.backend.conv_ops())
        loss_sum += loss * len(y)
        predictions.append(to_host(logits.argmax(axis=1)).astype(np.int64))
    return loss_sum, predictions


@contextlib.contextmanager
def deferred_bn_errors(backend):
    """Raise ``backend``'s deferred BN failures (a no-op on CPU backends) at the end of the
    block, or instead of a FloatingPointError (NaN logits) that they explain."""
    try:
        yield
    except FloatingPointError:
        raise_deferred_errors(backend)
        raise
    raise_deferred_errors(backend)


def set_eval_stats(model, mode):
    """Every BN layer normalises with ``mode`` ('running' or 'batch') in inference."""
    for _, bn in model.bn_layers():
        bn.eval_stats = mode
