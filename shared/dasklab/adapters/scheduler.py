"""Cloud Scheduler adapter: a class's one-off wake-ups (core.classes.Wakeups) on Google Cloud, one job per wake-up.

Job `dasklab-wakeup-<key>` (e.g. `dasklab-wakeup-intro-start`) in the controller's region, with the cron
`M H D Mon *` of its minute in Etc/UTC and a Pub/Sub target publishing the wake-up message on the control topic,
as the timer jobs of `dasklab infra` do (same data encoding, same `dasklab-tick` attribute). Cron has no year,
so the job fires again a year later: it is deleted once its wake-up is handled (`apply_expire`, called by the
reconcile-class handler). Its minute is also kept in the attribute `dasklab-wakeup-at`, which that deletion reads.
google-cloud-scheduler (and the infra module the job body comes from) is imported on first use only, so the
function's cold start does not pay for it.
"""

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from google.api_core import exceptions as gexc

from dasklab.adapters.googleapi import translate as _translate  # the table shared with GKE and Compute
from dasklab.core.errors import TransientError, ValidationError
from dasklab.core.messages import parse_command

JOB_PREFIX = "dasklab-wakeup-"
AT_ATTRIBUTE = "dasklab-wakeup-at"  # the job's minute, ISO 8601 UTC: when its wake-up is due
TICK_ATTRIBUTE = "dasklab-tick"  # on every timer job's message: which tick it is
TIME_ZONE = "Etc/UTC"
# A job's JOB_ID "can contain only letters ([A-Za-z]), numbers ([0-9]), hyphens (-), or underscores (_). The maximum
# length is 500 characters." (google.cloud.scheduler_v1.Job.name)
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,500}")
# A job created in the last seconds before its minute may miss it: a wake-up due sooner fires the minute after.
MIN_AHEAD_S = 30.0
_MUTABLE = ["schedule", "time_zone", "pubsub_target", "description"]  # what a moved wake-up rewrites


def job_id(key: str) -> str:
    """The job id of wake-up `key`: a valid JOB_ID, or ValidationError."""
    name = JOB_PREFIX + key
    if not _JOB_ID.fullmatch(name):
        raise ValidationError("wakeup", f"{key!r}: a Cloud Scheduler job id has only letters, digits, '-' and '_', "
                                        f"at most 500 characters")
    return name


def build_fire_time(at_epoch: float, now: float) -> datetime:
    """The minute the job fires: `at` rounded up to the minute (cron fires at a minute's start, and a wake-up must
    not come early: the class would do nothing and its job would be kept), at least MIN_AHEAD_S from now."""
    return datetime.fromtimestamp(math.ceil(max(at_epoch, now + MIN_AHEAD_S) / 60) * 60, timezone.utc)


@dataclass(frozen=True)
class JobSpec:
    name: str  # projects/P/locations/L/jobs/J
    schedule: str
    time_zone: str
    topic: str
    data: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        """The Cloud Scheduler Job as a request dict."""
        return {"name": self.name, "schedule": self.schedule, "time_zone": self.time_zone,
                "pubsub_target": {"topic_name": self.topic, "data": self.data, "attributes": dict(self.attributes)}}


def build_schedule(when: datetime) -> str:
    """`M H D Mon *`: that one minute of the year, in UTC (day of week left free, so only the date counts)."""
    return f"{when.minute} {when.hour} {when.day} {when.month} *"


def build_job(name: str, when: datetime, message: dict, topic: str) -> dict:
    """The Cloud Scheduler Job (request dict) of a wake-up: JobSpec.body() of the infra jobs, plus its description."""
    iso = when.strftime("%Y-%m-%dT%H:%MZ")
    spec = JobSpec(name, build_schedule(when), TIME_ZONE, topic, json.dumps(message, separators=(",", ":")).encode(),
                   {TICK_ATTRIBUTE: message["type"], AT_ATTRIBUTE: iso})
    return dict(spec.body(), description=f"dasklab one-off wake-up at {iso}: deleted by dasklab once handled (its "
                                         f"cron would fire again every year)")  # ≤ 500 characters: no key in it


class SchedulerWakeups:
    """One-off wake-ups as Cloud Scheduler jobs of `project` in `region`, publishing on topic `topic` (a name)."""

    def __init__(self, project: str, region: str, topic: str, client_factory: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.time):
        self.parent = f"projects/{project}/locations/{region}"
        self.topic = f"projects/{project}/topics/{topic}"
        self._factory, self._client, self.clock = client_factory, None, clock

    @property
    def client(self):
        if self._client is None:
            if self._factory is None:
                from google.cloud import scheduler_v1
                self._factory = scheduler_v1.CloudSchedulerClient
            self._client = self._factory()
        return self._client

    def _name(self, key: str) -> str:
        return f"{self.parent}/jobs/{job_id(key)}"

    def _call(self, what: str, fn, *handled: type[Exception]):
        """fn(), its SDK errors translated; the `handled` ones re-raised as they are, for the caller to decide."""
        try:
            return fn()
        except handled:
            raise
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, what) from e

    def apply_wakeup(self, key: str, at_epoch: float, message: dict) -> None:
        """Create the job, or move it (UpdateJob of its schedule, target and description) if it exists."""
        parse_command(message)  # a wake-up delivers a valid command or none
        name = self._name(key)
        job = build_job(name, build_fire_time(at_epoch, self.clock()), message, self.topic)
        what = f"schedule wake-up {key} at {job['pubsub_target']['attributes'][AT_ATTRIBUTE]}"
        try:
            self._call(what, lambda: self.client.create_job(request={"parent": self.parent, "job": job}),
                       gexc.AlreadyExists)
        except gexc.AlreadyExists:  # the wake-up moves (or is re-sent): one update, whatever it had
            try:
                self._call(what, lambda: self.client.update_job(
                    request={"job": job, "update_mask": {"paths": _MUTABLE}}), gexc.NotFound)
            except gexc.NotFound as e:  # cancelled between the two calls: retried, it is created
                raise TransientError(f"{what}: job deleted meanwhile ({e})") from e

    def apply_cancel(self, key: str) -> None:
        try:
            self._call(f"cancel wake-up {key}", lambda: self.client.delete_job(request={"name": self._name(key)}),
                       gexc.NotFound)
        except gexc.NotFound:
            pass

    def apply_expire(self, key: str, now: float) -> None:
        """Delete the job of wake-up `key` if its minute has passed: it fired (or its wake-up is moot)."""
        try:
            job = self._call(f"read wake-up {key}", lambda: self.client.get_job(request={"name": self._name(key)}),
                             gexc.NotFound)
        except gexc.NotFound:
            return
        due = job.pubsub_target.attributes.get(AT_ATTRIBUTE, "")
        try:
            due_epoch = datetime.fromisoformat(due.replace("Z", "+00:00")).timestamp()
        except ValueError:  # not one of ours as built above (edited by hand): left alone
            return
        if due_epoch <= now:
            self.apply_cancel(key)
