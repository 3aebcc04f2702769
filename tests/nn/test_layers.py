"""Each layer's backward against centred differences (float64), and the Numba kernels against
the plain path."""
import numpy as np
import pytest

import arraybn
from arraybn.nn import BatchNorm, Conv2d, Dense, Dropout, Flatten, MaxPool2d, ReLU
from arraybn.nn import conv as plain
from arraybn.nn import softmax_cross_entropy
from tests.nn.gradcheck import assert_grad_close

NUMPY = arraybn.get_backend("numpy")


def _check_layer(layer, x, rng, training=True, count=12):
    """Loss = sum(forward(x) * r); checks gx and every parameter gradient."""
    y = layer.forward(x, training)
    r = rng.standard_normal(y.shape)
    gx = layer.backward(r)

    def loss():
        return float((layer.forward(x, training) * r).sum())

    if gx is not None:
        assert_grad_close(loss, x, gx, rng, count)
    for p in layer.parameters():
        assert_grad_close(loss, p.data, p.grad, rng, count)


def test_dense_gradients(rng):
    layer = Dense("fc", 7, 5, bias=True, rng=rng, xp=np, dtype=np.float64)
    _check_layer(layer, rng.standard_normal((4, 7)), rng)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (1, 2)])
def test_conv2d_gradients(rng, stride, padding):
    layer = Conv2d("conv", 3, 4, 3, stride=stride, padding=padding, bias=True, rng=rng,
                   backend=NUMPY, dtype=np.float64)
    _check_layer(layer, rng.standard_normal((2, 3, 7, 6)), rng)


def test_conv2d_matches_direct_sum(rng):
    x = rng.standard_normal((2, 2, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    y, _ = plain.conv2d_forward(x, w, b, 2, 1, np)
    xp_ = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((2, 3, 3, 3))
    for i in range(3):
        for j in range(3):
            patch = xp_[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            expected[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w) + b
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_maxpool_gradients_and_floor_mode(rng):
    layer = MaxPool2d(2, NUMPY)
    x = rng.standard_normal((2, 3, 5, 7))
    y = layer.forward(x, True)
    assert y.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(y[0, 0, 1, 2], x[0, 0, 2:4, 4:6].max())
    layer.backward(np.ones_like(y))
    _check_layer(layer, x, rng)


def test_maxpool_ties_go_to_the_first_maximum():
    layer = MaxPool2d(2, NUMPY)
    x = np.zeros((1, 1, 2, 2))
    layer.forward(x, True)
    gx = layer.backward(np.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(gx[0, 0], [[1, 0], [0, 0]])


def test_relu_flatten_dropout_gradients(rng):
    _check_layer(ReLU(np), rng.standard_normal((3, 4, 2)), rng)
    x = rng.standard_normal((3, 4))
    y = ReLU(np, inplace=True)
    out = y.forward(x.copy(), True)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    np.testing.assert_array_equal(y.backward(np.ones_like(x)), x > 0)
    _check_layer(Flatten(), rng.standard_normal((3, 4, 2)), rng)
    layer = Dropout(0.5, np.random.default_rng(0), np)
    x = rng.standard_normal((50, 8))
    y = layer.forward(x, True)
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y[kept], 2 * x[kept])
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), 2.0 * kept)
    np.testing.assert_array_equal(layer.forward(x, False), x)


@pytest.mark.parametrize("kind", ["full", "mean-only", "ghost"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 3, 2)])
def test_batchnorm_layer_gradients(rng, kind, shape):
    bn = BatchNorm("bn1", shape[1], kind=kind, backend=NUMPY, dtype=np.float64,
                   ghost_batch_size=3)
    bn.weight.data[...] = rng.uniform(0.5, 2.0, shape[1])
    bn.bias.data[...] = rng.standard_normal(shape[1])
    _check_layer(bn, rng.standard_normal(shape) * 2 + 1, rng)


def test_batchnorm_eval_gradients(rng):
    bn = BatchNorm("bn1", 3, backend=NUMPY, dtype=np.float64)
    bn.running_mean[...] = rng.standard_normal(3)
    bn.running_var[...] = rng.uniform(0.5, 2, 3)
    _check_layer(bn, rng.standard_normal((4, 3)), rng, training=False)


def test_softmax_cross_entropy_gradient_and_value(rng):
    logits = rng.standard_normal((5, 4)) * 3
    labels = rng.integers(0, 4, 5)
    loss, g = softmax_cross_entropy(logits, labels)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert loss == pytest.approx(-log_p[np.arange(5), labels].mean(), rel=1e-12)
    assert_grad_close(lambda: softmax_cross_entropy(logits, labels)[0], logits, g, rng)
    big, _ = softmax_cross_entropy(np.array([[1e4, 0.0]], np.float32), np.array([1]))
    assert big == pytest.approx(1e4)


@pytest.mark.parametrize("labels,error", [(np.array([0, 4]), ValueError),
                                          (np.array([0.0, 1.0]), TypeError),
                                          (np.array([0]), ValueError)])
def test_softmax_cross_entropy_rejects_bad_labels(labels, error):
    with pytest.raises(error, match="labels"):
        softmax_cross_entropy(np.zeros((2, 4)), labels)


# --- Numba kernels against the plain path -------------------------------------------------------

def _numba_conv_ops():
    if "numba" not in arraybn.available_backends():
        pytest.skip("the numba backend is not available here")
    return arraybn.get_backend("numba").conv_ops()


def test_conv_ops_are_the_backends_own():
    assert arraybn.get_backend("numpy").conv_ops() is None
    if "numba" in arraybn.available_backends():
        ops = arraybn.get_backend("numba").conv_ops()
        assert callable(ops.maxpool2d_forward) and callable(ops.maxpool2d_backward)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (2, 2, 5, 7), (3, 4, 9, 11)])
def test_numba_maxpool_matches_plain(rng, shape, k, dtype):
    """Bit for bit, signed zeros and infinities included (2 x 2 runs the fused block's window
    loop with the identity affine map)."""
    ops = _numba_conv_ops()
    x = rng.standard_normal(shape).astype(dtype)
    x[0, 0, :k, :k] = 0.0                                        # a tie
    x[0, 1, :k, :k] = -0.0                                       # negative zeros only
    x[1, 0, 0, 0], x[1, 0, 0, 1], x[1, 1, 1, 1] = np.inf, -np.inf, -np.inf
    y, argmax = ops.maxpool2d_forward(x, k)
    y_ref, cache = plain.maxpool2d_forward(x, k, np)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(y_ref))
    assert y.dtype == dtype and np.signbit(y[0, 1, 0, 0])
    gy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_array_equal(ops.maxpool2d_backward(gy, argmax, x.shape, k),
                                  plain.maxpool2d_backward(gy, cache, np))
