"""SIGTERM to ``arraybn sweep --jobs 2`` (a real process): the parent forwards it to its
workers, whose trainings save a checkpoint; it exits 143 with one line once no worker is left,
and the same sweep command then resumes the runs."""
import json
import os
import signal
import subprocess
import sys
import time

from tests.cli.helpers import invoke

ARRAYBN = [sys.executable, "-c", "from arraybn_cli.main import cli; cli()"]
EPOCHS = 600          # of 2 steps each (~7 ms an epoch): far from done when the signal comes
SWEEP = """
[train]
data_dir = "{data}"
backend = "numpy"
bn = "none"
epochs = {epochs}
train_subset = 16
batch_size = 8
val_split = 0.25
eval_batch_size = 20
[grid]
seed = [0, 1]
"""


def _children(pid):
    """The pids of the live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = _stat(int(entry))
            if state is not None and state[1] == pid and state[0] != "Z":
                found.append(int(entry))
    return found


def _stat(pid):
    """``(state, parent pid)`` of ``pid`` from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def _alive(pid):
    state = _stat(pid)
    return state is not None and state[0] != "Z"        # a zombie has ended


def _wait_until(condition, job, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_stops_every_worker_and_the_sweep_resumes(data_dir, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.format(data=data_dir, epochs=EPOCHS))
    root = tmp_path / "runs"
    runs = [root / "seed0", root / "seed1"]
    job = subprocess.Popen(ARRAYBN + ["sweep", str(path), "--jobs", "2", "--root", str(root)],
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    workers = []
    try:
        _wait_until(lambda: all((run / "train-checkpoint" / "checkpoint.json").exists()
                                for run in runs), job)
        workers = _children(job.pid)
        assert len(workers) >= 2            # the runs' workers (+ multiprocessing's tracker)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=120)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _alive(pid)], "a worker outlived the sweep"
    finally:
        for pid in workers + [job.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert job.returncode == 143, out + err
    assert err.strip().splitlines() == [
        "Error: sweep interrupted by SIGTERM: 2 run(s) stopped in progress, 0 not started; run "
        "the same sweep command again to go on (an interrupted training resumes from its "
        "checkpoint)"]
    for run in runs:
        assert (run / "train-checkpoint" / "checkpoint.json").exists()
        assert not (run / "train").exists()
        assert "interrupted: training interrupted by SIGTERM" in (run / "sweep.log").read_text()

    again = invoke("sweep", path, "--jobs", "2", "--root", root)
    assert again.exit_code == 0, again.output
    for run in runs:
        manifest = json.loads((run / "train" / "manifest.json").read_text())
        assert manifest["resumed"] is True and manifest["metrics"]["epochs"] == EPOCHS
        assert "train: resuming the interrupted run" in (run / "sweep.log").read_text()
        assert not (run / "train-checkpoint").exists()
