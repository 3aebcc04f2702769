"""Errors on the command line: a user's mistake is one line, a bug shows its traceback, and
``--debug`` shows the traceback of every error."""
import subprocess
import sys

from click.testing import CliRunner

import arraybn_cli.cmd_test
from arraybn.errors import ConfigError, UserError
from arraybn_cli.main import cli
from tests.cli.helpers import invoke


def _raise(exc):
    def run_test(*args, **kwargs):
        raise exc
    return run_test


def test_a_user_error_is_one_line_without_traceback(tmp_path):
    result = invoke("test", tmp_path / "nothing")
    assert result.exit_code == 1
    assert result.output.startswith("Error: no train stage in")
    assert len(result.output.splitlines()) == 1


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "test", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output
    assert "StageError: no train stage in" in result.output


def test_an_unexpected_value_error_is_not_turned_into_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(arraybn_cli.cmd_test, "run_test", _raise(ValueError("a bug")))
    result = CliRunner().invoke(cli, ["test", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "Error: a bug" not in result.output


def test_an_unexpected_error_prints_its_traceback_from_the_real_entry_point(tmp_path):
    script = ("import arraybn_cli.cmd_test as cmd\n"
              "def run_test(*args, **kwargs):\n"
              "    raise OSError('a bug deep down')\n"
              "cmd.run_test = run_test\n"
              "from arraybn_cli.main import cli\n"
              f"cli(['test', {str(tmp_path)!r}])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "OSError: a bug deep down" in done.stderr


def test_arraybn_errors_share_the_user_error_base():
    from arraybn.backends import BackendUnavailableError
    from arraybn.core import NonFiniteStatisticsError
    from arraybn.data import DatasetNotFoundError, IDXFormatError
    from arraybn.experiments.plots import PlotUnavailable
    from arraybn.experiments.sweep_config import SweepConfigError
    from arraybn.stages import StageError
    from arraybn.stages.divergence import TrainingDiverged
    for error in (StageError, DatasetNotFoundError, IDXFormatError, NonFiniteStatisticsError,
                  BackendUnavailableError, SweepConfigError, PlotUnavailable, ConfigError,
                  TrainingDiverged):
        assert issubclass(error, UserError), error
