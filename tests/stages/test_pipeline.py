"""run_pipeline: train -> postproc -> test, as ``arraybn run`` (replace) and sweeps (keep done)."""
import os

import pytest

from arraybn.stages import PostprocConfig, StageError, TestConfig, run_pipeline
from tests.stages.helpers import quiet, tiny_config


def _mtimes(run):
    return {stage: os.stat(run / stage / name).st_mtime_ns
            for stage, name in (("train", "manifest.json"), ("postproc", "manifest.json"),
                                ("test", "metrics.json"))}


def test_pipeline_makes_every_stage_with_the_given_options(tmp_path, data_dir):
    run = tmp_path / "run"
    results = run_pipeline(run, tiny_config(data_dir), PostprocConfig(method="ema", batches=2),
                           TestConfig(stats="batch", batch_size=15), echo=quiet)
    assert results["postproc"]["postproc"]["method"] == "ema"
    assert results["postproc"]["postproc"]["batches"] == 2
    assert results["test"]["stats"] == "batch" and results["test"]["batch_size"] == 15
    assert sorted(os.listdir(run)) == ["postproc", "test", "train"]


def test_a_model_without_bn_gets_no_postproc_and_tests_with_its_eval_batch_size(tmp_path,
                                                                                data_dir):
    run = tmp_path / "run"
    results = run_pipeline(run, tiny_config(data_dir, bn="none", eval_batch_size=10), echo=quiet)
    assert results["postproc"] is None and not (run / "postproc").exists()
    assert results["test"]["batch_size"] == 10


def test_without_keep_done_a_finished_train_stage_is_an_error_unless_forced(tmp_path, data_dir):
    run = tmp_path / "run"
    run_pipeline(run, tiny_config(data_dir), echo=quiet)
    with pytest.raises(StageError, match="--force"):
        run_pipeline(run, tiny_config(data_dir), echo=quiet)
    before = _mtimes(run)
    run_pipeline(run, tiny_config(data_dir), force=True, echo=quiet)
    after = _mtimes(run)
    assert all(after[stage] != before[stage] for stage in before)


def test_keep_done_keeps_finished_stages_and_redoes_those_named_and_after(tmp_path, data_dir):
    run = tmp_path / "run"
    run_pipeline(run, tiny_config(data_dir), keep_done=True, echo=quiet)
    before = _mtimes(run)
    kept = run_pipeline(run, tiny_config(data_dir), keep_done=True, echo=quiet)
    assert kept == {"train": None, "postproc": None, "test": None} and _mtimes(run) == before
    redone = run_pipeline(run, tiny_config(data_dir), PostprocConfig(batch_size=8),
                          keep_done=True, redo={"postproc"}, echo=quiet)
    assert redone["train"] is None and redone["postproc"]["postproc"]["batch_size"] == 8
    after = _mtimes(run)
    assert after["train"] == before["train"] and after["test"] != before["test"]


def test_keep_done_resumes_an_interrupted_training(tmp_path, data_dir):
    run = tmp_path / "run"

    def stop_in_epoch_two(info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(run, tiny_config(data_dir), echo=quiet, on_step=stop_in_epoch_two)
    assert (run / "train-checkpoint").is_dir() and not (run / "train").exists()
    messages = []
    results = run_pipeline(run, tiny_config(data_dir), keep_done=True, echo=messages.append)
    assert "train: resuming the interrupted run" in messages
    assert results["train"]["metrics"]["epochs"] == 2 and results["test"] is not None
