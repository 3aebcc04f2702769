"""The numba backend's flat-convolution kernels (stride 1, no padding: LeNet-5's convolutions):
bit for bit the NumPy path's results, on any number of threads, used by Conv2d where they apply,
and standing aside where NumPy's OpenBLAS is not there (what both kinds of convolution kernels
share, threads and refusals included, is tested in test_im2col_conv_kernels)."""
import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from arraybn.backends import numba_flat_conv as flat
from arraybn.nn import build_model
from arraybn.nn import conv as plain
from tests.nn.conv_paths import OPS, assert_same, both_paths
from tests.nn.threaded_steps import step_results

pytestmark = pytest.mark.skipif(not flat.available(np.float32),
                                reason="NumPy's own OpenBLAS not found: the NumPy path runs")


@njit
def _gemm_through_address(gemm, one, zero, a, b, c, trans_b):
    """c = a @ b (or a @ b.T) by ``cblas_gemm``, as the kernels call it."""
    m, k = a.shape
    n, ldb = c.shape[1], b.shape[1]
    flat.cblas_gemm(gemm, flat.ROW_MAJOR, flat.NO_TRANS, flat.TRANS if trans_b else flat.NO_TRANS,
                    m, n, k, one, a.ctypes.data, k, b.ctypes.data, ldb, zero, c.ctypes.data, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cblas_gemm_calls_numpys_gemm_by_its_address(dtype):
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(shape).astype(dtype) for shape in ((7, 33), (33, 12)))
    for trans_b, b_in in ((False, b), (True, np.ascontiguousarray(b.T))):
        c = np.full((7, 12), np.nan, dtype)
        _gemm_through_address(*flat.gemm_args(dtype), a, b_in, c, trans_b)
        expected = a @ (b_in.T if trans_b else b_in)   # NumPy's matmul: the same GEMM call
        assert np.array_equal(c, expected)


def test_cblas_gemm_refuses_alpha_and_beta_that_are_not_one_float_type():
    one, zero = np.float32(1), np.float64(0)
    a = np.ones((2, 2), np.float32)
    with pytest.raises(TypingError):
        _gemm_through_address(flat.gemm_args(np.float32)[0], one, zero, a, a, a.copy(), False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,out,k,bias", [((128, 1, 28, 28), 6, 3, False),   # LeNet conv1
                                             ((128, 6, 13, 13), 16, 3, False),   # LeNet conv2
                                             ((5, 3, 9, 7), 4, 2, True),
                                             ((3, 2, 5, 6), 3, 5, True),
                                             # a GEMM dimension of 1, where NumPy calls GEMV:
                                             ((8, 3, 20, 20), 1, 3, False),     # one output
                                             ((8, 1, 20, 20), 4, 1, True),      # one row
                                             ((8, 5, 1, 1), 6, 1, False)])      # one position
def test_the_flat_kernels_equal_the_numpy_path_bit_for_bit(dtype, shape, out, k, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((out, shape[1], k, k)).astype(dtype)
    b = rng.standard_normal(out).astype(dtype) if bias else None
    assert_same(*both_paths(x, w, b, 1, 0))


def test_a_lenet5_step_is_bit_identical_on_1_and_2_threads_and_equals_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    runs = step_results("lenet5", (("numba", 1), ("numba", 2), ("numpy", 1)), x, labels, 3)
    for other in runs[1:]:
        for got, want in zip(other, runs[0]):
            np.testing.assert_array_equal(got, want)


def test_conv2d_layers_use_the_flat_kernels_where_they_apply(monkeypatch):
    calls = []

    def prepare(*geometry):                  # a layer's forward runs its prepared kernel
        kernel = flat.FlatConvForward(*geometry)
        return lambda *args: calls.append("forward") or kernel(*args)
    monkeypatch.setattr(OPS, "FlatConvForward", prepare)
    monkeypatch.setattr(OPS, "flat_conv_backward",
                        lambda *args: calls.append("backward") or flat.flat_conv_backward(*args))
    x = np.random.default_rng(4).standard_normal((4, 1, 28, 28)).astype(np.float32)
    for model_name, used in (("lenet5", True), ("vgg8", False)):    # VGG-8 pads: not flat
        calls.clear()
        # BN after the ReLU: the convolutions' own backward (before it, each convolution and
        # its BN block are a ConvBNBlock, whose kernel runs theirs; see test_conv_bn_block.py)
        model = build_model(model_name, backend="numba", seed=0, bn_position="after")
        model.backward(np.ones_like(model.forward(x, True)))
        assert bool(calls) == used and (not used or {"forward", "backward"} <= set(calls))


def test_without_numpys_openblas_the_numpy_path_runs(monkeypatch):
    monkeypatch.setattr(flat, "GEMMS", {})
    assert not OPS.conv_kernels_available(np.float32)
    monkeypatch.setattr(OPS, "flat_conv_forward", None)        # would fail if called
    monkeypatch.setattr(OPS, "FlatConvForward", None)
    x = np.ones((2, 1, 6, 6), np.float32)
    y, _ = plain.conv2d_forward(x, np.ones((2, 1, 3, 3), np.float32), None, 1, 0, np, {}, OPS)
    np.testing.assert_array_equal(y, np.full((2, 2, 4, 4), 9, np.float32))


def test_a_layer_keeps_its_prepared_forward_per_input_shape():
    """Batches of 6, 5 and 6: each forward equals a forward without kept plans (no workspace),
    and the batch of 6 runs the kernel prepared at its first forward."""
    conv = build_model("lenet5", backend="numba", seed=0, bn_position="after").layers[0]
    rng = np.random.default_rng(6)
    kernels = []
    for n in (6, 5, 6):
        x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
        fresh, _ = plain.conv2d_forward(x, conv.weight.data, conv.bias.data, 1, 0, np, None, OPS)
        np.testing.assert_array_equal(conv.forward(x, True), fresh)
        kernels.append(conv._workspace[("forward plan", x.shape, x.dtype, True)][-1])
    assert isinstance(kernels[0], flat.FlatConvForward)
    assert kernels[0] is kernels[2] is not kernels[1]


def test_a_prepared_forward_rejects_arrays_of_another_geometry():
    x, w = np.ones((4, 2, 6, 6), np.float32), np.ones((3, 2, 3, 3), np.float32)
    y, bias = np.empty((4, 3, 4, 4), np.float32), np.arange(3, dtype=np.float32)
    kernel = flat.FlatConvForward(x.shape, w.shape, x.dtype, [slice(0, 2), slice(2, 4)], True)
    kernel(x, w, bias, y)
    np.testing.assert_array_equal(y, np.broadcast_to((18 + bias)[:, None, None], y.shape))
    with pytest.raises(ValueError, match="prepared for"):
        kernel(x[:2], w, bias, y[:2])
    with pytest.raises(ValueError, match="prepared for"):
        kernel(x, w, None, y)
    with pytest.raises(TypeError, match="prepared for float32"):
        kernel(x.astype(np.float64), w.astype(np.float64), bias.astype(np.float64),
               y.astype(np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        kernel(x, w, bias, np.empty((4, 3, 4, 8), np.float32)[..., ::2])
    with pytest.raises(ValueError, match="does not fit"):
        flat.FlatConvForward(x.shape, (3, 1, 3, 3), x.dtype, [slice(0, 4)], False)
    with pytest.raises(TypeError, match="not a dtype the GEMMs take"):
        flat.FlatConvForward(x.shape, w.shape, np.float16, [slice(0, 4)], False)
