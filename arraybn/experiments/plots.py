"""PNG figures of finished runs (matplotlib, the optional extra ``arraybn[plot]``).

Every figure is drawn from the rows of ``arraybn.experiments.report`` (and each run's
history.csv) on an Agg canvas of an exact pixel size. matplotlib is imported only here, and
only when a figure is made.
"""
import csv
import math
import os

from arraybn.errors import ConfigError, UserError
from arraybn.experiments.report import collect_rows
from arraybn.stages.layer_tracking import LAYERS_CSV, read_layers_csv

KINDS = ("curves", "batch-size", "postproc-batches", "timing", "layers", "ics")
DPI = 100


class PlotUnavailable(UserError, RuntimeError):
    """matplotlib is not installed."""


def _figure(size):
    """A matplotlib Figure of ``size`` = (width, height) pixels on an Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable("plots need matplotlib: pip install 'arraybn[plot]'") from None
    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def read_history(path):
    """history.csv as {column: [float or None per epoch]}."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) if r[key] not in ("", None) else None for r in rows]
            for key in (rows[0].keys() if rows else ())}


def _percent(values):
    return [None if v is None else 100 * v for v in values]


def plot_curves(figure, rows):
    """Accuracy and loss per epoch: validation solid, training dashed, one colour per run."""
    acc_ax, loss_ax = figure.subplots(1, 2)
    runs = [row for row in rows if row.get("history") and os.path.isfile(row["history"])
            and "variant" not in row]
    if not runs:
        raise ConfigError("none of the runs has a train/history.csv to plot")
    for index, row in enumerate(runs):
        history = read_history(row["history"])
        colour = f"C{index % 10}"
        epochs = history["epoch"]
        acc_ax.plot(epochs, _percent(history["val_acc"]), "-o", color=colour, label=row["name"],
                    markersize=3)
        acc_ax.plot(epochs, _percent(history["train_acc"]), "--", color=colour, alpha=0.7)
        loss_ax.plot(epochs, history["val_loss"], "-o", color=colour, markersize=3)
        loss_ax.plot(epochs, history["train_loss"], "--", color=colour, alpha=0.7)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.legend(fontsize="small", title="solid: validation, dashed: training",
                  title_fontsize="small")
    return "Training and validation curves per epoch"


def _by(rows, key):
    groups = {}
    for row in rows:
        groups.setdefault(row.get(key), []).append(row)
    return groups


def plot_batch_size(figure, rows):
    """Test accuracy and the train - test accuracy gap against the batch size, per BN kind."""
    acc_ax, gap_ax = figure.subplots(1, 2)
    runs = [r for r in rows if "variant" not in r and r.get("test_acc") is not None
            and r.get("batch_size")]
    if not runs:
        raise ConfigError("none of the runs has test metrics to plot against the batch size")
    for bn, group in sorted(_by(runs, "bn").items(), key=lambda item: str(item[0])):
        group = sorted(group, key=lambda r: r["batch_size"])
        sizes = [r["batch_size"] for r in group]
        acc_ax.plot(sizes, [100 * r["test_acc"] for r in group], "-o", label=f"bn={bn}")
        gap_ax.plot(sizes, [100 * (r["train_acc"] - r["test_acc"])
                            if r.get("train_acc") is not None else None for r in group], "-o",
                    label=f"bn={bn}")
    ticks = sorted({r["batch_size"] for r in runs})
    for ax in (acc_ax, gap_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("mini-batch size (images, log scale)")
        ax.legend(fontsize="small")
    acc_ax.set(ylabel="test accuracy (%)", title="test accuracy")
    gap_ax.set(ylabel="train - test accuracy (percentage points)",
               title="generalisation gap (last-epoch train acc)")
    gap_ax.axhline(0, color="grey", linewidth=0.8)
    return "Batch-size sensitivity"


def _postproc_point(row):
    """``(method label, batches used)`` of a row tested with post-processed statistics."""
    options = row.get("postproc")
    if not options or not options.get("batch_size") or options.get("images_seen") is None:
        return None
    method = options["method"]
    if method == "ema":
        method = f"ema({options.get('stat')}, decay {options.get('decay')})"
    return method, math.ceil(options["images_seen"] / options["batch_size"])


def plot_postproc_batches(figure, rows):
    """Test accuracy against the number of post-processing batches, one line per method and
    run; the run's own test (e.g. running averages) is a dashed horizontal line."""
    ax = figure.subplots(1, 1)
    drawn, ticks = 0, set()
    for parent, group in _by(rows, "parent").items():
        if parent is None:
            continue
        main = next((r for r in rows if r["run_dir"] == parent), None)
        run_name = main["name"] if main else os.path.basename(parent)
        lines = {}
        for row in group:
            point = _postproc_point(row)
            if point and row.get("test_acc") is not None:
                lines.setdefault(point[0], []).append((point[1], 100 * row["test_acc"]))
        for method, points in sorted(lines.items()):
            points.sort()
            ticks.update(x for x, _ in points)
            line, = ax.plot(*zip(*points), "-o", markersize=4, label=f"{run_name}: {method}")
            drawn += 1
        if main and main.get("test_acc") is not None and lines:
            ax.axhline(100 * main["test_acc"], linestyle="--", color=line.get_color(),
                       linewidth=1, label=f"{run_name}: {main.get('stats')}")
    if not drawn:
        raise ConfigError("no post-processing variants to plot (see [[variants]] in the sweep "
                         "file documentation)")
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.set(xlabel="post-processing batches (log scale)", ylabel="test accuracy (%)")
    ax.legend(fontsize="x-small", ncol=2)
    return "Test accuracy vs number of post-processing batches"


def plot_timing(figure, rows):
    """Training time per epoch and test-stage time, bars per run (mean over repeated seeds)."""
    epoch_ax, test_ax = figure.subplots(1, 2)
    runs = [r for r in rows if "variant" not in r and r.get("seconds_per_epoch") is not None]
    if not runs:
        raise ConfigError("none of the runs has training timings")
    groups = {}
    for row in runs:
        config = _run_label(row)
        groups.setdefault(config, []).append(row)
    labels = list(groups)
    for ax, key, title in ((epoch_ax, "seconds_per_epoch", "training time per epoch"),
                           (test_ax, "test_seconds", "test stage (10k images, incl. loading)")):
        means = [_mean([r.get(key) for r in groups[label]]) for label in labels]
        ax.bar(range(len(labels)), [m or 0 for m in means],
               color=[f"C{i % 10}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize="small")
        ax.set(ylabel="seconds", title=title)
    return "Cost of BN"


def _run_label(row):
    backend = row.get("backend") or ""
    return f"{backend} bn={row.get('bn')}".strip()


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _tracked_runs(rows):
    """``[(label, {metric: {layer: (steps, values)}})]`` of the runs with a layers.csv."""
    runs = []
    for row in rows:
        path = os.path.join(row["run_dir"], "train", LAYERS_CSV)
        if "variant" not in row and os.path.isfile(path):
            runs.append((f"{row['name']} (bn={row.get('bn')})", read_layers_csv(path)))
    if not runs:
        raise ConfigError("none of the runs has a train/layers.csv; train them with "
                          "`arraybn train RUN --track-layers`")
    return runs


def _layer_names(runs, metric):
    names = {}
    for _, table in runs:
        names.update(dict.fromkeys(table.get(metric, {})))
    return list(names)


def plot_layers(figure, rows):
    """Each tracked layer's pre-activation over training (Ioffe & Szegedy's Fig. 1): the median
    as a line, the 15th to 85th percentiles as a band, one colour per run."""
    runs = _tracked_runs(rows)
    layers = _layer_names(runs, "p50")
    columns = min(4, len(layers))
    axes = figure.subplots(math.ceil(len(layers) / columns), columns, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        for index, (label, table) in enumerate(runs):
            if layer not in table.get("p50", {}):
                continue
            steps, median = table["p50"][layer]
            colour = f"C{index % 10}"
            ax.fill_between(steps, table["p15"][layer][1], table["p85"][layer][1],
                            color=colour, alpha=0.2, linewidth=0)
            ax.plot(steps, median, color=colour, label=label)
        ax.set_title(layer, fontsize="small")
        ax.set_xlabel("step", fontsize="small")
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="x-small")
    return "Pre-activation (ReLU input) percentiles 15/50/85 over training"


def _mean_and_spread(values):
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, 0.0
    mean = sum(finite) / len(finite)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))


def plot_ics(figure, rows):
    """Santurkar et al.'s internal covariate shift per layer: ||G - G'|| and cos(G, G'), the
    mean over the measured steps with their standard deviation, one line per run."""
    runs = _tracked_runs(rows)
    l2_ax, cos_ax = figure.subplots(1, 2)
    layers = _layer_names(runs, "ics_l2")
    if not layers:
        raise ConfigError("the layers.csv files hold no ICS measurements (a model with one "
                          "weight layer has none)")
    for ax, metric in ((l2_ax, "ics_l2"), (cos_ax, "ics_cos")):
        for index, (label, table) in enumerate(runs):
            points = [(x, *_mean_and_spread(table[metric][layer][1]))
                      for x, layer in enumerate(layers) if layer in table.get(metric, {})]
            if points:
                xs, means, spreads = zip(*points)
                ax.errorbar(xs, means, yerr=spreads, fmt="-o", markersize=4, capsize=3,
                            color=f"C{index % 10}", label=label)
        ax.set_xticks(range(len(layers)), layers, rotation=30, fontsize="small")
    l2_ax.set(ylabel="||G - G'|| (l2)", title="gradient change from earlier layers' update")
    cos_ax.set(ylabel="cos(G, G')", title="cosine (1: no shift)")
    l2_ax.legend(fontsize="small")
    return "Internal covariate shift per layer (Santurkar et al. 2018)"


PLOTTERS = {"curves": plot_curves, "batch-size": plot_batch_size,
            "postproc-batches": plot_postproc_batches, "timing": plot_timing,
            "layers": plot_layers, "ics": plot_ics}


def make_plot(patterns, kind, out, *, size=(1000, 450), title=None):
    """Draw ``kind`` for the runs matched by ``patterns`` into the PNG ``out``.

    size: (width, height) in pixels; the PNG has exactly this size. Returns ``out``.
    Raises PlotUnavailable without matplotlib, ConfigError for an unknown kind or no data.
    """
    if kind not in PLOTTERS:
        raise ConfigError(f"unknown plot kind {kind!r}; choose one of {', '.join(KINDS)}")
    if min(size) < 100:
        raise ConfigError(f"the figure size must be at least 100x100 pixels, got {size}")
    figure = _figure(size)
    rows = collect_rows(patterns)
    default_title = PLOTTERS[kind](figure, rows)
    figure.suptitle(title or default_title)
    figure.tight_layout()
    directory = os.path.dirname(os.fspath(out))
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(out, format="png", dpi=DPI)
    return out
