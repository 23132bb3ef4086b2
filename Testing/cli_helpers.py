"""Helpers shared by the tests that run the solver's command line in a subprocess."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    """The environment for a solver subprocess: the checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("GBM_FFT_WORKERS", "2")
    return env


def run_cli(*args, timeout=600):
    """Run `python -m GBMMassEffectLib ARGS`; every stdout line must be one JSON object."""
    proc = subprocess.run([sys.executable, "-m", "GBMMassEffectLib", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return proc, events


def assert_one_line_error(proc, events, code=2, match=None) -> str:
    """The run failed with exit `code`, no traceback, and exactly one final error event."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and events[-1] is errors[0]
    assert "\n" not in errors[0]["message"]
    if match:
        assert match in errors[0]["message"], errors[0]["message"]
    return errors[0]["message"]


def signal_cli_when(args, until, *, before_signal=None, timeout=60, sig=signal.SIGTERM):
    """Start `python -m GBMMassEffectLib ARGS`, read its JSON lines until `until(event)` is
    true, call `before_signal(proc, events)` (checks on the live run; may return a value),
    send `sig` and wait for the end. Returns (proc, events, seconds from the signal to the
    exit, stderr, what before_signal returned). The process is killed if anything fails."""
    proc = subprocess.Popen([sys.executable, "-m", "GBMMassEffectLib", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)
    events: list[dict] = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            if until(events[-1]):
                break
        else:
            raise AssertionError(f"the run ended before the awaited event: {events[-3:]}")
        checked = before_signal(proc, events) if before_signal is not None else None
        t0 = time.monotonic()
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=timeout)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    events += [json.loads(x) for x in rest.splitlines()]
    return proc, events, elapsed, err, checked
