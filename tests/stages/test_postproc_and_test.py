"""The postproc and test stages: statistics, which statistics test uses, SHA checks, invariants."""
import json
import os
import shutil

import numpy as np
import pytest

from arraybn.data import Split
from arraybn.stages import StageError, run_postproc, run_test, run_train
from arraybn.stages.common import TrainedRun, evaluate
from arraybn.stages.testing import prepare_model
from tests.data.idx_files import STEMS, write_idx
from tests.stages.helpers import file_sha, make_dataset, quiet, stage_leftovers, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A trained run (full BN); tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("runs") / "trained"
    run_train(run, tiny_config(data_dir), echo=quiet)
    return run


@pytest.fixture
def run(tmp_path, trained):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _stats(run):
    with np.load(run / "postproc" / "bn_stats.npz") as data:
        return {k: data[k] for k in data.files}


def test_postproc_writes_stats_for_every_bn_layer(run):
    manifest = run_postproc(run, batch_size=8, echo=quiet)
    stats = _stats(run)
    expected = [f"bn{i}.running_{s}" for i in range(1, 5) for s in ("mean", "var")]
    assert sorted(stats) == sorted(expected)
    assert stats["bn1.running_mean"].dtype == np.float32
    assert stats["bn3.running_var"].shape == (120,)
    assert manifest["inputs"] == {"train/model.npz": file_sha(run, "train", "model.npz")}
    assert manifest["outputs"]["bn_stats.npz"] == file_sha(run, "postproc", "bn_stats.npz")
    assert manifest["postproc"]["images_seen"] == 60 and stage_leftovers(run) == []


def test_exact_statistics_match_a_direct_computation_and_ignore_batch_size(run):
    """bn1's input does not depend on BN, so its exact statistics ignore the batch size.

    (Deeper layers see inputs normalised with batch statistics, which do depend on it.)
    """
    run_postproc(run, batch_size=7, echo=quiet)
    small = _stats(run)
    run_postproc(run, batch_size=30, force=True, echo=quiet)
    large = _stats(run)
    for key in ("bn1.running_mean", "bn1.running_var"):
        assert np.allclose(small[key], large[key], rtol=1e-5, atol=1e-6), key
    trained = TrainedRun(run)
    model = trained.model()
    _, splits, _ = trained.data()
    conv1 = model.layers[0].forward(splits["train"].images.astype(np.float32), training=False)
    conv1 = np.asarray(conv1, np.float64)
    assert np.allclose(small["bn1.running_mean"], conv1.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    # the estimators return the unbiased variance, the running buffers' convention
    assert np.allclose(small["bn1.running_var"], conv1.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)


def test_ema_and_batch_limit(run):
    manifest = run_postproc(run, method="ema", decay=0.5, stat="std", batches=2, batch_size=8,
                            echo=quiet)
    assert manifest["postproc"] == {"method": "ema", "decay": 0.5, "stat": "std", "batches": 2,
                                    "batch_size": 8, "images_seen": 16}
    with pytest.raises(StageError, match="--decay"):
        run_postproc(run, method="ema", decay=1.5, force=True, echo=quiet)


def test_test_uses_postproc_when_present_else_running(run):
    assert run_test(run, echo=quiet)["stats"] == "running"
    run_postproc(run, echo=quiet)
    metrics = run_test(run, force=True, echo=quiet)
    assert metrics["stats"] == "postproc"
    assert metrics["inputs"] == {"train/model.npz": file_sha(run, "train", "model.npz"),
                                 "postproc/bn_stats.npz": file_sha(run, "postproc", "bn_stats.npz")}
    stored = json.loads((run / "test" / "metrics.json").read_text())
    confusion = np.array(stored["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 30
    assert np.isclose(stored["accuracy"], np.trace(confusion) / 30)
    assert len(stored["per_class_accuracy"]) == 10 and stored["loss"] > 0


def test_running_statistics_missing_after_training_with_stats_none(tmp_path, data_dir):
    run = tmp_path / "run"
    run_train(run, tiny_config(data_dir, stats="none"), echo=quiet)
    with pytest.raises(StageError, match="--stats none.*arraybn postproc"):
        run_test(run, stats="running", echo=quiet)
    assert run_test(run, stats="batch", echo=quiet)["stats"] == "batch"
    run_postproc(run, echo=quiet)
    assert run_test(run, force=True, echo=quiet)["stats"] == "postproc"


def test_postproc_stats_requested_but_missing(run):
    with pytest.raises(StageError, match="no postproc stage.*arraybn postproc"):
        run_test(run, stats="postproc", echo=quiet)


def test_modified_model_is_detected_by_every_later_stage(run):
    with open(run / "train" / "model.npz", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    for stage in (run_postproc, run_test):
        with pytest.raises(StageError, match="corrupt or was modified.*arraybn train .* --force"):
            stage(run, echo=quiet)


def test_stats_from_another_model_are_refused(run, data_dir):
    run_postproc(run, echo=quiet)
    run_train(run, tiny_config(data_dir, seed=9), force=True, echo=quiet)
    with pytest.raises(StageError, match="different model.npz.*arraybn postproc .* --force"):
        run_test(run, echo=quiet)


def test_missing_train_stage_names_the_command(tmp_path):
    for stage in (run_postproc, run_test):
        with pytest.raises(StageError, match="no train stage.*`arraybn train"):
            stage(tmp_path / "nothing", echo=quiet)


def test_different_dataset_is_refused(run, tmp_path):
    other = make_dataset(tmp_path / "other-data")
    (other / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(other / (STEMS["test_labels"] + ".gz"), np.zeros(30, np.uint8))
    with pytest.raises(StageError, match="differ from those .* was trained on"):
        run_test(run, data_dir=str(other), echo=quiet)


def test_model_without_bn(tmp_path, data_dir):
    run = tmp_path / "run"
    run_train(run, tiny_config(data_dir, bn="none"), echo=quiet)
    with pytest.raises(StageError, match="no BN layers"):
        run_postproc(run, echo=quiet)
    assert run_test(run, echo=quiet)["stats"] == "none (model has no BN)"


@pytest.mark.parametrize("stats", ["running", "postproc"])
def test_inference_output_of_a_sample_does_not_depend_on_its_batch(run, stats):
    run_postproc(run, echo=quiet)
    model, _ = prepare_model(TrainedRun(run), stats)
    _, splits, _ = TrainedRun(run).data()
    images = splits["test"].images
    together = np.asarray(model.forward(images, training=False))
    alone = np.concatenate([np.asarray(model.forward(images[i:i + 1], training=False))
                            for i in range(len(images))])
    shuffled = np.asarray(model.forward(images[::-1], training=False))[::-1]
    assert np.allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert np.allclose(together, shuffled, rtol=1e-5, atol=1e-5)


def test_batch_size_one_works_in_test(run):
    one = run_test(run, batch_size=1, echo=quiet)
    big = run_test(run, batch_size=1000, force=True, echo=quiet)
    assert one["accuracy"] == big["accuracy"] and np.isclose(one["loss"], big["loss"], rtol=1e-5)
    with pytest.raises(StageError, match="one image"):
        run_test(run, stats="batch", batch_size=29, force=True, echo=quiet)


def test_evaluate_on_an_empty_split_returns_none(run):
    empty = Split(np.zeros((0, 1, 12, 12), np.float32), np.zeros(0, np.int64))
    loss, acc, predictions = evaluate(TrainedRun(run).model(), empty, 8)
    assert loss is None and acc is None and predictions.shape == (0,)
