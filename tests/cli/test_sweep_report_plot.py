"""`arraybn sweep`, `report` and `plot` through CliRunner: exit codes, output, files."""
import csv
import os
import struct
import sys

import pytest

from tests.cli.helpers import invoke
from tests.experiments.test_sweep import write_sweep
from tests.stages.helpers import make_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SWEEP_BODY = """
[grid]
bn = ["none", "full", "mean-only"]
[[variants]]
name = "ema-b{postproc.batches}"
postproc = {method = "ema", decay = 0.9, stat = "std", batch_size = 8, batches = [1, 3]}
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """``(sweep file, root)`` after ``arraybn sweep --jobs 2`` (three runs in two processes)."""
    tmp = tmp_path_factory.mktemp("cli-sweep")
    path = write_sweep(tmp / "s.toml", make_dataset(tmp / "data"), SWEEP_BODY)
    result = invoke("sweep", path, "--jobs", 2, "--root", tmp / "runs")
    assert result.exit_code == 0, result.output
    assert "3 runs under" in result.output and "summary:" in result.output
    return path, tmp / "runs"


def test_parallel_sweep_makes_every_run(swept):
    _, root = swept
    assert sorted(os.listdir(root)) == ["bnfull", "bnmean-only", "bnnone"]
    for run in ("bnfull", "bnmean-only"):
        for variant in ("ema-b1", "ema-b3"):
            assert (root / run / "variants" / variant / "test" / "metrics.json").is_file()
    assert not (root / "bnnone" / "variants").exists()


def test_second_sweep_skips_and_dry_run_lists(swept):
    path, root = swept
    again = invoke("sweep", path, "--root", root)
    assert again.exit_code == 0 and "3 of 3 runs are done already (skipped)" in again.output
    dry = invoke("sweep", path, "--root", root.parent / "other", "--dry-run")
    assert dry.exit_code == 0 and dry.output.count("  new ") == 3
    assert not (root.parent / "other").exists()


def test_bad_sweep_file_runs_nothing(tmp_path):
    data_dir = make_dataset(tmp_path / "data")
    path = write_sweep(tmp_path / "bad.toml", data_dir, "[grid]\nbn = ['full', 'wat']\n"
                       "[[variants]]\nname = 'v'\npostproc = {methd = 'exact'}\n")
    result = invoke("sweep", path, "--root", tmp_path / "runs")
    assert result.exit_code == 1
    assert "nothing was run" in result.output and "'wat'" in result.output
    assert "unknown key methd" in result.output
    assert not (tmp_path / "runs").exists()


def test_failed_run_gives_nonzero_exit(tmp_path):
    data_dir = make_dataset(tmp_path / "data")
    path = write_sweep(tmp_path / "s.toml", data_dir, "[test]\nstats = 'batch'\n"
                       "[[runs]]\nname = 'bad'\neval_batch_size = 29\n"
                       "[[runs]]\nname = 'good'\n")
    result = invoke("sweep", path, "--root", tmp_path / "runs")
    assert result.exit_code == 1
    assert "1 of 2 runs failed: bad" in result.output and "good: test accuracy" in result.output


def test_report_has_one_row_per_run_and_writes_csv(swept, tmp_path):
    _, root = swept
    result = invoke("report", root / "bn*", "--no-variants", "--csv", tmp_path / "r.csv",
                    "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 + 3 and lines[0].startswith("| run |")
    assert (tmp_path / "r.md").read_text() == result.output
    with open(tmp_path / "r.csv", newline="") as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["bnfull", "bnmean-only", "bnnone"]
    with_variants = invoke("report", root)
    assert len(with_variants.output.strip().splitlines()) == 2 + 3 + 4
    missing = invoke("report", tmp_path / "nothing-here")
    assert missing.exit_code == 1 and "no run directory matches" in missing.output


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("kind", ["curves", "batch-size", "postproc-batches", "timing"])
def test_plot_writes_a_png_of_the_requested_size(swept, tmp_path, kind):
    pytest.importorskip("matplotlib")
    _, root = swept
    out = tmp_path / "figs" / f"{kind}.png"
    result = invoke("plot", root, "--kind", kind, "--out", out, "--size", "640x360")
    assert result.exit_code == 0, result.output
    assert png_size(out) == (640, 360)


def test_plot_errors_are_messages(swept, tmp_path, monkeypatch):
    _, root = swept
    no_variants = invoke("plot", root / "bnnone", "--kind", "postproc-batches",
                         "--out", tmp_path / "x.png")
    assert no_variants.exit_code == 1 and "no post-processing variants" in no_variants.output
    bad_size = invoke("plot", root, "--kind", "curves", "--out", tmp_path / "x.png",
                      "--size", "big")
    assert bad_size.exit_code == 2 and "WIDTHxHEIGHT" in bad_size.output
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    missing = invoke("plot", root, "--kind", "curves", "--out", tmp_path / "x.png")
    assert missing.exit_code == 1 and "pip install 'arraybn[plot]'" in missing.output
    assert not (tmp_path / "x.png").exists()


def test_a_diverged_run_is_reported_and_is_not_a_failure(tmp_path):
    data_dir = make_dataset(tmp_path / "data")
    path = write_sweep(tmp_path / "s.toml", data_dir, "[[runs]]\nname = 'explodes'\nbn = 'none'\n"
                                                      "optimizer = 'adam'\nlr = 1e6\n")
    result = invoke("sweep", path, "--root", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "explodes: diverged (training diverged at epoch 1, step" in result.output
    report = invoke("report", tmp_path / "runs")
    assert report.exit_code == 0 and "| diverged (epoch 1, step " in report.output
