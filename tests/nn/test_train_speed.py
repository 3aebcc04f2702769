"""The training-speed benchmark runs end to end (a few steps; no timing is asserted)."""
import pytest

from tests.benchmark_scripts import load_benchmark


def _load():
    return load_benchmark("train_speed")


def test_benchmark_runs_and_prints_a_table(capsys):
    bench = _load()
    argv = ["--steps", "2", "--rounds", "1", "--warmup", "1", "--batch", "16",
            "--backends", "numpy,nonexistent", "--no-torch"]
    args = bench.parse_args(argv)
    per_step = bench.run(args, argv)
    assert list(per_step) == ["arraybn numpy"] and per_step["arraybn numpy"] > 0
    bench.print_table(per_step, args)
    out = capsys.readouterr().out
    assert "skipping backend 'nonexistent'" in out
    assert "arraybn numpy" in out and "n/a" in out and "epoch = 3750 steps" in out


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        _load().parse_args(["--steps", "0"])
