"""The residual blocks' element-wise kernels (numba backend): NumPy's values bit for bit, signed
zeros, infinities and NaN included; the block with them equals the block without; arrays the
kernels do not take run NumPy's code."""
import numpy as np
import pytest

from arraybn.backends import available_backends, get_backend
from arraybn.nn import build_model
from arraybn.nn.residual import ResidualBlock
from tests.nn.conv_paths import assert_same

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="needs numba")

SPECIAL = [-0.0, 0.0, np.nan, -np.inf, np.inf, -1e-45, 1e-45, -3.0, 2.5]


def _ops():
    return get_backend("numba").conv_ops()


def _bits(a):
    return a.view(f"u{a.dtype.itemsize}")


def _pairs(shape, dtype, seed):
    """Two arrays with every pair of the special values somewhere, the rest random."""
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    grid = np.array([(p, q) for p in SPECIAL for q in SPECIAL], dtype)
    a.flat[:len(grid)], b.flat[:len(grid)] = grid[:, 0], grid[:, 1]
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 90), (2, 50, 1, 1)])
def test_each_kernel_gives_numpys_bits(dtype, shape):
    ops = _ops()
    a, b = _pairs(shape, dtype, 0)
    with np.errstate(invalid="ignore"):
        want_relu = np.maximum(a + b, 0)
        want_gradient = np.multiply(a, b > 0)
        want_sum = a + b
    np.testing.assert_array_equal(_bits(ops.add_relu(a, b)), _bits(want_relu))
    np.testing.assert_array_equal(_bits(ops.relu_gradient(a, b)), _bits(want_gradient))
    np.testing.assert_array_equal(_bits(ops.add(a, b)), _bits(want_sum))
    minus_zero = np.full(shape, -0.0, dtype)                             # NumPy: max(-0.0, 0) = +0.0
    assert not np.signbit(ops.add_relu(minus_zero, minus_zero)).any()


def _block_pair(seed, projection):
    """The same ResNet block twice: with the backend's kernels, and with NumPy's code."""
    model = build_model("resnet", backend="numba", depth=8, width=4, seed=seed)
    blocks = [layer for layer in model.layers if isinstance(layer, ResidualBlock)]
    block = blocks[1] if projection else blocks[0]
    plain = ResidualBlock(block.branch, block.shortcut, np)
    assert block._ops is not None and plain._ops is None
    return block, plain


@pytest.mark.parametrize("projection", [False, True])
def test_the_block_with_kernels_equals_the_block_without(projection):
    block, plain = _block_pair(1, projection)
    x = np.random.default_rng(2).standard_normal((5, 4, 28, 28)).astype(np.float32)
    results = []
    for layer in (block, plain):
        y = layer.forward(x.copy(), True)
        gy = np.random.default_rng(3).standard_normal(y.shape).astype(np.float32)
        gx = layer.backward(gy)
        results.append((y, gx) + tuple(p.grad.copy() for p in layer.parameters()))
    assert_same(results[1], results[0])


def test_arrays_the_kernels_do_not_take_run_numpys_code():
    ops = _ops()
    a = np.ones((2, 3, 4, 4), np.float32)
    assert ops.elementwise_applies(a, a.copy())
    assert not ops.elementwise_applies(a, a.astype(np.float64))          # dtypes differ
    assert not ops.elementwise_applies(a, a[:, :, :2])                   # shapes differ
    assert not ops.elementwise_applies(a[:, :, ::2], a[:, :, ::2])       # not contiguous
    assert not ops.elementwise_applies(a[:0], a[:0])                     # an empty batch
    assert not ops.elementwise_applies(a.astype(np.int32), a.astype(np.int32))
    block, plain = _block_pair(1, False)
    x = np.random.default_rng(4).standard_normal((2, 4, 28, 28)).astype(np.float32)
    strided = np.asfortranarray(x)                                       # the block copies it
    np.testing.assert_array_equal(block.forward(strided, False), plain.forward(x, False))


def test_the_numpy_backend_builds_blocks_without_kernels():
    model = build_model("resnet", backend="numpy", depth=8, width=4)
    assert all(layer._ops is None for layer in model.layers if isinstance(layer, ResidualBlock))
