"""Shared set-up for stage and CLI tests: a tiny dataset and a fast training configuration."""
import csv
import os

from arraybn.data import sha256_file
from tests.data.idx_files import write_dataset

TINY = dict(n_train=80, n_test=30, size=12)


def quiet(*_):
    """An ``echo`` that prints nothing."""


def make_dataset(directory):
    return write_dataset(directory, **TINY)


def tiny_config(data_dir, **changes):
    """TrainConfig fields for a ~1 s run: LeNet-5 on 12x12 images, 60 training images."""
    config = dict(data_dir=str(data_dir), epochs=2, batch_size=16, val_split=0.25,
                  eval_batch_size=16, backend="numpy", seed=0)
    config.update(changes)
    return config


def file_sha(run, stage, name):
    return sha256_file(os.path.join(run, stage, name))


def history_rows(run):
    with open(os.path.join(run, "train", "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def stage_leftovers(run):
    """Temporary or half-written directories left in the run directory."""
    return sorted(name for name in os.listdir(run) if name.startswith("."))
