"""SGD over one flat parameter array: bit-identical to a step per parameter, state round trips."""
import numpy as np
import pytest

from arraybn.nn import SGD, Parameter, build_model, softmax_cross_entropy


def _params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [Parameter(f"p{i}", rng.standard_normal(shape).astype(dtype))
            for i, shape in enumerate([(3, 2), (4,), (2, 2, 2)])]


def _per_parameter(sgd):
    sgd._flat = None                      # forces the per-parameter path (the reference)
    return sgd


def _set_grads(params, step):
    for i, p in enumerate(params):
        p.grad = np.random.default_rng([step, i]).standard_normal(p.data.shape).astype(
            p.data.dtype)


@pytest.mark.parametrize("options", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                     dict(momentum=0.0), dict(momentum=0.5, weight_decay=1e-2)])
def test_flat_steps_are_bit_identical_to_per_parameter_steps(options):
    flat_params, ref_params = _params(), _params()
    flat, ref = SGD(flat_params, 0.1, **options), _per_parameter(SGD(ref_params, 0.1, **options))
    assert flat._flat is not None
    for step in range(4):
        _set_grads(flat_params, step)
        _set_grads(ref_params, step)
        flat.step()
        ref.step()
        for a, b in zip(flat_params, ref_params):
            np.testing.assert_array_equal(a.data, b.data)
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(flat.state_dict()[key], value, err_msg=key)


def test_parameters_are_views_of_one_flat_array():
    params = _params()
    sgd = SGD(params, 0.1)
    assert all(p.data.base is sgd._flat.data for p in params)
    _set_grads(params, 0)
    grad = sgd.flat_grad()
    np.testing.assert_array_equal(grad, np.concatenate([p.grad.ravel() for p in params]))


def test_step_uses_the_flat_gradient_as_changed_in_place():
    """An all-reduce between flat_grad() and step() changes what the step applies."""
    params, ref_params = _params(), _params()
    sgd, ref = SGD(params, 0.1, momentum=0.0), SGD(ref_params, 0.1, momentum=0.0)
    _set_grads(params, 0)
    _set_grads(ref_params, 0)
    sgd.flat_grad()[...] *= 2             # e.g. the sum over two ranks with equal gradients
    for p in ref_params:
        p.grad = p.grad * 2
    sgd.step()
    ref.step()
    for a, b in zip(params, ref_params):
        np.testing.assert_array_equal(a.data, b.data)


def test_state_round_trip_continues_identically():
    a_params, b_params = _params(), _params()
    a = SGD(a_params, 0.1, momentum=0.9)
    for step in range(2):
        _set_grads(a_params, step)
        a.step()
    b = SGD(b_params, 0.1, momentum=0.9)
    for p, q in zip(b_params, a_params):
        p.data[...] = q.data
    b.load_state_dict({k: np.asarray(v) for k, v in a.state_dict().items()})
    for opt, params in ((a, a_params), (b, b_params)):
        _set_grads(params, 7)
        opt.step()
    for p, q in zip(a_params, b_params):
        np.testing.assert_array_equal(p.data, q.data)


def test_a_missing_gradient_takes_the_per_parameter_path():
    params = _params()
    sgd = SGD(params, 0.1)
    _set_grads(params, 0)
    params[1].grad = None
    kept = params[1].data.copy()
    sgd.step()
    np.testing.assert_array_equal(params[1].data, kept)
    _set_grads(params, 1)
    sgd.step()                            # momentum of p1 starts now, the others continue
    assert sgd.state_dict()["steps"] == 2


def test_a_model_trains_identically_with_flat_and_per_parameter_sgd():
    models = [build_model("lenet5", backend="numpy", seed=3, dropout=0.0) for _ in range(2)]
    opts = [SGD(models[0].parameters(), 0.05), _per_parameter(SGD(models[1].parameters(), 0.05))]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8)
    for _ in range(3):
        for model, opt in zip(models, opts):
            _, g = softmax_cross_entropy(model.forward(x), y)
            model.backward(g)
            opt.step()
    for key, value in models[1].state_dict().items():
        np.testing.assert_array_equal(models[0].state_dict()[key], value, err_msg=key)
