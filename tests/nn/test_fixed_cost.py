"""benchmarks/fixed_cost.py: its line fit and its refusals (no timing here)."""
import pytest

from tests.benchmark_scripts import load_benchmark


def test_the_fit_recovers_a_line_and_its_intercept():
    bench = load_benchmark("fixed_cost")
    fixed, per_image = bench.fit_line([2, 4, 8, 16], [0.2 + 0.03 * b for b in (2, 4, 8, 16)])
    assert fixed == pytest.approx(0.2) and per_image == pytest.approx(0.03)
    fixed, per_image = bench.fit_line([2, 4, 8], [1.0, 1.2, 1.4])      # least squares
    assert fixed == pytest.approx(0.9) and per_image == pytest.approx(1.2 / 18.666666667)


def test_batches_are_parsed_sorted_and_checked():
    bench = load_benchmark("fixed_cost")
    assert bench.parse_args(["--batches", "8,2,4,2"]).batches == [2, 4, 8]
    for bad in (["--batches", "2"], ["--batches", "1,4"], ["--batches", "2,x"],
                ["--steps", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
