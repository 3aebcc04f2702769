"""``mpiexec -n K arraybn sweep FILE``: rank 0 schedules the runs on an MPI pool of the other
ranks (``mpi4py.futures.MPICommExecutor``); the runs, their logs and resuming are those of a
one-process sweep."""
import json

from arraybn.experiments.sweep import run_sweep
from arraybn.experiments.sweep_config import load_sweep
from tests.distributed.test_mpi_training import arraybn
from tests.distributed.test_mpi import pytestmark  # noqa: F401 - skips without MPI
from tests.experiments.test_sweep import write_sweep
from tests.stages.helpers import quiet

TWO_MLP_RUNS = """
model = "mlp"
[grid]
bn = ["none", "full"]
"""


def _accuracy(run_dir):
    return json.loads((run_dir / "test" / "metrics.json").read_text())["accuracy"]


def test_mpi_pool_runs_the_sweep_on_worker_ranks_and_resumes(data_dir, tmp_path):
    path = write_sweep(tmp_path / "s.toml", data_dir, TWO_MLP_RUNS)
    root = tmp_path / "mpi-runs"
    code, out, err = arraybn(2, "sweep", str(path), "--root", str(root))
    assert code == 0, f"{out}\n{err}"
    assert out.count("summary:") == 1 and out.count(": 2 runs under") == 1
    one_process = run_sweep(load_sweep(path, tmp_path / "one-process"), echo=quiet)
    for outcome in one_process:
        run = root / outcome["name"]
        assert _accuracy(run) == outcome["test_accuracy"]
        assert "on MPI rank 1 of 2" in (run / "sweep.log").read_text()
    stamps = {run: (run / "test" / "metrics.json").stat().st_mtime_ns for run in root.iterdir()}
    code, out, err = arraybn(2, "sweep", str(path), "--root", str(root))
    assert code == 0, f"{out}\n{err}"
    assert "2 of 2 runs are done already (skipped)" in out
    assert stamps == {run: (run / "test" / "metrics.json").stat().st_mtime_ns for run in stamps}


def test_a_bad_sweep_file_under_mpi_ends_every_rank_with_the_message(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[grid]\nbn = ['full', 'wat']\n")
    code, out, err = arraybn(2, "sweep", str(path), "--root", str(tmp_path / "runs"), timeout=60)
    assert code != 0 and "bn must be one of" in err


def test_jobs_under_mpi_is_refused_with_what_to_do(data_dir, tmp_path):
    path = write_sweep(tmp_path / "s.toml", data_dir, TWO_MLP_RUNS)
    code, out, err = arraybn(2, "sweep", str(path), "--jobs", "2", timeout=60)
    assert code != 0 and "drop --jobs" in err
    assert not (tmp_path / "runs").exists()


def test_dry_run_under_mpi_lists_the_runs_once_and_ends(data_dir, tmp_path):
    path = write_sweep(tmp_path / "s.toml", data_dir, TWO_MLP_RUNS)
    code, out, err = arraybn(2, "sweep", str(path), "--root", str(tmp_path / "runs"),
                             "--dry-run", timeout=60)
    assert code == 0, f"{out}\n{err}"
    assert out.count("new ") == 2 and not (tmp_path / "runs").exists()
