"""The 4 backend kernels of every CPU backend against float64 formulas written out here.

float32 outputs must be the float64 result rounded once (within 2 ulp); float64 outputs and all
per-channel statistics must agree to ~1e-12 of the magnitude of the terms that make them up.
"""
import copy
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arraybn
from arraybn.backends import BackendUnavailableError
from tests.reference import moments as ref_moments

# (N, C, M): dense, tiny, one channel, one value per row, rows longer than the 128 lanes, rows
# longer than the 16384-value statistics chunks of the numba kernels (chunks of 4 rows, then 1),
# LeNet's conv layers (128x6x676: 24-row chunks, the last one ends mid-batch).
SHAPES = [(128, 120, 1), (7, 5, 1), (9, 1, 1), (4, 3, 25), (3, 1, 49), (2, 3, 5000),
          (5, 2, 20000), (50, 2, 100), (5, 70, 3), (128, 6, 676), (128, 16, 121)]
DTYPES = [np.float32, np.float64]
EPS = 1e-5
REL = 1e-12                     # float64 agreement, relative to the magnitude of the terms


def each_path(be):
    """``be``, or for numba two copies: one that always runs on the calling thread, one that shares
    even the smallest input out among its threads, so both code paths meet every case."""
    if be.name != "numba":
        return [be]
    paths = []
    for min_size in (np.inf, 0):
        path = copy.copy(be)
        path.parallel_min_size = min_size
        paths.append(path)
    return paths


def numba_backend():
    try:
        return arraybn.get_backend("numba")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


# ----------------------------------------------------------------------------- reference

def col(v):
    return np.asarray(v, np.float64)[None, :, None]


def ref_centered_affine(x3, center, a, b):
    """(a * (x - center) + b, the magnitude of its terms), float64."""
    xc = x3.astype(np.float64) - col(center)
    magnitude = np.abs(col(a)) * (np.abs(x3) + np.abs(col(center))) + np.abs(col(b))
    return col(a) * xc + col(b), magnitude


def ref_backward(gy3, x3, mean, scale, w, centered):
    """(gx, its magnitude, sum_gy, sum_gy_xc, magnitudes of both sums), float64."""
    gy = gy3.astype(np.float64)
    xc = x3.astype(np.float64) - col(mean)
    m = x3.shape[0] * x3.shape[2]
    sum_gy, sum_gy_xc = gy.sum(axis=(0, 2)), (gy * xc).sum(axis=(0, 2))
    sums_mag = np.abs(gy).sum(axis=(0, 2)), np.abs(gy * xc).sum(axis=(0, 2))
    if not centered:
        return col(scale) * gy, np.abs(col(scale) * gy), sum_gy, sum_gy_xc, sums_mag
    k_gy, k_xc = col(sum_gy / m), col(w * sum_gy_xc / m)
    gx = col(scale) * (gy - k_gy - k_xc * xc)
    mag = np.abs(col(scale)) * (np.abs(gy) + np.abs(k_gy)
                                + np.abs(k_xc) * (np.abs(x3) + np.abs(col(mean))))
    return gx, mag, sum_gy, sum_gy_xc, sums_mag


def assert_rounded_once(out, ref, magnitude, dtype):
    """out == ref rounded to dtype, within 2 ulp for float32; float64 to REL of the magnitude."""
    assert out.dtype == dtype and out.shape == ref.shape
    allowed = REL * magnitude
    if dtype == np.float32:
        allowed = allowed + 2 * np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    err = np.abs(out.astype(np.float64) - ref)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(err - allowed), err.shape))
    assert np.all(err <= allowed), (f"error {err[worst]:.3g} > allowed {allowed[worst]:.3g} "
                                    f"at {worst}")


def assert_stat(value, ref, magnitude):
    assert value.dtype == np.float64 and value.shape == ref.shape
    np.testing.assert_array_less(np.abs(value - ref), REL * magnitude + 1e-300)


def data(rng, shape, dtype, offset=0.0):
    return (offset + rng.normal(size=shape)).astype(dtype)


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


def channel_params(rng, channels):
    return rng.uniform(0.5, 2.0, channels), rng.normal(size=channels)


# ----------------------------------------------------------------------------- the 4 kernels

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments(cpu_backend, rng, shape, dtype):
    x3 = data(rng, shape, dtype, offset=3.0)
    ref_mean, ref_var = ref_moments(x3)
    for be in each_path(cpu_backend):
        mean, var = be.moments(x3)
        assert_stat(mean, ref_mean, np.abs(x3).mean(axis=(0, 2)))
        assert_stat(var, ref_var, ref_var)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center_only", [False, True])
@pytest.mark.parametrize("give_out", [False, True])
def test_forward_train(cpu_backend, rng, shape, dtype, center_only, give_out):
    x3 = data(rng, shape, dtype, offset=-2.0)
    gamma, beta = channel_params(rng, shape[1])
    ref_mean, ref_var = ref_moments(x3)
    a = gamma if center_only else gamma / np.sqrt(ref_var + EPS)
    for be in each_path(cpu_backend):
        out = poisoned(shape, dtype) if give_out else None
        y3, mean, var = be.forward_train(x3, gamma, beta, EPS, center_only, out=out)
        assert y3 is out or not give_out
        assert_stat(mean, ref_mean, np.abs(x3).mean(axis=(0, 2)))
        assert_stat(var, ref_var, ref_var)
        assert_rounded_once(y3, *ref_centered_affine(x3, ref_mean, a, beta), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("give_out", [False, True])
def test_affine(cpu_backend, rng, shape, dtype, give_out):
    x3 = data(rng, shape, dtype)
    a, b = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    for be in each_path(cpu_backend):
        out = poisoned(shape, dtype) if give_out else None
        y3 = be.affine(x3, a, b, out=out)
        assert y3 is out or not give_out
        assert_rounded_once(y3, *ref_centered_affine(x3, np.zeros(shape[1]), a, b), dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("give_out", [False, True])
def test_backward(cpu_backend, rng, shape, dtype, centered, give_out):
    x3, gy3 = data(rng, shape, dtype, offset=1.5), data(rng, shape, dtype)
    mean = ref_moments(x3)[0] + rng.normal(scale=1e-3, size=shape[1])  # any centre must work
    scale, w = channel_params(rng, shape[1])[0], rng.uniform(0.1, 1.0, shape[1])
    gx, mag, ref_sum_gy, ref_sum_gy_xc, (mag_gy, mag_gy_xc) = ref_backward(
        gy3, x3, mean, scale, w, centered)
    for be in each_path(cpu_backend):
        out = poisoned(shape, dtype) if give_out else None
        gx3, sum_gy, sum_gy_xc = be.backward(gy3, x3, mean, scale, w, centered, out=out)
        assert gx3 is out or not give_out
        assert_stat(sum_gy, ref_sum_gy, mag_gy)
        assert_stat(sum_gy_xc, ref_sum_gy_xc, mag_gy_xc)
        assert_rounded_once(gx3, gx, mag, dtype)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), c=st.integers(1, 9), m=st.integers(1, 600),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_forward_and_backward_on_random_shapes(n, c, m, dtype, seed):
    rng = np.random.default_rng(seed)
    for name in ("numpy", "numba"):
        if name not in arraybn.available_backends():
            continue
        be = arraybn.get_backend(name)
        x3, gy3 = data(rng, (n, c, m), dtype, offset=5.0), data(rng, (n, c, m), dtype)
        gamma, beta = channel_params(rng, c)
        y3, mean, var = be.forward_train(x3, gamma, beta, EPS)
        ref_mean, ref_var = ref_moments(x3)
        assert_stat(var, ref_var, ref_var)
        assert_rounded_once(y3, *ref_centered_affine(x3, ref_mean, gamma / np.sqrt(ref_var + EPS),
                                                     beta), dtype)
        inv_std = 1 / np.sqrt(var + EPS)
        gx3, _, _ = be.backward(gy3, x3, mean, gamma * inv_std, inv_std**2, True)
        gx, mag = ref_backward(gy3, x3, mean, gamma * inv_std, inv_std**2, True)[:2]
        assert_rounded_once(gx3, gx, mag, dtype)


@pytest.mark.parametrize("buffer_dtype", DTYPES)
@pytest.mark.parametrize("with_var", [True, False])
def test_finish_statistics(cpu_backend, rng, buffer_dtype, with_var):
    """inv_std and PyTorch's running update (unbiased variance), in float64, rounded once."""
    mean, var = rng.normal(size=5), rng.uniform(0.1, 2.0, 5)
    rm0, rv0 = rng.normal(size=5).astype(buffer_dtype), rng.uniform(1, 2, 5).astype(buffer_dtype)
    rm, rv = rm0.copy(), rv0.copy()
    finite, inv_std = cpu_backend.finish_statistics(mean, var, EPS, 0.3, 8, rm,
                                                    rv if with_var else None)
    assert finite
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(var + EPS), rtol=1e-15)
    expected_rm = 0.7 * rm0.astype(np.float64) + 0.3 * mean
    expected_rv = 0.7 * rv0.astype(np.float64) + 0.3 * var * 8 / 7
    ulp = np.finfo(buffer_dtype).eps          # numba may fuse a multiply-add: one rounding less
    np.testing.assert_allclose(rm, expected_rm.astype(buffer_dtype), rtol=ulp, atol=0)
    if with_var:
        np.testing.assert_allclose(rv, expected_rv.astype(buffer_dtype), rtol=ulp, atol=0)
    else:
        np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_finish_statistics_with_non_finite_statistics_changes_nothing(cpu_backend, rng, poison):
    mean, var = rng.normal(size=4), rng.uniform(0.1, 2.0, 4)
    var[2] = poison
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    assert cpu_backend.finish_statistics(mean, var, EPS, 0.1, 10, rm, rv) == (False, None)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


@pytest.mark.parametrize("shape", [(128, 120, 1), (50, 2, 100), (3, 2, 5000)])
@pytest.mark.parametrize("center_only", [False, True])
def test_forward_train_finish_is_forward_train_then_finish_statistics(cpu_backend, rng, shape,
                                                                     center_only):
    """The fused training step gives exactly what its two parts give, on every code path."""
    x3 = data(rng, shape, np.float32, offset=3.0)
    gamma, beta = channel_params(rng, shape[1])
    for be in each_path(cpu_backend):
        rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1])
        y3, mean, var, inv_std = be.forward_train_finish(x3, gamma, beta, EPS, center_only, 0.2,
                                                         rm, None if center_only else rv)
        rm2, rv2 = np.zeros(shape[1], np.float32), np.ones(shape[1])
        parts = be.forward_train(x3, gamma, beta, EPS, center_only)
        finite, inv_std2 = be.finish_statistics(parts[1], parts[2], EPS, 0.2,
                                                shape[0] * shape[2], rm2,
                                                None if center_only else rv2)
        assert finite
        for fused, apart in zip((y3, mean, var, inv_std, rm, rv), (*parts, inv_std2, rm2, rv2)):
            np.testing.assert_array_equal(fused, apart)
        if center_only:
            np.testing.assert_array_equal(rv, 1)


def test_forward_train_finish_with_non_finite_data_leaves_the_buffers_alone(cpu_backend, rng):
    x3 = data(rng, (6, 3, 4), np.float64)
    x3[2, 1, 3] = np.nan
    for be in each_path(cpu_backend):
        rm, rv = np.zeros(3), np.ones(3, np.float32)
        y3, mean, var, inv_std = be.forward_train_finish(x3, np.ones(3), np.zeros(3), EPS, False,
                                                         0.1, rm, rv)
        assert inv_std is None and np.isnan(mean[1]) and np.isfinite(mean[[0, 2]]).all()
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("shape", [(256, 3, 1), (64, 3, 300)])
def test_float32_data_with_a_large_offset_keeps_its_variance(cpu_backend, rng, shape):
    """1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 would lose every digit here."""
    x3 = data(rng, shape, np.float32, offset=1e4)
    ref_mean, ref_var = ref_moments(x3)
    assert 0.8 < ref_var.min() and ref_var.max() < 1.2
    y_ref, _ = ref_centered_affine(x3, ref_mean, 1 / np.sqrt(ref_var + EPS), np.zeros(3))
    for be in each_path(cpu_backend):
        y3, *stats = be.forward_train(x3, np.ones(3), np.zeros(3), EPS)
        for mean, var in (be.moments(x3), stats):
            assert_stat(mean, ref_mean, ref_mean)
            assert_stat(var, ref_var, ref_var)
        assert_rounded_once(y3, y_ref, np.abs(y_ref), np.float32)


# dense; short rows in one block serially but two on two threads; short rows whose thread ranges
# cut the 1 MiB blocks elsewhere than the serial run does (blocks of 4 channels: 0-4, 4-6, 6-10,
# 10-13 vs 0-4, 4-8, ...); long rows; a long channel
@pytest.mark.parametrize("shape", [(16, 70, 1), (40, 9, 25), (512, 13, 121), (8, 5, 300),
                                   (3, 2, 5000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_results_do_not_depend_on_the_thread_count(rng, shape, dtype):
    be = each_path(numba_backend())[1]           # shares out even small inputs
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba was started with one thread")
    x3, gy3 = data(rng, shape, dtype, offset=7.0), data(rng, shape, dtype)
    gamma, beta = channel_params(rng, shape[1])
    scale, w = channel_params(rng, shape[1])[0], rng.uniform(0.1, 1, shape[1])
    mean = ref_moments(x3)[0]
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):          # 1: the serial path; 2: blocks of channels per thread
            numba.set_num_threads(threads)
            results.append([*be.moments(x3), *be.forward_train(x3, gamma, beta, EPS),
                            be.affine(x3, gamma, beta),
                            *be.backward(gy3, x3, mean, scale, w, True)])
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


# ----------------------------------------------------------------------------- numba's checks

def test_numba_rejects_what_its_kernels_cannot_take(rng):
    be = numba_backend()
    x3 = data(rng, (4, 3, 5), np.float32)
    with pytest.raises(TypeError, match="C-contiguous float32/float64"):
        be.moments(x3[:, :, ::2])
    with pytest.raises(TypeError, match="float32/float64"):
        be.moments(x3.astype(np.float16))
    with pytest.raises(ValueError, match=r"out must be .*float32 array of shape \(4, 3, 5\)"):
        be.affine(x3, np.ones(3), np.zeros(3), out=np.empty((4, 3, 5), np.float64))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        be.forward_train(x3, np.ones(2), np.zeros(3), EPS)
    with pytest.raises(ValueError, match="gy3 .* must match x3"):
        be.backward(x3.astype(np.float64), x3, np.zeros(3), np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match=r"running_var must be a writeable .* shape \(3,\)"):
        be.finish_statistics(np.zeros(3), np.ones(3), EPS, 0.1, 8, None, np.ones(2))
    with pytest.raises(ValueError, match=r"var must have shape \(3,\)"):
        be.finish_statistics(np.zeros(3), np.ones(4), EPS, 0.1, 8)


_FROM_CACHE_SCRIPT = """
import copy, numpy as np, arraybn
be = arraybn.get_backend("numba")
for dtype in (np.float32, np.float64):
    x3 = np.random.default_rng(0).standard_normal((64, 4, 300)).astype(dtype)
    for min_size in (np.inf, 0):                    # the serial and the parallel kernels
        path = copy.copy(be)
        path.parallel_min_size = min_size
        rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
        y3, mean, var, inv_std = path.forward_train_finish(x3, np.ones(4), np.zeros(4), 1e-5,
                                                           False, 0.1, rm, rv)
        path.backward(x3, x3, mean, inv_std, inv_std ** 2, True)
        path.affine(x3, inv_std, -mean * inv_std)
        path.moments(x3)
print("ran")
"""


def test_numba_kernels_run_when_loaded_from_the_disk_cache():
    """Fresh processes load the kernels from Numba's disk cache, which in-process tests never do
    (the second run surely does). Loading is where a cached kernel that calls a parallel one can
    crash (numba/numba#8578; it did here once, order-dependently), so no kernel nests that way."""
    numba_backend()
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _FROM_CACHE_SCRIPT], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0 and "ran" in done.stdout, done.stderr[-2000:]


def test_numba_missing_is_a_readable_error(monkeypatch):
    from arraybn.backends import numba_backend as module
    monkeypatch.setitem(sys.modules, "numba", None)     # makes `import numba` fail
    with pytest.raises(BackendUnavailableError, match="pip install numba"):
        module.create()
