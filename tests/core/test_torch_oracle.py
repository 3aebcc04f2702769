"""PyTorch as an independent oracle: full BN, ghost batches (per-chunk calls), the population
estimators (momentum=None, torch.var over all values) and the empty batch."""
import numpy as np
import pytest

import arraybn
from tests.conftest import to_backend, to_host

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
F = torch.nn.functional


def torch_bn(x, gamma, beta, rm, rv, gy, training, momentum=0.1, eps=1e-5):
    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    y = F.batch_norm(tx, rm, rv, tg, tb, training=training, momentum=momentum, eps=eps)
    y.backward(torch.tensor(gy))
    return y.detach().numpy(), tx.grad.numpy(), tg.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("shape", [(32, 10), (16, 6, 13, 13), (4, 3, 2, 2, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_full_bn_matches_torch(backend, rng, shape, dtype, training):
    c = shape[1]
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)
    gy = rng.normal(size=shape).astype(dtype)
    rm0, rv0 = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    t_rm, t_rv = torch.tensor(rm0), torch.tensor(rv0)
    y_t, gx_t, gg_t, gb_t = torch_bn(x, gamma, beta, t_rm, t_rv, gy, training, momentum=0.25)
    rm, rv = to_backend(backend, rm0.copy(), rv0.copy())
    y, cache = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), training=training,
                                          running_mean=rm, running_var=rv, momentum=0.25,
                                          backend=backend.name)
    gx, gg, gb = arraybn.batch_norm_backward(to_backend(backend, gy), cache)
    t32 = dtype == np.float32
    close = dict(rtol=2e-5, atol=2e-5) if t32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(to_host(y), y_t, **close)
    np.testing.assert_allclose(to_host(gx), gx_t, **close)
    sums = dict(rtol=1e-4, atol=1e-4) if t32 else dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(to_host(gg), gg_t, **sums)
    np.testing.assert_allclose(to_host(gb), gb_t, **sums)
    np.testing.assert_allclose(to_host(rm), t_rm.numpy(), **close)
    np.testing.assert_allclose(to_host(rv), t_rv.numpy(), **close)


def test_ghost_batches_equal_torch_called_per_chunk(backend, rng):
    x = rng.normal(size=(12, 4, 3, 3))
    gamma, beta, gy = rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=x.shape)
    t_rm, t_rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    tx = torch.tensor(x, requires_grad=True)
    tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    y_t = torch.cat([F.batch_norm(part, t_rm, t_rv, tg, tb, training=True)
                     for part in tx.split(4)])
    y_t.backward(torch.tensor(gy))
    rm, rv = to_backend(backend, np.zeros(4), np.ones(4))
    y, cache = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), running_mean=rm,
                                          running_var=rv, ghost_batch_size=4, backend=backend.name)
    gx, gg, gb = arraybn.batch_norm_backward(to_backend(backend, gy), cache)
    for ours, theirs in [(y, y_t.detach()), (gx, tx.grad), (gg, tg.grad), (gb, tb.grad),
                         (rm, t_rm), (rv, t_rv)]:
        np.testing.assert_allclose(to_host(ours), theirs.numpy(), rtol=1e-10, atol=1e-10)


def test_population_average_equals_torch_cumulative_momentum(backend, rng):
    batches = [rng.normal(loc=i, size=(n, 3, 4, 4)) for i, n in enumerate([8, 5, 11])]
    layer = torch.nn.BatchNorm2d(3, momentum=None).double()
    for b in batches:
        layer(torch.tensor(b))
    est = arraybn.AverageStatistics(backend=backend.name)
    for b in batches:
        est.update(to_backend(backend, b))
    mean, var = (to_host(r) for r in est.result())
    np.testing.assert_allclose(mean, layer.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(var, layer.running_var.numpy(), rtol=1e-12)


def test_exact_population_statistics_equal_torch_over_all_values(backend, rng):
    batches = [rng.normal(loc=i, size=(n, 3, 4, 4)) for i, n in enumerate([8, 5, 11])]
    est = arraybn.make_estimator("exact", backend=backend.name)
    for b in batches:
        est.update(to_backend(backend, b))
    mean, var = (to_host(r) for r in est.result())
    every = torch.tensor(np.concatenate(batches)).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(mean, every.mean(dim=1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(var, torch.var(every, dim=1, unbiased=True).numpy(), rtol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5, 5)])
def test_an_empty_batch_matches_torch(backend, shape, training):
    """torch.nn.functional.batch_norm on N = 0: empty y and gx, zero ggamma/gbeta, buffers kept."""
    x = np.empty(shape, np.float32)
    gamma, beta = np.array([1.0, 2.0, 3.0], np.float32), np.array([0.5, 0.0, -1.0], np.float32)
    rm0, rv0 = np.array([0.1, 0.2, 0.3], np.float32), np.array([1.0, 2.0, 3.0], np.float32)
    t_rm, t_rv = torch.tensor(rm0), torch.tensor(rv0)
    y_t, gx_t, gg_t, gb_t = torch_bn(x, gamma, beta, t_rm, t_rv, x, training)
    rm, rv = to_backend(backend, rm0.copy(), rv0.copy())
    y, cache = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), training=training,
                                          running_mean=rm, running_var=rv, backend=backend.name)
    gx, gg, gb = arraybn.batch_norm_backward(to_backend(backend, x), cache)
    for ours, theirs in [(y, y_t), (gx, gx_t), (gg, gg_t), (gb, gb_t), (rm, t_rm.numpy()),
                         (rv, t_rv.numpy())]:
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        np.testing.assert_array_equal(to_host(ours), theirs)
