"""The training configuration: every choice that determines a trained model, in one record.

The defaults are the reference run (``arraybn run runs/default``): LeNet-5 with full BN before
each ReLU on Fashion-MNIST, Adam with a cosine schedule.
"""
from dataclasses import asdict, dataclass, fields

from arraybn.data import DATASETS, AugmentConfig

MODELS = ("lenet5", "mlp")
BN_KINDS = ("none", "full", "mean-only", "ghost", "renorm")
BN_POSITIONS = ("before", "after")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
TRAIN_STATS = ("running", "none")
# Keys that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = ("epochs", "backend", "data_dir")


@dataclass
class TrainConfig:
    """What ``run_train`` needs. ``stats='none'`` trains BN without running statistics;
    ``train_subset=N`` trains on a seeded random N of the training images (quick experiments)."""
    dataset: str = "fashion-mnist"
    data_dir: str = None
    val_split: float = 0.05
    train_subset: int = None
    model: str = "lenet5"
    bn: str = "full"
    bn_position: str = "before"
    hidden: tuple = (256, 128)
    dropout: float = 0.0
    ghost_batch_size: int = 32
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    renorm_rmax: float = 3.0
    renorm_dmax: float = 5.0
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
    eval_batch_size: int = 1000
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        self.validate()

    def validate(self):
        choices = {"dataset": DATASETS, "model": MODELS, "bn": BN_KINDS,
                   "bn_position": BN_POSITIONS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "stats": TRAIN_STATS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "eval_batch_size", "ghost_batch_size"):
            if int(getattr(self, key)) != getattr(self, key) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.train_subset is not None and not (int(self.train_subset) == self.train_subset
                                                  and self.train_subset >= 2):
            raise ValueError(f"train_subset must be an integer >= 2 or None, "
                             f"got {self.train_subset!r}")
        if self.batch_size < 2 and self.bn != "none":
            raise ValueError("batch_size must be >= 2 to train with batch normalization "
                             "(a batch of one has no variance)")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.bn == "renorm" and self.stats == "none":
            raise ValueError("--bn renorm needs running statistics; use --stats running")
        self.augment_config()

    def augment_config(self):
        return AugmentConfig(self.augment_rotation, self.augment_shear, self.augment_zoom,
                             self.augment_shift)

    def model_options(self):
        """Keyword arguments of ``arraybn.nn.build_model`` (besides name, backend, seed, shapes)."""
        return dict(bn=self.bn, bn_position=self.bn_position, dropout=self.dropout,
                    ghost_batch_size=self.ghost_batch_size, bn_momentum=self.bn_momentum,
                    bn_eps=self.bn_eps, renorm_rmax=self.renorm_rmax,
                    renorm_dmax=self.renorm_dmax, track_running_stats=self.stats == "running",
                    hidden=self.hidden)

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
            raise ValueError(f"unknown training options {', '.join(unknown)}; this run was made "
                             "by a different arraybn version")
        return cls(**data)

    def differences(self, other, ignore=RESUMABLE_CHANGES):
        """Keys whose values differ from ``other``'s (besides ``ignore``), sorted."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in ignore and mine[k] != theirs[k])
