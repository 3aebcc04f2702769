"""The inference epilogue (numba backend): a ConvBNBlock without pooling applies its BN, ReLU and
a residual block's sum + ReLU to each image's convolution output inside the convolution's
kernels (``numba_conv_epilogue``). Its logits must equal the layers' own bit for bit, special
values included, on any number of threads; a backward after it must equal theirs; where it does
not apply the layers run."""
import numba
import numpy as np
import pytest

from arraybn.backends import available_backends, get_backend
from arraybn.core.errors import NonFiniteStatisticsError
from arraybn.nn import build_model
from arraybn.nn.conv import conv2d_inference
from arraybn.nn.conv_bn_block import ConvBNBlock

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="needs numba")

MODELS = [("resnet", dict(depth=8)), ("vgg8", dict(dropout=0.0)), ("plain", dict(depth=4))]


def _blocks(layers):
    for layer in layers:
        if isinstance(layer, ConvBNBlock):
            yield layer
        else:
            yield from _blocks(layer.sublayers())


def _pair(name, seed=0, **options):
    """(model, reference) with the same weights and random running statistics and BN
    parameters; the reference's ConvBNBlocks always run their layers."""
    models = [build_model(name, backend="numba", seed=seed, **options) for _ in range(2)]
    rng = np.random.default_rng(seed + 1)
    for (_, bn), (_, bn_r) in zip(*(m.bn_layers() for m in models)):
        c = bn.running_mean.shape[0]
        values = (rng.standard_normal(c), rng.random(c) + 0.5, rng.random(c) + 0.5,
                  rng.standard_normal(c) * 0.1)
        for layer in (bn, bn_r):
            for array, value in zip((layer.running_mean, layer.running_var, layer.weight.data,
                                     layer.bias.data), values):
                array[...] = value
    for block in _blocks(models[1].layers):
        block.fused = False
    return models


def _used(model):
    """How many ConvBNBlocks ran their last forward as an epilogue."""
    return sum(getattr(b, "_cache", None) is not None and b._cache[0] == "inference"
               for b in _blocks(model.layers))


def _images(n, dtype, seed=3):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(dtype)


def _same_bits(a, b):
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("name, options", MODELS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bn", ["full", "mean-only"])
def test_inference_logits_equal_the_layers_bit_for_bit(name, options, dtype, bn):
    model, reference = _pair(name, bn=bn, dtype=dtype, **options)
    x = _images(5, dtype)
    logits = model.forward(x, training=False)
    expected = {"resnet": 9, "vgg8": 3, "plain": 4}[name]    # blocks without pooling
    assert _used(model) == expected
    _same_bits(logits, reference.forward(x, training=False))


def test_special_values_equal_the_layers():
    """NaN, infinities and huge values: the fused ReLU turns NaN into 0, the residual sum's
    ReLU lets it pass, as the layers do."""
    model, reference = _pair("resnet", depth=8)
    x = _images(4, np.float32)
    x[0, 0, 3, 4], x[1, 0, 10, 10], x[2, 0, 20, 5] = np.nan, np.inf, -np.inf
    x[3] *= 1e30
    logits = model.forward(x, training=False)
    assert _used(model) == 9
    _same_bits(logits, reference.forward(x, training=False))
    assert np.isnan(logits).any()


def test_the_results_do_not_depend_on_the_number_of_threads():
    x = _images(37, np.float32)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            results.append(_pair("resnet", depth=8)[0].forward(x, training=False))
    finally:
        numba.set_num_threads(before)
    _same_bits(*results)


def test_a_backward_after_an_inference_forward_equals_the_layers():
    """Gradients of an evaluated model (e.g. with respect to its running statistics' fit):
    the blocks run their layers' forward again first."""
    model, reference = _pair("resnet", depth=8)
    x = _images(6, np.float32)
    g = np.random.default_rng(4).standard_normal((6, 10)).astype(np.float32)
    for m in (model, reference):
        m.forward(x, training=False)
        m.backward(g)
    for p, p_r in zip(model.parameters(), reference.parameters()):
        _same_bits(p.grad, p_r.grad)
    # a training step right after an inference forward (a validation) is an ordinary one
    for m in (model, reference):
        m.forward(x, training=False)
        m.forward(x, training=True)
        m.backward(g)
    for p, p_r in zip(model.parameters(), reference.parameters()):
        _same_bits(p.grad, p_r.grad)


@pytest.mark.parametrize("options, used", [(dict(bn_position="after"), 5),
                                           (dict(bn="ghost"), 0), (dict(bn="none"), 0)])
def test_blocks_the_epilogue_does_not_cover_run_their_layers(options, used):
    """A ReLU before the BN (ResNet-8's stem and branch conv1s; its conv2s and shortcuts have
    none), a BN kind the fused blocks do not run, no BN at all."""
    model, reference = _pair("resnet", depth=8, **options)
    x = _images(3, np.float32)
    logits = model.forward(x, training=False)
    assert _used(model) == used
    _same_bits(logits, reference.forward(x, training=False))


def test_batch_statistics_in_inference_run_the_layers():
    model, reference = _pair("plain", depth=4)
    for m in (model, reference):
        for _, bn in m.bn_layers():
            bn.eval_stats = "batch"
    x = _images(4, np.float32)
    logits = model.forward(x, training=False)
    assert _used(model) == 0
    _same_bits(logits, reference.forward(x, training=False))


def test_unusable_running_statistics_raise_as_in_the_layers():
    errors = []
    for model in _pair("plain", depth=4):
        model.bn_layers()[1][1].running_var[0] = np.nan
        with pytest.raises(NonFiniteStatisticsError) as info:
            model.forward(_images(2, np.float32), training=False)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_the_kernels_reject_a_misfit_epilogue():
    ops = get_backend("numba").conv_ops()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = np.empty((2, 4, 8, 8), np.float32)
    ones = np.ones(4)
    call = (x, weight, None, [slice(0, 2)], 1, 1, "image", y)
    with pytest.raises(ValueError, match="must have shape"):
        ops.conv_forward(*call, (ones[:3], ones, ones, True, None))
    for skip in (np.zeros((2, 4, 8, 7), np.float32), np.zeros(y.shape),
                 np.zeros((2, 4, 8, 16), np.float32)[..., ::2], y.tolist()):
        with pytest.raises(ValueError, match="skip must be"):
            ops.conv_forward(*call, (ones, ones, ones, True, skip))
    flat = (x, weight, None, [slice(0, 2)], 1, 0, "flat", np.empty((2, 4, 6, 6), np.float32))
    with pytest.raises(ValueError, match="no epilogue"):
        ops.conv_forward(*flat, (ones, ones, ones, True, None))
    # where the kernels do not take it, the layer hears None and runs the layers
    misfit = (ones, ones, ones, True, np.zeros((2, 4, 4, 4), np.float32))
    assert conv2d_inference(x, weight, None, 1, 1, np, ops, misfit) is None
    assert conv2d_inference(x, weight, None, 1, 0, np, ops, misfit[:4] + (None,)) is None


def test_the_epilogue_is_the_block_on_the_convolution_output():
    """Kernel level, against NumPy: (x - center) * a + b in float64 rounded once, the ReLU,
    then the sum with the skip rounded once and NumPy's maximum."""
    rng = np.random.default_rng(2)
    ops = get_backend("numba").conv_ops()
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    weight = rng.standard_normal((5, 2, 3, 3)).astype(np.float32)
    plain = np.empty((3, 5, 6, 6), np.float32)
    ops.conv_forward(x, weight, None, [slice(0, 3)], 1, 1, "image", plain)
    center, a, b = rng.standard_normal(5), rng.random(5), rng.standard_normal(5)
    skip = rng.standard_normal(plain.shape).astype(np.float32)
    skip[0, 0, 0, :3] = np.nan, -0.0, np.inf
    for relu in (False, True):
        bn = ((plain.astype(np.float64) - center[:, None, None]) * a[:, None, None]
              + b[:, None, None]).astype(np.float32)
        if relu:
            bn = np.where(bn > 0, bn, np.float32(0))
        for extra in (None, skip):
            y = np.empty_like(plain)
            ops.conv_forward(x, weight, None, [slice(0, 3)], 1, 1, "image", y,
                             (center, a, b, relu, extra))
            expected = bn if extra is None else np.maximum(bn + extra, np.float32(0))
            _same_bits(y, expected)
