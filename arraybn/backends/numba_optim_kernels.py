"""The SGD (momentum, Nesterov) and Adam updates in one Numba pass each: the numba backend's
optimizer kernels.

NumPy's step in ``arraybn.nn.optim.SGD`` is three to five whole-array operations (``buf *= m``,
``buf += g``, ``lr * buf``, ``data -= ...``), each a pass over the parameters, which leave the
cache between the step's large kernels. This kernel makes one pass with the same arithmetic:
every operation in the parameters' dtype, in NumPy's order, each rounded on its own (no FMA
contraction), so parameters and momentum buffer equal NumPy's bit for bit. LeNet-5 (61,706
values), in the step: 73 -> 51 us on two threads, 76 -> 63 us on one; what is left is memory
traffic (the arrays come back from memory after the convolutions). Shared out over two threads it
took 94-103 us: on one thread it stays.

Adam's NumPy step is thirteen whole-array operations and four temporaries (``m *= b1``,
``(1 - b1) * g``, ``m += ...``, the same for ``v``, ``v ** 0.5``, ``/``, ``+ eps``, ``m / denom``,
``* step``, ``-=``); ``_adam`` makes one pass with the same operations in the same order, each in
the parameters' dtype and rounded on its own (``v ** 0.5`` is NumPy's ``sqrt``, correctly
rounded as LLVM's), so the parameters and both averages equal NumPy's bit for bit. LeNet-5, one
thread, the step alone: 110 -> 42 us (SGD's kernel: 24 us); in the 20,000-image epoch (156
steps, 0.75 s) that is within the noise of four interleaved runs.
"""
import math

import numpy as np

from arraybn.backends.numba_config import jit

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


@jit(contract=False)
def _sgd(data, grad, buf, lr, momentum, first, nesterov):
    """data -= lr * step over flat arrays; with a buffer (momentum > 0) buf = g on the first
    step, else buf * momentum + g, and step = g + momentum * buf (Nesterov) or buf; without one
    (empty buf) step = g."""
    with_buffer = buf.shape[0] > 0
    for i in range(data.shape[0]):
        g, step = grad[i], grad[i]
        if with_buffer:
            b = g if first else buf[i] * momentum + g
            buf[i] = b
            step = g + momentum * b if nesterov else b
        data[i] = data[i] - lr * step


@jit(contract=False)
def _adam(data, grad, m, v, zero, beta1, beta2, rest1, rest2, root2, eps, step_size, first):
    """Adam's step over flat arrays, as ``arraybn.nn.optim.Adam._apply`` in NumPy: every
    scalar in the arrays' dtype (``rest1`` = 1 - beta1, ``root2`` = sqrt(1 - beta2 ** t),
    ``step_size`` = lr / (1 - beta1 ** t), each rounded from float64 as NumPy casts a Python
    float); on the ``first`` step m and v start as g * 0 (NaN where g is not finite, as there)."""
    for i in range(data.shape[0]):
        g = grad[i]
        mi = g * zero if first else m[i]
        vi = g * zero if first else v[i]
        mi = mi * beta1
        mi = mi + rest1 * g
        vi = vi * beta2
        vi = vi + rest2 * g * g
        m[i], v[i] = mi, vi
        denom = np.sqrt(vi) / root2 + eps
        data[i] = data[i] - mi / denom * step_size


def _flat_float_arrays(*arrays):
    """Whether the arrays are NumPy arrays of one float dtype and one shape, C-contiguous."""
    return (all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)
            and arrays[0].dtype in _FLOATS and len({(a.dtype, a.shape) for a in arrays}) == 1)


def sgd_update_applies(data, grad, buf):
    """Whether ``sgd_update`` takes these arrays: NumPy arrays of one float dtype and one shape,
    C-contiguous, ``buf`` (the momentum buffer) None or such an array."""
    return _flat_float_arrays(*((data, grad) if buf is None else (data, grad, buf)))


def sgd_update(data, grad, buf, lr, momentum, nesterov):
    """``arraybn.nn.optim.SGD``'s update of ``data`` in place, in one pass. ``buf``: the
    momentum buffer, updated in place, or None before the first step (with momentum > 0 a new
    buffer is returned then; otherwise ``buf``). The caller checks ``sgd_update_applies``."""
    kind = data.dtype.type
    first = buf is None
    if first:
        buf = np.empty_like(data) if momentum else np.empty(0, data.dtype)
    _sgd(data.reshape(-1), grad.reshape(-1), buf.reshape(-1), kind(lr), kind(momentum), first,
         bool(nesterov))
    return buf if momentum else None


def adam_update_applies(data, grad, exp_avg, exp_avg_sq):
    """Whether ``adam_update`` takes these arrays: as ``sgd_update_applies``, the two averages
    both None (before the first step) or both such arrays."""
    if (exp_avg is None) != (exp_avg_sq is None):
        return False
    return _flat_float_arrays(*((data, grad) if exp_avg is None
                                else (data, grad, exp_avg, exp_avg_sq)))


def adam_update(data, grad, exp_avg, exp_avg_sq, lr, betas, eps, step):
    """``arraybn.nn.optim.Adam``'s update of ``data`` in place, in one pass, at step ``step``
    (1, 2, ...); ``exp_avg``, ``exp_avg_sq``: the averages, updated in place, or None before
    the first step (new ones are made). Returns (exp_avg, exp_avg_sq). The caller checks
    ``adam_update_applies``."""
    kind = data.dtype.type
    first = exp_avg is None
    if first:
        exp_avg, exp_avg_sq = np.empty_like(data), np.empty_like(data)
    beta1, beta2 = betas
    _adam(data.reshape(-1), grad.reshape(-1), exp_avg.reshape(-1), exp_avg_sq.reshape(-1),
          kind(0), kind(beta1), kind(beta2), kind(1 - beta1), kind(1 - beta2),
          kind(math.sqrt(1 - beta2 ** step)), kind(eps), kind(lr / (1 - beta1 ** step)), first)
    return exp_avg, exp_avg_sq
