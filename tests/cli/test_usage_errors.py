"""Usage errors exit 2 in click's usage format: out-of-range, NaN or infinite option values and
option combinations that TrainConfig refuses; --help says what the checks accept."""
import pytest

from tests.cli.helpers import invoke

FLOAT_OPTIONS = {  # command -> its float options
    "train": ("--val-split", "--bn-momentum", "--bn-eps", "--renorm-rmax", "--renorm-dmax",
              "--dropout", "--lr", "--momentum", "--weight-decay"),
    "run": ("--lr", "--decay"),
    "postproc": ("--decay",),
}
CASES = [(command, option, value) for command, options in FLOAT_OPTIONS.items()
         for option in options for value in ("nan", "inf", "-inf")]


def invoke_safely(tmp_path, command, *args):
    """``arraybn COMMAND RUN ARGS`` with a data directory that does not exist: should the
    options pass, the command stops at the dataset (exit 1) instead of training."""
    return invoke(command, tmp_path / "run", *args, "--data-dir", tmp_path / "no-data")


def assert_usage_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Usage: " in result.output and "--help' for help." in result.output, result.output
    for word in words:
        assert word in result.output, result.output


@pytest.mark.parametrize("command, option, value", CASES)
def test_non_finite_float_options_are_usage_errors(tmp_path, command, option, value):
    result = invoke_safely(tmp_path, command, option, value)
    assert_usage_error(result, f"Invalid value for '{option}'", "not a finite number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (("--batch-size", "1"), "batch_size must be >= 2 to train with batch normalization"),
    (("--bn", "renorm", "--stats", "none"), "--bn renorm needs running statistics"),
    (("--bn-sync", "0"), "must be 'all'"),
    (("--model", "plain", "--depth", "2"), "depth must be >= 3"),
])
@pytest.mark.parametrize("command", ["train", "run"])
def test_option_combinations_refused_by_the_config_are_usage_errors(tmp_path, command, args,
                                                                   message):
    result = invoke_safely(tmp_path, command, *args)
    assert_usage_error(result, message)
    assert not (tmp_path / "run").exists()


def test_batch_size_one_is_accepted_without_bn_and_help_says_so(tmp_path):
    result = invoke_safely(tmp_path, "train", "--batch-size", "1", "--bn", "none")
    assert result.exit_code == 1 and "not found" in result.output    # got past the options
    help_text = " ".join(invoke("train", "--help").output.split())
    assert "--batch-size INTEGER RANGE" in help_text
    assert "at least 2 with batch normalization; 1 only with --bn none" in help_text
