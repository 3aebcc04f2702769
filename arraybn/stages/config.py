"""The configurations of the stages, each the one source of its defaults and choices.

``TrainConfig``: every choice that determines a trained model; its defaults are the reference
run (``arraybn run runs/default``): LeNet-5 with full BN before each ReLU on Fashion-MNIST, Adam
with a cosine schedule (the network options' defaults come from ``arraybn.nn.defaults``).
``PostprocConfig`` and ``TestConfig``: the options of the postproc and test stages, shared by
``arraybn postproc|test|run``, ``run_pipeline`` and sweeps. The CLI derives its options from
these dataclasses.
"""
from dataclasses import asdict, dataclass, fields

from arraybn.data import DATASETS, AugmentConfig
from arraybn.errors import ConfigError
from arraybn.nn import BN_CHOICES, BN_POSITIONS, MODEL_NAMES, SCHEDULES, defaults
from arraybn.nn.deep_models import check_config as check_deep_model
from arraybn.stages.artifacts import StageError

OPTIMIZERS = ("sgd", "adam")
TRAIN_STATS = ("running", "none")
POSTPROC_METHODS = ("exact", "average", "ema")
EMA_STATS = ("var", "std")
TEST_STATS = ("postproc", "running", "batch")
DTYPES = ("float32", "float64")
BN_SYNC_WORDS = ("all", "local")
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
    eval_batch_size: int = 1000
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
        choices = {"dataset": DATASETS, "model": MODEL_NAMES, "bn": BN_CHOICES,
                   "bn_position": BN_POSITIONS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "stats": TRAIN_STATS, "dtype": DTYPES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "eval_batch_size", "ghost_batch_size",
                    "track_every"):
            if int(getattr(self, key)) != getattr(self, key) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.train_subset is not None and not (int(self.train_subset) == self.train_subset
                                                  and self.train_subset >= 2):
            raise ConfigError(f"train_subset must be an integer >= 2 or None, "
                             f"got {self.train_subset!r}")
        if self.batch_size < 2 and self.bn != "none":
            raise ConfigError("batch_size must be >= 2 to train with batch normalization "
                             "(a batch of one has no variance)")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.bn == "renorm" and self.stats == "none":
            raise ConfigError("--bn renorm needs running statistics; use --stats running")
        check_bn_sync(self.bn_sync)
        self._check_model_options()
        self.augment_config()

    def _check_model_options(self):
        for key in ("depth", "width"):
            if int(getattr(self, key)) != getattr(self, key) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
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
                    hidden=self.hidden, depth=self.depth, width=self.width, dtype=self.dtype)

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
        """Raise StageError naming the first unusable option."""
        if self.method not in POSTPROC_METHODS:
            raise StageError(f"unknown postproc method (--method) {self.method!r}; choose one of "
                             f"{', '.join(POSTPROC_METHODS)}")
        if self.method == "ema" and not 0.0 <= self.decay < 1.0:
            raise StageError(f"postproc decay (--decay) must be in [0, 1), got {self.decay!r}")
        if self.method == "ema" and self.stat not in EMA_STATS:
            raise StageError(f"postproc stat (--stat) must be one of {', '.join(EMA_STATS)}, "
                             f"got {self.stat!r}")
        if not (_is_int(self.batch_size) and self.batch_size >= 2):
            raise StageError(f"postproc batch_size (--batch-size) must be an integer >= 2 for "
                             f"batch statistics, got {self.batch_size!r}")
        if self.batches is not None and not (_is_int(self.batches) and self.batches >= 1):
            raise StageError(f"postproc batches (--batches) must be an integer >= 1, got "
                             f"{self.batches!r}")

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
