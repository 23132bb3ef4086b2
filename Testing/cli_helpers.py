"""Helpers shared by the tests that run the solver's command line in a subprocess."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

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
