"""Tell the user when Numba compiles arraybn's kernels: a cold on-disk cache (the first run).

Numba fires its ``numba:compile`` event only when a kernel is really compiled, never when it is
loaded from the on-disk cache, so the notice comes on a cold cache (a fresh install, changed
kernels, a new NUMBA_CACHE_DIR) and never on a warm one, at no cost to a warm run.
``set_compile_notice`` does not import Numba; ``numba_config`` installs the listener when the
kernels are defined.
"""
_notice = {"callback": None}


def set_compile_notice(callback):
    """Call ``callback()`` once, just before the first arraybn kernel compiles; None: no notice."""
    _notice["callback"] = callback


def _compiling():
    callback, _notice["callback"] = _notice["callback"], None
    if callback is not None:
        callback()


def install_listener():
    """Listen to Numba's compile events (once per process: called by ``numba_config``)."""
    from numba.core import event

    class _ArraybnCompiles(event.Listener):
        def on_start(self, ev):
            if getattr(ev.data["dispatcher"].py_func, "__module__", "").startswith("arraybn."):
                _compiling()

        def on_end(self, ev):
            pass

    event.register("numba:compile", _ArraybnCompiles())
