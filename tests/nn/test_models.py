"""Whole networks: gradient check, state_dict, reproducibility, BN variants, eval invariants."""
import json

import numpy as np
import pytest

import arraybn
from arraybn.nn import SGD, Adam, build_model, softmax_cross_entropy
from tests.conftest import to_backend, to_host
from tests.nn.gradcheck import assert_model_grads_close

SMALL = dict(in_shape=(1, 12, 12), num_classes=3)


def _batch(rng, n=6, shape=(1, 12, 12), classes=3):
    return rng.standard_normal((n,) + shape), rng.integers(0, classes, n)


@pytest.mark.parametrize("name,bn,position", [
    ("lenet5", "full", "before"), ("lenet5", "full", "after"), ("lenet5", "none", "before"),
    ("lenet5", "mean-only", "before"), ("lenet5", "ghost", "before"), ("mlp", "full", "before")])
def test_network_gradients_match_centred_differences(rng, name, bn, position):
    model = build_model(name, bn=bn, bn_position=position, dtype="float64", ghost_batch_size=3,
                        hidden=(8, 6), backend="numpy", **SMALL)
    x, labels = _batch(rng)
    assert_model_grads_close(model, x, labels, rng, count=4, atol=1e-7)


def test_lenet5_layout_follows_the_seed_text(cpu_backend):
    model = build_model("lenet5", backend=cpu_backend)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes["conv1.weight"] == (6, 1, 3, 3) and shapes["conv2.weight"] == (16, 6, 3, 3)
    assert shapes["fc1.weight"] == (120, 400) and shapes["fc2.weight"] == (84, 120)
    assert shapes["fc3.weight"] == (10, 84) and "conv1.bias" not in shapes
    assert [name for name, _ in model.bn_layers()] == ["bn1", "bn2", "bn3", "bn4"]
    assert model.state_dict()["bn1.num_batches_tracked"].dtype == np.int64
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert model.forward(to_backend(cpu_backend, x)).shape == (2, 10)
    plain = build_model("lenet5", bn="none")
    assert "conv1.bias" in plain.state_dict() and not plain.bn_layers()


def test_config_is_json_and_rebuilds_the_same_model():
    model = build_model("mlp", bn="renorm", hidden=(16,), seed=3, bn_momentum=None,
                        backend="numpy")
    config = json.loads(json.dumps(model.config))
    again = build_model(**config)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key], value)


def _train(backend, steps=3, **options):
    rng = np.random.default_rng(7)
    model = build_model("lenet5", backend=backend, seed=11, **SMALL, **options)
    opt = SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        x, labels = _batch(rng, n=8)
        _, g = softmax_cross_entropy(model.forward(to_backend(model.backend, x.astype(np.float32))),
                                     labels)
        model.backward(g)
        opt.step()
    return model.state_dict()


def test_same_seed_same_backend_gives_identical_weights(cpu_backend):
    first = _train(cpu_backend, dropout=0.3)
    second = _train(cpu_backend, dropout=0.3)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    other = build_model("lenet5", seed=12, **SMALL).state_dict()
    assert not np.array_equal(other["conv1.weight"], first["conv1.weight"])


def test_state_dict_round_trip_and_errors(cpu_backend):
    trained = _train(cpu_backend)
    model = build_model("lenet5", backend=cpu_backend, seed=99, **SMALL)
    model.load_state_dict(trained)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, trained[key])
    assert dict(model.bn_layers())["bn1"].num_batches_tracked == 3
    broken = dict(trained)
    del broken["bn2.running_var"]
    broken["extra.weight"] = np.zeros(3)
    broken["fc1.weight"] = np.zeros((5, 5))
    with pytest.raises(ValueError, match=r"missing keys: bn2.running_var.*unexpected keys: "
                                         r"extra.weight.*fc1.weight \(5, 5\)"):
        model.load_state_dict(broken)


@pytest.mark.parametrize("bn", ["full", "mean-only", "ghost", "renorm"])
def test_bn_variants_train_and_update_statistics(cpu_backend, bn):
    model = build_model("lenet5", bn=bn, backend=cpu_backend, ghost_batch_size=4, **SMALL)
    state = _train(cpu_backend, bn=bn, ghost_batch_size=4)
    assert state["bn3.num_batches_tracked"] == 3
    assert not np.array_equal(state["bn1.running_mean"], model.state_dict()["bn1.running_mean"])
    var_moved = not np.array_equal(state["bn3.running_var"], np.ones(120, np.float32))
    assert var_moved == (bn != "mean-only")
    for value in state.values():
        assert np.all(np.isfinite(value))


def test_cumulative_momentum_averages_batches_equally():
    model = build_model("mlp", hidden=(4,), bn_momentum=None, in_shape=(1, 2, 2), num_classes=2,
                        backend="numpy", dtype="float64")
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((5, 1, 2, 2)) for _ in range(3)]
    means = []
    for x in batches:
        h = x.reshape(5, -1) @ model.parameters()[0].data.T
        means.append(h.mean(axis=0))
        model.forward(x, training=True)
    bn = model.bn_layers()[0][1]
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12)


def test_eval_output_of_a_sample_does_not_depend_on_its_batch(cpu_backend, rng):
    model = build_model("lenet5", backend=cpu_backend, **SMALL)
    model.load_state_dict(_train(cpu_backend))
    x, _ = _batch(rng, n=5)
    x = to_backend(cpu_backend, x.astype(np.float32))
    together = to_host(model.forward(x, training=False))
    alone = np.concatenate([to_host(model.forward(x[i:i + 1], training=False)) for i in range(5)])
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bn3: .*more than one value per channel"):
        model.forward(x[:1], training=True)


def test_eval_stats_batch_and_untracked_statistics_use_the_batch(rng):
    x, _ = _batch(rng)
    untracked = build_model("lenet5", track_running_stats=False, dtype="float64", **SMALL)
    tracked = build_model("lenet5", dtype="float64", **SMALL)
    for _, bn in tracked.bn_layers():
        bn.eval_stats = "batch"
    assert untracked.bn_layers()[0][1].running_mean is None
    assert "bn1.running_mean" not in untracked.state_dict()
    np.testing.assert_allclose(untracked.forward(x, training=False),
                               tracked.forward(x, training=True), rtol=1e-12)
    np.testing.assert_allclose(tracked.forward(x, training=False),
                               untracked.forward(x, training=False), rtol=1e-12)
    with pytest.raises(ValueError, match="eval_stats"):
        tracked.bn_layers()[0][1].eval_stats = "population"


def test_observing_feeds_the_bn_input_to_the_callback_only_inside(rng):
    model = build_model("mlp", hidden=(5,), dtype="float64", **SMALL)
    x, _ = _batch(rng)
    name, bn = model.bn_layers()[0]
    observer = arraybn.ExactStatistics()
    with bn.observing(observer.update):
        model.forward(x, training=False)
    model.forward(x, training=False)                       # outside: not observed
    mean, _ = observer.result()
    assert observer.count == 6
    np.testing.assert_allclose(mean, (x.reshape(6, -1) @ model.parameters()[0].data.T).mean(0))


def test_observing_stops_when_the_forward_fails(rng):
    model = build_model("mlp", hidden=(5,), dtype="float64", **SMALL)
    _, bn = model.bn_layers()[0]
    seen = []
    with pytest.raises(RuntimeError, match="stop"):
        with bn.observing(seen.append):
            raise RuntimeError("stop")
    model.forward(_batch(rng)[0], training=False)
    assert seen == []


def test_use_statistics_normalises_an_untracked_layer_with_the_given_ones(rng):
    x, _ = _batch(rng, n=8)
    untracked = build_model("mlp", hidden=(5,), track_running_stats=False, dtype="float64",
                            **SMALL)
    _, bn = untracked.bn_layers()[0]
    mean, var = np.linspace(-1, 1, 5), np.linspace(0.5, 2, 5)
    bn.use_statistics(mean, var)
    tracked = build_model("mlp", hidden=(5,), dtype="float64", **SMALL)
    _, ref = tracked.bn_layers()[0]
    ref.running_mean[...], ref.running_var[...] = mean, var
    np.testing.assert_allclose(untracked.forward(x, training=False),
                               tracked.forward(x, training=False), rtol=1e-12)
    assert bn.eval_stats == "running" and "bn1.running_mean" in untracked.state_dict()


def test_use_statistics_rejects_the_wrong_number_of_channels():
    model = build_model("mlp", hidden=(5,), **SMALL)
    _, bn = model.bn_layers()[0]
    with pytest.raises(ValueError, match=r"bn1: .*5 channels.*\(4,\)"):
        bn.use_statistics(np.zeros(4), np.ones(5))


def test_non_finite_statistics_name_the_layer():
    model = build_model("lenet5", **SMALL)
    x = np.full((4, 1, 12, 12), np.nan, np.float32)
    with pytest.raises(arraybn.NonFiniteStatisticsError, match="bn1"):
        model.forward(x, training=True)


@pytest.mark.parametrize("options,match", [
    (dict(name="alexnet"), "name"), (dict(name="lenet5", bn="batch"), "bn"),
    (dict(name="lenet5", bn_position="middle"), "bn_position"),
    (dict(name="lenet5", in_shape=(1, 8, 8)), "10x10"),
    (dict(name="lenet5", bn="ghost", bn_momentum=None), "ghost"),
    (dict(name="lenet5", bn="renorm", track_running_stats=False), "running statistics")])
def test_bad_configs_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        build_model(**options)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        build_model("lenet5").forward(np.zeros((2, 28, 28), np.float32))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_fits_a_small_separable_problem(cpu_backend, optimizer):
    rng = np.random.default_rng(3)
    patterns = rng.standard_normal((3, 1, 12, 12))
    labels = rng.integers(0, 3, 96)
    x = (patterns[labels] + 0.5 * rng.standard_normal((96, 1, 12, 12))).astype(np.float32)
    model = build_model("lenet5", backend=cpu_backend, **SMALL)
    opt = (SGD(model.parameters(), 0.05) if optimizer == "sgd"
           else Adam(model.parameters(), 0.01))
    for step in range(40):
        batch = slice(32 * (step % 3), 32 * (step % 3 + 1))
        logits = model.forward(to_backend(cpu_backend, x[batch]))
        _, g = softmax_cross_entropy(logits, labels[batch])
        model.backward(g)
        opt.step()
    logits = to_host(model.forward(to_backend(cpu_backend, x), training=False))
    assert (logits.argmax(axis=1) == labels).mean() > 0.9
