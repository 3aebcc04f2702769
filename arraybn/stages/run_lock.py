"""One writer per run directory: an exclusive lock on ``RUN/.lock`` while a stage runs.

Every stage function (``run_train``, ``run_postproc``, ``run_test``) and ``run_pipeline`` hold
the lock of their run directory; it is re-entrant within a process, so ``arraybn run`` holds it
across its three stages. It is ``flock(LOCK_EX | LOCK_NB)``: the kernel releases it when its
process ends, however it ends (``kill -9`` included), so it never goes stale. The holder writes
its pid, host, command and start time into the lock file, and a second process that finds the
lock taken fails at once with a StageError that says who holds it.

Temporary files and directories a stage writes name their writer (``.train.tmp-HOST-PID``,
``checkpoint.npz.tmp-HOST-PID``). Whoever takes the lock removes those of writers on this host
whose process is gone (killed while writing) or that are its own; others are left alone.
"""
import contextlib
import datetime
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import sys

from arraybn.stages.artifacts import StageError

LOCK_FILE = ".lock"
# Where temporaries are written: the run directory and the interrupted run's checkpoint.
TEMPORARY_PLACES = (".", "train-checkpoint")
_TEMPORARY = re.compile(r"\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)$")
_held = {}        # real path of a run directory -> how many nested holds this process has


class RunLocked(StageError):
    """Another process holds the run directory's lock (a live one: the lock ends with its
    holder); ``holder`` describes it, e.g. 'pid 123 on host'."""

    def __init__(self, message, holder):
        super().__init__(message)
        self.holder = holder


@contextlib.contextmanager
def run_lock(run_dir, create=True):
    """Hold ``RUN/.lock`` (re-entrant within this process) and clear stale temporaries.

    create=False: a run directory that does not exist is not made (nothing there to protect;
    the stage then reports its missing input).
    """
    run_dir = os.fspath(run_dir)
    key = os.path.realpath(run_dir)
    if key in _held or not (create or os.path.isdir(run_dir)):
        with _nested(key):
            yield
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = _acquire(path, run_dir)
    try:
        with _nested(key):
            remove_stale_temporaries(run_dir)
            yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)       # before the unlock, so a waiting opener sees a new file
        os.close(fd)


def holding_run_lock(create=True):
    """Decorator: the stage function runs holding the lock of its first argument, the run."""
    def decorate(stage):
        @functools.wraps(stage)
        def locked(run_dir, *args, **kwargs):
            comm = kwargs.get("comm")
            if comm is not None and comm.rank != 0:    # under MPI, rank 0 holds it for all
                return stage(run_dir, *args, **kwargs)
            with run_lock(run_dir, create):
                return stage(run_dir, *args, **kwargs)
        return locked
    return decorate


@contextlib.contextmanager
def _nested(key):
    _held[key] = _held.get(key, 0) + 1
    try:
        yield
    finally:
        _held[key] -= 1
        if not _held[key]:
            del _held[key]


def _acquire(path, run_dir):
    """An open descriptor of ``path`` holding the lock; raises RunLocked when it is taken."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, details = _describe_holder(fd)
            os.close(fd)
            raise RunLocked(f"{run_dir} is in use by {holder}{details}; two stages must not write "
                            f"one run at a time. Wait for it to finish (or stop it), then run this "
                            f"command again", holder) from None
        if _still_linked(fd, path):
            _write_holder(fd)
            return fd
        os.close(fd)              # its holder removed the file while we opened it: retry


def _still_linked(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _write_holder(fd):
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
              "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _describe_holder(fd):
    """``(who, details)`` of the lock's holder: 'pid N on HOST' and its command and start."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode())
        return (f"pid {holder['pid']} on {holder['host']}",
                f" (`{holder['command']}`, started {holder['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process", " (it has not written its details yet)"


def remove_stale_temporaries(run_dir):
    """Remove the temporaries in ``run_dir`` left by writers that are gone; returns their paths.

    A temporary is stale when its name says it was written on this host by a process that no
    longer exists, or by this process (which holds the lock, so it is not writing it now).
    """
    removed = []
    for place in TEMPORARY_PLACES:
        directory = os.path.join(run_dir, place)
        names = os.listdir(directory) if os.path.isdir(directory) else []
        for name in names:
            path = os.path.join(directory, name)
            if _is_stale(name):
                (shutil.rmtree if os.path.isdir(path) and not os.path.islink(path)
                 else os.remove)(path)
                removed.append(path)
    return removed


def _is_stale(name):
    match = _TEMPORARY.search(name)
    if match is None or match["host"] != socket.gethostname():
        return False
    pid = int(match["pid"])
    return pid == os.getpid() or not _process_exists(pid)


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process
        return True
    return True
