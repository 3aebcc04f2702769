"""``arraybn report RUN...``: one table over finished runs (markdown on stdout, CSV on request)."""
import click

from arraybn.experiments.report import collect_rows, csv_text, markdown_table
from arraybn_cli.reporting import friendly_errors


def _write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


@click.command("report")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the table as CSV (raw numbers: accuracies as fractions).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the markdown table to this file.")
@click.option("--no-variants", is_flag=True, help="Leave out the rows of RUN/variants/*.")
def report_command(runs, csv_path, markdown_path, no_variants):
    """Tabulate runs: one row per run and per variant (RUN/variants/NAME).

    RUN may be a run directory, a directory of runs (e.g. a sweep's root) or a glob pattern.
    A run without its test stage is listed with blanks and a note.
    """
    with friendly_errors():
        rows = collect_rows(runs, variants=not no_variants)
        table = markdown_table(rows)
        if csv_path:
            _write(csv_path, csv_text(rows))
        if markdown_path:
            _write(markdown_path, table)
    click.echo(table, nl=False)
