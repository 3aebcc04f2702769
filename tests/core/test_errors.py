"""Bad input: a clear error that says what was wrong, and nothing damaged."""
import numpy as np
import pytest

import arraybn
from arraybn import NonFiniteStatisticsError
from arraybn.core.deferred import raise_deferred_errors
from tests import reference as ref
from tests.conftest import ALL_BACKENDS, to_backend, to_host
from tests.core.test_cupy_backend import emulated  # noqa: F401 (fixture)


def forward(be, x, **kw):
    c = x.shape[1] if x.ndim > 1 else 1
    g, b = to_backend(be, np.ones(c), np.zeros(c))
    return arraybn.batch_norm_forward(to_backend(be, x), g, b, backend=be.name, **kw)


@pytest.fixture(params=ALL_BACKENDS + ["cupy-emulated"])
def any_backend(request):
    """Every backend usable here, and the cupy backend on its CPU-emulated kernels."""
    if request.param == "cupy-emulated":
        return request.getfixturevalue("emulated")
    return arraybn.get_backend(request.param)


def forward_checked(be, x, **kw):
    """forward() on ``be``, then ``be``'s deferred checks. A CPU backend raises at the call and
    reports nothing later; the cupy backend may raise at either: the same error either way."""
    c = x.shape[1]
    g, b = to_backend(be, np.ones(c), np.zeros(c))
    result = arraybn.batch_norm_forward(to_backend(be, x), g, b, backend=be, **kw)
    assert be.name == "cupy", f"the {be.name} backend should have raised at the call"
    raise_deferred_errors(be)
    return result


@pytest.mark.parametrize("shape", [(1, 4), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_is_a_value_error(backend, shape):
    with pytest.raises(ValueError, match="more than one value per channel.*batch size > 1"):
        forward(backend, np.ones(shape))


def test_batch_of_one_works_in_inference(backend, rng):
    x, rm0, rv0 = rng.normal(size=(1, 4)), rng.normal(size=4), rng.uniform(0.5, 2, size=4)
    rm, rv = to_backend(backend, rm0, rv0)
    y, _ = forward(backend, x, training=False, running_mean=rm, running_var=rv)
    np.testing.assert_allclose(to_host(y), ref.bn_infer(x, np.ones(4), np.zeros(4), rm0, rv0, 1e-5),
                               rtol=1e-12, atol=1e-12)


def test_empty_spatial_axes_are_refused_in_training_and_pass_through_inference(backend):
    x = np.ones((4, 3, 0, 5))
    with pytest.raises(ValueError, match="more than one value per channel"):
        forward(backend, x)
    rm, rv = to_backend(backend, np.zeros(3), np.ones(3))
    y, cache = forward(backend, x, training=False, running_mean=rm, running_var=rv)
    gx, ggamma, gbeta = arraybn.batch_norm_backward(y, cache)
    assert y.shape == gx.shape == x.shape and y.dtype == gx.dtype == x.dtype
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
    x, rm0 = rng.normal(size=(4, 3)), rng.normal(size=3)
    y, _ = forward(backend, x, training=False, running_mean=to_backend(backend, rm0),
                   variant="mean_only")
    np.testing.assert_allclose(to_host(y), x - rm0, rtol=1e-12, atol=1e-12)


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
def test_non_finite_batch_statistics_raise_and_leave_the_buffers_alone(any_backend, rng,
                                                                        poison):
    backend = any_backend
    x = rng.normal(size=(8, 3, 2, 2))
    x[3, 1, 0, 1] = poison
    rm, rv = to_backend(backend, np.zeros(3), np.ones(3))
    with pytest.raises(NonFiniteStatisticsError, match=r"^non-finite batch statistics in "
                                                       r"channel\(s\) 1;") as info:
        forward_checked(backend, x, running_mean=rm, running_var=rv)
    assert info.value.channels == (1,)
    np.testing.assert_array_equal(to_host(rm), np.zeros(3))
    np.testing.assert_array_equal(to_host(rv), np.ones(3))
    located = info.value.located("bn2")
    assert str(located).startswith("bn2: non-finite batch statistics")


def test_non_finite_running_statistics_raise_in_inference(any_backend, rng):
    rm, rv = to_backend(any_backend, np.zeros(3), np.array([1.0, np.nan, 1.0]))
    with pytest.raises(NonFiniteStatisticsError, match="^non-finite running statistics"):
        forward_checked(any_backend, rng.normal(size=(4, 3)), training=False, running_mean=rm,
                        running_var=rv)


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


# ----------------------------------------------------------------------------- out= overlapping

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("overlap", ["same", "shifted"])
def test_forward_out_that_overlaps_x_is_refused_and_x_kept(backend, rng, training, overlap):
    """The cache keeps x for the backward: y written over it would give wrong gradients."""
    store = to_backend(backend, rng.normal(size=(7, 3, 2, 2)))
    x = store[:6]
    out = x if overlap == "same" else store[1:]
    before = to_host(store).copy()
    rm, rv = to_backend(backend, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="out shares memory with x.*keeps x for the backward"):
        arraybn.batch_norm_forward(x, None, None, training=training, running_mean=rm,
                                   running_var=rv, out=out, backend=backend.name)
    np.testing.assert_array_equal(to_host(store), before)
    np.testing.assert_array_equal(to_host(rm), np.zeros(3))


@pytest.mark.parametrize("target", ["gy", "x"])
def test_backward_out_that_overlaps_gy_or_the_cached_x_is_refused(backend, rng, target):
    x, gy = to_backend(backend, rng.normal(size=(6, 3, 4)), rng.normal(size=(6, 3, 4)))
    _, cache = arraybn.batch_norm_forward(x, None, None, backend=backend.name)
    before = to_host(x).copy(), to_host(gy).copy()
    with pytest.raises(ValueError, match=f"out shares memory with {target}"):
        arraybn.batch_norm_backward(gy, cache, out=gy if target == "gy" else x)
    np.testing.assert_array_equal(to_host(x), before[0])
    np.testing.assert_array_equal(to_host(gy), before[1])


# ----------------------------------------------------------------------------- parameter dtypes

@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.float16, np.complex128])
@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_parameters_must_be_float32_or_float64(backend, name, dtype):
    params = {"gamma": np.ones(3), "beta": np.zeros(3)}
    params[name] = params[name].astype(dtype)
    x = to_backend(backend, np.arange(12.0).reshape(4, 3))
    with pytest.raises(TypeError, match=f"{name} must be float32 or float64, got "
                                        f"{np.dtype(dtype).name}.*astype"):
        arraybn.batch_norm_forward(x, *to_backend(backend, params["gamma"], params["beta"]),
                                   backend=backend.name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameter_gradients_come_in_the_parameters_dtype(backend, rng, dtype):
    x, gy = to_backend(backend, rng.normal(size=(5, 3)), rng.normal(size=(5, 3)))
    g, b = to_backend(backend, np.full(3, 1.5, dtype), np.zeros(3, dtype))
    _, cache = arraybn.batch_norm_forward(x, g, b, backend=backend.name)
    _, ggamma, gbeta = arraybn.batch_norm_backward(gy, cache)
    assert ggamma.dtype == gbeta.dtype == dtype
    np.testing.assert_allclose(to_host(gbeta), to_host(gy).sum(axis=0), rtol=1e-6)


# ----------------------------------------------------------------------------- what x can be

def test_a_python_list_is_refused_with_how_to_convert(backend):
    g, b = to_backend(backend, np.ones(2), np.zeros(2))
    with pytest.raises(TypeError, match=r"x must be a NumPy or CuPy array, got list.*np\.asarray"):
        arraybn.batch_norm_forward([[1.0, 2.0], [3.0, 4.0]], g, b, backend=backend.name)
    with pytest.raises(TypeError, match=r"x must be a NumPy or CuPy array, got list"):
        arraybn.ExactStatistics(backend=backend.name).update([[1.0, 2.0], [3.0, 4.0]])


def test_a_python_list_gy_is_refused(backend, rng):
    _, cache = forward(backend, rng.normal(size=(4, 2)))
    with pytest.raises(TypeError, match=r"gy must be a NumPy or CuPy array, got list"):
        arraybn.batch_norm_backward(np.ones((4, 2)).tolist(), cache)


def test_a_torch_tensor_is_refused_with_how_to_convert(backend):
    torch = pytest.importorskip("torch")
    t = torch.ones(4, 2)
    with pytest.raises(TypeError, match=r"x is a torch tensor.*not accepted.*t\.numpy\(\)"
                                        r".*cupy\.from_dlpack\(t\)"):
        arraybn.batch_norm_forward(t, None, None, backend=backend.name)
    with pytest.raises(TypeError, match=r"x is a torch tensor"):
        arraybn.AverageStatistics(backend=backend.name).update(t)


@pytest.mark.parametrize("readonly", ["running_mean", "running_var"])
def test_a_read_only_running_buffer_is_named_and_nothing_is_updated(cpu_backend, rng, readonly):
    buffers = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    buffers[readonly].setflags(write=False)
    with pytest.raises(ValueError, match=f"{readonly} is read-only.*updated in place.*"
                                         rf"{readonly}\.copy\(\)"):
        forward(cpu_backend, rng.normal(size=(4, 3)) + 5, **buffers)
    np.testing.assert_array_equal(buffers["running_mean"], np.zeros(3))
    np.testing.assert_array_equal(buffers["running_var"], np.ones(3))


def test_a_read_only_out_is_refused(cpu_backend):
    out = np.empty((4, 3))
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        forward(cpu_backend, np.arange(12.0).reshape(4, 3), out=out)


# ----------------------------------------------------------------------------- running_var

@pytest.mark.parametrize("options", [{"training": False}, {"frozen": True}, {"renorm": True}])
def test_negative_running_var_is_refused_naming_the_channels(any_backend, rng, options):
    rm, rv = to_backend(any_backend, np.zeros(4), np.array([1.0, -0.5, 1.0, -1e-7]))
    with pytest.raises(ValueError, match=r"^running_var has negative values in channels "
                                         r"\[1, 3\]; a variance"):
        forward_checked(any_backend, rng.normal(size=(5, 4)), running_mean=rm, running_var=rv,
                        **options)


def test_nan_running_var_in_inference_names_the_channel(any_backend, rng):
    rm, rv = to_backend(any_backend, np.zeros(3), np.array([1.0, 1.0, np.nan]))
    with pytest.raises(NonFiniteStatisticsError, match=r"^non-finite running statistics in "
                                                       r"channel\(s\) 2;"):
        forward_checked(any_backend, rng.normal(size=(4, 3)), training=False, running_mean=rm,
                        running_var=rv)
