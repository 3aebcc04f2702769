"""The dense layer's backward GEMMs side by side (``numba_dense_kernels``): NumPy's bits."""
import numpy as np
import pytest

import arraybn
from arraybn.nn import Dense

kernels = pytest.importorskip("arraybn.backends.numba_dense_kernels")


@pytest.fixture
def two_threads(monkeypatch):
    """As if Numba had two threads (its region then runs the two GEMMs in turn or side by
    side, the same either way)."""
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 2)


def _operands(rng, n, o, i, dtype):
    return (rng.standard_normal((n, o)).astype(dtype), rng.standard_normal((n, i)).astype(dtype),
            rng.standard_normal((o, i)).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(128, 120, 400), (97, 130, 401), (256, 84, 200)])
def test_both_gemms_equal_numpys_bit_for_bit(rng, dtype, shape, two_threads):
    gy, x, weight = _operands(rng, *shape, dtype)
    assert kernels.dense_backward_applies(gy, x, weight)
    gx, gweight = kernels.dense_backward_gemms(gy, x, weight)
    np.testing.assert_array_equal(gx, gy @ weight)
    np.testing.assert_array_equal(gweight, gy.T @ x)


def test_where_it_does_not_apply_numpy_runs(rng, monkeypatch, two_threads):
    gy, x, weight = _operands(rng, 128, 120, 400, np.float32)
    applies = kernels.dense_backward_applies
    assert not applies(gy[:, :1].copy(), x, weight[:1])                  # a dimension of 1: GEMV
    assert not applies(*_operands(rng, 128, 84, 120, np.float32))         # too small to pay
    assert not applies(np.asfortranarray(gy), x, weight)
    assert not applies(gy.astype(np.float64), x, weight)                  # mixed dtypes
    assert not applies(gy.astype(np.int32), x.astype(np.int32), weight.astype(np.int32))
    assert not applies(gy, x[:-1], weight)                                # shapes disagree
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 1)
    assert not applies(gy, x, weight)                                     # one thread


@pytest.mark.parametrize("need_gx", [True, False])
def test_a_dense_layer_with_the_kernels_equals_one_without(rng, two_threads, need_gx):
    ops = arraybn.get_backend("numba").conv_ops()
    layers = [Dense("fc", 400, 120, bias=True, rng=np.random.default_rng(1), xp=np,
                    dtype=np.float32, ops=which) for which in (ops, None)]
    x = rng.standard_normal((128, 400)).astype(np.float32)
    gy = rng.standard_normal((128, 120)).astype(np.float32)
    grads = []
    for layer in layers:
        layer.need_input_grad = need_gx
        layer.forward(x, True)
        grads.append((layer.backward(gy), layer.weight.grad, layer.bias.grad))
    for with_kernels, without in zip(*grads):
        if without is None:
            assert with_kernels is None
        else:
            np.testing.assert_array_equal(with_kernels, without)
