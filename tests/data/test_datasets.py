"""Dataset search order, the missing-data message, fingerprints, splits and normalisation."""
import os

import numpy as np
import pytest

from arraybn.data import (DatasetNotFoundError, IDXFormatError, find_dataset, load_dataset,
                          pixel_stats, prepare_splits, split_indices)
from tests.data.idx_files import STEMS, write_dataset, write_idx


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("ARRAYBN_DATA", raising=False)


def test_data_dir_is_used_and_is_the_only_place_searched(tmp_path, monkeypatch):
    good = write_dataset(tmp_path / "env")
    monkeypatch.setenv("ARRAYBN_DATA", str(good))
    directory, files = find_dataset("mnist", tmp_path / "env")
    assert directory == str(good) and set(files) == set(STEMS)
    with pytest.raises(DatasetNotFoundError, match="empty"):
        find_dataset("mnist", tmp_path / "empty")


def test_environment_variable_then_subdirectory_named_after_dataset(tmp_path, monkeypatch):
    write_dataset(tmp_path / "root" / "mnist", compress=False)
    monkeypatch.setenv("ARRAYBN_DATA", str(tmp_path / "root"))
    directory, files = find_dataset("mnist")
    assert directory == str(tmp_path / "root")
    assert files["train_images"].endswith(os.path.join("mnist", "train-images-idx3-ubyte"))


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        find_dataset("fashion-mnist", tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert str(tmp_path) in message


def test_missing_mnist_without_any_location(no_env):
    with pytest.raises(DatasetNotFoundError, match="--data-dir DIR"):
        find_dataset("mnist")


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        find_dataset("cifar")


def test_load_checks_image_and_label_counts(tmp_path):
    data = write_dataset(tmp_path / "d", n_train=20)
    write_idx(data / (STEMS["train_labels"] + ".gz"), np.zeros(19, np.uint8))
    with pytest.raises(IDXFormatError, match="20 images but .* 19 labels"):
        load_dataset("mnist", data)


def test_fingerprint_is_stable_and_sees_any_change(tmp_path):
    a = load_dataset("mnist", write_dataset(tmp_path / "a", seed=1))
    b = load_dataset("mnist", write_dataset(tmp_path / "b", seed=1))
    c = load_dataset("mnist", write_dataset(tmp_path / "c", seed=2))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 64


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_indices(100, 0.2, seed=3)
    again, _ = split_indices(100, 0.2, seed=3)
    other, _ = split_indices(100, 0.2, seed=4)
    assert len(val) == 20 and np.array_equal(train, again) and not np.array_equal(train, other)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        split_indices(100, 1.0, 0)


def test_training_split_is_normalised_with_its_own_statistics(tmp_path):
    raw = load_dataset("mnist", write_dataset(tmp_path / "d", n_train=50))
    splits, (mean, std) = prepare_splits(raw, 0.2, seed=0)
    train = splits["train"].images
    assert train.dtype == np.float32 and train.shape == (40, 1, 12, 12)
    assert abs(float(train.mean())) < 1e-5 and abs(float(train.std()) - 1) < 1e-5
    assert len(splits["val"]) == 10 and len(splits["test"]) == 32
    stored, same = prepare_splits(raw, 0.2, seed=0, normalisation=(0.5, 0.25))
    assert same == (0.5, 0.25)
    expected = (raw.test_images[0] / 255.0 - 0.5) / 0.25
    assert np.allclose(stored["test"].images[0, 0], expected, atol=1e-6)


def test_pixel_stats_matches_numpy_in_float64(rng):
    images = rng.integers(0, 256, size=(37, 5, 5)).astype(np.uint8)
    mean, std = pixel_stats(images, chunk=8)
    assert np.isclose(mean, (images / 255.0).mean(), rtol=1e-12)
    assert np.isclose(std, (images / 255.0).std(), rtol=1e-12)
    with pytest.raises(ValueError, match="all the same value"):
        pixel_stats(np.full((3, 2, 2), 7, np.uint8))


def test_an_arraybn_data_that_does_not_exist_is_an_error_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "nonexistent"
    monkeypatch.setenv("ARRAYBN_DATA", str(missing))
    with pytest.raises(DatasetNotFoundError, match=rf"\$ARRAYBN_DATA is set to {missing}, "
                                                   r"which does not exist.*unset it"):
        find_dataset("fashion-mnist")
    write_dataset(tmp_path / "given")
    assert find_dataset("mnist", tmp_path / "given")[0] == str(tmp_path / "given")  # --data-dir wins
