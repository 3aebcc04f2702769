"""Training with augmentation on the numba backend: its one-pass kernel trains the model that
the NumPy reference augmentation (the trainer's only path before the kernel) trains, to the bit.
"""
import pytest

from arraybn.backends.numba_backend import NumbaBackend
from arraybn.stages import run_train
from tests.stages.helpers import file_sha, history_rows, quiet, tiny_config, without_seconds


def _train(run, data_dir, dtype):
    config = tiny_config(data_dir, backend="numba", augment=True, augment_crop=2, dtype=dtype,
                         epochs=2, seed=3)
    run_train(run, config, echo=quiet)
    return without_seconds(history_rows(run))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_kernel_trains_the_reference_augmentations_model(tmp_path, data_dir, dtype,
                                                               monkeypatch):
    calls = []
    kernels = NumbaBackend.augment_ops(None)
    monkeypatch.setattr(NumbaBackend, "augment_ops",
                        lambda self: calls.append(1) or kernels)
    with_kernel = _train(tmp_path / "kernel", data_dir, dtype)
    assert calls, "the trainer did not ask the backend for its augmentation kernel"
    monkeypatch.setattr(NumbaBackend, "augment_ops", lambda self: None)     # NumPy reference
    reference = _train(tmp_path / "reference", data_dir, dtype)
    assert with_kernel == reference
    assert file_sha(tmp_path / "kernel", "train", "model.npz") == \
        file_sha(tmp_path / "reference", "train", "model.npz")
