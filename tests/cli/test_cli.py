"""The CLI through CliRunner: exit codes, messages (never tracebacks), files written."""
import json
import os

import pytest

import arraybn
import arraybn_cli.cmd_train
from tests.cli.helpers import invoke
from tests.stages.helpers import file_sha


def train_args(run, data_dir, *extra):
    return ["train", run, "--data-dir", data_dir, "--backend", "numpy", "--epochs", 2,
            "--batch-size", 16, "--val-split", 0.25, "--eval-batch-size", 16, *extra]


def test_info_lists_version_backends_and_datasets(data_dir):
    result = invoke("info", "--data-dir", data_dir)
    assert result.exit_code == 0
    assert arraybn.__version__ in result.output and "numpy  ok" in result.output
    report = json.loads(invoke("info", "--json", "--data-dir", data_dir).stdout)
    assert report["backends"]["numpy"] == "ok"
    assert report["datasets"]["mnist"]["found"] == data_dir


def test_train_writes_the_stage_and_refuses_to_overwrite(tmp_path, data_dir):
    run = tmp_path / "run"
    result = invoke(*train_args(run, data_dir))
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.stdout and "saved" in result.stdout
    assert (run / "train" / "model.npz").is_file()
    again = invoke(*train_args(run, data_dir))
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    assert invoke(*train_args(run, data_dir, "--force", "--seed", 3)).exit_code == 0


def test_json_output_is_the_only_thing_on_stdout(tmp_path, data_dir):
    result = invoke(*train_args(tmp_path / "run", data_dir, "--json"))
    assert result.exit_code == 0
    manifest = json.loads(result.stdout)
    assert manifest["stage"] == "train" and manifest["config"]["batch_size"] == 16
    assert "epoch 1/2" in result.stderr


def test_run_does_all_three_stages(tmp_path, data_dir):
    run = tmp_path / "run"
    result = invoke("run", run, "--data-dir", data_dir, "--backend", "numpy", "--epochs", 1,
                    "--batch-size", 16, "--eval-batch-size", 16, "--method", "ema",
                    "--postproc-batch-size", 8, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["postproc"]["postproc"]["method"] == "ema" and out["test"]["stats"] == "postproc"
    assert sorted(os.listdir(run)) == ["postproc", "test", "train"]


def test_run_without_bn_skips_postproc(tmp_path, data_dir):
    run = tmp_path / "run"
    result = invoke("run", run, "--data-dir", data_dir, "--backend", "numpy", "--epochs", 1,
                    "--batch-size", 16, "--bn", "none", "--model", "mlp", "--hidden", "32")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(run)) == ["test", "train"] and "per-class accuracy" in result.output


def test_postproc_then_test_with_each_statistics_choice(tmp_path, data_dir):
    run = tmp_path / "run"
    assert invoke(*train_args(run, data_dir, "--stats", "none")).exit_code == 0
    refused = invoke("test", run, "--stats", "running")
    assert refused.exit_code == 1 and "--stats none" in refused.output
    assert invoke("postproc", run, "--batch-size", 8, "--method", "average").exit_code == 0
    result = invoke("test", run, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["stats"] == "postproc"
    batch = invoke("test", run, "--stats", "batch", "--batch-size", 10, "--force")
    assert batch.exit_code == 0 and "batch statistics" in batch.output


def test_stage_without_its_input_says_which_command_makes_it(tmp_path):
    for command in ("postproc", "test"):
        result = invoke(command, tmp_path / "empty")
        assert result.exit_code == 1 and "no train stage" in result.output
        assert f"arraybn train {tmp_path / 'empty'}" in result.output


def test_missing_dataset_says_how_to_install(tmp_path):
    result = invoke("train", tmp_path / "run", "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert "apt-get install dataset-fashion-mnist" in result.output
    assert not (tmp_path / "run" / "train").exists()


def test_modified_model_is_reported(tmp_path, data_dir):
    run = tmp_path / "run"
    invoke(*train_args(run, data_dir))
    with open(run / "train" / "model.npz", "ab") as f:
        f.write(b"x")
    result = invoke("test", run)
    assert result.exit_code == 1 and "corrupt or was modified" in result.output


def test_bad_option_values_are_usage_errors(tmp_path, data_dir):
    assert invoke(*train_args(tmp_path / "r", data_dir, "--bn", "weird")).exit_code == 2
    result = invoke(*train_args(tmp_path / "r", data_dir, "--hidden", "a,b"))
    assert result.exit_code == 2 and "comma-separated" in result.output


class _InterruptAt:
    """Stands in for the progress bar; raises KeyboardInterrupt at one step, like Ctrl-C."""

    def __init__(self, epoch, step):
        self.at = (epoch, step)

    def __call__(self, info):
        if (info["epoch"], info["step"]) == self.at:
            raise KeyboardInterrupt

    def close(self):
        pass


def test_ctrl_c_then_resume_gives_the_uninterrupted_model(tmp_path, data_dir, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert invoke(*train_args(whole, data_dir, "--dropout", 0.2)).exit_code == 0
    monkeypatch.setattr(arraybn_cli.cmd_train, "EpochProgress", lambda: _InterruptAt(2, 1))
    stopped = invoke(*train_args(cut, data_dir, "--dropout", 0.2))
    assert stopped.exit_code == 130
    assert f"arraybn train {cut} --resume" in stopped.output
    monkeypatch.undo()
    conflict = invoke("train", cut, "--resume", "--lr", 0.5)
    assert conflict.exit_code == 1 and "cannot resume" in conflict.output
    resumed = invoke("train", cut, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert file_sha(cut, "train", "model.npz") == file_sha(whole, "train", "model.npz")


def test_info_reports_a_bad_backend_override_instead_of_failing(tmp_path, monkeypatch):
    monkeypatch.setenv("ARRAYBN_BACKEND", "tpu")
    result = invoke("info", "--json")
    assert result.exit_code == 0
    assert "unknown backend 'tpu'" in json.loads(result.stdout)["default_backend"]
    train = invoke("train", tmp_path / "run")
    assert train.exit_code == 1 and "unknown backend 'tpu'" in train.output
