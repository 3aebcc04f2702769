"""Population-statistics estimators: exactness under any batching, averages, EMA, errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arraybn
from tests.conftest import to_backend, to_host


def batches_of(data, cuts):
    bounds = [0] + sorted(set(cuts)) + [len(data)]
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), cuts=st.lists(st.integers(1, 59), max_size=8),
       offset=st.sampled_from([0.0, 1e3, -1e6]), seed=st.integers(0, 2**16))
def test_exact_statistics_equal_numpy_over_the_concatenated_data_for_any_batching(n, cuts, offset,
                                                                                  seed):
    data = offset + np.random.default_rng(seed).normal(size=(n, 3, 2, 2))
    parts = batches_of(data, [c for c in cuts if c < n])
    est = arraybn.ExactStatistics(backend="numpy")
    for part in parts:
        est.update(part)
    mean, var = est.result()
    np.testing.assert_allclose(mean, data.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(var, data.var(axis=(0, 2, 3), ddof=1), rtol=1e-9, atol=1e-12)
    assert est.count == data.size // 3 and est.batches == len(parts)


def test_exact_statistics_do_not_depend_on_order_or_batch_size(backend, rng):
    data = (1e4 + rng.normal(size=(90, 5))).astype(np.float32)
    results = []
    for size, order in [(90, None), (7, None), (7, "reversed"), (32, "shuffled")]:
        parts = [data[i:i + size] for i in range(0, 90, size)]
        if order == "reversed":
            parts = parts[::-1]
        elif order == "shuffled":
            parts = [parts[i] for i in rng.permutation(len(parts))]
        est = arraybn.ExactStatistics(backend=backend.name)
        for part in parts:
            est.update(to_backend(backend, part))
        results.append([to_host(r) for r in est.result()])
    exact = data.astype(np.float64)
    for mean, var in results:
        np.testing.assert_allclose(mean, exact.mean(axis=0), rtol=1e-13)
        np.testing.assert_allclose(var, exact.var(axis=0, ddof=1), rtol=1e-9)


def test_average_statistics_weight_every_batch_equally(backend, rng):
    a, b = rng.normal(size=(10, 2)), rng.normal(loc=5, size=(4, 2))
    est = arraybn.AverageStatistics(backend=backend.name)
    est.update(to_backend(backend, a)).update(to_backend(backend, b))
    mean, var = (to_host(r) for r in est.result())
    np.testing.assert_allclose(mean, (a.mean(0) + b.mean(0)) / 2)
    np.testing.assert_allclose(var, (a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)


@pytest.mark.parametrize("stat", ["var", "std"])
def test_ema_follows_the_seed_text_recursion(backend, rng, stat):
    batches = [rng.normal(loc=i, scale=1 + i, size=(16, 3)) for i in range(4)]
    est = arraybn.make_estimator("ema", decay=0.9, stat=stat, backend=backend.name)
    mean, scale = np.zeros(3), np.ones(3)
    for b in batches:
        est.update(to_backend(backend, b))
        mean = 0.9 * mean + 0.1 * b.mean(0)
        batch = b.std(0, ddof=1) if stat == "std" else b.var(0, ddof=1)
        scale = 0.9 * scale + 0.1 * batch
    got_mean, got_var = (to_host(r) for r in est.result())
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(got_var, scale ** 2 if stat == "std" else scale, rtol=1e-12)


def test_estimators_refuse_bad_use(rng):
    with pytest.raises(ValueError, match="seen no batch"):
        arraybn.ExactStatistics().result()
    with pytest.raises(ValueError, match="decay must be in"):
        arraybn.EMAStatistics(decay=1.0)
    with pytest.raises(ValueError, match="stat must be"):
        arraybn.EMAStatistics(stat="mad")
    with pytest.raises(ValueError, match="unknown statistics method 'median'"):
        arraybn.make_estimator("median")
    with pytest.raises(ValueError, match="more than one value per channel"):
        arraybn.AverageStatistics().update(np.ones((1, 3)))
    bad = rng.normal(size=(4, 2))
    bad[0, 1] = np.nan
    with pytest.raises(arraybn.NonFiniteStatisticsError, match=r"channel\(s\) 1"):
        arraybn.ExactStatistics().update(bad)


ESTIMATORS = [("exact", {}), ("average", {}), ("ema", {"decay": 0.0}),
              ("ema", {"decay": 0.0, "stat": "std"})]


@pytest.mark.parametrize("method, options", ESTIMATORS)
@pytest.mark.parametrize("shape", [(9, 3), (4, 3, 2, 5)])
def test_every_estimator_returns_the_unbiased_variance_of_one_batch(backend, rng, method,
                                                                    options, shape):
    """Like the running buffers, PyTorch and Chainer: x.var * n / (n - 1) after one batch of n."""
    x = rng.normal(loc=2.0, size=shape)
    est = arraybn.make_estimator(method, backend=backend.name, **options)
    mean, var = (to_host(r) for r in est.update(to_backend(backend, x)).result())
    axes = (0,) + tuple(range(2, x.ndim))
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=axes, ddof=1), rtol=1e-12)


def test_exact_statistics_need_two_values_for_an_unbiased_variance():
    est = arraybn.ExactStatistics(backend="numpy").update(np.ones((1, 2)))
    with pytest.raises(ValueError, match="needs at least two values per channel.*seen 1"):
        est.result()
    mean, var = est.update(np.array([[3.0, 5.0]])).result()
    np.testing.assert_allclose(mean, [2.0, 3.0])
    np.testing.assert_allclose(var, [2.0, 8.0])


@pytest.mark.parametrize("method, options", ESTIMATORS)
def test_an_empty_batch_changes_nothing(backend, rng, method, options):
    est = arraybn.make_estimator(method, backend=backend.name, **options)
    empty = to_backend(backend, np.empty((0, 3, 4)))
    est.update(empty)
    assert est.batches == 0 and est.count == 0
    x = to_backend(backend, rng.normal(size=(5, 3, 4)))
    before = [to_host(r).copy() for r in est.update(x).result()]
    est.update(empty)
    assert est.batches == 1 and est.count == 20
    for got, expected in zip(est.result(), before):
        np.testing.assert_array_equal(to_host(got), expected)


@pytest.mark.parametrize("method", ["exact", "average", "ema"])
def test_a_changed_channel_count_is_named(backend, rng, method):
    est = arraybn.make_estimator(method, backend=backend.name)
    est.update(to_backend(backend, rng.normal(size=(4, 3))))
    with pytest.raises(ValueError, match=f"{type(est).__name__} was started with 3 channels and "
                                         "got 4"):
        est.update(to_backend(backend, rng.normal(size=(4, 4))))


def test_ema_refuses_a_batch_of_one_value_per_channel():
    with pytest.raises(ValueError, match="EMAStatistics needs more than one value per channel"):
        arraybn.EMAStatistics().update(np.ones((1, 3)))
