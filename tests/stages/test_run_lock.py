"""One writer per run directory (RUN/.lock), and temporaries of killed writers are removed."""
import os
import signal
import socket
import subprocess
import sys

import pytest

import arraybn.stages.pipeline
from arraybn.stages import StageError, run_pipeline, run_test, run_train
from arraybn.stages.artifacts import staging
from tests.cli.helpers import invoke
from tests.stages.helpers import quiet, stage_leftovers, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD_LOCK = """
import sys
from arraybn.stages.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""
TRY_LOCK = """
import sys
from arraybn.stages.run_lock import RunLocked, run_lock
try:
    with run_lock(sys.argv[1]):
        print("free")
except RunLocked as exc:
    print("taken:", exc)
"""
KILLED_WHILE_WRITING = """
import os, signal, sys
from arraybn.stages.artifacts import staging
with staging(sys.argv[1], "postproc") as tmp:
    open(os.path.join(tmp, "bn_stats.npz"), "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _python(code, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, text=True,
                            **kwargs)


@pytest.fixture
def lock_holder():
    """``hold(run)`` starts a process that holds RUN's lock until the test ends."""
    holders = []

    def hold(run):
        holder = _python(HOLD_LOCK, run, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return holder
    yield hold
    for holder in holders:
        if holder.poll() is None:
            holder.communicate("\n", timeout=60)


def _lock_state(run):
    """'free' or 'taken: <message>', as another process finds RUN's lock."""
    probe = _python(TRY_LOCK, run, stdout=subprocess.PIPE)
    return probe.communicate(timeout=60)[0].strip()


def test_a_second_train_on_a_locked_run_says_who_holds_it(tmp_path, data_dir, lock_holder):
    run = tmp_path / "run"
    holder = lock_holder(run)
    with pytest.raises(StageError) as error:
        run_train(run, tiny_config(data_dir), echo=quiet)
    message = str(error.value)
    assert f"{run} is in use by pid {holder.pid} on {socket.gethostname()}" in message
    assert "-c" in message and "started" in message and "Wait for it to finish" in message
    assert sorted(os.listdir(run)) == [".lock"]
    holder.communicate("\n", timeout=60)
    run_train(run, tiny_config(data_dir, epochs=1), echo=quiet)
    assert stage_leftovers(run) == [] and _lock_state(run) == "free"


def test_the_cli_refuses_a_locked_run_in_one_line(tmp_path, data_dir, lock_holder):
    run = tmp_path / "run"
    run_train(run, tiny_config(data_dir, epochs=1), echo=quiet)
    holder = lock_holder(run)
    for args in (["train", run, "--resume", "--epochs", 2], ["test", run],
                 ["postproc", run, "--force"]):
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert f"in use by pid {holder.pid}" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (run / "test").exists() and not (run / "postproc").exists()


def test_run_pipeline_holds_the_lock_across_its_stages(tmp_path, data_dir, monkeypatch):
    run, seen = tmp_path / "run", []
    real_test = arraybn.stages.pipeline.run_test

    def test_stage(*args, **kwargs):
        seen.append(_lock_state(run))
        return real_test(*args, **kwargs)
    monkeypatch.setattr(arraybn.stages.pipeline, "run_test", test_stage)
    run_pipeline(run, tiny_config(data_dir, epochs=1), echo=quiet)
    assert len(seen) == 1 and seen[0].startswith(f"taken: {run} is in use by pid {os.getpid()}")
    assert _lock_state(run) == "free"


def _temporary(run, name, pid, host=None):
    path = run / f"{name}-{host or socket.gethostname()}-{pid}"
    path.mkdir(parents=True)
    return path


def _dead_pid():
    child = _python("pass")
    child.wait(timeout=60)
    return child.pid


def test_a_stage_removes_temporaries_of_killed_writers_only(tmp_path, data_dir):
    run = tmp_path / "run"
    run_train(run, tiny_config(data_dir, epochs=1), echo=quiet)
    killed = _python(KILLED_WHILE_WRITING, run)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    left = stage_leftovers(run)
    assert left == [f".postproc.tmp-{socket.gethostname()}-{killed.pid}"]
    dead = _dead_pid()
    stale = [_temporary(run, ".train.tmp", dead),
             _temporary(run / "train-checkpoint", "checkpoint.npz.tmp", dead)]
    kept = [_temporary(run, ".test.tmp", os.getppid()),            # its writer still runs
            _temporary(run, ".test.tmp", dead, host="elsewhere"),  # cannot tell: another host
            run / ".train.tmp-k2j4hx9q"]                            # not named by its writer
    kept[-1].mkdir()
    run_test(run, echo=quiet)
    assert not (run / left[0]).exists() and not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert (run / "test" / "metrics.json").is_file()


def test_staging_names_its_writer(tmp_path):
    with staging(tmp_path / "run", "test") as tmp:
        assert os.path.basename(tmp) == f".test.tmp-{socket.gethostname()}-{os.getpid()}"
