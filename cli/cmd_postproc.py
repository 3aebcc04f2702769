"""``arraybn postproc RUN``: population BN statistics with frozen weights -> RUN/postproc/."""
import click

from arraybn.stages import run_postproc
from arraybn_cli.mpi_job import ending_every_rank, mpi_world
from arraybn_cli.options import (common_options, make_postproc_config, postproc_batch_size_option,
                                 postproc_method_options, run_dir_argument)
from arraybn_cli.reporting import Reporter, friendly_errors


@click.command("postproc")
@run_dir_argument
@postproc_method_options
@postproc_batch_size_option("--batch-size")
@common_options
def postproc_command(**params):
    """Estimate each BN layer's population statistics over the training data.

    The weights stay frozen; every BN layer normalises with batch statistics while an estimator
    accumulates its input's mean and variance. Stores RUN/postproc/bn_stats.npz.
    """
    reporter = Reporter(params["as_json"])
    comm = mpi_world()
    with ending_every_rank(comm), friendly_errors():
        manifest = run_postproc(params["run_dir"], make_postproc_config(params),
                                backend=params["backend"], data_dir=params["data_dir"],
                                force=params["force"], echo=reporter.echo, comm=comm)
    if comm is not None and comm.rank != 0:
        return
    reporter.result(manifest, f"saved {params['run_dir']}/postproc/")
