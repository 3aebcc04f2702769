"""A convolution's forward and backward on the NumPy path and on the numba backend's kernels,
for the tests that check that the kernels change no bit."""
import numpy as np

from arraybn.backends import get_backend
from arraybn.nn import chunk_threads as ct
from arraybn.nn import conv as plain

OPS = get_backend("numba").conv_ops()


def both_paths(x, w, b, stride, pad, need_gx=True, gy_seed=1):
    """[(y, gx, gweight, gbias) from the NumPy path, the same from the backend's kernels]."""
    ct.threads()      # OpenBLAS on one thread, as the kernels always run it (on two threads
    results = []      # its GEMMs may sum in another order)
    for ops in (None, OPS):
        y, cache = plain.conv2d_forward(x, w, b, stride, pad, np, {}, ops)
        gy = np.random.default_rng(gy_seed).standard_normal(y.shape).astype(x.dtype)
        results.append((y,) + plain.conv2d_backward(gy, cache, np, need_gx, {}, ops))
    return results


def assert_same(reference, kernels):
    """Every result equal bit for bit and of the same dtype (None where the other is None)."""
    for want, got in zip(reference, kernels):
        if want is None:
            assert got is None
        else:
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
