"""The fused dense BN + ReLU block (numba backend) against the same layers run one by one.

The block runs the backend's own dense BN kernels with the ReLU in the same call, so everything
(outputs, gradients, running buffers) must equal the unfused layers bit for bit, NaN, infinities
and the sign of zero included.
"""
import numpy as np
import pytest

from arraybn.backends import available_backends, get_backend
from arraybn.nn import build_model
from arraybn.nn.batchnorm import BatchNorm
from arraybn.nn.fused import FusedBNBlock, fuse_bn_blocks
from arraybn.nn.layers import Dense, Dropout, ReLU

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="needs numba")

CHANNELS = 7


def _pair(position, dtype, **bn_options):
    """(fused, unfused reference) blocks of a BN with a ReLU before or after it."""
    be, ops = get_backend("numba"), get_backend("numba").conv_ops()
    blocks = []
    for _ in range(2):
        bn = BatchNorm("bn3", CHANNELS, backend=be, dtype=dtype, **bn_options)
        rng = np.random.default_rng(1)
        bn.weight.data[...] = rng.uniform(0.5, 1.5, CHANNELS)
        bn.bias.data[...] = rng.uniform(-0.5, 0.5, CHANNELS)
        relu = ReLU(np, inplace=True)
        blocks.append(FusedBNBlock([bn, relu] if position == "before" else [relu, bn], ops,
                                   dense=True))
    blocks[1].unfused = True
    return blocks


def _assert_identical(got, want):
    """Equal values, NaN where NaN, and the same sign of every zero."""
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def _steps(block, xs, gys, training):
    out = []
    for x, gy in zip(xs, gys):
        y = block.forward(x.copy(), training)
        assert block._cache[0] == ("unfused" if block.unfused else "fused")
        gx = block.backward(gy.copy())
        out.append([y, gx] + [p.grad for p in block.parameters()]
                   + [np.asarray(value) for _, value in block.bn.buffers()])
    return out


def _data(dtype, n=12, seed=2):
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal((n, CHANNELS)) * (k + 1) + 0.3).astype(dtype) for k in range(3)]
    gys = [rng.standard_normal((n, CHANNELS)).astype(dtype) for _ in range(3)]
    return xs, gys


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("bn_options", [
    {}, {"kind": "mean-only"}, {"momentum": None}, {"track_running_stats": False}],
    ids=["full", "mean-only", "cumulative", "no-running"])
def test_training_steps_equal_the_unfused_layers_bit_for_bit(dtype, position, bn_options):
    fused, reference = _pair(position, dtype, **bn_options)
    xs, gys = _data(dtype)
    for got, want in zip(_steps(fused, xs, gys, True), _steps(reference, xs, gys, True)):
        for a, b in zip(got, want):
            _assert_identical(a, b)
    assert fused.bn.num_batches_tracked == reference.bn.num_batches_tracked


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("kind", ["full", "mean-only"])
@pytest.mark.parametrize("eval_stats", ["running", "batch"])
def test_inference_equals_the_unfused_layers_bit_for_bit(dtype, position, kind, eval_stats):
    fused, reference = _pair(position, dtype, kind=kind)
    for block in (fused, reference):
        block.bn.use_statistics(np.linspace(-0.2, 0.3, CHANNELS), np.linspace(0.5, 2, CHANNELS))
        block.bn.eval_stats = eval_stats
    xs, gys = _data(dtype)
    for got, want in zip(_steps(fused, xs, gys, False), _steps(reference, xs, gys, False)):
        for a, b in zip(got, want):
            _assert_identical(a, b)


@pytest.mark.parametrize("position", ["before", "after"])
def test_special_values_pass_as_through_the_unfused_layers(position):
    """Exact zeros of both signs, ties at zero after the BN and non-finite gradients: the ReLU's
    select, its mask and its multiply must treat them as NumPy does."""
    fused, reference = _pair(position, np.float32, kind="mean-only")
    for block in (fused, reference):
        block.bn.weight.data[...] = 1.0
        block.bn.bias.data[...] = 0.0
    x = np.tile(np.array([[-0.0], [0.0], [-1.0], [1.0]], np.float32), (1, CHANNELS))
    gy = np.tile(np.array([[np.nan], [np.inf], [-0.0], [-2.0]], np.float32), (1, CHANNELS))
    with np.errstate(invalid="ignore"):
        got = _steps(fused, [x], [gy], True)[0]
        want = _steps(reference, [x], [gy], True)[0]
    for a, b in zip(got, want):
        _assert_identical(a, b)


@pytest.mark.parametrize("position", ["before", "after"])
def test_nan_inputs_in_inference_pass_through_like_the_unfused_layers(position):
    fused, reference = _pair(position, np.float32)
    for block in (fused, reference):
        block.bn.use_statistics(np.zeros(CHANNELS), np.ones(CHANNELS))
    xs, gys = _data(np.float32)
    xs[0][1, :3] = [np.nan, np.inf, -np.inf]
    with np.errstate(invalid="ignore"):
        got, want = _steps(fused, xs, gys, False)[0], _steps(reference, xs, gys, False)[0]
    assert np.isnan(want[0]).any()
    for a, b in zip(got, want):
        _assert_identical(a, b)


def test_non_finite_statistics_name_the_layer_and_change_nothing():
    fused, _ = _pair("before", np.float32)
    x = _data(np.float32)[0][0]
    x[3, 2] = np.inf
    before = fused.bn.running_mean.copy()
    with pytest.raises(Exception, match=r"bn3: non-finite batch statistics in channel\(s\) 2"):
        fused.forward(x, True)
    np.testing.assert_array_equal(fused.bn.running_mean, before)
    assert fused.bn.num_batches_tracked == 0


def test_a_strided_input_takes_the_unfused_path_with_the_same_result():
    fused, reference = _pair("before", np.float32)
    wide = np.repeat(_data(np.float32)[0][0], 2, axis=1)
    y_f = fused.forward(wide[:, ::2], True)
    assert fused._cache[0] == "unfused"
    np.testing.assert_array_equal(y_f, reference.forward(wide[:, ::2].copy(), True))


def test_lenet5_and_the_mlp_fuse_their_dense_blocks():
    lenet = build_model("lenet5", backend="numba", bn_position="after")
    dense = [layer for layer in lenet.layers if getattr(layer, "dense", False)]
    assert [block.name for block in dense] == ["bn3", "bn4"]
    assert all(block.relu_before and not block.relu_after and block.k == 1 for block in dense)
    mlp = build_model("mlp", backend="numba", hidden=[16, 8])
    assert sum(getattr(layer, "dense", False) for layer in mlp.layers) == 2


def test_a_dropout_between_dense_and_bn_keeps_the_layers_apart():
    be, rng = get_backend("numba"), np.random.default_rng(0)
    fc = Dense("fc1", 4, CHANNELS, bias=False, rng=rng, xp=np, dtype=np.float32)
    bn = BatchNorm("bn1", CHANNELS, backend=be)
    layers = [fc, Dropout(0.5, rng, np), bn, ReLU(np, inplace=True)]
    assert fuse_bn_blocks(layers, be) == layers


def test_the_kernels_refuse_inputs_they_do_not_cover():
    ops = get_backend("numba").conv_ops()
    ones = np.ones(CHANNELS)
    x = np.ones((4, CHANNELS), np.float32)
    for bad in (x.reshape(4, CHANNELS, 1, 1), x.astype(np.int32), np.asfortranarray(
            np.ones((4, CHANNELS + 1), np.float32))[:, :CHANNELS]):
        with pytest.raises(TypeError, match="C-contiguous float32/float64 NumPy array"):
            ops.bn_dense_train_forward(bad, ones, ones, 1e-5, False, 0.1, None, None, True)
    with pytest.raises(ValueError, match=r"per-channel values must have shape \(7,\)"):
        ops.bn_dense_forward(x, ones, ones[:3], ones, True)
    with pytest.raises(ValueError, match="a dense block has no pooling"):
        ops.bn_dense_forward(x, ones, ones, ones, True, 2)
    y, mask, mean, var, inv_std = ops.bn_dense_train_forward(x + np.arange(4)[:, None], ones,
                                                             ones, 1e-5, False, 0.1, None, None,
                                                             True)
    with pytest.raises(ValueError, match="must have x's shape"):
        ops.bn_dense_backward(y[:2], x, mask, mean, inv_std, inv_std, True, False)
