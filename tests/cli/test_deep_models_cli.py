"""The deep models, GroupNorm and random crops from the command line, end to end on tiny data."""
import json

import numpy as np
import pytest

from arraybn.nn import build_model
from arraybn.stages.config import TrainConfig
from tests.cli.helpers import invoke


def _train(run, data_dir, *extra):
    return invoke("train", run, "--data-dir", data_dir, "--backend", "numpy", "--epochs", 1,
                  "--batch-size", 16, "--val-split", 0.25, "--eval-batch-size", 16, "--json",
                  *extra)


@pytest.mark.parametrize("extra", [
    ("--model", "vgg8", "--augment-crop", "2"),
    ("--model", "resnet", "--depth", "8", "--width", "4", "--bn", "group"),
    ("--model", "plain", "--depth", "4", "--width", "3", "--bn", "mean-only", "--augment",
     "--augment-crop", "1")])
def test_train_deep_models_and_load_the_weights_back(tmp_path, data_dir, extra):
    run = tmp_path / "run"
    result = _train(run, data_dir, *extra)
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert config["model"] == extra[1]
    with np.load(run / "train" / "model.npz") as weights:
        state = dict(weights)
    model = build_model(config["model"], backend="numpy", in_shape=(1, 12, 12),
                        **TrainConfig.from_dict(config).model_options())
    model.load_state_dict(state)
    assert set(state) == set(model.state_dict())


def test_deep_model_options_reach_the_model(tmp_path, data_dir):
    result = _train(tmp_path / "run", data_dir, "--model", "resnet", "--depth", "14",
                    "--width", "2")
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert (config["depth"], config["width"], config["augment_crop"]) == (14, 2, 0)
    with np.load(tmp_path / "run" / "train" / "model.npz") as weights:
        assert weights["layer1.1.conv2.weight"].shape == (2, 2, 3, 3)
        assert weights["fc.weight"].shape == (10, 8)


def test_the_init_option_reaches_the_manifest(tmp_path, data_dir):
    result = _train(tmp_path / "run", data_dir, "--model", "plain", "--depth", "4", "--width",
                    "3", "--bn", "none", "--init", "kaiming-normal")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["init"] == "kaiming-normal"
    wrong = _train(tmp_path / "other", data_dir, "--init", "xavier")
    assert wrong.exit_code == 2 and "'xavier' is not one of" in wrong.output


@pytest.mark.parametrize("extra,message", [
    (("--model", "resnet", "--depth", "10"), "6n + 2"),
    (("--model", "plain", "--dropout", "0.3"), "no hidden dense layer"),
    (("--augment-crop", "-1"), "augment-crop")])
def test_bad_deep_model_options_are_one_line_errors(tmp_path, data_dir, extra, message):
    result = _train(tmp_path / "run", data_dir, *extra)
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "run" / "train").exists()


def test_run_with_group_norm_has_no_batch_statistics_to_post_process(tmp_path, data_dir):
    run = tmp_path / "run"
    result = invoke("run", run, "--data-dir", data_dir, "--backend", "numpy", "--epochs", 1,
                    "--batch-size", 16, "--eval-batch-size", 16, "--model", "resnet",
                    "--depth", "8", "--width", "2", "--bn", "group")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir()) == ["test", "train"]
    assert "per-class accuracy" in result.output
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["stats"] == "none (group normalization: each image's own statistics)"
