"""The numba backend's one-pass SGD and Adam updates against NumPy's (the optimizers without
kernels), bit for bit: flat and per-parameter paths, their options, both float dtypes, special
values, state round trips, and the arrays they refuse."""
import numpy as np
import pytest

from arraybn.backends import available_backends, get_backend
from arraybn.nn import SGD, Adam, Parameter

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="needs numba")

SETTINGS = [(SGD, dict(momentum=0.9)), (SGD, dict(momentum=0.9, nesterov=True)),
            (SGD, dict(momentum=0.0)), (SGD, dict(momentum=0.5, weight_decay=1e-2)),
            (SGD, dict(momentum=0.7, nesterov=True, weight_decay=3e-3)),
            (Adam, dict()), (Adam, dict(betas=(0.5, 0.9), eps=1e-3)),
            (Adam, dict(weight_decay=1e-2)), (Adam, dict(betas=(0.0, 0.0)))]
KERNEL = {SGD: "sgd_update", Adam: "adam_update"}


def _ops():
    return get_backend("numba").conv_ops()


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(f"p{i}", (rng.standard_normal(shape) * 3).astype(dtype))
            for i, shape in enumerate([(5, 3), (7,), (2, 3, 4)])]


def _set_grads(params, step, special=False):
    for i, p in enumerate(params):
        g = np.random.default_rng([step, i]).standard_normal(p.data.shape) * 10 ** (i - 1)
        if special and i == 0:                      # zeros of both signs, tiny, huge, inf, NaN
            g.flat[:7] = [0.0, -0.0, 1e-40, -3e38, np.inf, -np.inf, np.nan][:7]
        p.grad = g.astype(p.data.dtype)


def _same_steps(pairs, steps, special=False):
    """For each step: the same gradients into both optimizers' parameters, a step of each, and
    every parameter equal bit for bit afterwards. ``pairs``: ((optimizer, params), ...)."""
    (opt, params), (ref, ref_params) = pairs
    for step in steps:
        _set_grads(params, step, special)
        _set_grads(ref_params, step, special)
        with np.errstate(all="ignore"):
            opt.step()
            ref.step()
        for a, b in zip(params, ref_params):
            assert a.data.dtype == b.data.dtype
            np.testing.assert_array_equal(a.data.view(np.uint8), b.data.view(np.uint8))


def _spied(opt):
    """Count the optimizer's kernel calls: returns the list that gets one entry a call."""
    calls, name = [], KERNEL[type(opt)]
    ops, kernel = _ops(), getattr(opt._ops, name)
    opt._ops = type("Spy", (), {f"{name}_applies": staticmethod(getattr(ops, f"{name}_applies")),
                                name: staticmethod(lambda *a: calls.append(1) or kernel(*a))})
    return calls


def _kernel_steps_match(pair, ref_pair, steps, special=False):
    """``_same_steps`` with the optimizer's kernel counted: it ran, and the state (momentum,
    averages) equals the reference's too."""
    calls = _spied(pair[0])
    _same_steps((pair, ref_pair), steps, special)
    assert calls
    for key, value in ref_pair[0].state_dict().items():
        np.testing.assert_array_equal(pair[0].state_dict()[key], value, err_msg=key)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("kind, options", SETTINGS)
def test_steps_with_the_kernel_equal_numpys_bit_for_bit(dtype, flat, kind, options):
    params, ref_params = _params(dtype), _params(dtype)
    opt, ref = kind(params, 0.37, ops=_ops(), **options), kind(ref_params, 0.37, **options)
    assert opt._ops is not None and ref._ops is None
    if not flat:
        opt._flat = ref._flat = None
    _kernel_steps_match((opt, params), (ref, ref_params), range(4))
    assert params[0].data.dtype == dtype


@pytest.mark.parametrize("kind", [SGD, Adam])
def test_special_values_give_numpys_bits(kind):
    params, ref_params = _params(np.float32), _params(np.float32)
    opt, ref = kind(params, 0.01, ops=_ops()), kind(ref_params, 0.01)
    _kernel_steps_match((opt, params), (ref, ref_params), range(3), special=True)
    assert np.isnan(params[0].data).any()


@pytest.mark.parametrize("kind", [SGD, Adam])
def test_a_loaded_state_continues_as_numpys_does(kind):
    params, ref_params = _params(np.float32), _params(np.float32)
    opt, ref = kind(params, 0.1, ops=_ops()), kind(ref_params, 0.1)
    _set_grads(ref_params, 0)
    ref.step()
    opt.load_state_dict(ref.state_dict())
    for p, r in zip(params, ref_params):
        p.data[...] = r.data
    _same_steps(((opt, params), (ref, ref_params)), (1, 2))


def test_the_kernels_refuse_what_they_do_not_cover():
    ops = _ops()
    x = np.ones(6, np.float32)
    for applies, state in ((ops.sgd_update_applies, (x.copy(),)),
                           (ops.adam_update_applies, (x.copy(), x.copy()))):
        none = (None,) * len(state)
        assert applies(x, x.copy(), *none) and applies(x, x.copy(), *state)
        assert not applies(x, x.astype(np.float64), *none)               # mixed dtypes
        assert not applies(x, x[:3].copy(), *none)                       # shapes differ
        assert not applies(x.astype(np.int32), x.astype(np.int32), *none)
        assert not applies(np.ones(12, np.float32)[::2], x, *none)        # strided
        assert not applies(x, x.copy(), *(np.ones(5, np.float32),) * len(state))
        assert not applies(x.tolist(), x, *none)
    assert not ops.adam_update_applies(x, x.copy(), x.copy(), None)      # one average only


@pytest.mark.parametrize("kind", [SGD, Adam])
def test_without_the_kernels_the_optimizers_run_numpy(kind):
    assert kind(_params(np.float32), 0.1, ops=None)._ops is None
    assert kind(_params(np.float32), 0.1, ops=object())._ops is None
