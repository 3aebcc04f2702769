"""The numba backend's one-pass SGD update against NumPy's (``SGD`` without kernels), bit for bit:
flat and per-parameter paths, momentum, Nesterov, weight decay, both float dtypes, state round
trips, and the arrays it refuses."""
import numpy as np
import pytest

from arraybn.backends import available_backends, get_backend
from arraybn.nn import SGD, Parameter

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="needs numba")

SETTINGS = [dict(momentum=0.9), dict(momentum=0.9, nesterov=True), dict(momentum=0.0),
            dict(momentum=0.5, weight_decay=1e-2), dict(momentum=0.7, nesterov=True,
                                                        weight_decay=3e-3)]


def _ops():
    return get_backend("numba").conv_ops()


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(f"p{i}", (rng.standard_normal(shape) * 3).astype(dtype))
            for i, shape in enumerate([(5, 3), (7,), (2, 3, 4)])]


def _set_grads(params, step):
    for i, p in enumerate(params):
        g = np.random.default_rng([step, i]).standard_normal(p.data.shape) * 10 ** (i - 1)
        p.grad = g.astype(p.data.dtype)


def _same_steps(pairs, steps):
    """For each step: the same gradients into both optimizers' parameters, a step of each, and
    every parameter equal bit for bit afterwards. ``pairs``: ((optimizer, params), ...)."""
    (sgd, params), (ref, ref_params) = pairs
    for step in steps:
        _set_grads(params, step)
        _set_grads(ref_params, step)
        sgd.step()
        ref.step()
        for a, b in zip(params, ref_params):
            np.testing.assert_array_equal(a.data, b.data)
            assert a.data.dtype == b.data.dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("options", SETTINGS)
def test_steps_with_the_kernel_equal_numpys_bit_for_bit(dtype, flat, options):
    params, ref_params = _params(dtype), _params(dtype)
    sgd, ref = SGD(params, 0.37, ops=_ops(), **options), SGD(ref_params, 0.37, **options)
    assert sgd._ops is not None and ref._ops is None
    if not flat:
        sgd._flat = ref._flat = None
    calls = []
    kernel = sgd._ops.sgd_update
    sgd._ops = type("Spy", (), {"sgd_update_applies": staticmethod(_ops().sgd_update_applies),
                                "sgd_update": staticmethod(
                                    lambda *a: calls.append(1) or kernel(*a))})
    _same_steps(((sgd, params), (ref, ref_params)), range(4))
    assert calls and params[0].data.dtype == dtype
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(sgd.state_dict()[key], value, err_msg=key)


def test_a_loaded_state_continues_as_numpys_does():
    params, ref_params = _params(np.float32), _params(np.float32)
    sgd, ref = SGD(params, 0.1, ops=_ops()), SGD(ref_params, 0.1)
    _set_grads(ref_params, 0)
    ref.step()
    sgd.load_state_dict(ref.state_dict())
    for p, r in zip(params, ref_params):
        p.data[...] = r.data
    _same_steps(((sgd, params), (ref, ref_params)), (1, 2))


def test_the_kernel_refuses_what_it_does_not_cover():
    applies = _ops().sgd_update_applies
    x = np.ones(6, np.float32)
    assert applies(x, x.copy(), None) and applies(x, x.copy(), x.copy())
    assert not applies(x, x.astype(np.float64), None)               # mixed dtypes
    assert not applies(x, x[:3].copy(), None)                       # shapes differ
    assert not applies(x.astype(np.int32), x.astype(np.int32), None)
    assert not applies(np.ones(12, np.float32)[::2], x, None)        # strided
    assert not applies(x, x.copy(), np.ones(5, np.float32))
    assert not applies(x.tolist(), x, None)


def test_without_the_kernels_sgd_runs_numpy():
    assert SGD(_params(np.float32), 0.1, ops=None)._ops is None
    assert SGD(_params(np.float32), 0.1, ops=object())._ops is None
