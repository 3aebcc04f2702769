"""The ``arraybn`` command group: only wires the commands together."""
import click

import arraybn
from arraybn.backends.compile_notice import set_compile_notice
from arraybn_cli.cmd_info import info_command
from arraybn_cli.cmd_postproc import postproc_command
from arraybn_cli.cmd_run import run_command
from arraybn_cli.cmd_test import test_command
from arraybn_cli.cmd_plot import plot_command
from arraybn_cli.cmd_report import report_command
from arraybn_cli.cmd_sweep import sweep_command
from arraybn_cli.cmd_train import train_command
from arraybn_cli.cmd_warmup import warmup_command


@click.group()
@click.version_option(arraybn.__version__, prog_name="arraybn")
@click.option("--debug", is_flag=True,
              help="Show the traceback of every error, also of the one-line ones.")
@click.pass_context
def cli(ctx, debug):
    """arraybn: train, post-process and test networks with Batch Normalization."""
    set_compile_notice(lambda: click.echo("compiling kernels (first run only)…", err=True))
    ctx.call_on_close(lambda: set_compile_notice(None))


for command in (train_command, postproc_command, test_command, run_command, info_command,
                sweep_command, report_command, plot_command, warmup_command):
    cli.add_command(command)
