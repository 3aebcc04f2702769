"""Input checks shared by the BN functions: every message says what was wrong and what to do."""
import math

import numpy as np

from arraybn.backends import is_cupy_array
from arraybn.backends.arrays import to_host
from arraybn.core.errors import NonFiniteStatisticsError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
VARIANTS = {"full": "full", "mean_only": "mean_only", "mean-only": "mean_only"}


def check_array(x, name):
    """Refuse anything but a NumPy or CuPy array, saying how to convert it.

    A torch tensor is recognised by its type's module name, without importing torch.
    """
    if isinstance(x, np.ndarray) or is_cupy_array(x):
        return
    if type(x).__module__.split(".")[0] == "torch":
        raise TypeError(f"{name} is a torch tensor; torch tensors are not accepted. Pass "
                        "t.numpy() for a CPU tensor t (t.detach().numpy() if it requires grad), "
                        "or cupy.from_dlpack(t) for a CUDA one")
    raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__name__}; convert it "
                    f"first, e.g. np.asarray({name}, dtype=np.float32)")


def as_nc_m(x, xp):
    """View ``x`` of shape (N, C, *spatial) as a C-contiguous (N, C, M) array (copies if needed).

    N may be 0 (an empty batch), C may not.
    """
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C) or (N, C, *spatial); got shape "
                         f"{tuple(x.shape)}. "
                         "Add a batch axis, e.g. x[None] for a single sample.")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32 or float64, got {x.dtype}; convert it first, "
                        "e.g. x.astype(numpy.float32)")
    n, c = x.shape[:2]
    if c == 0:
        raise ValueError(f"x has no channel (shape {tuple(x.shape)}); BN needs at least one")
    return xp.ascontiguousarray(x).reshape(n, c, math.prod(x.shape[2:]))   # np.prod: 3 us


def check_variant(variant):
    try:
        return VARIANTS[variant]
    except (KeyError, TypeError):
        raise ValueError(f"unknown variant {variant!r}; choose 'full' or 'mean_only' (ghost "
                         "batches, batch renormalization and frozen statistics are keyword "
                         "options)") from None


def channel_param(value, name, channels, xp, default, copy=True):
    """gamma/beta/coefficients as float64 (C,) on the backend; None gives ``default``.

    A copy unless ``copy=False`` (then float64 input passes through): the cache keeps gamma, and
    must not see the optimizer's later in-place updates.
    """
    if value is None:
        return xp.full(channels, default, dtype=np.float64)
    arr = value if isinstance(value, xp.ndarray) else xp.asarray(value)
    if np.dtype(arr.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {arr.dtype} (its gradient comes "
                        f"in its dtype); convert it first, e.g. {name}.astype(numpy.float32)")
    if arr.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) for {channels} channels; "
                         f"got shape {tuple(arr.shape)}")
    return arr.astype(np.float64, copy=copy)


def check_buffer(buf, name, channels, xp):
    if buf is None:
        return None
    if not isinstance(buf, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__} array (it is updated in place); "
                        f"got {type(buf).__name__}")
    if buf.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},); got {tuple(buf.shape)}")
    if np.dtype(buf.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {buf.dtype}")
    return buf


def check_writeable(**buffers):
    """Buffers about to be updated in place must not be read-only NumPy arrays (CuPy's have no
    such flag); None stands for a buffer that is not updated."""
    for name, buf in buffers.items():
        if buf is not None and not getattr(buf.flags, "writeable", True):
            raise ValueError(f"{name} is read-only, but it is updated in place; pass a writeable "
                             f"copy ({name}.copy())")


def check_renorm_bounds(rmax, dmax):
    if not (rmax >= 1 and dmax >= 0):
        raise ValueError(f"renorm needs rmax >= 1 and dmax >= 0; got rmax={rmax}, dmax={dmax}")


def overlaps(xp, a, b):
    """Whether ``a`` and ``b`` share memory: exactly on NumPy, by address range on CuPy."""
    return bool(np.shares_memory(a, b) if xp is np else xp.may_share_memory(a, b))


def check_scalars(momentum, eps):
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    if momentum is None or not (0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r} "
                         "(a cumulative average is BatchNorm(momentum=None) in arraybn.nn)")


def check_batch_size(count, shape, what="the batch"):
    if count < 2:
        raise ValueError(
            f"batch normalization in training mode needs more than one value per channel, but "
            f"{what} of shape {tuple(shape)} has {count}. Use a batch size > 1 "
            "(or larger ghost batches), or run in inference mode (training=False) with stored "
            "statistics.")


def check_finite(xp, arrays, what):
    """Raise NonFiniteStatisticsError naming the channels where any of ``arrays`` (C,) is NaN/inf.

    One reduction and one device-to-host transfer however many arrays are checked.
    """
    if not bool(_finite(xp, arrays).all()):
        raise non_finite_error(xp, arrays, what)


def _finite(xp, arrays):
    finite = xp.isfinite(arrays[0])
    for arr in arrays[1:]:
        finite &= xp.isfinite(arr)
    return finite


def check_running_statistics(xp, mean, var):
    """Refuse running statistics that cannot normalize: NaN/inf anywhere, or a negative variance.

    ``var`` may be None (mean_only). One reduction over the C values and one transfer to the host
    when they are fine.
    """
    arrays = [mean] if var is None else [mean, var]
    usable = _finite(xp, arrays)
    if var is not None:
        usable &= var >= 0
    if bool(usable.all()):
        return
    check_finite(xp, arrays, "running statistics")
    negative = np.flatnonzero(to_host(var < 0)).tolist()
    shown = ", ".join(str(c) for c in negative[:8]) + (", ..." if len(negative) > 8 else "")
    raise ValueError(f"running_var has negative values in channels [{shown}]; a variance cannot "
                     "be negative, so these statistics are corrupt: recompute them (arraybn "
                     "postproc) or load the stored ones again")


def non_finite_error(xp, arrays, what):
    """The NonFiniteStatisticsError for ``arrays``, at least one of which holds NaN/inf."""
    finite = _finite(xp, arrays)
    bad = np.flatnonzero(~to_host(finite))
    shown = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
    return NonFiniteStatisticsError(
        f"non-finite {what} in channel(s) {shown}; the input holds NaN/inf or overflowed "
        "(lower the learning rate, check the data, or use float64)", channels=bad)
