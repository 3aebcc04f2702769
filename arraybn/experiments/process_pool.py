"""Sweep runs in parallel processes that stop together on Ctrl-C or SIGTERM.

``run_in_processes(function, tasks, jobs, threads, on_result)`` calls ``function(*task)`` in
``jobs`` spawned worker processes and hands each result to ``on_result`` in the parent as it
comes.

Signals reach the workers through the parent only, once each: every worker is its own process
group, so neither a Ctrl-C at the terminal nor a ``kill`` of the parent's group reaches it
directly, and the parent forwards each SIGINT or SIGTERM it gets to every worker. The first asks
the task in progress to stop as it would in a process of its own (training saves a checkpoint at
the next step boundary, postproc and test write nothing); a second stops it at once. A worker
asked to stop starts no further task, the tasks not yet handed out are cancelled, and the parent
waits for every worker to end before it raises ``SweepInterrupted`` (exit status 130 or 143):
no worker outlives it. A signal ignored on entry (``nohup``) stays ignored, in the workers too.
"""
import concurrent.futures
import multiprocessing
import os
import signal

from arraybn.backends import BackendUnavailableError, get_backend
from arraybn.nn import chunk_threads
from arraybn.stages.interrupts import (SIGNAL_NAMES, StageInterrupted, Terminated, handling,
                                       raise_terminated, signal_of)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SweepInterrupted(StageInterrupted):
    """A parallel sweep stopped by Ctrl-C or SIGTERM after every worker ended; the message says
    what became of the runs and how to go on."""


# --- in a worker process ------------------------------------------------------------------------

_worker = {"stop": None, "busy": False}     # the signal that asked to stop; a task is running


def limit_threads(threads):
    """Share the cores between the parallel tasks: numba's thread pool and the convolutions'
    chunk threads (OpenBLAS then runs on one thread). The numba backend is created first, so
    that its start of Numba's threads (their spin, ``OMP_NUM_THREADS``) comes before this
    count, not after it."""
    chunk_threads.set_threads(max(1, threads))
    try:
        import numba
        get_backend("numba")
    except (ImportError, BackendUnavailableError):
        return
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def _stop_requested(signum, frame):
    """A worker's handler outside the stages' own: remember the request; between the stages of
    a task, stop the task like Ctrl-C (the stages install handlers of their own while they run)."""
    _worker["stop"] = signum
    if _worker["busy"]:
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _start_worker(threads):
    os.setpgid(0, 0)                  # signals come from the parent only (see the module)
    limit_threads(threads)
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stop_requested)


def _call(function, task):
    """``("done", result)``, ``("interrupted", message)`` or ``("not started", None)`` once a
    stop was asked for."""
    if _worker["stop"] is not None:
        return "not started", None
    _worker["busy"] = True
    try:
        return "done", function(*task)
    except KeyboardInterrupt as exc:
        _worker["stop"] = signum = signal_of(exc)
        return "interrupted", str(exc) or f"stopped by {SIGNAL_NAMES[signum]}"
    finally:
        _worker["busy"] = False


# --- in the parent ------------------------------------------------------------------------------

def run_in_processes(function, tasks, jobs, threads, on_result):
    """Call ``function(*task)`` for every task in ``jobs`` processes with ``threads`` numba
    threads each; ``on_result(index, status, value)`` gets each outcome of ``_call`` as it
    comes. Raises SweepInterrupted on Ctrl-C or SIGTERM once every worker has ended."""
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: raise_terminated}
    with handling(handlers), concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(threads,)) as pool:
        futures, reported = {}, set()
        try:
            for index, task in enumerate(tasks):
                futures[pool.submit(_call, function, task)] = index
            for future in concurrent.futures.as_completed(futures):
                reported.add(future)
                on_result(futures[future], *future.result())
        except KeyboardInterrupt as exc:
            signum = signal_of(exc)
            _stop_workers(pool, signum)
            counts = _report_the_rest(futures, reported, on_result)
            raise SweepInterrupted(f"sweep interrupted by {SIGNAL_NAMES[signum]}: "
                                   f"{counts['interrupted']} run(s) stopped in progress, "
                                   f"{counts['not started']} not started; run the same sweep "
                                   f"command again to go on (an interrupted training resumes "
                                   f"from its checkpoint)", signum) from None


def _report_the_rest(futures, reported, on_result):
    """Hand the outcomes not yet reported to ``on_result``; returns how many there are of each
    status (a cancelled task counts as 'not started')."""
    counts = {"done": 0, "interrupted": 0, "not started": 0}
    for future, index in futures.items():
        if future in reported:
            continue
        if future.cancelled() or future.exception() is not None:
            counts["not started"] += future.cancelled()
            continue
        status, value = future.result()
        counts[status] += 1
        on_result(index, status, value)
    return counts


def _stop_workers(pool, signum):
    """Forward ``signum`` to every worker, cancel the tasks not handed out and wait for the
    workers to end; a further signal meanwhile is forwarded too."""
    while True:
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        except KeyboardInterrupt as exc:
            signum = signal_of(exc)
