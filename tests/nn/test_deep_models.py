"""vgg8, plain and resnet: gradients against centred differences (float64) with every
normalization, the documented layouts, nested BN layers in state_dict/bn_layers, errors."""
import json

import numpy as np
import pytest

from arraybn.nn import SGD, build_model, softmax_cross_entropy
from arraybn.nn.residual import ResidualBlock
from tests.conftest import to_backend
from tests.nn.gradcheck import assert_model_grads_close

TINY = {"vgg8": dict(in_shape=(1, 8, 8)), "plain": dict(in_shape=(1, 6, 6), depth=4, width=3),
        "resnet": dict(in_shape=(1, 6, 6), depth=8, width=2)}
# renorm is left out: its backward treats r and d as constants (Ioffe 2017), on purpose.
NORMS = [("none", "before"), ("full", "before"), ("full", "after"), ("mean-only", "before"),
         ("ghost", "after"), ("group", "before")]


@pytest.mark.parametrize("bn,position", NORMS)
@pytest.mark.parametrize("name", ["vgg8", "plain", "resnet"])
def test_deep_model_gradients_match_centred_differences(rng, name, bn, position):
    model = build_model(name, bn=bn, bn_position=position, dtype="float64", ghost_batch_size=2,
                        num_classes=3, backend="numpy", seed=1, **TINY[name])
    x = rng.standard_normal((4,) + tuple(model.config["in_shape"]))
    labels = rng.integers(0, 3, 4)
    assert_model_grads_close(model, x, labels, rng, count=3)


def test_vgg8_layout_is_six_convolutions_and_two_dense_layers(cpu_backend):
    model = build_model("vgg8", backend=cpu_backend)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    weights = [k for k in shapes if k.endswith(".weight") and not k.startswith("bn")]
    assert weights == [f"conv{i}.weight" for i in range(1, 7)] + ["fc1.weight", "fc2.weight"]
    assert [shapes[f"conv{i}.weight"][0] for i in range(1, 7)] == [32, 32, 64, 64, 128, 128]
    assert shapes["conv1.weight"] == (32, 1, 3, 3) and shapes["fc1.weight"] == (256, 128 * 3 * 3)
    assert shapes["fc2.weight"] == (10, 256) and "fc2.bias" in shapes and "conv1.bias" not in shapes
    assert [name for name, _ in model.bn_layers()] == [f"bn{i}" for i in range(1, 8)]
    x = to_backend(cpu_backend, np.zeros((2, 1, 28, 28), np.float32))
    assert model.forward(x).shape == (2, 10)


def test_vgg8_dropout_follows_the_hidden_dense_block():
    model = build_model("vgg8", dropout=0.5, backend="numpy")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[-3:] == ["ReLU", "Dropout", "Dense"] and kinds.count("Dropout") == 1


@pytest.mark.parametrize("depth,strided", [(3, [2, 3]), (4, [3, 4]), (20, [8, 15])])
def test_plain_downsamples_at_a_third_and_two_thirds_of_the_depth(depth, strided):
    model = build_model("plain", depth=depth, width=5, backend="numpy")
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2d"]
    assert len(convs) == depth
    assert [i for i, c in enumerate(convs, start=1) if c.stride == 2] == strided
    assert all(c.padding == 1 for c in convs)
    assert [c.weight.data.shape[0] for c in convs] == [5 * 2 ** (3 * i // depth)
                                                       for i in range(depth)]
    assert model.state_dict()["fc.weight"].shape == (10, 20)
    assert model.forward(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [8, 14, 20])
def test_resnet_has_6n_plus_2_weight_layers_and_projection_shortcuts(depth):
    model = build_model("resnet", depth=depth, backend="numpy")
    state = model.state_dict()
    blocks = [layer for layer in model.layers if isinstance(layer, ResidualBlock)]
    n = (depth - 2) // 6
    assert len(blocks) == 3 * n
    main_path = [k for k in state if k.endswith("weight") and len(state[k].shape) > 1
                 and "shortcut" not in k]
    assert len(main_path) == depth
    projections = sorted(k for k in state if "shortcut.conv1" in k)
    assert projections == ["layer2.0.shortcut.conv1.weight", "layer3.0.shortcut.conv1.weight"]
    assert state["layer2.0.shortcut.conv1.weight"].shape == (32, 16, 1, 1)
    assert state[f"layer3.{n - 1}.conv2.weight"].shape == (64, 64, 3, 3)
    assert state["fc.weight"].shape == (10, 64)
    assert model.forward(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


def test_nested_bn_layers_are_listed_and_their_statistics_round_trip(cpu_backend, rng):
    model = build_model("resnet", depth=8, width=4, in_shape=(1, 8, 8), backend=cpu_backend)
    names = [name for name, _ in model.bn_layers()]
    assert names == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2",
                     "layer2.0.shortcut.bn1", "layer3.0.bn1", "layer3.0.bn2",
                     "layer3.0.shortcut.bn1"]
    opt = SGD(model.parameters(), lr=0.1)
    x = rng.standard_normal((6, 1, 8, 8)).astype(np.float32)
    _, g = softmax_cross_entropy(model.forward(to_backend(cpu_backend, x)), rng.integers(0, 10, 6))
    model.backward(g)
    opt.step()
    trained = model.state_dict()
    assert trained["layer3.0.shortcut.bn1.num_batches_tracked"] == 1
    assert not np.array_equal(trained["layer2.0.bn2.running_mean"], np.zeros(8, np.float32))
    fresh = build_model("resnet", depth=8, width=4, in_shape=(1, 8, 8), backend=cpu_backend,
                        seed=9)
    fresh.load_state_dict(trained)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, trained[key], err_msg=key)


@pytest.mark.parametrize("name,options", [("plain", dict(depth=7, width=3)),
                                          ("resnet", dict(depth=14, width=2, bn="group"))])
def test_deep_config_is_json_and_rebuilds_the_same_model(name, options):
    model = build_model(name, seed=4, backend="numpy", **options)
    config = json.loads(json.dumps(model.config))
    assert config["depth"] == options["depth"] and config["width"] == options["width"]
    again = build_model(**config)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key], value)


@pytest.mark.parametrize("options,match", [
    (dict(name="resnet", depth=10), r"6n \+ 2"), (dict(name="resnet", depth=2), r"6n \+ 2"),
    (dict(name="plain", depth=2), ">= 3 convolutions"), (dict(name="plain", width=0), "width"),
    (dict(name="plain", dropout=0.2), "no hidden dense layer"),
    (dict(name="vgg8", in_shape=(1, 7, 7)), "at least 8x8"),
    (dict(name="plain", bn="group", bn_position="after", width=8), "width >= 9"),
    (dict(name="vgg8", bn="layer"), "bn")])
def test_bad_deep_configs_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        build_model(backend="numpy", **options)
