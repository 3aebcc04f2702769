"""The base of the errors a user can fix, so that callers (the CLI) can tell them from bugs.

Every arraybn error about the user's input or environment (a missing stage, a dataset that is
not there, a bad option, a backend that cannot run here, non-finite statistics, ...) derives
from ``UserError`` as well as from the built-in class it always had (``StageError`` is still a
``RuntimeError``), so existing ``except`` clauses keep working. Its message says what was wrong
and what to do; the CLI prints it as one line. Any other exception is a bug.
"""


class UserError(Exception):
    """An error the user can fix; the message says what was wrong and what to do."""


class ConfigError(UserError, ValueError):
    """An option or configuration value that arraybn cannot use."""
