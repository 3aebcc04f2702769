"""Checks of BN statistics that the CuPy kernels make on the device and the host reads later.

Each BN call that validates statistics gets a slot k of an int32 array in device memory; its
kernel sets ``status[k] = 1`` when the statistics are unusable. Nothing waits for that: the host
reads all slots at once in :meth:`DeferredChecks.take` (one device-to-host copy), which the
trainer does once per step. Slot 0 is a sink for calls nobody asks about (``forward_train``).
"""
import numpy as np

from arraybn.backends.base import DeferredFailure

CAPACITY = 4096          # BN calls between two reads of the flags (when full: read early)
SINK = 0


class DeferredChecks:
    """The flags of one device and the BN calls they belong to."""

    def __init__(self, xp, capacity=CAPACITY):
        self.status = xp.zeros(capacity, dtype=np.int32)
        self._pending = []          # the call of slot k + 1
        self._failures = []         # found when the slots ran full, not yet taken

    def slot(self, label, what, arrays):
        """A fresh slot for one BN call that used ``arrays`` (mean, var) as ``what``."""
        if len(self._pending) + 1 >= self.status.shape[0]:
            self._failures += self._read()
        self._pending.append(DeferredFailure(label, what, tuple(arrays)))
        return len(self._pending)

    def take(self):
        """[DeferredFailure] of the calls whose flag is set, in call order; frees every slot."""
        failures, self._failures = self._failures + self._read(), []
        return failures

    def _read(self):
        if not self._pending:
            return []
        used = len(self._pending) + 1
        flags = self.status[:used].get()          # the one host synchronisation
        self.status[:used].fill(0)
        found = [call for call, flag in zip(self._pending, flags[1:]) if flag]
        self._pending = []
        return found
