"""Every backend against the float64 reference of tests/reference.py: forward, backward, buffers."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arraybn
from tests import reference as ref
from tests.conftest import CPU_BACKENDS, to_backend, to_host

SHAPES = [(16, 3), (7, 5), (9, 1), (4, 3, 5, 5), (3, 1, 7, 7), (5, 4, 1, 1), (2, 3, 4, 5, 6),
          (128, 6, 26, 26)]
DTYPES = [np.float32, np.float64]


def tol(dtype):
    return dict(rtol=3e-6, atol=3e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)


def make(rng, shape, dtype, offset=0.0, scale=1.0):
    c = shape[1]
    x = (offset + scale * rng.normal(size=shape)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, size=c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    return x, gamma, beta


def channels_last(x):
    """The same values as x, stored NHWC and viewed as NCHW (a strided, non-contiguous array)."""
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return nhwc.transpose(0, x.ndim - 1, *range(1, x.ndim - 1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["full", "mean_only"])
def test_training_forward_backward_and_buffers_match_reference(backend, rng, shape, dtype, variant):
    x, gamma, beta = make(rng, shape, dtype)
    gy = rng.normal(size=shape).astype(dtype)
    c = shape[1]
    rm0, rv0 = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 2, size=c).astype(np.float32)
    rm, rv = to_backend(backend, rm0.copy(), rv0.copy())
    mean_only = variant == "mean_only"
    y, cache = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), running_mean=rm,
                                          running_var=rv, momentum=0.3, variant=variant,
                                          backend=backend.name)
    y_ref, mu, var = ref.bn_train(x, gamma, beta, 1e-5, mean_only)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(to_host(y), y_ref, **tol(dtype))
    m = x.size // c
    np.testing.assert_allclose(to_host(rm), 0.7 * rm0 + 0.3 * mu, rtol=1e-6, atol=1e-7)
    rv_expected = rv0 if mean_only else 0.7 * rv0 + 0.3 * var * m / (m - 1)
    np.testing.assert_allclose(to_host(rv), rv_expected, rtol=1e-6, atol=1e-7)
    gx, ggamma, gbeta = arraybn.batch_norm_backward(to_backend(backend, gy), cache)
    gx_ref, gg_ref, gb_ref = ref.bn_train_backward(x, gamma, gy, 1e-5, mean_only)
    assert gx.dtype == dtype and ggamma.dtype == dtype
    scale = max(1.0, np.abs(gx_ref).max())
    np.testing.assert_allclose(to_host(gx), gx_ref, rtol=tol(dtype)["rtol"] * 10,
                               atol=tol(dtype)["atol"] * 10 * scale)
    np.testing.assert_allclose(to_host(ggamma), gg_ref, rtol=1e-5 if dtype == np.float32 else 1e-10,
                               atol=1e-4 if dtype == np.float32 else 1e-9)
    np.testing.assert_allclose(to_host(gbeta), gb_ref, rtol=1e-5 if dtype == np.float32 else 1e-10,
                               atol=1e-4 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["full", "mean_only"])
@pytest.mark.parametrize("frozen", [False, True])
def test_inference_and_frozen_use_running_statistics_and_update_nothing(backend, rng, dtype,
                                                                         variant, frozen):
    x, gamma, beta = make(rng, (6, 4, 3, 3), dtype)
    rm0, rv0 = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    rm, rv = to_backend(backend, rm0.copy(), rv0.copy())
    y, cache = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), training=frozen,
                                          frozen=frozen, running_mean=rm, running_var=rv,
                                          variant=variant, backend=backend.name)
    mean_only = variant == "mean_only"
    np.testing.assert_allclose(to_host(y), ref.bn_infer(x, gamma, beta, rm0, rv0, 1e-5, mean_only),
                               **tol(dtype))
    np.testing.assert_array_equal(to_host(rm), rm0)
    np.testing.assert_array_equal(to_host(rv), rv0)
    gy = rng.normal(size=x.shape).astype(dtype)
    gx, ggamma, gbeta = arraybn.batch_norm_backward(to_backend(backend, gy), cache)
    inv = np.ones(4) if mean_only else 1 / np.sqrt(rv0 + 1e-5)
    xhat = (x - rm0[:, None, None]) * inv[:, None, None]
    np.testing.assert_allclose(to_host(gx), gy * (gamma * inv)[:, None, None], **tol(dtype))
    np.testing.assert_allclose(to_host(ggamma), (gy * xhat).sum(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(to_host(gbeta), gy.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ghost", [2, 3, 4, 10])
@pytest.mark.parametrize("variant", ["full", "mean_only"])
def test_ghost_batches_normalize_each_group_and_update_buffers_in_order(backend, rng, ghost,
                                                                         variant):
    x, gamma, beta = make(rng, (10, 3, 4, 4), np.float64)
    rm, rv = to_backend(backend, np.zeros(3), np.ones(3))
    y, _ = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), running_mean=rm,
                                      running_var=rv, variant=variant, ghost_batch_size=ghost,
                                      backend=backend.name)
    mean_only = variant == "mean_only"
    np.testing.assert_allclose(to_host(y), ref.bn_ghost(x, gamma, beta, 1e-5, ghost, mean_only),
                               rtol=1e-12, atol=1e-12)
    rm_ref, rv_ref = np.zeros(3), np.ones(3)
    for part in np.array_split(x, -(-10 // ghost)):
        _, mu, var = ref.bn_train(part, gamma, beta, 1e-5)
        m = part.size // 3
        rm_ref = 0.9 * rm_ref + 0.1 * mu
        rv_ref = rv_ref if mean_only else 0.9 * rv_ref + 0.1 * var * m / (m - 1)
    np.testing.assert_allclose(to_host(rm), rm_ref, rtol=1e-12)
    np.testing.assert_allclose(to_host(rv), rv_ref, rtol=1e-12)


@pytest.mark.parametrize("running", ["near", "far"])
def test_batch_renorm_matches_reference_with_and_without_clipping(backend, rng, running):
    x, gamma, beta = make(rng, (8, 3, 5, 5), np.float64, offset=1.0)
    rm0 = np.full(3, 1.0) if running == "near" else np.array([50.0, -50.0, 0.0])
    rv0 = np.full(3, 1.2) if running == "near" else np.array([1e4, 1e-4, 1.0])
    rm, rv = to_backend(backend, rm0.copy(), rv0.copy())
    y, _ = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), running_mean=rm,
                                      running_var=rv, renorm=True, rmax=2.0, dmax=1.5,
                                      backend=backend.name)
    np.testing.assert_allclose(to_host(y), ref.bn_renorm(x, gamma, beta, rm0, rv0, 1e-5, 2.0, 1.5),
                               rtol=1e-12, atol=1e-12)
    mu, var = ref.moments(x)        # the buffers take the batch statistics, as in full BN
    m = x.size // 3
    np.testing.assert_allclose(to_host(rm), 0.9 * rm0 + 0.1 * mu, rtol=1e-12)
    np.testing.assert_allclose(to_host(rv), 0.9 * rv0 + 0.1 * var * m / (m - 1), rtol=1e-12)


def test_renorm_equals_full_bn_when_running_statistics_equal_the_batch(backend, rng):
    x, gamma, beta = make(rng, (8, 3, 5), np.float64)
    _, mu, var = ref.bn_train(x, gamma, beta, 1e-5)
    rm, rv = to_backend(backend, mu.copy(), var.copy())
    y, cache = arraybn.batch_norm_forward(*to_backend(backend, x, gamma, beta), running_mean=rm,
                                          running_var=rv, renorm=True, backend=backend.name)
    np.testing.assert_allclose(to_host(y), ref.bn_train(x, gamma, beta, 1e-5)[0], rtol=1e-12,
                               atol=1e-12)
    gy = rng.normal(size=x.shape)
    gx = arraybn.batch_norm_backward(to_backend(backend, gy), cache)[0]
    np.testing.assert_allclose(to_host(gx), ref.bn_train_backward(x, gamma, gy, 1e-5)[0],
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(backend, rng, layout, dtype):
    x, gamma, beta = make(rng, (6, 4, 5, 7), dtype)
    view = channels_last(x) if layout == "channels_last" else np.repeat(x, 2, axis=3)[..., ::2]
    assert not view.flags.c_contiguous and np.array_equal(view, x)
    y, cache = arraybn.batch_norm_forward(*to_backend(backend, view, gamma, beta),
                                          backend=backend.name)
    np.testing.assert_allclose(to_host(y), ref.bn_train(x, gamma, beta, 1e-5)[0], **tol(dtype))
    gy = rng.normal(size=x.shape).astype(dtype)
    gx = arraybn.batch_norm_backward(to_backend(backend, channels_last(gy)), cache)[0]
    np.testing.assert_allclose(to_host(gx), ref.bn_train_backward(x, gamma, gy, 1e-5)[0],
                               rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("shape", [(64, 4), (16, 3, 9, 9)])
def test_large_offset_float32_keeps_an_accurate_variance(backend, rng, shape):
    x = (1e4 + rng.normal(size=shape)).astype(np.float32)
    c = shape[1]
    rm, rv = to_backend(backend, np.zeros(c, np.float32), np.ones(c, np.float32))
    y, _ = arraybn.batch_norm_forward(to_backend(backend, x), None, None, running_mean=rm,
                                      running_var=rv, momentum=1.0, backend=backend.name)
    y_ref, mu, var = ref.bn_train(x, np.ones(c), np.zeros(c), 1e-5)
    assert np.isfinite(to_host(y)).all()
    np.testing.assert_allclose(to_host(y), y_ref, rtol=3e-6, atol=3e-6)
    m = x.size // c
    np.testing.assert_allclose(to_host(rv), var * m / (m - 1), rtol=1e-6)
    assert np.all(np.abs(to_host(rv) - 1) < 0.5)


def test_affine_none_gives_none_gradients(backend, rng):
    x, gy = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    y, cache = arraybn.batch_norm_forward(to_backend(backend, x), None, None, backend=backend.name)
    gx, ggamma, gbeta = arraybn.batch_norm_backward(to_backend(backend, gy), cache)
    assert ggamma is None and gbeta is None
    ones, zeros = np.ones(2), np.zeros(2)
    np.testing.assert_allclose(to_host(y), ref.bn_train(x, ones, zeros, 1e-5)[0], **tol(x.dtype))
    np.testing.assert_allclose(to_host(gx), ref.bn_train_backward(x, ones, gy, 1e-5)[0],
                               rtol=1e-10, atol=1e-10)


def test_outputs_in_the_input_dtype_with_float64_parameters(backend, rng):
    x = to_backend(backend, rng.normal(size=(5, 2, 3)).astype(np.float32))
    g, b = to_backend(backend, np.ones(2), np.zeros(2))
    y, cache = arraybn.batch_norm_forward(x, g, b, backend=backend.name)
    gx, gg, gb = arraybn.batch_norm_backward(y.astype(np.float64), cache)
    assert y.dtype == np.float32 and gx.dtype == np.float32 and gg.dtype == np.float64


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(8, 3), (4, 2, 3, 3), (3, 5, 7)]), seed=st.integers(0, 2**16),
       log_a=st.floats(-3, 3), b=st.floats(-1e3, 1e3), name=st.sampled_from(CPU_BACKENDS))
def test_full_bn_output_is_invariant_to_a_positive_affine_map_per_channel(shape, seed, log_a, b,
                                                                          name):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    a = np.exp(log_a + rng.uniform(-0.5, 0.5, size=shape[1]))
    shift = b * rng.uniform(-1, 1, size=shape[1])
    bc = (1, -1) + (1,) * (len(shape) - 2)
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.normal(size=shape[1])
    # eps scales with a**2 so that the invariance is exact in real arithmetic
    y1, _ = arraybn.batch_norm_forward(x, gamma, beta, eps=1e-6, backend=name)
    y2 = np.stack([arraybn.batch_norm_forward((x * a.reshape(bc) + shift.reshape(bc))[:, [c]],
                                              gamma[[c]], beta[[c]], eps=1e-6 * a[c] ** 2,
                                              backend=name)[0][:, 0] for c in range(shape[1])], 1)
    np.testing.assert_allclose(y2, y1, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("training", [True, False])
def test_out_buffers_receive_y_and_gx(backend, rng, training):
    x, gamma, beta = make(rng, (6, 3, 4, 4), np.float32)
    gy = rng.normal(size=x.shape).astype(np.float32)
    rm, rv = to_backend(backend, np.zeros(3, np.float32), np.ones(3, np.float32))
    args = to_backend(backend, x, gamma, beta)
    kw = dict(training=training, running_mean=rm, running_var=rv, backend=backend.name)
    y_new, cache_new = arraybn.batch_norm_forward(*args, **kw)
    y_buf, gx_buf = (backend.xp.full(x.shape, np.nan, dtype=np.float32) for _ in range(2))
    rm[...], rv[...] = 0, 1
    y, cache = arraybn.batch_norm_forward(*args, **kw, out=y_buf)
    gx, _, _ = arraybn.batch_norm_backward(to_backend(backend, gy), cache, out=gx_buf)
    np.testing.assert_array_equal(to_host(y_buf), to_host(y_new))
    gx_new = arraybn.batch_norm_backward(to_backend(backend, gy), cache_new)[0]
    np.testing.assert_array_equal(to_host(gx_buf), to_host(gx_new))
    np.testing.assert_array_equal(to_host(gx), to_host(gx_new))
