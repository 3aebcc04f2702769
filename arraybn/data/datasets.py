"""Finding, loading, fingerprinting and splitting MNIST-format datasets.

Search order for the four IDX files: the directory the caller gives (``--data-dir``; then it is
the only place searched), else ``$ARRAYBN_DATA``, else the Debian package location. In each
directory the files may sit directly or in a sub-directory named after the dataset, gzipped
(``train-images-idx3-ubyte.gz``) or raw (``train-images-idx3-ubyte``).
"""
import hashlib
import os
from dataclasses import dataclass

import numpy as np

from arraybn.data.idx import IDXFormatError, read_images, read_labels
from arraybn.errors import ConfigError, UserError

ENV_VAR = "ARRAYBN_DATA"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
DATASETS = ("fashion-mnist", "mnist")
CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
}


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset files are not where we looked; the message says how to get them."""


@dataclass
class RawDataset:
    """The four IDX arrays: uint8 images ``(N, H, W)`` and int64 labels ``(N,)``."""
    name: str
    directory: str
    files: dict                # role -> path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    fingerprint: str           # SHA-256 over the four files' SHA-256s, in FILES order


@dataclass
class Split:
    """Normalised float32 images ``(N, 1, H, W)`` with int64 labels ``(N,)``."""
    images: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)


def check_dataset_name(name):
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name


def candidate_dirs(name, data_dir=None):
    """The directories searched for ``name``, in order."""
    if data_dir is not None:
        return [os.fspath(data_dir)]
    dirs = []
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        dirs.append(env)
    if name in DEBIAN_DIRS:
        dirs.append(DEBIAN_DIRS[name])
    return dirs


def _find_file(directory, stem):
    for suffix in (".gz", ""):
        path = os.path.join(directory, stem + suffix)
        if os.path.isfile(path):
            return path
    return None


def _files_in(directory, name):
    """role -> path when all four files are in ``directory`` or ``directory/name``, else None."""
    for base in (directory, os.path.join(directory, name)):
        found = {role: _find_file(base, stem) for role, stem in FILES.items()}
        if all(found.values()):
            return found
    return None


def find_dataset(name="fashion-mnist", data_dir=None):
    """``(directory, {role: path})`` of the first complete copy of the dataset found."""
    check_dataset_name(name)
    _check_environment_dir(data_dir)
    searched = candidate_dirs(name, data_dir)
    for directory in searched:
        found = _files_in(directory, name)
        if found:
            return directory, found
    raise DatasetNotFoundError(_missing_message(name, searched))


def _check_environment_dir(data_dir):
    """An explicit ``$ARRAYBN_DATA`` that does not exist is a mistake, not a reason to look
    elsewhere (unless ``--data-dir`` overrides it)."""
    env = os.environ.get(ENV_VAR, "").strip()
    if data_dir is None and env and not os.path.isdir(env):
        raise DatasetNotFoundError(f"${ENV_VAR} is set to {env}, which does not exist or is not "
                                   f"a directory; point it at the directory with the IDX files, "
                                   f"or unset it to use the default location")


def _missing_message(name, searched):
    where = "; ".join(searched) if searched else "nowhere (no --data-dir, no $ARRAYBN_DATA)"
    needed = ", ".join(f"{stem}.gz" for stem in FILES.values())
    lines = [f"dataset {name!r} not found. Searched: {where}.", f"Needed files: {needed}."]
    if name == "fashion-mnist":
        lines.append("Install it with `sudo apt-get install dataset-fashion-mnist` "
                     f"(files go to {DEBIAN_DIRS[name]}), or put the files in a directory and "
                     f"pass --data-dir DIR (or set ${ENV_VAR}=DIR).")
    else:
        lines.append(f"Download the {name} IDX files into a directory and pass --data-dir DIR "
                     f"(or set ${ENV_VAR}=DIR).")
    return " ".join(lines)


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(files):
    """``(fingerprint, {role: sha256})``; the fingerprint hashes the per-file digests in order."""
    digests = {role: sha256_file(files[role]) for role in FILES}
    combined = hashlib.sha256("".join(digests[r] for r in FILES).encode()).hexdigest()
    return combined, digests


def load_dataset(name="fashion-mnist", data_dir=None):
    """Read the four IDX files of ``name`` and check that they fit together."""
    directory, files = find_dataset(name, data_dir)
    arrays = {role: (read_images if role.endswith("images") else read_labels)(path)
              for role, path in files.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if len(images) != len(labels):
            raise IDXFormatError(f"{files[part + '_images']} holds {len(images)} images but "
                                 f"{files[part + '_labels']} holds {len(labels)} labels")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise IDXFormatError(f"train images are {arrays['train_images'].shape[1:]} but test "
                             f"images are {arrays['test_images'].shape[1:]} in {directory}")
    fingerprint, _ = dataset_fingerprint(files)
    return RawDataset(name, directory, files, fingerprint=fingerprint, **arrays)


def split_indices(n, val_split, seed):
    """Seeded ``(train_idx, val_idx)``; ``val_split`` is the validation fraction in [0, 1)."""
    if not 0.0 <= val_split < 1.0:
        raise ConfigError(f"val_split must be a fraction in [0, 1), got {val_split}")
    n_val = int(round(n * val_split))
    if n - n_val < 2:
        raise ConfigError(f"val_split={val_split} leaves {n - n_val} of {n} images for training")
    order = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def pixel_stats(images, chunk=4096):
    """Mean and standard deviation of the pixels of uint8 ``images`` scaled to [0, 1].

    Two passes in float64, a chunk of images at a time (no full float64 copy).
    """
    count = images.size
    mean = sum(float(images[i:i + chunk].sum(dtype=np.int64)) for i in range(0, len(images), chunk))
    mean /= count * 255.0
    m2 = sum(float((((images[i:i + chunk] / 255.0) - mean) ** 2).sum())
             for i in range(0, len(images), chunk))
    std = float(np.sqrt(m2 / count))
    if std == 0.0:
        raise ValueError("the training images are all the same value; cannot normalise them")
    return mean, std


def normalise(images, mean, std):
    """uint8 ``(N, H, W)`` -> float32 ``(N, 1, H, W)``: ``(images / 255 - mean) / std``."""
    scaled = images.astype(np.float32) / np.float32(255.0)
    return ((scaled - np.float32(mean)) / np.float32(std))[:, None]


def prepare_splits(raw, val_split, seed, normalisation=None):
    """``({'train', 'val', 'test'}: Split, (mean, std))``.

    The pixel mean/std come from the training split (after the validation images are held
    out) unless ``normalisation`` gives the stored ``(mean, std)`` of an earlier stage.
    """
    train_idx, val_idx = split_indices(len(raw.train_labels), val_split, seed)
    mean, std = normalisation or pixel_stats(raw.train_images[train_idx])
    def split(images, labels):
        return Split(normalise(images, mean, std), labels)
    splits = {"train": split(raw.train_images[train_idx], raw.train_labels[train_idx]),
              "val": split(raw.train_images[val_idx], raw.train_labels[val_idx]),
              "test": split(raw.test_images, raw.test_labels)}
    return splits, (mean, std)
