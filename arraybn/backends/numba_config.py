"""The one place Numba compile flags are set, for every ``numba_*_kernels`` module (and
``uidx``, the unsigned index they share), and where their on-disk cache is dropped when any
kernel source changed (``drop_stale_cache``).

Every kernel is cached on disk (``cache=True``), releases the GIL, bounds checks are off, and
errors follow NumPy (``error_model="numpy"``: a division by zero gives inf/nan instead of a
Python exception, which lets Numba vectorize the loops). Of fastmath only FMA contraction is on,
which rounds once where a multiply-add would round twice; no reassociation, since these kernels
compute statistics whose summation order is part of their accuracy. ``parallel`` is per kernel,
and so is ``contract``: a kernel whose results must equal NumPy's bit for bit (the augmentation
resampler) turns contraction off, since NumPy rounds every product and sum separately.
"""
import functools
import glob
import hashlib
import os
import sys
import warnings

import numpy as np
from numba import njit

from arraybn.backends import compile_notice

FLAGS = dict(fastmath={"contract"}, nogil=True, error_model="numpy", boundscheck=False)


def jit(parallel=False, contract=True):
    """``njit`` with ``FLAGS`` and ``cache=True`` (``parallel`` where it pays; ``contract=False``:
    no fastmath at all, every operation rounded as NumPy rounds it).

    Numba writes its cache next to the kernel's module, or in its user-wide cache directory when
    that is read-only; if neither can be written, the kernels still work, compiled once per
    process (with one warning per module).
    """
    flags = FLAGS if contract else dict(FLAGS, fastmath=False)

    def decorate(func):
        try:
            return njit(cache=True, parallel=parallel, **flags)(func)
        except RuntimeError:                 # numba: "cannot cache function ...: no locator"
            _warn_not_cached(sys.modules[func.__module__].__file__)
            return njit(cache=False, parallel=parallel, **flags)(func)
    return decorate


def _uidx(index):
    """``index`` as an unsigned integer, for indexing inside kernels: Numba adds a wrap-around
    for negative indices to every access with a signed index that it cannot prove is
    non-negative, and that keeps LLVM from vectorising the loop (im2col of two 16-channel 28x28
    images: 0.137 ms with signed indices, 0.048 ms with unsigned, NumPy's slice copies 0.046).
    Indices must be non-negative: a negative one would wrap to a huge offset, unchecked."""
    return np.uint64(index)


uidx = njit(inline="always", **FLAGS)(_uidx)

compile_notice.install_listener()

DIGEST_FILE = "arraybn_kernels.sha256"


def drop_stale_cache(folder):
    """Delete the Numba cache of the kernel modules in ``folder`` (``numba_*.py``) when any of
    their sources changed since the cache was written; returns whether it did. Numba checks
    only a kernel's own file when it loads the kernel from the cache, not the files of the
    kernels it calls, so after an edit of ``numba_gemm.py`` alone the convolution kernels
    that inline its tiles would keep running the old code. A digest of all the sources is
    kept beside the cache (``__pycache__``); where that cannot be written (a read-only install,
    whose cache Numba keeps in its user-wide directory, and which a reinstall replaces whole),
    nothing is done."""
    sources = sorted(glob.glob(os.path.join(folder, "numba_*.py")))
    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as source:
            digest.update(os.path.basename(path).encode() + b"\0" + source.read())
    cache = os.path.join(folder, "__pycache__")
    stamp = os.path.join(cache, DIGEST_FILE)
    try:
        with open(stamp) as kept:
            if kept.read() == digest.hexdigest():
                return False
    except OSError:
        pass
    try:
        for path in glob.glob(os.path.join(cache, "numba_*.nb[ic]")):
            os.remove(path)
        os.makedirs(cache, exist_ok=True)
        with open(stamp, "w") as kept:
            kept.write(digest.hexdigest())
    except OSError:
        return False
    return True


drop_stale_cache(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def _warn_not_cached(module_file):
    warnings.warn(f"arraybn: no writable Numba cache directory for {module_file}, so its kernels "
                  "are compiled again in every process; set NUMBA_CACHE_DIR to a writable "
                  "directory to keep them", UserWarning, stacklevel=5)
