"""The 'compiling kernels' notice: given on a cold Numba cache, never on a warm one."""
import os
import subprocess
import sys

import click
import pytest

pytest.importorskip("numba")

ONE_KERNEL = """
import numpy as np
from arraybn.backends.compile_notice import set_compile_notice
set_compile_notice(lambda: print("NOTICE", flush=True))
from arraybn.backends import numba_kernels
x = np.ones((4, 3, 2))
mean, var = np.empty(3), np.empty(3)
numba_kernels.moments_range(x, 0, 3, mean, var)
numba_kernels.moments_range(x + 1, 0, 3, mean, var)
print("DONE", flush=True)
"""


def run_one_kernel(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", ONE_KERNEL], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_notice_once_on_a_cold_cache_and_never_on_a_warm_one(tmp_path):
    assert run_one_kernel(tmp_path / "numba-cache") == ["NOTICE", "DONE"]
    assert run_one_kernel(tmp_path / "numba-cache") == ["DONE"]


def test_the_cli_prints_the_notice_to_stderr_during_a_command(monkeypatch):
    from click.testing import CliRunner

    from arraybn.backends import compile_notice
    from arraybn_cli.main import cli

    @click.command("compiles")
    def compiles():
        click.echo("result")
        compile_notice._compiling()          # what numba's compile event calls
        compile_notice._compiling()          # a second kernel: no second notice

    monkeypatch.setitem(cli.commands, "compiles", compiles)
    result = CliRunner().invoke(cli, ["compiles"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "result\n"
    assert result.stderr == "compiling kernels (first run only)…\n"
    assert compile_notice._notice["callback"] is None        # nothing left after the command
