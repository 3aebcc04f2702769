"""The training-speed benchmark with --model: a deep model and its PyTorch twin take a step (no
timing is asserted; the twins of every model are checked in test_deep_torch_parity)."""
import pytest

from tests.nn.test_train_speed import _load


def test_benchmark_times_a_deep_model_against_its_pytorch_twin(capsys):
    pytest.importorskip("torch")
    bench = _load()
    argv = ["--model", "resnet", "--depth", "8", "--width", "2", "--steps", "1", "--rounds", "1",
            "--warmup", "0", "--batch", "4", "--backends", "numpy"]
    args = bench.parse_args(argv)
    per_step = bench.run(args, argv)
    assert list(per_step) == ["arraybn numpy", "pytorch cpu"]
    bench.print_table(per_step, args)
    out = capsys.readouterr().out
    assert "resnet depth 8 width 2 + BN, batch 4" in out and "pytorch cpu" in out


def test_benchmark_refuses_a_model_without_a_twin():
    with pytest.raises(SystemExit):
        _load().parse_args(["--model", "mlp"])
