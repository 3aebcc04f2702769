"""``arraybn postproc RUN``: population BN statistics with frozen weights -> RUN/postproc/."""
import click

from arraybn.stages import run_postproc
from arraybn_cli.options import common_options, postproc_method_options, run_dir_argument
from arraybn_cli.reporting import Reporter, friendly_errors


def postproc_stage(params, reporter, batch_size, force):
    return run_postproc(params["run_dir"], method=params["method"], decay=params["decay"],
                        stat=params["stat"], batches=params["batches"], batch_size=batch_size,
                        backend=params["backend"], data_dir=params["data_dir"], force=force,
                        echo=reporter.echo)


@click.command("postproc")
@run_dir_argument
@postproc_method_options
@click.option("--batch-size", type=click.IntRange(2), default=256, show_default=True,
              help="Images per batch (each BN layer sees this batch's statistics).")
@common_options
def postproc_command(**params):
    """Estimate each BN layer's population statistics over the training data.

    The weights stay frozen; every BN layer normalises with batch statistics while an estimator
    accumulates its input's mean and variance. Stores RUN/postproc/bn_stats.npz.
    """
    reporter = Reporter(params["as_json"])
    with friendly_errors():
        manifest = postproc_stage(params, reporter, params["batch_size"], params["force"])
    reporter.result(manifest, f"saved {params['run_dir']}/postproc/")
