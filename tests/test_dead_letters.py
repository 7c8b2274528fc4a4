"""Nothing dropped in silence: a command Pub/Sub gives up on is read by the next reconcile tick, said (an ERROR line
and a command-failed event with its last error), and a stop among them is still carried out. Core properties
against a list of letters, then the whole path on the Pub/Sub emulator, whose dead-letter policy forwards a message
after its delivery attempts as the service does (measured: test_the_emulator_forwards_with_the_attributes_pubsub_adds)."""

import base64
import json
import threading
import time

import pytest
from google.api_core.exceptions import DeadlineExceeded

from dasklab import entry
from dasklab.adapters import procs, pubsub
from dasklab.adapters.files import FileReports
from dasklab.core.config import Config
from dasklab.core.dead_letters import ATTEMPTS, SOURCE, SOURCE_PUBLISHED, DeadLetter, failure_key, plan_dead_letter
from dasklab.core.errors import TransientError
from dasklab.core.messages import parse_command
from dasklab.core.model import READY, TEARING_DOWN
from dasklab.core.reconcile import Controller
from dasklab.replies import PubSubReplies, is_reply
from tests.fakes import FakeBackend, ListEvents

CONFIG = Config(poll_s=0, confirm_s=2, cooldown_s=1, tick_budget_s=0)
RECONCILE = parse_command({"v": 1, "type": "reconcile", "budget_seconds": 0})
PUBLISHED = "2026-12-01T10:00:00.250Z"


def body(**kw) -> bytes:
    return json.dumps({"v": 1, **kw}).encode()


def letter(data: bytes, mid: str = "d1", **attributes) -> DeadLetter:
    forwarded = {ATTEMPTS: "10", SOURCE: "eventarc-us-central1-dasklab-control-1-sub-2", SOURCE_PUBLISHED: PUBLISHED}
    return DeadLetter(data, {**forwarded, **attributes}, mid, handle=mid)


class ListDeadLetters:
    """The dead-letter subscription as a list: what is not acknowledged is read again."""

    def __init__(self, *letters: DeadLetter):
        self.waiting, self.acked, self.handed_back = list(letters), [], []

    def fetch_dead_letters(self):
        return list(self.waiting)

    def apply_handled(self, letter):
        self.waiting.remove(letter)
        self.acked.append(letter.message_id)

    def apply_retry(self, letter):
        self.handed_back.append(letter.message_id)


def world(tmp_path, *letters, events=None):
    backend = FakeBackend()
    clock = Clock()
    ctl = Controller(backend, events or ListEvents(), CONFIG, clock=clock, sleep=lambda s: None,
                     reports=FileReports(tmp_path), dead_letters=ListDeadLetters(*letters))
    return ctl, backend, clock


class Clock:
    def __init__(self, t=1_796_000_000.0):  # before PUBLISHED: the letters' stops are newer than the labs' starts
        self.t = t

    def __call__(self):
        return self.t


def ready_lab(ctl, clock, name="intro"):
    ctl.handle(parse_command({"v": 1, "type": "start-lab", "lab": name, "owner": "alice"}), f"start-{name}",
               published=clock.t - 60)
    for _ in range(20):
        clock.t += 1
        ctl.reconcile_all("reconcile")
    assert ctl.backend.fetch_lab(name).state.phase == READY


# --- pure: reading a dead letter ------------------------------------------------------------------------------

def test_a_dead_letter_is_read_with_what_pubsub_added():
    plan = plan_dead_letter(letter(body(type="stop-lab", lab="intro"), request_id="req-1", sender="bob@example.com"))
    assert (plan.type, plan.lab, plan.request_id, plan.sender, plan.attempts) == (
        "stop-lab", "intro", "req-1", "bob@example.com", 10)
    assert plan.source == "eventarc-us-central1-dasklab-control-1-sub-2" and plan.carry_out and not plan.problem
    assert plan.published == 1_796_119_200.25  # the original publishTime, not the forwarding's
    update = plan_dead_letter(letter(body(type="update-lab", lab="intro", values={})))
    assert (update.type, update.lab, update.carry_out) == ("update-lab", "intro", False)
    assert plan_dead_letter(letter(body(type="stop-class", **{"class": "intro"}))).carry_out


@pytest.mark.parametrize("data, attributes, want", [
    (b"{not json", {}, (None, None, "unreadable command: data:")),
    (body(type="stop-lab", lab="Bad Name!"), {}, ("stop-lab", "Bad Name!", "unreadable command: lab")),
    (body(type="stop-lab", lab="intro"), {ATTEMPTS: "many", "request_id": "no spaces allowed"}, ("stop-lab", "intro", "")),
])
def test_a_malformed_dead_letter_is_read_as_far_as_it_can_be(data, attributes, want):
    plan = plan_dead_letter(DeadLetter(data, attributes, "d"))
    assert (plan.type, plan.lab) == want[:2] and plan.problem.startswith(want[2]) and bool(plan.problem) == bool(want[2])
    assert plan.attempts is None and plan.published is None


def test_the_failure_key_is_the_same_on_both_sides_of_the_dead_letter_topic():
    original = {"request_id": "r1", "sender": "bob@example.com"}
    forwarded = {**original, ATTEMPTS: "10", SOURCE: "s", SOURCE_PUBLISHED: PUBLISHED,
                 "CloudPubSubDeadLetterSourceSubscriptionProject": "p"}
    data = body(type="stop-lab", lab="intro")
    assert failure_key(data, original) == failure_key(data, forwarded)
    assert failure_key(data, original) != failure_key(data, {**original, "request_id": "r2"})
    assert failure_key(data, original) != failure_key(body(type="stop-lab", lab="other"), original)


# --- where the last error is kept: the entry point writes it, the pass reads it ----------------------------------

@pytest.mark.parametrize("kind", ["files", "firestore"])
def test_the_last_error_is_kept_across_instances_until_it_expires(kind, tmp_path, request):
    from dasklab.adapters.firestore import FirestoreReports
    from dasklab.core.dead_letters import LAST_ERROR_TTL_S
    if kind == "files":
        one, other = FileReports(tmp_path), FileReports(tmp_path)
    else:
        project = request.getfixturevalue("firestore_tombstones").project
        one, other = FirestoreReports(project), FirestoreReports(project)  # two function instances
    t0 = 1_796_000_000.0
    assert one.fetch_last_error("failure-1", t0) is None
    one.apply_last_error("failure-1", {"error": "TransientError: first", "message_id": "m1"}, t0)
    one.apply_last_error("failure-1", {"error": "TransientError: second", "message_id": "m1"}, t0 + 10)
    assert other.fetch_last_error("failure-1", t0 + 60) == {"error": "TransientError: second", "message_id": "m1",
                                                              "at": t0 + 10}
    assert other.fetch_last_error("failure-1", t0 + 10 + LAST_ERROR_TTL_S) is None


def test_the_entry_point_keeps_a_failures_last_error_and_still_fails(tmp_path, monkeypatch):
    """A transient or unforeseen error is raised (Pub/Sub redelivers); its text is kept under the message's key first.
    A store that fails as well hides nothing: the original error is what propagates."""
    ctl, backend, clock = world(tmp_path)
    monkeypatch.setattr(entry, "controller", lambda: ctl)
    data, attrs = body(type="stop-lab", lab="intro"), {"request_id": "req-1"}
    envelope = {"message": {"data": base64.b64encode(data).decode(), "attributes": attrs, "messageId": "m1"}}
    backend.fetch_lab = lambda name: (_ for _ in ()).throw(TransientError("records store unavailable"))
    with pytest.raises(TransientError, match="records store unavailable"):
        entry.handle_event(envelope, topic="control")
    kept = ctl.reports.fetch_last_error(failure_key(data, attrs), clock.t)
    assert (kept["error"], kept["message_id"]) == ("TransientError: records store unavailable", "m1")
    backend.fetch_lab = lambda name: (_ for _ in ()).throw(KeyError("a bug"))
    ctl.reports.apply_last_error = lambda *a: (_ for _ in ()).throw(TransientError("reports store down too"))
    with pytest.raises(KeyError, match="a bug"):
        entry.handle_event(envelope, topic="control")


# --- the pass, against a list of letters ------------------------------------------------------------------------

def test_a_dead_lettered_stop_lab_is_carried_out_and_said(tmp_path):
    ctl, backend, clock = world(tmp_path)
    ready_lab(ctl, clock)
    data, attrs = body(type="stop-lab", lab="intro"), {"request_id": "req-1"}
    ctl.reports.apply_last_error(failure_key(data, attrs), {"error": "TransientError: store busy",
                                                           "message_id": "m-orig"}, clock.t)
    ctl.dead_letters.waiting.append(letter(data, "d1", **attrs))
    ctl.handle(RECONCILE, "tick-1")
    assert ctl.dead_letters.acked == ["d1"] and ctl.dead_letters.waiting == []
    [failed] = [e for e in ctl.events.events if e["event"] == "command-failed"]
    assert (failed["command"], failed["lab"], failed["error"], failed["attempts"]) == (
        "stop-lab", "intro", "TransientError: store busy", 10)
    assert (failed["message_id"], failed["request_id"], failed["dead_letter_id"]) == ("m-orig", "req-1", "d1")
    assert "the stop is carried out all the same: teardown started" in failed["reason"]
    assert is_reply(failed, "req-1", None)
    assert backend.fetch_lab("intro").state.phase == TEARING_DOWN  # recorded; the passes take the steps
    assert "carried out from the dead letters" in backend.fetch_lab("intro").state.reason
    for _ in range(10):
        clock.t += 1
        ctl.handle(RECONCILE, "tick-n")
    assert backend.fetch_lab("intro") is None
    assert [e["event"] for e in ctl.events.events if e["event"] in ("lab-deleted", "command-failed")] == [
        "command-failed", "lab-deleted"]


def test_direct_push_keeps_what_it_gave_up_on_for_the_next_tick(tmp_path):
    """The local lab without the emulator: the pusher's last failed attempt leaves a dead letter in files, with the
    attributes Pub/Sub would add; the next tick carries the stop out and removes it."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dasklab.adapters.files import FileDeadLetters
    from dasklab.local.serve import _push, push_envelope
    hits = []

    class Failing(BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        envelope = push_envelope({"v": 1, "type": "stop-lab", "lab": "intro"}, "m1", {"request_id": "req-1"})
        _push(f"http://127.0.0.1:{server.server_address[1]}/", envelope, attempts=3, home=tmp_path, backoff=0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert len(hits) == 3
    store = FileDeadLetters(tmp_path)
    [kept] = store.fetch_dead_letters()
    assert (kept.message_id, kept.attributes["request_id"], kept.attributes[ATTEMPTS], kept.attributes[SOURCE]) == (
        "m1", "req-1", "3", "direct-push")
    assert plan_dead_letter(kept).published is not None
    ctl, backend, clock = world(tmp_path)
    ctl.dead_letters = store
    ready_lab(ctl, clock)
    ctl.handle(RECONCILE, "tick-1")
    assert backend.fetch_lab("intro").state.phase == TEARING_DOWN and store.fetch_dead_letters() == []
    [failed] = [e for e in ctl.events.events if e["event"] == "command-failed"]
    assert (failed["lab"], failed["request_id"], failed["attempts"]) == ("intro", "req-1", 3)


def test_a_dead_lettered_stop_class_stops_the_class(tmp_path):
    """A stop-class is a stop too: carried out from the dead letters (the class marked stopped, its labs torn down)."""
    from dasklab.adapters.files import FileClasses
    ctl, backend, clock = world(tmp_path)
    ctl.classes = FileClasses(tmp_path)
    ctl.handle(parse_command({"v": 1, "type": "start-class", "class": "intro", "owner": "prof",
                              "roster": ["ann", "ben"], "workers": {"initial": 0, "min": 0, "max": 1}}),
               "m-start", published=clock.t - 60)
    for _ in range(20):
        clock.t += 1
        ctl.handle(RECONCILE, "tick")
    assert {lab.state.phase for lab in backend.fetch_labs()} == {READY}
    ctl.dead_letters.waiting.append(letter(body(type="stop-class", **{"class": "intro"}), "d1"))
    for _ in range(20):
        clock.t += 1
        ctl.handle(RECONCILE, "tick")
    assert backend.fetch_labs() == [] and ctl.classes.fetch_class("intro").is_stopped
    [failed] = [e for e in ctl.events.events if e["event"] == "command-failed"]
    assert (failed["command"], failed["class"]) == ("stop-class", "intro")
    assert "the stop is carried out all the same: class intro: teardown of 2 lab(s) started" in failed["reason"]


def test_a_dead_lettered_stop_lab_older_than_the_labs_start_leaves_it(tmp_path):
    """Ordered by the original publishTime (CloudPubSubDeadLetterSourceTopicPublishTime), like any stop-lab."""
    ctl, backend, clock = world(tmp_path)
    clock.t = 1_797_000_000.0  # the lab is started after the stop was first sent
    ready_lab(ctl, clock)
    ctl.dead_letters.waiting.append(letter(body(type="stop-lab", lab="intro"), "d1"))
    ctl.handle(RECONCILE, "tick-1")
    assert backend.fetch_lab("intro").state.phase == READY and ctl.dead_letters.acked == ["d1"]
    [failed] = [e for e in ctl.events.events if e["event"] == "command-failed"]
    assert "the stop changes nothing: stop-lab published at 2026-12-01T10:00:00.250Z, before" in failed["reason"]


def test_a_letter_is_acknowledged_only_once_handled(tmp_path):
    """At least once: a failure while saying it leaves it waiting; read again, it is handled, then acknowledged."""
    class Flaky(ListEvents):
        down = True

        def publish(self, event):
            if event["event"] == "command-failed" and self.down:
                raise TransientError("status topic unavailable")
            super().publish(event)

    ctl, backend, clock = world(tmp_path, letter(body(type="stop-lab", lab="intro"), "d1"), events=Flaky())
    ready_lab(ctl, clock)
    ctl.handle(RECONCILE, "tick-1")
    assert ctl.dead_letters.acked == [] and len(ctl.dead_letters.waiting) == 1
    assert backend.fetch_lab("intro").state.phase == TEARING_DOWN  # decided already: doing it again is harmless
    ctl.events.down = False
    clock.t += 1
    ctl.handle(RECONCILE, "tick-2")
    assert ctl.dead_letters.acked == ["d1"]
    [failed] = [e for e in ctl.events.events if e["event"] == "command-failed"]
    assert failed["error"] == "unknown: no error was kept for this message"


def test_a_poisoned_letter_does_not_stop_the_others(tmp_path):
    ctl, backend, clock = world(tmp_path)
    for name in ("a", "b"):
        ready_lab(ctl, clock, name)
    fetch = backend.fetch_lab
    backend.fetch_lab = lambda name: (_ for _ in ()).throw(RuntimeError("bug")) if name == "a" else fetch(name)
    ctl.dead_letters.waiting += [letter(b"\x00garbage", "d0"), letter(body(type="stop-lab", lab="a"), "d1"),
                                 letter(body(type="stop-lab", lab="b"), "d2")]
    ctl.handle(RECONCILE, "tick-1")
    assert ctl.dead_letters.acked == ["d0", "d2"] and [m.message_id for m in ctl.dead_letters.waiting] == ["d1"]
    assert ctl.dead_letters.handed_back == ["d1"]  # for the next tick
    assert fetch("b").state.phase == TEARING_DOWN and fetch("a").state.phase == READY
    said = {e["dead_letter_id"]: e for e in ctl.events.events if e["event"] == "command-failed"}
    assert sorted(said) == ["d0", "d2"] and said["d0"]["error"].startswith("unreadable command")


def test_a_dead_lettered_stop_lab_is_checked_against_the_trust_rules_again(tmp_path):
    ctl, backend, clock = world(tmp_path)
    ready_lab(ctl, clock)  # alice's
    ctl.dead_letters.waiting.append(letter(body(type="stop-lab", lab="intro"), "d1", sender="mallory@example.com"))
    ctl.handle(RECONCILE, "tick-1")
    assert backend.fetch_lab("intro").state.phase == READY and ctl.dead_letters.acked == ["d1"]
    [failed] = [e for e in ctl.events.events if e["event"] == "command-failed"]
    assert "the stop is not carried out: " in failed["reason"] and "owner" in failed["reason"]


# --- the whole path on the Pub/Sub emulator, with a dead-letter policy ------------------------------------------

needs_emulator = pytest.mark.emulator  # runs, and fails, without the emulator: .ci/run installs it
_projects = iter(range(1, 1000))


@pytest.fixture(scope="module")
def emulator_host(tmp_path_factory):
    emu = procs.start_pubsub_emulator(tmp_path_factory.mktemp("pubsub-dead-letters"))
    yield emu.host
    emu.stop()
    assert not emu.proc.alive()


class Cloud:
    """A project on the emulator laid out as `dasklab infra apply` and the deployed trigger lay it out: the control
    topic's trigger subscription with the dead-letter policy (10 attempts), the dead-letter topic and its pull
    subscription, the status topic (watched); the controller as the functions run it."""

    def __init__(self, tmp_path, monkeypatch, emulator_host):
        from dasklab.cloud.infra import DEAD_LETTER_ATTEMPTS
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator_host)
        pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()
        self.project = p = f"dl-p{next(_projects)}"
        for topic in ("dasklab-control", "dasklab-status", "dasklab-dead-letter"):
            pubsub.ensure_topic(p, topic)
        pubsub.subscriber().create_subscription(request={
            "name": self.path("trigger"), "topic": pubsub.topic_path(p, "dasklab-control"),
            "dead_letter_policy": {"dead_letter_topic": pubsub.topic_path(p, "dasklab-dead-letter"),
                                   "max_delivery_attempts": DEAD_LETTER_ATTEMPTS}})
        pubsub.ensure_subscription(p, "dasklab-dead-letter", "dasklab-dead-letter-sub")
        pubsub.ensure_subscription(p, "dasklab-status", "watch")
        self.backend, self.clock = FakeBackend(), Clock(time.time())
        self.ctl = Controller(self.backend, pubsub.PubSubEvents(p, "dasklab-status"),
                              Config(backend="gke", project=p, poll_s=0, confirm_s=2, cooldown_s=1, tick_budget_s=0),
                              clock=self.clock, sleep=lambda s: None, reports=FileReports(tmp_path / "reports"),
                              dead_letters=pubsub.PubSubDeadLetters(p, Config.dead_letter_subscription, timeout=1))
        monkeypatch.setattr(entry, "controller", lambda: self.ctl)
        self.attempts: dict[str, list[int]] = {}

    def path(self, subscription: str) -> str:
        return pubsub.subscriber().subscription_path(self.project, subscription)

    def send(self, payload: dict | bytes, **attributes) -> str:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return pubsub.publisher().publish(pubsub.topic_path(self.project, "dasklab-control"), data,
                                          **attributes).result(timeout=10)

    def deliver(self, until_dead: set[str], function=None, timeout: float = 60.0) -> None:
        """What the trigger does: each message to the function (the real entry point unless `function`); an
        exception is a failed delivery (a nack), until the messages in `until_dead` have had their 10 attempts."""
        function = function or (lambda m: entry.handle_event({"message": {
            "data": base64.b64encode(m.message.data).decode(), "attributes": dict(m.message.attributes),
            "messageId": m.message.message_id, "publishTime": m.message.publish_time.isoformat().replace(
                "+00:00", "Z")}}, topic="control"))
        deadline = time.monotonic() + timeout
        last = False  # one pull more after the 10th attempts: the emulator forwards when it would deliver again
        while not last:
            last = all(len(self.attempts.get(mid, [])) >= 10 for mid in until_dead)
            assert time.monotonic() < deadline, f"not dead-lettered: {self.attempts}"
            try:
                received = pubsub.subscriber().pull(subscription=self.path("trigger"), max_messages=10,
                                                    timeout=2).received_messages
            except DeadlineExceeded:
                received = []
            for m in received:
                self.attempts.setdefault(m.message.message_id, []).append(m.delivery_attempt)
                try:
                    function(m)
                except Exception:  # noqa: BLE001 -- a failed invocation: the trigger nacks, Pub/Sub redelivers
                    pubsub.subscriber().modify_ack_deadline(subscription=self.path("trigger"), ack_ids=[m.ack_id],
                                                            ack_deadline_seconds=0)
                else:
                    pubsub.subscriber().acknowledge(subscription=self.path("trigger"), ack_ids=[m.ack_id])

    def tick(self, until, ticks: int = 15) -> list[dict]:
        """Reconcile ticks (a second apart on the controller's clock) until `until(events so far)`; the events."""
        events = []
        for _ in range(ticks):
            self.clock.t += 1
            self.ctl.handle(RECONCILE, f"tick-{self.clock.t}")
            events += pubsub.pull(self.project, "watch", timeout=2)
            if until(events):
                return events
        raise AssertionError(f"not reached in {ticks} ticks: {events}")


@pytest.fixture
def cloud(tmp_path, monkeypatch, emulator_host):
    yield Cloud(tmp_path, monkeypatch, emulator_host)
    pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()


def _empty(cloud) -> bool:
    try:
        return not pubsub.subscriber().pull(subscription=cloud.path("dasklab-dead-letter-sub"), max_messages=10,
                                            timeout=3).received_messages
    except DeadlineExceeded:
        return True


@needs_emulator
@pytest.mark.filterwarnings("ignore:The return_immediately flag:DeprecationWarning")
def test_the_emulator_forwards_with_the_attributes_pubsub_adds(cloud):
    """What the code relies on, measured: after 10 nacks the message is on the dead-letter subscription, under a new
    message id, its data and attributes kept, with the CloudPubSubDeadLetter* attributes added."""
    mid = cloud.send({"v": 1, "type": "stop-lab", "lab": "intro"}, request_id="req-1")
    cloud.deliver({mid}, function=lambda m: (_ for _ in ()).throw(RuntimeError("function cannot start")))
    assert cloud.attempts[mid] == list(range(1, 11))
    [letter_] = cloud.ctl.dead_letters.fetch_dead_letters()
    assert letter_.message_id != mid and json.loads(letter_.data) == {"v": 1, "type": "stop-lab", "lab": "intro"}
    assert {k: v for k, v in letter_.attributes.items() if k != SOURCE_PUBLISHED} == {
        "request_id": "req-1", ATTEMPTS: "10", SOURCE: "trigger",
        "CloudPubSubDeadLetterSourceSubscriptionProject": cloud.project}
    assert plan_dead_letter(letter_).published is not None


@needs_emulator
def test_a_dead_lettered_stop_lab_stops_its_lab_and_says_so(cloud):
    """The records store is down while the stop-lab is delivered 10 times: each attempt fails (its error kept), the
    message goes to the dead letters. The store back, the next reconcile tick reads it, reports command-failed with
    the last error, and stops the lab all the same (lab-deleted); the letter is acknowledged."""
    ready_lab(cloud.ctl, cloud.clock)
    pubsub.pull(cloud.project, "watch", timeout=2)  # the start's events
    record = cloud.backend.apply_record
    cloud.backend.apply_record = lambda lab: (_ for _ in ()).throw(TransientError("records store unavailable"))
    mid = cloud.send({"v": 1, "type": "stop-lab", "lab": "intro"}, request_id="req-stop")
    cloud.deliver({mid})
    cloud.backend.apply_record = record
    events = cloud.tick(lambda events: any(e["event"] == "lab-deleted" for e in events)
                        and cloud.backend.fetch_lab("intro") is None)
    [failed] = [e for e in events if e["event"] == "command-failed"]
    assert (failed["command"], failed["lab"], failed["attempts"], failed["request_id"], failed["message_id"]) == (
        "stop-lab", "intro", 10, "req-stop", mid)
    assert failed["error"] == "TransientError: records store unavailable"
    assert "the stop is carried out all the same" in failed["reason"]
    assert [e["event"] for e in events if e["event"] in ("command-failed", "lab-deleted")] == [
        "command-failed", "lab-deleted"]
    assert _empty(cloud)  # acknowledged once handled


@needs_emulator
def test_a_dead_lettered_update_lab_tells_the_waiting_sender_and_changes_nothing(cloud):
    from dasklab.cli import print_outcome
    ready_lab(cloud.ctl, cloud.clock)
    pubsub.pull(cloud.project, "watch", timeout=2)
    before = cloud.backend.fetch_lab("intro")
    cloud.backend.apply_environment = lambda spec: (_ for _ in ()).throw(TransientError("pip index unreachable"))
    with PubSubReplies(cloud.project, "dasklab-status", "req-up") as replies:  # the CLI, still waiting
        mid = cloud.send({"v": 1, "type": "update-lab", "lab": "intro",
                          "values": {"scheduler": {"serviceType": "ClusterIP"}}}, request_id="req-up")
        cloud.deliver({mid})
        ticks = threading.Thread(target=cloud.tick, args=(lambda events: bool(events), 3), daemon=True)
        ticks.start()
        outcome = replies.wait(mid, timeout=30)
        ticks.join(timeout=30)
    assert outcome["event"] == "command-failed" and outcome["lab"] == "intro" and outcome["command"] == "update-lab"
    assert outcome["error"] == "TransientError: pip index unreachable"
    assert print_outcome(outcome, mid, 30) == 1
    after = cloud.backend.fetch_lab("intro")
    assert (after.spec, after.state.phase) == (before.spec, READY)
    assert _empty(cloud)


@needs_emulator
def test_one_poisoned_dead_letter_does_not_stop_the_others(cloud):
    """A deploy that cannot start fails every message: all three are dead-lettered with no error kept. One cannot be
    read, one's handling hits a bug, the third is a stop-lab: it is carried out, the unreadable one reported; the
    bug's letter stays (unacknowledged: read again by a later tick) and the others are acknowledged."""
    for name in ("a", "b"):
        ready_lab(cloud.ctl, cloud.clock, name)
    pubsub.pull(cloud.project, "watch", timeout=2)
    fetch = cloud.backend.fetch_lab
    cloud.backend.fetch_lab = lambda name: (_ for _ in ()).throw(RuntimeError("bug")) if name == "a" else fetch(name)
    mids = {cloud.send(b"\x00 not a command"), cloud.send({"v": 1, "type": "stop-lab", "lab": "a"}),
            cloud.send({"v": 1, "type": "stop-lab", "lab": "b"})}
    cloud.deliver(mids, function=lambda m: (_ for _ in ()).throw(RuntimeError("function cannot start")))
    events = cloud.tick(lambda events: sum(e["event"] == "command-failed" for e in events) == 2
                        and any(e["event"] == "lab-deleted" for e in events))
    failed = {e.get("lab"): e for e in events if e["event"] == "command-failed"}
    assert sorted(failed, key=str) == [None, "b"]
    assert failed[None]["error"].startswith("unreadable command") and failed["b"]["command"] == "stop-lab"
    assert failed["b"]["error"] == "unknown: no error was kept for this message"
    assert [e["lab"] for e in events if e["event"] == "lab-deleted"] == ["b"] and fetch("a").state.phase == READY
    cloud.backend.fetch_lab = fetch  # the bug fixed: the letter kept is handled by the next tick
    events = cloud.tick(lambda events: any(e["event"] == "lab-deleted" for e in events))
    assert [e["lab"] for e in events if e["event"] == "command-failed"] == ["a"]
    assert _empty(cloud)
