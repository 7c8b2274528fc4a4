"""Classes: the pure plans (roster, lead time, budget) as tables; the class reconcile against the in-memory backend
and the local backend with real Dask; the class store on files and on the Firestore emulator; wake-ups."""

import json
import time
from datetime import datetime, timezone

import pytest

from dasklab.adapters import procs
from dasklab.adapters.local import LocalBackend
from dasklab.adapters.files import FileClasses, FileReports
from dasklab.core.classes import ClassRecord, class_cost, class_usage, plan_budget, plan_class, plan_class_lifetime, \
    plan_lead_time, usage_of
from dasklab.core.config import Config
from dasklab.core.errors import ConflictError, PermanentError, TransientError, ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.model import FAILED, READY, TEARING_DOWN, Lab
from dasklab.core.reconcile import Controller
from dasklab.local.timers import FileWakeups, LocalTimer
from tests.conftest import make_spec, make_state
from tests.fakes import FakeBackend, ListEvents

T0 = 1_800_000_000.0


# --- policy tables ---------------------------------------------------------------------------------

def lab(student: str, phase: str = READY, created: float = 0.0, ready: float | None = 30.0) -> Lab:
    return Lab(make_spec(name=f"intro-{student}", class_name="intro", student=student),
               make_state(phase=phase, created_at=created, ready_at=ready if phase == READY else None))


def rec(**kw) -> ClassRecord:
    return ClassRecord(**{"name": "intro", "owner": "prof", "roster": ("a", "b"), "created_at": 0.0,
                          "published": 1.0, **kw})


@pytest.mark.parametrize("record, labs, now, expect", [
    # nothing exists: every student's lab starts
    (rec(), {}, 10, dict(start=("a", "b"), stop=(), ready=False)),
    # one exists, one missing: only the missing one
    (rec(started={"a": 5}), {"a": lab("a")}, 10, dict(start=("b",), ready=False)),
    # all ready, not announced yet: class-ready
    (rec(started={"a": 5, "b": 5}), {"a": lab("a"), "b": lab("b")}, 10, dict(start=(), ready=True)),
    # announced already: nothing again
    (rec(started={"a": 5, "b": 5}, ready_roster=("a", "b")), {"a": lab("a"), "b": lab("b")}, 10,
     dict(start=(), ready=False)),
    # one still provisioning: not ready
    (rec(started={"a": 5, "b": 5}), {"a": lab("a"), "b": lab("b", "provisioning")}, 10, dict(ready=False)),
    # a lab that ended (idle teardown: its figures kept) is not recreated, and the class is ready without it
    (rec(started={"a": 5, "b": 5}, usage={"b": {"cost_usd": 0.1}}), {"a": lab("a")}, 10, dict(start=(), ready=True)),
    # a lab started but not listed (yet, or unreadable this pass) and with no figures kept: still to come
    (rec(started={"a": 5, "b": 5}), {"a": lab("a")}, 10, dict(start=(), ready=False, reason="not listed yet: b")),
    # a student removed: their lab stops, the others stay
    (rec(roster=("a",), started={"a": 5, "b": 5}), {"a": lab("a"), "b": lab("b")}, 10,
     dict(stop=(("b", "removed from the roster of class intro"),), start=())),
    # already tearing down: not stopped again
    (rec(roster=("a",), started={"a": 5}), {"a": lab("a"), "b": lab("b", TEARING_DOWN)}, 10, dict(stop=())),
    # `at` in an hour, lead 600 s: nothing yet ...
    (rec(at=3600.0), {}, 2999, dict(start=(), reason="provisioning starts at")),
    # ... from at − lead on, provisioning
    (rec(at=3600.0), {}, 3000, dict(start=("a", "b"))),
    # stopped (a stop-class newer than the start-class): every lab stops
    (rec(stopped=2.0, started={"a": 5}), {"a": lab("a")}, 10, dict(stop=(("a", "stop-class requested"),),
                                                                  deleted=False)),
    # stopped and every lab gone: class-deleted, once
    (rec(stopped=2.0), {}, 10, dict(deleted=True)),
    (rec(stopped=2.0, deleted_at=9.0), {}, 10, dict(deleted=False)),
    # a stop-class older than the start-class the record stands for: the class runs
    (rec(stopped=0.5), {}, 10, dict(start=("a", "b"))),
    # the duration ends the class: at + duration
    (rec(at=100.0, duration_s=50, started={"a": 5}), {"a": lab("a")}, 150,
     dict(stop=(("a", "the class's duration (50s) ended at 1970-01-01T00:02:30Z"),), ended="the class's")),
    (rec(at=100.0, duration_s=50, started={"a": 5, "b": 5}), {"a": lab("a"), "b": lab("b")}, 149, dict(stop=())),
    # a student refused (a quota): not retried, shown failed with the reason; the class is ready without them
    (rec(started={"a": 5}, refused={"b": "quota CPUS"}), {"a": lab("a")}, 10,
     dict(start=(), ready=True, failed=(("b", "quota CPUS"),), reason="failed: b")),
    # a student whose lab failed: the same
    (rec(started={"a": 5, "b": 5}), {"a": lab("a"), "b": lab("b", FAILED)}, 10,
     dict(start=(), ready=True, failed=(("b", ""),))),
    # a student whose lab's record cannot be read for good: failed with why, not awaited
    (rec(started={"a": 5, "b": 5}), {"a": lab("a")}, 10, dict(start=(), ready=True, failed=(("b", "corrupt"),))),
])
def test_plan_class(record, labs, now, expect):
    plan = plan_class(record, labs, now, lead_s=600,
                      unreadable={"b": "corrupt"} if expect.get("failed") == (("b", "corrupt"),) else None)
    for key, value in expect.items():
        got = getattr(plan, key)
        assert (value in got) if key in ("reason", "ended") else got == value, (key, got, plan.reason)


@pytest.mark.parametrize("samples, lead, why", [
    ((), 900, "default lead time 900s"),
    ((100.0,), 100 * 1.25 + 60, "p90 of 1 observed"),
    (tuple(float(x) for x in range(1, 11)), 9 * 1.25 + 60, "p90 of 10"),  # nearest rank: the 9th of 10
    (tuple([600.0] + [60.0] * 20), 60 * 1.25 + 60, "p90 of 20"),  # only the last 20 count
    (tuple([60.0] * 17 + [700.0, 800.0, 900.0]), 700 * 1.25 + 60, "p90 of 20"),  # slow creations raise it
    (tuple([60.0] * 18 + [700.0, 800.0]), 60 * 1.25 + 60, "p90 of 20"),  # 2 in 20 are past the 90th percentile
])
def test_plan_lead_time(samples, lead, why):
    got, reason = plan_lead_time(samples, 900)
    assert got == pytest.approx(lead) and why in reason


@pytest.mark.parametrize("asked, duration, lead, lifetime, says", [
    (None, None, 0, 8 * 3600, ""),  # no class end: the default lifetime
    (None, 3 * 3600, 900, 8 * 3600, ""),  # a 3 h class fits the default 8 h
    (None, 10 * 3600, 900, 10 * 3600 + 900, ""),  # a 10 h class: its labs live as long as it, early start included
    (None, 12 * 3600, 900, 12 * 3600, "duration: a lab provisioned 900s early reaches the controller cap"),
    (2 * 3600, 3 * 3600, 60, 2 * 3600, "max_lifetime: 7200s ends each lab before the class does"),  # asked: kept
    (4 * 3600, 3 * 3600, 60, 4 * 3600, ""),
])
def test_plan_class_lifetime(asked, duration, lead, lifetime, says):
    got, note = plan_class_lifetime(asked, 8 * 3600, 12 * 3600, duration, lead)
    assert got == lifetime and (note.startswith(says) if says else note == ""), note


@pytest.mark.parametrize("cost, budget, stage, action, new_stage, warned_too", [
    (0.5, None, "", "none", "", False),
    (0.79, 1.0, "", "none", "", False),
    (0.80, 1.0, "", "warn", "warned", False),
    (0.85, 1.0, "warned", "none", "warned", False),  # said once
    (0.90, 1.0, "warned", "minimum", "minimum", False),
    (0.95, 1.0, "", "minimum", "minimum", True),  # a jump past the warning still shrinks first, and still warns
    (0.95, 1.0, "minimum", "none", "minimum", False),
    (1.00, 1.0, "minimum", "teardown", "minimum", False),
    (1.00, 1.0, "warned", "teardown", "warned", False),
    (3.00, 1.0, "", "teardown", "", True),
])
def test_plan_budget(cost, budget, stage, action, new_stage, warned_too):
    decision = plan_budget(cost, budget, stage)
    assert (decision.action, decision.stage) == (action, new_stage), decision.reason
    assert bool(decision.passed_warning) == warned_too, decision.passed_warning
    if budget:
        assert f"${cost:.4f}" in decision.reason
    if warned_too:
        assert "passed 80% since the last pass" in decision.passed_warning


# --- the store -------------------------------------------------------------------------------------

@pytest.fixture(params=["files", "firestore"])
def store(request, tmp_path):
    if request.param == "files":
        return FileClasses(tmp_path)
    tombstones = request.getfixturevalue("firestore_tombstones")
    from dasklab.adapters.firestore import FirestoreClasses
    return FirestoreClasses(tombstones.project)


def test_class_store_is_optimistic_and_keeps_usage(store):
    assert store.fetch_class("intro") is None and store.fetch_classes() == []
    first = store.apply_class(rec(roster=("a", "b"), template={"x": [1, {"y": None}]}))
    assert store.fetch_class("intro") == first and first.version
    with pytest.raises(ConflictError):
        store.apply_class(rec())  # created meanwhile
    store.apply_usage("intro", "a", {"cost_usd": 0.5, "node_hours": 1.0, "created_at": 1.0, "peak_workers": 2})
    with pytest.raises(ConflictError):
        store.apply_class(first)  # the usage write moved the version: a stale record cannot erase it
    store.apply_usage("intro", "a", {"cost_usd": 0.5, "node_hours": 1.0, "created_at": 1.0, "peak_workers": 2})
    current = store.fetch_class("intro")  # the same lab's figures again (a redelivered deletion): not counted twice
    assert (current.usage["a"]["cost_usd"], current.usage["a"]["labs"]) == (0.5, 1)
    assert current.template == first.template
    store.apply_usage("intro", "a", {"cost_usd": 0.25, "node_hours": 0.5, "created_at": 9.0, "peak_workers": 1})
    usage = store.fetch_class("intro").usage["a"]  # removed and added again: a second lab, both counted
    assert (usage["cost_usd"], usage["node_hours"], usage["peak_workers"], usage["labs"]) == (0.75, 1.5, 2, 2)
    current = store.fetch_class("intro")
    store.apply_usage("ghost", "a", {})  # no class: nothing
    assert [r.name for r in store.fetch_classes()] == ["intro"]
    store.apply_forget_class(current)
    assert store.fetch_class("intro") is None


def test_usage_of_many_labs_deleted_at_once_is_all_kept(store):
    """A pass tearing down many labs of a class writes their usage concurrently (tests/test_gke_class_scale.py:
    66 at once): a write the others aborted is a ConflictError (the lab's next pass writes again), never another
    error, and in the end every one is kept."""
    from concurrent.futures import ThreadPoolExecutor
    first = store.apply_class(rec(roster=tuple(f"s{i:02d}" for i in range(40))))

    def write(i: int) -> int:
        for conflicts in range(20):
            try:
                store.apply_usage("intro", f"s{i:02d}", {"cost_usd": float(i), "created_at": 1.0})
                return conflicts
            except ConflictError:
                continue
        raise AssertionError(f"s{i:02d}: never written")

    with ThreadPoolExecutor(40) as pool:
        list(pool.map(write, range(40)))
    current = store.fetch_class("intro")
    assert {s: u["cost_usd"] for s, u in current.usage.items()} == {f"s{i:02d}": float(i) for i in range(40)}
    with pytest.raises(ConflictError):
        store.apply_class(first)  # the usage moved the version: a stale record cannot erase it


# --- the class reconcile (in-memory backend, file store) ---------------------------------------------

class Clock:
    def __init__(self):
        self.t = T0

    def __call__(self):
        return self.t


@pytest.fixture
def ctl(tmp_path):
    clock = Clock()
    c = Controller(FakeBackend(), ListEvents(), Config(poll_s=0, tick_budget_s=0, confirm_s=0, cooldown_s=0),
                   clock=clock, sleep=lambda s: None, classes=FileClasses(tmp_path), wakeups=FileWakeups(tmp_path),
                   reports=FileReports(tmp_path))
    c.t = clock
    return c


def msg(**body):
    return parse_command(json.dumps(body))


def start(roster=("alice", "bob", "carol"), **kw):
    return msg(**{"type": "start-class", "class": "intro", "owner": "prof", "roster": list(roster),
                  "workers": {"initial": 1, "min": 0, "max": 3}, **kw})


def tick(ctl, n=8, step=1.0):
    for _ in range(n):
        ctl.t.t += step
        ctl.handle(msg(type="reconcile"), "tick")


def events(ctl, kind):
    return [e for e in ctl.events.events if e["event"] == kind]


def outcome(ctl):
    return events(ctl, "command-outcome")[-1]


def test_one_message_gives_a_lab_per_student_and_one_class_ready(ctl):
    ctl.handle(start(), "m1", published=T0)
    assert sorted(ctl.backend.labs) == ["intro-alice", "intro-bob", "intro-carol"]
    assert outcome(ctl)["outcome"] == "accepted" and outcome(ctl)["class"] == "intro"
    spec = ctl.backend.fetch_lab("intro-bob").spec
    assert (spec.class_name, spec.student, spec.owner, spec.max_workers) == ("intro", "bob", "prof", 3)
    tick(ctl)
    ready = events(ctl, "class-ready")
    assert len(ready) == 1 and len(events(ctl, "lab-ready")) == 3
    assert [(r["student"], r["lab"], r["phase"]) for r in ready[0]["labs"]] == [
        ("alice", "intro-alice", READY), ("bob", "intro-bob", READY), ("carol", "intro-carol", READY)]
    assert ready[0]["labs"][0]["connection"] == {"dashboard": "fake://intro-alice"}
    assert ctl.classes.fetch_class("intro").lead_samples  # creation times observed, for the lead time


def test_a_duplicate_gives_nothing_new(ctl):
    ctl.handle(start(), "m1", published=T0)
    tick(ctl)
    before = (dict(ctl.backend.labs), len(ctl.events.events))
    ctl.handle(start(), "m1", published=T0)  # redelivered
    ctl.handle(start(), "m2", published=T0 + 5)  # re-sent as it was
    tick(ctl)
    assert ctl.backend.labs.keys() == before[0].keys()
    new = [e for e in ctl.events.events[before[1]:]]
    assert [e["outcome"] for e in new] == ["nothing-to-do", "nothing-to-do"]
    assert "unchanged" in new[0]["reason"]


def test_roster_add_adds_one_lab_and_remove_stops_that_lab_gracefully(ctl):
    ctl.handle(start(), "m1", published=T0)
    tick(ctl)
    ctl.handle(start(roster=("alice", "bob", "carol", "dave")), "m2", published=T0 + 10)
    assert "1 lab(s) added (dave)" in outcome(ctl)["reason"]
    assert sorted(ctl.backend.labs) == ["intro-alice", "intro-bob", "intro-carol", "intro-dave"]
    tick(ctl)
    assert len(events(ctl, "class-ready")) == 2  # the table again, with dave
    ctl.handle(start(roster=("alice", "carol", "dave")), "m3", published=T0 + 20)
    assert "1 lab(s) removed gracefully (bob)" in outcome(ctl)["reason"]
    tick(ctl)
    assert sorted(ctl.backend.labs) == ["intro-alice", "intro-carol", "intro-dave"]
    deleted = events(ctl, "lab-deleted")
    assert [(e["lab"], e["reason"], e["student"]) for e in deleted] == \
        [("intro-bob", "removed from the roster of class intro", "bob")]  # the class's reason, in its report too
    assert len(events(ctl, "class-ready")) == 2  # a removal alone announces nothing
    ctl.handle(start(roster=("alice", "bob", "carol", "dave")), "m4", published=T0 + 30)  # bob back: a new lab
    tick(ctl)
    assert "intro-bob" in ctl.backend.labs and len(events(ctl, "class-ready")) == 3
    record, now = ctl.classes.fetch_class("intro"), ctl.t.t
    first = record.usage["bob"]["cost_usd"]  # his first lab's, kept when it was deleted
    live = usage_of(ctl.backend.fetch_lab("intro-bob"), now)["cost_usd"]
    bob = class_usage(record, {"bob": ctl.backend.fetch_lab("intro-bob")}, now)["bob"]
    assert first > 0 and live > 0 and bob["labs"] == 2 and bob["cost_usd"] == pytest.approx(first + live, abs=1e-4)


def test_an_older_start_class_delivered_late_never_undoes_a_newer_one(ctl):
    ctl.handle(start(roster=("alice", "bob", "carol")), "m2", published=T0 + 10)
    ctl.handle(start(roster=("alice", "bob")), "m1", published=T0 + 5)  # published first, delivered last
    assert outcome(ctl)["outcome"] == "nothing-to-do" and "the newer one stays" in outcome(ctl)["reason"]
    tick(ctl)
    assert sorted(ctl.backend.labs) == ["intro-alice", "intro-bob", "intro-carol"]
    assert ctl.classes.fetch_class("intro").roster == ("alice", "bob", "carol")


def test_stop_class_stops_every_lab_and_an_older_start_class_never_restarts_it(ctl):
    ctl.handle(start(), "m1", published=T0)
    tick(ctl)
    ctl.handle(msg(type="stop-class", **{"class": "intro"}), "m2", published=T0 + 20)
    assert outcome(ctl)["outcome"] == "accepted"
    tick(ctl)
    assert ctl.backend.labs == {}
    [deleted] = events(ctl, "class-deleted")
    assert deleted["students"] == 3 and deleted["estimated_cost_usd"] == pytest.approx(
        sum(e["estimated_cost_usd"] for e in events(ctl, "lab-deleted")), abs=1e-3)
    assert deleted["estimated_cost_usd"] > 0 and set(deleted["per_student"]) == {"alice", "bob", "carol"}
    ctl.handle(start(), "m1", published=T0)  # redelivered after the stop
    tick(ctl)
    assert ctl.backend.labs == {} and "the stop wins" in outcome(ctl)["reason"]
    ctl.handle(start(roster=("alice",)), "m3", published=T0 + 40)  # a new start-class: the class again
    tick(ctl)
    assert list(ctl.backend.labs) == ["intro-alice"]


def test_a_stop_class_older_than_the_start_class_leaves_the_class_alone(ctl):
    ctl.handle(start(), "m2", published=T0 + 10)
    ctl.handle(msg(type="stop-class", **{"class": "intro"}), "m1", published=T0 + 5)
    assert outcome(ctl)["outcome"] == "nothing-to-do"
    tick(ctl)
    assert len(ctl.backend.labs) == 3


def test_a_stop_class_before_its_start_class_is_kept(ctl):
    ctl.handle(msg(type="stop-class", **{"class": "intro"}), "m2", published=T0 + 10)
    ctl.handle(start(), "m1", published=T0 + 5)
    tick(ctl)
    assert ctl.backend.labs == {}


def test_class_keep_alive_protects_every_lab_from_the_nightly_teardown(ctl):
    ctl.handle(start(), "m1", published=T0)
    tick(ctl)
    ctl.handle(msg(type="keep-alive", **{"class": "intro"}, **{"for": "4h"}), "m2")
    assert outcome(ctl)["outcome"] == "done" and "3 lab(s) kept alive" in outcome(ctl)["reason"]
    ctl.handle(msg(type="nightly-teardown"), "n")
    tick(ctl)
    assert len(ctl.backend.labs) == 3
    ctl.handle(start(roster=("alice", "bob", "carol", "dave")), "m3", published=T0 + 30)  # dave too
    assert ctl.backend.fetch_lab("intro-dave").spec.keep_alive_until == pytest.approx(
        ctl.backend.fetch_lab("intro-alice").spec.keep_alive_until)


def test_a_lab_ended_by_idleness_is_not_recreated(ctl):
    ctl.handle(start(idle_timeout="60s"), "m1", published=T0)
    tick(ctl)
    ctl.backend.labs["intro-bob"].load.idle_since = ctl.t.t  # bob's scheduler idle from now
    for name in ("intro-alice", "intro-carol"):
        ctl.backend.labs[name].load.processing = 3  # busy
    tick(ctl, n=4, step=30)
    ctl.handle(msg(type="teardown-idle"), "idle")
    tick(ctl)
    assert sorted(ctl.backend.labs) == ["intro-alice", "intro-carol"]


def test_ready_at_at_provisioning_starts_a_lead_time_before_and_the_duration_ends_it(ctl, tmp_path):
    at = datetime.fromtimestamp(T0 + 3600, timezone.utc)
    ctl.handle(start(at=at.isoformat(), duration="1h"), "m1", published=T0)
    assert ctl.backend.labs == {} and "provisioning starts at" in outcome(ctl)["reason"]
    lead = 60  # the local backend's default, until creation times are observed
    wakeups = {w["key"]: w for w in FileWakeups(tmp_path).fetch_due(T0 + 10**6)}
    assert wakeups["intro-start"]["at"] == T0 + 3600 - lead and wakeups["intro-end"]["at"] == T0 + 7200
    assert wakeups["intro-start"]["message"] == {"v": 1, "type": "reconcile-class", "class": "intro"}
    ctl.t.t = T0 + 3600 - lead - 1
    ctl.handle(msg(type="reconcile-class", **{"class": "intro"}), "w")
    assert ctl.backend.labs == {}
    ctl.t.t = T0 + 3600 - lead
    ctl.handle(msg(type="reconcile-class", **{"class": "intro"}), "w")  # the wake-up
    assert len(ctl.backend.labs) == 3
    tick(ctl, n=5)
    [ready] = events(ctl, "class-ready")
    assert ready["time"] <= T0 + 3600 and ready["ends_at"] == "2027-01-15T10:00:00Z"
    ctl.t.t = T0 + 7200
    tick(ctl)
    assert ctl.backend.labs == {} and events(ctl, "class-deleted")[0]["reason"].startswith("the class's duration")


def test_a_student_budget_warns_then_shrinks_then_tears_down(ctl):
    ctl.handle(start(roster=("alice",), budget={"student": 0.01}), "m1", published=T0)
    ctl.handle(msg(type="scale", lab="intro-alice", pin=3), "pin")
    steps = []
    for _ in range(60):
        tick(ctl, n=1, step=10)
        steps += [e for e in ctl.events.events if e["event"].startswith("budget-") and e not in steps]
        if "intro-alice" not in ctl.backend.labs:
            break
    assert [e["event"] for e in steps] == ["budget-warning", "budget-minimum", "budget-reached"]
    assert [e["lab"] for e in steps] == ["intro-alice"] * 3
    shares = [e["estimated_cost_usd"] / e["budget_usd"] for e in steps]
    assert 0.8 <= shares[0] < 0.9 <= shares[1] < 1.0 <= shares[2] < 1.05
    deleted = events(ctl, "lab-deleted")[0]
    assert deleted["reason"].startswith("estimated cost") and "budget reached" in deleted["reason"]
    assert deleted["estimated_cost_usd"] <= 0.0105


def test_a_class_budget_counts_every_lab(ctl):
    ctl.handle(start(budget={"class": 0.02}), "m1", published=T0)
    for _ in range(80):
        tick(ctl, n=1, step=10)
        if not ctl.backend.labs:
            break
    kinds = [e["event"] for e in ctl.events.events if e["event"].startswith("budget-")]
    assert kinds == ["budget-warning", "budget-minimum", "budget-reached"]
    assert all(e["class"] == "intro" and "lab" not in e for e in ctl.events.events if e["event"].startswith("budget"))
    shrunk = next(i for i, e in enumerate(ctl.events.events) if e["event"] == "budget-minimum")
    assert ctl.backend.labs == {} and events(ctl, "class-deleted")[0]["reason"].startswith("estimated cost")
    assert shrunk < next(i for i, e in enumerate(ctl.events.events) if e["event"] == "lab-deleted")


def test_a_class_budget_passed_between_two_passes_still_warns_first(ctl):
    """The controller was away (a missed tick, a slow pass) while the class went from below 80 % to past 90 %: the
    owner still gets the warning, then the minimum, in that order and in one pass."""
    ctl.handle(start(budget={"class": 0.02}), "m1", published=T0)
    tick(ctl, n=3)
    record, mine = ctl.classes.fetch_class("intro"), {lab.spec.student: lab for lab in ctl.backend.fetch_labs()}
    now = ctl.t.t
    rate = (class_cost(record, mine, now + 100) - class_cost(record, mine, now)) / 100
    assert rate > 0 and class_cost(record, mine, now) < 0.8 * 0.02
    ctl.t.t = now + (0.95 * 0.02 - class_cost(record, mine, now)) / rate  # 95 %, seen first by the next pass
    seen = len(ctl.events.events)
    ctl.handle(msg(type="reconcile"), "tick")
    steps = [e for e in ctl.events.events[seen:] if e["event"].startswith("budget-")]
    assert [e["event"] for e in steps] == ["budget-warning", "budget-minimum"]
    assert "passed 80% since the last pass" in steps[0]["reason"] and steps[0]["class"] == "intro"
    assert 0.9 <= steps[1]["estimated_cost_usd"] / 0.02 < 1.0
    assert ctl.classes.fetch_class("intro").budget_stage == "minimum"
    assert all(lab.spec.max_workers == lab.spec.min_workers for lab in ctl.backend.fetch_labs())


def test_a_lab_the_listing_could_not_read_is_not_taken_for_ended(ctl):
    """A lab whose records were unreadable this pass (its cluster did not answer) is left out of the listing: the
    class step waits instead of deciding from its absence (class-ready, ended, never recreated)."""
    ctl.handle(start(), "m1", published=T0)
    bob = ctl.backend.labs.pop("intro-bob")  # listed no more, as an unreachable cluster's lab
    ctl.backend.unreadable = {("lab", "intro-bob"): TransientError("cluster intro-bob did not answer")}
    tick(ctl)
    assert not events(ctl, "class-ready") and ctl.classes.fetch_class("intro").started.keys() == {
        "alice", "bob", "carol"}
    ctl.backend.labs["intro-bob"], ctl.backend.unreadable = bob, {}  # it answers again
    tick(ctl)
    [ready] = events(ctl, "class-ready")
    assert [r["student"] for r in ready["labs"]] == ["alice", "bob", "carol"]


def test_a_class_longer_than_the_default_lifetime_keeps_its_labs_to_its_end(ctl):
    ctl.handle(start(roster=("alice",), duration="10h"), "m1", published=T0)
    assert ctl.backend.fetch_lab("intro-alice").spec.max_lifetime_s == 10 * 3600
    with pytest.raises(ValidationError) as e:
        ctl.handle(start(duration="13h"), "m2", published=T0 + 1)
    assert e.value.field == "duration" and "above the controller cap max_lifetime=43200s" in e.value.rule
    ctl.handle(start(roster=("alice",), duration="3h", max_lifetime="2h"), "m3", published=T0 + 2)
    assert "max_lifetime: 7200s ends each lab before the class does" in outcome(ctl)["reason"]


def test_refusals_name_the_roster_entry(ctl):
    ctl.handle(msg(type="start-lab", lab="intro-bob", owner="someone"), "x")
    with pytest.raises(ValidationError) as e:
        ctl.handle(start(), "m1", published=T0)
    assert e.value.field == "roster[1]" and "not a lab of class intro" in e.value.rule
    with pytest.raises(ValidationError) as e:
        ctl.handle(start(workers={"max": 99}), "m1", published=T0)  # a start-lab's caps, for every student
    assert e.value.field == "workers.max"
    assert ctl.classes.fetch_class("intro") is None


# --- the local timer delivers wake-ups -----------------------------------------------------------

def test_the_local_timer_delivers_a_due_wakeup_once(tmp_path):
    wakeups, delivered = FileWakeups(tmp_path), []
    wakeups.apply_wakeup("intro-start", time.time() + 0.5, {"v": 1, "type": "reconcile-class", "class": "intro"})
    wakeups.apply_wakeup("later", time.time() + 3600, {"v": 1, "type": "reconcile-class", "class": "later"})
    wakeups.apply_wakeup("gone", time.time(), {"v": 1, "type": "reconcile-class", "class": "gone"})
    wakeups.apply_cancel("gone")
    timer = LocalTimer([], lambda job, s: None, wakeups=wakeups, deliver=delivered.append).start()
    try:
        deadline = time.time() + 5
        while not delivered and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
    finally:
        timer.stop()
    assert delivered == [{"v": 1, "type": "reconcile-class", "class": "intro"}]
    assert [p.stem for p in (tmp_path / "wakeups").glob("*.json")] == ["later"]
    with pytest.raises(ValidationError):
        wakeups.apply_wakeup("bad", 0, {"type": "nope"})


def test_a_handled_local_wakeup_is_dropped_only_once_due(tmp_path):
    wakeups = FileWakeups(tmp_path)
    for key, at in (("intro-start", T0), ("intro-end", T0 + 3600)):
        wakeups.apply_wakeup(key, at, {"v": 1, "type": "reconcile-class", "class": "intro"})
    for key in ("intro-start", "intro-end", "none"):
        wakeups.apply_expire(key, T0)
    assert [w["key"] for w in wakeups.fetch_due(T0 + 10**6)] == ["intro-end"]


# --- against the local backend: real schedulers ---------------------------------------------------

def test_a_class_on_the_local_backend(tmp_path):
    """Two students' labs as real Dask schedulers (no workers, no Jupyter: the machine is small), ready, then one
    removed from the roster: its processes are gone, the other's run on."""
    backend = LocalBackend(tmp_path)
    ctl = Controller(backend, ListEvents(), Config(poll_s=0, tick_budget_s=0), classes=FileClasses(tmp_path))
    body = {"type": "start-class", "class": "loc", "owner": "prof", "roster": ["ann", "ben"],
            "workers": {"initial": 0, "min": 0, "max": 1}, "values": {"jupyter": {"enabled": False}}}
    pids = []
    try:
        ctl.handle(msg(**body), "m1", published=time.time())
        deadline = time.time() + 60
        while not events(ctl, "class-ready") and time.time() < deadline:
            ctl.handle(msg(type="reconcile"), "t")
            time.sleep(0.3)
        [ready] = events(ctl, "class-ready")
        assert {r["student"]: r["connection"]["scheduler"].startswith("tcp://127.0.0.1:") for r in ready["labs"]} == \
            {"ann": True, "ben": True}
        pids = [p for lab in backend.fetch_labs() for p in backend.pids(lab)]
        ben = backend.pids(backend.fetch_lab("loc-ben"))
        ctl.handle(msg(**{**body, "roster": ["ann"]}), "m2", published=time.time())
        while backend.fetch_lab("loc-ben") is not None and time.time() < deadline:
            ctl.handle(msg(type="reconcile"), "t")
            time.sleep(0.3)
        assert backend.fetch_lab("loc-ben") is None and not any(procs.pid_alive(p) for p in ben)
        assert backend.fetch_lab("loc-ann").state.phase == READY
        assert ctl.classes.fetch_class("loc").usage["ben"]["lifetime_s"] > 0
    finally:
        backend.stop_all()
    assert not any(procs.pid_alive(p) for p in pids)


# --- the CLI reads the class from the backend and the store ---------------------------------------

def test_cli_status_report_and_connect_for_a_class(tmp_path, monkeypatch, capsys):
    from dasklab import cli
    monkeypatch.setenv("DASKLAB_HOME", str(tmp_path))
    monkeypatch.delenv("DASKLAB_PROJECT", raising=False)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    roster = tmp_path / "students.txt"
    roster.write_text("# intro, fall\nann\n\nben  # late\n")
    assert cli.read_roster(str(roster)) == ["ann", "ben"]
    # the nightly teardown 12 h away, so the class's end (30 min) is the next teardown at any time of day
    nightly = datetime.fromtimestamp(time.time() + 12 * 3600, timezone.utc).strftime("%H:%M")
    monkeypatch.setenv("DASKLAB_NIGHTLY_AT", nightly)
    ctl = Controller(LocalBackend(tmp_path), ListEvents(), Config(home=str(tmp_path), nightly_at=nightly),
                     classes=FileClasses(tmp_path))
    end = datetime.fromtimestamp(time.time() + 1800, timezone.utc)
    ctl.handle(msg(**{"type": "start-class", "class": "intro", "owner": "prof", "roster": ["ann", "ben"],
                      "at": datetime.now(timezone.utc).isoformat(), "duration": "30m", "budget": {"class": 9}}), "m1")
    assert cli.main(["status", "--class", "intro", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [r["student"] for r in status["labs"]] == ["ann", "ben"]
    assert status["labs"][0]["next_teardown"]["reason"].startswith("class intro ends")
    assert abs(datetime.fromisoformat(status["labs"][0]["next_teardown"]["at"]).timestamp() - end.timestamp()) < 5
    [summary] = status["classes"]
    assert summary["budget_usd"] == 9 and summary["students"] == 2 and summary["estimated_cost_usd"] >= 0
    assert cli.main(["class-report", "--class", "intro", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["student"] for r in report["students"]] == ["ann", "ben"] and "peak_workers" in report["students"][0]
    assert cli.main(["connect", "--class", "intro", "--json"]) == 0
    assert [r["lab"] for r in json.loads(capsys.readouterr().out)] == ["intro-ann", "intro-ben"]
    assert cli.main(["class-report", "--class", "nope"]) == 2


def test_a_refused_student_is_shown_failed_and_the_class_is_ready_without_them(ctl):
    """Issue 20: a student whose start is refused (a quota, a permission) no longer keeps the class waiting for ever:
    class-ready comes once every other lab is ready, with the refused one failed and why, and status and the class
    report say it too; a new start-class tries them again."""
    create = ctl.backend.apply_create

    def refuse_bob(lab):
        if lab.spec.student == "bob":
            raise PermanentError("Insufficient regional quota to satisfy request: resource CPUS")
        return create(lab)

    ctl.backend.apply_create = refuse_bob
    ctl.handle(start(), "m1", published=T0)
    tick(ctl)
    [ready] = events(ctl, "class-ready")
    rows = {r["student"]: r for r in ready["labs"]}
    assert rows["alice"]["phase"] == rows["carol"]["phase"] == READY
    assert rows["bob"]["phase"] == FAILED and "CPUS" in rows["bob"]["reason"]
    record = ctl.classes.fetch_class("intro")
    assert "CPUS" in record.refused["bob"] and "bob" not in record.started
    usage = class_usage(record, {}, ctl.t.t)
    assert usage["bob"]["phase"] == FAILED and "CPUS" in usage["bob"]["reason"]  # the class report's row
    ctl.backend.apply_create = create  # the quota was raised: the same start-class again retries bob
    ctl.handle(start(), "m2", published=T0 + 1)
    tick(ctl)
    assert ctl.backend.fetch_lab("intro-bob") is not None and not ctl.classes.fetch_class("intro").refused


def test_a_student_whose_record_cannot_be_read_is_failed_not_awaited(ctl):
    ctl.handle(start(), "m1", published=T0)
    ctl.backend.labs["intro-bob"].record["spec"]["gpu"] = 1  # a key this version does not know
    tick(ctl)
    [ready] = events(ctl, "class-ready")
    assert {r["student"]: r["phase"] for r in ready["labs"]} == {"alice": READY, "bob": FAILED, "carol": READY}
    [degraded] = events(ctl, "lab-degraded")  # said once, though every pass meets it
    assert degraded["lab"] == "intro-bob" and "unknown key(s) gpu" in degraded["reason"]
