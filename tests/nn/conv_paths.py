"""A convolution's forward and backward on the NumPy path and on the numba backend's kernels,
for the tests that check that the kernels change no bit (or, where they run their own float32
GEMM, ``numba_gemm``, no more than rounding)."""
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


def assert_within_rounding(results, x, w, b, stride, pad, gy_seed=1):
    """Each of (y, gx, gweight, gbias) in ``results`` within float32 rounding of the float64
    NumPy path's: |got - exact| <= depth * eps * (the same sums of |terms|), where depth is
    the number of terms each sum adds (the classic bound for a dot product, (depth * eps)
    times the sum of the products' magnitudes; a wrong or missed window is off by a term)."""
    n, c, kh, kw, o = x.shape[0], x.shape[1], w.shape[2], w.shape[3], w.shape[0]
    wide = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
    y, cache = plain.conv2d_forward(*wide, stride, pad, np, {}, None)
    gy = np.random.default_rng(gy_seed).standard_normal(y.shape).astype(x.dtype)
    exact = (y,) + plain.conv2d_backward(gy.astype(np.float64), cache, np, True, {}, None)
    magnitudes = [None if a is None else np.abs(a) for a in wide]
    y_abs, cache = plain.conv2d_forward(*magnitudes, stride, pad, np, {}, None)
    scale = (y_abs,) + plain.conv2d_backward(np.abs(gy).astype(np.float64), cache, np, True,
                                             {}, None)
    positions = y.shape[2] * y.shape[3]
    depths = (c * kh * kw + 1, o * kh * kw, n * positions, n * positions)
    eps = np.finfo(np.float32).eps
    for got, want, bound, depth in zip(results, exact, scale, depths):
        if got is None:
            continue
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.all(np.abs(got - want) <= depth * eps * bound + 1e-30)
