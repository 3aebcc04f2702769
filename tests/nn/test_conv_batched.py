"""Convolution as one GEMM over the whole batch: layout, agreement with a direct sum, padding read
as zeros without a padded copy, numba == numpy bit for bit, gradients."""
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
def test_conv_forward_and_backward_match_the_direct_sum_float64(rng, backend, k, stride, pad):
    be = arraybn.get_backend(backend)
    layer = Conv2d("conv", 3, 4, k, stride=stride, padding=pad, bias=True, rng=rng, backend=be,
                   dtype=np.float64)
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


@pytest.mark.parametrize("k,stride,pad", GEOMETRIES)
def test_numba_conv_equals_numpy_conv_float32(rng, k, stride, pad):
    """The same conv code on both backends: bit-identical, and within float32 rounding of the
float64 direct sum."""
    _need_numba()
    layers = [Conv2d("conv", 3, 6, k, stride=stride, padding=pad, bias=False,
                     rng=np.random.default_rng(1), backend=arraybn.get_backend(name),
                     dtype=np.float32) for name in ("numpy", "numba")]
    x = rng.standard_normal((4, 3, 10, 9)).astype(np.float32)
    ys = [layer.forward(x, True) for layer in layers]
    np.testing.assert_array_equal(ys[0], ys[1])
    gy = rng.standard_normal(ys[0].shape).astype(np.float32)
    gxs = [layer.backward(gy) for layer in layers]
    np.testing.assert_array_equal(gxs[0], gxs[1])
    np.testing.assert_array_equal(layers[0].weight.grad, layers[1].weight.grad)
    reference = direct_conv(x, layers[0].weight.data, None, stride, pad)
    scale = direct_conv(np.abs(x), np.abs(layers[0].weight.data), None, stride, pad)
    fan_in = 3 * k * k
    assert np.all(np.abs(ys[0] - reference) <= fan_in * np.finfo(np.float32).eps * scale)


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


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (1, 2, 0), (3, 2, 1)])
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
