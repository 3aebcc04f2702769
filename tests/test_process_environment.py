"""Using arraybn leaves the process environment as it was: nothing leaks into other libraries'
OpenMP runtimes or into child processes (numba's own OpenMP workers still wait passively)."""
import subprocess
import sys

import pytest

import arraybn

pytestmark = pytest.mark.skipif("numba" not in arraybn.available_backends(),
                                reason="the numba backend is not available here")

SCRIPT = """
import os
import numpy as np
import arraybn, numba
x = np.random.default_rng(0).standard_normal((64, 8, 32, 32))     # parallel: > 2^18 values
arraybn.batch_norm_forward(x, np.ones(8), np.zeros(8), backend="numba")
print("layer", numba.threading_layer(), "policy", os.environ.get("OMP_WAIT_POLICY"))
"""


def _run(env_extra):
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_extra, OMP_DISPLAY_ENV="TRUE", NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    layer, policy = done.stdout.split()[1], done.stdout.split()[3]
    return layer, policy, done.stderr


def test_numba_workers_wait_passively_without_changing_the_environment():
    layer, policy, shown = _run({})
    if layer != "omp":
        pytest.skip(f"numba's threading layer here is {layer}, not OpenMP")
    assert policy == "None"                           # nothing left in os.environ
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown     # what libgomp read when it started


def test_a_wait_policy_the_user_set_is_kept():
    layer, policy, shown = _run({"OMP_WAIT_POLICY": "ACTIVE"})
    if layer != "omp":
        pytest.skip(f"numba's threading layer here is {layer}, not OpenMP")
    assert policy == "ACTIVE" and "OMP_WAIT_POLICY = 'ACTIVE'" in shown
