"""Test stand-in for Cloud Scheduler (google.cloud.scheduler.v1.CloudScheduler): a strict in-process gRPC server."""

from __future__ import annotations

import re
import uuid
import zoneinfo
from datetime import datetime
from typing import Callable

from croniter import croniter
from google.cloud import scheduler_v1 as sched
from google.cloud.scheduler_v1.services.cloud_scheduler.transports import CloudSchedulerGrpcTransport
from google.protobuf import empty_pb2, field_mask_pb2
from google.rpc import status_pb2

from .gke import Code, GrpcStandin, StandinAbort, copy_message

Publish = Callable[[str, bytes, dict], None]

PARENT_RE = re.compile(r"projects/[A-Za-z0-9:.-]+/locations/[a-z0-9-]+")
JOB_RE = re.compile(r"(?P<parent>projects/[A-Za-z0-9:.-]+/locations/[a-z0-9-]+)/jobs/[A-Za-z0-9_-]{1,500}")
TOPIC_RE = re.compile(r"projects/([a-z][-a-z0-9]{4,28}[a-z0-9]|[0-9]+)/topics/(?!goog)[A-Za-z][A-Za-z0-9._~+%-]{2,254}")
CRON_NAMES = {3: {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"},
              4: {"sun", "mon", "tue", "wed", "thu", "fri", "sat"}}  # fmt: skip
OUTPUT_ONLY = {"name", "user_update_time", "state", "status", "schedule_time", "last_attempt_time"}
BAD_SCHEDULE = "Schedule or time zone is invalid."  # the real message, for both causes
MAX_PAGE_SIZE = 500
State = sched.Job.State


def valid_unix_cron(schedule: str) -> bool:
    """Five-field unix-cron only (so at most once a minute): no seconds field, no @macros, no L/W/#/?."""
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for i, field in enumerate(fields):
        words = re.findall(r"[A-Za-z]+", field)
        if not re.fullmatch(r"[0-9A-Za-z*,/-]+", field) or any(w.lower() not in CRON_NAMES.get(i, ()) for w in words):
            return False
    return croniter.is_valid(schedule)



def zone_of(name: str) -> zoneinfo.ZoneInfo | None:
    """The zone a job's time_zone names: a tz database name, or "utc" (Job.time_zone's docstring); else None."""
    name = "Etc/UTC" if name == "utc" else name
    return zoneinfo.ZoneInfo(name) if name in zoneinfo.available_timezones() else None

class CloudSchedulerStandin(GrpcStandin):
    """Strict Cloud Scheduler stand-in; RunJob delivers Pub/Sub targets through `publish(topic, data, attributes)`."""

    service = "google.cloud.scheduler.v1.CloudScheduler"

    def __init__(
        self,
        publish: Publish | None = None,
        *,
        latency_s: float = 0.0,
        clock: Callable[[], datetime] | None = None,
    ):
        super().__init__(latency_s=latency_s, clock=clock)
        self.publish = publish
        self.runs: list[tuple[str, str, bytes, dict]] = []  # (job name, topic, data, attributes) per RunJob
        self._jobs: dict[str, sched.Job] = {}

    def client(self) -> sched.CloudSchedulerClient:
        return sched.CloudSchedulerClient(transport=CloudSchedulerGrpcTransport(channel=self._channel()))

    @property
    def jobs(self) -> dict[str, sched.Job]:
        with self._lock:
            return {name: copy_message(j) for name, j in self._jobs.items()}

    # ---- rules ---------------------------------------------------------------------------------
    def _job(self, name: str) -> sched.Job:
        if not JOB_RE.fullmatch(name or ""):
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid job name: {name!r}.")
        if name not in self._jobs:
            raise StandinAbort(Code.NOT_FOUND, "Job not found.")
        return self._jobs[name]

    def _validate(self, job: sched.Job) -> None:
        """Check a complete job; fills in the default time zone and the next schedule_time."""
        if len(job.description) > 500:
            raise StandinAbort(Code.INVALID_ARGUMENT, "Job description must not exceed 500 characters.")
        job.time_zone = job.time_zone or "Etc/UTC"
        # a tz database name; `Job.time_zone` docstring: 'For UTC use the string "utc"' (stored as sent)
        if not valid_unix_cron(job.schedule) or zone_of(job.time_zone) is None:
            raise StandinAbort(Code.INVALID_ARGUMENT, BAD_SCHEDULE)
        target = sched.Job.pb(job).WhichOneof("target")
        if target is None:
            raise StandinAbort(Code.INVALID_ARGUMENT, "A job target (pubsub_target, http_target, …) is required.")
        if target != "pubsub_target":
            raise StandinAbort(Code.UNIMPLEMENTED, f"The stand-in supports pubsub_target only, not {target}.")
        if not TOPIC_RE.fullmatch(job.pubsub_target.topic_name):
            raise StandinAbort(
                Code.INVALID_ARGUMENT, f"Invalid topic name {job.pubsub_target.topic_name!r}: want projects/P/topics/T."
            )
        if not job.pubsub_target.data and not job.pubsub_target.attributes:
            raise StandinAbort(
                Code.INVALID_ARGUMENT, "A Pub/Sub message must contain either non-empty data, or at least one attribute."
            )
        now = self._now()
        job.schedule_time = croniter(job.schedule, now.astimezone(zone_of(job.time_zone))).get_next(datetime)

    # ---- handlers ------------------------------------------------------------------------------
    def _create_job(self, req: sched.CreateJobRequest) -> sched.Job:
        if not PARENT_RE.fullmatch(req.parent):
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid parent: {req.parent!r}.")
        job = copy_message(req.job)
        job.name = job.name or f"{req.parent}/jobs/{uuid.uuid4().hex}"
        m = JOB_RE.fullmatch(job.name)
        if not m:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid job name: {job.name!r}.")
        if m["parent"] != req.parent:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Job name {job.name!r} is not under parent {req.parent!r}.")
        if job.name in self._jobs:
            raise StandinAbort(Code.ALREADY_EXISTS, f"Job {job.name} already exists.")
        for field in OUTPUT_ONLY - {"name"}:  # output-only fields are ignored on create
            sched.Job.pb(job).ClearField(field)
        self._validate(job)
        job.state = State.ENABLED
        job.user_update_time = self._now()
        self._jobs[job.name] = job
        return job

    def _get_job(self, req: sched.GetJobRequest) -> sched.Job:
        return self._job(req.name)

    def _list_jobs(self, req: sched.ListJobsRequest) -> sched.ListJobsResponse:
        if not PARENT_RE.fullmatch(req.parent):
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid parent: {req.parent!r}.")
        if req.page_size < 0 or (req.page_token and not req.page_token.isdigit()):
            raise StandinAbort(Code.INVALID_ARGUMENT, "Invalid page_size or page_token.")
        names = sorted(n for n in self._jobs if JOB_RE.fullmatch(n)["parent"] == req.parent)
        start, size = int(req.page_token or 0), min(req.page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
        page = names[start : start + size]
        more = start + size < len(names)
        return sched.ListJobsResponse(
            jobs=[self._jobs[n] for n in page], next_page_token=str(start + size) if more else ""
        )

    def _update_job(self, req: sched.UpdateJobRequest) -> sched.Job:
        current = self._job(req.job.name)
        paths = list(req.update_mask.paths)
        if paths:
            mask = field_mask_pb2.FieldMask(paths=paths)
            if not mask.IsValidForDescriptor(sched.Job.pb().DESCRIPTOR):
                raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid update_mask: {paths}.")
            if bad := sorted({p.split(".")[0] for p in paths} & OUTPUT_ONLY):
                raise StandinAbort(Code.INVALID_ARGUMENT, f"update_mask names output-only fields: {bad}.")
            job = copy_message(current)
            mask.MergeMessage(sched.Job.pb(req.job), sched.Job.pb(job), True, True)
        else:  # no mask: the request replaces every mutable field
            job = copy_message(req.job)
            for field in OUTPUT_ONLY:
                sched.Job.pb(job).ClearField(field)
                if field in current:
                    setattr(job, field, getattr(current, field))
        self._validate(job)
        job.user_update_time = self._now()
        self._jobs[job.name] = job
        return job

    def _delete_job(self, req: sched.DeleteJobRequest) -> empty_pb2.Empty:
        self._job(req.name)
        del self._jobs[req.name]
        return empty_pb2.Empty()

    def _pause_job(self, req: sched.PauseJobRequest) -> sched.Job:
        return self._set_state(req.name, State.ENABLED, State.PAUSED)

    def _resume_job(self, req: sched.ResumeJobRequest) -> sched.Job:
        return self._set_state(req.name, State.PAUSED, State.ENABLED)

    def _set_state(self, name: str, required, new) -> sched.Job:
        job = self._job(name)
        if job.state != required:
            raise StandinAbort(
                Code.FAILED_PRECONDITION, f"Job {name} is {job.state.name}; it must be {required.name} for this call."
            )
        job.state = new
        job.user_update_time = self._now()
        return job

    def fire_due(self) -> list[str]:
        """What the service does by the clock: each ENABLED job whose schedule_time has come is dispatched, then its
        schedule_time moves to the schedule's next firing after it. Job.schedule_time: "The next time the job is
        scheduled"; Job.State.PAUSED: "It will not execute" (google.cloud.scheduler_v1 docstrings). So a cron with
        no year (`M H D Mon *`) fires again a year later. Delivery happens outside the lock, as the service's own
        (so a subscriber may call the stand-in back). Returns the names of the jobs fired."""
        with self._lock:
            now, sends = self._now(), []
            for job in self._jobs.values():
                if job.state == State.ENABLED and "schedule_time" in job and job.schedule_time <= now:
                    sends.append(self._attempt(job))
                    zone = zone_of(job.time_zone)
                    job.schedule_time = croniter(job.schedule, job.schedule_time.astimezone(zone)).get_next(datetime)
        for name, topic, data, attributes in sends:
            status = self._deliver(topic, data, attributes)
            with self._lock:
                if name in self._jobs:
                    self._jobs[name].status = status
        return [name for name, *_ in sends]

    def _run_job(self, req: sched.RunJobRequest) -> sched.Job:
        """Dispatch now (even when paused); a failed publish is recorded in job.status, as the real attempt is."""
        job = self._job(req.name)
        job.status = self._deliver(*self._attempt(job)[1:])
        return job

    def _attempt(self, job: sched.Job) -> tuple[str, str, bytes, dict]:
        target = job.pubsub_target
        run = (job.name, target.topic_name, bytes(target.data), dict(target.attributes))
        job.last_attempt_time = self._now()
        self.runs.append(run)
        return run

    def _deliver(self, topic: str, data: bytes, attributes: dict) -> status_pb2.Status:
        try:
            if self.publish is not None:
                self.publish(topic, data, attributes)
            return status_pb2.Status(code=0)
        except Exception as e:  # the attempt fails, not the RunJob call
            return status_pb2.Status(code=Code.UNKNOWN.value[0], message=f"{type(e).__name__}: {e}")

    def _methods(self):
        return {
            "CreateJob": (self._create_job, sched.CreateJobRequest, sched.Job),
            "GetJob": (self._get_job, sched.GetJobRequest, sched.Job),
            "ListJobs": (self._list_jobs, sched.ListJobsRequest, sched.ListJobsResponse),
            "UpdateJob": (self._update_job, sched.UpdateJobRequest, sched.Job),
            "DeleteJob": (self._delete_job, sched.DeleteJobRequest, empty_pb2.Empty),
            "PauseJob": (self._pause_job, sched.PauseJobRequest, sched.Job),
            "ResumeJob": (self._resume_job, sched.ResumeJobRequest, sched.Job),
            "RunJob": (self._run_job, sched.RunJobRequest, sched.Job),
        }
