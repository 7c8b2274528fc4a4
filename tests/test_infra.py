"""Infra as code: pure plans from hand-built observations, then apply/destroy against the real Pub/Sub
emulator and the Cloud Scheduler stand-in, both driven by the real clients."""

import itertools
import json
from dataclasses import replace

import pytest
from google.cloud import pubsub_v1
from google.cloud import scheduler_v1 as sched

from dasklab.cloud import infra
from dasklab.adapters import procs
from dasklab.adapters.scheduler import SchedulerWakeups
from dasklab.core.errors import ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.timers import load_infra
from tests.standins.cloud_scheduler import CloudSchedulerStandin

LOCATION = "us-central1"
INFRA = load_infra()
P = "dasklab-test"
CONTROL, TICKS, STATUS, DEAD = (f"projects/{P}/topics/dasklab-{t}" for t in ("control", "ticks", "status", "dead-letter"))
DEAD_SUB = f"projects/{P}/subscriptions/dasklab-dead-letter-sub"
JOBS = f"projects/{P}/locations/{LOCATION}/jobs"
PUBSUB_WRITES = {"create_topic", "create_subscription", "update_subscription", "delete_topic", "delete_subscription"}
SCHEDULER_WRITES = {"CreateJob", "UpdateJob", "DeleteJob"}


def desired(**kw) -> infra.Desired:
    return infra.build_desired(INFRA, P, LOCATION, **kw)


def observed_from(d: infra.Desired, *extra: infra.Subscription) -> infra.Observed:
    """An Observed holding exactly what `d` wants, plus `extra` subscriptions."""
    return infra.Observed(frozenset(d.topics), {s.name: s for s in (*d.subscriptions, *extra)},
                          {j.name: j for j in d.jobs})


def by_name(changes):
    return {c.name: c for c in changes}


# --- pure: build_desired --------------------------------------------------------------------------

def test_build_desired_names_topics_dead_letter_subscription_and_jobs():
    d = desired(nightly_at="01:30", time_zone="Europe/Paris")
    assert d.topics == (CONTROL, TICKS, STATUS, DEAD)
    assert d.subscriptions == (infra.Subscription(DEAD_SUB, DEAD),)
    jobs = {j.name.rsplit("/", 1)[1]: j for j in d.jobs}
    assert jobs["dasklab-reconcile"] == infra.JobSpec(
        f"{JOBS}/dasklab-reconcile", "* * * * *", "Etc/UTC", TICKS, b'{"v":1,"type":"reconcile"}',
        {"dasklab-tick": "reconcile"})
    idle = jobs["dasklab-teardown-idle"]
    assert (idle.schedule, idle.time_zone) == ("*/15 * * * *", "Etc/UTC")
    assert {j.topic for j in d.jobs} == {TICKS}  # the timers' own topic: the control topic refuses ticks
    nightly = jobs["dasklab-nightly-teardown"]
    assert (nightly.schedule, nightly.time_zone) == ("30 1 * * *", "Europe/Paris")
    assert parse_command(nightly.data).type == "nightly-teardown"
    assert desired().jobs[2].schedule == "0 2 * * *"  # the default matches infra/dasklab.yaml


@pytest.mark.parametrize("value", ["2:00", "24:00", "02:60", "0200", "02:00:00", "", " 02:00", "ab:cd"])
def test_malformed_nightly_at_names_the_field(value):
    with pytest.raises(ValidationError) as e:
        desired(nightly_at=value)
    assert e.value.field == "nightly_at"


@pytest.mark.parametrize("value", ["Mars/Olympus", "utc", "Europe/Pariss", "", "../../etc/passwd", "+02:00"])
def test_unknown_time_zone_names_the_field(value):
    with pytest.raises(ValidationError) as e:
        desired(time_zone=value)
    assert e.value.field == "time_zone"


# --- pure: plan_infra -----------------------------------------------------------------------------

def test_plan_on_an_empty_project_creates_everything_in_dependency_order():
    changes = infra.plan_infra(desired(), infra.Observed())
    assert [(c.kind, c.action) for c in changes] == [("topic", "create")] * 4 + [("subscription", "create")] + [
        ("job", "create")] * 3


def test_plan_when_everything_exists_is_all_unchanged():
    changes = infra.plan_infra(desired(), observed_from(desired()))
    assert {c.action for c in changes} == {"unchanged"} and len(changes) == 8


def test_plan_updates_a_changed_schedule_with_a_mask_and_a_readable_diff():
    changes = by_name(infra.plan_infra(desired(nightly_at="01:30"), observed_from(desired())))
    nightly = changes[f"{JOBS}/dasklab-nightly-teardown"]
    assert (nightly.action, nightly.fields) == ("update", ("schedule",))
    assert nightly.diff == "schedule '0 2 * * *' → '30 1 * * *'"
    assert [c.action for c in changes.values()].count("update") == 1


def test_plan_updates_a_changed_target_as_one_field():
    d = desired()
    have = replace(d.jobs[0], data=b'{"v":1,"type":"teardown-idle"}', attributes={})
    obs = replace(observed_from(d), jobs={**observed_from(d).jobs, have.name: have})
    change = by_name(infra.plan_infra(d, obs))[have.name]
    assert change.action == "update" and change.fields == ("pubsub_target",)
    assert "pubsub_target.data '{\"v\":1,\"type\":\"teardown-idle\"}' → " in change.diff
    assert "pubsub_target.attributes {} → {'dasklab-tick': 'reconcile'}" in change.diff


def test_plan_never_deletes_and_ignores_foreign_jobs_and_other_topics_subscriptions():
    d = desired()
    stranger = infra.JobSpec(f"{JOBS}/someone-elses", "0 * * * *", "Etc/UTC", CONTROL, b"x")
    on_status = infra.Subscription(f"projects/{P}/subscriptions/status-watch", STATUS)
    obs = replace(observed_from(d, on_status), jobs={**observed_from(d).jobs, stranger.name: stranger})
    changes = infra.plan_infra(d, obs)
    assert stranger.name not in by_name(changes) and on_status.name not in by_name(changes)
    assert "delete" not in {c.action for c in changes}


def test_plan_gives_foreign_control_subscriptions_a_dead_letter_policy():
    trigger = infra.Subscription(f"projects/{P}/subscriptions/eventarc-us-central1-control-sub-1", CONTROL)
    done = infra.Subscription(f"projects/{P}/subscriptions/done", CONTROL, DEAD, 10)
    other = infra.Subscription(f"projects/{P}/subscriptions/other", CONTROL, DEAD, 5)
    changes = by_name(infra.plan_infra(desired(), observed_from(desired(), trigger, done, other)))
    assert (changes[trigger.name].kind, changes[trigger.name].action) == ("dead-letter-policy", "update")
    assert changes[trigger.name].target == replace(trigger, dead_letter_topic=DEAD, max_delivery_attempts=10)
    assert changes[trigger.name].diff == f"dead_letter_topic '' → '{DEAD}', max_delivery_attempts 0 → 10"
    assert changes[done.name].action == "unchanged"
    assert changes[other.name].action == "update"


def test_plan_flags_our_subscription_on_the_wrong_topic():
    obs = replace(observed_from(desired()), subscriptions={DEAD_SUB: infra.Subscription(DEAD_SUB, STATUS)})
    change = by_name(infra.plan_infra(desired(), obs))[DEAD_SUB]
    assert change.action == "unchanged" and "delete it by hand" in change.diff


# --- against the Pub/Sub emulator and the Cloud Scheduler stand-in ---------------------------------

needs_emulator = pytest.mark.emulator  # runs, and fails, without the emulator: .ci/run installs it
_projects = itertools.count(1)


class Recording:
    """Pass-through proxy of a client that records the names of the methods called on it."""

    def __init__(self, inner, calls: list):
        self._inner, self.calls = inner, calls

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr
        def call(*args, **kwargs):
            self.calls.append(name)
            return attr(*args, **kwargs)
        return call


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    emu = procs.start_pubsub_emulator(tmp_path_factory.mktemp("pubsub"))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PUBSUB_EMULATOR_HOST", emu.host)
            yield pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    finally:
        emu.stop()
    assert not emu.proc.alive()


class Env:
    def __init__(self, emulator, standin):
        self.publisher, self.subscriber = emulator
        self.standin, self.scheduler = standin, standin.client()
        self.project = f"dasklab-it{next(_projects)}"  # one project per test: the emulator is shared
        self.pubsub_calls: list[str] = []
        self.clients = infra.Clients(Recording(self.publisher, self.pubsub_calls),
                                     Recording(self.subscriber, self.pubsub_calls), self.scheduler)

    def run(self, **kw):
        return infra.run(self.project, LOCATION, self.clients, infra=INFRA, **kw)

    def destroy(self):
        return infra.destroy(self.project, LOCATION, self.clients, infra=INFRA)

    def topics(self) -> set[str]:
        return {t.name for t in self.publisher.list_topics(project=f"projects/{self.project}")}

    def subscriptions(self) -> dict:
        return {s.name: s for s in self.subscriber.list_subscriptions(project=f"projects/{self.project}")}

    def path(self, kind: str, name: str) -> str:
        return f"projects/{self.project}/{kind}/{name}"

    def job(self, name: str) -> str:
        return f"projects/{self.project}/locations/{LOCATION}/jobs/{name}"

    def writes(self) -> set[str]:
        return (set(self.pubsub_calls) & PUBSUB_WRITES) | (set(self.standin.calls) & SCHEDULER_WRITES)

    def reset_calls(self):
        self.pubsub_calls.clear()
        self.standin.calls.clear()


@pytest.fixture
def env(emulator):
    publisher = emulator[0]

    def publish(topic, data, attributes):  # what Cloud Scheduler does when a job fires
        publisher.publish(topic, data, **attributes).result(timeout=10)

    with CloudSchedulerStandin(publish) as standin:
        yield Env(emulator, standin)


def pull(subscriber, subscription: str):
    """The messages waiting on a pull subscription (acknowledged), polling until there is one."""
    def one():
        return subscriber.pull(subscription=subscription, max_messages=10, timeout=5).received_messages
    received = procs.wait_until(one, timeout=10, what=f"a message on {subscription}")
    subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in received])
    return [m.message for m in received]


@needs_emulator
def test_first_apply_creates_everything_and_the_second_writes_nothing(env):
    first = env.run()
    assert [(c.kind, c.action) for c in first] == [("topic", "create")] * 4 + [("subscription", "create")] + [
        ("job", "create")] * 3
    topics = env.topics()
    assert topics == {env.path("topics", t) for t in ("dasklab-control", "dasklab-ticks", "dasklab-status",
                                                           "dasklab-dead-letter")}
    dead_sub = env.subscriptions()[env.path("subscriptions", "dasklab-dead-letter-sub")]
    assert dead_sub.topic == env.path("topics", "dasklab-dead-letter")
    assert dead_sub.ack_deadline_seconds == infra.DEAD_LETTER_ACK_S  # a tick's dead-letter pass acks well within it
    jobs = env.standin.jobs
    names = ("dasklab-reconcile", "dasklab-teardown-idle", "dasklab-nightly-teardown")
    assert sorted(jobs) == sorted(env.job(n) for n in names)
    reconcile = jobs[env.job("dasklab-reconcile")]
    assert (reconcile.schedule, reconcile.time_zone, reconcile.pubsub_target.topic_name) == (
        "* * * * *", "Etc/UTC", env.path("topics", "dasklab-ticks"))
    assert dict(reconcile.pubsub_target.attributes) == {"dasklab-tick": "reconcile"}

    env.reset_calls()
    second = env.run()
    assert {c.action for c in second} == {"unchanged"} and len(second) == 8
    assert env.writes() == set()
    assert env.standin.calls == ["ListJobs"] and set(env.pubsub_calls) == {"list_topics", "list_subscriptions"}
    assert env.topics() == topics and env.standin.jobs == jobs


@needs_emulator
def test_changing_nightly_at_updates_the_job_in_place(env):
    env.run()
    name = env.job("dasklab-nightly-teardown")
    env.scheduler.pause_job(name=name)  # state a delete-and-recreate would lose
    before = env.standin.jobs
    env.reset_calls()
    changes = by_name(env.run(nightly_at="01:30", time_zone="Europe/Paris"))
    assert changes[name].action == "update"
    assert changes[name].diff == "schedule '0 2 * * *' → '30 1 * * *'; time_zone 'Etc/UTC' → 'Europe/Paris'"
    assert [c.action for c in changes.values()].count("update") == 1
    assert env.standin.calls == ["ListJobs", "UpdateJob"]
    after = env.standin.jobs
    assert (after[name].schedule, after[name].time_zone) == ("30 1 * * *", "Europe/Paris")
    assert after[name].state == sched.Job.State.PAUSED
    assert after[name].pubsub_target == before[name].pubsub_target
    assert {n: j for n, j in after.items() if n != name} == {n: j for n, j in before.items() if n != name}


@needs_emulator
def test_dry_run_plans_without_writing(env):
    changes = env.run(dry_run=True)
    assert {c.action for c in changes} == {"create"} and len(changes) == 8
    assert env.writes() == set() and env.topics() == set() and env.standin.jobs == {}
    env.run()
    env.reset_calls()
    changes = by_name(env.run(dry_run=True, nightly_at="03:15"))
    assert changes[env.job("dasklab-nightly-teardown")].action == "update"
    assert env.writes() == set() and env.standin.jobs[env.job("dasklab-nightly-teardown")].schedule == "0 2 * * *"


@needs_emulator
def test_destroy_removes_what_apply_created_and_nothing_else(env):
    env.run()
    other_topic = env.path("topics", "someone-elses")
    env.publisher.create_topic(name=other_topic)
    other_job = sched.Job(name=env.job("someone-elses"), schedule="0 * * * *",
                          pubsub_target=sched.PubsubTarget(topic_name=other_topic, data=b"x"))
    env.scheduler.create_job(parent=f"projects/{env.project}/locations/{LOCATION}", job=other_job)
    lookalike = sched.Job(name=env.job("dasklab-wakeup-not-ours"), schedule="0 * * * *",  # no wake-up attribute
                          pubsub_target=sched.PubsubTarget(topic_name=other_topic, data=b"x"))
    env.scheduler.create_job(parent=f"projects/{env.project}/locations/{LOCATION}", job=lookalike)
    wakeups = SchedulerWakeups(env.project, LOCATION, "dasklab-control", lambda: env.scheduler,
                               clock=lambda: 1_800_000_000.0)
    wakeups.apply_wakeup("intro-start", 1_800_003_600.0, {"v": 1, "type": "reconcile-class", "class": "intro"})

    removed = env.destroy()
    assert [(c.kind, c.action) for c in removed] == [("job", "delete")] * 4 + [("subscription", "delete")] + [
        ("topic", "delete")] * 4  # the 3 timers and the class's pending wake-up
    assert env.topics() == {other_topic} and sorted(env.standin.jobs) == sorted([other_job.name, lookalike.name])
    assert env.subscriptions() == {}
    assert {c.action for c in env.destroy()} == {"unchanged"}  # NotFound is fine


@needs_emulator
def test_running_the_reconcile_job_delivers_its_tick_on_the_timers_topic(env):
    env.run()
    probe = env.path("subscriptions", "probe")
    env.subscriber.create_subscription(name=probe, topic=env.path("topics", "dasklab-ticks"))
    job = env.scheduler.run_job(name=env.job("dasklab-reconcile"))
    assert job.status.code == 0
    [message] = pull(env.subscriber, probe)
    assert parse_command(message.data).type == "reconcile"
    assert json.loads(message.data) == {"v": 1, "type": "reconcile"}
    assert dict(message.attributes) == {"dasklab-tick": "reconcile"}


@needs_emulator
@pytest.mark.filterwarnings("ignore:The return_immediately flag:DeprecationWarning")  # else an empty pull waits 2 s
def test_a_foreign_control_subscription_gets_the_dead_letter_policy_and_dead_letters_are_kept(env):
    env.run()
    control = env.path("subscriptions", "eventarc-us-central1-dasklab-control-123-sub-456")  # like gcloud's
    env.subscriber.create_subscription(name=control, topic=env.path("topics", "dasklab-control"))
    trigger = env.path("subscriptions", "eventarc-us-central1-dasklab-ticks-123-sub-789")  # the ticks function's
    env.subscriber.create_subscription(name=trigger, topic=env.path("topics", "dasklab-ticks"))
    changes = by_name(env.run())
    change = changes[trigger]
    assert changes[control].action == "update"
    assert (change.kind, change.action) == ("dead-letter-policy", "update")
    policy = env.subscriptions()[trigger].dead_letter_policy
    assert (policy.dead_letter_topic, policy.max_delivery_attempts) == (env.path("topics", "dasklab-dead-letter"), 10)
    env.reset_calls()
    assert by_name(env.run())[trigger].action == "unchanged" and env.writes() == set()

    # a message the trigger never acknowledges ends up kept on the dead-letter subscription
    env.scheduler.run_job(name=env.job("dasklab-teardown-idle"))
    dead_sub, attempts = env.path("subscriptions", "dasklab-dead-letter-sub"), []

    def nack_until_dead_lettered():
        for m in env.subscriber.pull(subscription=trigger, max_messages=1, return_immediately=True).received_messages:
            attempts.append(m.delivery_attempt)
            env.subscriber.modify_ack_deadline(subscription=trigger, ack_ids=[m.ack_id], ack_deadline_seconds=0)
        return env.subscriber.pull(subscription=dead_sub, max_messages=1, return_immediately=True).received_messages

    [dead] = procs.wait_until(nack_until_dead_lettered, timeout=10, what="a dead letter")
    assert attempts == list(range(1, 11))
    assert parse_command(dead.message.data).type == "teardown-idle"
