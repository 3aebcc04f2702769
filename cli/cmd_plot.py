"""``arraybn plot RUN... --kind KIND --out FILE.png``: figures of finished runs."""
import click

from arraybn.experiments.plots import KINDS, PlotUnavailable, make_plot
from arraybn_cli.reporting import friendly_errors


def _size(ctx, param, value):
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT in pixels like 1000x450; got {value!r}")
    if min(width, height) < 100:
        raise click.BadParameter(f"the figure must be at least 100x100 pixels; got {value!r}")
    return width, height


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--kind", type=click.Choice(KINDS), required=True,
              help="curves: accuracy/loss per epoch; batch-size: test accuracy and train-test "
                   "gap vs batch size; postproc-batches: test accuracy vs post-processing "
                   "batches; timing: seconds per epoch and test time; layers: "
                   "pre-activation percentiles over steps per layer; ics: internal covariate "
                   "shift per layer (both need train --track-layers).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The PNG to write.")
@click.option("--size", callback=_size, default="1000x450", show_default=True,
              help="Width x height in pixels.")
@click.option("--title", default=None, help="Figure title (default: one per kind).")
def plot_command(runs, kind, out, size, title):
    """Draw a PNG figure of finished runs (needs matplotlib: pip install 'arraybn[plot]')."""
    with friendly_errors():
        try:
            make_plot(runs, kind, out, size=size, title=title)
        except PlotUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"saved {out}")
