"""The deep models' layers: GroupNorm, global average pooling and the residual block against
centred differences (float64) and direct formulas; their errors."""
import numpy as np
import pytest

import arraybn
from arraybn.nn import BatchNorm, Conv2d, ReLU
from arraybn.nn.groupnorm import GroupNorm, default_groups
from arraybn.nn.residual import GlobalAvgPool2d, ResidualBlock
from tests.conftest import to_backend, to_host
from tests.nn.test_layers import _check_layer

NUMPY = arraybn.get_backend("numpy")


def _group_norm_reference(x, gamma, beta, groups, eps):
    """Straight from the definition, per sample and group, in float64."""
    x = np.asarray(x, np.float64)
    y = np.empty_like(x)
    per_group = x.shape[1] // groups
    for n in range(x.shape[0]):
        for g in range(groups):
            part = x[n, g * per_group:(g + 1) * per_group]
            y[n, g * per_group:(g + 1) * per_group] = ((part - part.mean())
                                                     / np.sqrt(part.var() + eps))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return y * gamma.reshape(shape) + beta.reshape(shape)


@pytest.mark.parametrize("channels,groups", [(1, 1), (6, 6), (16, 16), (32, 32), (64, 32),
                                             (120, 30), (84, 28), (7, 7), (96, 32)])
def test_default_groups_is_32_when_it_divides_else_the_largest_divisor_below(channels, groups):
    assert default_groups(channels) == groups


@pytest.mark.parametrize("shape,groups", [((3, 6, 4, 3), 3), ((4, 8), 2), ((2, 4, 5), 4)])
def test_group_norm_gradients(rng, shape, groups):
    layer = GroupNorm("gn", shape[1], groups=groups, backend=NUMPY, dtype=np.float64)
    layer.weight.data[...] = rng.uniform(0.5, 2.0, shape[1])
    layer.bias.data[...] = rng.standard_normal(shape[1])
    _check_layer(layer, rng.standard_normal(shape) * 2 + 1, rng)


def test_group_norm_matches_the_definition_in_training_and_inference(cpu_backend, rng):
    x = rng.standard_normal((3, 6, 4, 5)) * 3 + 2
    layer = GroupNorm("gn", 6, groups=2, backend=cpu_backend, dtype=np.float64)
    layer.weight.data[...] = to_backend(cpu_backend, rng.uniform(0.5, 2.0, 6))
    layer.bias.data[...] = to_backend(cpu_backend, rng.standard_normal(6))
    expected = _group_norm_reference(x, to_host(layer.weight.data), to_host(layer.bias.data), 2,
                                     1e-5)
    for training in (True, False):
        got = to_host(layer.forward(to_backend(cpu_backend, x), training))
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_group_norm_float32_with_a_large_offset_keeps_the_variance(rng):
    x = (1e4 + rng.standard_normal((4, 8, 6, 6))).astype(np.float32)
    layer = GroupNorm("gn", 8, groups=4, backend=NUMPY, dtype=np.float32)
    y = layer.forward(x, True)
    assert y.dtype == np.float32
    expected = _group_norm_reference(x, np.ones(8), np.zeros(8), 4, 1e-5)
    np.testing.assert_allclose(y, expected, atol=2e-3)
    per_group = y.reshape(4, 4, -1)
    np.testing.assert_allclose(per_group.std(axis=2), 1.0, atol=1e-3)


def test_group_norm_errors_name_the_layer_and_say_what_to_do(rng):
    with pytest.raises(ValueError, match=r"gn: .*divides the 6 channels; got 4"):
        GroupNorm("gn", 6, groups=4, backend=NUMPY)
    layer = GroupNorm("gn", 6, groups=6, backend=NUMPY, dtype=np.float64)
    with pytest.raises(ValueError, match=r"gn: .*single value.*use fewer groups"):
        layer.forward(rng.standard_normal((4, 6)), True)
    with pytest.raises(ValueError, match=r"gn: .*\(N, 6, \.\.\.\); got shape \(4, 5, 3\)"):
        layer.forward(rng.standard_normal((4, 5, 3)), True)
    x = rng.standard_normal((2, 6, 3, 3))
    x[1, 0, 0, 0] = np.nan
    with pytest.raises(arraybn.NonFiniteStatisticsError, match="gn: .*NaN or infinite"):
        layer.forward(x, True)


def test_global_avg_pool_is_the_spatial_mean_and_its_gradient_checks(rng):
    x = rng.standard_normal((3, 4, 5, 6))
    layer = GlobalAvgPool2d(np)
    np.testing.assert_allclose(layer.forward(x, True), x.mean(axis=(2, 3)), rtol=1e-13)
    layer.backward(np.ones((3, 4)))
    _check_layer(layer, x, rng)
    y32 = layer.forward(x.astype(np.float32), True)
    assert y32.dtype == np.float32
    with pytest.raises(ValueError, match=r"\(N, C, H, W\); got shape \(3, 4\)"):
        layer.forward(x[:, :, 0, 0], True)


def _conv(name, cin, cout, k, rng, stride=1, padding=0, bias=False):
    return Conv2d(name, cin, cout, k, stride=stride, padding=padding, bias=bias, rng=rng,
                  backend=NUMPY, dtype=np.float64)


def _bn(name, channels):
    return BatchNorm(name, channels, backend=NUMPY, dtype=np.float64)


def test_residual_block_with_identity_shortcut_gradients(rng):
    """Without BN the branch ends in a convolution: the gradient reaching the sum is shared by
    both paths, so an in-place change by either would show here."""
    branch = [_conv("c1", 3, 3, 3, rng, padding=1, bias=True), ReLU(np, inplace=True),
              _conv("c2", 3, 3, 3, rng, padding=1, bias=True)]
    block = ResidualBlock(branch, [], np)
    x = rng.standard_normal((2, 3, 5, 5))
    _check_layer(block, x, rng)
    y = block.forward(x, True)
    np.testing.assert_allclose(y, np.maximum(
        branch[2].forward(np.maximum(branch[0].forward(x, True), 0), True) + x, 0), rtol=1e-12)


def test_residual_block_with_projection_shortcut_gradients(rng):
    branch = [_conv("c1", 2, 4, 3, rng, stride=2, padding=1), _bn("b1", 4),
              ReLU(np, inplace=True), _conv("c2", 4, 4, 3, rng, padding=1), _bn("b2", 4)]
    shortcut = [_conv("s", 2, 4, 1, rng, stride=2), _bn("sb", 4)]
    block = ResidualBlock(branch, shortcut, np)
    assert block.sublayers() == branch + shortcut
    assert [p.name for p in block.parameters()] == [
        "c1.weight", "b1.weight", "b1.bias", "c2.weight", "b2.weight", "b2.bias", "s.weight",
        "sb.weight", "sb.bias"]
    _check_layer(block, rng.standard_normal((3, 2, 6, 5)), rng)


def test_residual_block_shape_mismatch_asks_for_a_projection(rng):
    block = ResidualBlock([_conv("c1", 2, 4, 3, rng, padding=1)], [], np)
    with pytest.raises(ValueError, match="projection shortcut"):
        block.forward(rng.standard_normal((2, 2, 4, 4)), True)
    with pytest.raises(ValueError, match="at least one layer"):
        ResidualBlock([], [], np)


@pytest.mark.parametrize("stride,padding", [(2, 1), (2, 0)])
def test_strided_padded_conv_on_numba_matches_numpy(rng, stride, padding):
    if "numba" not in arraybn.available_backends():
        pytest.skip("the numba backend is not available here")
    layers = [Conv2d("c", 3, 4, k, stride=stride, padding=padding, bias=True,
                     rng=np.random.default_rng(1), backend=arraybn.get_backend(name),
                     dtype=np.float64) for name, k in (("numpy", 3), ("numba", 3))]
    x = rng.standard_normal((2, 3, 7, 8))
    gy = None
    results = []
    for layer in layers:
        y = layer.forward(x, True)
        gy = rng.standard_normal(y.shape) if gy is None else gy
        results.append((y, layer.backward(gy), layer.weight.grad))
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)

