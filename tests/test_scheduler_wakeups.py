"""A class's `at` on GKE: one-off Cloud Scheduler jobs (adapters/scheduler.py) against the Cloud Scheduler stand-in,
driven by the real CloudSchedulerClient; then through the class reconcile, the stand-in firing the jobs by the clock
and its Pub/Sub deliveries handled by the controller."""

import json
from datetime import datetime, timezone

import grpc
import pytest
from google.cloud import scheduler_v1 as sched

from dasklab.adapters.files import FileClasses
from dasklab.adapters.scheduler import SchedulerWakeups, build_fire_time, build_schedule
from dasklab.core.config import Config
from dasklab.core.errors import PermanentError, RateLimited, TransientError, ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.reconcile import Controller
from dasklab.runtime import build_wakeups
from tests.fakes import FakeBackend, ListEvents
from tests.standins.cloud_scheduler import CloudSchedulerStandin

PROJECT, REGION = "lab-proj", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
TOPIC = f"projects/{PROJECT}/topics/dasklab-ticks"
T0 = datetime(2026, 12, 7, 8, 0, 10, tzinfo=timezone.utc).timestamp()
WAKE = {"v": 1, "type": "reconcile-class", "class": "intro"}


class Clock:
    def __init__(self):
        self.t = T0

    def __call__(self) -> float:
        return self.t

    def dt(self) -> datetime:
        return datetime.fromtimestamp(self.t, timezone.utc)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def delivered():
    return []


@pytest.fixture
def standin(clock, delivered):
    with CloudSchedulerStandin(lambda topic, data, attrs: delivered.append((topic, data, attrs)),
                               clock=clock.dt) as s:
        yield s


@pytest.fixture
def wakeups(standin, clock):
    return SchedulerWakeups(PROJECT, REGION, "dasklab-ticks", client_factory=standin.client, clock=clock)


def job(standin, key) -> sched.Job | None:
    return standin.jobs.get(f"{PARENT}/jobs/dasklab-wakeup-{key}")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


# --- the adapter --------------------------------------------------------------------------------------------------

def test_a_wakeup_is_a_one_off_cron_job_publishing_the_message_on_the_timers_topic(wakeups, standin):
    wakeups.apply_wakeup("intro-start", T0 + 3600 - 900 + 20, WAKE)  # 08:45:30 → fires at 08:46, never early
    j = job(standin, "intro-start")
    assert (j.schedule, j.time_zone, j.state) == ("46 8 7 12 *", "Etc/UTC", sched.Job.State.ENABLED)
    assert j.schedule_time == utc(2026, 12, 7, 8, 46)
    assert j.pubsub_target.topic_name == TOPIC
    assert json.loads(j.pubsub_target.data) == WAKE and parse_command(j.pubsub_target.data).class_ == "intro"
    assert dict(j.pubsub_target.attributes) == {"dasklab-tick": "reconcile-class",
                                                "dasklab-wakeup-at": "2026-12-07T08:46Z"}
    assert "one-off" in j.description and "2026-12-07T08:46Z" in j.description


def test_resending_moves_the_job_and_is_idempotent(wakeups, standin):
    wakeups.apply_wakeup("intro-end", T0 + 7200, WAKE)
    created = job(standin, "intro-end")
    wakeups.apply_wakeup("intro-end", T0 + 7200, WAKE)  # at least once: the same wake-up again
    assert job(standin, "intro-end").schedule == created.schedule == "1 10 7 12 *"
    wakeups.apply_wakeup("intro-end", T0 + 86400 * 30, WAKE)  # moved to 6 January
    moved = job(standin, "intro-end")
    assert (moved.schedule, moved.schedule_time) == ("1 8 6 1 *", utc(2027, 1, 6, 8, 1))
    assert moved.pubsub_target.attributes["dasklab-wakeup-at"] == "2027-01-06T08:01Z"
    assert list(standin.jobs) == [f"{PARENT}/jobs/dasklab-wakeup-intro-end"]
    assert standin.calls.count("UpdateJob") == 2


def test_cancel_deletes_the_job_and_a_missing_one_is_fine(wakeups, standin):
    wakeups.apply_wakeup("intro-start", T0 + 3600, WAKE)
    wakeups.apply_cancel("intro-start")
    wakeups.apply_cancel("intro-start")
    assert standin.jobs == {}


def test_a_fired_job_is_deleted_once_its_minute_has_passed(wakeups, standin, clock, delivered):
    wakeups.apply_wakeup("intro-start", T0 + 600, WAKE)  # 08:10:10 → 08:11
    wakeups.apply_expire("intro-start", clock())
    wakeups.apply_expire("nothing-there", clock())  # no job: nothing
    assert job(standin, "intro-start") is not None  # not due yet: kept
    clock.t = utc(2026, 12, 7, 8, 11, 2).timestamp()
    assert standin.fire_due() == [f"{PARENT}/jobs/dasklab-wakeup-intro-start"]
    assert delivered == [(TOPIC, json.dumps(WAKE, separators=(",", ":")).encode(),
                          {"dasklab-tick": "reconcile-class", "dasklab-wakeup-at": "2026-12-07T08:11Z"})]
    assert job(standin, "intro-start").schedule_time == utc(2027, 12, 7, 8, 11)  # it would fire every year
    wakeups.apply_expire("intro-start", clock())
    assert standin.jobs == {}


def test_a_past_or_imminent_time_fires_within_the_next_minute(clock):
    assert build_fire_time(T0 - 3600, T0) == utc(2026, 12, 7, 8, 1)  # now 08:00:10: at least 30 s ahead
    assert build_fire_time(T0 + 40, T0) == utc(2026, 12, 7, 8, 1)
    assert build_fire_time(T0 + 50, T0) == utc(2026, 12, 7, 8, 1)
    assert build_fire_time(T0 + 51, T0) == utc(2026, 12, 7, 8, 2)
    assert build_schedule(utc(2028, 2, 29, 23, 59)) == "59 23 29 2 *"  # leap day: the cron is still valid


def test_keys_that_make_no_job_id_are_refused(wakeups, standin):
    for key in ("intro.start", "x" * 486):
        with pytest.raises(ValidationError):
            wakeups.apply_wakeup(key, T0 + 600, WAKE)
    wakeups.apply_wakeup("x" * 485, T0 + 600, WAKE)  # 500 characters with the prefix: the limit
    with pytest.raises(ValidationError):
        wakeups.apply_wakeup("intro-start", T0 + 600, {"type": "nope"})
    assert [n.rsplit("/", 1)[1] for n in standin.jobs] == ["dasklab-wakeup-" + "x" * 485]


@pytest.mark.parametrize("code, error", [
    (grpc.StatusCode.PERMISSION_DENIED, PermanentError),
    (grpc.StatusCode.INVALID_ARGUMENT, PermanentError),
    (grpc.StatusCode.UNAUTHENTICATED, PermanentError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, TransientError),
    (grpc.StatusCode.UNAVAILABLE, TransientError),
    (grpc.StatusCode.ABORTED, TransientError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, RateLimited),
])
def test_scheduler_errors_are_mapped(wakeups, standin, code, error):
    standin.fail_next("CreateJob", code, "refused by the stand-in")
    with pytest.raises(error, match="schedule wake-up intro-start") as info:
        wakeups.apply_wakeup("intro-start", T0 + 600, WAKE)
    if error is not RateLimited:
        assert not isinstance(info.value, RateLimited)
    assert (error is PermanentError) == isinstance(info.value, PermanentError)


def test_a_job_deleted_between_create_and_update_is_retried_and_delete_errors_are_mapped(wakeups, standin):
    wakeups.apply_wakeup("intro-start", T0 + 600, WAKE)
    standin.fail_next("UpdateJob", grpc.StatusCode.NOT_FOUND, "Job not found.")
    with pytest.raises(TransientError, match="deleted meanwhile"):
        wakeups.apply_wakeup("intro-start", T0 + 900, WAKE)
    standin.fail_next("DeleteJob", grpc.StatusCode.PERMISSION_DENIED, "no")
    with pytest.raises(PermanentError, match="cancel wake-up intro-start"):
        wakeups.apply_cancel("intro-start")
    standin.fail_next("GetJob", grpc.StatusCode.PERMISSION_DENIED, "no")
    with pytest.raises(PermanentError, match="read wake-up intro-start"):
        wakeups.apply_expire("intro-start", T0)


def test_the_gke_runtime_builds_it_in_the_functions_region_on_the_timers_topic():
    w = build_wakeups(Config(backend="gke", project=PROJECT, region="europe-west1", tick_topic="ctl"))
    assert isinstance(w, SchedulerWakeups)
    assert (w.parent, w.topic) == (f"projects/{PROJECT}/locations/europe-west1", f"projects/{PROJECT}/topics/ctl")


# --- through the class reconcile ----------------------------------------------------------------------------------

@pytest.fixture
def ctl(tmp_path, standin, wakeups, clock):
    config = Config(backend="gke", project=PROJECT, region=REGION, poll_s=0, tick_budget_s=0, confirm_s=0,
                    cooldown_s=0)
    c = Controller(FakeBackend(), ListEvents(), config, clock=clock, sleep=lambda s: None,
                   classes=FileClasses(tmp_path), wakeups=wakeups)
    standin.publish = lambda topic, data, attrs: c.handle(parse_command(data), "wake-up")  # the control function
    return c


def start(**kw):
    return parse_command(json.dumps({"type": "start-class", "class": "intro", "owner": "prof",
                                     "roster": ["alice", "bob"], "workers": {"initial": 1, "min": 0, "max": 2},
                                     **kw}))


def test_a_class_at_a_time_is_started_and_ended_by_its_jobs_which_are_then_deleted(ctl, standin, clock):
    at = datetime.fromtimestamp(T0 + 3600, timezone.utc)  # 09:00:10; GKE's default lead time 15 min
    ctl.handle(start(at=at.isoformat(), duration="1h"), "m1", published=T0)
    assert ctl.backend.labs == {}
    assert (job(standin, "intro-start").schedule, job(standin, "intro-end").schedule) == ("46 8 7 12 *",
                                                                                         "1 10 7 12 *")
    clock.t = utc(2026, 12, 7, 8, 46, 1).timestamp()
    assert standin.fire_due() == [f"{PARENT}/jobs/dasklab-wakeup-intro-start"]
    assert sorted(ctl.backend.labs) == ["intro-alice", "intro-bob"]  # provisioning started by the wake-up
    assert job(standin, "intro-start") is None and job(standin, "intro-end") is not None
    clock.t = utc(2026, 12, 7, 10, 1, 1).timestamp()
    assert standin.fire_due() == [f"{PARENT}/jobs/dasklab-wakeup-intro-end"]
    assert ctl.classes.fetch_class("intro").is_stopped  # the duration ended it
    assert standin.jobs == {}


def test_resending_a_class_moves_its_jobs_and_stop_class_cancels_them(ctl, standin, clock):
    ctl.handle(start(at=datetime.fromtimestamp(T0 + 3600, timezone.utc).isoformat(), duration="1h"), "m1",
               published=T0)
    ctl.handle(start(at=datetime.fromtimestamp(T0 + 7200, timezone.utc).isoformat()), "m2", published=T0 + 1)
    assert job(standin, "intro-start").schedule == "46 9 7 12 *" and job(standin, "intro-end") is None
    ctl.handle(parse_command(json.dumps({"type": "stop-class", "class": "intro"})), "m3", published=T0 + 2)
    assert standin.jobs == {}
