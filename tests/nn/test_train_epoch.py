"""benchmarks/train_epoch.py: its machine-limit arithmetic matches the model it times."""
import argparse

import numpy as np
import pytest

from arraybn.nn import build_model
from tests.benchmark_scripts import load_benchmark


def _load():
    return load_benchmark("train_epoch")


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


def test_deep_models_time_the_seed_batch_on_a_smaller_subset_and_keep_lenet5_s_job():
    bench = _load()
    lenet = bench.parse_args([])
    assert (lenet.model, lenet.batch, lenet.job["train_subset"]) == ("lenet5", 128, 20000)
    resnet = bench.parse_args(["--model", "resnet", "--train-subset", "3000"])
    assert (resnet.batch, resnet.job["train_subset"], resnet.job["depth"]) == (100, 3000, 20)
    assert bench.JOB["train_subset"] == 20000            # the override is the run's, not global


def test_rejects_a_subset_smaller_than_two_batches():
    with pytest.raises(SystemExit):
        _load().parse_args(["--model", "vgg8", "--train-subset", "150"])


def test_machine_limit_counts_the_steps_of_the_subset_it_is_given():
    assert "78 steps" in _load().machine_limit(10000)


@pytest.mark.parametrize("model", ["vgg8", "resnet"])
def test_the_pytorch_twin_of_a_deep_model_has_arraybn_s_parameter_count(model):
    torch = pytest.importorskip("torch")
    args = _load().parse_args(["--model", model])
    torch_twin = load_benchmark("train_speed").torch_twin
    net = torch_twin(argparse.Namespace(model=model, depth=args.job["depth"], width=16))
    ours = build_model(model, backend="numpy", seed=0, depth=args.job["depth"])
    assert sum(p.numel() for p in net.parameters()) == sum(
        p.data.size for p in ours.parameters())
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
