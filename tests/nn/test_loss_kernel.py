"""The numba backend's softmax cross-entropy kernel against the float64 reference and NumPy."""
import numpy as np
import pytest

import arraybn
from arraybn.nn import softmax_cross_entropy
from arraybn.stages.parallel import loss_share
from tests.nn.gradcheck import assert_grad_close


@pytest.fixture(scope="module")
def ops():
    if "numba" not in arraybn.available_backends():
        pytest.skip("the numba backend is not available here")
    return arraybn.get_backend("numba").conv_ops()


def _reference(logits, labels):
    """float64 loss and gradient."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(x))
    loss = -np.log(p[rows, labels]).mean()
    p[rows, labels] -= 1
    return loss, p / len(x)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("shape", [(128, 10), (1, 1), (3, 7), (257, 100)])
def test_kernel_matches_the_float64_reference_and_numpy(ops, rng, dtype, rtol, shape):
    logits = (rng.standard_normal(shape) * 4).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0])
    assert ops.softmax_cross_entropy_applies(logits, labels)
    loss, grad = softmax_cross_entropy(logits, labels, ops)
    want_loss, want_grad = _reference(logits, labels)
    assert grad.dtype == dtype and grad.shape == shape
    assert loss == pytest.approx(want_loss, rel=rtol, abs=rtol)
    np.testing.assert_allclose(grad, want_grad, rtol=10 * rtol, atol=rtol / shape[0])
    numpy_loss, numpy_grad = softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(numpy_loss, rel=rtol, abs=rtol)
    np.testing.assert_allclose(grad, numpy_grad, rtol=10 * rtol, atol=rtol / shape[0])


def test_kernel_gradient_by_centred_differences(ops, rng):
    logits = rng.standard_normal((6, 5)) * 3
    labels = rng.integers(0, 5, 6).astype(np.int32)
    _, grad = softmax_cross_entropy(logits, labels, ops)
    assert_grad_close(lambda: softmax_cross_entropy(logits, labels, ops)[0], logits, grad, rng)


def test_kernel_is_stable_for_large_and_infinite_logits(ops):
    big, grad = softmax_cross_entropy(np.array([[1e4, 0.0]], np.float32), np.array([1]), ops)
    assert big == pytest.approx(1e4) and np.array_equal(grad, [[1.0, -1.0]])
    # one -inf logit is a class of probability 0: a finite loss, the same as NumPy's
    logits = np.array([[-np.inf, 1.0, 2.0], [0.5, 0.0, -1.0]], np.float32)
    labels = np.array([2, 0])
    loss, grad = softmax_cross_entropy(logits, labels, ops)
    want_loss, want_grad = softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)
    assert grad[0, 0] == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_kernel_non_finite_logits_raise_like_numpy(ops, bad):
    logits = np.zeros((3, 4), np.float32)
    logits[1, 2] = bad
    for kernels in (ops, None):
        with pytest.raises(FloatingPointError, match="not finite"), np.errstate(invalid="ignore"):
            softmax_cross_entropy(logits, np.array([0, 1, 2]), kernels)


@pytest.mark.parametrize("labels,error", [(np.array([0, 4]), ValueError),
                                          (np.array([0, -1]), ValueError),
                                          (np.array([0.0, 1.0]), TypeError),
                                          (np.array([0]), ValueError),
                                          (np.array([[0, 1]]), ValueError)])
def test_kernel_rejects_bad_labels_with_numpys_errors(ops, labels, error):
    with pytest.raises(error, match="labels"):
        softmax_cross_entropy(np.zeros((2, 4), np.float32), labels, ops)


def test_kernel_applies_only_to_contiguous_float_arrays(ops):
    labels = np.array([0, 1])
    logits = np.zeros((2, 4), np.float32)
    assert ops.softmax_cross_entropy_applies(logits, labels)
    assert ops.softmax_cross_entropy_applies(logits, labels.astype(np.uint8))
    assert not ops.softmax_cross_entropy_applies(np.zeros((4, 2), np.float32).T, labels)
    assert not ops.softmax_cross_entropy_applies(logits.astype(np.float16), labels)
    assert not ops.softmax_cross_entropy_applies(logits.astype(np.int64), labels)
    assert not ops.softmax_cross_entropy_applies(logits, labels.astype(np.float32))
    assert not ops.softmax_cross_entropy_applies(logits, [0, 1])
    assert not ops.softmax_cross_entropy_applies(np.zeros((2, 0), np.float32), labels)


def test_loss_share_passes_the_kernel_and_scales_a_shard(ops, rng):
    logits = rng.standard_normal((8, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    loss, grad = softmax_cross_entropy(logits, labels, ops)
    share, share_grad = loss_share(logits, labels, 32, ops)
    assert share == loss * 8
    assert np.array_equal(share_grad, grad * np.float32(8 / 32))
