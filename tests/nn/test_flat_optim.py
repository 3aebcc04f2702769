"""SGD and Adam over one flat parameter array: bit-identical to a step per parameter, state
round trips."""
import numpy as np
import pytest

from arraybn.nn import SGD, Adam, Parameter, build_model, softmax_cross_entropy

OPTIMIZERS = [(SGD, dict(momentum=0.9)), (SGD, dict(momentum=0.9, nesterov=True)),
              (SGD, dict(momentum=0.0)), (SGD, dict(momentum=0.5, weight_decay=1e-2)),
              (Adam, dict()), (Adam, dict(betas=(0.5, 0.9), weight_decay=1e-2))]


def _params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [Parameter(f"p{i}", rng.standard_normal(shape).astype(dtype))
            for i, shape in enumerate([(3, 2), (4,), (2, 2, 2)])]


def _per_parameter(opt):
    opt._flat = None                      # forces the per-parameter path (the reference)
    return opt


def _set_grads(params, step):
    for i, p in enumerate(params):
        p.grad = np.random.default_rng([step, i]).standard_normal(p.data.shape).astype(
            p.data.dtype)


@pytest.mark.parametrize("kind,options", OPTIMIZERS)
def test_flat_steps_are_bit_identical_to_per_parameter_steps(kind, options):
    flat_params, ref_params = _params(), _params()
    flat, ref = kind(flat_params, 0.1, **options), _per_parameter(kind(ref_params, 0.1, **options))
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


@pytest.mark.parametrize("kind,options", OPTIMIZERS)
def test_state_round_trip_continues_identically(kind, options):
    a_params, b_params = _params(), _params()
    a = kind(a_params, 0.1, **options)
    for step in range(2):
        _set_grads(a_params, step)
        a.step()
    b = kind(b_params, 0.1, **options)
    for p, q in zip(b_params, a_params):
        p.data[...] = q.data
    b.load_state_dict({k: np.asarray(v) for k, v in a.state_dict().items()})
    for opt, params in ((a, a_params), (b, b_params)):
        _set_grads(params, 7)
        opt.step()
    for p, q in zip(a_params, b_params):
        np.testing.assert_array_equal(p.data, q.data)
    assert b._flat_state is not None      # the loaded buffers went flat again


@pytest.mark.parametrize("kind,options", OPTIMIZERS)
def test_a_missing_gradient_takes_the_per_parameter_path(kind, options):
    """A step without p1's gradient leaves p1 alone; later steps (p1's buffers start late) match
    an optimizer that went parameter by parameter throughout."""
    params, ref_params = _params(), _params()
    opt, ref = kind(params, 0.1, **options), _per_parameter(kind(ref_params, 0.1, **options))
    for step in range(4):
        for ps, o in ((params, opt), (ref_params, ref)):
            _set_grads(ps, step)
            if step == 0:
                ps[1].grad = None
            o.step()
        if step == 0:
            np.testing.assert_array_equal(params[1].data, _params()[1].data)
        for a, b in zip(params, ref_params):
            np.testing.assert_array_equal(a.data, b.data)
    assert opt.state_dict()["steps"] == 4


@pytest.mark.parametrize("kind", [SGD, Adam])
def test_a_model_trains_identically_with_flat_and_per_parameter_steps(kind):
    models = [build_model("lenet5", backend="numpy", seed=3, dropout=0.0) for _ in range(2)]
    opts = [kind(models[0].parameters(), 0.05), _per_parameter(kind(models[1].parameters(), 0.05))]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 8)
    for _ in range(3):
        for model, opt in zip(models, opts):
            _, g = softmax_cross_entropy(model.forward(x), y)
            model.backward(g)
            opt.step()
    for key, value in models[1].state_dict().items():
        np.testing.assert_array_equal(models[0].state_dict()[key], value, err_msg=key)


@pytest.mark.parametrize("backend,in_place", [("numba", 14), ("numpy", 4)])
def test_layers_compute_their_gradients_into_the_flat_gradient(backend, in_place):
    """With a flat optimizer, the layers that can write a gradient into its ``grad_buffer`` do
    (numba's LeNet-5 + BN: all 14; NumPy's: the dense layers' 4, the rest is copied in); the
    gradients, the flat gradient and the steps are bit for bit those of a model without an
    optimizer's buffers, whose layers return new arrays."""
    model, ref = (build_model("lenet5", backend=backend, seed=3) for _ in range(2))
    ops = model.backend.conv_ops()
    opt = SGD(model.parameters(), 0.05, momentum=0.9, ops=ops)
    ref_opt = _per_parameter(SGD(ref.parameters(), 0.05, momentum=0.9, ops=ops))
    for p in ref.parameters():
        p.grad_buffer = None
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 6)
    kept = None
    for _ in range(3):
        for m in (model, ref):
            _, g = softmax_cross_entropy(m.forward(x, True), y, ops)
            m.backward(g)
        params = model.parameters()
        assert sum(p.grad is p.grad_buffer for p in params) == in_place
        if kept is not None:                       # the same arrays, overwritten, step to step
            assert all(p.grad is k for p, k in zip(params, kept) if k is p.grad_buffer)
        kept = [p.grad for p in params]
        for p, r in zip(params, ref.parameters()):
            np.testing.assert_array_equal(p.grad, r.grad, err_msg=p.name)
        np.testing.assert_array_equal(opt.flat_grad(),
                                      np.concatenate([r.grad.ravel() for r in ref.parameters()]))
        opt.step()
        ref_opt.step()
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[key], value, err_msg=key)


@pytest.mark.parametrize("model,flat", [("lenet5", True), ("vgg8", False)])
def test_only_small_models_go_flat(model, flat):
    """LeNet-5's 60k parameter values share one array; VGG-8's 585k, where gathering every
    gradient each step costs more than it saves, stay per parameter."""
    opt = Adam(build_model(model, backend="numpy", seed=0).parameters(), 0.01)
    assert (opt._flat is not None) is flat
