"""Local processes adapter: real Pub/Sub emulator, real functions-framework servers, process-group cleanup."""

import base64
import contextlib
import http.client
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

try:
    from dasklab.adapters import procs
except ModuleNotFoundError:  # the package is not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
    from dasklab.adapters import procs

needs_emulator = pytest.mark.emulator  # runs, and fails, without the emulator: .ci/run installs it

TARGET = '''
import functions_framework, json, os, time

@functions_framework.cloud_event
def handle(event):
    message = event.data["message"]
    if message.get("attributes", {}).get("mode") == "slow":
        time.sleep(float(os.environ.get("SLOW_SECONDS", "2")))
    with open(os.environ["OUT"], "a") as f:
        f.write(json.dumps({"id": event["id"], "source": event["source"], "message": message}) + "\\n")
'''


unused_port = procs._unused_port


def group_gone(pgid: int) -> bool:
    return not procs._group_exists(pgid)


def push_body(data: bytes, message_id: str, **attributes) -> bytes:
    return json.dumps({
        "message": {"data": base64.b64encode(data).decode(), "attributes": attributes, "messageId": message_id,
                    "publishTime": "2026-01-01T00:00:00Z"},
        "subscription": "projects/dasklab-local/subscriptions/s",
    }).encode()


def post(port: int, body: bytes, path: str = "/") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def target(tmp_path):
    source = tmp_path / "main.py"
    source.write_text(TARGET)
    return source


# --- Proc ----------------------------------------------------------------------------------------------

def test_wait_for_report_reads_what_a_process_writes_once_whole(tmp_path):
    report = tmp_path / "report.json"
    report.write_text('{"port": 4')  # half written: not read yet
    write = f"import time; time.sleep(0.3); open({str(report)!r}, 'w').write({json.dumps({'port': 41})!r})"
    writer = procs.spawn([sys.executable, "-c", write + "; time.sleep(30)"], log_path=tmp_path / "w.log")
    try:
        assert procs.wait_for_report(writer, report, 10, what="writer") == {"port": 41}
    finally:
        procs.stop_pid_group(writer)
    report.unlink()
    quitter = procs.spawn(["sh", "-c", "exit 1"], log_path=tmp_path / "q.log")  # its port was taken, say
    assert procs.wait_for_report(quitter, report, 10, what="quitter") is None
    sleeper = procs.spawn(["sleep", "30"], log_path=tmp_path / "s.log")
    try:
        with pytest.raises(TimeoutError, match="sleeper"):
            procs.wait_for_report(sleeper, report, 0.2, what="sleeper")
    finally:
        procs.stop_pid_group(sleeper)


def test_wait_until_returns_value_or_times_out():
    assert procs.wait_until(lambda: 42, timeout=1) == 42
    with pytest.raises(TimeoutError, match=r"the thing not ready after 0.2s"):
        procs.wait_until(lambda: False, timeout=0.2, what="the thing")


def test_proc_stop_kills_the_group_and_is_idempotent(tmp_path):
    proc = procs.Proc.spawn(["sh", "-c", "sleep 60 & sleep 60 & wait"], log_path=tmp_path / "p.log")
    assert proc.alive()
    assert os.getpgid(proc.pid) == proc.pid  # its own process group
    proc.stop()
    assert not proc.alive() and group_gone(proc.pid)  # the backgrounded sleeps are gone too
    proc.stop()
    proc.stop(timeout=0)


def test_proc_stop_sigkills_what_ignores_sigterm(tmp_path):
    script = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print('ready', flush=True); time.sleep(60)")
    proc = procs.Proc.spawn([sys.executable, "-c", script], log_path=tmp_path / "p.log")
    procs.wait_until(lambda: "ready" in proc.log_tail(), timeout=10, what="child")
    started = time.monotonic()
    proc.stop(timeout=0.3)
    assert time.monotonic() - started < 3
    assert group_gone(proc.pid) and proc.popen.returncode == -9


def test_stop_pid_group_for_a_pid_read_from_disk(tmp_path):
    proc = procs.Proc.spawn(["sleep", "60"], log_path=tmp_path / "p.log")
    assert procs.stop_pid_group(proc.pid, expect="functions_framework") is False  # not what we recorded
    assert proc.alive()
    assert procs.stop_pid_group(proc.pid, expect="sleep") is True
    proc.popen.wait(timeout=5)
    assert group_gone(proc.pid)
    assert procs.stop_pid_group(proc.pid) is False  # already gone: no error
    with pytest.raises(ValueError):
        procs.stop_pid_group(os.getpgrp())


# --- emulator discovery ---------------------------------------------------------------------------------

def test_find_pubsub_emulator_prefers_the_environment(tmp_path, monkeypatch):
    launcher = tmp_path / "emu"
    launcher.write_text("#!/bin/sh\n")
    monkeypatch.setenv("DASKLAB_PUBSUB_EMULATOR", str(launcher))
    assert procs.find_pubsub_emulator() is None  # not executable
    launcher.chmod(0o755)
    if procs.shutil.which("java"):
        assert procs.find_pubsub_emulator() == [str(launcher)]
    monkeypatch.setenv("PATH", str(tmp_path))  # no java
    assert procs.find_pubsub_emulator() is None


# --- real processes ---------------------------------------------------------------------------------------

@needs_emulator
def test_emulator_push_to_functions_server_with_port_races(tmp_path, target, monkeypatch):
    from google.cloud import pubsub_v1

    out = tmp_path / "out.jsonl"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()

    # the emulator cannot say which port it bound when given 0, so it is given one found unused: the first one
    # "races" with another process, and is retried (functions-framework binds port 0 and logs which one it got)
    held = taken.getsockname()[1]
    ports = iter([held])
    monkeypatch.setattr(procs, "_unused_port", lambda: next(ports, None) or unused_port())

    with contextlib.ExitStack() as stack:  # exits in reverse: the emulator stops first, else its open
        # keep-alive push connections hold gunicorn's graceful stop ~2 s
        server = stack.enter_context(
            procs.start_functions_server("handle", target, env={"OUT": str(out)}, log_path=tmp_path / "ff.log"))
        emulator = stack.enter_context(procs.start_pubsub_emulator(tmp_path / "emulator"))
        assert emulator.host.startswith("127.0.0.1:")
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        topic = publisher.topic_path(emulator.project, "commands")
        publisher.create_topic(name=topic)
        pulled = subscriber.subscription_path(emulator.project, "pulled")
        subscriber.create_subscription(name=pulled, topic=topic)
        pushed = subscriber.subscription_path(emulator.project, "pushed")
        subscriber.create_subscription(request={
            "name": pushed, "topic": topic, "ack_deadline_seconds": 60,
            # a path naming the topic lets functions-framework put it in the CloudEvent's source
            "push_config": {"push_endpoint": f"{server.url}{topic}"},
        })

        message_id = publisher.publish(topic, b'{"lab": "a"}', kind="scale").result(timeout=10)

        response = subscriber.pull(subscription=pulled, max_messages=1, timeout=10)
        assert [m.message.data for m in response.received_messages] == [b'{"lab": "a"}']
        lines = procs.wait_until(lambda: read_lines(out), timeout=10, what="push delivery")
        assert lines[0]["id"] == message_id
        assert lines[0]["source"] == f"//pubsub.googleapis.com/{topic}"
        assert base64.b64decode(lines[0]["message"]["data"]) == b'{"lab": "a"}'
        assert lines[0]["message"]["attributes"] == {"kind": "scale"}
    taken.close()
    assert group_gone(emulator.proc.pid) and group_gone(server.proc.pid)
    assert "BindException" in emulator.log_path.read_text()  # the first attempt's failure, in the same log
    assert server.port != held and "Connection in use" not in server.log_path.read_text()


def test_functions_server_serves_a_push_body_while_a_slow_request_runs(tmp_path, target):
    out = tmp_path / "out.jsonl"
    server = procs.start_functions_server("handle", target, env={"OUT": str(out), "SLOW_SECONDS": "1.5"},
                                          log_path=tmp_path / "ff.log")
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/"
        slow = threading.Thread(target=post, args=(server.port, push_body(b"slow", "1", mode="slow")))
        slow.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert post(server.port, push_body(b"quick", "2")) == 200
        assert time.monotonic() - started < 1.0  # not queued behind the slow one
        slow.join(timeout=10)
        assert [line["id"] for line in read_lines(out)] == ["2", "1"]
        assert post(server.port, b"not json") == 400
    finally:
        server.stop()
    assert group_gone(server.proc.pid)
    server.stop()  # idempotent


def test_functions_server_that_cannot_start_reports_its_log(tmp_path):
    source = tmp_path / "broken.py"
    source.write_text("raise ImportError('missing dependency xyz')\n")
    with pytest.raises(RuntimeError, match="missing dependency xyz"):
        procs.start_functions_server("handle", source, log_path=tmp_path / "ff.log")
