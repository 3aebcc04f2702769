"""The NumPy backend: the plain, readable reference the other backends are measured against."""
import numpy as np

from arraybn.backends.base import Backend, _col, _store


# Non-finite inputs are detected by the core from the statistics; inside the kernels NaN/inf just
# propagate, like they do in the compiled backends.
_quiet = np.errstate(invalid="ignore", over="ignore", divide="ignore")


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    @_quiet
    def moments(self, x3):
        mean = x3.mean(axis=(0, 2), dtype=np.float64)
        xc = x3 - _col(mean)                       # float64: the second pass of a two-pass variance
        var = np.einsum("ncm,ncm->c", xc, xc) / (x3.shape[0] * x3.shape[2])
        return mean, var

    @_quiet
    def forward_train(self, x3, gamma, beta, eps, center_only=False, out=None):
        mean, var = self.moments(x3)
        a = gamma if center_only else gamma / np.sqrt(var + eps)
        y = self.affine(x3, a, beta - mean * a, out)
        return y, mean, var

    @_quiet
    def affine(self, x3, a, b, out=None):
        return _store(x3 * _col(a) + _col(b), x3, out)

    @_quiet
    def backward(self, gy3, x3, mean, scale, w, centered=True, out=None):
        gy = gy3.astype(np.float64, copy=False)
        xc = x3 - _col(mean)
        sum_gy = gy.sum(axis=(0, 2))
        sum_gy_xc = np.einsum("ncm,ncm->c", gy, xc)
        if centered:
            m = x3.shape[0] * x3.shape[2]
            gx = _col(scale) * (gy - _col(sum_gy / m) - _col(w * sum_gy_xc / m) * xc)
        else:
            gx = _col(scale) * gy
        return _store(gx, x3, out), sum_gy, sum_gy_xc


def create():
    return NumpyBackend()
