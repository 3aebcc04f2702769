"""Tables over finished runs: one row per run directory and one per variant of it.

A row is read from the stored artifacts only (``train/manifest.json``, ``postproc/manifest.json``,
``test/metrics.json``); nothing is recomputed. A run without its test stage (or without any
stage) still gets a row, with blanks and a note that says which command completes it.

A test made for another model (``train --force`` after ``test``) or with statistics that were
remade since (``postproc --force`` after ``test``) is *stale*: its row keeps the training numbers,
leaves the test numbers out, sets ``stale`` and says in the note which commands make it current.
It is marked rather than refused: a report over a sweep's root is a survey, and one retrained
run should not hide the table of all the others; but an old model's test accuracy printed next
to a new model's validation accuracy would be read as one result, so it is never shown.

Two outcomes of training are results too (of a learning-rate sweep, say), and the ``flag``
column names them, the note saying more:
- ``diverged (epoch E, step S)``: training diverged (``RUN/train-checkpoint/diverged.json``,
  written also when it diverged before its first checkpoint); S is blank when it diverged in
  the validation at the end of epoch E.
- ``at chance``: the final validation accuracy (the test accuracy when the run holds out no
  validation split) is below chance + CHANCE_MARGIN, chance being 1 / the number of classes:
  the network learned nothing (dead ReLUs, a learning rate too large or too small), while its
  loss stays finite so that it does not count as diverged.
"""
import csv
import glob
import io
import os
import re

from arraybn.errors import UserError
from arraybn.experiments.sweep_config import VARIANTS_DIR
from arraybn.stages.artifacts import StageError, read_json_if_exists, stage_dir
from arraybn.stages.train import read_divergence

COLUMNS = (  # (key, header)
    ("name", "run"), ("model", "model"), ("bn", "BN"), ("bn_position", "BN position"),
    ("backend", "backend"),    ("batch_size", "batch"), ("epochs", "epochs"), ("train_images", "train images"),
    ("train_seconds", "train s"), ("seconds_per_epoch", "s/epoch"),
    ("train_acc", "train acc"), ("val_acc", "val acc"), ("test_loss", "test loss"),
    ("test_acc", "test acc"), ("stats", "statistics"), ("test_seconds", "test s"),
    ("stale", "stale"), ("flag", "flag"), ("note", "note"))
PERCENT_KEYS = ("train_acc", "val_acc", "test_acc")
STAGE_MARKERS = ("train", "test", "sweep-run.json", "train-checkpoint")
TEXT_KEYS = ("name", "stats", "flag", "note", "model", "bn", "bn_position")
CHANCE_MARGIN = 0.02        # accuracy below chance + 2 points: "at chance"
# Manifests written before they recorded num_classes: every dataset arraybn reads has 10.
DEFAULT_NUM_CLASSES = 10


class NoRunsFound(UserError, FileNotFoundError):
    """No run directory matches what the user asked to report."""


def is_run_dir(path):
    return any(os.path.exists(os.path.join(path, marker)) for marker in STAGE_MARKERS)


def find_runs(patterns):
    """Run directories from paths or glob patterns; a directory of runs gives its runs.

    Raises FileNotFoundError when a pattern matches nothing, naming it.
    """
    runs = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.fspath(pattern))) or []
        if not matches:
            raise NoRunsFound(f"no run directory matches {os.fspath(pattern)!r}")
        for path in matches:
            if is_run_dir(path):
                runs.append(path)
            elif os.path.isdir(path):
                runs.extend(os.path.join(path, name)
                            for name in sorted(os.listdir(path), key=_natural_key)
                            if is_run_dir(os.path.join(path, name)))
    unique = list(dict.fromkeys(os.path.normpath(r) for r in runs))
    if not unique:
        raise NoRunsFound(f"no run directories (with train/ or test/) in "
                                f"{', '.join(map(os.fspath, patterns))}")
    return unique


def describe_stats(metrics, postproc, config):
    """Words for the statistics the test used, e.g. 'postproc ema(std, decay 0.9), 5 x 256'."""
    stats = metrics.get("stats", "")
    if stats == "postproc" and postproc:
        options = postproc.get("postproc", {})
        method = options.get("method", "?")
        if method == "ema":
            method = f"ema({options.get('stat')}, decay {options.get('decay')})"
        batches = options.get("batches")
        amount = "all batches" if batches is None else f"{batches} batches"
        return f"postproc {method}, {amount} of {options.get('batch_size')} " \
               f"({options.get('images_seen')} images)"
    if stats == "running":
        return f"running (momentum {config.get('bn_momentum')})"
    if stats == "batch":
        return f"test-batch statistics ({metrics.get('batch_size')} per batch)"
    return stats


def _config_part(config):
    """The row's columns that come from the training config."""
    return {"model": config.get("model"), "bn": config.get("bn"),
            "bn_position": config.get("bn_position") if config.get("bn") != "none" else "",
            "batch_size": config.get("batch_size")}


def _train_part(manifest):
    config = manifest.get("config", {})
    metrics = manifest.get("metrics", {})
    seconds = manifest.get("timings", {}).get("train_seconds")
    epochs = metrics.get("epochs")
    return {**_config_part(config), "backend": manifest.get("backend"), "epochs": epochs,
            "train_images": manifest.get("dataset", {}).get("sizes", {}).get("train"),
            "train_seconds": seconds,
            "seconds_per_epoch": seconds / epochs if seconds is not None and epochs else None,
            "train_acc": metrics.get("train_acc"), "val_acc": metrics.get("val_acc")}


def stale_test_note(run_dir, train, postproc, test):
    """Why ``test`` (metrics.json) does not describe the stored model and statistics, with the
    commands that make it current; None when it does (or when there is nothing to compare)."""
    used = test.get("inputs", {})
    model_sha = (train or {}).get("outputs", {}).get("model.npz")
    if train is not None and used.get("train/model.npz") != model_sha:
        commands = [f"arraybn test {run_dir} --force"]
        if postproc is not None and postproc.get("inputs", {}).get("train/model.npz") != model_sha:
            commands.insert(0, f"arraybn postproc {run_dir} --force")
        return (f"stale: test predates train (test/metrics.json is of an earlier model.npz; "
                f"its numbers are left out); run `{'` then `'.join(commands)}`")
    if "postproc/bn_stats.npz" in used and \
            used["postproc/bn_stats.npz"] != (postproc or {}).get("outputs", {}).get("bn_stats.npz"):
        return (f"stale: test predates postproc (it used BN statistics that were replaced or "
                f"removed since; its numbers are left out); run `arraybn test {run_dir} --force`")
    return None


def divergence_note(record, retrained):
    """``(flag, note)`` for a divergence record (``arraybn.stages.train.read_divergence``)."""
    step = record.get("step")
    where = ("" if "epoch" not in record else f" (epoch {record['epoch']}"
             f"{'' if step is None else f', step {step}'})")
    lr = record.get("config", {}).get("lr")
    note = f"diverged{'' if lr is None else f' at lr {lr:g}'}: {record['error']}"
    if retrained:
        return None, f"a later training {note}; train/ holds the earlier model"
    return f"diverged{where}", note


def chance_note(row, num_classes):
    """The note of a run whose final accuracy is at chance (see the module), else None."""
    which, accuracy = (("validation", row["val_acc"]) if row["val_acc"] is not None
                       else ("test", row["test_acc"]))
    chance = 1.0 / num_classes
    if accuracy is None or accuracy >= chance + CHANCE_MARGIN:
        return None
    return (f"at chance: {which} accuracy {100 * accuracy:.2f}% is below chance + "
            f"{100 * CHANCE_MARGIN:g} points ({100 * (chance + CHANCE_MARGIN):.2f}% for "
            f"{num_classes} classes)")


def run_row(run_dir, name=None):
    """One row for ``run_dir``: the ``COLUMNS`` keys, plus 'run_dir', 'history' (path of
    history.csv) and 'postproc' (the options of the postproc its test used, or None).
    A stale test (see the module docstring) gives ``stale=True`` and no test numbers."""
    row = {key: None for key, _ in COLUMNS}
    row["stale"] = False
    row.update(name=name or os.path.basename(os.path.normpath(run_dir)), run_dir=run_dir,
               history=None, postproc=None)
    try:
        train = read_json_if_exists(os.path.join(stage_dir(run_dir, "train"), "manifest.json"))
        test = read_json_if_exists(os.path.join(stage_dir(run_dir, "test"), "metrics.json"))
        postproc = read_json_if_exists(os.path.join(stage_dir(run_dir, "postproc"), "manifest.json"))
        diverged = read_divergence(run_dir)
    except StageError as exc:
        row["note"] = str(exc)
        return row
    notes = _add_training(row, run_dir, train, diverged)
    if test is not None or train is not None or diverged is None:   # a diverged run: no model
        notes += _add_test(row, run_dir, train, postproc, test)
    at_chance = train is not None and chance_note(row, train.get("num_classes",
                                                                 DEFAULT_NUM_CLASSES))
    if at_chance and row["flag"] is None:
        row["flag"] = "at chance"
        notes.insert(0, at_chance)
    row["note"] = "; ".join(notes)
    return row


def _add_training(row, run_dir, train, diverged):
    """Fill ``row`` from the train stage and the divergence record; returns the notes."""
    notes = []
    if diverged is not None:
        row["flag"], note = divergence_note(diverged, retrained=train is not None)
        notes.append(note)
        if train is None:
            row.update(_config_part(diverged.get("config", {})))
    if train is not None:
        row.update(_train_part(train))
        row["history"] = os.path.join(stage_dir(run_dir, "train"), "history.csv")
    elif diverged is None:
        notes.append(f"no train stage: run `arraybn train {run_dir}`")
    return notes


def _add_test(row, run_dir, train, postproc, test):
    """Fill ``row`` from the test stage unless it is stale; returns the notes."""
    if test is None:
        return [f"no test stage: run `arraybn test {run_dir}`"]
    stale = stale_test_note(run_dir, train, postproc, test)
    if stale:
        row["stale"] = True
        return [stale]
    row.update(test_loss=test.get("loss"), test_acc=test.get("accuracy"),
               test_seconds=test.get("timings", {}).get("seconds"),
               stats=describe_stats(test, postproc, (train or {}).get("config", {})))
    if test.get("stats") == "postproc" and postproc:
        row["postproc"] = postproc.get("postproc")
    return []


def collect_rows(patterns, variants=True):
    """Rows for every run matched by ``patterns``, each followed by its variants' rows."""
    rows = []
    for run_dir in find_runs(patterns):
        main = run_row(run_dir)
        rows.append(main)
        variants_dir = os.path.join(run_dir, VARIANTS_DIR)
        if variants and os.path.isdir(variants_dir):
            for variant in sorted(os.listdir(variants_dir), key=_natural_key):
                path = os.path.join(variants_dir, variant)
                if is_run_dir(path):
                    row = run_row(path, f"{main['name']}/{variant}")
                    row.update(variant=variant, parent=run_dir)
                    rows.append(row)
    return rows


def _natural_key(name):
    """Sort 'b2' before 'b10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def format_cell(key, value):
    if value is None:
        return ""
    if key == "stale":
        return "stale" if value else ""
    if key in PERCENT_KEYS:
        return f"{100 * value:.2f}%"
    if key == "test_loss":
        return f"{value:.4f}"
    if key in ("train_seconds", "seconds_per_epoch", "test_seconds"):
        return f"{value:.1f}"
    return str(value)


def markdown_table(rows, columns=COLUMNS):
    """A GitHub markdown table; columns that are empty in every row are left out."""
    used = [(key, header) for key, header in columns
            if any(format_cell(key, row.get(key)) for row in rows)]
    lines = ["| " + " | ".join(header for _, header in used) + " |",
             "|" + "|".join("---" if key in TEXT_KEYS else "---:" for key, _ in used) + "|"]
    for row in rows:
        cells = [format_cell(key, row.get(key)).replace("|", "\\|") for key, _ in used]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows, columns=COLUMNS):
    """CSV with every column, raw numbers (accuracies as fractions, times in seconds)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([key for key, _ in columns] + ["run_dir"])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row[key] for key, _ in columns]
                        + [row["run_dir"]])
    return out.getvalue()
