"""LeNet-5's conv1 and conv2 with their fused BN blocks as one layer each (``ConvBNBlock``, numba
backend): the backward must equal the two layers' own backward bit for bit, and fall back to them
where its kernel does not apply."""
import numba
import numpy as np
import pytest

from arraybn.backends import available_backends, get_backend
from arraybn.nn import build_model
from arraybn.nn.conv import Conv2d
from arraybn.nn.conv_bn_block import ConvBNBlock
from arraybn.nn.fused import FusedBNBlock, fuse_bn_blocks
from arraybn.nn.layers import Flatten
from arraybn.nn.models import Network

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="needs numba")


def _pair(**options):
    """(model, reference): two LeNet-5s with the same weights; the reference's ConvBNBlocks
    always run their two layers' own backward."""
    models = [build_model("lenet5", backend="numba", dropout=0.0, **options) for _ in range(2)]
    for layer in _blocks(models[1]):
        layer.fused = False
    return models


def _blocks(model):
    return [layer for layer in model.layers if isinstance(layer, ConvBNBlock)]


def _counting(*layers):
    """Wrap the layers' kernels (before their first backward: they are kept once prepared);
    returns the list their calls append (gy's shape, gx or not)."""
    calls = []

    def counted(kernel):
        def call(*args):
            calls.append((args[0].shape, args[-1] is not None))
            return kernel(*args)
        return call
    for layer in layers:
        assert not layer._prepared
        layer._prepare = lambda *geometry, prepare=layer._prepare: counted(prepare(*geometry))
    return calls


def _step(model, x, g_logits, training=True):
    logits = model.forward(x, training)
    model.backward(g_logits)
    return logits, [p.grad.copy() for p in model.parameters()]


def _data(n, dtype, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 1, 28, 28)).astype(dtype),
            rng.standard_normal((n, 10)).astype(dtype))


def test_lenet5_has_two_blocks_and_keeps_its_layers():
    model = build_model("lenet5", backend="numba")
    first, second = model.layers[:2]
    assert _blocks(model) == [first, second]
    for layer in (first, second):
        conv, block = layer.sublayers()
        assert isinstance(conv, Conv2d) and isinstance(block, FusedBNBlock) and block.k == 2
    assert [p.name for p in first.parameters()] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert list(model.state_dict()) == list(build_model("lenet5", backend="numpy").state_dict())
    assert not first.need_input_grad and not first.conv.need_input_grad
    assert second.need_input_grad and second.conv.need_input_grad


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bn", ["full", "mean-only"])
@pytest.mark.parametrize("n", [2, 7, 128])
def test_training_steps_equal_the_two_layers_bit_for_bit(dtype, bn, n):
    model, reference = _pair(dtype=dtype, bn=bn)
    calls = _counting(*_blocks(model))
    for seed in (3, 4):                       # the second step after an SGD-free weight change
        x, g_logits = _data(n, dtype, seed)
        logits, grads = _step(model, x, g_logits)
        logits_r, grads_r = _step(reference, x, g_logits)
        np.testing.assert_array_equal(logits, logits_r)
        for p, g, g_r in zip(model.parameters(), grads, grads_r):
            np.testing.assert_array_equal(g, g_r, err_msg=p.name)
        for m in (model, reference):
            m.layers[0].conv.weight.data *= 1.5
    assert [gx for _, gx in calls] == [True, False] * 2         # conv2 with gx, conv1 without
    bn_model, bn_reference = model.bn_layers()[0][1], reference.bn_layers()[0][1]
    np.testing.assert_array_equal(bn_model.running_var, bn_reference.running_var)


def test_a_backward_after_an_inference_forward_equals_the_two_layers():
    """Constant statistics (running buffers): the BN's gx is scale * g, nothing centred."""
    model, reference = _pair()
    calls = _counting(*_blocks(model))
    x, g_logits = _data(16, np.float32)
    for m in (model, reference):
        m.forward(x, True)                                  # some running statistics
    logits, grads = _step(model, x, g_logits, training=False)
    logits_r, grads_r = _step(reference, x, g_logits, training=False)
    np.testing.assert_array_equal(logits, logits_r)
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_array_equal(g, g_r)
    assert len(calls) == 2


def test_special_values_pass_through_as_in_the_two_layers():
    model, reference = _pair()
    x, g_logits = _data(8, np.float32)
    for m in (model, reference):
        m.forward(x, True)
    x[0, 0, 3, 3], x[1, 0, 5, 5], x[2, 0, 7, 7] = np.nan, np.inf, -np.inf
    g_logits[3, 2] = np.inf
    with np.errstate(all="ignore"):
        _, grads = _step(model, x, g_logits, training=False)
        _, grads_r = _step(reference, x, g_logits, training=False)
    assert not np.isfinite(grads[0]).all()
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_array_equal(g, g_r)


def test_the_results_do_not_depend_on_the_number_of_threads():
    x, g_logits = _data(128, np.float32)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            results.append(_step(build_model("lenet5", backend="numba"), x, g_logits)[1])
    finally:
        numba.set_num_threads(before)
    for g_1, g_n in zip(*results):
        np.testing.assert_array_equal(g_1, g_n)


@pytest.mark.parametrize("kept, untracked", [(2, False), (1, True)])
def test_blocks_without_pooling_equal_the_two_layers(kept, untracked):
    """conv1 + BN + ReLU without the max pooling (k = 1), and conv1 + BN alone, whose block
    keeps no argmax (``untracked``)."""
    be = get_backend("numba")
    models = []
    for _ in range(2):
        conv, block = build_model("lenet5", backend="numba").layers[0].sublayers()
        models.append(Network([conv] + fuse_bn_blocks(block.layers[:kept], be) + [Flatten()],
                              {"in_shape": [1, 28, 28]}, be, np.float32,
                              np.random.default_rng(0)))
    models[1].layers[0].fused = False
    calls = _counting(models[0].layers[0])
    x, _ = _data(8, np.float32)
    g = np.random.default_rng(5).standard_normal((8, 6 * 26 * 26)).astype(np.float32)
    grads, grads_r = (_step(m, x, g)[1] for m in models)
    block = models[0].layers[0].block
    assert len(calls) == 1 and block.k == 1 and (block.relu_after is not untracked)
    for g_f, g_r in zip(grads, grads_r):
        np.testing.assert_array_equal(g_f, g_r)


def test_an_unfused_block_falls_back_to_the_two_layers():
    """Layer tracking unfuses every FusedBNBlock; conv1's block then has no kernel cache."""
    model, reference = _pair()
    calls = _counting(model.layers[0])
    model.layers[0].block.unfused = True
    x, g_logits = _data(16, np.float32)
    grads, grads_r = _step(model, x, g_logits)[1], _step(reference, x, g_logits)[1]
    assert calls == []
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_array_equal(g, g_r)


@pytest.mark.parametrize("options", [dict(bn_position="after"), dict(bn="ghost"),
                                     dict(bn="none")])
def test_models_whose_first_layers_do_not_fit_are_left_as_they_are(options):
    """A ReLU before the BN (conv1 then has a bias), a BN kind the fused block does not run, or
    no BN at all."""
    model = build_model("lenet5", backend="numba", **options)
    assert isinstance(model.layers[0], Conv2d)


def test_padded_or_strided_convolutions_back_propagate_as_the_two_layers():
    """They are ConvBNBlocks too (for the inference epilogue, tests/nn/test_conv_epilogue.py),
    but never on the flat kernels: their backward is the two layers' own; other backends fuse
    nothing."""
    numpy_model = build_model("lenet5", backend="numpy")
    assert isinstance(numpy_model.layers[0], Conv2d)
    x, _ = _data(4, np.float32)
    for attribute, value in (("padding", 1), ("stride", 2)):
        models = _pair()
        for model in models:
            setattr(model.layers[1].conv, attribute, value)
        assert _blocks(models[0]) == models[0].layers[:2]
        calls = _counting(*_blocks(models[0]))
        # conv2's output (and so fc1's input) changes shape: compare conv2's own gradients
        outputs = [model.layers[1].forward(model.layers[0].forward(x, True), True)
                   for model in models]
        grads = []
        for model, out in zip(models, outputs):
            model.layers[1].backward(np.ones_like(out))
            grads.append([p.grad for p in model.layers[1].parameters()])
        assert calls == []
        for g_f, g_r in zip(*grads):
            np.testing.assert_array_equal(g_f, g_r)


def test_a_1x1_convolution_that_needs_gx_falls_back():
    """Its unfused input gradient is a forward convolution of gy, not the kernel's col2im."""
    be = get_backend("numba")
    models = []
    for _ in range(2):
        rng = np.random.default_rng(0)
        conv0 = Conv2d("conv0", 1, 4, 3, bias=False, rng=rng, backend=be, dtype="float32")
        conv1 = Conv2d("conv1", 4, 6, 1, bias=False, rng=rng, backend=be, dtype="float32")
        block = build_model("lenet5", backend="numba").layers[0].block
        models.append(Network([conv0, conv1] + block.layers + [Flatten()],
                              {"in_shape": [1, 28, 28]}, be, np.float32, rng))
    assert isinstance(models[0].layers[1], ConvBNBlock)
    models[1].layers[1].fused = False
    calls = _counting(models[0].layers[1])
    x, _ = _data(8, np.float32)
    g = np.random.default_rng(5).standard_normal((8, 6 * 13 * 13)).astype(np.float32)
    grads, grads_r = (_step(m, x, g)[1] for m in models)
    assert calls == []
    for g_f, g_r in zip(grads, grads_r):
        np.testing.assert_array_equal(g_f, g_r)


def test_vgg8_trains_as_its_two_layers():
    """'Same' padding: its convolutions never run on the flat kernels, so the blocks' backward
    is the two layers' own."""
    models = [build_model("vgg8", backend="numba", dropout=0.0) for _ in range(2)]
    for layer in _blocks(models[1]):
        layer.fused = False
    assert len(_blocks(models[0])) == 6
    calls = _counting(*_blocks(models[0]))
    x, g = _data(3, np.float32)
    (logits, grads), (logits_r, grads_r) = (_step(m, x, g) for m in models)
    assert calls == []
    np.testing.assert_array_equal(logits, logits_r)
    for g_f, g_r in zip(grads, grads_r):
        np.testing.assert_array_equal(g_f, g_r)


def test_a_block_keeps_its_prepared_kernel_per_input_shape():
    """Batches of 8, 5 (an epoch's last) and 8 again: equal to the two layers' own backward each
    time; one kernel prepared per shape, the first one used again."""
    model, reference = _pair()
    calls = _counting(*_blocks(model))
    kernels = []                                       # conv2's after each step
    for n in (8, 5, 8):
        x, g_logits = _data(n, np.float32, seed=n)
        (logits, grads), (logits_r, grads_r) = (_step(m, x, g_logits)
                                                for m in (model, reference))
        np.testing.assert_array_equal(logits, logits_r)
        for p, g, g_r in zip(model.parameters(), grads, grads_r):
            np.testing.assert_array_equal(g, g_r, err_msg=p.name)
        kernels.append(model.layers[1]._prepared[((n, 6, 13, 13), np.dtype(np.float32), True)])
    assert [shape[0] for shape, _ in calls] == [8, 8, 5, 5, 8, 8]
    assert len(model.layers[1]._prepared) == 2 and kernels[0] is kernels[2] is not kernels[1]


def _kernel_arrays():
    """x (4, 1, 10, 10), weight (3, 1, 3, 3), y (4, 3, 8, 8) and gy (4, 3, 4, 4): a small
    convolution and its pooled block's output gradient."""
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal(shape).astype(np.float32)
                 for shape in ((4, 1, 10, 10), (3, 1, 3, 3), (4, 3, 8, 8), (4, 3, 4, 4)))


def test_a_prepared_kernel_rejects_arrays_of_another_geometry():
    ops = get_backend("numba").conv_ops()
    x, weight, y, gy = _kernel_arrays()
    args = dict(gy=gy, y=y, argmax=np.zeros(gy.shape, np.uint8), mean=np.ones(3),
                scale=np.ones(3), w=np.ones(3), centered=True, x=x, weight=weight, gx=None)
    kernel = ops.FlatConvBNBackward(x.shape, weight.shape, y.shape, x.dtype, 2, [slice(0, 4)],
                                    False)
    expected = ops.flat_conv_bn_backward(k=2, chunks=[slice(0, 4)], **args)
    for got, want in zip(kernel(**args), expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="prepared for"):
        kernel(**{**args, "x": x[:2], "y": y[:2], "gy": gy[:2]})
    with pytest.raises(ValueError, match="prepared for"):
        kernel(**{**args, "gx": np.empty_like(x)})
    with pytest.raises(TypeError, match="prepared for float32"):
        kernel(**{**args, "x": x.astype(np.float64)})
    with pytest.raises(ValueError, match="convolution output"):
        ops.FlatConvBNBackward(x.shape, weight.shape, (4, 3, 7, 8), x.dtype, 2, [slice(0, 4)],
                               False)
    with pytest.raises(TypeError, match="not a dtype the GEMMs take"):
        ops.FlatConvBNBackward(x.shape, weight.shape, y.shape, np.float16, 2, [slice(0, 4)],
                               False)


def test_the_kernel_rejects_misshaped_and_mistyped_arrays():
    ops = get_backend("numba").conv_ops()
    x, weight, y, gy = _kernel_arrays()
    argmax = np.zeros(gy.shape, np.uint8)
    ones = np.ones(3)
    chunks = [slice(0, 4)]

    def call(**changes):
        args = dict(gy=gy, y=y, argmax=argmax, mean=ones, scale=ones, w=ones, centered=True,
                    k=2, x=x, weight=weight, chunks=chunks, gx=None)
        args.update(changes)
        return ops.flat_conv_bn_backward(**args)
    partials, sum_gy, sum_gy_xc = call()
    assert partials.shape == (1, 9, 3) and sum_gy.shape == sum_gy_xc.shape == (3,)
    with pytest.raises(ValueError, match="convolution output"):
        call(y=np.ascontiguousarray(y[:, :, :7]))
    with pytest.raises(ValueError, match=r"gx \(x's shape or None\)"):
        call(gx=np.empty((4, 1, 10, 9), np.float32))
    with pytest.raises(ValueError, match="pooled shape"):
        call(gy=gy[:, :, :3])
    with pytest.raises(ValueError, match="pooled shape"):
        call(argmax=argmax.astype(np.int64))
    with pytest.raises(ValueError, match="pooled shape"):
        call(argmax=np.zeros((0, 0, 0, 0), np.uint8))          # empty only at k = 1
    with pytest.raises(ValueError, match="per-channel"):
        call(mean=np.ones(2))
    with pytest.raises(TypeError, match="float32 or all float64"):
        call(y=y.astype(np.float64))
