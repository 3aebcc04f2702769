"""Using arraybn leaves the process environment as it was: nothing leaks into other libraries'
OpenMP runtimes or into child processes (numba's own OpenMP workers still spin a bounded
while before they sleep)."""
import os
import subprocess
import sys

import pytest

import arraybn
from arraybn.backends.numba_backend import SPIN_COUNT

pytestmark = pytest.mark.skipif("numba" not in arraybn.available_backends(),
                                reason="the numba backend is not available here")

SCRIPT = """
import os
import numpy as np
import arraybn, numba
x = np.random.default_rng(0).standard_normal((64, 8, 32, 32))     # parallel: > 2^18 values
arraybn.batch_norm_forward(x, np.ones(8), np.zeros(8), backend="numba")
print("layer", numba.threading_layer(), "policy", os.environ.get("OMP_WAIT_POLICY"),
      "spin", os.environ.get("GOMP_SPINCOUNT"))
"""


def _run(env_extra):
    """(os.environ's wait policy and spin count after the backend started, libgomp's own report);
    skips where Numba's threading layer is not OpenMP (the settings are libgomp's)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra, OMP_DISPLAY_ENV="VERBOSE", NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    if words[1] != "omp":
        pytest.skip(f"numba's threading layer here is {words[1]}, not OpenMP")
    return (words[3], words[5]), done.stderr


def test_numba_workers_spin_a_bounded_while_without_changing_the_environment():
    variables, shown = _run({})
    assert variables == ("None", "None")              # nothing left in os.environ
    assert f"GOMP_SPINCOUNT = '{SPIN_COUNT}'" in shown   # what libgomp read when it started


def test_a_wait_policy_the_user_set_is_kept():
    variables, shown = _run({"OMP_WAIT_POLICY": "PASSIVE"})
    assert variables == ("PASSIVE", "None")
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown and "GOMP_SPINCOUNT = '0'" in shown


@pytest.mark.parametrize("variables, threads", [
    ({"OMP_NUM_THREADS": "1"}, 1),
    ({"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}, 2),     # Numba's own variable wins
    ({"OMP_NUM_THREADS": "not a number"}, None),                 # ignored: Numba's default
])
def test_numba_threads_follow_omp_num_threads_unless_numba_num_threads_is_set(variables,
                                                                                threads):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env.update(variables)
    script = ("import numba, arraybn; arraybn.get_backend('numba'); "
              "print(numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    got, most = (int(word) for word in done.stdout.split())
    assert got == (most if threads is None else threads)


def test_a_spin_count_the_user_set_is_kept():
    variables, shown = _run({"GOMP_SPINCOUNT": "1234"})
    assert variables == ("None", "1234") and "GOMP_SPINCOUNT = '1234'" in shown


def test_a_sweep_workers_thread_count_outlasts_omp_num_threads():
    """``limit_threads`` (a sweep worker's share of the cores) starts the numba backend first,
    so the backend's own reading of OMP_NUM_THREADS does not override the share later."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("NUMBA_NUM_THREADS", None)
    script = ("import numba, arraybn\n"
              "from arraybn.experiments.process_pool import limit_threads\n"
              "limit_threads(1)\n"
              "arraybn.get_backend('numba')\n"
              "print(numba.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]
