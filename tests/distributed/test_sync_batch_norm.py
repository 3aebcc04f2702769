"""BN under a communicator: K ranks holding shards of a batch reproduce the whole batch.

The ranks are threads (``run_ranks``); each normalizes its own rows with ``comm=``. Their y and
gx, concatenated, must equal the one-process result on the whole batch, the running buffers must
equal it too and be bit-identical on every rank, and the per-rank ggamma/gbeta must add up to
the one-process gradients.
"""
import numpy as np
import pytest

import arraybn
from arraybn.core.errors import NonFiniteStatisticsError
from arraybn.distributed import run_ranks

RTOL = {np.float64: 1e-12, np.float32: 1e-6}
SHARDS = {                      # rows per rank, for N = 10
    "one rank": [10], "two ranks": [6, 4], "10 over 3": [4, 3, 3],
    "empty first rank": [0, 6, 4], "empty last rank": [3, 7, 0]}
VARIANTS = {
    "full": {}, "mean_only": {"variant": "mean_only"}, "renorm": {"renorm": True},
    "frozen": {"frozen": True}, "inference": {"training": False}}
SHAPES = [(10, 3), (10, 3, 2, 3)]


def assert_close(actual, expected, rtol):
    """Equal to ``rtol`` relative to the largest value of ``expected`` (normwise)."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), np.finfo(np.float64).tiny)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=0,
                               atol=rtol * scale)


def make_problem(shape, dtype, seed=7):
    rng = np.random.default_rng(seed)
    channels = shape[1]
    return dict(
        x=rng.normal(3.0, 2.0, shape).astype(dtype), gy=rng.normal(0.0, 1.0, shape).astype(dtype),
        gamma=rng.normal(1.0, 0.3, channels), beta=rng.normal(0.0, 0.3, channels),
        running_mean=rng.normal(2.5, 0.5, channels),
        running_var=rng.uniform(1.0, 5.0, channels))


def bounds(sizes):
    edges = np.cumsum([0] + sizes)
    return list(zip(edges[:-1], edges[1:]))


def run_bn(problem, backend, options, comm=None, rows=slice(None)):
    rm, rv = problem["running_mean"].copy(), problem["running_var"].copy()
    y, cache = arraybn.batch_norm_forward(
        problem["x"][rows], problem["gamma"], problem["beta"], running_mean=rm, running_var=rv,
        backend=backend, comm=comm, **options)
    gx, ggamma, gbeta = arraybn.batch_norm_backward(problem["gy"][rows], cache)
    return dict(y=y, gx=gx, ggamma=ggamma, gbeta=gbeta, running_mean=rm, running_var=rv)


def run_sharded(problem, backend, options, sizes):
    spans = bounds(sizes)
    return run_ranks(len(sizes), lambda comm: run_bn(problem, backend, options, comm,
                                                     slice(*spans[comm.rank])))


@pytest.mark.parametrize("shape", SHAPES, ids=["dense", "conv"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ranks_reproduce_the_whole_batch(cpu_backend, dtype, shards, variant, shape):
    problem = make_problem(shape, dtype)
    options, rtol = VARIANTS[variant], RTOL[dtype]
    whole = run_bn(problem, cpu_backend.name, options)
    ranks = run_sharded(problem, cpu_backend.name, options, SHARDS[shards])
    for key in ("y", "gx"):
        joined = np.concatenate([r[key] for r in ranks])
        assert joined.dtype == whole[key].dtype
        assert_close(joined, whole[key], rtol)
    for key in ("ggamma", "gbeta"):
        assert_close(sum(r[key] for r in ranks), whole[key], rtol)
    for key in ("running_mean", "running_var"):
        assert_close(ranks[0][key], whole[key], rtol)
        for other in ranks[1:]:
            np.testing.assert_array_equal(other[key], ranks[0][key])   # bit-identical


def test_the_running_buffers_use_the_groups_count(cpu_backend):
    problem = make_problem((10, 2), np.float64)
    ranks = run_sharded(problem, cpu_backend.name, {"momentum": 1.0}, [4, 3, 3])
    x = problem["x"]
    np.testing.assert_allclose(ranks[2]["running_var"], x.var(axis=0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("shards", [[4, 3, 3], [0, 5, 5]])
def test_offset_float32_data_keeps_its_variance(cpu_backend, shards):
    rng = np.random.default_rng(3)
    x = (1e4 + rng.normal(0.0, 1.0, (10, 2, 4, 4))).astype(np.float32)
    problem = make_problem(x.shape, np.float32) | {"x": x}
    ranks = run_sharded(problem, cpu_backend.name, {"momentum": 1.0}, shards)
    exact = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    for rank in ranks:
        np.testing.assert_allclose(rank["running_var"], exact, rtol=1e-10)
    y = np.concatenate([r["y"] for r in ranks]).astype(np.float64)
    normalized = (y - problem["beta"][None, :, None, None]) / problem["gamma"][None, :, None, None]
    np.testing.assert_allclose(normalized.var(axis=(0, 2, 3)), 1.0, rtol=1e-4)


def test_groups_of_ranks_normalize_their_own_rows(cpu_backend):
    problem = make_problem((12, 3), np.float64)
    spans = bounds([3, 3, 3, 3])
    ranks = run_ranks(4, lambda comm: run_bn(problem, cpu_backend.name, {}, comm.split(2),
                                             slice(*spans[comm.rank])))
    for pair, rows in ((ranks[:2], slice(0, 6)), (ranks[2:], slice(6, 12))):
        whole = run_bn(problem, cpu_backend.name, {}, rows=rows)
        assert_close(np.concatenate([r["y"] for r in pair]), whole["y"], 1e-12)
        assert_close(np.concatenate([r["gx"] for r in pair]), whole["gx"], 1e-12)
        assert_close(pair[1]["running_var"], whole["running_var"], 1e-12)


def test_every_rank_refuses_a_group_batch_of_one_value(cpu_backend):
    problem = make_problem((1, 2), np.float64)

    def member(comm):
        with pytest.raises(ValueError, match="more than one value per channel.*all 3 ranks"):
            run_bn(problem, cpu_backend.name, {}, comm, slice(0, 1 if comm.rank == 1 else 0))
        return True
    assert run_ranks(3, member) == [True, True, True]


def test_every_rank_reports_non_finite_data_on_any_rank(cpu_backend):
    problem = make_problem((6, 2), np.float64)
    problem["x"][4, 1] = np.nan
    spans = bounds([3, 3])

    def member(comm):
        with pytest.raises(NonFiniteStatisticsError, match="channel.s. 1"):
            run_bn(problem, cpu_backend.name, {}, comm, slice(*spans[comm.rank]))
        return True
    assert run_ranks(2, member) == [True, True]


def test_ghost_batches_with_a_communicator_are_refused(cpu_backend):
    problem = make_problem((6, 2), np.float64)
    with pytest.raises(ValueError, match="ghost batches are local by definition"):
        run_ranks(2, lambda comm: run_bn(problem, cpu_backend.name, {"ghost_batch_size": 2},
                                         comm))


def test_comm_must_be_a_communicator(cpu_backend):
    problem = make_problem((6, 2), np.float64)
    with pytest.raises(TypeError, match="arraybn.distributed communicator"):
        run_bn(problem, cpu_backend.name, {}, comm=object())
