"""Infrastructure as code: plan and apply dasklab's topics, subscriptions and timer jobs (idempotent).

    build_desired (pure, from infra/dasklab.yaml) ─┐
    fetch_observed (reads Pub/Sub and Scheduler) ──┴→ plan_infra (pure) → apply_infra (writes)

`run` is what `dasklab infra apply [--dry-run]` calls; `destroy` deletes exactly what `build_desired` names.
Nothing is ever deleted by `apply`, and a changed job is updated in place (UpdateJob with an update mask),
so its history and state (paused, last attempt) survive.
"""

from __future__ import annotations

import json
import re
import zoneinfo
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from google.api_core.exceptions import AlreadyExists, NotFound

from dasklab.core.errors import ValidationError
from dasklab.core.logs import emit
from dasklab.adapters.scheduler import AT_ATTRIBUTE, JOB_PREFIX, TICK_ATTRIBUTE, JobSpec
from dasklab.core.timers import dead_letter_subscription, load_infra

NIGHTLY_TYPE = "nightly-teardown"
DEAD_LETTER_ATTEMPTS = 10  # Pub/Sub allows 5-100
DEAD_LETTER_ACK_S = 120  # a reconcile tick's dead-letter pass acknowledges each letter well within this
_HH_MM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


# --- the model -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subscription:
    name: str  # projects/P/subscriptions/S
    topic: str  # projects/P/topics/T
    dead_letter_topic: str = ""
    max_delivery_attempts: int = 0


@dataclass(frozen=True)
class Desired:
    project: str
    location: str
    triggers: tuple[str, ...]  # the topics whose subscriptions (the functions' triggers) get the dead-letter policy
    dead_letter_topic: str
    topics: tuple[str, ...]
    subscriptions: tuple[Subscription, ...]
    jobs: tuple[JobSpec, ...]


@dataclass(frozen=True)
class Observed:
    topics: frozenset[str] = frozenset()
    subscriptions: Mapping[str, Subscription] = field(default_factory=dict)  # by name
    jobs: Mapping[str, JobSpec] = field(default_factory=dict)  # by name; Pub/Sub-target jobs only


@dataclass(frozen=True)
class Change:
    kind: str  # topic | subscription | job | dead-letter-policy
    name: str
    action: str  # create | update | unchanged | delete
    diff: str = ""
    target: Subscription | JobSpec | None = field(default=None, repr=False, compare=False)  # what to write
    fields: tuple[str, ...] = ()  # update mask of a job update

    def __str__(self) -> str:
        return f"{self.action:<9} {self.kind:<18} {self.name}" + (f"  ({self.diff})" if self.diff else "")


@dataclass(frozen=True)
class Clients:
    publisher: Any  # google.cloud.pubsub_v1.PublisherClient
    subscriber: Any  # google.cloud.pubsub_v1.SubscriberClient
    scheduler: Any  # google.cloud.scheduler_v1.CloudSchedulerClient


def default_clients() -> Clients:
    """The real clients (they honour PUBSUB_EMULATOR_HOST); imported here so planning needs no SDK."""
    from google.cloud import pubsub_v1, scheduler_v1
    return Clients(pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient(), scheduler_v1.CloudSchedulerClient())


def format_changes(changes: list[Change]) -> str:
    return "\n".join(map(str, changes))


# --- pure: desired state and plan ------------------------------------------------------------------

def nightly_schedule(nightly_at: str) -> str:
    """'HH:MM' (24 h) → the unix-cron 'MM HH * * *'."""
    m = _HH_MM.fullmatch(nightly_at)
    if not m:
        raise ValidationError("nightly_at", f"must be HH:MM on a 24-hour clock, like 02:00 (got {nightly_at!r})")
    return f"{int(m[2])} {int(m[1])} * * *"


def _check_time_zone(time_zone: str) -> str:
    if time_zone not in zoneinfo.available_timezones():
        raise ValidationError("time_zone", f"must be an IANA time zone like Europe/Paris (got {time_zone!r})")
    return time_zone


def build_desired(infra: dict, project: str, location: str, *, nightly_at: str = "02:00",
                  time_zone: str = "Etc/UTC") -> Desired:
    """What dasklab needs on `project`: its topics, a pull subscription keeping dead letters, its timer jobs."""
    nightly = nightly_schedule(nightly_at)
    time_zone = _check_time_zone(time_zone)
    names = infra["topics"]
    topic = {role: f"projects/{project}/topics/{names[role]}" for role in ("control", "ticks", "status", "dead_letter")}
    dead_letters = Subscription(f"projects/{project}/subscriptions/{dead_letter_subscription(names)}",
                                topic["dead_letter"])
    jobs = []
    for job in infra["jobs"]:
        kind = job.message["type"]
        is_nightly = kind == NIGHTLY_TYPE
        jobs.append(JobSpec(
            name=f"projects/{project}/locations/{location}/jobs/{job.name}",
            schedule=nightly if is_nightly else job.schedule,
            time_zone=time_zone if is_nightly else job.time_zone,
            topic=topic["ticks"],  # the timers' own topic: a tick on the control topic is refused
            data=json.dumps(job.message, separators=(",", ":")).encode(),
            attributes={TICK_ATTRIBUTE: kind},
        ))
    return Desired(project, location, (topic["control"], topic["ticks"]), topic["dead_letter"], tuple(topic.values()),
                   (dead_letters,), tuple(jobs))


def _job_diff(want: JobSpec, have: JobSpec) -> tuple[tuple[str, ...], list[str]]:
    """(update-mask paths, human diff lines) between an existing job and the wanted one."""
    compared = [("schedule", want.schedule, have.schedule), ("time_zone", want.time_zone, have.time_zone),
                ("pubsub_target.topic_name", want.topic, have.topic),
                ("pubsub_target.data", want.data.decode(errors="replace"), have.data.decode(errors="replace")),
                ("pubsub_target.attributes", dict(want.attributes), dict(have.attributes))]
    changed = [(path, old, new) for path, new, old in compared if new != old]
    mask = tuple(dict.fromkeys(path.split(".")[0] for path, _, _ in changed))
    return mask, [f"{path} {old!r} → {new!r}" for path, old, new in changed]


def plan_infra(desired: Desired, observed: Observed) -> list[Change]:
    """Every resource `desired` names, in creation order, with what to do; never a delete."""
    changes = [Change("topic", t, "unchanged" if t in observed.topics else "create") for t in desired.topics]

    for sub in desired.subscriptions:
        have = observed.subscriptions.get(sub.name)
        if have is None:
            changes.append(Change("subscription", sub.name, "create", f"on {sub.topic}", target=sub))
        else:
            note = "" if have.topic == sub.topic else f"attached to {have.topic}, not {sub.topic}: delete it by hand"
            changes.append(Change("subscription", sub.name, "unchanged", note))

    ours = {s.name for s in desired.subscriptions}
    for name, have in sorted(observed.subscriptions.items()):  # e.g. the Eventarc trigger of the function
        if have.topic not in desired.triggers or name in ours:
            continue
        want = replace(have, dead_letter_topic=desired.dead_letter_topic, max_delivery_attempts=DEAD_LETTER_ATTEMPTS)
        if want == have:
            changes.append(Change("dead-letter-policy", name, "unchanged"))
        else:
            diff = (f"dead_letter_topic {have.dead_letter_topic!r} → {want.dead_letter_topic!r}, "
                    f"max_delivery_attempts {have.max_delivery_attempts} → {want.max_delivery_attempts}")
            changes.append(Change("dead-letter-policy", name, "update", diff, target=want))

    for job in desired.jobs:
        have = observed.jobs.get(job.name)
        if have is None:
            changes.append(Change("job", job.name, "create", f"{job.schedule} {job.time_zone}", target=job))
            continue
        mask, diff = _job_diff(job, have)
        action = "update" if mask else "unchanged"
        changes.append(Change("job", job.name, action, "; ".join(diff), target=job, fields=mask))
    return changes


# --- I/O: read, write, delete ----------------------------------------------------------------------

def fetch_observed(project: str, location: str, clients: Clients) -> Observed:
    """What exists now: the project's topics and subscriptions, the location's Pub/Sub-target jobs."""
    topics = frozenset(t.name for t in clients.publisher.list_topics(request={"project": f"projects/{project}"}))
    subscriptions = {
        s.name: Subscription(s.name, s.topic, s.dead_letter_policy.dead_letter_topic,
                             s.dead_letter_policy.max_delivery_attempts)
        for s in clients.subscriber.list_subscriptions(request={"project": f"projects/{project}"})
    }
    jobs = {
        j.name: JobSpec(j.name, j.schedule, j.time_zone or "Etc/UTC", j.pubsub_target.topic_name,
                        bytes(j.pubsub_target.data), dict(j.pubsub_target.attributes))
        for j in clients.scheduler.list_jobs(request={"parent": f"projects/{project}/locations/{location}"})
        if "pubsub_target" in j
    }
    return Observed(topics, subscriptions, jobs)


def _apply_one(change: Change, clients: Clients) -> Change:
    if change.kind == "topic":
        clients.publisher.create_topic(request={"name": change.name})
    elif change.kind == "subscription":
        clients.subscriber.create_subscription(request={"name": change.name, "topic": change.target.topic,
                                                        "ack_deadline_seconds": DEAD_LETTER_ACK_S})
    elif change.kind == "dead-letter-policy":
        policy = {"dead_letter_topic": change.target.dead_letter_topic,
                  "max_delivery_attempts": change.target.max_delivery_attempts}
        clients.subscriber.update_subscription(request={
            "subscription": {"name": change.name, "dead_letter_policy": policy},
            "update_mask": {"paths": ["dead_letter_policy"]}})
    elif change.action == "create":
        parent = change.name.rsplit("/jobs/", 1)[0]
        clients.scheduler.create_job(request={"parent": parent, "job": change.target.body()})
    else:
        mask = {"paths": list(change.fields)}
        clients.scheduler.update_job(request={"job": change.target.body(), "update_mask": mask})
    return change


def apply_infra(changes: list[Change], clients: Clients) -> list[Change]:
    """Carry out the creates and updates of a plan; returns the plan as it turned out."""
    done = []
    for change in changes:
        if change.action not in ("create", "update"):
            done.append(change)
            continue
        try:
            done.append(_apply_one(change, clients))
        except AlreadyExists:  # created by someone else since we looked
            done.append(replace(change, action="unchanged", diff="already existed"))
            continue
        except NotFound:  # a foreign subscription deleted since we looked (the function was redeployed)
            done.append(replace(change, action="unchanged", diff="gone before it could be updated"))
            continue
        emit("INFO", action=f"infra-{change.action}", kind=change.kind, name=change.name, diff=change.diff or None)
    return done


def run(project: str, location: str, clients: Clients, *, dry_run: bool = False, nightly_at: str = "02:00",
        time_zone: str = "Etc/UTC", infra: dict | None = None) -> list[Change]:
    """Plan (and unless `dry_run`, apply) dasklab's infrastructure on `project`; returns the changes."""
    desired = build_desired(infra or load_infra(), project, location, nightly_at=nightly_at, time_zone=time_zone)
    changes = plan_infra(desired, fetch_observed(project, location, clients))
    return changes if dry_run else apply_infra(changes, clients)


def destroy(project: str, location: str, clients: Clients, *, infra: dict | None = None) -> list[Change]:
    """Delete the jobs, subscriptions and topics `build_desired` names, and the classes' pending wake-up jobs (named
    `dasklab-wakeup-…` and carrying their `dasklab-wakeup-at` attribute: the controller's own), nothing else."""
    desired = build_desired(infra or load_infra(), project, location)
    wakeups = [j.name for j in clients.scheduler.list_jobs(request={"parent": f"projects/{project}/locations/{location}"})
               if j.name.rsplit("/", 1)[-1].startswith(JOB_PREFIX) and AT_ATTRIBUTE in j.pubsub_target.attributes]
    deletions = ([("job", j.name, clients.scheduler.delete_job, "name") for j in desired.jobs]
                 + [("job", name, clients.scheduler.delete_job, "name") for name in wakeups]
                 + [("subscription", s.name, clients.subscriber.delete_subscription, "subscription")
                    for s in desired.subscriptions]
                 + [("topic", t, clients.publisher.delete_topic, "topic") for t in desired.topics])
    done = []
    for kind, name, delete, key in deletions:
        try:
            delete(request={key: name})
        except NotFound:
            done.append(Change(kind, name, "unchanged", "already absent"))
            continue
        emit("INFO", action="infra-delete", kind=kind, name=name)
        done.append(Change(kind, name, "delete"))
    return done
