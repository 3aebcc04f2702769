"""The Numba backend: fused, multi-threaded CPU kernels (NumPy arrays in and out).

Same contract and results as the NumPy backend (see ``arraybn.backends.base``), with fewer passes
over memory: forward reads ``x`` once from DRAM and writes ``y`` once; backward reads ``gy`` and
``x`` once and writes ``gx`` once; ``finish_statistics`` is one kernel call instead of a dozen
small NumPy operations. The public methods only check what a kernel relies on (dtype,
layout, shapes of ``out``) and allocate; the kernels live in ``numba_kernels``.
"""
import os

import numpy as np

from arraybn.backends.base import Backend, BackendUnavailableError

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INSTALL_HINT = ("install it with `python3 -m pip install numba` (or `pip install arraybn`, "
                 "which depends on it), or use backend='numpy'")


_F64 = np.dtype(np.float64)


def _check_data(arr, name):
    if not (isinstance(arr, np.ndarray) and arr.ndim == 3 and arr.dtype in _FLOATS
            and arr.flags.c_contiguous):
        raise TypeError(f"numba backend: {name} must be a C-contiguous float32/float64 NumPy array "
                        f"of shape (N, C, M); got {type(arr).__name__} "
                        f"{getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}")


def _channel_array(values, channels, name):
    """``values`` as float64 (C,); the kernels index it by channel without bounds checks."""
    if type(values) is np.ndarray and values.dtype == _F64 and values.flags.c_contiguous:
        arr = values                       # the usual case: the core passes float64 (C,) arrays
    else:
        arr = np.ascontiguousarray(values, dtype=np.float64)
    if arr.shape != (channels,):
        raise ValueError(f"numba backend: {name} must have shape ({channels},), one value per "
                         f"channel; got shape {arr.shape}")
    return arr


_NO_BUFFER = np.empty(0)          # "no running buffer" for the kernels, which skip empty ones


def _running_buffer(buf, channels, name):
    if buf is None:
        return _NO_BUFFER
    if not (isinstance(buf, np.ndarray) and buf.shape == (channels,) and buf.dtype in _FLOATS
            and buf.flags.writeable):
        raise ValueError(f"numba backend: {name} must be a writeable float32/float64 NumPy array "
                         f"of shape ({channels},); got {getattr(buf, 'dtype', '')} "
                         f"{getattr(buf, 'shape', type(buf).__name__)}")
    return buf


def _output(out, like, name="out"):
    """``out`` checked against ``like``, or a new array of like's shape and dtype."""
    if out is None:
        return np.empty_like(like)
    if not (isinstance(out, np.ndarray) and out.shape == like.shape and out.dtype == like.dtype
            and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"numba backend: {name} must be a writeable C-contiguous {like.dtype} "
                         f"array of shape {like.shape}; got {getattr(out, 'dtype', '')} "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    return out


class NumbaBackend(Backend):
    """Kernels from ``numba_kernels``: fused passes over cache-sized blocks of channels.

    Inputs smaller than ``parallel_min_size`` values run on the calling thread: waking the other
    threads costs more than it saves. With workers that slept at once, median forward + backward
    times on two threads vs one were 0.89 vs 0.48 ms at 248k values (128x16x11x11), so the bar
    was 2^18; with workers that spin a while (``_start_threads``) LeNet-5's 2-thread step takes
    3.29-3.45 ms with 2^16 against 3.69 with 2^18 (on the 2-vCPU VM this project is measured on).
    On a machine whose idle cores wake faster, lower it (on an instance or on the class).
    """
    name = "numba"
    xp = np
    parallel_min_size = 1 << 16

    def __init__(self, kernels, numba_module):
        self._k = kernels
        self._numba = numba_module

    def conv_ops(self):
        """``numba_conv_kernels``: one-pass max pooling, the fused BN block, convolution and
        residual block kernels."""
        from arraybn.backends import numba_conv_kernels     # compiled only when conv layers ask
        return numba_conv_kernels

    def augment_ops(self):
        """``numba_augment_kernels``: the affine warp and random crop in one pass."""
        from arraybn.backends import numba_augment_kernels   # compiled when training augments
        return numba_augment_kernels

    def _tasks(self, x3):
        """Channel ranges to share among threads; 0 means run serially on this thread.

        Dense inputs (N, C) always run serially: their layers' GEMMs run on OpenBLAS's threads,
        and Numba's workers, which spin a while after each parallel kernel (``_start_threads``),
        would fight those for the cores (an MLP 784-2048-2048-10 + BN, batch 256, two threads:
        96 ms a step with its BN shared out, 44 ms serial).
        """
        if x3.size < self.parallel_min_size or x3.shape[2] == 1:
            return 0
        threads = self._numba.get_num_threads()
        channels, m = x3.shape[1], x3.shape[2]
        if m > self._k.LANES:
            tasks = channels                                  # long rows: a channel per task
        else:
            tasks = min(threads, channels, channels * m // 32)   # rows of >= 32 values a task
        return tasks if threads > 1 and tasks > 1 else 0

    def moments(self, x3):
        _check_data(x3, "x3")
        channels = x3.shape[1]
        mean, var = np.empty(channels), np.empty(channels)
        tasks = self._tasks(x3)
        if tasks:
            self._k.moments_parallel(x3, tasks, mean, var)
        else:
            self._k.moments_range(x3, 0, channels, mean, var)
        return mean, var

    def forward_train(self, x3, gamma, beta, eps, center_only=False, out=None):
        return self.forward_train_finish(x3, gamma, beta, eps, center_only, 0.0, out=out)[:3]

    def forward_train_finish(self, x3, gamma, beta, eps, center_only=False, momentum=0.1,
                             running_mean=None, running_var=None, out=None):
        _check_data(x3, "x3")
        channels = x3.shape[1]
        y3 = _output(out, x3)
        mean, var, inv_std = np.empty(channels), np.empty(channels), np.empty(channels)
        args = (x3, _channel_array(gamma, channels, "gamma"),
                _channel_array(beta, channels, "beta"), float(eps), bool(center_only))
        rest = (float(momentum), _running_buffer(running_mean, channels, "running_mean"),
                _running_buffer(running_var, channels, "running_var"), y3, mean, var, inv_std)
        tasks = self._tasks(x3)
        if tasks:
            finite = self._k.forward_finish_parallel(*args, tasks, *rest)
        else:
            finite = self._k.forward_finish_range(*args, *rest)
        return y3, mean, var, (inv_std if finite else None)

    def affine(self, x3, a, b, out=None):
        _check_data(x3, "x3")
        y3 = _output(out, x3)
        a, b = _channel_array(a, x3.shape[1], "a"), _channel_array(b, x3.shape[1], "b")
        tasks = self._tasks(x3)
        if tasks:
            self._k.affine_parallel(x3, a, b, tasks, y3)
        else:
            self._k.affine_range(x3, a, b, 0, x3.shape[1], y3)
        return y3

    def backward(self, gy3, x3, mean, scale, w, centered=True, out=None):
        _check_data(x3, "x3")
        _check_data(gy3, "gy3")
        if gy3.shape != x3.shape or gy3.dtype != x3.dtype:
            raise ValueError(f"numba backend: gy3 ({gy3.dtype} {gy3.shape}) must match x3 "
                             f"({x3.dtype} {x3.shape})")
        channels = x3.shape[1]
        gx3 = _output(out, x3)
        sum_gy, sum_gy_xc = np.empty(channels), np.empty(channels)
        mean = _channel_array(mean, channels, "mean")
        scale = _channel_array(scale, channels, "scale")
        w, centered = _channel_array(w, channels, "w"), bool(centered)
        tasks = self._tasks(x3)
        if tasks:
            self._k.backward_parallel(gy3, x3, mean, scale, w, centered, tasks, gx3, sum_gy,
                                      sum_gy_xc)
        else:
            self._k.backward_range(gy3, x3, mean, scale, w, centered, 0, channels, gx3, sum_gy,
                                   sum_gy_xc)
        return gx3, sum_gy, sum_gy_xc

    def center_affine(self, x3, center, a, b, out=None):
        _check_data(x3, "x3")
        y3, channels = _output(out, x3), x3.shape[1]
        args = (x3, _channel_array(center, channels, "center"), _channel_array(a, channels, "a"),
                _channel_array(b, channels, "b"))
        kernels, tasks = _split_kernels(), self._tasks(x3)
        if tasks:
            kernels.center_affine_parallel(*args, tasks, y3)
        else:
            kernels.center_affine_range(*args, 0, channels, y3)
        return y3

    def backward_sums(self, gy3, x3, mean):
        channels = self._check_gradient(gy3, x3)
        sum_gy, sum_gy_xc = np.empty(channels), np.empty(channels)
        mean = _channel_array(mean, channels, "mean")
        kernels, tasks = _split_kernels(), self._tasks(x3)
        if tasks:
            kernels.backward_sums_parallel(gy3, x3, mean, tasks, sum_gy, sum_gy_xc)
        else:
            kernels.backward_sums_range(gy3, x3, mean, 0, channels, sum_gy, sum_gy_xc)
        return sum_gy, sum_gy_xc

    def backward_gx(self, gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, count, out=None):
        channels = self._check_gradient(gy3, x3)
        gx3 = _output(out, x3)
        args = (gy3, x3) + tuple(_channel_array(values, channels, name) for values, name in (
            (mean, "mean"), (scale, "scale"), (w, "w"), (sum_gy, "sum_gy"),
            (sum_gy_xc, "sum_gy_xc"))) + (float(count),)
        kernels, tasks = _split_kernels(), self._tasks(x3)
        if tasks:
            kernels.backward_gx_parallel(*args, tasks, gx3)
        else:
            kernels.backward_gx_range(*args, 0, channels, gx3)
        return gx3

    @staticmethod
    def _check_gradient(gy3, x3):
        """The channel count, once gy3 and x3 are checked as a matching pair."""
        _check_data(x3, "x3")
        _check_data(gy3, "gy3")
        if gy3.shape != x3.shape or gy3.dtype != x3.dtype:
            raise ValueError(f"numba backend: gy3 ({gy3.dtype} {gy3.shape}) must match x3 "
                             f"({x3.dtype} {x3.shape})")
        return x3.shape[1]

    def finish_statistics(self, mean, var, eps, momentum, count, running_mean=None,
                          running_var=None):
        channels = len(mean)
        mean = _channel_array(mean, channels, "mean")
        var = _channel_array(var, channels, "var")
        inv_std = np.empty(channels)
        finite = self._k.finish_statistics(
            mean, var, float(eps), float(momentum), float(count),
            _running_buffer(running_mean, channels, "running_mean"),
            _running_buffer(running_var, channels, "running_var"), inv_std)
        return (True, inv_std) if finite else (False, None)


def _split_kernels():
    """``numba_split_kernels``, loaded when a communicator first needs them."""
    from arraybn.backends import numba_split_kernels
    return numba_split_kernels


SPIN_COUNT = "3000000"     # libgomp's GOMP_SPINCOUNT for Numba's workers (see below)


def _start_threads(numba):
    """Start Numba's threading layer with OpenMP workers that spin ``SPIN_COUNT`` times (a few
    milliseconds) before they sleep, unless the user set ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY`` (then that applies).

    Each of LeNet-5's conv and BN layers is 0.2-0.7 ms of work. With libgomp's default spin
    (300,000, under a millisecond here) or passive workers, the other thread was asleep again
    at the next layer, and waking it cost what sharing the layer saved: the 2-thread step took
    4.67 ms against 5.07 on one. Kept awake from layer to layer it takes 3.73 ms, every conv and
    BN layer 1.3-1.7x faster. Spinning workers must not compete with other threads for the
    cores, and none do: the convolution kernels run on these same workers, with OpenBLAS held to
    one thread (``arraybn.nn.chunk_threads``). (Before they did, LeNet-5 took 35.4 ms/step with
    workers spinning forever, OMP_WAIT_POLICY=ACTIVE, against 9.2 passive, in the fourth session,
    when its convolutions ran on OpenBLAS's own threads.)
    libgomp reads the variable once, when it loads, and Numba loads it when its threading layer
    starts (``numba.get_num_threads()`` starts it). So the variable is set only around that start
    and removed again: other libraries' OpenMP runtimes and child processes never see it. A
    threading layer that was started before (or an OpenMP runtime loaded earlier) keeps its
    setting.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        numba.get_num_threads()
    else:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        try:
            numba.get_num_threads()
        finally:
            del os.environ["GOMP_SPINCOUNT"]
    _follow_omp_num_threads(numba)


def _follow_omp_num_threads(numba):
    """Numba's threads, on this thread: ``OMP_NUM_THREADS`` where ``NUMBA_NUM_THREADS`` is not
    set (Numba itself reads only its own variable and takes all cores). So a run given its share
    of the cores the usual way (``OMP_NUM_THREADS=$((cores / K))`` for K ranks on a machine)
    does not start more spinning workers than it has cores."""
    wanted = os.environ.get("OMP_NUM_THREADS", "").strip()
    if "NUMBA_NUM_THREADS" in os.environ or not wanted.isdigit() or int(wanted) < 1:
        return
    numba.set_num_threads(min(int(wanted), numba.config.NUMBA_NUM_THREADS))


def create():
    """The numba backend, or ``BackendUnavailableError`` saying how to install Numba."""
    try:
        import numba
    except ImportError as exc:
        raise BackendUnavailableError(f"the numba backend needs Numba, which cannot be imported "
                                      f"({exc}); {_INSTALL_HINT}") from None
    _start_threads(numba)
    from arraybn.backends import numba_kernels
    return NumbaBackend(numba_kernels, numba)
