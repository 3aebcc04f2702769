"""The numba backend's flat-convolution kernels (stride 1, no padding: LeNet-5's convolutions):
bit for bit the NumPy path's results, on any number of threads, used by Conv2d where they apply,
and standing aside where NumPy's OpenBLAS is not there (what both kinds of convolution kernels
share, threads and refusals included, is tested in test_im2col_conv_kernels)."""
import numpy as np
import pytest

from arraybn.backends import numba_flat_conv as flat
from arraybn.nn import build_model
from arraybn.nn import conv as plain
from tests.nn.conv_paths import OPS, assert_same, both_paths
from tests.nn.threaded_steps import step_results

pytestmark = pytest.mark.skipif(not flat.available(np.float32),
                                reason="NumPy's own OpenBLAS not found: the NumPy path runs")


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
    monkeypatch.setattr(OPS, "flat_conv_forward",
                        lambda *args: calls.append("forward") or flat.flat_conv_forward(*args))
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
    x = np.ones((2, 1, 6, 6), np.float32)
    y, _ = plain.conv2d_forward(x, np.ones((2, 1, 3, 3), np.float32), None, 1, 0, np, {}, OPS)
    np.testing.assert_array_equal(y, np.full((2, 2, 4, 4), 9, np.float32))
