"""Stand-in for the few PythonQt ``qt`` pieces the module touches outside its Widget.

Only timers: ``QTimer.singleShot`` and a repeating ``QTimer`` whose callbacks run when
``slicer.app.processEvents()`` (the stand-in's event loop) is called. Widgets do not exist
here: the Widget class of a scripted module is never instantiated under pytest.
"""
from __future__ import annotations

import heapq
import itertools
import time

_pending: list = []  # heap of (due_time, seq, callback)
_seq = itertools.count()


def _schedule(msec, callback):
    heapq.heappush(_pending, (time.monotonic() + max(0, msec) / 1000.0, next(_seq), callback))


def processPendingTimers() -> int:
    """Run the callbacks that are due; returns how many ran."""
    ran = 0
    now = time.monotonic()
    while _pending and _pending[0][0] <= now:
        _, _, callback = heapq.heappop(_pending)
        callback()
        ran += 1
    return ran


class _Signal:
    def __init__(self):
        self._slots = []

    def connect(self, slot):
        self._slots.append(slot)

    def disconnect(self, slot=None):
        self._slots = [] if slot is None else [s for s in self._slots if s is not slot]

    def emit(self, *args):
        for slot in list(self._slots):
            slot(*args)


class QObject:
    def __init__(self, parent=None):
        self._parent = parent


class QTimer(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval = 0
        self.singleShot_ = False
        self.timeout = _Signal()
        self._active = False
        self._generation = 0

    @staticmethod
    def singleShot(msec, callback):
        _schedule(msec, callback)

    def setInterval(self, msec):
        self.interval = int(msec)

    def setSingleShot(self, flag):
        self.singleShot_ = bool(flag)

    def isActive(self):
        return self._active

    def start(self, msec=None):
        if msec is not None:
            self.interval = int(msec)
        self._active = True
        self._generation += 1
        generation = self._generation

        def fire():
            if not self._active or generation != self._generation:
                return
            if self.singleShot_:
                self._active = False
            else:
                _schedule(self.interval, fire)
            self.timeout.emit()

        _schedule(self.interval, fire)

    def stop(self):
        self._active = False
        self._generation += 1
