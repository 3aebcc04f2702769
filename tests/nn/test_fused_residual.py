"""Fused BN blocks inside the residual blocks of resnet (numba backend): where they are, and the
fused model against the same model with every block run layer by layer (see test_fused)."""
import numpy as np
import pytest

from arraybn.backends import available_backends
from arraybn.nn import build_model
from arraybn.nn.fused import FusedBNBlock
from arraybn.nn.residual import ResidualBlock

pytestmark = pytest.mark.skipif("numba" not in available_backends(), reason="needs numba")

TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-11, atol=1e-13)}


def _fused_blocks(layers):
    for layer in layers:
        if isinstance(layer, FusedBNBlock):
            yield layer
        else:                                  # residual blocks, conv + block pairs
            yield from _fused_blocks(layer.sublayers())


def test_residual_branches_and_projection_shortcuts_are_fused():
    model = build_model("resnet", backend="numba", depth=8, width=4)
    blocks = [layer for layer in model.layers if isinstance(layer, ResidualBlock)]
    first, projected = blocks[0], blocks[1]
    pairs = [[type(sub).__name__ for sub in layer.sublayers()] for layer in first.branch]
    assert pairs == [["Conv2d", "FusedBNBlock"]] * 2       # each a ConvBNBlock
    assert first.branch[0].block.relu_after and not first.branch[1].block.relu_after
    assert [[type(sub).__name__ for sub in layer.sublayers()] for layer in projected.shortcut] \
        == [["Conv2d", "FusedBNBlock"]]
    assert [name for name, _ in model.bn_layers()][:4] == [
        "bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1"]


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resnet_logits_and_gradients_match_the_unfused_model(position, dtype):
    options = dict(backend="numba", depth=8, width=4, bn_position=position, dtype=dtype)
    fused, reference = build_model("resnet", **options), build_model("resnet", **options)
    blocks = list(_fused_blocks(reference.layers))
    assert len(blocks) == 9                    # conv1's, 3 blocks x 2, 2 projection shortcuts
    for block in blocks:
        block.unfused = True
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 1, 28, 28)).astype(dtype)
    g_logits = rng.standard_normal((8, 10)).astype(dtype)
    for training in (True, False):
        np.testing.assert_array_equal(fused.forward(x, training), reference.forward(x, training))
        fused.backward(g_logits)
        reference.backward(g_logits)
        for p_f, p_r in zip(fused.parameters(), reference.parameters()):
            np.testing.assert_allclose(p_f.grad, p_r.grad, err_msg=p_f.name, **TOL[dtype])
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(fused.state_dict()[key], value, err_msg=key)
