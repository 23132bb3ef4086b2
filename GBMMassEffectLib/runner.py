"""Qt-free runner for the solver process (ARCHITECTURE "The process boundary").

The Slicer module starts ``PythonSlicer -m GBMMassEffectLib ...`` through this class; tests
and scripts start ``sys.executable -m GBMMassEffectLib ...``. The child runs in a new process
session (PythonSlicer is a launcher that starts python-real, so cancel must reach the whole
group). A reader thread turns each stdout line into an event dict and puts it on a
``queue.Queue``; ``poll()`` drains the queue without blocking (a GUI calls it from a QTimer),
``waitForCompletion()`` loops on it. Exactly one ``{"event": "done", ...}`` event ends the
stream, after all output lines.

Events: the solver's JSON lines as they are (``progress``, ``result``, ``error``, ...);
any other line becomes ``{"event": "log", "message": line}``; the end is
``{"event": "done", "returncode": int, "cancelled": bool}``.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections import deque

__all__ = ["ProcessRunner", "parseLine", "pythonModuleCommand"]


def parseLine(line: str) -> dict:
    """One stdout line -> event dict (JSON objects with an "event" key pass through)."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            return obj
    return {"event": "log", "message": text}


def pythonModuleCommand(interpreter: str, args) -> list[str]:
    """Argument list for ``<interpreter> -m GBMMassEffectLib <args...>`` (no shell)."""
    return [str(interpreter), "-m", "GBMMassEffectLib", *[str(a) for a in args]]


class ProcessRunner:
    """Start a child process, collect its events on a reader thread, cancel its group.

    Parameters: ``args`` (argument list, no shell), ``env`` (full environment or None),
    ``cwd``, ``graceSeconds`` (SIGTERM -> SIGKILL delay on cancel), ``logLines`` (how many
    non-JSON output lines to keep for error messages).
    """

    def __init__(self, args, env=None, cwd=None, graceSeconds: float = 5.0, logLines: int = 200):
        if not args:
            raise ValueError("ProcessRunner needs a non-empty argument list")
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.graceSeconds = float(graceSeconds)
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.cancelled = False
        self.lastError: str | None = None
        self.resultPath: str | None = None
        self.logTail: deque[str] = deque(maxlen=logLines)
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._done = False
        self._killTimer: threading.Timer | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "ProcessRunner":
        if self.process is not None:
            raise RuntimeError("process already started")
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                      env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace",
                      bufsize=1)
        if os.name == "nt":  # no process groups by pid: a new group gets CTRL_BREAK_EVENT
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        self.process = subprocess.Popen(self.args, **kwargs)
        self._reader = threading.Thread(target=self._readOutput, name="GBMMassEffect-reader",
                                        daemon=True)
        self._reader.start()
        return self

    def _readOutput(self) -> None:
        proc = self.process
        try:
            for line in proc.stdout:
                self._queue.put(parseLine(line))
        finally:
            proc.stdout.close()
            rc = proc.wait()
            if self._killTimer is not None:
                self._killTimer.cancel()
            self._queue.put({"event": "done", "returncode": rc, "cancelled": self.cancelled})

    @property
    def running(self) -> bool:
        """True from start() until the "done" event has been delivered by poll()."""
        return self.process is not None and not self._done

    @property
    def finished(self) -> bool:
        return self._done

    # -- events ----------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """Return the events that arrived since the last call (never blocks)."""
        events = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            self._note(event)
            events.append(event)
        return events

    def _note(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "log":
            self.logTail.append(str(event.get("message", "")))
        elif kind == "error":
            self.lastError = str(event.get("message", "unknown error"))
        elif kind == "result":
            self.resultPath = event.get("path")
        elif kind == "done":
            self._done = True
            self.returncode = int(event["returncode"])
            # a cancel stays a cancel, whatever exit code the child managed to produce
            event["cancelled"] = self.cancelled

    def waitForCompletion(self, timeout: float | None = None, callback=None,
                          interval: float = 0.05) -> int:
        """Block until the process ends; pass each event to ``callback``. Returns the exit
        code. On timeout the process is cancelled and TimeoutError raised."""
        if self.process is None:
            raise RuntimeError("process not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            for event in self.poll():
                if callback is not None:
                    callback(event)
            if self._done:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                self.waitForCompletion(timeout=self.graceSeconds + 10.0, callback=callback)
                raise TimeoutError(f"solver process did not finish within {timeout:g} s")
            time.sleep(interval)
        return self.returncode

    # -- cancel ----------------------------------------------------------------------
    def cancel(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after ``graceSeconds``."""
        proc = self.process
        if proc is None or self._done:
            return
        self.cancelled = True
        if proc.poll() is not None and self._groupGone(proc):
            return
        self._signalGroup(proc, terminate=True)
        if self._killTimer is None:
            self._killTimer = threading.Timer(self.graceSeconds, self._kill)
            self._killTimer.daemon = True
            self._killTimer.start()

    def _kill(self) -> None:
        proc = self.process
        if proc is not None:
            self._signalGroup(proc, terminate=False)

    @staticmethod
    def _groupGone(proc) -> bool:
        if os.name == "nt":
            return True
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return True
        return False

    @staticmethod
    def _signalGroup(proc, terminate: bool) -> None:
        try:
            if os.name == "nt":
                if terminate:
                    proc.send_signal(signal.CTRL_BREAK_EVENT)
                else:
                    proc.kill()
            else:
                os.killpg(proc.pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass  # already gone

