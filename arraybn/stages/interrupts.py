"""Ctrl-C (SIGINT) and SIGTERM end every stage the same way.

The stage stops, writes nothing (its temporary directory is removed, an earlier result stays as
it was) and raises ``StageInterrupted``, whose message says so and whose ``exit_code`` is
128 + the signal number (130 for SIGINT, 143 for SIGTERM), the shell's convention. Training
instead stops at the next step boundary and saves a checkpoint first (``TrainingInterrupted``).

A signal that the parent process set to be ignored stays ignored: a job started with ``nohup``
or in the background of a non-interactive shell inherits SIGINT as SIG_IGN precisely so that a
Ctrl-C at the terminal does not reach it, and arraybn respects that choice. Handlers are only
installed in the main thread (Python delivers signals there only) and are restored on exit.
"""
import contextlib
import functools
import os
import signal
import threading

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class StageInterrupted(KeyboardInterrupt):
    """A stage stopped by SIGINT or SIGTERM; the message says what was kept and what to do."""

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self):
        """The conventional exit status of a process ended by this signal: 128 + its number."""
        return 128 + self.signum


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C raises KeyboardInterrupt."""


def raise_terminated(signum, frame):
    """A SIGTERM handler that raises ``Terminated``, as Ctrl-C raises KeyboardInterrupt."""
    raise Terminated


@contextlib.contextmanager
def handling(handlers):
    """Install ``{signum: handler}`` while active (main thread only), except for signals that
    are ignored (SIG_IGN) on entry; restores the previous handlers on exit."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            previous = signal.getsignal(signum)
            if previous is not signal.SIG_IGN:
                installed[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def signal_of(interrupt):
    """The signal behind a KeyboardInterrupt: SIGTERM for ``Terminated``, else SIGINT."""
    return getattr(interrupt, "signum", signal.SIGTERM if isinstance(interrupt, Terminated)
                   else signal.SIGINT)


@contextlib.contextmanager
def interruptible(stage, target):
    """Run a stage that writes ``target``: SIGTERM acts like Ctrl-C, and either becomes a
    StageInterrupted saying that nothing was written."""
    with handling({signal.SIGTERM: raise_terminated}):
        try:
            yield
        except StageInterrupted:
            raise
        except KeyboardInterrupt as exc:
            signum = signal_of(exc)
            raise StageInterrupted(f"{stage} interrupted by {SIGNAL_NAMES[signum]}; nothing was "
                                   f"written ({target} is as it was)", signum) from None


def interruptible_stage(stage):
    """Decorator: the stage function (first argument: the run) runs ``interruptible``."""
    def decorate(run_stage):
        @functools.wraps(run_stage)
        def run(run_dir, *args, **kwargs):
            with interruptible(stage, os.path.join(os.fspath(run_dir), stage)):
                return run_stage(run_dir, *args, **kwargs)
        return run
    return decorate
