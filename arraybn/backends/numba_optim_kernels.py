"""The SGD update (momentum, Nesterov) in one Numba pass: the numba backend's optimizer kernel.

NumPy's step in ``arraybn.nn.optim.SGD`` is three to five whole-array operations (``buf *= m``,
``buf += g``, ``lr * buf``, ``data -= ...``), each a pass over the parameters, which leave the
cache between the step's large kernels. This kernel makes one pass with the same arithmetic:
every operation in the parameters' dtype, in NumPy's order, each rounded on its own (no FMA
contraction), so parameters and momentum buffer equal NumPy's bit for bit. LeNet-5 (61,706
values), in the step: 73 -> 51 us on two threads, 76 -> 63 us on one; what is left is memory
traffic (the arrays come back from memory after the convolutions). Shared out over two threads it
took 94-103 us: on one thread it stays.
"""
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


def sgd_update_applies(data, grad, buf):
    """Whether ``sgd_update`` takes these arrays: NumPy arrays of one float dtype and one shape,
    C-contiguous, ``buf`` (the momentum buffer) None or such an array."""
    arrays = (data, grad) if buf is None else (data, grad, buf)
    return (all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)
            and data.dtype in _FLOATS and len({(a.dtype, a.shape) for a in arrays}) == 1)


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
