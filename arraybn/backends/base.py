"""The contract every backend implements.

A backend owns an array module ``xp`` and four kernels. The BN core reshapes every input to
``x3`` of shape ``(N, C, M)`` (M = product of the spatial axes, 1 for dense data), C-contiguous,
float32 or float64, and calls only these. Per-channel arrays (mean, var, coefficients, sums) are
float64 of shape ``(C,)`` on the backend's device; element-wise arithmetic is done in float64
and rounded once to the data's dtype, so float32 results are correctly rounded, not merely close.

- ``moments(x3) -> (mean, var)``: per-channel mean and biased variance, two-pass or Chan merges,
  never ``E[x^2] - E[x]^2``.
- ``forward_train(x3, gamma, beta, eps, center_only, out) -> (y, mean, var)``: the fused training
  forward. ``y = gamma * (x - mean) / sqrt(var + eps) + beta``, or ``gamma * (x - mean) + beta``
  when ``center_only``.
- ``affine(x3, a, b, out) -> y``: ``y = a[c] * x + b[c]`` (inference, frozen statistics, renorm).
- ``backward(gy3, x3, mean, scale, w, centered, out) -> (gx, sum_gy, sum_gy_xc)``:
  ``sum_gy = sum(gy)``, ``sum_gy_xc = sum(gy * (x - mean))`` per channel, and
  ``gx = scale * (gy - sum_gy / m - w * (x - mean) * sum_gy_xc / m)`` when ``centered``
  (statistics computed from this batch), else ``gx = scale * gy`` (statistics are constants);
  ``m = N * M``.

``out``, when given, is a preallocated C-contiguous array of x3's shape and dtype to write into.

One per-channel step comes with a default written with ``xp`` operations, which a backend may
replace with a fused kernel (the numba backend does: on small inputs these few (C,) operations
cost more than the kernels):

- ``finish_statistics(mean, var, eps, momentum, count, running_mean, running_var)
  -> (finite, inv_std)``: if every ``mean``/``var`` is finite, ``inv_std = 1 / sqrt(var + eps)``
  and the running buffers (either may be None) are updated in place,
  ``r = (1 - momentum) * r + momentum * batch`` in float64 with ``var * count / (count - 1)`` for
  ``running_var``; otherwise ``(False, None)`` and nothing changes.
- ``forward_train_finish(x3, gamma, beta, eps, center_only, momentum, running_mean,
  running_var, out) -> (y, mean, var, inv_std)``: ``forward_train``, then ``finish_statistics``
  with ``count = N * M``; ``inv_std`` is None when the statistics are not finite. One call per
  training step, as in cuDNN's forward-training call (the numba backend makes it one kernel).

A GPU backend does not stop the device to look at a flag after every BN call: its
``finish_statistics`` returns ``(None, inv_std)`` and updates only the channels whose statistics
are finite, ``forward_train_finish`` never returns ``inv_std=None``, and the failures come
later from ``take_deferred_failures`` (the trainer asks once per step through
``arraybn.core.deferred.raise_deferred_errors``). Also defaults: ``owns``,
``inference_coefficients``, ``take_deferred_failures``, ``labelled`` (see each).

Under a communicator (``arraybn.distributed``) the statistics and the backward's sums are the whole
group's, so the fused calls come apart into steps with the group's numbers in between:
forward ``moments`` -> merge across ranks -> ``finish_statistics`` (group count) ->
``center_affine``; backward ``backward_sums`` -> all-reduce -> ``backward_gx`` (group count).
Defaults with ``xp`` operations (float64, rounded once), replaced by kernels where a backend has
them:

- ``center_affine(x3, center, a, b, out) -> y``: ``y = (x - center[c]) * a[c] + b[c]``, centred
  first so that offset data loses no digits.
- ``backward_sums(gy3, x3, mean) -> (sum_gy, sum_gy_xc)``: the sums of ``backward``, no gx.
- ``backward_gx(gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, count, out) -> gx``: the centred gx of
  ``backward`` from given sums and count ``m``.
"""


import abc
import contextlib
from dataclasses import dataclass

import numpy as np

from arraybn.errors import UserError


def _col(v):
    return v[None, :, None]


def _store(value, like, out):
    if out is None:
        return value.astype(like.dtype, copy=False)
    out[...] = value
    return out


class BackendUnavailableError(UserError, RuntimeError):
    """A backend was asked for that cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class DeferredFailure:
    """A BN call whose statistics a GPU backend found unusable in a kernel (see
    ``Backend.take_deferred_failures``): ``what`` is "batch statistics" or "running statistics",
    ``arrays`` the (mean, var) it used (var None for mean_only), ``label`` the layer, if known."""
    label: object
    what: str
    arrays: tuple


class Backend(abc.ABC):
    name = "abstract"
    xp = None

    @abc.abstractmethod
    def moments(self, x3):
        """Per-channel (mean, biased var), float64 (C,)."""

    @abc.abstractmethod
    def forward_train(self, x3, gamma, beta, eps, center_only=False, out=None):
        """Fused training forward: (y, mean, var)."""

    @abc.abstractmethod
    def affine(self, x3, a, b, out=None):
        """y = a[c] * x + b[c]."""

    @abc.abstractmethod
    def backward(self, gy3, x3, mean, scale, w, centered=True, out=None):
        """(gx, sum_gy, sum_gy_xc)."""

    def finish_statistics(self, mean, var, eps, momentum, count, running_mean=None,
                          running_var=None):
        """(finite, inv_std); running buffers updated in place only when finite."""
        xp = self.xp
        if not bool((xp.isfinite(mean) & xp.isfinite(var)).all()):
            return False, None
        inv_std = 1.0 / xp.sqrt(var + eps)
        for buf, batch in ((running_mean, mean), (running_var, var * (count / (count - 1)))):
            if buf is not None:
                buf[...] = (1.0 - momentum) * buf.astype(xp.float64) + momentum * batch
        return True, inv_std

    def forward_train_finish(self, x3, gamma, beta, eps, center_only=False, momentum=0.1,
                             running_mean=None, running_var=None, out=None):
        """(y, mean, var, inv_std or None): forward_train, then finish_statistics."""
        y3, mean, var = self.forward_train(x3, gamma, beta, eps, center_only, out=out)
        _, inv_std = self.finish_statistics(mean, var, eps, momentum, x3.shape[0] * x3.shape[2],
                                            running_mean, running_var)
        return y3, mean, var, inv_std

    def center_affine(self, x3, center, a, b, out=None):
        """y = (x - center[c]) * a[c] + b[c], in float64, rounded once to x3's dtype."""
        with np.errstate(invalid="ignore", over="ignore"):
            return _store((x3 - _col(center)) * _col(a) + _col(b), x3, out)

    def backward_sums(self, gy3, x3, mean):
        """(sum_gy, sum_gy_xc) per channel, float64 (C,)."""
        xp = self.xp
        with np.errstate(invalid="ignore", over="ignore"):
            gy = gy3.astype(xp.float64, copy=False)
            return gy.sum(axis=(0, 2)), xp.einsum("ncm,ncm->c", gy, x3 - _col(mean))

    def backward_gx(self, gy3, x3, mean, scale, w, sum_gy, sum_gy_xc, count, out=None):
        """gx = scale * (gy - sum_gy / m - w * (x - mean) * sum_gy_xc / m), m = ``count``."""
        with np.errstate(invalid="ignore", over="ignore"):
            gy = gy3.astype(self.xp.float64, copy=False)
            gx = _col(scale) * (gy - _col(sum_gy / count)
                                - _col(w * sum_gy_xc / count) * (x3 - _col(mean)))
            return _store(gx, x3, out)

    def conv_ops(self):
        """Helpers for the trainer's conv and pooling layers, or None to use their ``xp`` code.

        An object with ``maxpool2d_forward(x, k) -> (y, argmax)`` and
        ``maxpool2d_backward(gy, argmax, x_shape, k) -> gx`` (see ``numba_conv_kernels``); it may
        add ``bn_pool_forward``/``bn_pool_backward``, the fused BN-ReLU-pool kernels that
        ``arraybn.nn.fused`` uses (see ``numba_fused_kernels``), and ``conv_kernels_available``
        with ``conv_forward``/``conv_backward``, the convolution kernels that ``arraybn.nn.conv``
        runs a chunk of the batch in (``numba_conv_kernels``; they must give the ``xp`` code's
        results bit for bit; ``FlatConvForward`` and ``FlatConvBNBackward``, the flat
        convolution's forward and a ``ConvBNBlock``'s backward, prepared once per input shape),
        and ``elementwise_applies`` with ``add_relu``, ``relu_gradient``
        and ``add``, the residual blocks' element-wise kernels (``numba_residual_kernels``; the
        same bits as NumPy's), ``dense_backward_applies`` with ``dense_backward_gemms``, a
        dense layer's two backward GEMMs side by side, and ``dense_forward_applies`` with
        ``dense_forward_gemm``, its forward GEMM in two halves (``numba_dense_kernels``; NumPy's
        bits), ``softmax_cross_entropy_applies`` with ``softmax_cross_entropy``, the loss and
        its gradient in one pass (``numba_loss_kernels``; NumPy's arithmetic, LLVM's ``exp``),
        ``bn_dense_train_forward``/``bn_dense_forward``/``bn_dense_backward``, the fused dense
        BN + ReLU blocks (``numba_dense_bn_kernels``; the unfused layers' bits), and
        ``sgd_update_applies`` with ``sgd_update`` and ``adam_update_applies`` with
        ``adam_update``, the SGD and Adam steps in one pass each that ``SGD(ops=...)`` and
        ``Adam(ops=...)`` take (``numba_optim_kernels``; NumPy's bits).
        """
        return None

    def augment_ops(self):
        """The trainer's augmentation kernel, or None to use the NumPy reference.

        An object with ``affine_crop(images, inverse, offset, shift, fill) -> out``: images
        (N, C, H, W) float32/float64 on this backend's device, warped bilinearly through the
        inverse affine maps (host float64 (N, 2, 2) and (N, 2)) and shifted by whole pixels
        (host integers (N, 2), the crop window) in one pass; the values of
        ``arraybn.data.augment.warp_affine`` followed by ``crop_at`` (see
        ``numba_augment_kernels``).
        """
        return None

    # -- arrays, inference coefficients and checks a GPU backend defers ------------------------

    foreign_array_hint = "use backend='cupy' or move it to the host with x.get()"

    def owns(self, x):
        """Whether this backend's array module owns ``x``. CPU backends: anything but a CuPy
        array (recognised by its type's module name, without importing CuPy)."""
        return type(x).__module__.split(".")[0] != "cupy"

    def inference_coefficients(self, gamma, beta, running_mean, running_var, eps, check):
        """(a, b, mean, scale): ``y = a[c] * x + b[c]`` normalizes with the running statistics;
        ``mean`` is running_mean in float64, ``scale = 1 / sqrt(running_var + eps)`` (ones when
        ``running_var`` is None: mean_only). ``check(xp, running_mean, running_var)`` raises
        when the statistics cannot normalize; here it runs first (one host sync). A GPU backend
        validates in its kernel instead and reports through ``take_deferred_failures``."""
        xp = self.xp
        check(xp, running_mean, running_var)
        mean = running_mean.astype(xp.float64)
        if running_var is None:
            scale = xp.ones_like(mean)
        else:
            scale = 1.0 / xp.sqrt(running_var.astype(xp.float64) + eps)
        a = gamma * scale
        return a, beta - mean * a, mean, scale

    def take_deferred_failures(self):
        """[DeferredFailure] of the BN calls since the last call whose statistics were unusable,
        and forget them. CPU backends check at the call (the core raises there): always []."""
        return []

    def labelled(self, label):
        """Context in which the BN calls' deferred failures carry ``label`` (the layer name)."""
        return contextlib.nullcontext()

    def __repr__(self):
        return f"<arraybn backend {self.name!r}>"
