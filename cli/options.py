"""Options shared by several commands, defined once and stacked as decorators.

Defaults and choices come from the stages' configurations (``TrainConfig``, ``PostprocConfig``,
``TestConfig``) and the lists beside them, so that the CLI and the Python API agree on them.
"""
import dataclasses
import math

import click
from click.core import ParameterSource

from arraybn.backends import BACKEND_NAMES
from arraybn.data import DATASETS
from arraybn.errors import ConfigError
from arraybn.nn import BN_CHOICES, BN_POSITIONS, INIT_SCHEMES, MODEL_NAMES, SCHEDULES
from arraybn.stages.config import (DTYPES, EMA_STATS, OPTIMIZERS, POSTPROC_METHODS, TEST_STATS,
                                   TRAIN_STATS, PostprocConfig, TestConfig, TrainConfig)

DEFAULTS = TrainConfig()
POSTPROC_DEFAULTS = PostprocConfig()
# TrainConfig fields that have no option: the augmentation strengths keep their defaults.
FIELDS_WITHOUT_OPTION = ("augment_rotation", "augment_shear", "augment_zoom", "augment_shift")
# The options that make a TrainConfig. backend and data_dir are common options (shared with
# postproc and test) whose default None means "not given": TrainConfig's default applies.
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in FIELDS_WITHOUT_OPTION)


def stack(*decorators):
    """One decorator that applies ``decorators`` in the order listed (top one outermost)."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities (which pass its bounds checks:
    every comparison with NaN is false)."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def _hidden(ctx, param, value):
    if value is None or isinstance(value, tuple):
        return value
    try:
        widths = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated widths like 256,128; got {value!r}")
    if not widths or min(widths) < 1:
        raise click.BadParameter(f"expected one or more positive widths; got {value!r}")
    return widths


run_dir_argument = click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))

common_options = stack(
    click.option("--backend", type=click.Choice(("auto",) + BACKEND_NAMES), default=None,
                 help="Array backend (default: training's choice, 'auto' picks cupy > numba > "
                      "numpy; env ARRAYBN_BACKEND overrides auto)."),
    click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                 help="Directory with the IDX files (default: $ARRAYBN_DATA, then "
                      "/usr/share/datasets/<dataset>)."),
    click.option("--force", is_flag=True,
                 help="Replace existing results (kept until the new ones are complete)."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print only the result as JSON on stdout (messages go to stderr)."),
)

train_options = stack(
    click.option("--dataset", type=click.Choice(DATASETS), default=DEFAULTS.dataset,
                 show_default=True),
    click.option("--val-split", type=FiniteFloatRange(0, 1, max_open=True),
                 default=DEFAULTS.val_split, show_default=True,
                 help="Fraction of the training images held out for validation."),
    click.option("--train-subset", type=click.IntRange(2), default=None,
                 help="Train on a seeded random N of the training images (quick runs)."),
    click.option("--model", type=click.Choice(MODEL_NAMES), default=DEFAULTS.model,
                 show_default=True),
    click.option("--hidden", callback=_hidden, default=",".join(map(str, DEFAULTS.hidden)),
                 show_default=True, help="MLP hidden widths, comma-separated."),
    click.option("--depth", type=click.IntRange(1), default=DEFAULTS.depth, show_default=True,
                 help="plain: number of convolutions (>= 3); resnet: 6n+2 layers (8, 14, 20)."),
    click.option("--width", type=click.IntRange(1), default=DEFAULTS.width, show_default=True,
                 help="plain/resnet: channels of the first stage (doubled at each of the two "
                      "downsamplings)."),
    click.option("--init", type=click.Choice(INIT_SCHEMES), default=DEFAULTS.init,
                 show_default=True,
                 help="Conv and dense weights: PyTorch's default U(+-1/sqrt(fan_in)), or "
                      "kaiming-normal N(0, 2/fan_in) with zero biases (He et al. 2015; deep "
                      "nets without BN)."),
    click.option("--bn", type=click.Choice(BN_CHOICES), default=DEFAULTS.bn, show_default=True,
                 help="Batch normalization variant."),
    click.option("--bn-position", type=click.Choice(BN_POSITIONS), default=DEFAULTS.bn_position,
                 show_default=True, help="BN before or after the ReLU."),
    click.option("--bn-momentum", type=FiniteFloatRange(0, 1), default=DEFAULTS.bn_momentum,
                 show_default=True, help="Running statistics: r = (1-m) r + m batch."),
    click.option("--bn-eps", type=FiniteFloatRange(0, min_open=True), default=DEFAULTS.bn_eps,
                 show_default=True),
    click.option("--ghost-batch-size", type=click.IntRange(1), default=DEFAULTS.ghost_batch_size,
                 show_default=True, help="Samples per ghost batch (--bn ghost)."),
    click.option("--renorm-rmax", type=FiniteFloatRange(1), default=DEFAULTS.renorm_rmax,
                 show_default=True, help="Batch renormalization r clip (--bn renorm)."),
    click.option("--renorm-dmax", type=FiniteFloatRange(0), default=DEFAULTS.renorm_dmax,
                 show_default=True, help="Batch renormalization d clip (--bn renorm)."),
    click.option("--stats", type=click.Choice(TRAIN_STATS), default=DEFAULTS.stats,
                 show_default=True,
                 help="'none': keep no running statistics (postproc provides them)."),
    click.option("--dropout", type=FiniteFloatRange(0, 1, max_open=True),
                 default=DEFAULTS.dropout, show_default=True),
    click.option("--epochs", type=click.IntRange(1), default=DEFAULTS.epochs, show_default=True),
    click.option("--batch-size", type=click.IntRange(1), default=DEFAULTS.batch_size,
                 show_default=True,
                 help="Images per training step (the global batch under mpiexec); at least 2 "
                      "with batch normalization; 1 only with --bn none."),
    click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULTS.optimizer,
                 show_default=True),
    click.option("--lr", type=FiniteFloatRange(0, min_open=True), default=DEFAULTS.lr,
                 show_default=True, help="Base learning rate."),
    click.option("--momentum", type=FiniteFloatRange(0, 1), default=DEFAULTS.momentum,
                 show_default=True, help="SGD momentum."),
    click.option("--schedule", type=click.Choice(SCHEDULES), default=DEFAULTS.schedule,
                 show_default=True, help="Learning-rate schedule over all steps."),
    click.option("--weight-decay", type=FiniteFloatRange(0), default=DEFAULTS.weight_decay,
                 show_default=True),
    click.option("--augment/--no-augment", default=DEFAULTS.augment, show_default=True,
                 help="Random rotation, shear, zoom and shift of training images."),
    click.option("--augment-crop", type=click.IntRange(0), default=DEFAULTS.augment_crop,
                 show_default=True,
                 help="Random crop of training images after zero padding by N pixels (0: off; "
                      "2 suits 28x28), with or without --augment."),
    click.option("--eval-batch-size", type=click.IntRange(1), default=DEFAULTS.eval_batch_size,
                 show_default=True, help="Batch size for validation and testing."),
    click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True),
    click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULTS.dtype, show_default=True,
                 help="Floating-point type of the network (float64: exact comparisons)."),
    click.option("--bn-sync", default=DEFAULTS.bn_sync, show_default=True,
                 help="Under mpiexec/srun: BN statistics over the global batch ('all'), each "
                      "process's slice ('local', = ghost batches of B/K) or groups of G "
                      "consecutive processes (an integer G)."),
    click.option("--track-layers/--no-track-layers", default=DEFAULTS.track_layers,
                 show_default=True,
                 help="Every --track-every steps record each layer's pre-activation "
                      "percentiles, gradient norm and internal covariate shift (Santurkar et "
                      "al. 2018) in RUN/train/layers.csv; training itself is unchanged."),
    click.option("--track-every", type=click.IntRange(1), default=DEFAULTS.track_every,
                 show_default=True, metavar="K",
                 help="Steps between two --track-layers measurements."),
    click.option("--resume", is_flag=True,
                 help="Continue an interrupted run exactly, or a finished one with more --epochs."),
)

postproc_method_options = stack(
    click.option("--method", type=click.Choice(POSTPROC_METHODS),
                 default=POSTPROC_DEFAULTS.method, show_default=True,
                 help="exact: all values seen; average: mean of batch statistics; ema: "
                      "s = decay s + (1-decay) s_batch."),
    click.option("--decay", type=FiniteFloatRange(0, 1, max_open=True),
                 default=POSTPROC_DEFAULTS.decay, show_default=True,
                 help="EMA decay (--method ema)."),
    click.option("--stat", type=click.Choice(EMA_STATS), default=POSTPROC_DEFAULTS.stat,
                 show_default=True,
                 help="EMA averages the variance or the standard deviation (--method ema)."),
    click.option("--batches", type=click.IntRange(1), default=POSTPROC_DEFAULTS.batches,
                 help="Use at most N training batches (default: all)."),
)


def postproc_batch_size_option(name):
    return click.option(name, "postproc_batch_size", type=click.IntRange(2),
                        default=POSTPROC_DEFAULTS.batch_size, show_default=True,
                        help="Images per postproc batch (each BN layer sees this batch's "
                             "statistics).")


def test_stats_option(name):
    return click.option(name, "test_stats", type=click.Choice(TEST_STATS),
                        default=TestConfig().stats,
                        help="BN statistics for testing (default: postproc when it exists, "
                             "else running).")


def make_postproc_config(params):
    return PostprocConfig(method=params["method"], decay=params["decay"], stat=params["stat"],
                          batches=params["batches"], batch_size=params["postproc_batch_size"])


def make_test_config(params, batch_size=None):
    return TestConfig(stats=params["test_stats"], batch_size=batch_size,
                      backend=params["backend"])


def train_config_from(ctx, params, resume):
    """TrainConfig fields from the parsed options; with --resume only those given explicitly.

    Without --resume the options must make a valid TrainConfig: a combination it refuses (e.g.
    --batch-size 1 with BN) is a usage error (exit status 2), like a value out of range.
    """
    values = {key: params[key] for key in TRAIN_KEYS}
    if resume:
        return {key: value for key, value in values.items()
                if value is not None and ctx.get_parameter_source(key) != ParameterSource.DEFAULT}
    values = {key: value for key, value in values.items() if value is not None}
    try:
        TrainConfig(**values)
    except ConfigError as exc:
        raise click.UsageError(str(exc), ctx) from None
    return values
