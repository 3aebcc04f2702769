"""A sweep file's validation reports every problem at once, also several in one table."""
import pytest

from arraybn.experiments.sweep_config import SweepConfigError, load_sweep
from tests.experiments.test_sweep import write_sweep


def problems_of(tmp_path, data_dir, body):
    path = write_sweep(tmp_path / "bad.toml", data_dir, body)
    with pytest.raises(SweepConfigError, match="nothing was run") as info:
        load_sweep(path, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    return str(info.value)


def test_every_problem_of_one_run_is_listed(tmp_path, data_dir):
    text = problems_of(tmp_path, data_dir, """
[[runs]]
name = "x"
epochs = 0
lr = -1.0
dropout = 1.5
bn_eps = nan
bn_momentum = 2.0
""")
    for message in ("epochs must be a positive integer, got 0", "lr must be > 0, got -1.0",
                    "dropout must be in [0, 1), got 1.5", "bn_eps must be a finite number > 0, got nan",
                    "bn_momentum must be in [0, 1], got 2.0"):
        assert message in text


def test_every_problem_of_a_postproc_table_and_of_the_grid_is_listed(tmp_path, data_dir):
    text = problems_of(tmp_path, data_dir, """
[grid]
learning_rate = [0.1]
bn = []
[postproc]
method = "ema"
decay = 2.0
batch_size = 1
batches = 0
""")
    for message in ("learning_rate is not a training option", "[grid] bn must be a non-empty",
                    "decay (--decay) must be in [0, 1), got 2.0",
                    "batch_size (--batch-size) must be an integer >= 2",
                    "batches (--batches) must be an integer >= 1"):
        assert message in text


def test_well_typed_values_are_checked_beside_badly_typed_ones(tmp_path, data_dir):
    text = problems_of(tmp_path, data_dir, """
[[runs]]
name = "x"
epochs = "three"
lr = -1.0
""")
    assert "epochs must be an integer, got 'three'" in text and "lr must be > 0" in text
