"""The one place Numba compile flags are set, for ``numba_kernels`` and ``numba_conv_kernels``.

Every kernel is cached on disk (``cache=True``), releases the GIL, bounds checks are off, and
errors follow NumPy (``error_model="numpy"``: a division by zero gives inf/nan instead of a
Python exception, which lets Numba vectorize the loops). Of fastmath only FMA contraction is on,
which rounds once where a multiply-add would round twice; no reassociation, since these kernels
compute statistics whose summation order is part of their accuracy. ``parallel`` is per kernel.
"""
import functools
import sys
import warnings

from numba import njit

from arraybn.backends import compile_notice

FLAGS = dict(fastmath={"contract"}, nogil=True, error_model="numpy", boundscheck=False)


def jit(parallel=False):
    """``njit`` with ``FLAGS`` and ``cache=True`` (``parallel`` where it pays).

    Numba writes its cache next to the kernel's module, or in its user-wide cache directory when
    that is read-only; if neither can be written, the kernels still work, compiled once per
    process (with one warning per module).
    """
    def decorate(func):
        try:
            return njit(cache=True, parallel=parallel, **FLAGS)(func)
        except RuntimeError:                 # numba: "cannot cache function ...: no locator"
            _warn_not_cached(sys.modules[func.__module__].__file__)
            return njit(cache=False, parallel=parallel, **FLAGS)(func)
    return decorate


compile_notice.install_listener()


@functools.lru_cache(maxsize=None)
def _warn_not_cached(module_file):
    warnings.warn(f"arraybn: no writable Numba cache directory for {module_file}, so its kernels "
                  "are compiled again in every process; set NUMBA_CACHE_DIR to a writable "
                  "directory to keep them", UserWarning, stacklevel=5)
