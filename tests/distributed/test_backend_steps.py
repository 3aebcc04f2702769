"""The Backend steps a communicator needs: center_affine, backward_sums, backward_gx.

Given this rank's own sums and count, the two backward steps must give exactly what the fused
``backward`` gives (bit for bit: same kernels, same order of additions); center_affine must be
the centred affine map in float64, rounded once.
"""
import numpy as np
import pytest

SHAPES = {"dense": (7, 5), "short rows": (6, 3, 4, 4), "rows >= SCALAR_MIN": (5, 2, 5, 8),
          "long rows": (4, 2, 12, 12)}


@pytest.fixture(params=["serial", "parallel"])
def threads(request, cpu_backend, monkeypatch):
    """Run the numba backend's kernels serially or shared out among threads."""
    if request.param == "parallel":
        if cpu_backend.name != "numba":
            pytest.skip("only the numba backend has parallel kernels")
        monkeypatch.setattr(cpu_backend, "parallel_min_size", 1)
    return request.param


def make_data(shape, dtype, seed=11):
    rng = np.random.default_rng(seed)
    x3 = rng.normal(2.0, 3.0, shape).astype(dtype).reshape(shape[0], shape[1], -1)
    gy3 = rng.normal(0.0, 1.0, x3.shape).astype(dtype)
    channels = x3.shape[1]
    coefficients = [rng.normal(0.0, 1.0, channels) for _ in range(4)]
    return x3, gy3, coefficients


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_steps_equal_the_fused_backward(cpu_backend, threads, dtype, shape):
    x3, gy3, (mean, scale, w, _) = make_data(shape, dtype)
    w = np.abs(w)
    gx, sum_gy, sum_gy_xc = cpu_backend.backward(gy3, x3, mean, scale, w, True)
    steps_gy, steps_gy_xc = cpu_backend.backward_sums(gy3, x3, mean)
    np.testing.assert_array_equal(steps_gy, sum_gy)
    np.testing.assert_array_equal(steps_gy_xc, sum_gy_xc)
    out = np.empty_like(x3)
    steps_gx = cpu_backend.backward_gx(gy3, x3, mean, scale, w, sum_gy, sum_gy_xc,
                                       x3.shape[0] * x3.shape[2], out=out)
    assert steps_gx is out
    np.testing.assert_array_equal(steps_gx, gx)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_center_affine_is_the_centred_map_rounded_once(cpu_backend, threads, dtype, shape):
    x3, _, (center, a, b, _) = make_data(shape, dtype)
    y3 = cpu_backend.center_affine(x3, center, a, b)
    expected = (x3.astype(np.float64) - center[None, :, None]) * a[None, :, None] \
        + b[None, :, None]
    assert y3.dtype == dtype and y3.shape == x3.shape
    tolerance = 2 * np.finfo(dtype).eps * np.abs(expected).max()     # one rounding, FMA or not
    np.testing.assert_allclose(y3, expected, rtol=0, atol=tolerance)


def test_center_affine_loses_no_digits_on_offset_data(cpu_backend):
    rng = np.random.default_rng(5)
    x3 = 1e8 + rng.normal(0.0, 1.0, (64, 2, 3))
    center, a = x3.mean(axis=(0, 2)), np.array([1 / 3, 3 / 7])
    y3 = cpu_backend.center_affine(x3, center, a, np.zeros(2))
    # x - center is exact here; a * x - a * center would lose 8 digits to cancellation
    np.testing.assert_array_equal(y3, (x3 - center[None, :, None]) * a[None, :, None])


def test_backward_gx_uses_the_count_it_is_given(cpu_backend):
    """The group's count, not this rank's N * M, divides the sums."""
    x3, gy3, (mean, scale, w, _) = make_data((6, 2, 3), np.float64)
    sum_gy, sum_gy_xc = np.array([4.0, -2.0]), np.array([1.0, 3.0])
    gx = cpu_backend.backward_gx(gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, 1000)
    col = lambda v: v[None, :, None]                               # noqa: E731
    expected = col(scale) * (gy3 - col(sum_gy / 1000)
                             - col(w * sum_gy_xc / 1000) * (x3 - col(mean)))
    np.testing.assert_allclose(gx, expected, rtol=1e-14, atol=1e-15)
