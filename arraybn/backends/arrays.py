"""Moving arrays to the host: the one place that knows a device array has ``.get()``."""
import numpy as np


def to_host(a, dtype=None, copy=False):
    """``a`` as a NumPy array (of ``dtype`` when given): a CuPy array is copied from the device,
    anything else converted, and copied only when ``copy`` (or a dtype change) asks for it."""
    host = a.get() if hasattr(a, "get") else a
    if copy and host is a:
        return np.array(host, dtype=dtype, copy=True)
    return np.asarray(host, dtype=dtype)
