"""Bad input: a clear error that says what was wrong, and nothing damaged."""
import numpy as np
import pytest

import arraybn
from arraybn import NonFiniteStatisticsError
from tests.conftest import to_backend, to_host


def forward(be, x, **kw):
    c = x.shape[1] if x.ndim > 1 else 1
    g, b = to_backend(be, np.ones(c), np.zeros(c))
    return arraybn.batch_norm_forward(to_backend(be, x), g, b, backend=be.name, **kw)


@pytest.mark.parametrize("shape", [(1, 4), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_is_a_value_error(backend, shape):
    with pytest.raises(ValueError, match="more than one value per channel.*batch size > 1"):
        forward(backend, np.ones(shape))


def test_batch_of_one_works_in_inference(backend, rng):
    rm, rv = to_backend(backend, np.zeros(4), np.ones(4))
    y, _ = forward(backend, rng.normal(size=(1, 4)), training=False, running_mean=rm, running_var=rv)
    assert y.shape == (1, 4)


def test_empty_spatial_axes_are_refused_in_training_and_pass_through_inference(backend):
    x = np.ones((4, 3, 0, 5))
    with pytest.raises(ValueError, match="more than one value per channel"):
        forward(backend, x)
    rm, rv = to_backend(backend, np.zeros(3), np.ones(3))
    y, cache = forward(backend, x, training=False, running_mean=rm, running_var=rv)
    gx, ggamma, gbeta = arraybn.batch_norm_backward(y, cache)
    assert y.shape == gx.shape == x.shape
    np.testing.assert_array_equal(to_host(ggamma), 0)
    np.testing.assert_array_equal(to_host(gbeta), 0)


def test_ghost_batch_of_one_is_refused(backend):
    with pytest.raises(ValueError, match="ghost batch"):
        forward(backend, np.ones((4, 3)), ghost_batch_size=1)


@pytest.mark.parametrize("bad", [0, -2, 2.5])
def test_bad_ghost_batch_size(backend, bad):
    with pytest.raises(ValueError, match="ghost_batch_size"):
        forward(backend, np.ones((4, 3)), ghost_batch_size=bad)


def test_integer_input_is_a_type_error_that_says_how_to_convert(backend):
    with pytest.raises(TypeError, match="float32 or float64.*astype"):
        forward(backend, np.ones((4, 3), dtype=np.int64))


@pytest.mark.parametrize("shape", [(5,), ()])
def test_input_without_a_channel_axis(backend, shape):
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        forward(backend, np.ones(shape))


def test_gamma_of_the_wrong_size(backend):
    x, g, b = to_backend(backend, np.ones((4, 3)), np.ones(2), np.zeros(3))
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        arraybn.batch_norm_forward(x, g, b, backend=backend.name)


def test_inference_without_statistics(backend):
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        forward(backend, np.ones((4, 3)), training=False)


def test_mean_only_inference_needs_only_the_mean(backend, rng):
    rm = to_backend(backend, np.zeros(3))
    y, _ = forward(backend, rng.normal(size=(4, 3)), training=False, running_mean=rm,
                   variant="mean_only")
    assert y.shape == (4, 3)


def test_renorm_needs_running_statistics_and_the_full_variant(backend):
    with pytest.raises(ValueError, match="batch renormalization needs running_mean"):
        forward(backend, np.ones((4, 3)), renorm=True)
    rm, rv = to_backend(backend, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="variant='full'"):
        forward(backend, np.ones((4, 3)), renorm=True, running_mean=rm, running_var=rv,
                variant="mean_only")
    with pytest.raises(ValueError, match="rmax >= 1"):
        forward(backend, np.ones((4, 3)), renorm=True, running_mean=rm, running_var=rv, rmax=0.5)


@pytest.mark.parametrize("kw, match", [({"variant": "layer"}, "unknown variant"),
                                       ({"eps": 0.0}, "eps must be > 0"),
                                       ({"momentum": 1.5}, "momentum must be"),
                                       ({"momentum": None}, "momentum=None")])
def test_bad_options(backend, kw, match):
    with pytest.raises(ValueError, match=match):
        forward(backend, np.ones((4, 3)), **kw)


def test_running_buffer_of_the_wrong_shape_or_kind(backend):
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        forward(backend, np.ones((4, 3)), running_mean=to_backend(backend, np.zeros(4)))
    with pytest.raises(TypeError, match="updated in place"):
        forward(backend, np.ones((4, 3)), running_mean=[0.0, 0.0, 0.0])


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_non_finite_batch_statistics_raise_and_leave_the_buffers_alone(backend, rng, poison):
    x = rng.normal(size=(8, 3, 2, 2))
    x[3, 1, 0, 1] = poison
    rm, rv = to_backend(backend, np.zeros(3), np.ones(3))
    with pytest.raises(NonFiniteStatisticsError, match=r"channel\(s\) 1") as info:
        forward(backend, x, running_mean=rm, running_var=rv)
    assert info.value.channels == (1,)
    np.testing.assert_array_equal(to_host(rm), np.zeros(3))
    np.testing.assert_array_equal(to_host(rv), np.ones(3))
    located = info.value.located("bn2")
    assert str(located).startswith("bn2: non-finite batch statistics")


def test_non_finite_running_statistics_raise_in_inference(backend, rng):
    rm, rv = to_backend(backend, np.zeros(3), np.array([1.0, np.nan, 1.0]))
    with pytest.raises(NonFiniteStatisticsError, match="running statistics"):
        forward(backend, rng.normal(size=(4, 3)), training=False, running_mean=rm, running_var=rv)


def test_backward_checks_its_arguments(backend, rng):
    y, cache = forward(backend, rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match="gy has shape"):
        arraybn.batch_norm_backward(to_backend(backend, np.ones((4, 2))), cache)
    with pytest.raises(TypeError, match="second value returned"):
        arraybn.batch_norm_backward(y, {"x": y})


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        arraybn.get_backend("tpu")


@pytest.mark.parametrize("bad", [np.empty((4, 2)), np.empty((4, 3), np.float32),
                                 np.empty((3, 4)).T])
def test_out_of_the_wrong_shape_dtype_or_layout(backend, bad):
    with pytest.raises(ValueError, match="out must be a C-contiguous float64 array of shape"):
        forward(backend, np.ones((4, 3)), out=to_backend(backend, bad))
