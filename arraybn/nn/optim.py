"""SGD (momentum, Nesterov) and Adam with PyTorch's update rules, over ``Parameter`` lists.

``state_dict()`` is a flat dict of python scalars / host numpy arrays (ready for ``numpy.savez``);
``load_state_dict`` accepts the same dict back, also after a round trip through an ``.npz`` file
(scalars then arrive as 0-d arrays).
"""
import math

import numpy as np

from arraybn.backends import backend_for
from arraybn.backends.arrays import to_host
from arraybn.nn.flat import FlatParameters


class Optimizer:
    """Base of SGD and Adam: ``_apply(data, grad, state)`` is the update rule on arrays.

    The parameters become views into one flat array (``arraybn.nn.flat``) when they share a
    dtype, and so does each optimizer buffer (momentum, Adam's averages); a step is then a few
    whole-array operations, the same arithmetic per element as a step per parameter, so the
    results are bit-identical. ``flat_grad()`` gathers the gradients into one array, e.g. to
    all-reduce it in place before ``step()``, which then uses it as it is. A parameter without
    a gradient (or buffers only partly there) makes that step go parameter by parameter.
    """
    kind = "abstract"
    _buffer_names = ()

    def __init__(self, params, lr, weight_decay):
        params = list(params)
        if not params:
            raise ValueError("the optimizer got no parameters; pass model.parameters()")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique; got duplicates in "
                             f"{sorted({n for n in names if names.count(n) > 1})}")
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0; got lr={lr}, "
                             f"weight_decay={weight_decay}")
        self.params, self.lr, self.weight_decay = params, float(lr), float(weight_decay)
        self.steps = 0
        self.state = {name: {} for name in names}
        xp = backend_for(self.params[0].data).xp
        self._flat = (FlatParameters(self.params, xp)
                      if FlatParameters.possible(self.params, xp) else None)
        self._flat_state = None          # {buffer: flat array} whose views are the state's
        self._gathered = None            # the flat gradient flat_grad() returned, until step()

    def flat_grad(self):
        """The gradients of every parameter as one flat array (None if some has none, or the
        parameters could not share a flat array); ``step()`` uses this array, changes made to
        it in place (an all-reduce) included."""
        self._gathered = None if self._flat is None else self._flat.gather_grads()
        return self._gathered

    def step(self):
        """Update every parameter from its ``.grad`` (those with grad None are skipped)."""
        self.steps += 1
        grad, self._gathered = self._gathered, None
        if grad is None and self._flat is not None:
            grad = self._flat.gather_grads()
        flat_state = self._flat_buffers() if grad is not None else None
        if flat_state is None:
            self._flat_state = None
            for p in self.params:
                if p.grad is not None:
                    self._apply(p.data, self._decayed(p.grad, p.data), self.state[p.name])
            return
        data = self._flat.data
        self._apply(data, self._decayed(grad, data), flat_state)
        if self._flat_state is None:
            self._adopt(flat_state)

    def _decayed(self, grad, data):
        return grad + self.weight_decay * data if self.weight_decay else grad

    def _flat_buffers(self):
        """The flat buffers (empty before the first step, made from the per-parameter ones
        after ``load_state_dict``); None when those are only partly there."""
        if self._flat_state is not None:
            return self._flat_state
        states = [self.state[p.name] for p in self.params]
        if not any(states):
            return {}
        if any(set(state) != set(self._buffer_names) for state in states):
            return None
        return {name: self._flat.xp.concatenate([state[name].reshape(-1) for state in states])
                for name in self._buffer_names}

    def _adopt(self, flat_state):
        """Make the flat buffers the state: each parameter's buffer becomes a view of its slice
        (the buffers appear after the first step's ``_apply``)."""
        if set(flat_state) != set(self._buffer_names):
            return
        for name, flat in flat_state.items():
            for p, view in zip(self.params, self._flat.views(flat)):
                self.state[p.name][name] = view
        self._flat_state = flat_state

    def state_dict(self):
        out = {"kind": self.kind, "lr": self.lr, "steps": self.steps}
        for name, buffers in self.state.items():
            for key, value in buffers.items():
                out[f"{key}.{name}"] = to_host(value, copy=True)
        return out

    def load_state_dict(self, state):
        kind = str(np.asarray(state.get("kind", "")))
        if kind != self.kind:
            raise ValueError(f"optimizer state is for {kind or 'an unknown optimizer'!r}, "
                             f"this optimizer is {self.kind!r}")
        by_name = {p.name: p for p in self.params}
        expected = {f"{b}.{n}" for n in by_name for b in self._buffer_names}
        given = set(state) - {"kind", "lr", "steps"}
        unexpected = given - expected
        problems = [f"unexpected keys: {sorted(unexpected)}"] if unexpected else []
        for key in sorted(given - unexpected):
            shape = by_name[key.split(".", 1)[1]].data.shape
            if np.shape(state[key]) != shape:
                problems.append(f"{key} has shape {np.shape(state[key])}, expected {shape}")
        if problems:
            raise ValueError("cannot load optimizer state: " + "; ".join(problems))
        self.lr, self.steps = float(state["lr"]), int(state["steps"])
        self.state = {name: {} for name in by_name}
        for key in given:
            buffer, name = key.split(".", 1)
            p = by_name[name]
            self.state[name][buffer] = _device_like(state[key], p.data)
        self._flat_state = None               # the state holds fresh copies now


def _device_like(value, like):
    xp = backend_for(like).xp
    return xp.asarray(np.asarray(value), dtype=like.dtype).copy()


class SGD(Optimizer):
    """PyTorch ``torch.optim.SGD`` (dampening 0): buf = momentum * buf + g (buf = g at first),
    then p -= lr * (g + momentum * buf if nesterov else buf).

    ``ops``: a backend's kernels (``Backend.conv_ops()``); where they offer ``sgd_update`` (the
    numba backend), the update runs there in one pass, NumPy's bits (LeNet-5, in the step:
    73 -> 51 us on two threads, 76 -> 63 us on one)."""
    kind = "sgd"

    def __init__(self, params, lr, momentum=0.9, nesterov=False, weight_decay=0.0, ops=None):
        super().__init__(params, lr, weight_decay)
        self._ops = ops if hasattr(ops, "sgd_update") else None
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self._buffer_names = ("momentum_buffer",) if self.momentum else ()

    def _apply(self, data, grad, state):
        buf = state.get("momentum_buffer")
        if self._ops is not None and self._ops.sgd_update_applies(data, grad, buf):
            buf = self._ops.sgd_update(data, grad, buf, self.lr, self.momentum, self.nesterov)
            if buf is not None:
                state["momentum_buffer"] = buf
            return
        if self.momentum:
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= self.momentum
                buf += grad
            grad = grad + self.momentum * buf if self.nesterov else buf
        data -= data.dtype.type(self.lr) * grad


class Adam(Optimizer):
    """PyTorch ``torch.optim.Adam`` (L2 weight decay added to the gradient, no amsgrad).

    ``ops``: as for ``SGD``; where they offer ``adam_update`` (the numba backend) the update
    runs there in one pass, NumPy's bits."""
    kind = "adam"
    _buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, ops=None):
        super().__init__(params, lr, weight_decay)
        self._ops = ops if hasattr(ops, "adam_update") else None
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2 or not eps > 0:
            raise ValueError(f"need betas in [0, 1) (two of them) and eps > 0; got {betas}, {eps}")
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    def _apply(self, data, grad, state):
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        if self._ops is not None and self._ops.adam_update_applies(data, grad, m, v):
            state["exp_avg"], state["exp_avg_sq"] = self._ops.adam_update(
                data, grad, m, v, self.lr, self.betas, self.eps, self.steps)
            return
        beta1, beta2 = self.betas
        if "exp_avg" not in state:
            state["exp_avg"] = grad * 0
            state["exp_avg_sq"] = grad * 0
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        m += (1 - beta1) * grad
        v *= beta2
        v += (1 - beta2) * grad * grad
        correction1 = 1 - beta1 ** self.steps
        correction2 = 1 - beta2 ** self.steps
        denom = v ** 0.5 / math.sqrt(correction2) + self.eps
        data -= (m / denom) * data.dtype.type(self.lr / correction1)
