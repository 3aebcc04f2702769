"""vgg8, plain, resnet and GroupNorm against PyTorch (the oracle), float64: arraybn's state_dict
loads into the independently written twin with ``strict=True``; then the same batches give the
same loss, logits, gradients, updated weights and running statistics. Skipped without torch."""
import numpy as np
import pytest

from arraybn.nn import SGD, build_model, softmax_cross_entropy
from arraybn.nn.groupnorm import GroupNorm
from tests.conftest import to_backend, to_host

torch = pytest.importorskip("torch")
from tests.nn.torch_nets import load_arraybn_state, twin  # noqa: E402  (needs torch)

pytestmark = pytest.mark.torch
LR = 0.1


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _step_both(model, net, opt, t_opt, x, labels):
    """One training step on each side; returns (our loss, logits), (torch loss, logits)."""
    logits = model.forward(to_backend(model.backend, x), training=True)
    loss, g = softmax_cross_entropy(logits, labels)
    model.backward(g)
    opt.step()
    t_opt.zero_grad()
    t_logits = net(torch.from_numpy(x))
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(labels))
    t_loss.backward()
    t_opt.step()
    return (loss, to_host(logits)), (t_loss.item(), t_logits.detach().numpy())


def _assert_close(ours, theirs, what=""):
    """Elementwise within 1e-9 of the largest entry of the tensor (and 1e-9 relative).

    Why not tighter: BN after the ReLU of a dense layer sees features with a single active
    sample in the batch (13 of vgg8's 256 at batch 16, more at batch 6). Their exact gradient
    is 0 (the normalized values do not depend on the active value), so both libraries return
    rounding noise times 1/sigma there: 1e-11 of the largest gradient after one step, 1e-10
    after a second. With BN before the ReLU everything agrees to 1e-13.
    """
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9 * np.abs(theirs).max(),
                               err_msg=what)


def _assert_same_training(model, rng, batch=6, steps=2):
    size = model.config["in_shape"][1]
    net = load_arraybn_state(twin(model.config).double(), model.state_dict())
    net.train()
    opt = SGD(model.parameters(), lr=LR, momentum=0.9)
    t_opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    for _ in range(steps):       # the second step starts from updated weights and statistics
        x = rng.standard_normal((batch, 1, size, size))
        labels = rng.integers(0, 10, batch)
        (loss, logits), (t_loss, t_logits) = _step_both(model, net, opt, t_opt, x, labels)
        assert loss == pytest.approx(t_loss, rel=1e-10)
        _assert_close(logits, t_logits, "logits")
    t_params = dict(net.named_parameters())
    for p in model.parameters():
        _assert_close(to_host(p.grad), t_params[p.name].grad.numpy(), f"gradient of {p.name}")
    t_state = net.state_dict()
    for key, value in model.state_dict().items():
        _assert_close(value, t_state[key].numpy(), key)
    net.eval()
    _assert_close(to_host(model.forward(to_backend(model.backend, x), False)),
                  net(torch.from_numpy(x)).detach().numpy(), "inference logits")


@pytest.mark.parametrize("bn,position", [("full", "before"), ("full", "after"),
                                         ("group", "before"), ("none", "before")])
def test_vgg8_training_matches_pytorch(cpu_backend, rng, bn, position):
    model = build_model("vgg8", bn=bn, bn_position=position, backend=cpu_backend,
                        dtype="float64", seed=3)
    _assert_same_training(model, rng)


@pytest.mark.parametrize("bn,position,width", [("full", "before", 4), ("full", "after", 4),
                                               ("group", "before", 4), ("group", "after", 9)])
def test_plain_training_matches_pytorch(cpu_backend, rng, bn, position, width):
    model = build_model("plain", depth=5, width=width, bn=bn, bn_position=position,
                        in_shape=(1, 12, 12), backend=cpu_backend, dtype="float64", seed=4)
    _assert_same_training(model, rng)


@pytest.mark.parametrize("bn,position,momentum", [("full", "before", 0.1),
                                                  ("full", "after", 0.3),
                                                  ("group", "before", 0.1),
                                                  ("none", "before", 0.1)])
def test_resnet8_training_matches_pytorch(cpu_backend, rng, bn, position, momentum):
    model = build_model("resnet", depth=8, bn=bn, bn_position=position, bn_momentum=momentum,
                        in_shape=(1, 16, 16), backend=cpu_backend, dtype="float64", seed=5)
    _assert_same_training(model, rng, batch=4)


def test_twins_hold_exactly_the_arraybn_state_keys():
    for name, options in (("vgg8", {}), ("plain", dict(depth=7, width=3)),
                          ("resnet", dict(depth=14, width=2))):
        model = build_model(name, backend="numpy", **options)
        assert list(twin(model.config).state_dict()) == list(model.state_dict()), name


@pytest.mark.parametrize("shape,groups", [((4, 6, 5, 3), 3), ((5, 64), None), ((3, 8, 7), 2)])
def test_group_norm_matches_torch_group_norm(cpu_backend, rng, shape, groups):
    layer = GroupNorm("gn", shape[1], groups=groups, eps=1e-4, backend=cpu_backend,
                      dtype=np.float64)
    t_layer = torch.nn.GroupNorm(layer.groups, shape[1], eps=1e-4).double()
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1])
    layer.weight.data[...] = to_backend(cpu_backend, gamma)
    layer.bias.data[...] = to_backend(cpu_backend, beta)
    with torch.no_grad():
        t_layer.weight.copy_(torch.from_numpy(gamma))
        t_layer.bias.copy_(torch.from_numpy(beta))
    x = rng.standard_normal(shape) * 3 + 1
    gy = rng.standard_normal(shape)
    y = layer.forward(to_backend(cpu_backend, x), True)
    gx = layer.backward(to_backend(cpu_backend, gy))
    t_x = torch.from_numpy(x).requires_grad_()
    t_y = t_layer(t_x)
    t_y.backward(torch.from_numpy(gy))
    assert layer.groups == (32 if groups is None else groups)
    np.testing.assert_allclose(to_host(y), t_y.detach().numpy(), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(to_host(gx), t_x.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(to_host(layer.weight.grad), t_layer.weight.grad.numpy(),
                               rtol=1e-10)
    np.testing.assert_allclose(to_host(layer.bias.grad), t_layer.bias.grad.numpy(), rtol=1e-10)
