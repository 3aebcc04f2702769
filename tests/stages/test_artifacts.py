"""The artifact store: atomic stages, --force semantics, deterministic npz, SHA-256 checks."""
import os

import numpy as np
import pytest

from arraybn.stages.artifacts import (StageError, load_npz, read_manifest, save_npz, staging,
                                      verify_artifact, write_json)
from arraybn.data import sha256_file


def _write_stage(run, text, force=False):
    with staging(run, "train", force=force) as tmp:
        (open(os.path.join(tmp, "a.txt"), "w")).write(text)


def _leftovers(run):
    return [name for name in os.listdir(run) if name.startswith(".")]


def test_stage_appears_only_when_complete(tmp_path):
    run = tmp_path / "run"
    with staging(run, "train") as tmp:
        open(os.path.join(tmp, "a.txt"), "w").write("one")
        assert not (run / "train").exists()
    assert (run / "train" / "a.txt").read_text() == "one" and _leftovers(run) == []


def test_existing_stage_is_not_overwritten_without_force(tmp_path):
    run = tmp_path / "run"
    _write_stage(run, "one")
    with pytest.raises(StageError, match="--force"):
        _write_stage(run, "two")
    _write_stage(run, "two", force=True)
    assert (run / "train" / "a.txt").read_text() == "two" and _leftovers(run) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failing_stage_leaves_previous_results_intact(tmp_path, error):
    run = tmp_path / "run"
    _write_stage(run, "one")
    with pytest.raises(type(error)):
        with staging(run, "train", force=True) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("half")
            raise error
    assert (run / "train" / "a.txt").read_text() == "one" and _leftovers(run) == []


def test_save_npz_is_byte_reproducible_and_loads(tmp_path, rng):
    arrays = {"conv1.weight": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
              "bn1.num_batches_tracked": np.array(4, np.int64)}
    save_npz(tmp_path / "a.npz", arrays)
    os.utime(tmp_path / "a.npz", (0, 0))
    save_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = load_npz(tmp_path / "a.npz", "model", tmp_path, "train")
    assert list(loaded) == list(arrays) and np.array_equal(loaded["conv1.weight"],
                                                            arrays["conv1.weight"])


def test_corrupt_npz_names_file_and_command(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(StageError, match="corrupt.*arraybn train .* --force"):
        load_npz(path, "model", tmp_path, "train")


def test_manifest_missing_or_corrupt(tmp_path):
    with pytest.raises(StageError, match=r"no train stage .*`arraybn train .*` first"):
        read_manifest(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text("{oops")
    with pytest.raises(StageError, match="corrupt"):
        read_manifest(tmp_path, "train")


def test_verify_artifact_detects_a_modified_file(tmp_path):
    stage = tmp_path / "train"
    stage.mkdir()
    (stage / "model.npz").write_bytes(b"abc")
    manifest = {"outputs": {"model.npz": sha256_file(stage / "model.npz")}}
    write_json(stage / "manifest.json", manifest)
    _, digest = verify_artifact(tmp_path, "train", "model.npz", manifest)
    assert digest == manifest["outputs"]["model.npz"]
    (stage / "model.npz").write_bytes(b"abd")
    with pytest.raises(StageError, match="corrupt or was modified"):
        verify_artifact(tmp_path, "train", "model.npz", manifest)
