"""benchmarks/conv_speed.py: the table gives each tree's time, PyTorch's, and their ratios; the
PyTorch timer runs the benchmark's layers."""
import pytest

from tests.benchmark_scripts import load_benchmark


def _load():
    return load_benchmark("conv_speed")


def test_the_table_has_each_tree_against_pytorch_and_tree_1_against_tree_0(capsys):
    bench = _load()
    args = bench.parse_args(["--torch", "--rounds", "2"])
    count = len(bench.LAYERS)
    bench._print_table(args, ["/before", "/after"], [[2.0] * count, [1.0] * count,
                                                     [4.0] * count])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert header.split()[1:] == ["tree", "0", "tree", "1", "PyTorch", "ratio", "1/0",
                                  "0/torch", "1/torch"]
    rows = [line.split() for line in lines if line.startswith(("lenet5", "vgg8", "resnet20"))]
    assert len(rows) == count
    assert all(row[-6:] == ["2.000", "1.000", "4.000", "0.50", "0.50", "0.25"] for row in rows)


def test_without_pytorch_one_tree_gets_no_ratio_column(capsys):
    bench = _load()
    args = bench.parse_args([])
    bench._print_table(args, ["/tree"], [[3.0] * len(bench.LAYERS)])
    header = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("layer"))
    assert header.split() == ["layer", "tree", "0"]


def test_the_pytorch_timer_times_every_layer(monkeypatch):
    torch = pytest.importorskip("torch")
    bench = _load()
    monkeypatch.setattr(bench, "LAYERS", bench.LAYERS[:1] + bench.LAYERS[-1:])  # small ones
    threads = torch.get_num_threads()
    try:
        times = bench.time_torch_layers(bench.parse_args(["--torch", "--repeats", "1"]))
    finally:
        torch.set_num_threads(threads)                  # the timer sets --threads' count
    assert len(times) == 2 and all(ms > 0 for ms in times)
