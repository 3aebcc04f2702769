"""--track-layers: the measurements against direct computations, and training left unchanged."""
import numpy as np
import pytest

import arraybn
from arraybn.errors import ConfigError
from arraybn.nn import SGD, build_model
from arraybn.nn.layers import ReLU
from arraybn.stages.layer_tracking import (PERCENTILES, LayerTracker, check_tracking_world,
                                           tracked_layers)
from arraybn.stages.parallel import loss_share

SHAPE = (1, 4, 4)


def _mlp(bn="full", bn_position="before", dropout=0.0):
    return build_model("mlp", bn=bn, bn_position=bn_position, hidden=(7, 6, 5), in_shape=SHAPE,
                       num_classes=3, dropout=dropout, backend="numpy", dtype="float64", seed=3)


def _batch(seed, n=12):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + SHAPE), rng.integers(0, 3, size=n)


def _rows(tracker, metric):
    return {layer: value for _, _, layer, name, value in tracker.rows if name == metric}


def _relu_inputs(model, images):
    """The input of every ReLU in a training forward pass, in order (a direct forward)."""
    inputs, x = [], np.asarray(images, dtype=np.float64)
    for layer in model.layers:
        if isinstance(layer, ReLU):
            inputs.append(x.copy())
        x = layer.forward(x, True)
    return inputs


@pytest.mark.parametrize("bn, position", [("full", "before"), ("full", "after"),
                                          ("none", "before")])
def test_percentiles_are_those_of_the_relu_inputs(bn, position):
    images, labels = _batch(0)
    model = _mlp(bn, position)
    expected = _relu_inputs(_mlp(bn, position), images)
    tracker = LayerTracker(model, every=1)
    tracker.measure(SGD(model.parameters(), 0.1), images, labels, len(labels), 0, 1)
    assert len(expected) == 3
    for q in PERCENTILES:
        got = _rows(tracker, f"p{q}")
        assert list(got) == ["fc1", "fc2", "fc3"]           # fc4 (the logits) has no ReLU
        for name, values in zip(("fc1", "fc2", "fc3"), expected):
            assert got[name] == np.percentile(values, q)


def _gradients(model, images, labels):
    logits = model.forward(images, training=True)
    model.backward(loss_share(logits, labels, len(labels))[1])
    return {p.name: p.grad.copy() for p in model.parameters()}


def _direct_shifts(state, momentum_buffers, images, labels, lr, momentum):
    """ICS by hand: G, then for each weight layer the gradient after an SGD update (by hand) of
    every parameter before its weight."""
    model = _mlp(dropout=0.0)
    model.load_state_dict(state)
    grads = _gradients(model, images, labels)
    names = [p.name for p in model.parameters()]
    updated = {name: state[name] - lr * (momentum * momentum_buffers[name] + grads[name])
               for name in names}
    shifts = {}
    for layer in ("fc2", "fc3", "fc4"):
        earlier = names[:names.index(f"{layer}.weight")]
        moved = _mlp(dropout=0.0)
        moved.load_state_dict({**state, **{name: updated[name] for name in earlier}})
        g, g_after = grads[f"{layer}.weight"], _gradients(moved, images, labels)[
            f"{layer}.weight"]
        shifts[layer] = (np.linalg.norm(g - g_after),
                         np.sum(g * g_after) / np.linalg.norm(g) / np.linalg.norm(g_after))
    return grads, shifts


def test_ics_equals_a_direct_computation_on_a_tiny_mlp():
    lr, momentum = 0.5, 0.9
    model = _mlp()
    optimizer = SGD(model.parameters(), lr, momentum=momentum)
    _gradients(model, *_batch(1))
    optimizer.step()                                  # momentum buffers now hold a gradient
    buffers = {p.name: optimizer.state[p.name]["momentum_buffer"].copy()
               for p in model.parameters()}
    state = model.state_dict()
    images, labels = _batch(2)
    tracker = LayerTracker(model, every=1)
    tracker.measure(optimizer, images, labels, len(labels), 7, 1)
    grads, shifts = _direct_shifts(state, buffers, images, labels, lr, momentum)
    l2, cos = _rows(tracker, "ics_l2"), _rows(tracker, "ics_cos")
    assert list(l2) == ["fc2", "fc3", "fc4"]          # nothing comes before fc1
    for layer, (want_l2, want_cos) in shifts.items():
        assert want_l2 > 1e-3 and want_cos < 1 - 1e-6     # the update does shift the gradients
        assert l2[layer] == pytest.approx(want_l2, rel=1e-10)
        assert cos[layer] == pytest.approx(want_cos, rel=1e-10)
    norms = _rows(tracker, "grad_norm")
    for layer in ("fc1", "fc2", "fc3", "fc4"):
        assert norms[layer] == pytest.approx(np.linalg.norm(grads[f"{layer}.weight"]), rel=1e-12)
    assert {row[0] for row in tracker.rows} == {7}


@pytest.mark.parametrize("bn", ["full", "renorm"])
def test_a_measurement_leaves_model_optimizer_and_dropout_generator_as_they_were(bn):
    model = build_model("mlp", bn=bn, hidden=(7, 6), in_shape=SHAPE, num_classes=3, dropout=0.3,
                        backend="numpy", dtype="float64", seed=3)
    optimizer = arraybn.nn.Adam(model.parameters(), 0.01)
    _gradients(model, *_batch(1))
    optimizer.step()
    before = (model.state_dict(), optimizer.state_dict(), model.rng.bit_generator.state)
    LayerTracker(model, every=1).measure(optimizer, *_batch(2), 12, 0, 1)
    after = (model.state_dict(), optimizer.state_dict(), model.rng.bit_generator.state)
    assert after[2] == before[2]
    for old, new in zip(before[:2], after[:2]):
        assert old.keys() == new.keys()
        for key in old:
            assert np.array_equal(old[key], new[key]), key


def test_tracked_layers_of_a_resnet_name_their_relus_and_earlier_parameters():
    model = build_model("resnet", depth=8, width=2, in_shape=(1, 8, 8), backend="numpy")
    layers = tracked_layers(model)
    names = [layer.name for layer in layers]
    assert names[:4] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1"]
    assert "layer2.0.shortcut.conv1" in names and names[-1] == "fc"
    with_relu = {layer.name for layer in layers if layer.relu is not None}
    assert "layer1.0.conv1" in with_relu and "layer1.0.conv2" not in with_relu
    earlier = [p.name for p in layers[2].earlier]
    assert earlier == ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight",
                       "layer1.0.bn1.weight", "layer1.0.bn1.bias"]


def test_tracking_is_refused_for_data_parallel_training():
    class TwoRanks:
        size = 2
    config = arraybn.stages.TrainConfig(track_layers=True)
    with pytest.raises(ConfigError, match=r"--track-layers .*\(2 processes\)"):
        check_tracking_world(config, TwoRanks())
    check_tracking_world(arraybn.stages.TrainConfig(), TwoRanks())


@pytest.mark.parametrize("every", [0, 2.5, -1])
def test_track_every_must_be_a_positive_integer(every):
    with pytest.raises(ConfigError, match="track_every must be a positive integer"):
        arraybn.stages.TrainConfig(track_every=every)
