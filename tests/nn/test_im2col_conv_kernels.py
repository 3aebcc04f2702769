"""The numba backend's im2col convolution kernels (padded and strided convolutions: VGG-8's and
ResNet's): bit for bit the NumPy path's results (within float32 rounding where they run their
own GEMM, ``numba_gemm``), bit for bit the same on any number of threads, used by Conv2d where
they apply (and the NumPy path where NumPy would call GEMV). The tests of what both kinds of
convolution kernels share (no gx when not asked for, any number of threads, refusals) are here
for both."""
import numpy as np
import pytest

from arraybn.backends import numba_across_chunk as across_chunk
from arraybn.backends import numba_flat_conv as flat
from arraybn.backends import numba_gemm
from arraybn.backends import numba_im2col_conv as im2col
from arraybn.nn import build_model
from arraybn.nn import chunk_threads as ct
from arraybn.nn import conv as plain
from tests.nn.conv_paths import OPS, assert_same, assert_within_rounding, both_paths
from tests.nn.threaded_steps import assert_numba_steps_same_and_close_to_numpy

pytestmark = pytest.mark.skipif(not flat.available(np.float32),
                                reason="NumPy's own OpenBLAS not found: the NumPy path runs")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,out,k,stride,pad,bias", [
    ((6, 16, 28, 28), 16, 3, 1, 1, False),     # ResNet-20 first stage: 'image', same padding
    ((5, 1, 28, 28), 32, 3, 1, 1, True),       # VGG-8 conv1: 'image', 9 rows
    ((6, 16, 28, 28), 32, 3, 2, 1, False),     # ResNet-20 downsampling: 'chunk', col2im
    ((7, 3, 9, 9), 5, 3, 2, 2, True),          # 'image' with col2im, padding beyond the window
    ((6, 4, 8, 8), 5, 5, 1, 1, True),          # 'chunk', not 'same': col2im
    ((4, 64, 7, 7), 64, 3, 1, 1, False),       # 'chunk', same padding: shifted runs per image
    ((3, 4, 6, 9), 5, 5, 1, 2, False),         # 'same' 5x5: shifted runs, 2 wrapped columns
    ((3, 2, 2, 3), 4, 5, 1, 2, True),          # 'same', windows wider than the plane
    ((3, 4, 2, 3), 4, 5, 1, 2, False),         # the same in 'chunk': col2im of shifted runs
    ((5, 40, 6, 6), 36, 3, 1, 1, True),        # 'chunk', OpenBLAS's GEMMs in float32 too
])
def test_the_kernels_equal_the_numpy_path_bit_for_bit_or_within_rounding_on_their_own_gemm(
        dtype, shape, out, k, stride, pad, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((out, shape[1], k, k)).astype(dtype)
    b = rng.standard_normal(out).astype(dtype) if bias else None
    reference, kernels = both_paths(x, w, b, stride, pad)
    rows, dtype, out_hw = shape[1] * k * k, np.dtype(dtype), reference[0].shape[2:]
    per_image = plain._layout(shape[1], k, k, stride, pad, np.prod(out_hw)) != "chunk"
    if (im2col.own_gemm(dtype, out, rows) or im2col.own_dots(dtype, out, rows)
            or across_chunk.applies(dtype, per_image, stride, *shape[2:], *out_hw)):
        assert_within_rounding(kernels, x, w, b, stride, pad)
    else:
        assert_same(reference, kernels)


def test_float32_convolutions_with_few_channels_run_on_the_own_gemm():
    """Not a vacuous test above: where ``numba_gemm`` runs at speed, float32 convolutions with
    at most OWN_GEMM_MAX output channels or im2col rows use it (for the weight gradient: at
    most that many channels and more rows); float64 and wide ones do not."""
    own = numba_gemm.available()
    assert im2col.own_gemm(np.dtype(np.float32), 16, 144) == own       # ResNet-20, 16 ch
    assert im2col.own_gemm(np.dtype(np.float32), 32, 9) == own         # VGG-8 conv1
    assert not im2col.own_gemm(np.dtype(np.float32), 64, 576)          # 64 ch: OpenBLAS
    assert not im2col.own_gemm(np.dtype(np.float64), 16, 144)
    assert im2col.own_dots(np.dtype(np.float32), 16, 144) == own       # weight gradients
    assert not im2col.own_dots(np.dtype(np.float32), 32, 9)
    assert not im2col.own_dots(np.dtype(np.float32), 64, 576)


def test_chunk_convolutions_read_their_windows_across_the_chunk_where_the_input_fits():
    """Where the input is exactly stride times the output: 'same' convolutions and ResNet's
    stride-2 ones on even sizes; not per image, not in float64, not on odd sizes."""
    f32, f64, own = np.dtype(np.float32), np.dtype(np.float64), numba_gemm.available()
    assert across_chunk.applies(f32, False, 1, 7, 7, 7, 7) == own      # ResNet-20's 64 ch
    assert across_chunk.applies(f32, False, 2, 28, 28, 14, 14) == own  # its stride-2 ones
    assert not across_chunk.applies(f32, True, 1, 28, 28, 28, 28)      # 'image' layout
    assert not across_chunk.applies(f32, False, 2, 7, 7, 4, 4)         # odd: 7 != 2 * 4
    assert not across_chunk.applies(f32, False, 1, 7, 7, 5, 5)         # not 'same'
    assert not across_chunk.applies(f64, False, 1, 7, 7, 7, 7)


@pytest.mark.parametrize("shape,out,k,stride,pad", [
    ((6, 32, 14, 14), 32, 3, 1, 1),      # ResNet-20's 32-channel one: weight gradient by taps
    ((6, 16, 28, 28), 32, 3, 2, 1),      # ResNet-20's first stride-2 convolution
    ((7, 8, 12, 10), 9, 4, 2, 1),        # a 4x4 kernel: shifts -1, 0, 0 and +1
    ((5, 8, 9, 12), 4, 3, 3, 0),         # stride 3, no padding
])
def test_convolutions_across_the_chunk_are_within_rounding_of_the_numpy_path(
        shape, out, k, stride, pad):
    """The phase planes: every window offset reads the right phase, shifted the right way
    (a wrong phase or shift is off by a whole term, far past the rounding bound), and gx's
    phases land on their rows and columns; the weight gradient by taps (``gemm_taps``) where
    it applies."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((out, shape[1], k, k)).astype(np.float32)
    kernels = both_paths(x, w, None, stride, pad)[1]
    out_hw = kernels[0].shape[2:]
    assert plain._layout(shape[1], k, k, stride, pad, np.prod(out_hw)) == "chunk"
    if not across_chunk.applies(np.dtype(np.float32), False, stride, *shape[2:], *out_hw):
        pytest.skip("numba_gemm needs FMA and AVX2")
    assert_within_rounding(kernels, x, w, None, stride, pad)


@pytest.mark.parametrize("shape,out,k,pad", [((7, 64, 7, 7), 48, 3, 1), ((5, 4, 6, 9), 3, 5, 2),
                                             ((6, 40, 6, 6), 36, 3, 1)])
def test_windows_across_the_chunk_give_the_bits_of_windows_read_image_by_image(
        monkeypatch, shape, out, k, pad):
    """The forward across a chunk (chunks of unequal sizes: 7 images in 4 chunks) equals the
    per-image windows of ``numba_gemm`` (the same sums in the same order) bit for bit, and the
    input gradient equals the kernels' forward convolution of gy with the weights flipped in
    space and transposed in channels, the 'same' convolution's adjoint."""
    if not numba_gemm.available():
        pytest.skip("numba_gemm needs FMA and AVX2")
    assert plain._layout(shape[1], k, k, 1, pad, shape[2] * shape[3]) == "chunk"
    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((out, shape[1], k, k)).astype(np.float32)
    gy = rng.standard_normal((shape[0], out) + shape[2:]).astype(np.float32)
    y, cache = plain.conv2d_forward(x, w, None, 1, pad, np, {}, OPS)
    gx = plain.conv2d_backward(gy, cache, np, True, {}, OPS)[0]
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(
        gx.view(np.uint32), plain.conv2d_forward(gy, flipped, None, 1, pad, np, {}, OPS)[0].view(
            np.uint32))
    monkeypatch.setattr(across_chunk, "applies", lambda *args: False)
    monkeypatch.setattr(im2col, "own_gemm", lambda *args: True)
    image_by_image = plain.conv2d_forward(x, w, None, 1, pad, np, {}, OPS)[0]
    np.testing.assert_array_equal(y.view(np.uint32), image_by_image.view(np.uint32))


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("shape,k,pad", [((4, 64, 7, 7), 3, 1), ((3, 4, 2, 3), 5, 2)])
def test_same_runs_keep_every_bit_of_non_finite_values_and_signed_zeros(monkeypatch, shape, k,
                                                                        pad, own):
    """'same' convolutions in the 'chunk' layout: im2col and col2im run over shifted runs of the
    plane, the wrapped-around columns masked by selects. NaN, infinities and zeros of both
    signs in x and gy give the NumPy path's bit patterns (assert_array_equal would let -0.0
    pass for 0.0) with OpenBLAS's GEMMs; with ``numba_gemm``'s (``own``, forced for all three
    products), whose sums round differently, the same non-finite values in the same places and the finite ones close."""
    if own and not numba_gemm.available():
        pytest.skip("numba_gemm needs FMA and AVX2")
    for rule in ("own_gemm", "own_dots"):
        monkeypatch.setattr(im2col, rule, lambda *args: own)
    monkeypatch.setattr(across_chunk, "applies", lambda *args: own)
    assert plain._layout(shape[1], k, k, 1, pad, shape[2] * shape[3]) == "chunk"
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(np.float32)
    # NaN and infinities on edge columns, where the windows wrap around a row's end
    x.flat[::5], x[0, 0, 1, 0], x[-1, -1, 0, -1] = -0.0, np.nan, np.inf
    w = rng.standard_normal((shape[1], shape[1], k, k)).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    gy.flat[::3], gy[0, 0, 1, 0], gy[-1, -1, 0, -1] = -0.0, -np.inf, np.nan
    ct.threads()
    results = []
    for ops in (None, OPS):
        with np.errstate(invalid="ignore"):                    # inf - inf in the GEMMs
            y, cache = plain.conv2d_forward(x, w, None, 1, pad, np, {}, ops)
            results.append((y,) + plain.conv2d_backward(gy, cache, np, True, {}, ops)[:2])
    for want, got in zip(*results):
        if own:
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_array_equal(np.isinf(got) * np.sign(got),
                                          np.isinf(want) * np.sign(want))
            finite = np.isfinite(want)
            np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.signbit(results[0][1]).any() and np.isnan(results[0][1]).any()


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 1)])      # flat kernels, im2col kernels
def test_without_the_input_gradient_no_gx_is_made_and_the_rest_is_the_same(stride, pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 10, 10)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    reference, kernels = both_paths(x, w, None, stride, pad, need_gx=False)
    assert reference[1] is None and kernels[1] is None
    assert_same(reference, kernels)


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 1)])      # flat kernels, im2col kernels
@pytest.mark.parametrize("bias", [False, True])
def test_an_empty_batch_gives_zero_gradients_on_both_paths(stride, pad, bias):
    x = np.zeros((0, 3, 10, 10), np.float32)
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    reference, kernels = both_paths(x, w, np.ones(4, np.float32) if bias else None, stride, pad)
    assert_same(reference, kernels)
    assert reference[2].shape == w.shape and not reference[2].any()


@pytest.mark.parametrize("pad", [0, 1])                        # flat kernels, im2col kernels
def test_a_convolution_on_the_kernels_is_bit_identical_on_1_2_and_3_threads(chunk_threads, pad):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((13, 8, 20, 20)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    results = []
    for count in (1, 2, 3):
        chunk_threads(count)
        results.append(both_paths(x, w, None, 1, pad)[1])
    for other in results[1:]:
        assert_same(results[0], other)


@pytest.mark.parametrize("model", ["vgg8", "resnet"])
def test_a_step_is_bit_identical_on_1_and_2_threads_and_close_to_numpy(model):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
    assert_numba_steps_same_and_close_to_numpy(model, x, rng.integers(0, 10, 6))


def _calls(monkeypatch):
    calls = []
    for name in ("im2col_conv_forward", "im2col_conv_backward"):
        kernel = getattr(im2col, name.replace("im2col_", ""))
        monkeypatch.setattr(OPS, name, lambda *args, _k=kernel, _n=name: calls.append(
            (_n.split("_")[-1], args[4], args[5], args[6])) or _k(*args))
    return calls


def test_conv2d_layers_use_the_kernels_where_they_apply(monkeypatch):
    """Every convolution of VGG-8 and ResNet, forward and backward: per image ('image') and per
    chunk ('chunk': VGG-8's 14x14 and 7x7 layers, ResNet's strided ones), on any number of
    threads; LeNet-5's are 'flat', not these."""
    calls = _calls(monkeypatch)
    x = np.random.default_rng(4).standard_normal((4, 1, 28, 28)).astype(np.float32)
    for model_name in ("lenet5", "vgg8", "resnet"):
        calls.clear()
        model = build_model(model_name, backend="numba", seed=0)
        model.backward(np.ones_like(model.forward(x, True)))
        used = set(calls)
        if model_name == "lenet5":
            assert not used
        elif model_name == "vgg8":
            assert used == {("forward", 1, 1, True), ("backward", 1, 1, True),
                            ("backward", 1, 1, False), ("forward", 1, 1, False)}
        else:
            assert {("forward", 1, 1, True), ("backward", 1, 1, True), ("backward", 2, 1, False),
                    ("forward", 2, 0, True), ("forward", 2, 1, False)} <= used


def test_where_numpy_calls_gemv_the_numpy_path_runs(monkeypatch):
    calls = _calls(monkeypatch)
    x = np.random.default_rng(5).standard_normal((3, 2, 9, 9)).astype(np.float32)
    w = np.ones((1, 2, 3, 3), np.float32)                       # one output channel
    plain.conv2d_forward(x, w, None, 1, 1, np, {}, OPS)
    assert not calls
    plain.conv2d_forward(x, np.ones((2, 2, 3, 3), np.float32), None, 1, 1, np, {}, OPS)
    assert calls


@pytest.mark.parametrize("kernel", ["flat", "im2col"])
@pytest.mark.parametrize("bad", ["dtype", "layout", "int"])
def test_the_kernels_refuse_mixed_dtypes_non_contiguous_and_integer_arrays(kernel, bad):
    x = np.ones((2, 2, 6, 6), np.float32)
    w = np.ones((2, 2, 3, 3), np.float32)
    y = np.zeros((2, 2, 4, 4), np.float32)
    if bad == "dtype":
        w = w.astype(np.float64)
    elif bad == "layout":
        x = np.ones((2, 2, 6, 12), np.float32)[..., ::2]
    else:
        x, w, y = x.astype(np.int32), w.astype(np.int32), y.astype(np.int32)
    with pytest.raises(TypeError, match="C-contiguous and all float32 or all float64"):
        if kernel == "flat":
            flat.flat_conv_forward(x, w, None, slice(0, 2), y)
        else:
            im2col.conv_forward(x, w, None, slice(0, 2), 1, 0, True, y)
