"""What --track-layers costs per training step, and that it costs nothing when off.

Times ``Trainer._train_step`` on LeNet-5 + BN (batch 128, 12x12 synthetic images unless
``--size``) in interleaved rounds, medians per step:

- ``baseline``: the training loop of a commit before --track-layers existed (``--baseline REV``,
  read with ``git show``), so "off" is compared with code that has no tracking at all;
- ``off``: this tree with ``track_layers=False``;
- ``on K``: this tree measuring every K steps (``--every``, several allowed).

Also counts the memory blocks a step allocates (tracemalloc) for baseline and off.

    .venv/bin/python benchmarks/layer_tracking_overhead.py --baseline 15cfb01 --every 50 1
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import arraybn  # noqa: E402
from arraybn.data.datasets import Split  # noqa: E402
from arraybn.stages import TrainConfig  # noqa: E402
from arraybn.stages import training_loop  # noqa: E402
from arraybn.stages.common import make_model  # noqa: E402


def _old_training_loop(revision):
    source = subprocess.run(["git", "show", f"{revision}:arraybn/stages/training_loop.py"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_training_loop.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_training_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(module, config, split):
    model = make_model(config, split.images.shape[2:], arraybn.get_backend(config.backend))
    return module.Trainer(model, config, {"train": split, "val": split}, fill=0.0)


def _step_seconds(trainer, steps):
    index = np.arange(trainer.config.batch_size)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        trainer._train_step(trainer.splits["train"], index, False)
        times.append(time.perf_counter() - started)
        trainer.step += 1
    return times


def _allocated_blocks(trainer, steps):
    index = np.arange(trainer.config.batch_size)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(steps):
        trainer._train_step(trainer.splits["train"], index, False)
        trainer.step += 1
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(stat.count_diff for stat in after.compare_to(before, "filename"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="15cfb01")
    parser.add_argument("--every", type=int, nargs="+", default=[50, 1])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--size", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    split = Split(rng.normal(size=(128, 1, args.size, args.size)).astype(np.float32),
                  rng.integers(0, 10, size=128))
    base = dict(backend=args.backend, batch_size=128, epochs=1000, data_dir=".")
    variants = {"baseline": (_old_training_loop(args.baseline), TrainConfig(**base)),
                "off": (training_loop, TrainConfig(**base))}
    for every in args.every:
        variants[f"on {every}"] = (training_loop, TrainConfig(**base, track_layers=True,
                                                              track_every=every))
    trainers = {name: _trainer(module, config, split) for name, (module, config) in
                variants.items()}
    for trainer in trainers.values():
        _step_seconds(trainer, 3)                         # warm-up (numba compiles)
    times = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            times[name] += _step_seconds(trainer, args.steps)
    print(f"LeNet-5+BN, batch 128, {args.size}x{args.size}, {args.backend}, "
          f"{args.rounds} x {args.steps} steps per variant, interleaved")
    for name, values in times.items():
        print(f"  {name:>9}: median {1e3 * statistics.median(values):7.3f} ms/step, "
              f"mean {1e3 * statistics.mean(values):7.3f} ms/step")
    for name in ("baseline", "off"):
        print(f"  {name:>9}: {_allocated_blocks(trainers[name], 20)} blocks still allocated "
              f"after 20 steps (tracemalloc)")


if __name__ == "__main__":
    main()
