"""Softmax cross-entropy: the loss and its gradient with respect to the logits, in one pass."""
import math

import numpy as np

from arraybn.backends import get_backend, is_cupy_array
from arraybn.backends.arrays import to_host


def _check_labels(labels, n, classes, xp):
    host = to_host(labels)
    if host.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) for {n} logit rows; got {host.shape}")
    if not np.issubdtype(host.dtype, np.integer):
        raise TypeError(f"labels must be integers (class indices), got dtype {host.dtype}; "
                        "pass class indices, not one-hot vectors")
    if n and (host.min() < 0 or host.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}); got values from {host.min()} "
                         f"to {host.max()}")
    return xp.asarray(labels)


def softmax_cross_entropy(logits, labels, ops=None):
    """Mean softmax cross-entropy over the batch and its gradient.

    logits: (N, K) float array on numpy or cupy; labels: (N,) integer class indices.
    Returns ``(loss, g_logits)``: loss a python float, g_logits (N, K) in the logits' dtype,
    ``(softmax(logits) - onehot(labels)) / N``. Stable for large logits (max is subtracted).
    ops: the backend's ``conv_ops()``; where it has ``softmax_cross_entropy`` (numba) and that
    applies, one kernel computes both (the same arithmetic; see ``numba_loss_kernels``).
    """
    applies = getattr(ops, "softmax_cross_entropy_applies", None)
    if applies is not None and applies(logits, labels):
        loss, grad = ops.softmax_cross_entropy(logits, labels)
        if loss is None:                # a label out of range: the check says which
            _check_labels(labels, *logits.shape, np)
    else:
        # the logits' array module (backend_for would read ARRAYBN_BACKEND from os.environ)
        xp = get_backend("cupy").xp if is_cupy_array(logits) else np
        if logits.ndim != 2 or logits.shape[0] == 0:
            raise ValueError(f"logits must have shape (N, K) with N >= 1; got "
                             f"{tuple(logits.shape)}")
        loss, grad = _loss_and_gradient(logits, _check_labels(labels, *logits.shape, xp), xp)
    if not math.isfinite(loss):
        raise FloatingPointError("the loss is not finite (the logits hold NaN or inf); lower the "
                                 "learning rate or check the data")
    return loss, grad


def _loss_and_gradient(logits, labels, xp):
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = xp.arange(n)
    log_prob_true = shifted[rows, labels] - xp.log(total[:, 0])
    loss = -float(log_prob_true.astype(np.float64).mean())
    grad = exp / total
    grad[rows, labels] -= 1.0
    grad *= logits.dtype.type(1.0 / n)
    return loss, grad
