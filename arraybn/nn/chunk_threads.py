"""Threads for the convolutions' chunks of the batch on the CPU.

A convolution's chunks (``conv.batch_chunks``) are independent: each writes its own rows of y
and of the input gradient, and returns its own weight-gradient partial, which the caller adds
in chunk order. So they can run on several threads at once (NumPy's copies and OpenBLAS's GEMMs
release the GIL), with results bit-identical for any number of threads.

``run_chunks(task, chunks, parallel)`` runs ``task(chunk, slot)`` for every chunk, on up to
``threads()`` threads for a layer whose forward GEMMs come to at least ``MIN_PARALLEL_FLOPS``
(``parallel_chunks``; the calling thread takes a share, ``slot`` says which thread, for its
own buffers). Every layer cuts its batch into a multiple of ``CHUNK_MULTIPLE`` chunks
whatever the number of threads, so a convolution's results are bit-identical on any number of
threads.

This pool serves the NumPy path. The numba backend runs every convolution's chunks in its own
kernels on Numba's threads instead (``arraybn.nn.conv._kernels``), and calls
``one_blas_thread()`` first.

OpenBLAS runs on one thread from the first large convolution on (for the rest of the process;
on the numpy backend a model whose convolutions are all small, LeNet-5's, leaves OpenBLAS as it
was): two
levels of threads oversubscribe the cores, and toggling OpenBLAS's count around each layer is
no cure (its idle workers spin for a while after each GEMM, on the cores the chunk threads
need). The number of chunk threads is OpenBLAS's count before that (``OPENBLAS_NUM_THREADS``
or ``OMP_NUM_THREADS``, else the cores); ``set_threads(n)`` changes it.

Measured (``benchmarks/conv_speed.py``, forward + backward, 2 threads, fifth session: one chunk
thread on two OpenBLAS threads before, two chunk threads on one OpenBLAS thread now, ms):
VGG-8 conv2 64.9 -> 44.7, conv4 38.1 -> 27.2, conv6 28.9 -> 22.3; ResNet-20's 16/32/64-channel
3x3 convolutions 31.9 -> 23.9, 18.4 -> 13.3, 12.8 -> 8.3; on one thread all within 5%. Smaller
layers stay on the calling thread: LeNet-5's chunks are too short to cover the Python work
between GEMMs, which holds the GIL (conv1 1.15x, conv2 1.09x slower on two chunk threads).
The numba backend's kernels, which need no GIL, ran each chunk on these threads until the
eighth session (ResNet-20's 16-channel convolution, forward + backward, two threads: 18.2 ms on
NumPy's slice copies, 14.2 ms in the kernels); on Numba's own threads, which the BN kernels
use too, LeNet-5's 2-thread step went 5.04 -> 3.73 ms (``numba_backend._start_threads``).
"""
import concurrent.futures
import itertools
import os
import threading

MIN_PARALLEL_FLOPS = 100e6   # a layer's forward GEMMs: VGG-8 conv1 (45 MFLOP) gains nothing
CHUNK_MULTIPLE = 4           # chunks of a parallel layer: equal shares for 1, 2 or 4 threads

_state = {"threads": None, "pool": None}
_lock = threading.Lock()


def _hold_blas_to_one_thread():
    """OpenBLAS's thread count before, and one thread from now on, for the process's life."""
    import threadpoolctl
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    before = max((lib["num_threads"] for lib in blas.info()), default=1)
    blas.limit(limits=1)
    return before


def threads():
    """How many threads a large convolution's chunks run on; the first call holds OpenBLAS to
    one thread (see the module)."""
    if _state["threads"] is None:
        with _lock:
            if _state["threads"] is None:
                _state["threads"] = _hold_blas_to_one_thread()
    return _state["threads"]


def one_blas_thread():
    """Hold OpenBLAS to one thread from now on, as ``threads()`` does: for threads that call its
    GEMMs at the same time (the backend's convolution kernels, on Numba's threads; OpenBLAS
    threads of its own on top would oversubscribe the cores)."""
    threads()


def set_threads(count):
    """Run large convolutions' chunks on ``count`` threads (1: on the calling thread only);
    OpenBLAS on one thread."""
    count = int(count)
    if count < 1:
        raise ValueError(f"the number of threads must be at least 1, got {count}")
    threads()
    with _lock:
        if _state["pool"] is not None:
            _state["pool"].shutdown()
        _state["threads"], _state["pool"] = count, None


def _pool(workers):
    with _lock:
        if _state["pool"] is None:
            _state["pool"] = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="arraybn-chunks")
        return _state["pool"]


def _forget_pool_after_fork():
    """A forked child has none of the parent's threads: it starts a pool of its own."""
    _state["pool"] = None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def parallel_chunks(flops):
    """Whether a layer whose forward GEMMs take ``flops`` runs its chunks on several threads
    (when there are several): not a function of the number of threads, so neither is the way
    the layer cuts its batch."""
    return flops >= MIN_PARALLEL_FLOPS


def run_chunks(task, chunks, parallel):
    """``[task(chunk, slot) for chunk in chunks]``, on up to ``threads()`` threads if
    ``parallel``; ``slot`` (0 on the calling thread) tells the threads apart. Every chunk has
    run when it returns, also when one raised (the first exception in chunk order is raised
    then)."""
    workers = min(threads(), len(chunks)) if parallel else 1     # holds OpenBLAS to one thread
    if workers <= 1:
        return [task(chunk, 0) for chunk in chunks]
    results = [None] * len(chunks)
    failures = {}
    order = itertools.count()            # next() is atomic: each chunk is taken once

    def share(slot):
        for index in iter(order.__next__, None):
            if index >= len(chunks):
                return
            try:
                results[index] = task(chunks[index], slot)
            except BaseException as error:     # re-raised on the calling thread below
                failures[index] = error

    pool = _pool(threads() - 1)
    futures = [pool.submit(share, slot) for slot in range(1, workers)]
    share(0)
    concurrent.futures.wait(futures)
    if failures:
        raise failures[min(failures)]
    return results
