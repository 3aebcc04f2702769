"""``arraybn train RUN``: train a model and store RUN/train/."""
import click

from arraybn.stages import run_train
from arraybn_cli.mpi_job import ending_every_rank, mpi_world
from arraybn_cli.options import common_options, run_dir_argument, train_config_from, train_options
from arraybn_cli.reporting import EpochProgress, Reporter, friendly_errors


@click.command("train")
@run_dir_argument
@train_options
@common_options
@click.pass_context
def train_command(ctx, **params):
    """Train a network on the training split and store RUN/train/.

    Writes model.npz (PyTorch state_dict names), history.csv, a checkpoint and manifest.json.
    Ctrl-C saves a checkpoint; --resume continues exactly where it stopped. Under mpiexec or
    srun, K processes train data-parallel (--batch-size is the global batch); rank 0 writes.
    """
    reporter = Reporter(params["as_json"])
    progress = EpochProgress()
    comm = mpi_world()
    rank0 = comm is None or comm.rank == 0
    with ending_every_rank(comm), friendly_errors():
        try:
            config = train_config_from(ctx, params, params["resume"])
            manifest = run_train(params["run_dir"], config, force=params["force"],
                                 resume=params["resume"], echo=reporter.echo,
                                 on_step=progress if rank0 else None, comm=comm)
        finally:
            progress.close()
    if not rank0:
        return
    metrics = manifest["metrics"]
    val = ("" if metrics["val_acc"] is None
           else f", validation accuracy {100 * metrics['val_acc']:.2f}%")
    reporter.result(manifest, f"trained {metrics['epochs']} epochs{val}; "
                              f"saved {params['run_dir']}/train/")
