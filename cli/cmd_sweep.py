"""``arraybn sweep CONFIG.toml``: many runs from one TOML file, resumable, in parallel."""
import click

from arraybn.experiments.sweep import (MPI_JOBS_MESSAGE, describe_outcome, plan_sweep, run_sweep,
                                       serve_sweep_runs)
from arraybn.experiments.sweep_config import load_sweep
from arraybn_cli.mpi_job import ending_every_rank, mpi_world
from arraybn_cli.reporting import friendly_errors


def _describe_plan(plan):
    lines = []
    for spec, status, changes in plan:
        detail = f" ({', '.join(changes)})" if changes else ""
        config = spec.config
        lines.append(f"  {status:<8} {spec.run_dir}: {config.model} bn={config.bn} "
                     f"batch={config.batch_size} epochs={config.epochs}"
                     f"{f' subset={config.train_subset}' if config.train_subset else ''}"
                     f"{f', {len(spec.variants)} variants' if spec.has_bn and spec.variants else ''}"
                     f"{detail}")
    return "\n".join(lines)


@click.command("sweep")
@click.argument("config_file", metavar="CONFIG.toml",
                type=click.Path(exists=True, dir_okay=False))
@click.option("--jobs", "-j", type=click.IntRange(1), default=1, show_default=True,
              help="Runs in parallel (processes); the CPU cores are shared between them.")
@click.option("--dry-run", is_flag=True, help="Validate and list the runs; run nothing.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Directory for the runs (default: the file's `root`, else runs/<file name>).")
@click.option("--force", is_flag=True,
              help="Redo runs whose specification changed (otherwise that is an error).")
def sweep_command(config_file, jobs, dry_run, root, force):
    """Train, post-process and test every run of a sweep file (see docs/EXPERIMENTS.md).

    The whole file is validated before anything runs. Finished runs are skipped; a failing run
    does not stop the others, and the command then exits with status 1. A run that diverged is
    a result, not a failure, and is not trained again; one that another live process is
    making is skipped. With --jobs, Ctrl-C or SIGTERM stops every worker (trainings save a
    checkpoint; the same command goes on). Under `mpiexec -n K`, rank 0 schedules the runs on
    the other K-1 ranks (an MPI pool).
    """
    comm = mpi_world()
    if comm is not None and jobs > 1:
        raise click.UsageError(MPI_JOBS_MESSAGE)
    with ending_every_rank(comm), friendly_errors():
        if comm is not None and comm.rank != 0:
            if not dry_run:                       # a dry run opens no pool on rank 0
                serve_sweep_runs(comm)
            return
        sweep = load_sweep(config_file, root)
        plan = plan_sweep(sweep, force)
        click.echo(f"{sweep.path}: {len(plan)} runs under {sweep.root}")
        click.echo(_describe_plan(plan))
        if dry_run:
            return
        outcomes = run_sweep(sweep, jobs=jobs, force=force, echo=click.echo, comm=comm)
    click.echo("summary:")
    for outcome in outcomes:
        click.echo(f"  {describe_outcome(outcome)}")
    failed = [o["name"] for o in outcomes if o["status"] == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(outcomes)} runs failed: "
                                   f"{', '.join(failed)} (see their sweep.log)")
