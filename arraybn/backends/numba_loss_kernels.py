"""Softmax cross-entropy in one Numba pass: the numba backend's loss kernel.

``arraybn.nn.loss.softmax_cross_entropy`` in NumPy is some twenty calls on a (128, 10) array
(max, subtract, exp, sum, log, fancy indexing, the label checks, the gradient's three updates).
Each takes a few microseconds, and in the training step, where the convolutions' megabytes have
just gone through the cache, the interpreter and NumPy's dispatch run cold: LeNet-5's loss took
0.095 ms a step there against 0.031 ms in a loop of its own. This kernel reads each row once,
writes its gradient and checks its label: 0.012 ms in the step.

The arithmetic is the NumPy code's, row by row: the row's maximum subtracted, ``exp`` in the
logits' dtype (LLVM's, not NumPy's SIMD one: the last bit can differ), the row's sum in order,
``g = exp / sum``, 1 subtracted at the label, times ``1 / N``; the loss is the mean over the rows
of ``log(sum) - (logit - max)`` taken in float64 (NumPy takes the log in the logits' dtype, then
the mean in float64). Rows are independent, so a batch split among MPI processes gives every row
the bits it has in one process. NaN or inf in a row gives a NaN loss, which the caller turns into
its FloatingPointError, as NumPy's does.
"""
import math

import numpy as np

from arraybn.backends.numba_config import jit

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@jit()
def _softmax_cross_entropy(logits, labels, one, scale, grad):
    """Fill ``grad``; return (the mean loss, -1), or (nan, row) at the first row whose label
    is not a class index. ``one`` and ``scale`` (1 / N) are in the logits' dtype."""
    n, classes = logits.shape
    log_sum = 0.0
    for r in range(n):
        label = labels[r]
        if label < 0 or label >= classes:
            return math.nan, r
        row, g = logits[r], grad[r]
        peak = row[0]
        for j in range(1, classes):
            peak = max(peak, row[j])
        total = one - one
        for j in range(classes):
            g[j] = np.exp(row[j] - peak)
            total += g[j]
        log_sum += math.log(np.float64(total)) - np.float64(row[label] - peak)
        for j in range(classes):
            g[j] = g[j] / total
        g[label] -= one
        for j in range(classes):
            g[j] *= scale
    return log_sum / n, -1


def softmax_cross_entropy_applies(logits, labels):
    """Whether ``softmax_cross_entropy`` takes these arrays: NumPy arrays, ``logits`` (N, K)
    float32/float64 C-contiguous with N, K >= 1, ``labels`` (N,) of an integer dtype. (The
    NumPy code takes everything else, and raises its errors for bad shapes and dtypes.)"""
    return (isinstance(logits, np.ndarray) and isinstance(labels, np.ndarray)
            and logits.ndim == 2 and logits.dtype in _FLOATS and logits.flags.c_contiguous
            and logits.size > 0 and labels.shape == logits.shape[:1]
            and labels.dtype.kind in "iu")


def softmax_cross_entropy(logits, labels):
    """``(mean loss, d loss / d logits)``, or ``(None, None)`` where a label is not in
    ``[0, K)`` (the caller raises its error). The caller checks
    ``softmax_cross_entropy_applies``."""
    grad = np.empty_like(logits)
    kind = logits.dtype.type
    loss, bad_row = _softmax_cross_entropy(logits, labels, kind(1), kind(1 / len(logits)), grad)
    return (None, None) if bad_row >= 0 else (loss, grad)
