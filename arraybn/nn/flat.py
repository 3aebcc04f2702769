"""One flat array behind a model's parameters: each ``Parameter.data`` becomes a view into it.

The optimizer then updates every parameter with a few whole-array operations instead of a few per
parameter, and a data-parallel trainer all-reduces one gradient array per step
(``FlatParameters.gather_grads``) instead of one per parameter.
"""
import numpy as np


class FlatParameters:
    """``params`` (same dtype, same array module) re-homed into one flat ``data`` array.

    Each parameter's ``data`` becomes a view of its slice (values kept); ``grad`` is a flat
    buffer that ``gather_grads`` fills from the parameters' ``.grad`` arrays in one call.
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

    @classmethod
    def possible(cls, params, xp):
        """Whether the parameters can share one flat array (same dtype, at least one)."""
        return bool(params) and len({p.data.dtype for p in params}) == 1 and all(
            hasattr(p.data, "shape") for p in params)

    def views(self, flat):
        """The per-parameter views (parameter shapes) of a flat array laid out like ``data``."""
        out, start = [], 0
        for size, shape in zip(self.sizes, self.shapes):
            out.append(flat[start:start + size].reshape(shape))
            start += size
        return out

    def gather_grads(self):
        """The flat gradient: every parameter's ``.grad`` copied into ``grad`` in one call;
        None when some parameter has no gradient."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return None
        self.xp.concatenate([g.reshape(-1) for g in grads], out=self.grad)
        return self.grad
