"""``mpiexec -n K arraybn train|postproc|test`` end to end (float64, tiny synthetic data): K
processes give the one-process model, statistics and metrics; a failing rank ends the job.
Every run is shared between the asserts that use it (a module-scoped cache)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.data.idx_files import write_dataset
from tests.distributed.test_mpi import MPIEXEC, REPO, pytestmark  # noqa: F401 - skips

ARRAYBN = [sys.executable, "-c", "from arraybn_cli.main import cli; cli()"]
RTOL = 1e-9
COMMON = ["--dtype", "float64", "--epochs", "1", "--backend", "numba", "--val-split", "0.1",
          "--optimizer", "sgd", "--lr", "0.05", "--schedule", "constant", "--eval-batch-size",
          "20"]


def _env():
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMPI_MCA_rmaps_base_oversubscribe="1", NUMBA_NUM_THREADS="1")


def arraybn(ranks, *args, timeout=120):
    """(returncode, stdout, stderr) of ``[mpiexec -n ranks] arraybn args``; fails on a hang."""
    launch = [MPIEXEC, "-n", str(ranks), "--oversubscribe"] if ranks > 1 else []
    job = subprocess.Popen(launch + ARRAYBN + list(args), cwd=REPO, env=_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        pytest.fail(f"arraybn {' '.join(args)} on {ranks} still ran after {timeout} s\n{err}")
    return job.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> run directory, trained on demand once per module."""
    root = tmp_path_factory.mktemp("mpi_training")
    data = write_dataset(root / "data", n_train=140, n_test=30, size=12)
    done = {}

    def run(ranks, *options):
        key = (ranks,) + options
        if key not in done:
            directory = root / f"run{len(done)}"
            code, out, err = arraybn(ranks, "train", str(directory), "--data-dir", str(data),
                                     *COMMON, *options)
            assert code == 0, f"{out}\n{err}"
            done[key] = directory
        return done[key]
    run.data = data
    return run


def _state(run):
    with np.load(run / "train" / "model.npz") as f:
        return dict(f)


def _assert_same_model(got, want, keys=None):
    for key in keys or want:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("ranks, options", [
    (2, ("--model", "mlp", "--hidden", "32,16", "--batch-size", "32")),
    (3, ("--model", "lenet5", "--batch-size", "64", "--dropout", "0.2")),   # 22/21/21 rows
    (3, ("--model", "mlp", "--hidden", "16", "--batch-size", "2", "--train-subset", "12")),
], ids=["mlp K=2", "lenet5 K=3 uneven", "mlp K=3 empty slice"])
def test_mpi_ranks_train_the_one_process_model(runs, ranks, options):
    one, many = runs(1, *options), runs(ranks, *options)
    _assert_same_model(_state(many), _state(one))
    manifest = json.loads((many / "train" / "manifest.json").read_text())
    assert manifest["parallel"]["world_size"] == ranks
    assert manifest["parallel"]["bn_sync"] == "all" and manifest["parallel"]["mpi_library"]
    history = [json.loads((r / "train" / "manifest.json").read_text())["metrics"]
               for r in (one, many)]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert history[1][key] == pytest.approx(history[0][key], rel=RTOL), key


def test_bn_sync_local_equals_ghost_batches_of_half_the_batch(runs):
    lenet = ("--model", "lenet5", "--batch-size", "32")
    ghost = runs(1, *lenet, "--bn", "ghost", "--ghost-batch-size", "16")
    local = runs(2, *lenet, "--bn-sync", "local")
    want = _state(ghost)
    _assert_same_model(_state(local), want, [k for k in want if "running" not in k
                                             and "tracked" not in k])


def test_resume_with_another_number_of_processes_says_what_to_do(runs):
    run = runs(2, "--model", "mlp", "--hidden", "32,16", "--batch-size", "32")
    code, _, err = arraybn(1, "train", str(run), "--resume", "--epochs", "2")
    assert code != 0
    assert "trained by 2 process(es) and this job has 1" in err and "mpiexec -n 2" in err


def test_a_failing_rank_ends_the_job_within_10_s_with_its_message(runs, tmp_path):
    started = time.monotonic()
    code, _, err = arraybn(2, "train", str(tmp_path / "bad"), "--data-dir", str(runs.data),
                           *COMMON, "--batch-size", "32", "--bn-sync", "3", timeout=30)
    assert code != 0 and time.monotonic() - started < 10
    assert "rank 0 of 2 failed" in err or "rank 1 of 2 failed" in err
    assert "group size 3 does not divide the 2 processes" in err
    assert "Traceback" not in err                        # a user error: one line
    assert not (tmp_path / "bad" / "train").exists()


BREAK_RANK_1 = ("import os\n"
                "from arraybn.stages import training_loop\n"
                "def broken(self):\n"
                "    raise ValueError('rank 1 broke on purpose')\n"
                "if os.environ.get('OMPI_COMM_WORLD_RANK') == '1':\n"
                "    training_loop.Trainer._end_epoch = broken\n"
                "from arraybn_cli.main import cli; cli()")


def test_an_error_on_one_rank_ends_every_rank_with_its_traceback(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ARRAYBN", [sys.executable, "-c", BREAK_RANK_1])
    started = time.monotonic()
    code, _, err = arraybn(2, "train", str(tmp_path / "bad"), "--data-dir", str(runs.data),
                           *COMMON, "--batch-size", "32", timeout=30)
    assert code != 0 and time.monotonic() - started < 10     # rank 0 waited in a collective
    assert "rank 1 of 2 failed" in err and "ValueError: rank 1 broke on purpose" in err
    assert not (tmp_path / "bad" / "train").exists()


def _stage(ranks, *args):
    code, out, err = arraybn(ranks, *args, "--force", "--backend", "numba")
    assert code == 0, f"{out}\n{err}"


def test_postproc_exact_and_test_under_mpi_equal_one_process(runs):
    run = str(runs(1, "--model", "lenet5", "--batch-size", "32"))
    results = {}
    for ranks in (1, 2):                  # postproc batches 50, 50, 26; test batches 7, ..., 2
        _stage(ranks, "postproc", run, "--method", "exact", "--batch-size", "50")
        with np.load(os.path.join(run, "postproc", "bn_stats.npz")) as f:
            stats = dict(f)
        metrics = {}
        for which in ("postproc", "batch"):
            _stage(ranks, "test", run, "--stats", which, "--batch-size", "7")
            with open(os.path.join(run, "test", "metrics.json")) as f:
                metrics[which] = json.load(f)
        results[ranks] = stats, metrics
    (stats_1, metrics_1), (stats_2, metrics_2) = results[1], results[2]
    _assert_same_model(stats_2, stats_1)
    for which in ("postproc", "batch"):
        assert metrics_2[which]["confusion_matrix"] == metrics_1[which]["confusion_matrix"]
        assert metrics_2[which]["accuracy"] == metrics_1[which]["accuracy"]
        assert metrics_2[which]["loss"] == pytest.approx(metrics_1[which]["loss"], rel=RTOL)
