"""The CLI's options agree with the stages' configurations: same fields, defaults and choices."""
import dataclasses

import click
import pytest

from arraybn.stages import PostprocConfig, TestConfig, TrainConfig
from arraybn_cli import cmd_test
from arraybn_cli.cmd_postproc import postproc_command
from arraybn_cli.cmd_run import run_command
from arraybn_cli.cmd_train import train_command
from arraybn_cli.options import (FIELDS_WITHOUT_OPTION, TRAIN_KEYS, make_postproc_config,
                                 make_test_config, train_config_from)


def _parsed(command, *args):
    """The command's context after parsing ``RUN args`` (nothing runs)."""
    return command.make_context(command.name, ["RUN", *args])


def _option(command, name):
    return next(p for p in command.params if p.name == name)


@pytest.mark.parametrize("command", [train_command, run_command])
def test_every_train_config_field_has_an_option_except_the_documented_ones(command):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {p.name for p in command.params}
    assert set(TRAIN_KEYS) == fields - set(FIELDS_WITHOUT_OPTION)
    assert set(TRAIN_KEYS) <= options
    assert set(FIELDS_WITHOUT_OPTION) <= fields


@pytest.mark.parametrize("command", [train_command, run_command])
def test_the_options_defaults_make_the_default_train_config(command):
    ctx = _parsed(command)
    assert TrainConfig(**train_config_from(ctx, ctx.params, resume=False)) == TrainConfig()


@pytest.mark.parametrize("command", [train_command, run_command])
def test_choice_options_offer_exactly_the_values_train_config_accepts(command):
    for name in TRAIN_KEYS:
        option = _option(command, name)
        if not isinstance(option.type, click.Choice) or name == "backend":
            continue
        for value in option.type.choices:
            TrainConfig(**{name: value})                   # accepted
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: "not-a-choice"})


def test_postproc_options_defaults_are_postproc_config_defaults():
    assert make_postproc_config(_parsed(postproc_command).params) == PostprocConfig()
    assert make_postproc_config(_parsed(run_command).params) == PostprocConfig()


def test_test_options_defaults_are_test_config_defaults():
    assert make_test_config(_parsed(cmd_test.test_command).params) == TestConfig()
    assert make_test_config(_parsed(run_command).params) == TestConfig()


def test_options_given_reach_the_configs():
    params = _parsed(run_command, "--method", "ema", "--decay", "0.5", "--stat", "std",
                     "--batches", "3", "--postproc-batch-size", "32", "--test-stats", "batch",
                     "--backend", "numpy").params
    assert make_postproc_config(params) == PostprocConfig("ema", 0.5, "std", 3, 32)
    assert make_test_config(params) == TestConfig(stats="batch", backend="numpy")
