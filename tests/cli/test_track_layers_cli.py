"""`arraybn train --track-layers` and `arraybn plot --kind layers|ics`, through the CLI."""
import csv

import pytest

from tests.cli.helpers import invoke
from tests.cli.test_sweep_report_plot import png_size

TINY_TRAIN = ("--epochs", 1, "--batch-size", 16, "--val-split", 0.25, "--eval-batch-size", 16,
              "--backend", "numpy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two tracked runs, with and without BN, and one untracked run."""
    root = tmp_path_factory.mktemp("runs")
    for name, bn, extra in (("bn", "full", ("--track-layers",)), ("nobn", "none",
                                                                  ("--track-layers",)),
                            ("untracked", "full", ())):
        result = invoke("train", root / name, "--data-dir", data_dir, "--bn", bn,
                        "--track-every", 2, *TINY_TRAIN, *extra)
        assert result.exit_code == 0, result.output
    return root


def test_train_option_writes_layers_csv(runs):
    with open(runs / "bn" / "train" / "layers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["step"]) for r in rows}) == [0, 2]
    assert {r["layer"] for r in rows if r["metric"] == "ics_cos"} == {"conv2", "fc1", "fc2",
                                                                      "fc3"}
    assert not (runs / "untracked" / "train" / "layers.csv").exists()


def test_track_every_zero_is_a_usage_error(tmp_path, data_dir):
    result = invoke("train", tmp_path / "run", "--data-dir", data_dir, "--track-layers",
                    "--track-every", 0)
    assert result.exit_code == 2 and "--track-every" in result.output
    assert not (tmp_path / "run" / "train").exists()


@pytest.mark.parametrize("kind", ["layers", "ics"])
def test_plot_compares_tracked_runs(runs, tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    result = invoke("plot", runs / "bn", runs / "nobn", "--kind", kind, "--out", out,
                    "--size", "900x500")
    assert result.exit_code == 0, result.output
    assert png_size(out) == (900, 500)


def test_plot_of_untracked_runs_says_how_to_track_them(runs, tmp_path):
    result = invoke("plot", runs / "untracked", "--kind", "ics", "--out", tmp_path / "x.png")
    assert result.exit_code != 0
    assert "layers.csv" in result.output and "--track-layers" in result.output
    assert not (tmp_path / "x.png").exists()


def test_figures_draw_each_run_in_each_layer(runs):
    from arraybn.experiments.plots import _figure, plot_ics, plot_layers
    from arraybn.experiments.report import collect_rows
    rows = collect_rows([str(runs / "bn"), str(runs / "nobn")])
    layers = _figure((800, 600))
    plot_layers(layers, rows)
    visible = [ax for ax in layers.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(len(ax.lines) == 2 and len(ax.collections) == 2 for ax in visible)
    ics = _figure((800, 400))
    plot_ics(ics, rows)
    for ax in ics.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["conv2", "fc1", "fc2", "fc3"]
        assert len(ax.containers) == 2               # one error-bar line per run
