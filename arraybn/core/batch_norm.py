"""Batch normalization forward/backward for every variant, on any backend.

Every variant is written with the backend's four kernels (see ``arraybn.backends.base``). For each
group of samples (the whole batch, or one ghost batch) the cache keeps the statistics used to centre
it and the per-channel map ``x_hat = (x - mean) * xhat_scale + xhat_shift``; backward needs nothing
else:

=================  ============================  ===========  ================  ========
variant            mean used                     xhat_scale   xhat_shift        centred
=================  ============================  ===========  ================  ========
full               batch mean                    inv_std      0                 yes
mean_only          batch mean                    1            0                 yes
renorm             batch mean                    r * inv_std  d                 yes
frozen/inference   running mean                  inv_std (1)  0                 no
=================  ============================  ===========  ================  ========
"""
from dataclasses import dataclass

import numpy as np

from arraybn.backends import backend_for, is_cupy_array
from arraybn.backends.arrays import to_host
from arraybn.core import validation as v
from arraybn.core.moments import group_moments
from arraybn.distributed.base import Communicator


@dataclass
class BNCache:
    """What ``batch_norm_backward`` needs; built by ``batch_norm_forward``."""
    backend: object
    x3: object              # (N, C, M) C-contiguous input
    shape: tuple            # the input's original shape
    groups: tuple           # ((start, stop), ...) along N: one per ghost batch, else one
    mean: list              # per group: float64 (C,) statistics that centre the group
    xhat_scale: list        # per group: float64 (C,)
    xhat_shift: list        # per group: float64 (C,) or None
    w: list                 # per group: float64 (C,) weight of the variance term in gx
    centered: bool          # statistics were computed from this batch
    gamma: object           # float64 (C,)
    gamma_dtype: object     # dtype for ggamma, None when gamma was None
    beta_dtype: object      # dtype for gbeta, None when beta was None
    comm: object = None     # the communicator whose group's statistics were used, else None
    count: int = 0          # with comm: values per channel in the whole group's batch


def _check_array_module(x, be):
    if not be.owns(x):
        where = "a CuPy (GPU) array" if is_cupy_array(x) else "a NumPy (CPU) array"
        raise TypeError(f"x is {where} but backend {be.name!r} was asked for; "
                        f"{be.foreign_array_hint}")


def _groups(n, ghost_batch_size):
    """((start, stop), ...) along N: one per ghost batch, else one; none for an empty batch."""
    if ghost_batch_size is not None and (int(ghost_batch_size) != ghost_batch_size
                                         or ghost_batch_size < 1):
        raise ValueError(f"ghost_batch_size must be a positive integer, got {ghost_batch_size!r}")
    if n == 0:
        return ()
    if ghost_batch_size is None:
        return ((0, n),)
    count = -(-n // int(ghost_batch_size))
    base, extra = divmod(n, count)                     # like numpy.array_split: sizes differ by
    sizes = [base + 1] * extra + [base] * (count - extra)  # at most one, larger ones first
    bounds = np.cumsum([0] + sizes)
    return tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]))


def batch_norm_forward(x, gamma, beta, *, training=True, running_mean=None, running_var=None,
                       momentum=0.1, eps=1e-5, variant="full", backend=None,
                       ghost_batch_size=None, renorm=False, rmax=3.0, dmax=5.0, frozen=False,
                       out=None, comm=None):
    """Batch-normalize ``x`` of shape (N, C) or (N, C, *spatial); returns ``(y, cache)``.

    Statistics are per channel (axis 1) over N and the spatial axes.

    training=True: normalize with the batch mean and biased variance; running buffers, when
        given, are updated in place: ``r = (1 - momentum) * r + momentum * batch`` (unbiased
        variance for ``running_var``), exactly like ``torch.nn.functional.batch_norm``.
    training=False or frozen=True: normalize with ``running_mean``/``running_var`` and update
        nothing; backward treats those statistics as constants (fine-tuning with frozen BN).
    variant: 'full' (``gamma * x_hat + beta``) or 'mean_only' (``gamma * (x - mean) + beta``,
        Salimans & Kingma 2016; ``running_var`` is neither needed nor touched).
    ghost_batch_size: normalize each run of about this many samples with its own statistics
        (Hoffer et al. 2017); the batch is cut into ceil(N / size) groups as equal as possible
        (``numpy.array_split``: N=10, size 4 gives 4, 3, 3), and the running buffers are
        updated once per group, in order.
    renorm: batch renormalization (Ioffe 2017): ``x_hat = (x - mean_B) / sigma_B * r + d`` with
        ``r = clip(sigma_B / sigma_run, 1/rmax, rmax)``, ``d = clip((mean_B - mean_run) / sigma_run,
        -dmax, dmax)``, r and d constants in backward; needs the running buffers.
    gamma/beta may be None (no affine transform); their gradients are then None.
    y has x's dtype and shape, C-contiguous; ``out``, a C-contiguous array of that shape and
    dtype, receives y instead of a new array (reusing buffers saves the page faults of a fresh
    allocation on large inputs). ``out`` must not overlap x, which the cache keeps.
    An empty batch (N = 0) gives an empty y and leaves the running buffers alone, as in PyTorch.
    comm: an ``arraybn.distributed`` communicator. In training (full, mean_only, renorm) the
        statistics are those of the whole group's batch (every rank's x together, merged as
        count/mean/M2 with Chan's formula in rank order), the running buffers get the group's
        statistics and count (identical on every rank), and the backward all-reduces its
        per-channel sums: each rank's y and gx are its rows of the one-process result on the
        concatenated batch. ggamma/gbeta stay this rank's share (their sum over ranks is the
        one-process gradient), to be all-reduced with the other parameter gradients. A rank may
        hold no sample (N = 0); it still takes part. Every rank must make the same calls.
        Frozen statistics and inference have nothing to synchronise and ignore comm. Ghost
        batches are local by definition, so ghost_batch_size with comm is a ValueError (one
        process's ghost batches are comm=None on each rank; groups of ranks are comm.split(G)).
    """
    v.check_array(x, "x")
    be = backend_for(x, backend)
    xp = be.xp
    if backend is not None:            # else backend_for picked the backend that owns x
        _check_array_module(x, be)
    x3 = v.as_nc_m(x, xp)
    n, channels, m = x3.shape
    variant = v.check_variant(variant)
    v.check_scalars(momentum, eps)
    center_only = variant == "mean_only"
    rm = v.check_buffer(running_mean, "running_mean", channels, xp)
    rv = v.check_buffer(running_var, "running_var", channels, xp)
    g = v.channel_param(gamma, "gamma", channels, xp, 1.0)
    b = v.channel_param(beta, "beta", channels, xp, 0.0, copy=False)   # not kept in the cache
    dtypes = (None if gamma is None else np.dtype(getattr(gamma, "dtype", np.float64)),
              None if beta is None else np.dtype(getattr(beta, "dtype", np.float64)))
    use_running = frozen or not training
    if not use_running:
        v.check_writeable(running_mean=rm, running_var=None if center_only else rv)
    if use_running or renorm:
        _require_running(rm, rv, center_only, "frozen statistics / inference" if use_running
                         else "batch renormalization")
    if renorm and center_only:
        raise ValueError("batch renormalization needs variant='full' (it rescales by r)")
    if renorm:
        v.check_renorm_bounds(rmax, dmax)
    group = _check_comm(comm, ghost_batch_size) if not use_running else None
    y3 = _output(xp, out, x3, tuple(x.shape), "out", [("x", x3, _KEPT_X)])
    groups = _groups(n, ghost_batch_size)       # () for an empty batch
    if not groups and group is None:            # as in PyTorch: empty y, buffers untouched
        cache = BNCache(be, x3, tuple(x.shape), (), [], [], [], [], False, g, *dtypes)
        return y3.reshape(x.shape), cache
    count = 0
    if use_running:
        cache_parts = _forward_fixed(be, x3, y3, g, b, rm, rv, eps, center_only)
        groups, centered = ((0, n),), False
    elif group is not None:
        groups, centered = ((0, n),), True
        count, cache_parts = _forward_group(be, x3, y3, g, b, rm, rv, group, tuple(x.shape),
                                            momentum, eps, center_only, renorm, rmax, dmax)
    else:
        centered = True
        cache_parts = _forward_batches(be, x3, y3, g, b, rm, rv, groups, momentum, eps,
                                       center_only, renorm, rmax, dmax)
    cache = BNCache(be, x3, tuple(x.shape), groups, *cache_parts, centered, g, *dtypes,
                    comm=group, count=count)
    return y3.reshape(x.shape), cache


_KEPT_X = "the cache keeps x for the backward, which would then compute wrong gradients"


def _output(xp, out, like3, shape, name, kept):
    """A (N, C, M) view of ``out`` to write into, or a new array.

    kept: ``(what, array, why)`` for each array that ``out`` must not overlap.
    """
    if out is None:
        return xp.empty_like(like3)
    if (tuple(out.shape) != shape or out.dtype != like3.dtype or not out.flags.c_contiguous
            or type(out) is not type(like3)):
        raise ValueError(f"{name} must be a C-contiguous {like3.dtype} array of shape {shape} "
                         f"on the same device; got {out.dtype} {tuple(out.shape)}")
    v.check_writeable(**{name: out})
    for what, array, why in kept:
        if v.overlaps(xp, out, array):
            raise ValueError(f"{name} shares memory with {what}: {why}; pass a separate array "
                             f"(or {name}=None)")
    return out.reshape(like3.shape)


def _require_running(rm, rv, center_only, what):
    if rm is None or (rv is None and not center_only):
        raise ValueError(f"{what} needs running_mean" + ("" if center_only else " and running_var")
                         + "; pass the stored statistics (or use training=True)")


def _forward_fixed(be, x3, y3, g, b, rm, rv, eps, center_only):
    # checked here on the CPU; a GPU backend checks in its kernel (arraybn.core.deferred)
    a, shift, mean, scale = be.inference_coefficients(g, b, rm, None if center_only else rv, eps,
                                                      v.check_running_statistics)
    be.affine(x3, a, shift, out=y3)
    return [mean], [scale], [None], [be.xp.zeros_like(mean)]


def _forward_batches(be, x3, y3, g, b, rm, rv, groups, momentum, eps, center_only, renorm,
                     rmax, dmax):
    xp = be.xp
    means, scales, shifts, ws = [], [], [], []
    for start, stop in groups:
        xg, yg = (x3, y3) if len(groups) == 1 else (x3[start:stop], y3[start:stop])
        count = xg.shape[0] * xg.shape[2]
        v.check_batch_size(count, xg.shape, "the batch" if len(groups) == 1 else "a ghost batch")
        shift = None
        if renorm:            # r and d come from the running statistics before this update
            mean, var = be.moments(xg)
            v.check_finite(xp, [mean, var], "batch statistics")
            scale, shift = _renorm_factors(xp, mean, var, rm, rv, eps, rmax, dmax)
            a = g * scale
            be.affine(xg, a, b + g * shift - mean * a, out=yg)
            _, inv_std = be.finish_statistics(mean, var, eps, momentum, count, rm, rv)
        else:
            _, mean, var, inv_std = be.forward_train_finish(
                xg, g, b, eps, center_only, momentum, rm, None if center_only else rv, out=yg)
        if inv_std is None:
            raise v.non_finite_error(xp, [mean, var], "batch statistics")
        scale, w = _xhat_scale_and_w(xp, inv_std, scale if renorm else None, center_only)
        means.append(mean), scales.append(scale), shifts.append(shift), ws.append(w)
    return means, scales, shifts, ws


def _xhat_scale_and_w(xp, inv_std, renorm_scale, center_only):
    """The cache's xhat_scale and variance-term weight w for one group (see the module table)."""
    if center_only:
        return xp.ones(inv_std.shape), xp.zeros(inv_std.shape)
    return (inv_std if renorm_scale is None else renorm_scale), inv_std * inv_std


def _check_comm(comm, ghost_batch_size):
    if comm is None:
        return None
    if not isinstance(comm, Communicator):
        raise TypeError(f"comm must be an arraybn.distributed communicator (e.g. "
                        f"arraybn.distributed.world()), got {type(comm).__name__}")
    if ghost_batch_size is not None:
        raise ValueError("ghost_batch_size cannot be combined with comm: ghost batches are "
                         "local by definition. For each rank's own statistics pass comm=None; "
                         "for groups of G ranks pass comm.split(G)")
    return comm


def _forward_group(be, x3, y3, g, b, rm, rv, comm, shape, momentum, eps, center_only, renorm,
                   rmax, dmax):
    """Training forward with the whole group's statistics: (group count, cache parts)."""
    xp = be.xp
    count, mean, var = _group_statistics(be, x3, comm, shape)
    shift = scale = None
    if renorm:            # r and d come from the running statistics before this update
        scale, shift = _renorm_factors(xp, mean, var, rm, rv, eps, rmax, dmax)
    _, inv_std = be.finish_statistics(mean, var, eps, momentum, count, rm,
                                      None if center_only else rv)
    scale, w = _xhat_scale_and_w(xp, inv_std, scale, center_only)
    if x3.size:
        a = g * scale
        be.center_affine(x3, mean, a, b if shift is None else b + g * shift, out=y3)
    return count, ([mean], [scale], [shift], [w])


def _group_statistics(be, x3, comm, shape):
    """(count, mean, biased var) of the whole group's batch, the same on every rank."""
    xp = be.xp
    local = x3.shape[0] * x3.shape[2]
    if local:
        mean, var = be.moments(x3)
        mean, m2 = to_host(mean), to_host(var * local)
    else:
        mean = m2 = np.zeros(x3.shape[1])
    count, mean, m2 = group_moments(comm, local, mean, m2)
    group_shape = (count // x3.shape[2] if x3.shape[2] else 0,) + shape[1:]
    v.check_batch_size(count, group_shape, f"the batch of all {comm.size} ranks together")
    mean, var = xp.asarray(mean), xp.asarray(m2 / count)
    v.check_finite(xp, [mean, var], "batch statistics of the group")
    return count, mean, var


def _renorm_factors(xp, mean, var, rm, rv, eps, rmax, dmax):
    """(r / sigma_B, d) of batch renormalization, from the running statistics before the update."""
    v.check_running_statistics(xp, rm, rv)
    sigma_b = xp.sqrt(var + eps)
    sigma_run = xp.sqrt(rv.astype(np.float64) + eps)
    r = xp.clip(sigma_b / sigma_run, 1.0 / rmax, rmax)
    d = xp.clip((mean - rm.astype(np.float64)) / sigma_run, -dmax, dmax)
    return r / sigma_b, d


def batch_norm_backward(gy, cache, *, out=None):
    """Gradients ``(gx, ggamma, gbeta)`` of the loss, given ``gy = dL/dy`` and the forward cache.

    gx has the input's shape and dtype (written into ``out`` when given, as in the forward; it
    must not overlap gy or x); ggamma/gbeta have gamma's/beta's dtype (None when the forward got
    None), zeros for an empty batch.
    """
    if not isinstance(cache, BNCache):
        raise TypeError("cache must be the second value returned by batch_norm_forward")
    be, x3 = cache.backend, cache.x3
    xp = be.xp
    v.check_array(gy, "gy")
    if tuple(gy.shape) != cache.shape:
        raise ValueError(f"gy has shape {tuple(gy.shape)} but the forward input had {cache.shape}")
    _check_array_module(gy, be)
    gy3 = xp.ascontiguousarray(gy, dtype=x3.dtype).reshape(x3.shape)
    gx3 = _output(xp, out, x3, cache.shape, "out",
                  [("gy", gy3, "gx is computed from gy"), ("x", x3, _KEPT_X)])
    ggamma = gbeta = None
    whole = len(cache.groups) == 1
    for k, (start, stop) in enumerate(cache.groups):
        parts = (gy3, x3, gx3) if whole else (gy3[start:stop], x3[start:stop], gx3[start:stop])
        if cache.comm is None:
            _, sum_gy, sum_gy_xc = be.backward(parts[0], parts[1], cache.mean[k],
                                               cache.gamma * cache.xhat_scale[k], cache.w[k],
                                               cache.centered, out=parts[2])
        else:
            sum_gy, sum_gy_xc = _backward_group(be, cache, *parts)
        part = sum_gy_xc * cache.xhat_scale[k]
        if cache.xhat_shift[k] is not None:
            part += sum_gy * cache.xhat_shift[k]
        ggamma = part if ggamma is None else ggamma + part
        gbeta = sum_gy if gbeta is None else gbeta + sum_gy
    if not cache.groups:                 # an empty batch: zero gradients, as in PyTorch
        ggamma, gbeta = xp.zeros(x3.shape[1]), xp.zeros(x3.shape[1])
    return (gx3.reshape(cache.shape),
            None if cache.gamma_dtype is None else ggamma.astype(cache.gamma_dtype, copy=False),
            None if cache.beta_dtype is None else gbeta.astype(cache.beta_dtype, copy=False))


def _backward_group(be, cache, gy3, x3, gx3):
    """gx from the group's sums (one all-reduce of both) and count; returns this rank's sums."""
    xp = be.xp
    if x3.size:
        sum_gy, sum_gy_xc = be.backward_sums(gy3, x3, cache.mean[0])
    else:
        sum_gy = sum_gy_xc = xp.zeros(x3.shape[1])
    group_gy, group_gy_xc = cache.comm.allreduce_sum(np.stack([to_host(sum_gy),
                                                               to_host(sum_gy_xc)]))
    if x3.size:
        be.backward_gx(gy3, x3, cache.mean[0], cache.gamma * cache.xhat_scale[0], cache.w[0],
                       xp.asarray(group_gy), xp.asarray(group_gy_xc), cache.count, out=gx3)
    return sum_gy, sum_gy_xc
