"""Running the CLI in tests."""
from click.testing import CliRunner

from arraybn_cli.main import cli


def invoke(*args):
    """``arraybn ARGS`` through CliRunner; an expected error never shows a traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result
