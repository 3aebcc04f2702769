"""``arraybn warmup``: compile the Numba kernels ahead of the first run (``make setup`` does)."""
import click

from arraybn.nn import MODEL_NAMES
from arraybn.stages.config import DTYPES
from arraybn.stages.warmup import warm_up
from arraybn_cli.reporting import friendly_errors


@click.command("warmup")
@click.option("--model", "models", type=click.Choice(MODEL_NAMES), multiple=True,
              default=("lenet5",), show_default=True, help="Model to warm up (repeatable).")
@click.option("--dtype", "dtypes", type=click.Choice(DTYPES), multiple=True,
              default=("float32",), show_default=True, help="Data type (repeatable).")
def warmup_command(models, dtypes):
    """Compile the Numba kernels a train -> postproc -> test run uses into Numba's disk cache.

    Runs one tiny epoch of each model on a synthetic dataset in a temporary directory; nothing
    else is written. Afterwards the first run of those models starts without compiling.
    """
    with friendly_errors():
        warm_up(models, dtypes, backend="numba", echo=click.echo)
