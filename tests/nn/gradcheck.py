"""Centred-difference gradient checking in float64 for the nn tests."""
import numpy as np

from arraybn.nn import softmax_cross_entropy


def numerical_grad(loss_fn, array, index, h=1e-6):
    """d loss / d array[index] by centred differences; ``array`` is changed, then restored."""
    old = array[index]
    array[index] = old + h
    up = loss_fn()
    array[index] = old - h
    down = loss_fn()
    array[index] = old
    return (up - down) / (2 * h)


def sample_indices(shape, count, rng):
    """Up to ``count`` distinct multi-indices into an array of ``shape``."""
    size = int(np.prod(shape))
    flat = rng.choice(size, size=min(count, size), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def assert_grad_close(loss_fn, array, analytic, rng, count=12, rtol=1e-5, atol=1e-8):
    """Compare ``analytic`` (array's shape) with centred differences at sampled entries."""
    assert analytic.shape == array.shape
    for index in sample_indices(array.shape, count, rng):
        expected = numerical_grad(loss_fn, array, index)
        got = analytic[index]
        assert abs(got - expected) <= atol + rtol * abs(expected), (index, got, expected)


def assert_model_grads_close(model, x, labels, rng, count, rtol=1e-4, atol=1e-8):
    """Every parameter's backprop gradient of the training-mode loss against centred
    differences at ``count`` sampled entries."""
    def loss():
        return softmax_cross_entropy(model.forward(x, training=True), labels)[0]

    _, g = softmax_cross_entropy(model.forward(x, training=True), labels)
    model.backward(g)
    grads = {p.name: p.grad.copy() for p in model.parameters()}
    for p in model.parameters():
        assert_grad_close(loss, p.data, grads[p.name], rng, count=count, rtol=rtol, atol=atol)
