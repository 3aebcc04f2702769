"""The README's recipe: model.npz (+ bn_stats.npz) into a torch LeNet-5 gives arraybn test's
accuracy on the test split, with the input normalisation the manifest records."""
import json

import numpy as np
import pytest

from arraybn.data import load_dataset
from arraybn.data.datasets import normalise
from arraybn.nn.torch_export import torch_lenet5
from arraybn.stages import run_pipeline
from arraybn.stages.config import PostprocConfig, TestConfig
from tests.stages.helpers import quiet, tiny_config

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


@pytest.mark.parametrize("bn, stats", [("full", "postproc"), ("full", "running"),
                                       ("none", None)])
def test_torch_net_loads_strict_and_matches_arraybn_test(tmp_path, data_dir, bn, stats):
    run = tmp_path / "run"
    results = run_pipeline(run, tiny_config(data_dir, bn=bn),
                           PostprocConfig() if bn != "none" else None, TestConfig(stats=stats),
                           echo=quiet)
    state = dict(np.load(run / "train" / "model.npz"))
    if stats == "postproc":
        state.update(np.load(run / "postproc" / "bn_stats.npz"))
    net = torch_lenet5(state)
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    norm = manifest["dataset"]["normalisation"]
    raw = load_dataset("fashion-mnist", data_dir)
    x = torch.from_numpy(normalise(raw.test_images, norm["mean"], norm["std"]))
    with torch.no_grad():
        predictions = net(x).argmax(1).numpy()
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (raw.test_labels, predictions), 1)
    assert confusion.tolist() == results["test"]["confusion_matrix"]    # the same predictions
    assert float((predictions == raw.test_labels).mean()) == results["test"]["accuracy"]
