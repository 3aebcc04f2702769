"""float32 subnormal data on every backend: kept, never flushed to zero.

The CPU backends keep subnormals; CUDA code compiled with -ftz=true (what CuPy's own compile
path appends) flushes them in every float32 <-> float64 conversion, so on the GPU these tests
fail unless the kernels are built with -ftz=false (arraybn.backends.cuda_build).
"""
import numpy as np
import pytest

import arraybn
from tests.conftest import to_backend, to_host
from tests.reference import bn_train

SMALLEST_NORMAL = np.finfo(np.float32).tiny


def _subnormal_data(rng, shape):
    """float32 values in (0, 2**-126): all subnormal, a few hundred distinct per channel."""
    x = rng.integers(1, 2**20, size=shape) * np.finfo(np.float32).smallest_subnormal
    x = x.astype(np.float32)
    assert (x > 0).all() and (x < SMALLEST_NORMAL).all()
    return x


@pytest.mark.parametrize("shape", [(64, 3), (16, 2, 5, 5)])
def test_inference_passes_subnormals_through_exactly(backend, rng, shape):
    x = _subnormal_data(rng, shape)
    c = shape[1]
    mean, var = to_backend(backend, np.zeros(c), np.full(c, 0.75))
    y, _ = arraybn.batch_norm_forward(to_backend(backend, x), None, None, training=False,
                                      running_mean=mean, running_var=var, eps=0.25,
                                      backend=backend.name)       # y = 1 * x + 0
    np.testing.assert_array_equal(to_host(y), x)


@pytest.mark.parametrize("shape", [(64, 3), (16, 2, 5, 5)])
def test_training_statistics_of_subnormal_data(backend, rng, shape):
    x = _subnormal_data(rng, shape)
    eps = 1e-90                              # below the variance of the subnormal values
    y, _ = arraybn.batch_norm_forward(to_backend(backend, x), None, None, training=True, eps=eps,
                                      backend=backend.name)
    ref_y = bn_train(x, np.ones(shape[1]), np.zeros(shape[1]), eps)[0]
    assert np.abs(ref_y).max() > 1               # normalized: O(1), not 0 as from flushed data
    np.testing.assert_allclose(to_host(y), ref_y.astype(np.float32), rtol=4e-7, atol=4e-7)
