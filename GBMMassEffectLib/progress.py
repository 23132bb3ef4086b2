"""Progress lines, atomic outputs and cancellation (ARCHITECTURE.md, "The process boundary").

* `emit` prints one JSON object per line on stdout and flushes it at once. Events:
  ``{"event": "progress", "stage", "fraction", "message", ...}``,
  ``{"event": "result", "path"}``, ``{"event": "error", "message"}``.
* `OutputSet` writes files atomically: each file goes to a temporary name in the same
  folder and is moved into place with `os.replace`, so a reader never sees half a file.
  The set remembers what it wrote so that a cancelled or failed run can remove all of it
  (`rollback`): a run leaves either a complete output (report.json last) or nothing.
* Cancellation is SIGTERM (and SIGINT). `CancelToken` is the ``cancel()`` callable handed
  to the solvers: it returns True once a signal arrived; `CancelToken.check()` raises
  `Cancelled`. Solvers should poll it once per time step or iteration. If the process has
  not ended `grace_s` seconds after the signal (a solver that never polls), a watchdog
  thread removes the temporary and committed files and ends the process itself.
* Exit codes: 0 complete output; 1 run-time failure; 2 bad input or usage;
  143 (= 128 + SIGTERM) cancelled by SIGTERM; 130 (= 128 + SIGINT) cancelled by SIGINT.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import threading
from typing import Any, Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_CANCELLED = 143  # 128 + SIGTERM

_emit_lock = threading.Lock()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give; mkstemp uses 0600


class Cancelled(BaseException):
    """The run was cancelled (SIGTERM/SIGINT). A BaseException, so that solver code that
    catches ``Exception`` does not swallow it (like KeyboardInterrupt)."""


def _jsonable(value: Any) -> Any:
    """Plain-JSON form of numpy scalars/arrays, paths and non-finite floats (as null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def to_json(obj: Any, **kwargs) -> str:
    """json.dumps that accepts numpy values and writes NaN/inf as null (strict JSON)."""
    return json.dumps(_jsonable(obj), allow_nan=False, **kwargs)


def emit(event: dict | str, stream=None, **fields) -> dict:
    """Print one event as a single JSON line and flush. ``emit("progress", stage=...)`` or
    ``emit({"event": "progress", ...})``. Returns the event dict."""
    if isinstance(event, str):
        record = {"event": event, **fields}
    else:
        record = {**event, **fields}
        record.setdefault("event", "progress")
    line = to_json(record).replace("\n", " ")
    stream = stream or sys.stdout
    with _emit_lock:
        print(line, file=stream, flush=True)
    return record


def progress(stage: str, fraction: float, message: str = "", **extra) -> dict:
    """emit a progress event; fraction is clipped to [0, 1]."""
    f = min(1.0, max(0.0, float(fraction)))
    return emit("progress", stage=stage, fraction=round(f, 4), message=message, **extra)


def one_line_message(exc: BaseException) -> str:
    """An exception as one line: our own errors by their message, anything else with its
    type name (no traceback reaches the user)."""
    text = " ".join(str(exc).split())
    if type(exc).__module__.startswith("GBMMassEffectLib") and text:
        return text
    if isinstance(exc, (ValueError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else f"internal error ({type(exc).__name__})"


def error(message: str, **extra) -> dict:
    """emit an error event; the message is squeezed onto one line."""
    return emit("error", message=" ".join(str(message).split()), **extra)


def result(path) -> dict:
    return emit("result", path=os.fspath(path))


# ---- atomic outputs -------------------------------------------------------------------
class OutputSet:
    """Atomic writes into one folder, with rollback of everything written by this run.

    >>> outs = OutputSet(out_dir)
    >>> outs.write(out_dir / "x.nrrd", lambda tmp: sitk.WriteImage(img, tmp))
    >>> outs.write_text(out_dir / "report.json", text)   # last
    On failure or cancellation call ``outs.rollback()``.
    """

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        self._temps: set[str] = set()
        self.committed: list[str] = []
        self._lock = threading.Lock()

    def temp_path(self, final_path) -> str:
        """A fresh temporary path next to final_path, keeping its extension(s) so that
        writers that choose the format by extension (SimpleITK) still work."""
        final_path = os.fspath(final_path)
        folder, name = os.path.split(final_path)
        base, ext = name, ""
        for suffix in (".nii.gz", ".nrrd", ".nhdr", ".nii", ".json", ".mha", ".txt"):
            if name.endswith(suffix):
                base, ext = name[: -len(suffix)], suffix
                break
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".part{ext}", dir=folder or ".")
        os.close(fd)
        with self._lock:
            self._temps.add(tmp)
        return tmp

    def write(self, final_path, writer: Callable[[str], Any]) -> str:
        """writer(tmp_path) writes the file; then it is moved to final_path atomically."""
        final_path = os.fspath(final_path)
        tmp = self.temp_path(final_path)
        try:
            writer(tmp)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, final_path)
        except BaseException:
            _remove(tmp)
            raise
        finally:
            with self._lock:
                self._temps.discard(tmp)
        with self._lock:
            self.committed.append(final_path)
        return final_path

    def write_text(self, final_path, text: str) -> str:
        def _w(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

        return self.write(final_path, _w)

    def write_json(self, final_path, obj: Any) -> str:
        return self.write_text(final_path, to_json(obj, indent=2) + "\n")

    def cleanup_temps(self) -> None:
        with self._lock:
            temps, self._temps = list(self._temps), set()
        for t in temps:
            _remove(t)

    def rollback(self) -> None:
        """Remove temporary files and every file this run has already moved into place."""
        self.cleanup_temps()
        with self._lock:
            done, self.committed = list(self.committed), []
        for p in done:
            _remove(p)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def atomic_write_text(path, text: str) -> str:
    """One-off atomic text write (temp name in the same folder, then os.replace)."""
    return OutputSet(os.path.dirname(os.fspath(path)) or ".").write_text(path, text)


def atomic_write_json(path, obj: Any) -> str:
    return OutputSet(os.path.dirname(os.fspath(path)) or ".").write_json(path, obj)


# ---- cancellation ---------------------------------------------------------------------
class CancelToken:
    """The ``cancel()`` callable given to solvers: True once cancellation was requested."""

    def __init__(self):
        self._event = threading.Event()
        self.signum: int | None = None
        self.finished = False  # set by finish(): the output is complete, ignore signals

    def finish(self) -> None:
        """Mark the run complete: later signals no longer cancel or roll back."""
        self.finished = True

    def __call__(self) -> bool:
        return self._event.is_set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def set(self, signum: int | None = None) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def check(self) -> None:
        """Raise Cancelled if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled(f"cancelled by {_signame(self.signum)}")

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_CANCELLED


def _signame(signum) -> str:
    if signum is None:
        return "request"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def check_cancel(cancel: Callable[[], bool] | None) -> None:
    """Raise Cancelled when the cancel callable says so (None: never cancelled)."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled")


def install_signal_handlers(
    token: CancelToken | None = None,
    outputs: Callable[[], OutputSet | None] | None = None,
    grace_s: float = 5.0,
    signals=(signal.SIGTERM, signal.SIGINT),
) -> CancelToken:
    """SIGTERM/SIGINT set the token. If the process is still alive grace_s seconds later,
    a watchdog removes the run's files (outputs() gives the current OutputSet), emits an
    error line and ends the process with the cancellation exit code. Main thread only."""
    token = token or CancelToken()

    def _watchdog():
        if token.finished:
            return
        out = outputs() if outputs else None
        if out is not None:
            out.rollback()
        error(f"cancelled by {_signame(token.signum)} (forced stop after {grace_s:g} s)",
              cancelled=True)
        os._exit(token.exit_code)

    def _handler(signum, frame):
        if token.finished:
            return
        first = not token.cancelled
        token.set(signum)
        if first and grace_s is not None:
            t = threading.Timer(grace_s, _watchdog)
            t.daemon = True
            t.start()

    for s in signals:
        signal.signal(s, _handler)
    return token
