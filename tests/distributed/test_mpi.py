"""End to end under a real ``mpiexec``: MPI ranks reproduce the one-process result, and a rank
that raises ends the whole job. Skipped, with the reason, where mpi4py or mpiexec is missing
(``pip install -e '.[mpi]'`` brings both)."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ABORT_TIMEOUT_S = 10          # a raising rank must end the job within this; without abort it hangs


def _mpiexec():
    beside_python = Path(sys.executable).with_name("mpiexec")
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None,
                       reason="mpi4py is not installed (pip install -e '.[mpi]')"),
    pytest.mark.skipif(MPIEXEC is None,
                       reason="no mpiexec found (pip install -e '.[mpi]' brings Open MPI's)")]


def run_mpi(ranks, *args, timeout):
    """(returncode, stdout, stderr) of the worker on ``ranks`` processes; fails on a hang."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    command = [MPIEXEC, "-n", str(ranks), "--oversubscribe", sys.executable, "-m",
               "tests.distributed.mpi_worker", *args]
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)          # mpiexec and every rank it started
        out, err = job.communicate()
        pytest.fail(f"mpiexec -n {ranks} {' '.join(args)} still ran after {timeout} s\n"
                    f"{out}\n{err}")
    return job.returncode, out, err


@pytest.mark.parametrize("sizes", ["6,4", "4,0,6"], ids=["2 ranks", "3 ranks, one empty"])
def test_mpi_ranks_reproduce_the_one_process_result(sizes):
    ranks = len(sizes.split(","))
    code, out, err = run_mpi(ranks, "check", sizes, timeout=300)
    assert code == 0, f"{out}\n{err}"
    assert sorted(line.split(":")[0] for line in out.splitlines() if "cases ok" in line) == \
        [f"rank {r} of {ranks}" for r in range(ranks)]


def test_a_raising_rank_ends_every_rank_with_its_message():
    code, out, err = run_mpi(2, "fail", timeout=ABORT_TIMEOUT_S)
    assert code != 0
    assert "rank 1 of 2 failed" in err and "ValueError: rank 1 failed on purpose" in err
