"""The same networks and optimizers in PyTorch (the oracle): same batch -> same loss, gradients
and running statistics. Skipped when torch is not installed."""
import numpy as np
import pytest

from arraybn.nn import SGD, Adam, Parameter, build_model, softmax_cross_entropy
from tests.conftest import to_backend, to_host

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small problems: threads only contend with the other tests on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TorchLeNet5(nn.Module):
    """LeNet-5 of the seed text; ``bn`` None for no BN, ``position`` 'before'/'after' the ReLU."""

    def __init__(self, bn=True, position="before", momentum=0.1):
        super().__init__()
        bias = not bn or position == "after"
        self.conv1 = nn.Conv2d(1, 6, 3, bias=bias)
        self.conv2 = nn.Conv2d(6, 16, 3, bias=bias)
        self.fc1 = nn.Linear(400, 120, bias=bias)
        self.fc2 = nn.Linear(120, 84, bias=bias)
        self.fc3 = nn.Linear(84, 10)
        self.bns = [None] * 4
        if bn:
            self.bn1 = nn.BatchNorm2d(6, momentum=momentum)
            self.bn2 = nn.BatchNorm2d(16, momentum=momentum)
            self.bn3 = nn.BatchNorm1d(120, momentum=momentum)
            self.bn4 = nn.BatchNorm1d(84, momentum=momentum)
            self.bns = [self.bn1, self.bn2, self.bn3, self.bn4]
        self.position = position

    def _block(self, h, bn):
        if bn is None:
            return torch.relu(h)
        return torch.relu(bn(h)) if self.position == "before" else bn(torch.relu(h))

    def forward(self, x):
        h = nn.functional.max_pool2d(self._block(self.conv1(x), self.bns[0]), 2)
        h = nn.functional.max_pool2d(self._block(self.conv2(h), self.bns[1]), 2)
        h = self._block(self.fc1(h.flatten(1)), self.bns[2])
        h = self._block(self.fc2(h), self.bns[3])
        return self.fc3(h)


def _torch_copy(model, **options):
    net = TorchLeNet5(**options).double()
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return net


@pytest.mark.parametrize("options", [
    dict(bn="full", bn_position="before"), dict(bn="full", bn_position="after"),
    dict(bn="none"), dict(bn="full", bn_momentum=None)])
def test_lenet5_step_matches_pytorch(cpu_backend, rng, options):
    model = build_model("lenet5", backend=cpu_backend, dtype="float64", seed=5, **options)
    net = _torch_copy(model, bn=options["bn"] != "none", position=options.get("bn_position",
                      "before"), momentum=options.get("bn_momentum", 0.1))
    for _ in range(2):                  # two steps: running statistics start from non-defaults
        x = rng.standard_normal((16, 1, 28, 28))
        labels = rng.integers(0, 10, 16)
        logits = model.forward(to_backend(cpu_backend, x), training=True)
        loss, g = softmax_cross_entropy(logits, labels)
        model.backward(g)
        net.train()
        net.zero_grad()
        t_logits = net(torch.from_numpy(x))
        t_loss = nn.functional.cross_entropy(t_logits, torch.from_numpy(labels))
        t_loss.backward()
        assert loss == pytest.approx(t_loss.item(), rel=1e-10)
        np.testing.assert_allclose(to_host(logits), t_logits.detach().numpy(), rtol=1e-9,
                                   atol=1e-12)
    t_params = dict(net.named_parameters())
    for p in model.parameters():
        np.testing.assert_allclose(to_host(p.grad), t_params[p.name].grad.numpy(), rtol=1e-7,
                                   atol=1e-12, err_msg=p.name)
    t_state = net.state_dict()
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, t_state[key].numpy(), rtol=1e-10, err_msg=key)
    net.eval()
    np.testing.assert_allclose(to_host(model.forward(to_backend(cpu_backend, x), training=False)),
                               net(torch.from_numpy(x)).detach().numpy(), rtol=1e-9, atol=1e-12)


def test_float32_lenet5_matches_pytorch_float32(rng):
    model = build_model("lenet5", seed=1)
    net = TorchLeNet5()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x = rng.standard_normal((32, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 32)
    loss, g = softmax_cross_entropy(model.forward(x), labels)
    model.backward(g)
    t_loss = nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(labels))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    t_params = dict(net.named_parameters())
    for p in model.parameters():
        np.testing.assert_allclose(p.grad, t_params[p.name].grad.numpy(), rtol=2e-3, atol=2e-5,
                                   err_msg=p.name)


# --- optimizers -------------------------------------------------------------------------------

def _run_pair(make_ours, make_torch, rng, steps=6, reload_at=None):
    """Both optimizers on the same quadratic-ish problem with the same gradients at each step."""
    shapes = {"a.weight": (3, 4), "a.bias": (3,)}
    start = {k: rng.standard_normal(s) for k, s in shapes.items()}
    ours = [Parameter(k, v.copy()) for k, v in start.items()]
    theirs = [torch.tensor(v.copy(), requires_grad=True) for v in start.values()]
    opt, t_opt = make_ours(ours), make_torch(theirs)
    for step in range(steps):
        for p, t in zip(ours, theirs):
            grad = np.sin(3 * p.data) + 0.1 * step
            p.grad = grad
            t.grad = torch.from_numpy(grad.copy())
        opt.step()
        t_opt.step()
        if step == reload_at:                   # a checkpoint round trip must not change anything
            state = {k: np.asarray(v) for k, v in opt.state_dict().items()}
            opt = make_ours(ours)
            opt.load_state_dict(state)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                  (0.9, True, 1e-2), (0.5, False, 1e-3)])
def test_sgd_matches_torch(rng, momentum, nesterov, wd):
    _run_pair(lambda ps: SGD(ps, 0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd),
              lambda ts: torch.optim.SGD(ts, 0.1, momentum=momentum, nesterov=nesterov,
                                         weight_decay=wd), rng, reload_at=2)


@pytest.mark.parametrize("betas,wd", [((0.9, 0.999), 0.0), ((0.8, 0.99), 1e-2)])
def test_adam_matches_torch(rng, betas, wd):
    _run_pair(lambda ps: Adam(ps, 0.01, betas=betas, weight_decay=wd),
              lambda ts: torch.optim.Adam(ts, 0.01, betas=betas, weight_decay=wd), rng,
              reload_at=3)


def test_optimizer_state_errors():
    p = Parameter("w", np.zeros(3))
    p.grad = np.ones(3)
    sgd = SGD([p], 0.1)
    sgd.step()
    state = sgd.state_dict()
    with pytest.raises(ValueError, match="'sgd'"):
        Adam([p], 0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="momentum_buffer.w has shape"):
        SGD([p], 0.1).load_state_dict({**state, "momentum_buffer.w": np.zeros(4)})
    with pytest.raises(ValueError, match="unexpected keys"):
        SGD([p], 0.1).load_state_dict({**state, "momentum_buffer.v": np.zeros(3)})
    with pytest.raises(ValueError, match="no parameters"):
        SGD([], 0.1)
