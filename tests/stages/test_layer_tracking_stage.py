"""--track-layers in the train stage: bit-identical training, layers.csv, manifest, resume."""
import csv
import json

import pytest

from arraybn.stages import TrainingInterrupted, run_train
from arraybn.stages import layer_tracking
from tests.conftest import CPU_BACKENDS
from tests.stages.helpers import file_sha, history_rows, quiet, tiny_config, without_seconds

CONFIGS = {
    "lenet5-adam-dropout-augment": dict(dropout=0.3, augment=True),
    "mlp-sgd-renorm-after": dict(model="mlp", hidden=(12, 10), optimizer="sgd", bn="renorm",
                                 bn_position="after"),
    "resnet8-ghost": dict(model="resnet", depth=8, width=2, bn="ghost", ghost_batch_size=8),
    "resnet8-full": dict(model="resnet", depth=8, width=2),     # fused blocks on numba
}


def _train(run, data_dir, **kw):
    options = {k: kw.pop(k) for k in ("force", "resume", "on_step") if k in kw}
    return run_train(run, tiny_config(data_dir, **kw), echo=quiet, **options)


def _layer_rows(run):
    with open(run / "train" / "layers.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tracking_trains_bit_identically(tmp_path, data_dir, backend, name):
    options = dict(CONFIGS[name], backend=backend)
    _train(tmp_path / "plain", data_dir, **options)
    _train(tmp_path / "tracked", data_dir, track_layers=True, track_every=1, **options)
    assert (file_sha(tmp_path / "plain", "train", "model.npz")
            == file_sha(tmp_path / "tracked", "train", "model.npz"))
    assert (without_seconds(history_rows(tmp_path / "plain"))
            == without_seconds(history_rows(tmp_path / "tracked")))
    rows = _layer_rows(tmp_path / "tracked")
    assert sorted({int(r["step"]) for r in rows}) == list(range(6))   # 2 epochs x 3 steps
    metrics = {r["metric"] for r in rows}
    assert metrics == {"p15", "p50", "p85", "grad_norm", "ics_l2", "ics_cos"}


def test_layers_csv_is_an_output_of_the_stage(tmp_path, data_dir):
    run = tmp_path / "run"
    manifest = _train(run, data_dir, track_layers=True, track_every=2)
    stored = json.loads((run / "train" / "manifest.json").read_text())
    assert stored["outputs"]["layers.csv"] == file_sha(run, "train", "layers.csv")
    assert stored["config"]["track_layers"] is True and stored["config"]["track_every"] == 2
    tracking = manifest["layer_tracking"]
    assert tracking["layers"] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert tracking["every"] == 2 and tracking["percentiles"] == [15, 50, 85]
    rows = _layer_rows(run)
    assert list(rows[0]) == ["step", "epoch", "layer", "metric", "value"]
    assert sorted({(int(r["step"]), int(r["epoch"])) for r in rows}) == [(0, 1), (2, 1), (4, 2)]
    per_step = [r for r in rows if r["step"] == "2"]
    assert len(per_step) == 4 * 3 + 5 + 4 * 2     # percentiles (4 ReLUs), norms (5), ICS (4)


def test_without_tracking_nothing_is_measured_or_written(tmp_path, data_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a layer tracker was made without --track-layers")
    monkeypatch.setattr(layer_tracking.LayerTracker, "__init__", refuse)
    manifest = _train(tmp_path / "run", data_dir)
    assert not (tmp_path / "run" / "train" / "layers.csv").exists()
    assert "layers.csv" not in manifest["outputs"] and "layer_tracking" not in manifest


def _stop_at(epoch, step):
    def on_step(info):
        if (info["epoch"], info["step"]) == (epoch, step):
            raise KeyboardInterrupt
    return on_step


@pytest.mark.parametrize("epoch, step", [(1, 2), (2, 3)])
def test_an_interrupted_run_resumes_its_layers_csv(tmp_path, data_dir, epoch, step):
    options = dict(epochs=3, dropout=0.3, track_layers=True, track_every=1)
    _train(tmp_path / "whole", data_dir, **options)
    run = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted):
        _train(run, data_dir, on_step=_stop_at(epoch, step), **options)
    run_train(run, None, resume=True, echo=quiet)
    assert file_sha(run, "train", "layers.csv") == file_sha(tmp_path / "whole", "train",
                                                            "layers.csv")
    assert file_sha(run, "train", "model.npz") == file_sha(tmp_path / "whole", "train",
                                                           "model.npz")


def test_training_a_finished_run_further_continues_its_layers_csv(tmp_path, data_dir):
    run = tmp_path / "run"
    _train(run, data_dir, epochs=1, track_layers=True, track_every=1)
    first = _layer_rows(run)
    run_train(run, {"epochs": 2}, resume=True, echo=quiet)
    rows = _layer_rows(run)
    assert rows[:len(first)] == first
    assert sorted({int(r["step"]) for r in rows}) == list(range(6))
