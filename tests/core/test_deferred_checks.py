"""Checks a GPU backend makes in its kernels and reports later, and the Backend methods behind them.

The cupy backend is driven through the CPU emulator of its kernels (``emulated``, from
test_cupy_backend): the merge kernel updates the running buffers and flags non-finite batch
statistics, the inference-coefficient kernel flags unusable running statistics, nothing is read
back until ``take_deferred_failures``, and ``raise_deferred_errors`` raises the error a CPU
backend raises at the call, named after the layer.
"""

import numpy as np
import pytest

import arraybn
from arraybn import NonFiniteStatisticsError
from arraybn.backends import cupy_backend as cb
from arraybn.backends.base import DeferredFailure
from arraybn.backends.cupy_deferred import DeferredChecks
from arraybn.backends.numpy_backend import NumpyBackend
from arraybn.core.deferred import raise_deferred_errors
from arraybn.core.validation import check_running_statistics
from tests.core.cuda_fakes import HostSyncError, _FakeArray, _fake_gpu_module, no_host_transfers
from tests.core.test_cupy_backend import emulated  # noqa: F401 (fixture)
from tests.deferring_backend import DeferringNumpyBackend


class _CupyLike:
    """An array whose type lives in a module called cupy (how arraybn recognises CuPy arrays)."""


_CupyLike.__module__ = "cupy._core.core"


# ---------------------------------------------------------------------------------------------
# owns() and the core's array-module check

def test_owns_tells_host_arrays_from_cupy_arrays_by_module_name():
    numpy_backend = arraybn.get_backend("numpy")
    assert numpy_backend.owns(np.ones(3)) and not numpy_backend.owns(_CupyLike())
    assert cb.CupyBackend.owns(None, _CupyLike()) and not cb.CupyBackend.owns(None, np.ones(3))


class _RefusingBackend(NumpyBackend):
    name = "refusing"
    foreign_array_hint = "hand it over some other way"

    def owns(self, x):
        return False


def test_the_core_asks_the_backend_whether_it_owns_x():
    x = np.ones((4, 3))
    with pytest.raises(TypeError, match="backend 'refusing' was asked for; hand it over"):
        arraybn.batch_norm_forward(x, None, None, backend=_RefusingBackend())


# ---------------------------------------------------------------------------------------------
# inference_coefficients, CPU default

def test_cpu_inference_coefficients_check_the_statistics_first(rng):
    be = arraybn.get_backend("numpy")
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    a, b, mean, scale = be.inference_coefficients(gamma, beta, rm, rv, 1e-5,
                                                  check_running_statistics)
    expected_scale = 1 / np.sqrt(rv.astype(np.float64) + 1e-5)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-15)
    np.testing.assert_allclose(a, gamma * expected_scale, rtol=1e-15)
    np.testing.assert_allclose(b, beta - rm * gamma * expected_scale, rtol=1e-14)
    assert mean.dtype == np.float64
    rv[1] = -1.0
    with pytest.raises(ValueError, match=r"negative values in channels \[1\]"):
        be.inference_coefficients(gamma, beta, rm, rv, 1e-5, check_running_statistics)
    assert be.take_deferred_failures() == []


# ---------------------------------------------------------------------------------------------
# raise_deferred_errors

class _Reporting:
    """A backend stand-in that reports given failures once."""
    xp = np

    def __init__(self, failures):
        self.failures = failures

    def take_deferred_failures(self):
        failures, self.failures = self.failures, []
        return failures


def test_deferred_non_finite_batch_statistics_raise_naming_layer_and_channel():
    mean, var = np.array([0.0, np.nan, 1.0]), np.ones(3)
    backend = _Reporting([DeferredFailure("bn2", "batch statistics", (mean, var))])
    with pytest.raises(NonFiniteStatisticsError, match=r"^bn2: non-finite batch statistics in "
                                                       r"channel\(s\) 1") as info:
        raise_deferred_errors(backend)
    assert info.value.channels == (1,)
    raise_deferred_errors(backend)                   # taken: nothing left to raise


def test_deferred_negative_running_var_is_a_value_error_naming_the_layer():
    failure = DeferredFailure("bn1", "running statistics", (np.zeros(2), np.array([1.0, -2.0])))
    with pytest.raises(ValueError, match=r"^bn1: running_var has negative values in channels \[1\]"):
        raise_deferred_errors(_Reporting([failure]))


def test_a_flagged_call_whose_values_changed_since_still_raises():
    failure = DeferredFailure(None, "batch statistics", (np.zeros(2), np.ones(2)))
    with pytest.raises(NonFiniteStatisticsError, match="have changed since"):
        raise_deferred_errors(_Reporting([failure]))


# ---------------------------------------------------------------------------------------------
# The cupy backend's kernels, emulated on the CPU

def _fake(a):
    return _FakeArray(np.ascontiguousarray(a))


@pytest.mark.parametrize("buffer_dtype", [np.float32, np.float64])
def test_training_merge_kernel_updates_every_channel_when_all_are_finite(emulated, rng,
                                                                          buffer_dtype):
    x = rng.standard_normal((8, 3, 5)) + 2.0
    rm0, rv0 = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    rm, rv = _fake(rm0.astype(buffer_dtype)), _fake(rv0.astype(buffer_dtype))
    ones, zeros = _fake(np.ones(3)), _fake(np.zeros(3))
    y, mean, var, inv_std = emulated.forward_train_finish(_fake(x), ones, zeros, 1e-5, False,
                                                          0.25, rm, rv)
    np.testing.assert_allclose(mean.get(), x.mean(axis=(0, 2)), rtol=1e-15)
    np.testing.assert_allclose(var.get(), x.var(axis=(0, 2)), rtol=1e-13)
    ref_mean, ref_var = mean.get(), var.get()      # the update from the kernel's own statistics
    start_mean, start_var = (r.astype(buffer_dtype).astype(np.float64) for r in (rm0, rv0))
    expected_mean = 0.75 * start_mean + 0.25 * ref_mean            # float64, rounded once
    expected_var = 0.75 * start_var + 0.25 * ref_var * 40 / 39
    np.testing.assert_allclose(rm.a, expected_mean, rtol=2 * np.finfo(buffer_dtype).eps)
    np.testing.assert_allclose(rv.a, expected_var, rtol=2 * np.finfo(buffer_dtype).eps)
    np.testing.assert_allclose(inv_std.get(), 1 / np.sqrt(ref_var + 1e-5), rtol=1e-12)
    assert emulated.take_deferred_failures() == []


@pytest.mark.parametrize("buffer_dtype", [np.float32, np.float64])
def test_training_merge_kernel_leaves_every_buffer_alone_when_a_channel_is_not_finite(
        emulated, rng, buffer_dtype):
    """As on the CPU: a NaN batch updates no running buffer at all, not even finite channels'."""
    x = rng.standard_normal((8, 3, 5)) + 2.0
    x[3, 1, 2] = np.nan
    rm0, rv0 = rng.standard_normal(3).astype(buffer_dtype), rng.uniform(0.5, 2, 3).astype(
        buffer_dtype)
    rm, rv = _fake(rm0.copy()), _fake(rv0.copy())        # _fake does not copy
    ones, zeros = _fake(np.ones(3)), _fake(np.zeros(3))
    with emulated.labelled("bn7"):
        y, mean, var, inv_std = emulated.forward_train_finish(_fake(x), ones, zeros, 1e-5, False,
                                                              0.25, rm, rv)
    np.testing.assert_array_equal(rm.a, rm0)
    np.testing.assert_array_equal(rv.a, rv0)
    assert np.isnan(inv_std.get()[1]) and np.isfinite(inv_std.get()[[0, 2]]).all()
    failures = emulated.take_deferred_failures()
    assert [(f.label, f.what) for f in failures] == [("bn7", "batch statistics")]
    with pytest.raises(NonFiniteStatisticsError, match=r"bn7: non-finite batch statistics in "
                                                       r"channel\(s\) 1"):
        raise_deferred_errors(_replay(failures))
    assert emulated.take_deferred_failures() == []   # the flags were cleared


def test_finish_statistics_kernel_leaves_every_buffer_alone_when_a_channel_is_not_finite(
        emulated, rng):
    mean, var = rng.standard_normal(300), rng.uniform(0.1, 3, 300)
    var[257] = np.inf                                # in the second block of 256 threads
    rm0, rv0 = rng.standard_normal(300), rng.uniform(0.5, 2, 300)
    rm, rv = _fake(rm0.copy()), _fake(rv0.copy())
    emulated.finish_statistics(_fake(mean), _fake(var), 1e-5, 0.1, 17, rm, rv)
    np.testing.assert_array_equal(rm.a, rm0)
    np.testing.assert_array_equal(rv.a, rv0)
    assert len(emulated.take_deferred_failures()) == 1


def _replay(failures):
    """The failures with NumPy views of their (fake CuPy) arrays, from a NumPy backend stand-in."""
    hosted = [DeferredFailure(f.label, f.what, tuple(None if a is None else a.get()
                                                     for a in f.arrays)) for f in failures]
    return _Reporting(hosted)


def test_finish_statistics_kernel_matches_the_cpu_backend(emulated, rng):
    mean, var = rng.standard_normal(300), rng.uniform(0.1, 3, 300)
    rm0, rv0 = rng.standard_normal(300), rng.uniform(0.5, 2, 300)
    cpu = arraybn.get_backend("numpy")
    rm_cpu, rv_cpu = rm0.copy(), rv0.copy()
    _, cpu_inv_std = cpu.finish_statistics(mean, var, 1e-5, 0.1, 17, rm_cpu, rv_cpu)
    rm, rv = _fake(rm0), _fake(rv0)
    finite, inv_std = emulated.finish_statistics(_fake(mean), _fake(var), 1e-5, 0.1, 17, rm, rv)
    assert finite is None                            # known later, not now
    np.testing.assert_allclose(inv_std.get(), cpu_inv_std, rtol=1e-15)
    np.testing.assert_allclose(rm.a, rm_cpu, rtol=1e-15)
    np.testing.assert_allclose(rv.a, rv_cpu, rtol=1e-15)
    assert emulated.take_deferred_failures() == []


@pytest.mark.parametrize("center_only", [False, True])
def test_inference_coefficient_kernel_computes_and_flags_running_statistics(emulated, rng,
                                                                           center_only):
    gamma, beta = rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    rm, rv = rng.standard_normal(5).astype(np.float32), rng.uniform(0.5, 2, 5)
    cpu = arraybn.get_backend("numpy").inference_coefficients(
        gamma, beta, rm, None if center_only else rv, 1e-5, check_running_statistics)
    gpu = emulated.inference_coefficients(_fake(gamma), _fake(beta), _fake(rm),
                                          None if center_only else _fake(rv), 1e-5, None)
    for ours, theirs in zip(gpu, cpu):
        np.testing.assert_allclose(ours.get(), theirs, rtol=1e-15)
    assert emulated.take_deferred_failures() == []
    rv[3] = -0.5
    emulated.inference_coefficients(_fake(gamma), _fake(beta), _fake(rm),
                                    None if center_only else _fake(rv), 1e-5, None)
    failures = emulated.take_deferred_failures()
    assert len(failures) == (0 if center_only else 1)   # mean_only never reads running_var


def test_flags_are_read_early_when_every_slot_is_taken():
    checks = DeferredChecks(_Xp, capacity=3)
    first = checks.slot("a", "batch statistics", ())
    checks.status.a[first] = 1
    checks.slot("b", "batch statistics", ())
    checks.slot("c", "batch statistics", ())        # full: the flags so far are read now
    assert checks.status.a.tolist() == [0, 0, 0]
    assert [f.label for f in checks.take()] == ["a"]
    assert checks.take() == []


class _Xp:
    @staticmethod
    def zeros(shape, dtype):
        return _FakeArray(np.zeros(shape, dtype))


# ---------------------------------------------------------------------------------------------
# The layer names its deferred failures

class _DeferringBackend(DeferringNumpyBackend):
    """NaN batch statistics are reported later, as the cupy backend does."""

    def forward_train_finish(self, x3, gamma, beta, eps, center_only=False, momentum=0.1,
                             running_mean=None, running_var=None, out=None):
        y, mean, var = self.forward_train(x3, gamma, beta, eps, center_only, out=out)
        if not np.isfinite(mean).all() or not np.isfinite(var).all():
            self.failures.append(DeferredFailure(self.label, "batch statistics", (mean, var)))
        return y, mean, var, 1 / np.sqrt(var + eps)


def test_batchnorm_layer_labels_its_calls_so_a_deferred_failure_names_it(rng):
    from arraybn.nn.batchnorm import BatchNorm
    backend = _DeferringBackend()
    layer = BatchNorm("bn3", 4, backend=backend)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    x[2, 3] = np.nan
    layer.forward(x, training=True)                  # no error yet: the backend defers
    with pytest.raises(NonFiniteStatisticsError, match=r"^bn3: non-finite batch statistics in "
                                                       r"channel\(s\) 3"):
        raise_deferred_errors(backend)


# ---------------------------------------------------------------------------------------------
# No host synchronisation in a BN call: the fake CuPy refuses every device-to-host transfer

def test_the_fake_cupy_refuses_every_device_to_host_transfer_inside_the_guard():
    a, xp = _fake(np.array([1.0, 2.0])), _fake_gpu_module([])
    transfers = [a.get, lambda: bool(a[0]), lambda: float(a[0]), lambda: int(a[0]),
                 a[0].item, lambda: np.asarray(a), lambda: xp.asnumpy(a)]
    for transfer in transfers:
        with no_host_transfers("the test"), pytest.raises(HostSyncError, match="during the test"):
            transfer()
        transfer()                                   # outside the guard: fine


@pytest.mark.parametrize("options", [{}, {"variant": "mean_only"}, {"ghost_batch_size": 4}],
                         ids=["full", "mean_only", "ghost"])
def test_training_forward_and_inference_on_the_cupy_backend_never_sync_with_the_host(
        emulated, rng, options):
    x = rng.standard_normal((16, 3, 4, 4)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    rm, rv = _fake(np.zeros(3)), _fake(np.ones(3))
    cpu = arraybn.get_backend("numpy")
    rm_cpu, rv_cpu = np.zeros(3), np.ones(3)
    for training in (True, False):
        with no_host_transfers("a training forward" if training else "inference"):
            y, cache = arraybn.batch_norm_forward(
                _fake(x), _fake(gamma), _fake(beta), training=training, running_mean=rm,
                running_var=rv, backend=emulated, **options)
            gx, _, _ = arraybn.batch_norm_backward(_fake(np.ones_like(x)), cache)
        y_cpu, _ = arraybn.batch_norm_forward(x, gamma, beta, training=training,
                                              running_mean=rm_cpu, running_var=rv_cpu,
                                              backend=cpu, **options)
        np.testing.assert_allclose(y.get(), y_cpu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rm.get(), rm_cpu, rtol=1e-12)
        np.testing.assert_allclose(rv.get(), rv_cpu, rtol=1e-12)
    assert emulated.take_deferred_failures() == []


def test_the_guard_catches_a_bn_call_that_does_sync(emulated, rng):
    """Batch renormalization still checks its statistics on the host (one sync per call)."""
    x = _fake(rng.standard_normal((8, 3)))
    with no_host_transfers("a renorm forward"), pytest.raises(HostSyncError):
        arraybn.batch_norm_forward(x, None, None, renorm=True, running_mean=_fake(np.zeros(3)),
                                   running_var=_fake(np.ones(3)), backend=emulated)
