"""A dense layer's GEMMs on two of Numba's threads: the backward's two side by side, the
forward's in two halves of the output features.

``gx = gy @ W`` and ``gW = gy.T @ x`` do not depend on each other; NumPy runs them one after the
other on the calling thread (the conv layers hold OpenBLAS to one thread), while Numba's
workers, which spin between kernels, wait. Here one parallel region runs each GEMM on its own
thread: LeNet-5's fc1 backward (128 x 120 x 400) 0.263 -> 0.107 ms on two threads isolated,
0.233 -> 0.145 ms in the step (``benchmarks/profile_step.py``).

The forward ``y = x @ W.T`` is split by output features (halves of W's rows, each thread
writing its columns of y): split by rows of x instead, both threads would pack all of W, which
is most of this GEMM's work (fc1 0.114 -> 0.103 ms against 0.082 by features).

The GEMMs are the calls ``np.matmul`` makes for C-contiguous operands (``numba_flat_conv.GEMMS``:
NumPy's own OpenBLAS, the same arguments; ``gy.T`` is read transposed in place), so the results
equal NumPy's bit for bit. Not used where a dimension is 1 (NumPy calls GEMV there, whose sums
differ in the last bit), on one thread, below ``MIN_MULTIPLY_ADDS`` per GEMM, or while OpenBLAS
runs on threads of its own (an MLP: no convolution has held it to one thread; its GEMMs are
then NumPy's, multi-threaded, whose sums can differ from one thread's). Every output
element is the same dot product whatever part of the GEMM computes it (OpenBLAS sums each over
K in an order that does not depend on M or N), which the tests check bit for bit.
"""
import numba
import numpy as np
from numba import prange

from arraybn.backends.numba_backend import _output
from arraybn.backends.numba_config import jit
from arraybn.backends.numba_flat_conv import (NO_TRANS, ROW_MAJOR, TRANS, available,
                                              blas_threads, cblas_gemm, gemm_args)

MIN_MULTIPLY_ADDS = 1 << 22     # per GEMM: LeNet-5's fc1 (6.1 M) pays in the step, fc2 (1.3 M)
                                # not: 0.054 -> 0.074 ms (waking the worker costs more)


@jit(parallel=True)
def _backward_gemms(gy, x, weight, gemm, one, zero, gx, gweight):
    """gx = gy @ weight on one thread, gweight = gy.T @ x on another."""
    n, o = gy.shape
    i = x.shape[1]
    for task in prange(2):
        if task == 0:
            cblas_gemm(gemm, ROW_MAJOR, NO_TRANS, NO_TRANS, n, i, o, one, gy.ctypes.data, o,
                       weight.ctypes.data, i, zero, gx.ctypes.data, i)
        else:
            cblas_gemm(gemm, ROW_MAJOR, TRANS, NO_TRANS, o, i, n, one, gy.ctypes.data, o,
                       x.ctypes.data, i, zero, gweight.ctypes.data, i)


@jit(parallel=True)
def _forward_halves(x, weight, gemm, one, zero, y):
    """y = x @ weight.T, the first half of the output features on one thread, the rest on
    another."""
    n, i = x.shape
    o = weight.shape[0]
    half = (o + 1) // 2
    for task in prange(2):
        lo = task * half
        cblas_gemm(gemm, ROW_MAJOR, NO_TRANS, TRANS, n, min(o, lo + half) - lo, i, one,
                   x.ctypes.data, i, weight.ctypes.data + lo * i * weight.itemsize, i, zero,
                   y.ctypes.data + lo * y.itemsize, o)


def _gemms_apply(n, o, i, arrays):
    """Whether (n, o) x (o, i)-sized GEMMs over ``arrays`` run on two threads here."""
    return (n * o * i >= MIN_MULTIPLY_ADDS and min(n, o, i) >= 2
            and numba.get_num_threads() > 1 and blas_threads() == 1
            and len({a.dtype for a in arrays}) == 1
            and available(arrays[0].dtype) and all(a.flags.c_contiguous for a in arrays))


def dense_forward_applies(x, weight):
    """Whether ``dense_forward_gemm`` runs this forward: the conditions of
    ``dense_backward_applies`` for ``x`` (N, in) and ``weight`` (out, in)."""
    if not all(isinstance(a, np.ndarray) and a.ndim == 2 for a in (x, weight)):
        return False
    (n, i), o = x.shape, weight.shape[0]
    return weight.shape[1] == i and _gemms_apply(n, o, i, (x, weight))


def dense_forward_gemm(x, weight):
    """x @ weight.T in two halves of the output features side by side; the caller checks
    ``dense_forward_applies`` first."""
    y = np.empty((x.shape[0], weight.shape[0]), x.dtype)
    _forward_halves(x, weight, *gemm_args(x.dtype), y)
    return y


def dense_backward_applies(gy, x, weight):
    """Whether ``dense_backward_gemms`` runs this backward: 2-D operands with every dimension
    over 1 and at least ``MIN_MULTIPLY_ADDS`` per GEMM (checked first: the small layers get
    their answer cheaply), two or more Numba threads and OpenBLAS on one, one float dtype with
    NumPy's OpenBLAS found, all C-contiguous."""
    arrays = (gy, x, weight)
    if not all(isinstance(a, np.ndarray) and a.ndim == 2 for a in arrays):
        return False
    (n, o), i = gy.shape, x.shape[1]
    return x.shape[0] == n and weight.shape == (o, i) and _gemms_apply(n, o, i, arrays)


def dense_backward_gemms(gy, x, weight, gweight=None):
    """(gy @ weight, gy.T @ x) of a dense layer's backward, computed side by side; the caller
    checks ``dense_backward_applies`` first. gweight: where to write gy.T @ x (a C-contiguous
    array of weight's shape and dtype), or None for a new array."""
    gx = np.empty(x.shape, gy.dtype)
    gweight = _output(gweight, weight, "gweight")        # weight: C-contiguous, gy's dtype
    _backward_gemms(gy, x, weight, *gemm_args(gy.dtype), gx, gweight)
    return gx, gweight
