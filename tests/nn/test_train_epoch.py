"""benchmarks/train_epoch.py: its machine-limit arithmetic matches the model it times."""
import importlib.util
import pathlib

import numpy as np
import pytest

from arraybn.nn import build_model

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "train_epoch.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_epoch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_gemm_flops(batch):
    """Forward, weight-gradient and input-gradient GEMM FLOPs of arraybn's LeNet-5, read off
    its layers (weights and output shapes); the first layer needs no input gradient."""
    model = build_model("lenet5", backend="numpy", seed=0)
    x, total, first = np.zeros((batch, 1, 28, 28), np.float32), 0, True
    for layer in model.layers:
        y = layer.forward(x, True)
        weight = getattr(layer, "weight", None)
        if weight is not None and weight.data.ndim >= 2:
            out_positions = int(np.prod(y.shape[2:])) if y.ndim > 2 else 1
            gemm = 2 * batch * out_positions * weight.data.size
            total += gemm * (2 if first else 3)
            first = False
        x = y
    return total


def test_step_flops_match_the_model():
    bench = _load()
    assert bench.step_flops() == _model_gemm_flops(bench.BATCH)


def test_machine_limit_line_names_both_limits():
    line = _load().machine_limit()
    assert "MFLOP/step" in line and "GB/s copy" in line and "156 steps" in line


def test_rejects_bad_thread_counts():
    with pytest.raises(SystemExit):
        _load().parse_args(["--threads", "1,0"])
