"""The configurations of the stages, each the one source of its defaults and choices.

``TrainConfig``: every choice that determines a trained model; its defaults are the reference
run (``arraybn run runs/default``): LeNet-5 with full BN before each ReLU on Fashion-MNIST, Adam
with a cosine schedule (the network options' defaults come from ``arraybn.nn.defaults``).
``PostprocConfig`` and ``TestConfig``: the options of the postproc and test stages, shared by
``arraybn postproc|test|run``, ``run_pipeline`` and sweeps. The CLI derives its options from
these dataclasses.
"""
import math
from dataclasses import asdict, dataclass, fields

from arraybn.data import DATASETS, AugmentConfig
from arraybn.errors import ConfigError
from arraybn.nn import (BN_CHOICES, BN_POSITIONS, INIT_SCHEMES, MODEL_NAMES, SCHEDULES,
                        defaults)
from arraybn.nn.deep_models import check_config as check_deep_model
from arraybn.stages.artifacts import StageError

OPTIMIZERS = ("sgd", "adam")
TRAIN_STATS = ("running", "none")
POSTPROC_METHODS = ("exact", "average", "ema")
EMA_STATS = ("var", "std")
TEST_STATS = ("postproc", "running", "batch")
DTYPES = ("float32", "float64")
BN_SYNC_WORDS = ("all", "local")
# TrainConfig's integer sizes, each >= 1.
POSITIVE_INTEGERS = ("epochs", "batch_size", "eval_batch_size", "ghost_batch_size",
                     "track_every", "depth", "width")
# TrainConfig's float options: field -> (low, high or None, low open, high open); each finite.
FLOAT_RANGES = {"val_split": (0, 1, False, True), "dropout": (0, 1, False, True),
                "bn_momentum": (0, 1, False, False), "bn_eps": (0, None, True, False),
                "renorm_rmax": (1, None, False, False), "renorm_dmax": (0, None, False, False),
                "lr": (0, None, True, False), "momentum": (0, 1, False, False),
                "weight_decay": (0, None, False, False)}
# Keys that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = ("epochs", "backend", "data_dir")


@dataclass
class TrainConfig:
    """What ``run_train`` needs. ``stats='none'`` trains BN without running statistics;
    ``train_subset=N`` trains on a seeded random N of the training images (quick experiments);
    ``track_layers``: measure each layer every ``track_every`` steps into RUN/train/layers.csv
    (``arraybn.stages.layer_tracking``; the training itself is unchanged)."""
    dataset: str = "fashion-mnist"
    data_dir: str = None
    val_split: float = 0.05
    train_subset: int = None
    model: str = "lenet5"
    bn: str = defaults.BN
    bn_position: str = defaults.BN_POSITION
    hidden: tuple = defaults.MLP_HIDDEN
    depth: int = defaults.DEPTH
    width: int = defaults.WIDTH
    init: str = defaults.INIT
    dropout: float = defaults.DROPOUT
    ghost_batch_size: int = defaults.GHOST_BATCH_SIZE
    bn_momentum: float = defaults.BN_MOMENTUM
    bn_eps: float = defaults.BN_EPS
    renorm_rmax: float = defaults.RENORM_RMAX
    renorm_dmax: float = defaults.RENORM_DMAX
    stats: str = "running"
    epochs: int = 8
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 2e-3
    momentum: float = 0.9
    schedule: str = "cosine"
    weight_decay: float = 0.0
    augment: bool = False
    augment_rotation: float = 10.0
    augment_shear: float = 0.1
    augment_zoom: float = 0.1
    augment_shift: float = 0.1
    augment_crop: int = 0
    eval_batch_size: int = 256     # validation/test; 1000 gave the same logits, 1.7-1.8x slower
                                   # for VGG-8 and ResNet-20 (100 MB activations, off-cache)
    backend: str = "auto"
    seed: int = 0
    dtype: str = "float32"
    bn_sync: str = "all"
    track_layers: bool = False
    track_every: int = 50

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        self.bn_sync = str(self.bn_sync)
        self.validate()

    def validate(self):
        """Raise one ConfigError that lists every problem of this configuration."""
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self):
        """Every problem of this configuration, one message each (empty when it is valid)."""
        choices = {"dataset": DATASETS, "model": MODEL_NAMES, "bn": BN_CHOICES,
                   "bn_position": BN_POSITIONS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "stats": TRAIN_STATS, "dtype": DTYPES, "init": INIT_SCHEMES}
        bad_choices = [key for key, allowed in choices.items() if getattr(self, key) not in allowed]
        problems = [f"{key} must be one of {', '.join(choices[key])}; got {getattr(self, key)!r}"
                    for key in bad_choices]
        bad_sizes = [key for key in POSITIVE_INTEGERS if not _positive_integer(getattr(self, key))]
        problems += [f"{key} must be a positive integer, got {getattr(self, key)!r}"
                     for key in bad_sizes]
        if self.train_subset is not None and not (_positive_integer(self.train_subset)
                                                  and self.train_subset >= 2):
            problems.append(f"train_subset must be an integer >= 2 or None, "
                            f"got {self.train_subset!r}")
        if "batch_size" not in bad_sizes and self.batch_size < 2 and self.bn != "none":
            problems.append("batch_size must be >= 2 to train with batch normalization "
                            "(a batch of one has no variance)")
        problems += [problem for problem in map(self._float_problem, FLOAT_RANGES) if problem]
        if self.bn == "renorm" and self.stats == "none":
            problems.append("--bn renorm needs running statistics; use --stats running")
        problems += _problems_of(check_bn_sync, self.bn_sync)
        if not (bad_choices or {"depth", "width"} & set(bad_sizes)):  # needs valid ones
            problems += _problems_of(self._check_model_options)
        return problems + _problems_of(self.augment_config)

    def _float_problem(self, key):
        """What is wrong with the float option ``key`` (see FLOAT_RANGES), or None."""
        value = getattr(self, key)
        if key == "bn_momentum" and value is None:        # a cumulative average, as in PyTorch
            return None
        low, high, low_open, high_open = FLOAT_RANGES[key]
        if high is None:
            bounds = f"{'>' if low_open else '>='} {low}"
        else:
            bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        if not math.isfinite(value):
            return f"{key} must be a finite number {bounds}, got {value}"
        above = value > low if low_open else value >= low
        below = high is None or (value < high if high_open else value <= high)
        return None if above and below else f"{key} must be {bounds}, got {value}"

    def _check_model_options(self):
        try:
            check_deep_model(dict(name=self.model, depth=self.depth, width=self.width,
                                  dropout=self.dropout, bn=self.bn, bn_position=self.bn_position))
        except ValueError as exc:
            raise ConfigError(f"{exc} (--model {self.model})") from None

    @property
    def augments(self):
        """Whether training batches are transformed (``augment`` or a random crop)."""
        return bool(self.augment or self.augment_crop)

    def augment_config(self):
        """The affine ranges apply with ``augment``; the crop (``augment_crop`` pixels of
        padding, 0: none) with or without it."""
        ranges = ((self.augment_rotation, self.augment_shear, self.augment_zoom,
                   self.augment_shift) if self.augment else (0.0, 0.0, 0.0, 0.0))
        return AugmentConfig(*ranges, crop=self.augment_crop)

    def model_options(self):
        """Keyword arguments of ``arraybn.nn.build_model`` (besides name, backend, seed, shapes)."""
        return dict(bn=self.bn, bn_position=self.bn_position, dropout=self.dropout,
                    ghost_batch_size=self.ghost_batch_size, bn_momentum=self.bn_momentum,
                    bn_eps=self.bn_eps, renorm_rmax=self.renorm_rmax,
                    renorm_dmax=self.renorm_dmax, track_running_stats=self.stats == "running",
                    hidden=self.hidden, depth=self.depth, width=self.width, dtype=self.dtype,
                    init=self.init)

    def to_dict(self):
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data):
        """A config from a manifest; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training options {', '.join(unknown)}; this run was made "
                             "by a different arraybn version")
        return cls(**data)

    def differences(self, other, ignore=RESUMABLE_CHANGES):
        """Keys whose values differ from ``other``'s (besides ``ignore``), sorted."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in ignore and mine[k] != theirs[k])


def check_bn_sync(value):
    """``value`` ('all', 'local' or a positive group size as text) or a ConfigError."""
    if value not in BN_SYNC_WORDS and not (value.isdigit() and int(value) >= 1):
        raise ConfigError(f"bn_sync (--bn-sync) must be 'all' (statistics over the global "
                          f"batch), 'local' (each process's slice) or a group size G >= 1; "
                          f"got {value!r}")
    return value


def _positive_integer(value):
    """Whether ``value`` is a whole number >= 1 (3.0 counts, as it always did)."""
    try:
        return int(value) == value and value >= 1
    except (TypeError, ValueError):
        return False


def _problems_of(check, *args):
    """``[message]`` of the ConfigError that ``check(*args)`` raises, else ``[]``."""
    try:
        check(*args)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PostprocConfig:
    """Options of the postproc stage (``arraybn postproc --help``).

    method: 'exact' (all values seen, order-independent), 'average' (mean of per-batch
    statistics) or 'ema' (``s = decay * s + (1 - decay) * s_batch`` of ``stat`` 'var' or 'std').
    batches: use at most this many (seeded, shuffled) training batches; None: all.
    """
    method: str = "exact"
    decay: float = 0.9
    stat: str = "var"
    batches: int = None
    batch_size: int = 256

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise one StageError that lists every unusable option."""
        problems = []
        if self.method not in POSTPROC_METHODS:
            problems.append(f"unknown postproc method (--method) {self.method!r}; choose one "
                            f"of {', '.join(POSTPROC_METHODS)}")
        if self.method == "ema" and not 0.0 <= self.decay < 1.0:
            problems.append(f"postproc decay (--decay) must be in [0, 1), got {self.decay!r}")
        if self.method == "ema" and self.stat not in EMA_STATS:
            problems.append(f"postproc stat (--stat) must be one of {', '.join(EMA_STATS)}, "
                            f"got {self.stat!r}")
        if not (_is_int(self.batch_size) and self.batch_size >= 2):
            problems.append(f"postproc batch_size (--batch-size) must be an integer >= 2 for "
                            f"batch statistics, got {self.batch_size!r}")
        if self.batches is not None and not (_is_int(self.batches) and self.batches >= 1):
            problems.append(f"postproc batches (--batches) must be an integer >= 1, got "
                            f"{self.batches!r}")
        if problems:
            raise StageError("; ".join(problems))

    def estimator_options(self):
        """Keyword options of ``arraybn.make_estimator`` beyond the method (EMA's only)."""
        return {"decay": float(self.decay), "stat": self.stat} if self.method == "ema" else {}


@dataclass(frozen=True)
class TestConfig:
    """Options of the test stage (``arraybn test --help``).

    stats: 'postproc', 'running' or 'batch'; None: postproc when RUN/postproc exists, else
    running. batch_size: None uses the run's ``eval_batch_size``. backend: None uses training's.
    """
    __test__ = False            # not a pytest test class, despite its name
    stats: str = None
    batch_size: int = None
    backend: str = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.stats is not None and self.stats not in TEST_STATS:
            raise StageError(f"unknown test stats (--stats) {self.stats!r}; choose one of "
                             f"{', '.join(TEST_STATS)}")
        if self.batch_size is not None and not (_is_int(self.batch_size)
                                                and self.batch_size >= 1):
            raise StageError(f"test batch_size (--batch-size) must be a positive integer, got "
                             f"{self.batch_size!r}")
