"""Weight initialisation (``build_model(init=...)``): He et al.'s N(0, 2/fan_in) drawn with the
right statistics for every model, seeded, and the default left bit for bit as it was.

Sampling tolerances: for n independent N(0, s^2) draws, z = w / s has a sample mean with
standard deviation 1/sqrt(n), a sample variance (mean of z^2) with sd sqrt(2/n) and a fourth
moment (mean of z^4, 3 for a normal, 1.8 for a uniform) with sd sqrt((105 - 9)/n). Every check
allows 5 of those standard deviations: a correct draw fails one with probability < 1e-6, while
the default uniform init (Var = 1/(3 fan_in), a sixth of 2/fan_in) misses the variance by far.
"""
import math

import numpy as np
import pytest

from arraybn.nn import INIT_SCHEMES, build_model

SIGMAS = 5
MODELS = [("lenet5", dict(bn="none")), ("lenet5", dict(bn="full")),
          ("mlp", dict(bn="none", hidden=(64, 32))), ("vgg8", dict(bn="none")),
          ("plain", dict(bn="none", depth=10, width=8)), ("resnet", dict(depth=8, width=4))]


def _linear_modules(state):
    """``{module: (weight, bias or None)}`` of the convolutions and dense layers in ``state``
    (a state_dict, in order); normalization layers are named bn<k>."""
    modules = {}
    for key, value in state.items():
        module, kind = key.rsplit(".", 1)
        if not module.rsplit(".", 1)[-1].startswith("bn"):
            weight, bias = modules.get(module, (None, None))
            modules[module] = (value, bias) if kind == "weight" else (weight, value)
    return modules


def _fan_in(weight):
    return math.prod(weight.shape[1:])


def _check_standard_normal(z, what):
    n = z.size
    assert abs(z.mean()) < SIGMAS / math.sqrt(n), what
    assert abs((z ** 2).mean() - 1) < SIGMAS * math.sqrt(2 / n), what
    assert abs((z ** 4).mean() - 3) < SIGMAS * math.sqrt(96 / n), what


@pytest.mark.parametrize("name,options", MODELS)
def test_kaiming_normal_draws_n_0_2_over_fan_in_with_zero_biases(name, options):
    model = build_model(name, backend="numpy", seed=1, dtype="float64", init="kaiming-normal",
                        **options)
    state = model.state_dict()
    pooled = []
    for module, (weight, bias) in _linear_modules(state).items():
        z = weight / math.sqrt(2 / _fan_in(weight))
        _check_standard_normal(z, module)
        pooled.append(z.ravel())
        if bias is not None:
            assert not bias.any(), f"{module}.bias"
    _check_standard_normal(np.concatenate(pooled), "all weights together")
    assert model.config["init"] == "kaiming-normal"
    for key, value in state.items():                 # BN's affine parameters as always
        if key.endswith("bn1.weight"):
            assert (value == 1).all()


def _pytorch_default(state, seed, dtype):
    """The weights the default init has always drawn: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    each weight then its bias, layer by layer, from the first stream of the seed."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    expected = {}
    for module, (weight, bias) in _linear_modules(state).items():
        bound = 1.0 / math.sqrt(_fan_in(weight))
        expected[f"{module}.weight"] = rng.uniform(-bound, bound, weight.shape).astype(dtype)
        if bias is not None:
            expected[f"{module}.bias"] = rng.uniform(-bound, bound, bias.shape).astype(dtype)
    return expected


@pytest.mark.parametrize("name,options", MODELS)
def test_the_default_is_pytorchs_uniform_init_bit_for_bit(name, options):
    model = build_model(name, backend="numpy", seed=5, **options)
    state = model.state_dict()
    expected = _pytorch_default(state, 5, np.float32)
    assert expected and model.config["init"] == "kaiming-uniform"
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    explicit = build_model(name, backend="numpy", seed=5, init="kaiming-uniform", **options)
    for key, value in explicit.state_dict().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_kaiming_normal_is_seeded_and_leaves_dropout_masks_alone(cpu_backend):
    def make(seed, init="kaiming-normal"):
        return build_model("lenet5", backend=cpu_backend, seed=seed, dropout=0.3, init=init)
    first, again, other = make(2), make(2), make(3)
    for key, value in first.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key], value, err_msg=key)
    assert not np.array_equal(first.state_dict()["fc1.weight"], other.state_dict()["fc1.weight"])
    assert first.rng.bit_generator.state == make(2, "kaiming-uniform").rng.bit_generator.state
    on_numpy = build_model("lenet5", backend="numpy", seed=2, dropout=0.3, init="kaiming-normal")
    np.testing.assert_array_equal(on_numpy.state_dict()["conv1.weight"],
                                  first.state_dict()["conv1.weight"])


def test_an_unknown_init_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="init='xavier' is not one of " + ", ".join(INIT_SCHEMES)):
        build_model("lenet5", backend="numpy", init="xavier")
