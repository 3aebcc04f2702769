"""The artifact store: a run is a directory, each stage an atomically written subdirectory.

A stage writes everything into a temporary sibling directory (``RUN/.train.tmp-HOST-PID``: its
name says who writes it, see ``arraybn.stages.run_lock`` for who removes it when that writer
was killed), fsyncs
the files and the directory, and only then renames it to ``RUN/train``. An existing stage is
never overwritten without ``force``; with ``force`` it is moved aside only once the new one is
complete, and deleted after the swap. A failed or interrupted stage leaves no trace but the
temporary directory's removal.
"""
import contextlib
import json
import os
import shutil
import socket
import zipfile

import numpy as np

from arraybn.data import sha256_file
from arraybn.errors import UserError

MANIFEST = "manifest.json"
STAGE_COMMANDS = {"train": "arraybn train {run}", "postproc": "arraybn postproc {run}",
                  "test": "arraybn test {run}"}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class StageError(UserError, RuntimeError):
    """A stage cannot run: missing/corrupt/mismatched input, or output already there.

    The message says what is wrong and which command fixes it.
    """


def stage_dir(run_dir, stage):
    return os.path.join(os.fspath(run_dir), stage)


def remake_hint(run_dir, stage, force=True):
    command = STAGE_COMMANDS[stage].format(run=os.fspath(run_dir))
    return f"`{command}{' --force' if force else ''}`"


def check_can_write(run_dir, stage, force):
    """Refuse early when the stage exists and ``force`` is not set."""
    target = stage_dir(run_dir, stage)
    if os.path.exists(target) and not force:
        raise StageError(f"{target} already exists; pass --force to replace it "
                         f"(the old results are kept until the new ones are complete)")


def temporary_tag(kind):
    """``.KIND-HOST-PID``: the suffix of a temporary name, naming the process that writes it."""
    return f".{kind}-{socket.gethostname()}-{os.getpid()}"


def _fresh_directory(path):
    """Make the directory ``path``; one of that name is this process's own leftover."""
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path)
    return path


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory):
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            _fsync_path(path)
    _fsync_path(directory)


def commit_directory(tmp, target, force):
    """Move the complete directory ``tmp`` to ``target``, replacing it only when ``force``."""
    _fsync_tree(tmp)
    parent, name = os.path.split(target)
    old = None
    if os.path.exists(target):
        if not force:
            raise StageError(f"{target} appeared while this stage ran; pass --force to replace it")
        old = _fresh_directory(os.path.join(parent, f".{name}{temporary_tag('old')}"))
        os.rename(target, os.path.join(old, name))
    os.rename(tmp, target)
    _fsync_path(parent)
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def staging(run_dir, stage, force=False):
    """Yield a temporary directory; on normal exit it becomes ``RUN/stage`` atomically.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and the
    existing stage, if any, is untouched.
    """
    check_can_write(run_dir, stage, force)
    os.makedirs(run_dir, exist_ok=True)
    tmp = _fresh_directory(os.path.join(run_dir, f".{stage}{temporary_tag('tmp')}"))
    try:
        yield tmp
        commit_directory(tmp, stage_dir(run_dir, stage), force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_if_exists(path, fix="delete it or rerun with --force"):
    """The JSON at ``path``, None when the file does not exist; an unreadable one is a StageError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StageError(f"{path} is unreadable ({exc}); {fix}") from None


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary name beside ``path``; on normal exit the file written there replaces
    ``path`` atomically, on any failure (a full disk, Ctrl-C) it is removed."""
    tmp = path + temporary_tag("tmp")
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(path, data):
    """Write JSON to ``path`` via a temporary file and a rename (for files outside a stage)."""
    with replacing(path) as tmp:
        write_json(tmp, data)


def save_npz(path, arrays):
    """``numpy.savez`` with fixed zip timestamps, so equal arrays give byte-identical files."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)




def load_npz(path, what, run_dir, stage):
    """All arrays of ``path`` as a dict; a missing or unreadable file is a StageError."""
    if not os.path.isfile(path):
        raise StageError(f"{path} is missing; make it with {remake_hint(run_dir, stage, False)}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StageError(f"{what} {path} is corrupt ({exc}); make it again with "
                         f"{remake_hint(run_dir, stage)}") from None


def read_manifest(run_dir, stage, filename=MANIFEST):
    """The stage's manifest; missing or corrupt is a StageError naming the command to run."""
    path = os.path.join(stage_dir(run_dir, stage), filename)
    if not os.path.isfile(path):
        partly_there = os.path.isdir(stage_dir(run_dir, stage))
        raise StageError(f"no {stage} stage in {os.fspath(run_dir)} ({path} is missing); "
                         f"run {remake_hint(run_dir, stage, partly_there)} first")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path} is corrupt ({exc}); make it again with "
                         f"{remake_hint(run_dir, stage)}") from None


def verify_artifact(run_dir, stage, filename, manifest):
    """Path of ``RUN/stage/filename`` after checking its SHA-256 against the stage's manifest."""
    path = os.path.join(stage_dir(run_dir, stage), filename)
    if not os.path.isfile(path):
        raise StageError(f"{path} is missing; make it again with {remake_hint(run_dir, stage)}")
    expected = manifest.get("outputs", {}).get(filename)
    actual = sha256_file(path)
    if expected != actual:
        raise StageError(f"{path} is corrupt or was modified: its SHA-256 {actual[:12]}... does "
                         f"not match {str(expected)[:12]}... recorded in the {stage} manifest; "
                         f"make it again with {remake_hint(run_dir, stage)}")
    return path, actual


def output_digests(directory, names):
    """{filename: SHA-256} of the given files in ``directory``."""
    return {name: sha256_file(os.path.join(directory, name)) for name in names}
