"""Convolution as im2col + GEMMs over chunks of the batch: layout, agreement with a direct sum in
every chunk layout (one GEMM per chunk, one per image, one per image on the flattened plane) and
with chunks of any size, padding read as zeros without a padded copy, numba == numpy bit for bit,
gradients."""
import numpy as np
import pytest

import arraybn
from arraybn.nn import Conv2d
from arraybn.nn import conv as plain
from tests.nn.gradcheck import assert_grad_close

NUMPY = arraybn.get_backend("numpy")
GEOMETRIES = [(3, 1, 1), (3, 1, 0), (3, 2, 1), (1, 2, 0), (1, 1, 0), (5, 3, 2), (2, 2, 0)]


def _backends():
    return ["numpy"] + (["numba"] if "numba" in arraybn.available_backends() else [])


@pytest.fixture(params=["one chunk, one GEMM", "one chunk, per image", "chunks of 2, one GEMM each",
                        "chunks of 2, per image", "chunks of 2, per image, never flat",
                        "chunks of 2 on 3 threads, one GEMM each",
                        "chunks of 2 on 3 threads, per image"])
def layout(request, monkeypatch, chunk_threads):
    """Force the chunk size, the chunk layout that the geometry would otherwise pick (per
    image: flat where stride 1 and no padding allow it, unless 'never flat') and, for '3
    threads', chunks on 3 threads."""
    if "chunks of 2" in request.param:
        monkeypatch.setattr(plain, "CHUNK_BYTES", 1)
        monkeypatch.setattr(plain, "MIN_CHUNK_COLUMNS", 1)
        monkeypatch.setattr(plain, "batch_chunks", _pairs)
    if "3 threads" in request.param:
        chunk_threads(3)
    per_image = "per image" in request.param
    monkeypatch.setattr(plain, "PER_IMAGE_MIN_POSITIONS", 0 if per_image else 10 ** 9)
    monkeypatch.setattr(plain, "PER_IMAGE_MAX_ROWS", 10 ** 9 if per_image else -1)
    if "never flat" in request.param:
        monkeypatch.setattr(plain, "_flat_windows", lambda stride, pad: False)
    return request.param


def _pairs(n, column_bytes, positions, xp, multiple=1):
    """Chunks of two images (the last one alone when n is odd): two buffer sizes in turn."""
    return [slice(lo, min(n, lo + 2)) for lo in range(0, n, 2)]


def _need_numba():
    if "numba" not in arraybn.available_backends():
        pytest.skip("the numba backend is not available here")


def direct_conv(x, w, b, stride, pad):
    """The obviously correct convolution: one einsum per output position, float64."""
    n, _, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    xp_ = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    y = np.zeros((n, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp_[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            y[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w.astype(np.float64))
    return y if b is None else y + b[:, None, None]


def test_im2col_lays_out_the_whole_batch_for_one_gemm(rng):
    x = rng.standard_normal((3, 2, 5, 4))
    cols = plain.im2col(x, 3, 3, 1, 1, np)
    assert cols.shape == (2 * 3 * 3, 3 * 5 * 4)
    xp_ = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    # row (c, ki, kj), column (n, i, j) holds x_padded[n, c, i + ki, j + kj]
    assert cols[(1 * 3 + 2) * 3 + 0, (2 * 5 + 4) * 4 + 1] == xp_[2, 1, 4 + 2, 1 + 0]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k,stride,pad", GEOMETRIES)
def test_conv_forward_and_backward_match_the_direct_sum_float64(rng, backend, k, stride, pad,
                                                                 layout):
    be = arraybn.get_backend(backend)
    layer = Conv2d("conv", 3, 4, k, stride=stride, padding=pad, bias=True, rng=rng, backend=be,
                   dtype=np.float64)
    layer.forward(rng.standard_normal((5, 3, 9, 8)), True)    # dirty the reused buffers first
    x = rng.standard_normal((5, 3, 9, 8))
    w, b = layer.weight.data, layer.bias.data
    y = layer.forward(x, True)
    assert y.flags.c_contiguous
    np.testing.assert_allclose(y, direct_conv(x, w, b, stride, pad), rtol=1e-12, atol=1e-13)
    gy = rng.standard_normal(y.shape)
    gx = layer.backward(gy)
    # the adjoint identities: <gy, conv(x)> is linear in x and in w
    expected_gw = np.einsum("noij,noij->", gy, direct_conv(x, np.ones_like(w), None, stride, pad))
    assert layer.weight.grad.sum() == pytest.approx(expected_gw, rel=1e-12)
    np.testing.assert_allclose(layer.bias.grad, gy.sum(axis=(0, 2, 3)), rtol=1e-12)
    assert np.vdot(gx, x) == pytest.approx(np.vdot(gy, direct_conv(x, w, None, stride, pad)),
                                           rel=1e-11)


def _numba_sums_its_own_way(c, o, k, stride, pad, hw, out_hw):
    """Whether the numba backend runs some of this float32 convolution's products on
    ``numba_gemm`` (its own order of sums), not OpenBLAS's GEMMs as the NumPy path does."""
    from arraybn.backends import numba_across_chunk as across_chunk
    from arraybn.backends import numba_im2col_conv as im2col
    rows, dtype = c * k * k, np.dtype(np.float32)
    layout = plain._layout(c, k, k, stride, pad, out_hw[0] * out_hw[1])
    return layout != "flat" and (im2col.own_gemm(dtype, o, rows) or im2col.own_dots(dtype, o, rows)
                                 or across_chunk.applies(dtype, layout == "image", stride, *hw,
                                                         *out_hw))


@pytest.mark.parametrize("k,stride,pad", GEOMETRIES)
def test_numba_conv_equals_numpy_conv_float32(rng, k, stride, pad):
    """The same conv code on both backends: bit-identical where both run OpenBLAS's GEMMs,
    close where the numba backend runs ``numba_gemm``, and both within float32 rounding of the
    float64 direct sum."""
    _need_numba()
    layers = [Conv2d("conv", 3, 6, k, stride=stride, padding=pad, bias=False,
                     rng=np.random.default_rng(1), backend=arraybn.get_backend(name),
                     dtype=np.float32) for name in ("numpy", "numba")]
    x = rng.standard_normal((4, 3, 10, 9)).astype(np.float32)
    ys = [layer.forward(x, True) for layer in layers]
    own = _numba_sums_its_own_way(3, 6, k, stride, pad, x.shape[2:], ys[0].shape[2:])

    def same(got, want):
        if own:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got, want)
    same(ys[1], ys[0])
    gy = rng.standard_normal(ys[0].shape).astype(np.float32)
    gxs = [layer.backward(gy) for layer in layers]
    same(gxs[1], gxs[0])
    same(layers[1].weight.grad, layers[0].weight.grad)
    reference = direct_conv(x, layers[0].weight.data, None, stride, pad)
    scale = direct_conv(np.abs(x), np.abs(layers[0].weight.data), None, stride, pad)
    fan_in = 3 * k * k
    for y in ys:
        assert np.all(np.abs(y - reference) <= fan_in * np.finfo(np.float32).eps * scale)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (5, 1, 4), (3, 2, 3), (2, 3, 1)])
def test_im2col_reads_the_padding_as_zeros(rng, k, stride, pad):
    """Windows that lie partly or wholly on the padding (pad >= k included) against a padded
    copy; the buffer starts dirty, as a reused one is."""
    x = rng.standard_normal((2, 3, 5, 4))
    xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (5 + 2 * pad - k) // stride + 1, (4 + 2 * pad - k) // stride + 1
    out = np.full((3, k, k, 2, oh, ow), np.nan)
    cols = plain.im2col(x, k, k, stride, pad, np, out).reshape(3, k, k, 2, oh, ow)
    for ki in range(k):
        for kj in range(k):
            expected = xp_[:, :, ki:ki + stride * (oh - 1) + 1:stride,
                           kj:kj + stride * (ow - 1) + 1:stride].transpose(1, 0, 2, 3)
            np.testing.assert_array_equal(cols[:, ki, kj], expected)


@pytest.mark.parametrize("kh,kw", [(3, 3), (2, 4), (1, 1)])
def test_flat_columns_hold_the_windows_and_add_back_in_the_same_order(rng, kh, kw):
    """Stride 1, no padding: the flattened plane's columns are im2col's where j < OW, and adding
    them back (wrapped-around columns zero) gives col2im's sums bit for bit, float32."""
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    oh, ow = 6 - kh + 1, 7 - kw + 1
    flat = np.zeros((2, 3, kh, kw, oh * 7), np.float32)
    plain.fill_flat_columns(x, flat)
    flat6 = flat.reshape(2, 3, kh, kw, oh, 7)
    cols = plain.im2col(x, kh, kw, 1, 0, np).reshape(3, kh, kw, 2, oh, ow)
    np.testing.assert_array_equal(flat6[..., :ow], cols.transpose(3, 0, 1, 2, 4, 5))
    grad = rng.standard_normal(flat6.shape).astype(np.float32)
    grad[..., ow:] = 0
    gx = np.zeros(x.shape, np.float32)
    plain.add_flat_columns(grad.reshape(flat.shape), gx)
    expected = np.zeros(x.shape, np.float32)
    plain.add_columns(np.ascontiguousarray(grad[..., :ow]).transpose(1, 2, 3, 0, 4, 5), expected,
                      1, 0)
    np.testing.assert_array_equal(gx, expected)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (1, 2, 0), (3, 2, 1), (3, 1, 0)])
def test_conv_gradients_by_centred_differences(rng, backend, k, stride, pad):
    layer = Conv2d("conv", 3, 4, k, stride=stride, padding=pad, bias=True, rng=rng,
                   backend=arraybn.get_backend(backend), dtype=np.float64)
    x = rng.standard_normal((3, 3, 7, 6))
    r = rng.standard_normal(layer.forward(x, True).shape)
    gx = layer.backward(r)

    def loss():
        return float((layer.forward(x, True) * r).sum())

    assert_grad_close(loss, x, gx, rng)
    for p in layer.parameters():
        assert_grad_close(loss, p.data, p.grad, rng)


@pytest.mark.parametrize("n,column_bytes,positions,multiple,expected", [
    (100, 288 * 784 * 4, 784, 1, [1] * 100),      # columns of 0.9 MB an image: one a chunk
    (100, 9 * 676 * 4, 676, 1, [33, 33, 34]),       # 24 KB an image: 43 fit, sizes evened out
    (5, 1 << 30, 2048, 1, [1] * 5),                # bigger than the budget: one image a chunk
    (3, 4, 4, 1, [3]),                             # all of a small batch in one chunk
    (0, 36, 9, 1, [0]),                            # an empty batch is one empty chunk
    (100, 1152 * 49 * 4, 49, 4, [6, 6, 6, 7] * 4),  # VGG-8 conv6: 17 chunks of 6 -> 16
    (100, 288 * 196 * 4, 196, 4, [4, 4, 4, 4, 4, 5] * 4),  # VGG-8 conv3: 25 of 4 -> 24
    (100, 9 * 676 * 4, 676, 4, [25] * 4),          # 3 chunks -> 4: every thread gets a share
    (3, 4, 4, 4, [1] * 3),                         # ... as far as the batch allows
])
def test_batch_chunks_cover_the_batch_in_even_cache_sized_pieces(n, column_bytes, positions,
                                                                  multiple, expected):
    chunks = plain.batch_chunks(n, column_bytes, positions, np, multiple)
    assert [c.stop - c.start for c in chunks] == expected
    assert chunks[0].start == 0 and chunks[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))


def test_the_chunk_plan_is_kept_per_geometry_and_follows_changed_settings(monkeypatch):
    x, weight_shape = np.zeros((8, 3, 10, 10), np.float32), (4, 3, 3, 3)
    first = plain._chunks(x, weight_shape, 1, 0, np)
    assert plain._chunks(x.copy(), weight_shape, 1, 0, np) is first       # kept
    assert len(first[0]) == 4 and not first[1]
    assert len(plain._chunks(x[:4], weight_shape, 1, 0, np)[0]) == 4      # another batch size
    monkeypatch.setattr(plain, "CHUNK_BYTES", 1)
    monkeypatch.setattr(plain, "MIN_CHUNK_COLUMNS", 1)
    assert plain._chunks(x, weight_shape, 1, 0, np)[0] == tuple(slice(i, i + 1) for i in range(8))
    monkeypatch.setattr(plain.chunk_threads, "MIN_PARALLEL_FLOPS", 0)
    assert plain._chunks(x, weight_shape, 1, 0, np)[1]
    monkeypatch.setattr(plain, "batch_chunks", _pairs)
    assert len(plain._chunks(x, weight_shape, 1, 0, np)[0]) == 4


def test_batch_chunks_leave_a_gpu_batch_whole():
    class FakeCupy:
        pass
    assert plain.batch_chunks(100, 1 << 20, 784, FakeCupy()) == [slice(0, 100)]


@pytest.mark.parametrize("shape,weight,stride,pad,expected", [
    ((128, 1, 28, 28), (6, 1, 3, 3), 1, 0, "flat"),          # LeNet-5 conv1: many positions
    ((128, 6, 13, 13), (16, 6, 3, 3), 1, 0, "flat"),         # LeNet-5 conv2: 54 im2col rows
    ((100, 32, 28, 28), (32, 32, 3, 3), 1, 1, "image"),      # VGG-8 conv2: 784 positions
    ((100, 16, 28, 28), (32, 16, 1, 1), 2, 0, "image"),      # a 1x1 shortcut: 16 rows
    ((100, 64, 14, 14), (64, 64, 3, 3), 1, 1, "chunk"),      # VGG-8 conv4: 196 positions
    ((100, 128, 7, 7), (128, 128, 3, 3), 1, 1, "chunk"),     # VGG-8 conv6: 576+ rows
])
def test_the_chunk_layout_follows_the_geometry(shape, weight, stride, pad, expected):
    x = np.zeros((2,) + shape[1:], np.float32)
    rows, (h, w), k = weight[1] * weight[2] * weight[3], shape[2:], weight[2]
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = plain._chunk_columns(x, *weight[2:], stride, pad, np, None)
    assert cols.shape == {"flat": (2, rows, oh * w), "image": (2, rows, oh * ow),
                          "chunk": (rows, 2 * oh * ow)}[expected]


def test_chunked_float32_agrees_with_one_chunk_to_rounding(rng, monkeypatch):
    """Chunks change only the order in which the weight gradient's terms are added."""
    x = rng.standard_normal((7, 3, 10, 9)).astype(np.float32)
    gy = rng.standard_normal((7, 4, 10, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)

    def run():
        y, cache = plain.conv2d_forward(x, w, None, 1, 1, np)
        return (y,) + plain.conv2d_backward(gy, cache, np)[:2]

    whole = run()
    monkeypatch.setattr(plain, "batch_chunks", _pairs)
    chunked = run()
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_allclose(chunked[2], whole[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_a_same_convolutions_input_gradient_as_a_forward_convolution_equals_col2ims(
        rng, monkeypatch, k, dtype, rtol):
    """stride 1, padding (k - 1) / 2: gy convolved with the flipped, transposed weights; the
    column path (col2im) as the reference, element by element."""
    x = rng.standard_normal((6, 3, 7, 9)).astype(dtype)
    w = rng.standard_normal((5, 3, k, k)).astype(dtype)
    y, cache = plain.conv2d_forward(x, w, None, 1, (k - 1) // 2, np)
    gy = rng.standard_normal(y.shape).astype(dtype)
    assert plain._same_padding(k, k, 1, (k - 1) // 2)
    monkeypatch.setattr(plain, "_transposed_input_gradient", lambda *geometry: True)
    transposed = plain.conv2d_backward(gy, cache, np)[0]
    monkeypatch.setattr(plain, "_transposed_input_gradient", lambda *geometry: False)
    columns = plain.conv2d_backward(gy, cache, np)[0]
    scale = np.abs(columns).max()
    np.testing.assert_allclose(transposed, columns, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("k,stride,pad,same", [(3, 1, 1, True), (1, 1, 0, True), (3, 1, 0, False),
                                               (3, 2, 1, False), (5, 1, 1, False),
                                               (1, 2, 0, False)])
def test_only_same_convolutions_take_the_transposed_input_gradient(k, stride, pad, same):
    assert plain._same_padding(k, k, stride, pad) is same
    for layout in ("image", "flat"):
        assert plain._transposed_input_gradient(k, k, stride, pad, layout) is same
    assert not plain._transposed_input_gradient(k, k, stride, pad, "chunk")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k,stride,pad", GEOMETRIES)
def test_an_empty_batch_trains_through_every_layout(backend, k, stride, pad, layout):
    """A rank with an empty shard of the batch (data-parallel training) runs forward and
    backward on N = 0: empty y and gx, zero weight and bias gradients, in every chunk layout
    (reshapes of an empty chunk once failed on an inferred axis)."""
    conv = Conv2d("c", 3, 4, k, stride=stride, padding=pad, bias=True,
                  rng=np.random.default_rng(0), backend=arraybn.get_backend(backend),
                  dtype=np.float32)
    y = conv.forward(np.zeros((0, 3, 9, 9), np.float32), True)
    gx = conv.backward(np.zeros_like(y))
    assert y.shape[0] == 0 and gx.shape == (0, 3, 9, 9)
    assert not conv.weight.grad.any() and not conv.bias.grad.any()
    assert conv.weight.grad.shape == conv.weight.data.shape
