"""``arraybn run RUN``: train, postproc and test in one go, with one set of options."""
import click

from arraybn.stages import run_pipeline
from arraybn_cli.cmd_test import per_class_table
from arraybn_cli.options import (common_options, make_postproc_config, make_test_config,
                                 postproc_batch_size_option, postproc_method_options,
                                 run_dir_argument, test_stats_option, train_config_from,
                                 train_options)
from arraybn_cli.reporting import EpochProgress, Reporter, friendly_errors


@click.command("run")
@run_dir_argument
@train_options
@postproc_method_options
@postproc_batch_size_option("--postproc-batch-size")
@test_stats_option("--test-stats")
@common_options
@click.pass_context
def run_command(ctx, **params):
    """Train (RUN/train), post-process BN statistics (RUN/postproc) and test (RUN/test).

    Post-processing is skipped for a model without BN (--bn none). Stages after a (re)trained
    one are replaced, since their results would be stale.
    """
    reporter = Reporter(params["as_json"])
    progress = EpochProgress()
    with friendly_errors():
        try:
            results = run_pipeline(params["run_dir"],
                                   train_config_from(ctx, params, params["resume"]),
                                   make_postproc_config(params), make_test_config(params),
                                   force=params["force"], resume=params["resume"],
                                   echo=reporter.echo, on_step=progress)
        finally:
            progress.close()
    result = {stage: value for stage, value in results.items() if value is not None}
    reporter.result(result, per_class_table(result["test"]))
