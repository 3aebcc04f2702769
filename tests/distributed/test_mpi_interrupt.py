"""Ctrl-C under a real ``mpiexec``: SIGINT to the launcher reaches every rank (Open MPI 5's
prterun passes it on as SIGTERM and SIGKILLs the ranks about 0.2 s later), the ranks stop at
the same step and rank 0 saves a checkpoint if that fits in the grace period (else the last
epoch's checkpoint stays: saves are atomic), and ``mpiexec -n K arraybn train RUN --resume``
continues to the model an uninterrupted job trains (float64, constant learning rate, so that
``--epochs`` does not change the schedule)."""
import json
import os
import signal
import subprocess
import time

import numpy as np

from tests.data.idx_files import write_dataset
from tests.distributed.test_mpi import MPIEXEC, REPO, pytestmark  # noqa: F401 - skips
from tests.distributed.test_mpi_training import ARRAYBN, RTOL, _env, _state, arraybn

TRAIN = ["--model", "mlp", "--hidden", "16", "--batch-size", "8", "--dtype", "float64",
         "--backend", "numpy", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "constant",
         "--val-split", "0.1", "--eval-batch-size", "20"]


def _interrupt_after_first_checkpoint(run, data, timeout=120):
    """Start a long ``mpiexec -n 2 arraybn train``, SIGINT the launcher once the first
    checkpoint exists; returns the job's (returncode, stderr)."""
    job = subprocess.Popen([MPIEXEC, "-n", "2", "--oversubscribe"] + ARRAYBN +
                           ["train", str(run), "--data-dir", str(data), "--epochs", "100"] + TRAIN,
                           cwd=REPO, env=_env(), text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (run / "train-checkpoint" / "checkpoint.json").exists():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    return job.returncode, err


def test_sigint_to_mpiexec_saves_a_checkpoint_and_resume_continues_exactly(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=400, n_test=30, size=12)
    code, err = _interrupt_after_first_checkpoint(tmp_path / "cut", data)
    assert code != 0, err
    assert (tmp_path / "cut" / "train-checkpoint" / "checkpoint.npz").is_file()
    assert not (tmp_path / "cut" / "train").exists()
    # on a quiet machine the job may get past a few epochs before the signal lands
    checkpoint = json.loads((tmp_path / "cut" / "train-checkpoint" / "checkpoint.json").read_text())
    epochs = str(max(3, checkpoint["epoch"] + 2))
    code, out, err = arraybn(2, "train", str(tmp_path / "cut"), "--resume", "--epochs", epochs)
    assert code == 0, f"{out}\n{err}"
    code, out, err = arraybn(2, "train", str(tmp_path / "whole"), "--data-dir", str(data),
                             "--epochs", epochs, *TRAIN)
    assert code == 0, f"{out}\n{err}"
    resumed, whole = _state(tmp_path / "cut"), _state(tmp_path / "whole")
    for key in whole:
        np.testing.assert_allclose(resumed[key], whole[key], rtol=RTOL, atol=1e-12, err_msg=key)
