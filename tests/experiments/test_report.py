"""Reports: rows from stored artifacts, runs found by directory or glob, incomplete runs."""
import csv
import io
import json
import os
import re
import shutil

import pytest

from arraybn.experiments.report import collect_rows, csv_text, find_runs, markdown_table
from arraybn.experiments.sweep import run_sweep
from arraybn.experiments.sweep_config import load_sweep
from tests.stages.helpers import make_dataset
from tests.experiments.test_sweep import write_sweep


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """A finished sweep: runs bnnone and bnfull (with variants exact-b1 and batch)."""
    tmp = tmp_path_factory.mktemp("report")
    data_dir = make_dataset(tmp / "data")
    path = write_sweep(tmp / "s.toml", data_dir, """
[grid]
bn = ["none", "full"]
[[variants]]
name = "exact-b{postproc.batches}"
postproc = {method = "exact", batches = 1, batch_size = 8}
[[variants]]
name = "batch"
test = {stats = "batch", batch_size = 10}
""")
    outcomes = run_sweep(load_sweep(path, tmp / "runs"), echo=lambda *_: None)
    assert [o["status"] for o in outcomes] == ["ok", "ok"]
    return tmp / "runs"


def test_one_row_per_run_and_variant_from_the_artifacts(sweep_root):
    rows = collect_rows([sweep_root])
    assert [r["name"] for r in rows] == ["bnfull", "bnfull/batch", "bnfull/exact-b1", "bnnone"]
    full = rows[0]
    metrics = json.loads((sweep_root / "bnfull" / "test" / "metrics.json").read_text())
    manifest = json.loads((sweep_root / "bnfull" / "train" / "manifest.json").read_text())
    assert full["test_acc"] == metrics["accuracy"] and full["test_loss"] == metrics["loss"]
    assert full["val_acc"] == manifest["metrics"]["val_acc"]
    assert full["seconds_per_epoch"] == pytest.approx(manifest["timings"]["train_seconds"])
    assert (full["model"], full["bn"], full["batch_size"], full["epochs"]) == \
        ("lenet5", "full", 16, 1)
    assert full["stats"].startswith("postproc exact, all batches of 256 (60 images)")
    assert rows[1]["stats"] == "test-batch statistics (10 per batch)"
    assert rows[2]["stats"] == "postproc exact, 1 batches of 8 (8 images)"
    assert rows[3]["stats"] == "none (model has no BN)" and rows[3]["bn_position"] == ""


def test_markdown_and_csv_tables(sweep_root):
    rows = collect_rows([sweep_root], variants=False)
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + 2 and table[0].startswith("| run | model | BN |")
    assert "| bnnone |" in table[3] and f"{100 * rows[1]['test_acc']:.2f}%" in table[3]
    parsed = list(csv.DictReader(io.StringIO(csv_text(rows))))
    assert [r["name"] for r in parsed] == ["bnfull", "bnnone"]
    assert float(parsed[0]["test_acc"]) == rows[0]["test_acc"]


def test_incomplete_runs_get_blanks_and_a_note(sweep_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sweep_root / "bnnone", copy / "untested", symlinks=True)
    shutil.rmtree(copy / "untested" / "test")
    (copy / "empty" / "test").mkdir(parents=True)
    rows = {r["name"]: r for r in collect_rows([copy])}
    assert rows["untested"]["test_acc"] is None and rows["untested"]["val_acc"] is not None
    assert "no test stage: run `arraybn test" in rows["untested"]["note"]
    assert "no train stage" in rows["empty"]["note"] and rows["empty"]["model"] is None
    assert "| untested |" in markdown_table(list(rows.values()))


def test_globs_and_errors(sweep_root, tmp_path):
    assert find_runs([os.path.join(sweep_root, "bn*")]) == \
        [os.path.join(sweep_root, "bnfull"), os.path.join(sweep_root, "bnnone")]
    with pytest.raises(FileNotFoundError, match="no run directory matches"):
        find_runs([str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="no run directories"):
        find_runs([str(tmp_path)])
    (tmp_path / "corrupt" / "test").mkdir(parents=True)
    (tmp_path / "corrupt" / "test" / "metrics.json").write_text("{not json")
    row = collect_rows([tmp_path / "corrupt"])[0]
    assert "unreadable" in row["note"] and row["test_acc"] is None


def test_a_test_of_an_older_model_is_marked_stale_and_its_numbers_left_out(sweep_root, tmp_path):
    """After ``train --force`` the old test/ (and postproc/) describe another model."""
    from arraybn.stages import run_train
    from tests.stages.helpers import quiet, tiny_config
    run = tmp_path / "bnfull"
    shutil.copytree(sweep_root / "bnfull", run, symlinks=True)
    config = json.loads((run / "train" / "manifest.json").read_text())["config"]
    run_train(run, {**config, "seed": 1}, force=True, echo=quiet)
    rows = {r["name"]: r for r in collect_rows([run])}
    row = rows["bnfull"]
    assert row["stale"] and row["val_acc"] is not None
    assert (row["test_acc"], row["test_loss"], row["stats"]) == (None, None, None)
    assert "stale: test predates train" in row["note"]
    assert f"arraybn postproc {run} --force" in row["note"]
    assert f"arraybn test {run} --force" in row["note"]
    assert rows["bnfull/batch"]["stale"] and rows["bnfull/batch"]["test_acc"] is None
    table = markdown_table(list(rows.values()))
    assert "| stale |" in table.splitlines()[0] and "| stale |" in table.splitlines()[2]
    assert "stale: test predates train" in table
    assert "| stale |" not in markdown_table(collect_rows([sweep_root]))
    parsed = list(csv.DictReader(io.StringIO(csv_text(list(rows.values())))))
    assert parsed[0]["stale"] == "True" and parsed[0]["test_acc"] == ""


def test_a_test_made_before_postproc_was_redone_is_stale(sweep_root, tmp_path):
    from arraybn.stages import run_postproc
    from tests.stages.helpers import quiet
    run = tmp_path / "bnfull"
    shutil.copytree(sweep_root / "bnfull", run, symlinks=True)
    run_postproc(run, force=True, echo=quiet, batches=1, batch_size=8)
    row = collect_rows([run], variants=False)[0]
    assert row["stale"] and row["test_acc"] is None
    assert "stale: test predates postproc" in row["note"]
    fresh = collect_rows([sweep_root], variants=False)[0]
    assert fresh["stale"] is False and fresh["test_acc"] is not None


def test_runs_of_a_directory_come_in_natural_order(tmp_path):
    for name in ("full-lr10.0", "full-lr3.0", "full-lr1.0"):
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "train" / "manifest.json").write_text("{}")
    assert [os.path.basename(r) for r in find_runs([str(tmp_path)])] == \
        ["full-lr1.0", "full-lr3.0", "full-lr10.0"]


def _with_train_metrics(source, run, **metrics):
    """A copy of the run ``source`` at ``run`` whose train manifest has ``metrics`` (and
    ``num_classes`` when given)."""
    shutil.copytree(source, run, symlinks=True)
    path = run / "train" / "manifest.json"
    manifest = json.loads(path.read_text())
    if "num_classes" in metrics:
        manifest["num_classes"] = metrics.pop("num_classes")
    manifest["metrics"].update(metrics)
    path.write_text(json.dumps(manifest))
    return run


def test_a_run_at_chance_is_flagged(sweep_root, tmp_path):
    source = sweep_root / "bnnone"
    assert json.loads((source / "train" / "manifest.json").read_text())["num_classes"] == 10
    for name, metrics in [("stuck", dict(val_acc=0.119)), ("learns", dict(val_acc=0.121)),
                          ("two-classes", dict(val_acc=0.515, num_classes=2))]:
        _with_train_metrics(source, tmp_path / "runs" / name, **metrics)
    no_val = _with_train_metrics(source, tmp_path / "runs" / "no-val", val_acc=None)
    metrics_path = no_val / "test" / "metrics.json"
    metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), "accuracy": 0.1}))
    rows = {r["name"]: r for r in collect_rows([tmp_path / "runs"])}
    assert rows["stuck"]["flag"] == "at chance" and rows["learns"]["flag"] is None
    assert rows["stuck"]["note"] == ("at chance: validation accuracy 11.90% is below chance + 2 "
                                     "points (12.00% for 10 classes)")
    assert rows["two-classes"]["flag"] == "at chance" and "for 2 classes" in \
        rows["two-classes"]["note"]
    assert rows["no-val"]["flag"] == "at chance" and "test accuracy 10.00%" in \
        rows["no-val"]["note"]
    table = markdown_table(list(rows.values()))
    assert "| flag |" in table.splitlines()[0] and "| at chance |" in table


def test_a_diverged_run_shows_where_it_diverged(sweep_root, data_dir, tmp_path):
    from arraybn.stages import run_train
    from arraybn.stages.divergence import TrainingDiverged
    from tests.stages.helpers import quiet, tiny_config
    run = tmp_path / "runs" / "lr1e6"
    with pytest.raises(TrainingDiverged):
        run_train(run, tiny_config(data_dir, optimizer="adam", lr=1e6, bn="none"), echo=quiet)
    retrained = tmp_path / "runs" / "retrained"
    shutil.copytree(sweep_root / "bnnone", retrained, symlinks=True)
    config = json.loads((retrained / "train" / "manifest.json").read_text())["config"]
    with pytest.raises(TrainingDiverged):
        run_train(retrained, {**config, "optimizer": "adam", "lr": 1e6}, force=True, echo=quiet)
    rows = {r["name"]: r for r in collect_rows([tmp_path / "runs"])}
    row = rows["lr1e6"]
    assert re.fullmatch(r"diverged \(epoch 1, step [123]\)", row["flag"]), row["flag"]
    assert row["note"].startswith("diverged at lr 1e+06: training diverged at epoch 1, step ")
    assert "no train stage" not in row["note"] and "no test stage" not in row["note"]
    assert (row["model"], row["bn"], row["batch_size"], row["val_acc"]) == ("lenet5", "none", 16,
                                                                             None)
    old = rows["retrained"]
    assert old["flag"] is None and old["val_acc"] is not None and old["test_acc"] is not None
    assert old["note"].startswith("a later training diverged at lr 1e+06") and \
        old["note"].endswith("train/ holds the earlier model")
    assert "| diverged (epoch 1, step" in markdown_table(list(rows.values()))
