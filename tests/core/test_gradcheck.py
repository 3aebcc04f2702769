"""Centred-difference gradient checks in float64 for every variant."""
import numpy as np
import pytest

import arraybn
from tests.conftest import to_backend, to_host
from tests.nn.gradcheck import numerical_grad


def numeric_grads(f, arrays):
    return [np.array([numerical_grad(f, a, idx) for idx in np.ndindex(a.shape)]).reshape(a.shape)
            for a in arrays]


VARIANTS = {
    "full": {},
    "mean_only": {"variant": "mean_only"},
    "ghost": {"ghost_batch_size": 3},
    "ghost_mean_only": {"ghost_batch_size": 3, "variant": "mean_only"},
    # running statistics far from the batch: r and d sit on their clip bounds, so treating them
    # as constants (the paper's stop-gradient) is also the true derivative.
    "renorm_clipped": {"renorm": True, "rmax": 1.5, "dmax": 0.5, "running": (40.0, 1e3)},
    "frozen": {"frozen": True, "running": (0.3, 1.7)},
    "inference": {"training": False, "running": (-0.2, 0.6)},
}


@pytest.mark.parametrize("shape", [(7, 3), (5, 2, 3, 2)])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_match_centred_differences(backend, rng, shape, name):
    options = dict(VARIANTS[name])
    running = options.pop("running", (0.0, 1.0))
    c = shape[1]
    x = rng.normal(size=shape) * 2 + 0.5
    gamma, beta = rng.uniform(0.5, 1.5, size=c), rng.normal(size=c)
    weights = rng.normal(size=shape)

    def loss():
        rm, rv = to_backend(backend, np.full(c, running[0]), np.full(c, running[1]))
        y, _ = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), running_mean=rm,
                                          running_var=rv, eps=1e-3, **options, backend=backend.name)
        return float((to_host(y) * weights).sum())

    rm, rv = to_backend(backend, np.full(c, running[0]), np.full(c, running[1]))
    _, cache = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), running_mean=rm,
                                          running_var=rv, eps=1e-3, **options, backend=backend.name)
    gx, ggamma, gbeta = (to_host(g) for g in
                         arraybn.batch_norm_backward(to_backend(backend, weights), cache))
    nx, ngamma, nbeta = numeric_grads(loss, [x, gamma, beta])
    np.testing.assert_allclose(gx, nx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ggamma, ngamma, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gbeta, nbeta, rtol=1e-6, atol=1e-7)
