"""Augmentation of one training batch: the NumPy reference vs the numba backend's one-pass kernel.

    python3 benchmarks/augment_speed.py [--batch 128] [--size 28] [--dtype float32] [--repeats 30]

Times ``arraybn.data.apply_transforms`` on a batch of random images (one channel) for three
kinds of transform: the affine map (rotation, shear, zoom, shift: ``--augment``), the random
crop alone (``--augment-crop 2``) and both; the transforms are drawn once, outside the timing
(drawing them costs the same on every backend). One thread (the environment's
OMP/OPENBLAS/NUMBA thread counts are set to 1 unless given); the two are sampled in turns and
the table gives the medians and the median ratio. Checks that both give the same images first.
"""
import argparse
import os
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
for _variable in THREAD_VARIABLES:
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import format_seconds, interleaved_times, markdown_table, median_ratio  # noqa: E402

import arraybn  # noqa: E402
from arraybn.data import AugmentConfig, apply_transforms, draw_transforms  # noqa: E402

CASES = {
    "affine (--augment)": AugmentConfig(),
    "crop (--augment-crop 2)": AugmentConfig(rotation=0, shear=0, zoom=0, shift=0, crop=2),
    "both": AugmentConfig(crop=2),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28, help="image height and width")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if min(args.batch, args.size, args.repeats) < 1:
        parser.error("--batch, --size and --repeats must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    numba = arraybn.get_backend("numba")
    images = np.random.default_rng(0).random((args.batch, 1, args.size, args.size))
    images = images.astype(args.dtype)
    rows = []
    for name, config in CASES.items():
        transforms = draw_transforms(args.batch, args.size, args.size,
                                     np.random.default_rng(1), config)
        runs = {"numpy": lambda: apply_transforms(images, transforms, -0.8),
                "numba": lambda: apply_transforms(images, transforms, -0.8, numba)}
        if not np.array_equal(runs["numpy"](), runs["numba"]()):
            sys.exit(f"{name}: the numba kernel's images differ from the NumPy reference's")
        medians, rounds = interleaved_times(runs, repeats=args.repeats, min_seconds=0.01)
        rows.append((name, format_seconds(medians["numpy"]), format_seconds(medians["numba"]),
                     f"{median_ratio(rounds, 'numpy', 'numba'):.1f}x"))
    threads = "/".join(os.environ[variable] for variable in THREAD_VARIABLES)
    print(f"Augmentation of {args.batch} {args.size}x{args.size} {args.dtype} images, median of "
          f"{args.repeats}, threads (OpenMP/OpenBLAS/Numba): {threads}")
    print(markdown_table(["transform", "NumPy reference", "numba kernel", "speed-up"], rows))


if __name__ == "__main__":
    main()
