"""Faults during training: a full disk while saving, and divergence."""
import errno
import os
import re
import warnings

import numpy as np
import pytest

from arraybn.core import NonFiniteStatisticsError
from arraybn.nn.layers import Dense
from arraybn.stages import StageError, TrainingInterrupted, run_train
from arraybn.stages.divergence import TrainingDiverged
from arraybn.stages.train import has_checkpoint, read_divergence
from tests.stages.helpers import file_sha, quiet, stage_leftovers, tiny_config


def _train(run, data_dir, **kw):
    options = {k: kw.pop(k) for k in ("force", "resume", "on_step") if k in kw}
    return run_train(run, tiny_config(data_dir, **kw), echo=quiet, **options)


def _disk_fills_up(monkeypatch, armed):
    """Once ``armed`` is non-empty, every .npy written into an archive stops half-way with
    ENOSPC, as on a full disk."""
    real_write = np.lib.format.write_array

    def write_array(f, array, *args, **kwargs):
        if armed:
            f.write(b"\x93NUMPY" + b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(f, array, *args, **kwargs)
    monkeypatch.setattr(np.lib.format, "write_array", write_array)


def _arm_at(armed, epoch, step):
    def on_step(info):
        if (info["epoch"], info["step"]) == (epoch, step):
            armed.append(True)
    return on_step


def test_disk_full_at_a_checkpoint_keeps_the_previous_one_and_says_what_to_do(
        tmp_path, data_dir, monkeypatch):
    _train(tmp_path / "whole", data_dir, epochs=3)
    run, armed = tmp_path / "run", []
    _disk_fills_up(monkeypatch, armed)
    with pytest.raises(StageError) as error:
        _train(run, data_dir, epochs=3, on_step=_arm_at(armed, 2, 3))     # 3 steps per epoch
    message = str(error.value)
    assert os.path.join(str(run), "train-checkpoint", "checkpoint.npz") in message
    assert "end of epoch 2" in message and "No space left on device" in message
    assert "Free space" in message and f"arraybn train {run} --resume" in message
    assert "epoch 1" in message and "--force" in message
    assert sorted(os.listdir(run / "train-checkpoint")) == ["checkpoint.json", "checkpoint.npz"]
    monkeypatch.undo()
    with pytest.raises(StageError, match="interrupted training run.*--resume"):
        _train(run, data_dir, epochs=3)
    run_train(run, None, resume=True, echo=quiet)
    assert file_sha(run, "train", "model.npz") == file_sha(tmp_path / "whole", "train",
                                                           "model.npz")


def test_disk_full_at_the_first_checkpoint_leaves_nothing_to_resume(tmp_path, data_dir,
                                                                    monkeypatch):
    run, armed = tmp_path / "run", []
    _disk_fills_up(monkeypatch, armed)
    with pytest.raises(StageError) as error:
        _train(run, data_dir, epochs=3, on_step=_arm_at(armed, 1, 3))
    assert "no checkpoint was kept" in str(error.value)
    assert f"`arraybn train {run}`" in str(error.value)
    assert os.listdir(run) == []
    monkeypatch.undo()
    with pytest.raises(StageError, match="nothing to resume"):
        run_train(run, None, resume=True, echo=quiet)
    _train(run, data_dir, epochs=1)          # plain train agrees: there is nothing to continue


def test_disk_full_while_writing_the_stage_names_the_file_and_keeps_the_old_stage(
        tmp_path, data_dir, monkeypatch):
    run, armed = tmp_path / "run", []
    _train(run, data_dir, epochs=1)
    before = file_sha(run, "train", "model.npz")
    _disk_fills_up(monkeypatch, armed)
    with pytest.raises(StageError) as error:
        _train(run, data_dir, epochs=2, seed=3, force=True, on_step=_arm_at(armed, 2, 3))
    message = str(error.value)
    assert "model.npz" in message and "No space left on device" in message
    assert f"arraybn train {run} --resume" in message and "end of epoch 1" in message
    monkeypatch.undo()
    assert file_sha(run, "train", "model.npz") == before and stage_leftovers(run) == []
    assert sorted(os.listdir(run / "train-checkpoint")) == ["checkpoint.json", "checkpoint.npz"]


def test_an_exploding_loss_is_divergence_without_numpy_warnings(tmp_path, data_dir):
    run = tmp_path / "run"
    _train(run, data_dir, epochs=1)
    before = file_sha(run, "train", "model.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TrainingDiverged) as error:
            _train(run, data_dir, epochs=3, optimizer="adam", lr=1e6, force=True)
    message = str(error.value)
    assert re.search(r"training diverged at epoch \d, step \d: the loss is \S+, above 230 "
                     r"\(100 x log 10 for 10 classes", message), message
    assert f"{run}/train is as it was" in message and "Lower --lr (it was 1e+06)" in message
    assert file_sha(run, "train", "model.npz") == before and stage_leftovers(run) == []
    assert read_divergence(run)["config"]["lr"] == 1e6


def test_a_run_that_diverges_before_its_first_checkpoint_is_recorded(tmp_path, data_dir):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="the divergence is recorded in") as error:
        _train(run, data_dir, epochs=3, optimizer="adam", lr=1e6)
    record = read_divergence(run)
    assert record["epoch"] == 1 and 1 <= record["step"] <= 3            # 3 steps per epoch
    assert record["error"].startswith(f"training diverged at epoch 1, step {record['step']}: ")
    assert record["error"] in str(error.value) and record["config"]["lr"] == 1e6
    assert not (run / "train").exists() and not has_checkpoint(run) and stage_leftovers(run) == []
    with pytest.raises(StageError, match="diverged before its first checkpoint.*--force --lr"):
        run_train(run, None, resume=True, echo=quiet)
    with pytest.raises(StageError, match="holds a run that diverged.*--force"):
        _train(run, data_dir, epochs=1)
    _train(run, data_dir, epochs=1, force=True)
    assert read_divergence(run) is None and not (run / "train-checkpoint").exists()


def test_a_divergence_in_the_validation_has_no_step(tmp_path, data_dir, monkeypatch):
    def overflowing(*args):
        raise FloatingPointError("overflow")
    monkeypatch.setattr("arraybn.stages.training_loop.evaluate", overflowing)
    with pytest.raises(TrainingDiverged, match="validation loss at its end is not finite"):
        _train(tmp_path / "run", data_dir)
    record = read_divergence(tmp_path / "run")
    assert (record["epoch"], record["step"]) == (1, None)


def _poison(monkeypatch, layer_name, armed, where="forward"):
    """Once ``armed``, layer ``layer_name``'s output (or its weight's gradient) becomes NaN."""
    real = getattr(Dense, where)

    def poisoned(self, *args):
        out = real(self, *args)
        if self.name == layer_name and armed:
            if where == "forward":
                out[0, 0] = np.nan
            else:
                self.weight.grad[0, 0] = np.nan
        return out
    monkeypatch.setattr(Dense, where, poisoned)


def test_a_nan_loss_names_epoch_step_and_the_first_non_finite_layer(tmp_path, data_dir,
                                                                    monkeypatch):
    _poison(monkeypatch, "fc2", [True])
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 1: the loss is not finite; "
                                               r"the first output that is not finite is that "
                                               r"of layer \d+ \(fc2\)"):
        _train(tmp_path / "run", data_dir, bn="none")


def test_a_non_finite_gradient_names_the_parameter(tmp_path, data_dir, monkeypatch):
    _poison(monkeypatch, "fc1", [True], where="backward")
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1: the gradient of fc1.weight is "
                                               "not finite"):
        _train(tmp_path / "run", data_dir)


def test_resume_refuses_a_checkpoint_that_diverged_and_train_agrees(tmp_path, data_dir,
                                                                    monkeypatch):
    run, armed = tmp_path / "run", []
    _poison(monkeypatch, "fc2", armed)
    with pytest.raises(NonFiniteStatisticsError, match="epoch 2, step 2, bn4: .*no model was "
                                                       "written; the divergence is recorded in "
                                                       ".*diverged.json. Lower --lr"):  # BN saw it
        _train(run, data_dir, epochs=3, on_step=_arm_at(armed, 2, 1))
    monkeypatch.undo()
    with pytest.raises(StageError, match="diverged after its checkpoint.*--force --lr"):
        run_train(run, None, resume=True, echo=quiet)
    with pytest.raises(StageError, match="holds a run that diverged.*--force"):
        _train(run, data_dir, epochs=3)
    with pytest.raises(TrainingInterrupted):          # a new run's checkpoint replaces the mark
        _train(run, data_dir, epochs=3, lr=1e-3, force=True, on_step=_stop_at(2, 1))
    run_train(run, None, resume=True, echo=quiet)
    assert (run / "train" / "model.npz").is_file() and not (run / "train-checkpoint").exists()


def _stop_at(epoch, step):
    def on_step(info):
        if (info["epoch"], info["step"]) == (epoch, step):
            raise KeyboardInterrupt
    return on_step
