"""Errors a GPU backend found in its kernels, raised when the host asks (once per training step).

CPU backends check the statistics of every BN call on the spot and the core raises there. The
cupy backend does not stop the device for that: its kernels flag unusable statistics in device
memory, and :func:`raise_deferred_errors` reads the flags of all BN calls since its last call
(one device-to-host copy) and raises the error the CPU backends would have raised at the call,
named after the layer (``Backend.labelled``). The trainer calls it once per training step; a
script that calls ``batch_norm_forward`` on CuPy arrays itself calls it where it wants to know.
"""
from arraybn.core import validation as v
from arraybn.core.errors import NonFiniteStatisticsError


def raise_deferred_errors(backend):
    """Raise for the first BN call since the last call whose statistics were unusable.

    Non-finite statistics: NonFiniteStatisticsError naming the channels (and the layer);
    a negative running_var in inference: ValueError naming the channels.
    """
    for failure in backend.take_deferred_failures():
        try:
            _raise_for(backend.xp, failure)
        except NonFiniteStatisticsError as exc:
            raise (exc.located(failure.label) if failure.label else exc) from None
        except ValueError as exc:
            if failure.label:
                raise ValueError(f"{failure.label}: {exc}") from None
            raise


def _raise_for(xp, failure):
    mean, var = failure.arrays
    if failure.what == "running statistics":
        v.check_running_statistics(xp, mean, var)
    else:
        v.check_finite(xp, [mean] if var is None else [mean, var], failure.what)
    raise NonFiniteStatisticsError(      # the kernel saw bad values that are gone now
        f"unusable {failure.what} in a BN call (their values have changed since); the input "
        "held NaN/inf or overflowed (lower the learning rate, check the data, or use float64)")
