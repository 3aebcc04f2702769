"""Tiny MNIST-format datasets written in tmp_path: an IDX writer independent of arraybn's reader."""
import gzip
import struct

import numpy as np

STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(array, type_code=0x08):
    """The IDX encoding of a uint8 array: magic 00 00 type ndim, big-endian sizes, data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path, array, compress=None, type_code=0x08):
    data = idx_bytes(array, type_code)
    compress = str(path).endswith(".gz") if compress is None else compress
    with open(path, "wb") as f:
        f.write(gzip.compress(data, mtime=0) if compress else data)
    return path


def synthetic_images(labels, size, rng):
    """uint8 (N, size, size): a bright square whose position encodes the class, plus noise."""
    n = len(labels)
    images = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    cell = size // 4
    for i, label in enumerate(labels):
        r, c = divmod(int(label) % 16, 4)
        images[i, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 200 + rng.integers(0, 55)
    return images


def write_dataset(directory, n_train=64, n_test=32, size=12, seed=0, compress=True):
    """Write the four files of a learnable 10-class dataset into ``directory``; returns it."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    train_labels = (np.arange(n_train) % 10).astype(np.uint8)
    test_labels = (np.arange(n_test) % 10).astype(np.uint8)
    arrays = {"train_images": synthetic_images(train_labels, size, rng),
              "train_labels": train_labels,
              "test_images": synthetic_images(test_labels, size, rng),
              "test_labels": test_labels}
    suffix = ".gz" if compress else ""
    for role, array in arrays.items():
        write_idx(directory / (STEMS[role] + suffix), array)
    return directory
