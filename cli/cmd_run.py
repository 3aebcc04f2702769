"""``arraybn run RUN``: train, postproc and test in one go, with one set of options."""
import click

from arraybn_cli.cmd_postproc import postproc_stage
from arraybn_cli.cmd_test import per_class_table, test_stage
from arraybn_cli.cmd_train import train_stage
from arraybn_cli.options import (common_options, postproc_method_options, run_dir_argument,
                                 test_stats_option, train_options)
from arraybn_cli.reporting import Reporter, friendly_errors


@click.command("run")
@run_dir_argument
@train_options
@postproc_method_options
@click.option("--postproc-batch-size", type=click.IntRange(2), default=256, show_default=True,
              help="Batch size of the postproc pass.")
@test_stats_option("--test-stats")
@common_options
@click.pass_context
def run_command(ctx, **params):
    """Train (RUN/train), post-process BN statistics (RUN/postproc) and test (RUN/test).

    Post-processing is skipped for a model without BN (--bn none). Stages after a (re)trained
    one are replaced, since their results would be stale.
    """
    reporter = Reporter(params["as_json"])
    with friendly_errors():
        train = train_stage(ctx, params, reporter)
        result = {"train": train}
        if params["bn"] != "none":
            result["postproc"] = postproc_stage(params, reporter, params["postproc_batch_size"],
                                                force=True)
        result["test"] = test_stage(params, reporter, train["config"]["eval_batch_size"],
                                    force=True)
    reporter.result(result, per_class_table(result["test"]))
