"""Tests for the Cloud Scheduler stand-in, driven through the real CloudSchedulerClient."""

import threading
from datetime import datetime, timezone

import grpc
import pytest
from google.api_core import exceptions
from google.cloud import scheduler_v1 as sched
from google.protobuf import field_mask_pb2

from tests.standins.cloud_scheduler import CloudSchedulerStandin

PARENT = "projects/lab-proj/locations/us-central1"
JOB = f"{PARENT}/jobs/lab-tick"
TOPIC = "projects/lab-proj/topics/dasklab-commands"
NOW = datetime(2026, 1, 15, 10, 0, 30, tzinfo=timezone.utc)
State = sched.Job.State


@pytest.fixture
def published():
    return []


@pytest.fixture
def standin(published):
    s = CloudSchedulerStandin(lambda topic, data, attrs: published.append((topic, data, attrs)), clock=lambda: NOW)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(standin):
    return standin.client()


def job(name=JOB, schedule="*/5 * * * *", data=b'{"cmd":"tick"}', attributes=None, **kw) -> sched.Job:
    target = sched.PubsubTarget(topic_name=kw.pop("topic", TOPIC), data=data, attributes=attributes or {})
    return sched.Job(name=name, schedule=schedule, pubsub_target=target, **kw)


def create(client, parent=PARENT, **kw) -> sched.Job:
    return client.create_job(parent=parent, job=job(**kw))


def update(client, j, paths=None) -> sched.Job:
    mask = field_mask_pb2.FieldMask(paths=paths) if paths is not None else None
    return client.update_job(job=j, update_mask=mask)


# ---- happy paths -------------------------------------------------------------------------------


def test_create_get_list_delete(client):
    j = create(client)
    assert (j.name, j.state, j.time_zone) == (JOB, State.ENABLED, "Etc/UTC")
    assert j.user_update_time == NOW
    assert j.schedule_time == datetime(2026, 1, 15, 10, 5, tzinfo=timezone.utc)
    assert client.get_job(name=JOB) == j
    assert [x.name for x in client.list_jobs(parent=PARENT)] == [JOB]
    client.delete_job(name=JOB)
    with pytest.raises(exceptions.NotFound):
        client.get_job(name=JOB)


def test_schedule_time_follows_the_time_zone(client):
    j = create(client, schedule="0 9 * * *", time_zone="Europe/Paris")
    assert j.schedule_time == datetime(2026, 1, 16, 8, 0, tzinfo=timezone.utc)  # 09:00 CET


def test_name_is_generated_when_omitted(client):
    j = create(client, name="")
    assert j.name.startswith(f"{PARENT}/jobs/")


def test_list_is_per_location_and_paginates(client):
    for i in range(5):
        create(client, name=f"{PARENT}/jobs/j{i}")
    create(client, parent="projects/lab-proj/locations/europe-west1", name="projects/lab-proj/locations/europe-west1/jobs/j9")
    pager = client.list_jobs(request={"parent": PARENT, "page_size": 2})
    assert [x.name.rsplit("/", 1)[1] for x in pager] == ["j0", "j1", "j2", "j3", "j4"]
    assert len(client.list_jobs(request={"parent": PARENT, "page_size": 2}).jobs) == 2
    with pytest.raises(exceptions.InvalidArgument):
        client.list_jobs(request={"parent": PARENT, "page_token": "garbage"})


def test_run_job_publishes_and_records_the_attempt(client, standin, published):
    create(client, attributes={"lab": "ada"})
    j = client.run_job(name=JOB)
    assert published == [(TOPIC, b'{"cmd":"tick"}', {"lab": "ada"})]
    assert j.last_attempt_time == NOW and j.status.code == 0
    assert standin.runs == [(JOB, TOPIC, b'{"cmd":"tick"}', {"lab": "ada"})]


def test_run_job_records_a_failed_publish_in_status(client, standin):
    standin.publish = lambda *a: (_ for _ in ()).throw(RuntimeError("topic missing"))
    create(client)
    j = client.run_job(name=JOB)
    assert j.status.code == grpc.StatusCode.UNKNOWN.value[0] and "topic missing" in j.status.message


def test_pause_resume_and_their_state_rules(client, published):
    create(client)
    assert client.pause_job(name=JOB).state == State.PAUSED
    with pytest.raises(exceptions.FailedPrecondition):
        client.pause_job(name=JOB)
    client.run_job(name=JOB)  # a forced run dispatches even when paused
    assert len(published) == 1
    assert client.resume_job(name=JOB).state == State.ENABLED
    with pytest.raises(exceptions.FailedPrecondition):
        client.resume_job(name=JOB)


# ---- validation rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [f"{PARENT}/jobs/a.b", f"{PARENT}/jobs/a b", f"{PARENT}/jobs/" + "j" * 501, "lab-tick", f"{PARENT}/jobs/x/y"],
    ids=["dot", "space", "501-chars", "bare-id", "extra-segment"],
)
def test_invalid_job_names_are_refused(client, name):
    with pytest.raises(exceptions.InvalidArgument, match="Invalid job name"):
        create(client, name=name)


def test_valid_job_id_characters_and_length(client):
    assert create(client, name=f"{PARENT}/jobs/Ab_9-" + "x" * 495).name.endswith("x")


def test_parent_must_be_valid_and_match_the_job_location(client):
    with pytest.raises(exceptions.InvalidArgument, match="not under parent"):
        create(client, parent="projects/lab-proj/locations/europe-west1")
    with pytest.raises(exceptions.InvalidArgument, match="Invalid parent"):
        create(client, parent="projects/lab-proj")


@pytest.mark.parametrize(
    "schedule",
    ["", "* * * *", "*/5 * * * * *", "@hourly", "every 5 minutes", "61 * * * *", "0 0 L * *", "0 0 * * 1#2",
     "0 0 * foo *"],
)  # fmt: skip
def test_invalid_schedules_are_refused(client, schedule):
    with pytest.raises(exceptions.InvalidArgument, match="Schedule or time zone is invalid"):
        create(client, schedule=schedule)


@pytest.mark.parametrize("schedule", ["* * * * *", "0 9 * jan mon-fri", "0 0 * * 7", "5,35 */2 1-15 * *"])
def test_valid_unix_cron_schedules_are_accepted(client, schedule):
    assert create(client, schedule=schedule).schedule == schedule


def test_utc_is_spelled_as_the_docstring_says(client):
    assert create(client, time_zone="utc").time_zone == "utc"


@pytest.mark.parametrize("tz", ["Mars/Olympus", "UTC ", "Europe/Pariss"])
def test_invalid_time_zones_are_refused(client, tz):
    with pytest.raises(exceptions.InvalidArgument, match="Schedule or time zone is invalid"):
        create(client, time_zone=tz)


def test_target_rules(client):
    with pytest.raises(exceptions.InvalidArgument, match="target"):
        client.create_job(parent=PARENT, job=sched.Job(name=JOB, schedule="* * * * *"))
    with pytest.raises(exceptions.MethodNotImplemented):  # only Pub/Sub targets are modelled
        http = sched.HttpTarget(uri="https://example.com")
        client.create_job(parent=PARENT, job=sched.Job(name=JOB, schedule="* * * * *", http_target=http))
    for topic in ("dasklab-commands", "projects/lab-proj/topics/x", "projects/lab-proj/topics/goog-x"):
        with pytest.raises(exceptions.InvalidArgument, match="topic"):
            create(client, topic=topic)
    with pytest.raises(exceptions.InvalidArgument, match="non-empty data, or at least one attribute"):
        create(client, data=b"")
    assert create(client, data=b"", attributes={"cmd": "tick"})


def test_description_is_limited_to_500_characters(client):
    with pytest.raises(exceptions.InvalidArgument):
        create(client, description="d" * 501)


def test_duplicate_is_already_exists_and_missing_is_not_found(client):
    create(client)
    with pytest.raises(exceptions.AlreadyExists, match=f"Job {JOB} already exists"):
        create(client)
    other = f"{PARENT}/jobs/missing"
    for call in (client.get_job, client.delete_job, client.run_job, client.pause_job, client.resume_job):
        with pytest.raises(exceptions.NotFound):
            call(name=other)
    with pytest.raises(exceptions.NotFound):
        update(client, job(name=other))


# ---- UpdateJob ---------------------------------------------------------------------------------


def test_update_with_mask_changes_only_the_named_fields(client):
    create(client, attributes={"lab": "ada"})
    j = update(client, sched.Job(name=JOB, schedule="0 * * * *"), ["schedule"])
    assert j.schedule == "0 * * * *" and j.pubsub_target.attributes == {"lab": "ada"}
    j = update(client, job(attributes={"lab": "bob"}), ["pubsub_target.attributes"])
    assert dict(j.pubsub_target.attributes) == {"lab": "bob"} and j.schedule == "0 * * * *"


def test_update_without_mask_replaces_the_job_but_keeps_its_state(client):
    create(client, attributes={"lab": "ada"}, description="old")
    client.pause_job(name=JOB)
    j = update(client, job(schedule="0 * * * *"))
    assert j.description == "" and dict(j.pubsub_target.attributes) == {}
    assert j.schedule == "0 * * * *" and j.state == State.PAUSED


def test_update_rejects_bad_masks_and_invalid_results_without_changing_the_job(client):
    before = create(client)
    for paths in (["nonsense"], ["state"], ["name"]):
        with pytest.raises(exceptions.InvalidArgument):
            update(client, sched.Job(name=JOB), paths)
    with pytest.raises(exceptions.InvalidArgument, match="Schedule or time zone is invalid"):
        update(client, sched.Job(name=JOB, schedule="*/30 * * * * *"), ["schedule"])
    with pytest.raises(exceptions.InvalidArgument, match="target"):
        update(client, sched.Job(name=JOB), ["pubsub_target"])
    assert client.get_job(name=JOB) == before


# ---- hooks and lifecycle -----------------------------------------------------------------------


def test_fail_next_calls_and_latency(client, standin):
    standin.fail_next("CreateJob", grpc.StatusCode.PERMISSION_DENIED, "no")
    with pytest.raises(exceptions.PermissionDenied):
        create(client)
    standin.latency_s = 0.02
    create(client)
    assert standin.calls == ["CreateJob", "CreateJob"]
    assert list(standin.jobs) == [JOB]


def test_stop_leaves_no_threads():
    before = set(threading.enumerate())
    with CloudSchedulerStandin() as s:
        s.client().list_jobs(parent=PARENT)
    assert set(threading.enumerate()) - before == set()


def test_jobs_fire_by_the_clock_then_wait_for_the_next_firing(published):
    clock = [NOW]
    with CloudSchedulerStandin(lambda *m: published.append(m), clock=lambda: clock[0]) as s:
        client = s.client()
        create(client, schedule="1 10 15 1 *")  # 10:01 on 15 January: once a year
        create(client, name=f"{PARENT}/jobs/paused", schedule="1 10 15 1 *")
        client.pause_job(name=f"{PARENT}/jobs/paused")
        assert s.fire_due() == [] and published == []
        clock[0] = datetime(2026, 1, 15, 10, 1, 5, tzinfo=timezone.utc)
        assert s.fire_due() == [JOB]  # the paused one does not execute
        assert published == [(TOPIC, b'{"cmd":"tick"}', {})] and s.fire_due() == []
        j = client.get_job(name=JOB)
        assert j.last_attempt_time == clock[0] and j.status.code == 0
        assert j.schedule_time == datetime(2027, 1, 15, 10, 1, tzinfo=timezone.utc)  # a cron has no year
