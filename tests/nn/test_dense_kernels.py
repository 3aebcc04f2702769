"""The dense layer's GEMMs on two threads (``numba_dense_kernels``): NumPy's bits."""
import numpy as np
import pytest
import threadpoolctl

import arraybn
from arraybn.nn import Dense

kernels = pytest.importorskip("arraybn.backends.numba_dense_kernels")


@pytest.fixture
def two_threads(monkeypatch):
    """As if Numba had two threads (its region then runs the two GEMMs in turn or side by
    side, the same either way), with OpenBLAS on one thread (as the conv layers hold it)."""
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 2)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


def test_with_openblas_on_threads_of_its_own_numpy_runs(rng, monkeypatch):
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 2)
    gy, x, weight = _operands(rng, 128, 120, 400, np.float32)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert not kernels.dense_forward_applies(x, weight)
        assert not kernels.dense_backward_applies(gy, x, weight)
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert kernels.dense_forward_applies(x, weight)
        assert kernels.dense_backward_applies(gy, x, weight)


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


def test_the_weight_gradient_goes_into_the_array_given(rng, two_threads):
    gy, x, weight = _operands(rng, 128, 120, 400, np.float32)
    out = np.full(weight.shape, np.nan, np.float32)
    gx, gweight = kernels.dense_backward_gemms(gy, x, weight, out)
    assert gweight is out
    np.testing.assert_array_equal(out, gy.T @ x)
    np.testing.assert_array_equal(gx, gy @ weight)


def _read_only(shape):
    array = np.zeros(shape, np.float32)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize("make", [lambda: np.zeros((120, 401), np.float32),
                                  lambda: np.zeros((120, 400), np.float64),
                                  lambda: np.zeros((400, 120), np.float32).T,
                                  lambda: _read_only((120, 400)),
                                  lambda: [[0.0] * 400] * 120])
def test_a_weight_gradient_array_that_does_not_fit_is_refused(rng, two_threads, make):
    gy, x, weight = _operands(rng, 128, 120, 400, np.float32)
    with pytest.raises(ValueError, match="gweight must be a writeable C-contiguous float32"):
        kernels.dense_backward_gemms(gy, x, weight, make())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(128, 120, 400), (97, 131, 401), (256, 4, 4096),
                                   (3, 1000, 2000)])
def test_forward_halves_equal_numpys_bit_for_bit(rng, dtype, shape, two_threads):
    _, x, weight = _operands(rng, *shape, dtype)
    x[0, 0], x[-1, -1], weight[-1, 0] = np.nan, np.inf, -np.inf
    assert kernels.dense_forward_applies(x, weight)
    with np.errstate(invalid="ignore"):                                 # inf - inf
        np.testing.assert_array_equal(kernels.dense_forward_gemm(x, weight), x @ weight.T)


def test_where_the_forward_does_not_apply_numpy_runs(rng, monkeypatch, two_threads):
    _, x, weight = _operands(rng, 128, 120, 400, np.float32)
    applies = kernels.dense_forward_applies
    assert not applies(x, weight[:1])                                     # one feature: GEMV
    assert not applies(x[:, :120].copy(), weight[:84, :120].copy())       # too small to pay
    assert not applies(np.asfortranarray(x), weight)
    assert not applies(x, weight.astype(np.float64))
    assert not applies(x, weight[:, :-1])                                 # shapes disagree
    assert not applies(x[0], weight)
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 1)
    assert not applies(x, weight)


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
        grads.append((layer.forward(x, True), layer.backward(gy), layer.weight.grad,
                      layer.bias.grad))
    for with_kernels, without in zip(*grads):
        if without is None:
            assert with_kernels is None
        else:
            np.testing.assert_array_equal(with_kernels, without)
