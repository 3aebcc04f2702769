"""End to end on the real Fashion-MNIST (Debian package dataset-fashion-mnist), when installed."""
import json

import pytest
from click.testing import CliRunner

from arraybn.data import DatasetNotFoundError, find_dataset
from arraybn_cli.main import cli


def _fashion_mnist_missing():
    try:
        find_dataset("fashion-mnist")
    except DatasetNotFoundError as exc:
        return str(exc)
    return None


MISSING = _fashion_mnist_missing()


@pytest.mark.slow
@pytest.mark.skipif(MISSING is not None, reason=f"Fashion-MNIST not installed: {MISSING}")
def test_run_on_fashion_mnist_subset(tmp_path):
    """One epoch on 4000 training images: the whole pipeline, well above chance (10%)."""
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(run), "--train-subset", "4000", "--epochs", "1",
                                      "--batches", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["train"]["dataset"]["sizes"] == {"train": 4000, "val": 3000, "test": 10000}
    assert out["test"]["images"] == 10000 and out["test"]["stats"] == "postproc"
    assert out["test"]["accuracy"] > 0.6
