"""One flat array behind a model's parameters: each ``Parameter.data`` becomes a view into it.

The optimizer then updates every parameter with a few whole-array operations instead of a few per
parameter, and a data-parallel trainer all-reduces one gradient array per step
(``FlatParameters.gather_grads``) instead of one per parameter. On NumPy each parameter's
``grad_buffer`` is its view of the flat gradient: the layers that compute their gradients into
it leave nothing to gather (LeNet-5 + BN on the numba backend: all 14 of them, whose 61,706
values the gather copied: the batch-2 step 0.256 -> 0.250 ms), the others' are copied in.

That pays while the parameters are small: the gather copies every gradient each step, and the
whole-array temporaries of a step leave the cache once the arrays are large. Optimizer step,
flat / per parameter, 1 thread (fourth session): Adam 0.31x for a plain-10 of width 8 (31k
values in 32 parameters), 0.70x for LeNet-5 (61k in 14), 0.89-0.94x for ResNet-20 and plain-20
(272-279k), 1.13x for the MLP (236k in 8) and 1.23x for VGG-8; SGD likewise, up to 1.63x for
VGG-8. So only models of at most ``MAX_VALUES`` parameter values go flat.
"""
import operator

import numpy as np

MAX_VALUES = 1 << 17          # 512 KB of float32: the gather and the temporaries stay in cache


class FlatParameters:
    """``params`` (same dtype, same array module) re-homed into one flat ``data`` array.

    Each parameter's ``data`` becomes a view of its slice (values kept); ``grad`` is a flat
    buffer that ``gather_grads`` fills from the parameters' ``.grad`` arrays, and on NumPy each
    parameter's ``grad_buffer`` its view of it.
    """

    def __init__(self, params, xp):
        self.params, self.xp = list(params), xp
        self.sizes = [int(np.prod(p.data.shape)) for p in self.params]
        self.shapes = [tuple(p.data.shape) for p in self.params]
        dtype = self.params[0].data.dtype
        self.data = xp.concatenate([p.data.reshape(-1) for p in self.params]).astype(dtype)
        for p, view in zip(self.params, self.views(self.data)):
            p.data = view
        self.grad = xp.empty_like(self.data)
        self._grad_views = self.views(self.grad)
        for p, view in zip(self.params, self._grad_views):
            p.grad_buffer = view if xp is np else None

    @classmethod
    def possible(cls, params, xp):
        """Whether the parameters should share one flat array: same dtype, at least one, and
        at most ``MAX_VALUES`` values in all."""
        return (bool(params) and len({p.data.dtype for p in params}) == 1
                and all(hasattr(p.data, "shape") for p in params)
                and sum(int(np.prod(p.data.shape)) for p in params) <= MAX_VALUES)

    def views(self, flat):
        """The per-parameter views (parameter shapes) of a flat array laid out like ``data``."""
        out, start = [], 0
        for size, shape in zip(self.sizes, self.shapes):
            out.append(flat[start:start + size].reshape(shape))
            start += size
        return out

    def gather_grads(self):
        """The flat gradient: every parameter's ``.grad`` that is not already its view of
        ``grad`` copied in (in one call when none is); None when some parameter has no
        gradient."""
        grads = [p.grad for p in self.params]
        in_place = list(map(operator.is_, grads, self._grad_views))
        if all(in_place):
            return self.grad
        if any(g is None for g in grads):
            return None
        if not any(in_place):
            self.xp.concatenate([g.reshape(-1) for g in grads], out=self.grad)
        else:
            for g, view, done in zip(grads, self._grad_views, in_place):
                if not done:
                    view[...] = g
        return self.grad
