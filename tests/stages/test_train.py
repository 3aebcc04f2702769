"""The train stage: artifacts, reproducibility, interruption and exact resumption, --force."""
import json
import os
import signal

import numpy as np
import pytest

import arraybn
from arraybn.core import NonFiniteStatisticsError
from arraybn.nn import Network
from arraybn.stages import StageError, TrainingInterrupted, run_train
from tests.conftest import CPU_BACKENDS
from tests.stages.helpers import (file_sha, history_rows, quiet, stage_leftovers, tiny_config,
                                  without_seconds)


def _train(run, data_dir, **kw):
    options = {k: kw.pop(k) for k in ("force", "resume", "on_step") if k in kw}
    return run_train(run, tiny_config(data_dir, **kw), echo=quiet, **options)


def test_train_writes_model_history_checkpoint_and_manifest(tmp_path, data_dir):
    run = tmp_path / "run"
    manifest = _train(run, data_dir)
    assert sorted(os.listdir(run / "train")) == ["checkpoint.json", "checkpoint.npz",
                                                 "history.csv", "manifest.json", "model.npz"]
    assert stage_leftovers(run) == [] and not (run / "train-checkpoint").exists()
    stored = json.loads((run / "train" / "manifest.json").read_text())
    assert stored == json.loads(json.dumps(manifest))
    assert stored["arraybn_version"] == arraybn.__version__ and stored["backend"] == "numpy"
    assert stored["config"]["epochs"] == 2 and stored["seed"] == 0
    assert stored["dataset"]["fingerprint"] and stored["dataset"]["sizes"]["train"] == 60
    assert set(stored["inputs"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                     "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    for name, digest in stored["outputs"].items():
        assert file_sha(run, "train", name) == digest
    rows = history_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                            "seconds"}
    with np.load(run / "train" / "model.npz") as model:
        assert model["conv1.weight"].shape == (6, 1, 3, 3)
        assert model["bn1.running_var"].shape == (6,)
        assert int(model["bn1.num_batches_tracked"]) == 2 * 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_seed_same_bytes(tmp_path, data_dir, backend):
    for name in ("a", "b"):
        _train(tmp_path / name, data_dir, backend=backend, epochs=1)
    _train(tmp_path / "c", data_dir, backend=backend, epochs=1, seed=1)
    assert file_sha(tmp_path / "a", "train", "model.npz") == file_sha(tmp_path / "b", "train",
                                                                      "model.npz")
    assert file_sha(tmp_path / "a", "train", "model.npz") != file_sha(tmp_path / "c", "train",
                                                                      "model.npz")


def _stop_at(epoch, step):
    def on_step(info):
        if (info["epoch"], info["step"]) == (epoch, step):
            raise KeyboardInterrupt
    return on_step


@pytest.mark.parametrize("epoch, step", [(1, 2), (2, 3), (1, 3)])   # 3 steps per epoch
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, data_dir, epoch, step):
    options = dict(epochs=3, dropout=0.3, augment=True)
    _train(tmp_path / "whole", data_dir, **options)
    run = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted, match=f"epoch {epoch}, step {step}.*--resume"):
        _train(run, data_dir, on_step=_stop_at(epoch, step), **options)
    assert not (run / "train").exists() and (run / "train-checkpoint").is_dir()
    manifest = run_train(run, None, resume=True, echo=quiet)
    assert manifest["resumed"] is True and not (run / "train-checkpoint").exists()
    assert file_sha(run, "train", "model.npz") == file_sha(tmp_path / "whole", "train", "model.npz")
    assert without_seconds(history_rows(run)) == without_seconds(history_rows(tmp_path / "whole"))


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt during the test, as in a terminal, also when pytest was
    started in the background (``nohup pytest &``), where SIGINT starts out ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_signal_stops_at_a_step_boundary(tmp_path, data_dir, ctrl_c_raises):
    _train(tmp_path / "whole", data_dir)
    run = tmp_path / "cut"

    def send_sigint(info):
        if info["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="epoch 1, step 1"):
        _train(run, data_dir, on_step=send_sigint)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    run_train(run, {}, resume=True, echo=quiet)
    assert file_sha(run, "train", "model.npz") == file_sha(tmp_path / "whole", "train", "model.npz")


def test_resume_refuses_changed_settings_and_missing_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    with pytest.raises(StageError, match="nothing to resume.*arraybn train"):
        run_train(run, None, resume=True, echo=quiet)
    with pytest.raises(TrainingInterrupted):
        _train(run, data_dir, on_step=_stop_at(1, 1))
    with pytest.raises(StageError, match=r"lr=0\.5 \(checkpoint: 0\.002\)"):
        run_train(run, {"lr": 0.5}, resume=True, echo=quiet)
    with pytest.raises(StageError, match="interrupted training run.*--resume"):
        _train(run, data_dir)


def test_the_init_is_recorded_and_kept_by_resume(tmp_path, data_dir):
    options = dict(init="kaiming-normal", bn="none")
    _train(tmp_path / "whole", data_dir, **options)
    run = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted):
        _train(run, data_dir, on_step=_stop_at(1, 2), **options)
    with pytest.raises(StageError, match=r"init='kaiming-uniform' \(checkpoint: "
                                         r"'kaiming-normal'\)"):
        run_train(run, {"init": "kaiming-uniform"}, resume=True, echo=quiet)
    manifest = run_train(run, None, resume=True, echo=quiet)
    assert manifest["config"]["init"] == "kaiming-normal"
    assert file_sha(run, "train", "model.npz") == file_sha(tmp_path / "whole", "train", "model.npz")
    default = _train(tmp_path / "default", data_dir, bn="none")
    assert default["config"]["init"] == "kaiming-uniform"
    assert file_sha(tmp_path / "default", "train", "model.npz") != file_sha(run, "train",
                                                                            "model.npz")


def test_resume_a_finished_run_with_more_epochs(tmp_path, data_dir):
    run = tmp_path / "run"
    _train(run, data_dir, epochs=1)
    with pytest.raises(StageError, match="already trained for 1 epochs"):
        run_train(run, {"epochs": 1}, resume=True, echo=quiet)
    manifest = run_train(run, {"epochs": 2}, resume=True, echo=quiet)
    assert manifest["metrics"]["epochs"] == 2 and len(history_rows(run)) == 2


def test_corrupt_checkpoint_is_reported(tmp_path, data_dir):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(run, data_dir, on_step=_stop_at(1, 1))
    (run / "train-checkpoint" / "checkpoint.npz").write_bytes(b"garbage")
    with pytest.raises(StageError, match="does not match.*--force"):
        run_train(run, None, resume=True, echo=quiet)


def test_existing_stage_needs_force_and_failed_retrain_keeps_it(tmp_path, data_dir):
    run = tmp_path / "run"
    _train(run, data_dir, epochs=1)
    before = file_sha(run, "train", "model.npz")
    with pytest.raises(StageError, match="already exists.*--force"):
        _train(run, data_dir, epochs=1)

    def fail(info):
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        _train(run, data_dir, epochs=1, seed=5, force=True, on_step=fail)
    assert file_sha(run, "train", "model.npz") == before and stage_leftovers(run) == []
    _train(run, data_dir, epochs=1, seed=5, force=True)
    assert file_sha(run, "train", "model.npz") != before


def test_non_finite_statistics_name_epoch_and_step(tmp_path, data_dir, monkeypatch):
    def broken_forward(self, x, training=True):
        raise NonFiniteStatisticsError("batch statistics are not finite", where="bn2")
    monkeypatch.setattr(Network, "forward", broken_forward)
    with pytest.raises(NonFiniteStatisticsError, match="epoch 1, step 1, bn2: batch statistics"):
        _train(tmp_path / "run", data_dir)


def test_invalid_settings_are_rejected_before_any_work(tmp_path, data_dir):
    with pytest.raises(ValueError, match="bn must be one of"):
        _train(tmp_path / "run", data_dir, bn="weird")
    with pytest.raises(ValueError, match="larger than the 60 training images"):
        _train(tmp_path / "run", data_dir, batch_size=64)
    assert not (tmp_path / "run" / "train").exists()


def test_train_subset_is_a_seeded_sample(tmp_path, data_dir):
    manifest = _train(tmp_path / "a", data_dir, epochs=1, train_subset=32)
    assert manifest["dataset"]["sizes"]["train"] == 32
    _train(tmp_path / "b", data_dir, epochs=1, train_subset=32)
    assert file_sha(tmp_path / "a", "train", "model.npz") == file_sha(tmp_path / "b", "train",
                                                                      "model.npz")


def test_second_ctrl_c_stops_at_once_keeping_the_epoch_checkpoint(tmp_path, data_dir,
                                                                  ctrl_c_raises):
    _train(tmp_path / "whole", data_dir)
    run = tmp_path / "cut"

    def press_twice(info):
        if (info["epoch"], info["step"]) == (2, 1):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(TrainingInterrupted,
                       match=r"second Ctrl-C \(SIGINT\); the checkpoint of the last"):
        _train(run, data_dir, on_step=press_twice)
    checkpoint = json.loads((run / "train-checkpoint" / "checkpoint.json").read_text())
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 0)
    run_train(run, None, resume=True, echo=quiet)
    assert file_sha(run, "train", "model.npz") == file_sha(tmp_path / "whole", "train", "model.npz")
