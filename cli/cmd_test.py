"""``arraybn test RUN``: evaluate on the test split -> RUN/test/metrics.json."""
import click

from arraybn.stages import run_test
from arraybn_cli.mpi_job import ending_every_rank, mpi_world
from arraybn_cli.options import (common_options, make_test_config, run_dir_argument,
                                 test_stats_option)
from arraybn_cli.reporting import Reporter, friendly_errors


def per_class_table(metrics):
    lines = [f"  {name:<12} {'-' if acc is None else f'{100 * acc:6.2f}%'}"
             for name, acc in metrics["per_class_accuracy"].items()]
    return "per-class accuracy:\n" + "\n".join(lines)


@click.command("test")
@run_dir_argument
@test_stats_option("--stats")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Images per batch (default: the run's --eval-batch-size).")
@common_options
def test_command(**params):
    """Evaluate the trained model on the test split and store RUN/test/metrics.json.

    BN uses the post-processed statistics when RUN/postproc exists, else the running ones;
    --stats batch normalises with each test batch's own statistics.
    """
    reporter = Reporter(params["as_json"])
    comm = mpi_world()
    with ending_every_rank(comm), friendly_errors():
        metrics = run_test(params["run_dir"], make_test_config(params, params["batch_size"]),
                           data_dir=params["data_dir"], force=params["force"],
                           echo=reporter.echo, comm=comm)
    if comm is not None and comm.rank != 0:
        return
    reporter.result(metrics, per_class_table(metrics))
