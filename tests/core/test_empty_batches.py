"""An empty batch (N = 0) behaves as in PyTorch: empty output, buffers untouched, empty gx and zero
parameter gradients, in every mode and variant, on every backend (handled before any kernel)."""
import numpy as np
import pytest

import arraybn
from tests.conftest import to_backend, to_host

MODES = {
    "full": {},
    "mean_only": {"variant": "mean_only"},
    "ghost": {"ghost_batch_size": 3},
    "renorm": {"renorm": True},
    "frozen": {"frozen": True},
    "inference": {"training": False},
    "inference_mean_only": {"training": False, "variant": "mean_only"},
}


def _buffers(backend):
    return to_backend(backend, np.array([0.5, -1.0, 2.0]), np.array([2.0, 0.25, 1.0]))


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", list(MODES))
def test_empty_batch_gives_empty_outputs_zero_parameter_gradients_and_keeps_buffers(
        backend, shape, dtype, mode):
    x = to_backend(backend, np.empty(shape, dtype))
    gamma, beta = to_backend(backend, np.array([1.0, 2.0, 3.0], np.float32), np.zeros(3))
    rm, rv = _buffers(backend)
    y, cache = arraybn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                          backend=backend.name, **MODES[mode])
    assert y.shape == shape and y.dtype == dtype
    np.testing.assert_array_equal(to_host(rm), [0.5, -1.0, 2.0])
    np.testing.assert_array_equal(to_host(rv), [2.0, 0.25, 1.0])
    gx, ggamma, gbeta = arraybn.batch_norm_backward(to_backend(backend, np.empty(shape, dtype)),
                                                    cache)
    assert gx.shape == shape and gx.dtype == dtype
    assert ggamma.dtype == np.float32 and gbeta.dtype == np.float64
    np.testing.assert_array_equal(to_host(ggamma), np.zeros(3))
    np.testing.assert_array_equal(to_host(gbeta), np.zeros(3))
    assert ggamma is not gbeta


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_fills_the_given_out_buffers(backend, training):
    x, out, gx_out = (to_backend(backend, np.empty((0, 2, 3))) for _ in range(3))
    rm, rv = to_backend(backend, np.zeros(2), np.ones(2))
    y, cache = arraybn.batch_norm_forward(x, None, None, training=training, running_mean=rm,
                                          running_var=rv, out=out, backend=backend.name)
    gx, ggamma, gbeta = arraybn.batch_norm_backward(to_backend(backend, np.empty((0, 2, 3))),
                                                    cache, out=gx_out)
    assert y.shape == gx.shape == (0, 2, 3)
    assert ggamma is None and gbeta is None


def test_empty_batch_still_checks_the_arguments(backend):
    x = to_backend(backend, np.empty((0, 3)))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        arraybn.batch_norm_forward(x, to_backend(backend, np.ones(2)), None, backend=backend.name)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        arraybn.batch_norm_forward(x, None, None, training=False, backend=backend.name)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive integer"):
        arraybn.batch_norm_forward(x, None, None, ghost_batch_size=0, backend=backend.name)
    rm, rv = _buffers(backend)
    with pytest.raises(ValueError, match="rmax >= 1"):
        arraybn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv, renorm=True,
                                   rmax=0.5, backend=backend.name)
    with pytest.raises(ValueError, match="x has no channel"):
        arraybn.batch_norm_forward(to_backend(backend, np.empty((4, 0))), None, None,
                                   backend=backend.name)
