"""Output for the commands: messages, progress bars, --json results and friendly errors."""
import contextlib
import json
import sys
import traceback

import click

from arraybn.errors import UserError
from arraybn.stages import StageInterrupted


class Reporter:
    """Human messages go to stdout, or to stderr with --json (stdout then holds only JSON)."""

    def __init__(self, as_json):
        self.as_json = as_json

    def echo(self, message):
        click.echo(message, err=self.as_json)

    def result(self, data, summary=None):
        """Print ``data`` as JSON (with --json) or the one-line ``summary``."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        elif summary:
            click.echo(summary)


class EpochProgress:
    """A click progress bar per epoch (on stderr), showing the running loss and accuracy.

    Called by the trainer after every step with {epoch, epochs, step, steps, loss, acc}.
    """

    def __init__(self):
        self._bar = None
        self._epoch = None

    def __call__(self, info):
        if self._bar is None or info["epoch"] != self._epoch:
            self.close()
            self._epoch = info["epoch"]
            self._bar = click.progressbar(length=info["steps"], file=sys.stderr,
                                          label=f"epoch {info['epoch']}/{info['epochs']}",
                                          item_show_func=lambda text: text)
            self._bar.__enter__()
            self._bar.update(info["step"] - 1)
        self._bar.update(1, f"loss {info['loss']:.4f} acc {100 * info['acc']:.1f}%")
        if info["step"] >= info["steps"]:
            self.close()

    def close(self):
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def debugging():
    """Whether the group's ``--debug`` flag is set (False for a command run on its own)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


@contextlib.contextmanager
def friendly_errors():
    """Turn the errors a user can fix (``arraybn.errors.UserError``, a stage stopped by Ctrl-C or
    SIGTERM: exit status 130 or 143) into ClickExceptions: one line, no traceback; ``--debug`` prints the traceback first. Any other
    exception is a bug and passes through with its traceback."""
    try:
        yield
    except (UserError, StageInterrupted) as exc:
        if debugging():
            click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
        error = click.ClickException(str(exc))
        if isinstance(exc, StageInterrupted):
            error.exit_code = exc.exit_code
        raise error from None
