"""Ctrl-C (SIGINT) and SIGTERM end every stage alike: a message, nothing written, 130 / 143."""
import os
import shutil
import signal

import pytest

import arraybn.stages.postproc
import arraybn.stages.testing
from arraybn.stages import StageInterrupted, TrainingInterrupted, run_postproc, run_test, run_train
from tests.cli.helpers import invoke
from tests.stages.helpers import file_sha, quiet, stage_leftovers, tiny_config


@pytest.fixture(autouse=True)
def signals_have_their_default_handlers():
    """Ctrl-C raises KeyboardInterrupt and SIGTERM ends the process, as in a terminal, even when
    pytest runs in the background (``nohup pytest &`` starts it with SIGINT ignored)."""
    previous = {signum: signal.signal(signum, handler) for signum, handler in
                ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A run with train and postproc; tests copy it."""
    run = tmp_path_factory.mktemp("runs") / "finished"
    run_train(run, tiny_config(data_dir), echo=quiet)
    run_postproc(run, batch_size=8, echo=quiet)
    return run


@pytest.fixture
def run(tmp_path, finished):
    return shutil.copytree(finished, tmp_path / "run")


def _send(signum, at=(1, 2)):
    def on_step(info):
        if (info["epoch"], info["step"]) == at:
            os.kill(os.getpid(), signum)
    return on_step


def test_sigterm_in_training_saves_a_checkpoint_like_ctrl_c(tmp_path, data_dir):
    run_train(tmp_path / "whole", tiny_config(data_dir), echo=quiet)
    run = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted, match="SIGTERM at epoch 1, step 2.*--resume") as stop:
        run_train(run, tiny_config(data_dir), echo=quiet, on_step=_send(signal.SIGTERM))
    assert stop.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    run_train(run, None, resume=True, echo=quiet)
    assert file_sha(run, "train", "model.npz") == file_sha(tmp_path / "whole", "train",
                                                           "model.npz")


def test_ctrl_c_in_training_exits_130(tmp_path, data_dir):
    with pytest.raises(TrainingInterrupted, match=r"Ctrl-C \(SIGINT\) at epoch 1") as stop:
        run_train(tmp_path / "run", tiny_config(data_dir), echo=quiet,
                  on_step=_send(signal.SIGINT))
    assert stop.value.exit_code == 130


def test_ignored_signals_stay_ignored(tmp_path, data_dir):
    """A parent that ignores SIGINT/SIGTERM (nohup, a background job) keeps training going."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    manifest = run_train(tmp_path / "run", tiny_config(data_dir), echo=quiet,
                         on_step=_send(signal.SIGTERM))
    os.kill(os.getpid(), signal.SIGINT)
    assert manifest["metrics"]["epochs"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


@pytest.mark.parametrize("signum, code, words", [(signal.SIGINT, 130, r"Ctrl-C \(SIGINT\)"),
                                                 (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_in_postproc_writes_nothing(run, monkeypatch, signum, code, words):
    before = file_sha(run, "postproc", "bn_stats.npz")
    real_save = arraybn.stages.postproc.save_npz

    def save_then_signal(path, arrays):
        real_save(path, arrays)
        os.kill(os.getpid(), signum)
    monkeypatch.setattr(arraybn.stages.postproc, "save_npz", save_then_signal)
    with pytest.raises(StageInterrupted, match=f"postproc interrupted by {words}; nothing was "
                                               f"written") as stop:
        run_postproc(run, batch_size=4, method="average", force=True, echo=quiet)
    assert stop.value.exit_code == code
    assert file_sha(run, "postproc", "bn_stats.npz") == before and stage_leftovers(run) == []


def test_a_signal_in_test_writes_nothing(run, monkeypatch):
    real_evaluate = arraybn.stages.testing.evaluate

    def evaluate_then_signal(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args)
    monkeypatch.setattr(arraybn.stages.testing, "evaluate", evaluate_then_signal)
    with pytest.raises(StageInterrupted, match="test interrupted by SIGTERM") as stop:
        run_test(run, echo=quiet)
    assert stop.value.exit_code == 143
    assert not (run / "test").exists() and stage_leftovers(run) == []


def test_the_cli_exits_130_or_143_with_one_line_for_every_stage(run, data_dir, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(arraybn.stages.postproc, "collect_statistics", interrupt)
    result = invoke("postproc", run, "--force")
    assert result.exit_code == 130 and "Aborted" not in result.output
    assert "postproc interrupted by Ctrl-C (SIGINT); nothing was written" in result.output
    monkeypatch.undo()
    cut = run.parent / "cut"
    monkeypatch.setattr("arraybn_cli.cmd_train.EpochProgress",
                        lambda: _Signal(signal.SIGTERM))
    result = invoke("train", cut, "--data-dir", data_dir, "--backend", "numpy", "--epochs", 1,
                    "--batch-size", 16, "--val-split", 0.25)
    assert result.exit_code == 143, result.output
    assert f"arraybn train {cut} --resume" in result.output
    assert len(result.output.strip().splitlines()) == 1


class _Signal:
    """Stands in for the progress bar and sends ``signum`` to this process at the first step."""

    def __init__(self, signum):
        self.signum = signum

    def __call__(self, info):
        if info["step"] == 1:
            os.kill(os.getpid(), self.signum)

    def close(self):
        pass
