"""Sweeps: many runs from one TOML file, each a normal run directory, resumable and parallel.

``sweep_config`` reads and validates the file (its docstring describes the format); this module
plans what is left to do and runs it. The resolved specification of a run is stored in
``RUN/sweep-run.json``. Running the sweep again skips the stages that exist (an interrupted
training resumes from its checkpoint); a run whose specification changed is an error unless
``force``, which redoes what changed: new training options retrain (and delete the variants,
which belong to the old model), new postproc/test/variant options redo only those stages. New
variants are simply added.

A run that diverged (``arraybn.stages.train.read_divergence``) is a result, not a failure: it is
reported as diverged and not trained again unless its training options change (with
``force``). A run whose directory another live process holds (``RunLocked``: a second sweep over
the same root) is skipped as running elsewhere. With ``jobs > 1``, Ctrl-C or SIGTERM stops the
runs in progress and every worker process (``arraybn.experiments.process_pool``).
"""
import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import time
import traceback

from arraybn.core import NonFiniteStatisticsError
from arraybn.distributed import import_mpi
from arraybn.errors import UserError
from arraybn.experiments.process_pool import limit_threads, run_in_processes
from arraybn.experiments.sweep_config import (RUN_RECORD, SWEEP_LOG, VARIANTS_DIR,
                                              SweepConfigError)
from arraybn.stages.artifacts import read_json_if_exists, write_json_atomic
from arraybn.stages.config import TrainConfig
from arraybn.stages.divergence import TrainingDiverged
from arraybn.stages.pipeline import STAGES, run_pipeline, stage_done
from arraybn.stages.run_lock import RunLocked, run_lock
from arraybn.stages.train import PARTIAL_DIR, read_divergence


# --- planning: what is done, what changed -------------------------------------------------------

def _read_record(run_dir):
    return read_json_if_exists(os.path.join(run_dir, RUN_RECORD))


def _changes(old, new):
    """Top-level parts and training keys whose stored values differ (new variants are fine).

    A training option missing from the stored record was added to arraybn after the run was
    made, which then had its default (e.g. ``init``)."""
    stored = {**TrainConfig().to_dict(), **old.get("train", {})}
    changed = [f"train.{k}" for k in sorted(new["train"]) if stored.get(k) != new["train"][k]]
    changed += [part for part in ("postproc", "test") if old.get(part) != new[part]]
    old_variants = old.get("variants", {})
    changed += [f"variant {name}" for name, spec in new["variants"].items()
                if name in old_variants and old_variants[name] != spec]
    return changed


def _missing_stages(spec):
    stages = STAGES if spec.has_bn else ("train", "test")
    missing = [s for s in stages if not stage_done(spec.run_dir, s)]
    if spec.has_bn:
        missing += [f"variant {v.name}" for v in spec.variants
                    if not stage_done(spec.variant_dir(v), "test")]
    return missing


def run_status(spec):
    """``(status, changes)``: 'new', 'done', 'diverged' (its training diverged), 'partial'
    (changes: what is missing) or 'changed' (changes: the parts of the specification that differ,
    'train' for a foreign run)."""
    record = _read_record(spec.run_dir)
    if record is None:
        if os.path.isdir(os.path.join(spec.run_dir, "train")) or \
                os.path.isdir(os.path.join(spec.run_dir, PARTIAL_DIR)):
            return "changed", ["train (a run this sweep did not make)"]
        return "new", []
    changed = _changes(record, spec.record())
    if changed:
        return "changed", changed
    if read_divergence(spec.run_dir) is not None:
        return "diverged", []
    missing = _missing_stages(spec)
    return ("partial", missing) if missing else ("done", [])


def plan_sweep(sweep, force=False):
    """``[(RunSpec, status, changes)]``; changed runs are an error unless ``force``."""
    plan = [(spec,) + run_status(spec) for spec in sweep.runs]
    changed = [f"  - {spec.run_dir}: {', '.join(changes)}" for spec, status, changes in plan
               if status == "changed"]
    if changed and not force:
        raise SweepConfigError("these runs exist with a different specification; nothing was "
                               "run. Pass --force to replace them, or use another --root:\n"
                               + "\n".join(changed))
    return plan


# --- running ------------------------------------------------------------------------------------

class _RunLog:
    """Appends a run's messages to ``RUN/sweep.log`` and passes them on to ``echo``."""

    def __init__(self, run_dir, name, echo):
        self.path, self.name, self.echo = os.path.join(run_dir, SWEEP_LOG), name, echo

    def __call__(self, message):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if self.echo is not None:
            self.echo(f"[{self.name}] {message}")


def _link_train(variant_dir):
    """Make ``VARIANT/train`` a relative link to the run's train stage."""
    link = os.path.join(variant_dir, "train")
    os.makedirs(variant_dir, exist_ok=True)
    if not os.path.islink(link):
        os.symlink(os.path.join("..", "..", "train"), link)


def execute_run(spec, changes=(), echo=None):
    """Make (or finish) one run's stages; returns the test accuracy of ``RUN/test``.

    changes: what differs from the stored specification (see ``run_status``); a training
    change retrains and redoes everything, a postproc/test/variant change redoes only that.
    """
    os.makedirs(spec.run_dir, exist_ok=True)
    with run_lock(spec.run_dir):       # RunLocked before anything of a run in use is touched
        _make_run(spec, changes, _RunLog(spec.run_dir, spec.name, echo))
    return _test_accuracy(spec.run_dir)


def _make_run(spec, changes, log):
    redo = {change.split(".")[0] for change in changes} & set(STAGES)    # 'train.lr' -> 'train'
    if "train" in redo:
        shutil.rmtree(os.path.join(spec.run_dir, VARIANTS_DIR), ignore_errors=True)
    write_json_atomic(os.path.join(spec.run_dir, RUN_RECORD), spec.record())
    results = run_pipeline(spec.run_dir, spec.config, spec.postproc if spec.has_bn else None,
                           spec.test, keep_done=True, redo=redo, echo=log)
    retrained = results["train"] is not None
    for variant in spec.variants if spec.has_bn else ():
        vdir = spec.variant_dir(variant)
        _link_train(vdir)
        log(f"variant {variant.name}")
        changed = retrained or f"variant {variant.name}" in changes
        run_pipeline(vdir, spec.config, variant.postproc, variant.test, keep_done=True,
                     redo=("postproc", "test") if changed else (), echo=log)


def _test_accuracy(run_dir):
    with open(os.path.join(run_dir, "test", "metrics.json"), encoding="utf-8") as f:
        return json.load(f)["accuracy"]


def _outcome(spec, status, started=None, **details):
    seconds = None if started is None else time.perf_counter() - started
    return {"name": spec.name, "run_dir": spec.run_dir, "status": status, "seconds": seconds,
            **details}


def _run_safely(spec, changes, echo):
    """``execute_run`` that reports a failure instead of raising (Ctrl-C still stops)."""
    started = time.perf_counter()
    try:
        return _outcome(spec, "ok", started, test_accuracy=execute_run(spec, changes, echo))
    except RunLocked as exc:          # a live process makes this run: not a failure of it
        outcome = _outcome(spec, "running elsewhere", started, holder=exc.holder)
        line = f"skipped (running elsewhere: {exc.holder})"
    except Exception as exc:  # one failing run must not stop the sweep
        record = (read_divergence(spec.run_dir)
                  if isinstance(exc, (TrainingDiverged, NonFiniteStatisticsError)) else None)
        detail = (f"{type(exc).__name__}: {exc}" if isinstance(exc, UserError)   # said in full
                  else "".join(traceback.format_exception(exc)))                  # a bug: where
        status = "failed" if record is None else "diverged"  # diverged: a result, not a failure
        error = f"{type(exc).__name__}: {exc}" if record is None else record["error"]
        outcome = _outcome(spec, status, started, error=error)
        line = f"{status.upper()}: {detail}"
    with contextlib.suppress(OSError):
        _RunLog(spec.run_dir, spec.name, None)(line)
    return outcome


def _earlier_outcome(spec, status):
    """The outcome of a run the plan finds done or diverged (it is not run again)."""
    if status == "diverged":
        return _outcome(spec, "diverged", error=read_divergence(spec.run_dir)["error"])
    return _outcome(spec, "skipped", test_accuracy=_test_accuracy(spec.run_dir))


def run_sweep(sweep, *, jobs=1, force=False, echo=print, comm=None):
    """Run every run of ``sweep`` that is not done; returns one outcome dict per run.

    Outcomes: {name, run_dir, status: 'ok' | 'skipped' (done before) | 'diverged' (now or
    before) | 'running elsewhere' | 'failed', test_accuracy, error, holder, seconds}. A failing
    run is reported, the others go on. ``jobs > 1`` runs that many runs in parallel processes,
    each with ``cpu_count // jobs`` numba threads; Ctrl-C or SIGTERM then raises
    ``SweepInterrupted`` once every worker has stopped. ``comm`` (an
    ``MPICommunicator`` of K > 1 ranks, this being rank 0): the runs go to the MPI pool of
    ranks 1..K-1, which call ``serve_sweep_runs(comm)`` meanwhile.
    """
    if comm is not None and jobs > 1:
        raise SweepConfigError(MPI_JOBS_MESSAGE)
    plan = plan_sweep(sweep, force)
    todo = [(spec, changes if status == "changed" else ())
            for spec, status, changes in plan if status not in ("done", "diverged")]
    outcomes = {spec.name: _earlier_outcome(spec, status)
                for spec, status, _ in plan if status in ("done", "diverged")}
    for status, words in (("done", "are done already (skipped)"),
                          ("diverged", "diverged before: not run again (change their training "
                                       "options and pass --force to retrain them)")):
        count = sum(plan_status == status for _, plan_status, _ in plan)
        if count:
            echo(f"{count} of {len(plan)} runs {words}")
    if comm is not None:
        _run_on_mpi_pool(todo, comm, outcomes, echo)
    elif jobs <= 1:
        for spec, changes in todo:
            outcomes[spec.name] = _run_safely(spec, changes, echo)
    else:
        _run_parallel(todo, jobs, outcomes, echo)
    return [outcomes[spec.name] for spec, _, _ in plan]


def _run_parallel(todo, jobs, outcomes, echo):
    reported = []

    def on_result(index, status, value):
        spec = todo[index][0]
        if status == "not started":
            return
        if status == "interrupted":
            value = _outcome(spec, "interrupted", error=value)
            with contextlib.suppress(OSError):
                _RunLog(spec.run_dir, spec.name, None)(f"interrupted: {value['error']}")
        outcomes[spec.name] = value
        reported.append(spec.name)
        echo(f"[{len(reported)}/{len(todo)}] {describe_outcome(value)}")
    run_in_processes(_run_safely, [(spec, changes, None) for spec, changes in todo], jobs,
                     max(1, (os.cpu_count() or 1) // jobs), on_result)


# --- an MPI pool: `mpiexec -n K arraybn sweep FILE` -----------------------------------------

MPI_JOBS_MESSAGE = ("--jobs starts processes on this machine; under mpiexec the MPI job is the "
                    "pool (mpiexec -n K runs K-1 runs at once, rank 0 schedules them): drop "
                    "--jobs")


def _mpi_pool(comm):
    """``MPICommExecutor`` over ``comm``: the executor on rank 0; on the other ranks entering
    it serves runs until rank 0 leaves it, then gives None. Every rank first limits its numba
    threads to the cores of its node shared by the node's worker ranks (rank 0 only waits)."""
    from mpi4py.futures import MPICommExecutor
    node = comm.mpi_comm.Split_type(import_mpi().COMM_TYPE_SHARED)
    workers_on_node = node.Get_size() - node.allreduce(int(comm.rank == 0))
    node.Free()
    if comm.rank != 0:
        limit_threads(max(1, (os.cpu_count() or 1) // max(1, workers_on_node)))
    return MPICommExecutor(comm.mpi_comm, root=0)


def serve_sweep_runs(comm):
    """Ranks 1..K-1 of ``mpiexec -n K arraybn sweep``: run what rank 0 sends until it is done."""
    with _mpi_pool(comm) as executor:
        assert executor is None, "rank 0 schedules the runs; call run_sweep(comm=) there"


def _run_on_worker(spec, changes):
    """``_run_safely`` on an MPI worker rank; its log says which rank ran it."""
    world = import_mpi().COMM_WORLD
    os.makedirs(spec.run_dir, exist_ok=True)
    _RunLog(spec.run_dir, spec.name, None)(f"started on MPI rank {world.Get_rank()} of "
                                           f"{world.Get_size()} ({socket.gethostname()})")
    return _run_safely(spec, changes, None)


def _collect(pool, futures, outcomes, echo):
    """Store each outcome as its run finishes; Ctrl-C cancels the runs not yet started."""
    try:
        for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
            outcome = future.result()
            outcomes[outcome["name"]] = outcome
            echo(f"[{count}/{len(futures)}] {describe_outcome(outcome)}")
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def _run_on_mpi_pool(todo, comm, outcomes, echo):
    with _mpi_pool(comm) as pool:
        futures = [pool.submit(_run_on_worker, spec, changes) for spec, changes in todo]
        _collect(pool, futures, outcomes, echo)


def describe_outcome(outcome):
    name, status = outcome["name"], outcome["status"]
    if status in ("failed", "diverged", "interrupted"):
        word = "FAILED" if status == "failed" else status
        return (f"{name}: {word} ({outcome['error']}); log: "
                f"{os.path.join(outcome['run_dir'], SWEEP_LOG)}")
    if status == "running elsewhere":
        return f"{name}: skipped (running elsewhere: {outcome['holder']})"
    accuracy = f"test accuracy {100 * outcome['test_accuracy']:.2f}%"
    if status == "skipped":
        return f"{name}: done already ({accuracy})"
    return f"{name}: {accuracy} ({outcome['seconds']:.0f} s)"
