"""The numba backend's flat-convolution kernels (stride 1, no padding: LeNet-5's convolutions):
bit for bit the NumPy path's results, on any number of threads, used by Conv2d where they apply,
and refusing what they cannot take."""
import numpy as np
import pytest

from arraybn.backends import get_backend
from arraybn.backends import numba_flat_conv as flat
from arraybn.nn import build_model
from arraybn.nn import chunk_threads as ct
from arraybn.nn import conv as plain
from tests.nn.threaded_steps import step_results

pytestmark = pytest.mark.skipif(not flat.available(np.float32),
                                reason="NumPy's own OpenBLAS not found: the NumPy path runs")
OPS = get_backend("numba").conv_ops()


def _both_paths(x, w, b, need_gx, gy_seed=1):
    """(y, gx, gweight, gbias) from the NumPy path and from the flat kernels."""
    ct.threads()      # OpenBLAS on one thread, as the kernels always run it (on two threads
    results = []      # its GEMMs may sum in another order)
    for ops in (None, OPS):
        y, cache = plain.conv2d_forward(x, w, b, 1, 0, np, {}, ops)
        gy = np.random.default_rng(gy_seed).standard_normal(y.shape).astype(x.dtype)
        results.append((y,) + plain.conv2d_backward(gy, cache, np, need_gx, {}, ops))
    return results


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
    reference, kernels = _both_paths(x, w, b, need_gx=True)
    for want, got in zip(reference, kernels):
        if want is None:
            assert got is None
        else:
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


def test_without_the_input_gradient_no_gx_is_made_and_the_rest_is_the_same():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 1, 12, 12)).astype(np.float32)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    reference, kernels = _both_paths(x, w, None, need_gx=False)
    assert reference[1] is None and kernels[1] is None
    np.testing.assert_array_equal(kernels[2], reference[2])


def test_a_convolution_on_the_flat_kernels_is_bit_identical_on_1_2_and_3_threads(chunk_threads):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((13, 6, 13, 13)).astype(np.float32)
    w = rng.standard_normal((16, 6, 3, 3)).astype(np.float32)
    results = []
    for count in (1, 2, 3):
        chunk_threads(count)
        results.append(_both_paths(x, w, None, need_gx=True)[1])
    for other in results[1:]:
        for got, want in zip(other[:3], results[0][:3]):
            np.testing.assert_array_equal(got, want)


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
        model = build_model(model_name, backend="numba", seed=0)
        model.backward(np.ones_like(model.forward(x, True)))
        assert bool(calls) == used and (not used or {"forward", "backward"} <= set(calls))


def test_without_numpys_openblas_the_numpy_path_runs(monkeypatch):
    monkeypatch.setattr(flat, "GEMMS", {})
    assert not OPS.conv_kernels_available(np.float32)
    monkeypatch.setattr(OPS, "flat_conv_forward", None)        # would fail if called
    x = np.ones((2, 1, 6, 6), np.float32)
    y, _ = plain.conv2d_forward(x, np.ones((1, 1, 3, 3), np.float32), None, 1, 0, np, {}, OPS)
    np.testing.assert_array_equal(y, np.full((2, 1, 4, 4), 9, np.float32))


@pytest.mark.parametrize("bad", ["dtype", "layout", "int"])
def test_the_kernels_refuse_mixed_dtypes_non_contiguous_and_integer_arrays(bad):
    x = np.ones((2, 1, 6, 6), np.float32)
    w = np.ones((1, 1, 3, 3), np.float32)
    y = np.empty((2, 1, 4, 4), np.float32)
    if bad == "dtype":
        w = w.astype(np.float64)
    elif bad == "layout":
        x = np.ones((2, 1, 6, 12), np.float32)[..., ::2]
    else:
        x, w, y = x.astype(np.int32), w.astype(np.int32), y.astype(np.int32)
    with pytest.raises(TypeError, match="C-contiguous and all float32 or all float64"):
        flat.flat_conv_forward(x, w, None, slice(0, 2), y)
