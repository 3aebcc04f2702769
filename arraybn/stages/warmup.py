"""``arraybn warmup``: compile the Numba kernels that a job uses into Numba's on-disk cache.

Numba compiles a kernel on its first call and keeps the machine code in its cache; on an empty
cache the LeNet-5 pipeline spends about 20 CPU-seconds compiling before its first training step.
``warm_up`` runs the real pipeline (train, postproc, test) for one epoch on a tiny synthetic
dataset in a temporary directory, so it compiles exactly what such a run calls, and leaves
nothing behind but the cache. It trains with augmentation (affine maps and a random crop), so
that the augmentation kernel's signatures are compiled too; a run without it calls a subset. It
trains with the default optimizer (Adam) and then takes one step of each optimizer on a small
parameter, so that the other's update kernel is compiled too (SGD's took 0.2 s in the first
step of a run with ``--optimizer sgd``).
``make setup`` runs it once after installing.
"""
import os
import tempfile
import time

import numpy as np

from arraybn.backends import get_backend
from arraybn.data import FILES, write_idx
from arraybn.nn import SGD, Adam, Parameter
from arraybn.stages.config import TrainConfig
from arraybn.stages.pipeline import run_pipeline

IMAGE_SIZE = 28
TRAIN_IMAGES, TEST_IMAGES = 512, 128     # full default batches: the sizes that go parallel


def write_synthetic_dataset(directory, seed=0):
    """Four raw IDX files of random 28x28 images with labels 0..9 in turn; returns directory."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        images = rng.integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        write_idx(os.path.join(directory, FILES[f"{split}_images"]), images)
        write_idx(os.path.join(directory, FILES[f"{split}_labels"]),
                  (np.arange(count) % 10).astype(np.uint8))
    return directory


def _step_each_optimizer(backend, dtype):
    """One step of SGD and one of Adam on a small ``dtype`` parameter, with ``backend``'s
    kernels: their update kernels compile whichever optimizer the pipeline trained with."""
    ops = get_backend(backend).conv_ops()
    for optimizer in (SGD, Adam):
        param = Parameter("w", np.zeros(8, dtype))
        param.grad = np.ones(8, dtype)
        optimizer([param], 0.1, ops=ops).step()


def warm_up(models=("lenet5",), dtypes=("float32",), backend="numba", echo=print):
    """Run one tiny epoch of every (model, dtype) through train, postproc and test on
    ``backend``; returns the seconds each took, ``{(model, dtype): seconds}``."""
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="arraybn-warmup-") as tmp:
        data_dir = write_synthetic_dataset(tmp)
        for model in models:
            for dtype in dtypes:
                config = TrainConfig(model=model, dtype=dtype, backend=backend, data_dir=data_dir,
                                     epochs=1, val_split=0.25, augment=True, augment_crop=1)
                started = time.perf_counter()
                run_pipeline(os.path.join(tmp, f"{model}-{dtype}"), config, echo=lambda *_: None)
                _step_each_optimizer(backend, dtype)
                seconds[model, dtype] = time.perf_counter() - started
                echo(f"warmup: {model} {dtype} on {backend}: {seconds[model, dtype]:.1f} s")
    return seconds
