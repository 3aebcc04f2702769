"""The fused conv-block layer (numba backend) against the same layers run one by one.

The statistics, running buffers and forward outputs are bit-identical to the unfused path (same
statistics and update kernels, same element-wise formula, rounded once); the backward sums run in
another order, so gradients agree to a few float32 ulp / 1e-12 in float64.
"""
import numpy as np
import pytest

from arraybn.backends import available_backends, get_backend
from arraybn.nn import build_model
from arraybn.nn.batchnorm import BatchNorm
from arraybn.nn.conv import MaxPool2d
from arraybn.nn.fused import FusedBNBlock, fuse_bn_blocks
from arraybn.nn.layers import ReLU
from arraybn.nn.models import Network

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="needs numba")

TOL = {np.float32: dict(rtol=1e-6, atol=1e-7), np.float64: dict(rtol=1e-12, atol=1e-14)}


def _run(position, pool, dtype, channels=5, **bn_options):
    be = get_backend("numba")
    bn = BatchNorm("bn1", channels, backend=be, dtype=dtype, **bn_options)
    rng = np.random.default_rng(1)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, channels)
    bn.bias.data[...] = rng.uniform(-0.5, 0.5, channels)
    relu = ReLU(np, inplace=True)
    run = [bn, relu] if position == "before" else [relu, bn]
    return run + ([MaxPool2d(2, be)] if pool else [])


def _pair(position, pool, dtype, **bn_options):
    ops = get_backend("numba").conv_ops()
    fused = FusedBNBlock(_run(position, pool, dtype, **bn_options), ops)
    reference = FusedBNBlock(_run(position, pool, dtype, **bn_options), ops)
    reference.unfused = True
    return fused, reference


def _data(dtype, shape=(6, 5, 9, 11), offset=0.3):
    rng = np.random.default_rng(2)
    return (rng.standard_normal(shape) + offset).astype(dtype)


def _step(block, x, gy, training):
    y = block.forward(x.copy(), training)
    return y, block.backward(gy.copy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("bn_options", [
    {}, {"kind": "mean-only"}, {"momentum": None}, {"track_running_stats": False}],
    ids=["full", "mean-only", "cumulative", "no-running"])
def test_training_steps_match_the_unfused_layers(dtype, position, pool, bn_options):
    fused, reference = _pair(position, pool, dtype, **bn_options)
    x = _data(dtype)
    for step in range(3):
        y_f = fused.forward(x * (step + 1), True)
        assert fused._cache[0] == "fused"
        gx_f = fused.backward(_gy(fused, x))
        y_r, gx_r = _step(reference, x * (step + 1), _gy(fused, x), True)
        np.testing.assert_array_equal(y_f, y_r)
        assert y_f.dtype == y_r.dtype == dtype and gx_f.dtype == dtype
        np.testing.assert_allclose(gx_f, gx_r, **TOL[dtype])
        for p_f, p_r in zip(fused.parameters(), reference.parameters()):
            assert p_f.grad.dtype == p_r.grad.dtype
            np.testing.assert_allclose(p_f.grad, p_r.grad, **TOL[dtype])
        _assert_same_buffers(fused.bn, reference.bn)


def _gy(block, x):
    shape = x.shape[:2] + tuple(s // block.k for s in x.shape[2:])
    return np.random.default_rng(3).standard_normal(shape).astype(x.dtype)


def _assert_same_buffers(bn_f, bn_r):
    assert bn_f.num_batches_tracked == bn_r.num_batches_tracked
    for (key, a), (_, b) in zip(bn_f.buffers(), bn_r.buffers()):
        np.testing.assert_array_equal(a, b, err_msg=key)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("kind", ["full", "mean-only"])
@pytest.mark.parametrize("eval_stats", ["running", "batch"])
def test_inference_matches_the_unfused_layers(dtype, position, pool, kind, eval_stats):
    fused, reference = _pair(position, pool, dtype, kind=kind)
    for block in (fused, reference):
        block.bn.use_statistics(np.linspace(-0.2, 0.3, 5), np.linspace(0.5, 2.0, 5))
        block.bn.eval_stats = eval_stats
    x = _data(dtype)
    y_f, gx_f = _step(fused, x, _gy(fused, x), False)
    y_r, gx_r = _step(reference, x, _gy(fused, x), False)
    np.testing.assert_array_equal(y_f, y_r)
    np.testing.assert_allclose(gx_f, gx_r, **TOL[dtype])
    _assert_same_buffers(fused.bn, reference.bn)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("shape", [(6, 5, 9, 11), (3, 5, 6, 8)])
def test_tied_windows_pass_the_gradient_to_the_first_maximum_like_the_unfused_layers(
        dtype, position, shape):
    """Data on a grid of three values: most 2 x 2 windows hold their maximum more than once;
    the fused kernels must pick the same (first, row-major) position as MaxPool2d."""
    fused, reference = _pair(position, True, dtype)
    x = np.random.default_rng(4).integers(-1, 2, shape).astype(dtype)
    y_f, gx_f = _step(fused, x, _gy(fused, x), True)
    y_r, gx_r = _step(reference, x, _gy(fused, x), True)
    np.testing.assert_array_equal(y_f, y_r)
    np.testing.assert_allclose(gx_f, gx_r, **TOL[dtype])
    assert np.count_nonzero(gx_r) > 0


def test_offset_float32_data_keeps_its_digits():
    """Statistics of 1e4 + N(0, 1) in float32: the fused forward still normalises correctly."""
    fused, reference = _pair("before", True, np.float32)
    x = _data(np.float32, offset=1e4)
    np.testing.assert_array_equal(fused.forward(x.copy(), True), reference.forward(x.copy(), True))
    xhat = (x - x.mean(axis=(0, 2, 3), dtype=np.float64)[:, None, None]) \
        / x.std(axis=(0, 2, 3), dtype=np.float64)[:, None, None]
    assert np.isfinite(fused.bn.running_var).all() and abs(xhat.std() - 1) < 1e-3


def test_non_finite_statistics_name_the_layer_and_change_nothing():
    fused, _ = _pair("before", True, np.float32)
    x = _data(np.float32)
    x[0, 2, 0, 0] = np.nan
    before = fused.bn.running_mean.copy()
    with pytest.raises(Exception, match=r"bn1: non-finite batch statistics in channel\(s\) 2"):
        fused.forward(x, True)
    np.testing.assert_array_equal(fused.bn.running_mean, before)
    assert fused.bn.num_batches_tracked == 0


@pytest.mark.parametrize("kind", ["ghost", "renorm"])
def test_other_bn_kinds_stay_unfused(kind):
    model = build_model("lenet5", backend="numba", bn=kind, ghost_batch_size=4)
    assert not any(isinstance(layer, FusedBNBlock) for layer in model.layers)


def test_an_observer_runs_the_unfused_path():
    fused, reference = _pair("before", True, np.float32)
    seen = []
    x = _data(np.float32)
    with fused.bn.observing(seen.append):
        y = fused.forward(x.copy(), False)
    assert len(seen) == 1 and fused._cache[0] == "unfused"
    np.testing.assert_array_equal(y, reference.forward(x.copy(), False))


def test_numpy_backend_is_not_fused():
    assert not any(isinstance(layer, FusedBNBlock)
                   for layer in build_model("lenet5", backend="numpy").layers)


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lenet5_logits_and_gradients_match_the_unfused_model(position, dtype):
    fused = build_model("lenet5", backend="numba", bn_position=position, dropout=0.0, dtype=dtype)
    reference = build_model("lenet5", backend="numba", bn_position=position, dropout=0.0,
                            dtype=dtype)
    blocks = list(_fused_blocks(reference.layers))
    assert [block.dense for block in blocks] == [False, False, True, True]
    for block in blocks:
        block.unfused = True
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 1, 28, 28)).astype(dtype)
    g_logits = rng.standard_normal((16, 10)).astype(dtype)
    for training in (True, False):
        logits_f, logits_r = fused.forward(x, training), reference.forward(x, training)
        np.testing.assert_array_equal(logits_f, logits_r)
        fused.backward(g_logits)
        reference.backward(g_logits)
        for p_f, p_r in zip(fused.parameters(), reference.parameters()):
            assert p_f.name == p_r.name
            tol = TOL[np.dtype(dtype).type]
            np.testing.assert_allclose(p_f.grad, p_r.grad, rtol=tol["rtol"] * 10,
                                       atol=tol["atol"] * 10, err_msg=p_f.name)
    assert list(fused.state_dict()) == list(reference.state_dict())


def _fused_blocks(layers):
    """The FusedBNBlocks among ``layers``, in composite layers too (conv1's ConvBNBlock)."""
    for layer in layers:
        if isinstance(layer, FusedBNBlock):
            yield layer
        else:
            yield from _fused_blocks(layer.sublayers())


def test_a_network_without_pooling_fuses_bn_and_relu():
    be = get_backend("numba")
    model = build_model("lenet5", backend="numba")
    conv, block = model.layers[0].sublayers()
    layers = fuse_bn_blocks([conv] + block.layers[:2], be)
    assert isinstance(layers[1], FusedBNBlock) and layers[1].k == 1
    first = Network(layers, {"in_shape": [1, 28, 28]}, be, np.float32,
                    np.random.default_rng(0)).layers[0]      # conv1 + block: a ConvBNBlock
    assert isinstance(first.block, FusedBNBlock) and first.block.k == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu_after, relu_before", [(True, False), (False, True), (False, False)])
def test_the_no_pooling_kernels_equal_the_window_kernels_at_k_1(dtype, relu_after, relu_before):
    """Blocks without pooling (k = 1) take one-pass kernels; they must give the window kernels'
    results bit for bit (same rounding), except the float64 sums, which add by position over
    the batch and then fold (``_sums``) instead of one chain a plane."""
    from arraybn.backends import numba_fused_kernels as kernels
    rng = np.random.default_rng(5)
    x = _data(dtype, shape=(4, 3, 7, 6))
    x[0, 0, 0, :3] = [0.0, -0.0, np.float32(1e-30)]             # ReLU edges, a tiny positive
    gy = rng.standard_normal(x.shape).astype(dtype)
    center, a, b = rng.standard_normal(3), rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    y, argmax = kernels.bn_pool_forward(x, center, a, b, relu_after, 1)
    y_ref, argmax_ref = np.empty_like(x), np.empty(x.shape, np.uint8)
    kernels._normalize_pool(x, center, a, b, relu_after, 1, 0, 3, y_ref, argmax_ref)
    np.testing.assert_array_equal(y, y_ref)
    if relu_after:
        np.testing.assert_array_equal(argmax, argmax_ref)
    else:                                  # untracked: no argmax kept, where it is all zeros
        assert argmax.shape == (0, 0, 0, 0) and not argmax_ref.any()
    w = rng.uniform(0.5, 1.5, 3)
    gx, sum_gy, sum_gy_xc = kernels.bn_pool_backward(gy, x, argmax, center, a, w, True,
                                                     relu_before, 1)
    argmax = argmax_ref                    # the references read the window kernels' argmax
    sums_ref = np.empty(3), np.empty(3)
    kernels._pooled_sums(gy, x, argmax, center, 1, 0, 3, *sums_ref)     # one chain, not lanes
    np.testing.assert_allclose(sum_gy, sums_ref[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(sum_gy_xc, sums_ref[1], rtol=1e-13, atol=1e-13)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    gx_ref = np.empty_like(x)
    kernels._unpool_gx(gy, x, argmax, center, a, -a * (w * sum_gy_xc / count),
                       -a * (sum_gy / count), 1, relu_before, 0, 3, gx_ref)
    np.testing.assert_array_equal(gx, gx_ref)


def test_the_backward_rejects_an_argmax_that_does_not_fit():
    from arraybn.backends import numba_fused_kernels as kernels
    x = _data(np.float32, shape=(2, 3, 4, 4))
    ones = np.ones(3)
    for k, gy_shape, argmax in ((2, (2, 3, 2, 2), np.zeros((0, 0, 0, 0), np.uint8)),  # k > 1
                                (1, x.shape, np.zeros((2, 3, 4, 3), np.uint8)),
                                (1, x.shape, np.zeros(x.shape, np.int32)),
                                (2, (2, 3, 2, 1), np.zeros((2, 3, 2, 1), np.uint8))):
        with pytest.raises(ValueError, match="pooled shape"):
            kernels.bn_pool_backward(np.zeros(gy_shape, np.float32), x, argmax, ones, ones, ones,
                                     True, False, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu_after, relu_before", [(True, False), (False, True)])
@pytest.mark.parametrize("tasks", [2, 3, 5])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_kernels_sharing_channels_among_threads_equal_one_thread(
        dtype, relu_after, relu_before, tasks, k):
    """The channel-shared kernels (blocks from PARALLEL_MIN_SIZE values, with or without
    pooling) give the one-thread results bit for bit, also with channels that do not split
    evenly."""
    from arraybn.backends import numba_fused_kernels as kernels
    rng = np.random.default_rng(6)
    x = _data(dtype, shape=(4, 5, 7, 6))
    pooled = (4, 5, 7 // k, 6 // k)
    gy = rng.standard_normal(pooled).astype(dtype)
    center, a, b, w = (rng.standard_normal(5), rng.uniform(0.5, 1.5, 5), rng.standard_normal(5),
                       rng.uniform(0.5, 1.5, 5))
    y, argmax = kernels.bn_pool_forward(x, center, a, b, relu_after, k)     # one thread
    y_par, argmax_par = np.full(pooled, np.nan, dtype), np.full(argmax.shape, 7, np.uint8)
    kernels._forward_parallel(x, center, a, b, relu_after, k, tasks, y_par, argmax_par)
    np.testing.assert_array_equal(y_par, y)
    np.testing.assert_array_equal(argmax_par, argmax)
    _assert_train_forward_shared_equals_one_thread(kernels, x, relu_after, k, tasks)
    gx, sum_gy, sum_gy_xc = kernels.bn_pool_backward(gy, x, argmax, center, a, w, True,
                                                     relu_before, k)
    outputs = (np.full(5, np.nan), np.full(5, np.nan), np.full(5, np.nan), np.full(5, np.nan),
               np.full_like(x, np.nan))
    kernels._backward_parallel(gy, x, argmax, center, a, w, True, relu_before, k, tasks, *outputs)
    np.testing.assert_array_equal(outputs[0], sum_gy)
    np.testing.assert_array_equal(outputs[1], sum_gy_xc)
    np.testing.assert_array_equal(outputs[4], gx)


def _assert_train_forward_shared_equals_one_thread(kernels, x, relu_after, k, tasks):
    """The training forward on ``tasks`` (statistics, running buffers, output) equals
    ``bn_pool_train_forward`` on one thread (x is below the sharing threshold) bit for bit."""
    rng = np.random.default_rng(8)
    gamma, beta = rng.uniform(0.5, 1.5, x.shape[1]), rng.standard_normal(x.shape[1])
    pooled = x.shape[:2] + (x.shape[2] // k, x.shape[3] // k)
    runs = []
    for shared in (False, True):
        running = np.full(x.shape[1], 0.5, x.dtype), np.full(x.shape[1], 2.0, x.dtype)
        if shared:
            argmax_shape = (0,) * 4 if kernels.untracked(k, relu_after) else pooled
            out = (np.full(pooled, np.nan, x.dtype), np.full(argmax_shape, 7, np.uint8),
                   *(np.full(x.shape[1], np.nan) for _ in range(4)))
            assert kernels._train_forward_parallel(x, gamma, beta, 1e-5, False, relu_after, k,
                                                   0.1, *running, tasks, *out)
            out = out[:4] + out[5:]                        # without the coefficients a
        else:
            out = kernels.bn_pool_train_forward(x, gamma, beta, 1e-5, False, 0.1, *running,
                                                relu_after, k)
        runs.append(tuple(out) + running)
    for one_thread, shared in zip(*runs):
        np.testing.assert_array_equal(shared, one_thread)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu_after", [True, False])
@pytest.mark.parametrize("shape, lo, hi", [
    ((3, 7, 26, 22), 0, 7),       # 143 windows a plane: groups of 4 planes, then 3
    ((3, 7, 26, 22), 1, 6),       # a task's channel range: groups of 4, then 1
    ((2, 3, 65, 64), 0, 3),       # 1,024 windows a plane: one plane a group
    ((5, 40, 7, 6), 0, 40)])      # 9 windows a plane: all 40 planes in one group
def test_2x2_pooling_in_groups_of_planes_equals_the_per_plane_window_loops(
        dtype, relu_after, shape, lo, hi):
    """``_normalize_pool2`` pools whole planes in groups of at least POOL_WINDOWS windows;
    its outputs equal the general window loops' (``_normalize_pool`` at k = 2) bit for bit,
    for channel ranges that do not split into whole groups too."""
    from arraybn.backends import numba_fused_kernels as kernels
    rng = np.random.default_rng(7)
    x = _data(dtype, shape=shape)
    c = shape[1]
    center, a, b = rng.standard_normal(c), rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    pooled = shape[:2] + (shape[2] // 2, shape[3] // 2)
    outputs = []
    for kernel in (kernels._normalize_pool2, kernels._normalize_pool):
        y, argmax = np.full(pooled, np.nan, dtype), np.full(pooled, 7, np.uint8)
        extra = () if kernel is kernels._normalize_pool2 else (2,)
        kernel(x, center, a, b, relu_after, *extra, lo, hi, y, argmax)
        outputs.append((y, argmax))
    (y, argmax), (y_ref, argmax_ref) = outputs
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    assert np.isnan(y[:, :lo]).all() and np.isnan(y[:, hi:]).all()   # other channels untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu_after, relu_before", [(True, False), (False, True)])
def test_blocks_of_channels_give_each_channel_its_bits_alone(dtype, relu_after, relu_before):
    """Without pooling the two-pass kernels go block by block of channels
    (``_block_channels``: here one channel a block, x being large); every channel's statistics,
    running buffers, output, sums and gx equal those of that channel run on its own."""
    from arraybn.backends import numba_fused_kernels as kernels
    x = _data(dtype, shape=(60, 3, 48, 48))
    assert kernels._block_channels(x, 1, 0, 3, 5) == 1
    assert kernels._block_channels(x, 2, 0, 3, 5) == 3                  # pooled: one block
    rng = np.random.default_rng(9)
    gy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)

    def run(c):
        x_c, gy_c = np.ascontiguousarray(x[:, c]), np.ascontiguousarray(gy[:, c])
        running = np.full(len(c), 0.5), np.full(len(c), 2.0)
        y, argmax, mean, var, inv_std = kernels.bn_pool_train_forward(
            x_c, gamma[c], beta[c], 1e-5, False, 0.1, *running, relu_after, 1)
        backward = kernels.bn_pool_backward(gy_c, x_c, argmax, mean, gamma[c] * inv_std,
                                            inv_std ** 2, True, relu_before, 1)
        return (y, argmax, mean, var, inv_std) + running + backward

    whole = run([0, 1, 2])
    for c in range(3):
        for got, alone in zip(whole, run([c])):
            np.testing.assert_array_equal(got[:, c:c + 1] if got.ndim == 4 else got[c:c + 1],
                                          alone)


def test_blocks_share_channels_from_the_size_threshold(monkeypatch):
    from arraybn.backends import numba_fused_kernels as kernels
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 4)
    big = np.empty((1, 3, 1, kernels.PARALLEL_MIN_SIZE // 3 + 1), np.float32)
    assert kernels._tasks(big) == 3                       # one channel a task at most
    assert kernels._tasks(big[..., :-2]) == 0              # below the threshold
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 1)
    assert kernels._tasks(big) == 0


@pytest.mark.parametrize("untracked", [False, True])
@pytest.mark.parametrize("size", range(1, 10))
def test_the_backward_sums_add_by_position_over_the_batch_then_fold_in_pairs(size, untracked):
    """The fused backward's sums without pooling (``_sums``): per channel, each position's
    values added over the images in batch order, then the positions folded pairwise as
    ``numba_kernels._fold`` does, every plane size; inactive positions (argmax INACTIVE) add
    zero, and an empty argmax means all active. The kernels may contract g * (x - mu) + sum
    into one FMA (``numba_config``), so the second sum is checked both ways."""
    from fractions import Fraction

    from arraybn.backends import numba_fused_kernels as kernels
    rng = np.random.default_rng(size)
    n, c = 3, 2
    gy = (rng.standard_normal((n, c, 1, size))
          * 10.0 ** rng.integers(-8, 8, (n, c, 1, size))).astype(np.float32)
    x = rng.standard_normal((n, c, 1, size)).astype(np.float32)
    argmax = np.where(rng.random(x.shape) < 0.3, kernels.INACTIVE, 0).astype(np.uint8)
    if untracked:
        argmax = np.zeros((0,) * 4, np.uint8)
    mean = np.array([0.3, -1.7])

    def fma(a, b, c):                                 # a * b + c rounded once
        return float(Fraction(a) * Fraction(b) + Fraction(c))

    def folded(values):
        values, length = list(values), len(values)
        while length > 1:
            half, rest = length // 2, length - length // 2
            for i in range(half):
                values[i] += values[rest + i]
            length = rest
        return values[0]

    def reference(add_product):
        sums = np.empty(c), np.empty(c)
        for ch in range(c):
            s, s_xc = [0.0] * size, [0.0] * size
            for image in range(n):
                for q in range(size):
                    active = untracked or argmax[image, ch, 0, q] != kernels.INACTIVE
                    g = float(gy[image, ch, 0, q]) if active else 0.0
                    s[q] += g
                    s_xc[q] = add_product(g, float(x[image, ch, 0, q]) - mean[ch], s_xc[q])
            sums[0][ch], sums[1][ch] = folded(s), folded(s_xc)
        return sums

    got = np.empty(c), np.empty(c)
    kernels._sums(gy, x, argmax, mean, 0, c, *got)
    expected = [reference(fma), reference(lambda a, b, c: a * b + c)]
    np.testing.assert_array_equal(got[0], expected[0][0])
    assert any(np.array_equal(got[1], e[1]) for e in expected)


def test_the_training_forward_refuses_bad_running_buffers():
    from arraybn.backends import numba_fused_kernels as kernels
    x = _data(np.float32, shape=(2, 3, 4, 4))
    gamma, beta = np.ones(3), np.zeros(3)
    frozen = np.zeros(3, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean must be a writeable"):
        kernels.bn_pool_train_forward(x, gamma, beta, 1e-5, False, 0.1, frozen, None, True, 2)
    with pytest.raises(ValueError, match=r"running_var must be .* of shape \(3,\)"):
        kernels.bn_pool_train_forward(x, gamma, beta, 1e-5, False, 0.1, None, np.ones(4), True,
                                      2)
    with pytest.raises(TypeError, match="C-contiguous"):
        kernels.bn_pool_train_forward(x[..., ::2], gamma, beta, 1e-5, False, 0.1, None, None,
                                      True, 2)
