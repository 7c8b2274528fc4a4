"""Entry points: CloudEvents called directly and through a real functions-framework server."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent

from dasklab.core import config
from dasklab import entry
from dasklab.adapters import procs
from dasklab.adapters.local import LocalBackend
from dasklab.adapters.files import FileEvents
from dasklab.core.errors import ConflictError
from dasklab.local.serve import push_envelope

REPO = Path(__file__).resolve().parents[1]
ATTRS = {"type": "google.cloud.pubsub.topic.v1.messagePublished",
         "source": "//pubsub.googleapis.com/projects/p/topics/dasklab-control", "id": "evt-1"}


def event(payload, message_id="m-1") -> CloudEvent:
    return CloudEvent(ATTRS, push_envelope(payload, message_id))


@pytest.fixture
def local_env(home, monkeypatch):
    monkeypatch.setenv("DASKLAB_HOME", str(home))
    monkeypatch.setenv("DASKLAB_BACKEND", "local")
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    config.current.cache_clear()
    entry.controller.cache_clear()
    yield home
    LocalBackend(home).stop_all()
    config.current.cache_clear()
    entry.controller.cache_clear()


def errors(caplog) -> list[dict]:
    return [json.loads(r.message) for r in caplog.records if r.name == "dasklab" and r.levelname == "ERROR"]


@pytest.mark.smoke
def test_valid_command_reaches_the_controller(local_env, caplog):
    from functions import main
    main.control(event({"type": "start-lab", "lab": "lab1", "owner": "alice"}))
    assert LocalBackend(local_env).fetch_lab("lab1").state.phase == "provisioning"
    decision = next(json.loads(r.message) for r in caplog.records if '"action": "create"' in r.message)
    assert decision["message_id"] == "m-1" and decision["from"] == "gone" and decision["to"] == "provisioning"


@pytest.mark.parametrize("payload, field", [
    ({"type": "start-lab", "lab": "Bad_Name", "owner": "alice"}, "lab"),
    ({"type": "scale", "lab": "x"}, "message"),
    (b"{not json", "data"),
    (b"x" * 70000, "data"),
])
@pytest.mark.smoke
def test_bad_input_is_logged_once_and_acknowledged(local_env, caplog, payload, field):
    from functions import main
    main.control(event(payload))  # returns normally: Pub/Sub acknowledges, no retry
    [err] = errors(caplog)
    assert err["field"] == field and err["action"] == "refused" and err["message_id"] == "m-1"
    assert LocalBackend(local_env).fetch_labs() == []


def test_malformed_envelope_is_acknowledged(local_env, caplog):
    from functions import main
    main.control(CloudEvent(ATTRS, {"message": {"data": "%%%"}}))
    assert errors(caplog)[0]["field"] == "message.data"


@pytest.mark.smoke
def test_transient_failure_raises_for_redelivery(local_env, monkeypatch):
    from functions import main

    def busy(cmd, mid, published=None, request_id="", sender=None):
        raise ConflictError("someone else changed the lab")

    monkeypatch.setattr(entry.controller(), "handle", busy)
    with pytest.raises(ConflictError):
        main.ticks(event({"type": "reconcile", "budget_seconds": 0}))


@pytest.mark.parametrize("tick", [{"v": 1, "type": "nightly-teardown"}, {"type": "teardown-idle"},
                                  {"type": "reconcile", "budget_seconds": 530}, {"type": "reconcile-class", "class": "c"}])
def test_a_tick_forged_on_the_control_topic_does_nothing_and_is_refused_to_its_sender(local_env, caplog, tick):
    from functions import main
    main.control(event({"type": "start-lab", "lab": "kept", "owner": "alice"}, "m-0"))
    main.control(CloudEvent(ATTRS, push_envelope(tick, "forged", {"request_id": "r-f"})))  # acknowledged
    assert LocalBackend(local_env).fetch_lab("kept").state.phase == "provisioning"  # no teardown, no step
    refused = next(o for o in outcomes(local_env) if o["message_id"] == "forged")
    assert (refused["outcome"], refused["command"], refused["field"], refused["rule"], refused["request_id"]) == (
        "refused", tick["type"], "type", "ticks are accepted only from the timers' topic", "r-f")
    [err] = errors(caplog)
    assert (err["action"], err["field"], err["message_id"]) == ("refused", "type", "forged")
    assert not [r for r in caplog.records if '"action": "teardown"' in r.message or '"tick"' in r.message]


@pytest.mark.smoke
def test_the_ticks_entry_point_runs_a_real_tick_and_refuses_commands(local_env, caplog):
    from functions import main
    main.control(event({"type": "start-lab", "lab": "t1", "owner": "alice"}, "m-0"))
    main.ticks(CloudEvent({**ATTRS, "source": "//pubsub.googleapis.com/projects/p/topics/dasklab-ticks"},
                          push_envelope({"v": 1, "type": "nightly-teardown"}, "tick-1")))
    teardown = next(json.loads(r.message) for r in caplog.records if '"action": "teardown"' in r.message)
    assert teardown["lab"] == "t1" and teardown["message_id"] == "tick-1" and "nightly" in teardown["reason"]
    main.ticks(event({"type": "stop-lab", "lab": "t1"}, "cmd-1"))  # a command on the timers' topic
    [refused] = [o for o in outcomes(local_env) if o["message_id"] == "cmd-1"]
    assert (refused["outcome"], refused["field"]) == ("refused", "type")
    assert "ticks only" in refused["rule"]


def test_importing_the_functions_module_loads_no_cloud_sdk():
    code = ("import sys, functions.main; heavy = [m for m in ('google.cloud.container_v1', 'google.cloud.pubsub_v1', "
            "'google.cloud.scheduler_v1', 'kubernetes', 'distributed') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def server(local_env, tmp_path):
    srv = procs.start_functions_server("control", REPO / "functions" / "main.py", log_path=tmp_path / "ff.log",
                                       env={"DASKLAB_HOME": str(local_env), "DASKLAB_BACKEND": "local"})
    yield srv
    srv.stop()
    assert not procs.pid_alive(srv.proc.pid)


def post(url, body: bytes, headers: dict) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def log_lines(srv) -> list[dict]:
    return [json.loads(line) for line in srv.log_path.read_text().splitlines() if line.startswith("{")]


def test_a_redelivered_nightly_teardown_through_the_ticks_entry_point_spares_a_lab_created_after_it(local_env, caplog):
    from functions import main
    main.control(event({"type": "start-lab", "lab": "early", "owner": "alice"}, "m-1"))
    nightly = push_envelope({"v": 1, "type": "nightly-teardown"}, "night-1")  # published now (publishTime)
    time.sleep(0.01)
    main.control(event({"type": "start-lab", "lab": "late", "owner": "bob"}, "m-2"))
    main.ticks(CloudEvent(ATTRS, nightly))  # delivered (again) after the late lab was created
    backend = LocalBackend(local_env)
    assert backend.fetch_lab("early") is None or backend.fetch_lab("early").state.phase == "tearing-down"
    assert backend.fetch_lab("late").state.phase == "provisioning"
    lines = [json.loads(r.message) for r in caplog.records if r.name == "dasklab"]
    [spared] = [d for d in lines if d.get("action") == "spare"]
    assert (spared["lab"], spared["message_id"]) == ("late", "night-1") and "before the lab was created" in spared["reason"]


def test_server_modes_and_malformed_bodies(server, local_env):
    start = {"type": "start-lab", "lab": "via-binary", "owner": "alice"}
    binary = {"ce-id": "1", "ce-specversion": "1.0", "ce-source": ATTRS["source"], "ce-type": ATTRS["type"],
              "Content-Type": "application/json"}
    assert post(server.url, json.dumps(push_envelope(start, "b-1")).encode(), binary) == 200
    structured = {"specversion": "1.0", "id": "2", "source": ATTRS["source"], "type": ATTRS["type"],
                  "datacontenttype": "application/json",
                  "data": push_envelope({**start, "lab": "via-structured"}, "s-1")}
    assert post(server.url, json.dumps(structured).encode(),
                {"Content-Type": "application/cloudevents+json"}) == 200
    raw_push = push_envelope({**start, "lab": "via-push"}, "p-1")  # what a push subscription sends
    assert post(server.url, json.dumps(raw_push).encode(), {"Content-Type": "application/json"}) == 200
    assert sorted(lab.name for lab in LocalBackend(local_env).fetch_labs()) == [
        "via-binary", "via-push", "via-structured"]
    # an unparseable body never reaches the handler
    assert post(server.url, b"\x00garbage", {"Content-Type": "application/json"}) == 400
    # a malformed or oversized command is acknowledged (200) with one error line naming the field
    big = push_envelope(b"{" + b" " * 70000 + b"}", "big-1")
    assert post(server.url, json.dumps(big).encode(), {"Content-Type": "application/json"}) == 200
    bad = push_envelope({"type": "keep-alive", "lab": "via-push", "for": "forever"}, "bad-1")
    assert post(server.url, json.dumps(bad).encode(), {"Content-Type": "application/json"}) == 200
    refused = {e["message_id"]: e for e in log_lines(server) if e.get("severity") == "ERROR"}
    assert refused["big-1"]["field"] == "data" and refused["bad-1"]["field"] == "for"


# --- the whole path: timer job → Pub/Sub emulator → push subscription → functions server → core → local lab ---

needs_emulator = pytest.mark.emulator  # runs, and fails, without the emulator: .ci/run installs it
E2E_PROJECT, LOCATION = "dasklab-e2e", "us-central1"


def until(check, timeout=60.0, every=0.3, what="condition"):
    return procs.wait_until(check, timeout, interval=every, what=what)


@needs_emulator
@pytest.mark.slow
def test_timer_jobs_reach_a_local_lab_through_the_emulator_and_the_functions_server(home, tmp_path, monkeypatch):
    from google.cloud import pubsub_v1

    from dasklab.cloud import infra
    from tests.standins.cloud_scheduler import CloudSchedulerStandin

    emu = procs.start_pubsub_emulator(tmp_path / "pubsub")
    server = ticks_server = None
    backend = LocalBackend(home)
    try:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emu.host)
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        published = []  # message ids of what the timers sent

        def scheduler_publish(topic, data, attributes):  # Cloud Scheduler delivering a job to its topic
            published.append(publisher.publish(topic, data, **attributes).result(timeout=10))

        with CloudSchedulerStandin(scheduler_publish) as standin:
            clients = infra.Clients(publisher, subscriber, standin.client())
            assert {c.action for c in infra.run(E2E_PROJECT, LOCATION, clients)} == {"create"}
            # the function, as deployed: the real entry point behind a push subscription (what Eventarc creates)
            env = {"DASKLAB_HOME": str(home), "DASKLAB_BACKEND": "local", "DASKLAB_PROJECT": E2E_PROJECT,
                   "DASKLAB_TICK_BUDGET_S": "0"}  # one pass per reconcile tick
            server = procs.start_functions_server("control", REPO / "functions" / "main.py",
                                                  log_path=tmp_path / "ff.log", env=env)
            ticks_server = procs.start_functions_server("ticks", REPO / "functions" / "main.py",
                                                        log_path=tmp_path / "ticks.log", env=env)
            control = f"projects/{E2E_PROJECT}/topics/dasklab-control"
            triggers = {}
            for name, srv in (("control", server), ("ticks", ticks_server)):  # each function's Eventarc trigger
                triggers[name] = f"projects/{E2E_PROJECT}/subscriptions/eventarc-{LOCATION}-dasklab-{name}-sub"
                subscriber.create_subscription(request={
                    "name": triggers[name], "topic": f"projects/{E2E_PROJECT}/topics/dasklab-{name}",
                    "push_config": {"push_endpoint": srv.url}, "ack_deadline_seconds": 600,
                    "retry_policy": {"minimum_backoff": {"seconds": 10}, "maximum_backoff": {"seconds": 600}}})
            watch = f"projects/{E2E_PROJECT}/subscriptions/status-watch"
            subscriber.create_subscription(name=watch, topic=f"projects/{E2E_PROJECT}/topics/dasklab-status")
            # a second apply gives the triggers' subscriptions the dead-letter policy, and changes nothing else
            changes = {c.name: c for c in infra.run(E2E_PROJECT, LOCATION, clients)}
            assert [changes.pop(t).action for t in triggers.values()] == ["update", "update"]
            assert {c.action for c in changes.values()} == {"unchanged"}

            def run_job(name):
                job = standin.client().run_job(name=f"projects/{E2E_PROJECT}/locations/{LOCATION}/jobs/{name}")
                assert job.status.code == 0, job.status.message

            # an instructor starts a lab: a plain publish on the control topic (`gcloud pubsub topics publish`)
            start = {"v": 1, "type": "start-lab", "lab": "e2e", "owner": "alice", "idle_timeout": "1s",
                     "workers": {"initial": 1, "min": 1, "max": 2}}
            publisher.publish(control, json.dumps(start).encode()).result(timeout=10)
            until(lambda: backend.fetch_lab("e2e"), what="the start-lab through the push subscription")

            def ticked_to(phase):  # the reconcile timer moves it on, one step per tick
                run_job("dasklab-reconcile")
                lab = backend.fetch_lab("e2e")
                return lab is not None and lab.state.phase == phase

            until(lambda: ticked_to("ready"), every=1.0, what="the lab ready after reconcile ticks")
            # idle for longer than its 1 s idle timeout: the teardown-idle timer deletes it
            until(lambda: backend.dashboard(backend.fetch_lab("e2e")).fetch_load().idle_since, what="idle")
            time.sleep(1.5)
            run_job("dasklab-teardown-idle")
            until(lambda: backend.fetch_lab("e2e") is None or backend.fetch_lab("e2e").state.phase == "tearing-down",
                  what="teardown")

            def forgotten():
                if backend.fetch_lab("e2e") is None:
                    return True
                run_job("dasklab-reconcile")  # deletion is followed, then forgotten, by reconcile ticks
                return False

            until(forgotten, every=1.0, what="the lab forgotten")

        decisions = [line for line in log_lines(server) + log_lines(ticks_server) if line.get("lab") == "e2e"]
        teardown = next(d for d in decisions if d.get("action") == "teardown")
        assert teardown["from"] == "ready" and "idle" in teardown["reason"]
        assert teardown["message_id"] in published  # the teardown-idle job's own message
        events = []

        def status_events():  # what the controller published on the status topic
            received = subscriber.pull(subscription=watch, max_messages=10, timeout=5).received_messages
            events.extend(json.loads(m.message.data) for m in received)
            return {"lab-ready", "lab-deleted"} <= {e["event"] for e in events}

        until(status_events, what="lab-ready and lab-deleted on the status topic")
        assert {e["lab"] for e in events} == {"e2e"}
    finally:
        for srv in (server, ticks_server):
            if srv:
                srv.stop()
        backend.stop_all()
        emu.stop()
    assert not emu.proc.alive() and not procs.pid_alive(server.proc.pid) and not procs.pid_alive(ticks_server.proc.pid)


def outcomes(home) -> list[dict]:
    return [e for e in FileEvents(home / "status.jsonl").read() if e["event"] == "command-outcome"]


def test_every_command_gets_one_outcome_for_its_sender(local_env):
    """accepted / done / nothing to do from the core, refused (field and rule) from the entry point; ticks none."""
    from functions import main

    def send(payload, mid, request_id="r-1"):
        main.control(CloudEvent(ATTRS, push_envelope(payload, mid, {"request_id": request_id} if request_id else {})))

    send({"type": "start-lab", "lab": "o1", "owner": "alice", "workers": {"max": 4}}, "m-1")
    send({"type": "start-lab", "lab": "o1", "owner": "bob"}, "m-2")
    send({"type": "start-lab", "lab": "o1", "owner": "alice"}, "m-3", request_id="")
    send({"type": "scale", "lab": "o1", "min": 5}, "m-4")
    send({"type": "scale", "lab": "o1", "pin": 2}, "m-5")
    send({"type": "keep-alive", "lab": "o1", "for": 60}, "m-6")
    send({"type": "stop-lab", "lab": "ghost"}, "m-7")
    send({"type": "stop-lab", "lab": "o1"}, "m-8", request_id="has space")
    main.ticks(CloudEvent(ATTRS, push_envelope({"type": "reconcile", "budget_seconds": 0}, "m-9")))
    got = {e["message_id"]: e for e in outcomes(local_env)}
    assert len(outcomes(local_env)) == len(got) == 8  # one each; none for the tick
    assert (got["m-1"]["outcome"], got["m-1"]["command"], got["m-1"]["lab"], got["m-1"]["request_id"]) == (
        "accepted", "start-lab", "o1", "r-1")
    assert (got["m-2"]["outcome"], got["m-2"]["reason"]) == ("refused", "lab o1 exists and belongs to alice")
    assert got["m-3"]["outcome"] == "nothing-to-do" and "request_id" not in got["m-3"]
    assert (got["m-4"]["outcome"], got["m-4"]["field"], got["m-4"]["rule"]) == ("refused", "min",
                                                                                 "min (5) must be ≤ max (4)")
    assert got["m-5"]["outcome"] == "done" and "pinned at 2" in got["m-5"]["reason"]
    assert got["m-6"]["outcome"] == "done" and got["m-6"]["reason"].startswith("kept alive until ")
    assert (got["m-7"]["outcome"], got["m-7"]["reason"]) == ("nothing-to-do", "no lab named ghost")
    assert (got["m-8"]["outcome"], got["m-8"]["field"]) == ("refused", "message.attributes.request_id")
    assert LocalBackend(local_env).fetch_lab("o1").state.phase == "provisioning"  # the bad stop-lab did nothing


@pytest.mark.parametrize("payload, field", [
    ({"type": "start-lab", "lab": "o2", "owner": "eve", "values": {"worker": {"mounts": {
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "volumeMounts": [{"name": "root", "mountPath": "/host"}]}}}}, "values.worker.mounts"),
    ({"type": "start-lab", "lab": "o2", "owner": "eve",
      "values": "jupyter:\n  extraConfig: |\n    c.ServerApp.token = ''\n"}, "values.jupyter.extraConfig"),
    ({"type": "update-lab", "lab": "o2", "values": {"jupyter": {"env": [
        {"name": "NOTEBOOK_ARGS", "value": "--IdentityProvider.token="}]}}}, "values.jupyter.env.0.name"),
    ({"type": "start-class", "class": "c2", "owner": "eve", "roster": ["ann"],
      "values": {"worker": {"securityContext": {"privileged": True}}}}, "values.worker.securityContext"),
    ({"type": "start-lab", "lab": "o2", "owner": "eve",
      "expose": {"source_ranges": ["0.0.0.0/1", "128.0.0.0/1"]}}, "expose.source_ranges"),
])
def test_a_request_leaving_the_lab_box_is_refused_to_its_sender_naming_the_field(local_env, caplog, payload, field):
    from functions import main
    main.control(CloudEvent(ATTRS, push_envelope(payload, "m-1", {"request_id": "r-9"})))  # acknowledged
    [outcome] = outcomes(local_env)
    assert (outcome["outcome"], outcome["field"], outcome["request_id"]) == ("refused", field, "r-9")
    assert outcome["reason"].startswith(f"{field}: ")
    [err] = errors(caplog)
    assert err["field"] == field and err["action"] == "refused"
    assert LocalBackend(local_env).fetch_labs() == []
