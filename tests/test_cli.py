"""The `dasklab` command as a user runs it (subprocesses): local serve, publish commands, status, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dasklab.adapters import procs

DASKLAB = [sys.executable, "-m", "dasklab.cli"]


def run(home, *args, check=True):
    env = {**os.environ, "DASKLAB_HOME": str(home)}
    env.pop("PUBSUB_EMULATOR_HOST", None)
    out = subprocess.run([*DASKLAB, *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def status(home) -> list[dict]:
    return json.loads(run(home, "status", "--json").stdout)


@pytest.fixture
def serve(home, tmp_path):
    env = {**os.environ, "DASKLAB_HOME": str(home), "DASKLAB_POLL_S": "0.5", "DASKLAB_CONFIRM_S": "2"}
    env.pop("PUBSUB_EMULATOR_HOST", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([*DASKLAB, "local", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    procs.wait_until(lambda: (home / "serve.json").exists() or proc.poll() is not None, 60, what="local serve")
    assert proc.poll() is None, (tmp_path / "serve.log").read_text()
    info = json.loads((home / "serve.json").read_text())
    yield info
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    log.close()
    assert not (home / "serve.json").exists()


def wait_for(check, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError("timed out")


def test_commands_through_the_local_controller(serve, home):
    assert serve["bus"] == "Pub/Sub emulator"
    out = run(home, "start-lab", "--lab", "cli1", "--workers", "1", "--max", "3", "--idle-timeout", "5m")
    assert "published start-lab for cli1 to the local controller (Pub/Sub emulator)" in out.stdout
    row = wait_for(lambda: next((r for r in status(home) if r["lab"] == "cli1" and r["phase"] == "ready"), None))
    assert row["workers"]["min"] == 0 and row["workers"]["max"] == 3 and row["dashboard"].startswith("http://127.0.0.1")
    table = run(home, "status").stdout
    assert "cli1" in table and "ready" in table and "workers cur/target/min/max" in table
    run(home, "scale", "--lab", "cli1", "--pin", "2")
    wait_for(lambda: status(home)[0]["workers"]["current"] == 2)
    run(home, "keep-alive", "--lab", "cli1", "--for", "2h")
    run(home, "stop-lab", "--lab", "cli1")
    wait_for(lambda: status(home) == [])
    pids = [serve["pid"]]
    assert all(not procs.pid_alive(p) for p in pids if p != serve["pid"])


@pytest.mark.parametrize("args, message", [
    (["start-lab", "--lab", "Bad_Name"], "lab: must be ≤ 40 chars"),
    (["start-lab", "--lab", "ok", "--max", "99"], "workers.max: 99 is above the controller cap max_workers=16"),
    (["start-lab", "--lab", "ok", "--idle-timeout", "soon"], "idle_timeout: 'soon' is not a duration"),
    (["scale", "--lab", "ok"], "message: give at least one of min, max, pin, unpin"),
    (["keep-alive", "--lab", "ok", "--for", "forever"], "for: 'forever' is not a duration"),
])
def test_bad_commands_are_refused_locally(home, args, message):
    out = run(home, *args, check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_publishing_without_a_controller_says_how_to_start_one(home):
    out = run(home, "start-lab", "--lab", "ok", check=False)
    assert out.returncode == 2 and "dasklab local serve" in out.stderr


def test_status_without_labs(home):
    assert "no labs" in run(home, "status").stdout
