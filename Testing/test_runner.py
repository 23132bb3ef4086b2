"""GBMMassEffectLib.runner: event parsing, single "done" message, cancel of the whole group."""
from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from GBMMassEffectLib.runner import ProcessRunner, parseLine, pythonModuleCommand


def _script(body: str) -> list[str]:
    return [sys.executable, "-u", "-c", textwrap.dedent(body)]


def test_parse_line():
    assert parseLine('{"event": "progress", "fraction": 0.5}\n') == {"event": "progress", "fraction": 0.5}
    assert parseLine("plain text\n") == {"event": "log", "message": "plain text"}
    assert parseLine('{"no_event": 1}') == {"event": "log", "message": '{"no_event": 1}'}
    assert parseLine("{broken json") == {"event": "log", "message": "{broken json"}
    assert pythonModuleCommand("py", ["calibrate", "--job", 3]) == [
        "py", "-m", "GBMMassEffectLib", "calibrate", "--job", "3"]


def test_events_in_order_and_single_done():
    runner = ProcessRunner(_script("""
        import json, sys
        for i in range(5):
            print(json.dumps({"event": "progress", "stage": "S.1", "fraction": i / 4}), flush=True)
        print("a log line")
        print("to stderr", file=sys.stderr)
        print(json.dumps({"event": "result", "path": "/x/report.json"}), flush=True)
    """)).start()
    events = []
    rc = runner.waitForCompletion(timeout=30, callback=events.append)
    assert rc == 0 and runner.returncode == 0 and not runner.cancelled
    kinds = [e["event"] for e in events]
    assert kinds.count("done") == 1 and kinds[-1] == "done"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert runner.resultPath == "/x/report.json"
    assert "to stderr" in runner.logTail and "a log line" in runner.logTail
    assert runner.poll() == [] and not runner.running


def test_error_and_exit_code():
    runner = ProcessRunner(_script("""
        import json, sys
        print(json.dumps({"event": "error", "message": "tumor label map is empty"}), flush=True)
        sys.exit(3)
    """)).start()
    events = []
    assert runner.waitForCompletion(timeout=30, callback=events.append) == 3
    assert runner.lastError == "tumor label map is empty"
    assert events[-1] == {"event": "done", "returncode": 3, "cancelled": False}


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_cancel_kills_the_whole_group(tmp_path):
    """The child starts a grandchild (like the PythonSlicer launcher) and ignores nothing;
    cancel must end both, quickly, and report cancelled with a non-zero code."""
    pidfile = tmp_path / "grandchild.pid"
    runner = ProcessRunner(_script(f"""
        import json, subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pidfile)!r}, "w").write(str(g.pid))
        print(json.dumps({{"event": "progress", "fraction": 0.1}}), flush=True)
        g.wait()
    """), graceSeconds=2.0).start()
    t0 = time.monotonic()
    while not any(e["event"] == "progress" for e in runner.poll()):
        assert time.monotonic() - t0 < 20
        time.sleep(0.02)
    grandchild = int(pidfile.read_text())
    runner.cancel()
    events = []
    rc = runner.waitForCompletion(timeout=20, callback=events.append)
    assert time.monotonic() - t0 < 10
    assert rc != 0 and runner.cancelled
    assert events[-1]["event"] == "done" and events[-1]["cancelled"] is True
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        # reap if it became our zombie (it is not our child, so this only waits)
        time.sleep(0.05)
    else:
        pytest.fail("grandchild survived the cancel")


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX")
def test_cancel_escalates_to_sigkill():
    runner = ProcessRunner(_script("""
        import json, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"event": "progress", "fraction": 0.0}), flush=True)
        time.sleep(60)
    """), graceSeconds=0.5).start()
    t0 = time.monotonic()
    while not runner.poll():
        assert time.monotonic() - t0 < 20
        time.sleep(0.02)
    runner.cancel()
    rc = runner.waitForCompletion(timeout=20)
    assert rc == -9 and runner.cancelled
    assert time.monotonic() - t0 < 10


def test_timeout_cancels():
    runner = ProcessRunner(_script("import time; time.sleep(60)"), graceSeconds=1.0).start()
    with pytest.raises(TimeoutError):
        runner.waitForCompletion(timeout=0.5)
    assert runner.finished and runner.cancelled


def test_bad_arguments():
    with pytest.raises(ValueError):
        ProcessRunner([])
    with pytest.raises(RuntimeError):
        ProcessRunner(["true"]).waitForCompletion()
