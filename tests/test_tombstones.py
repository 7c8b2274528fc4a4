"""A stop-lab wins over an older start-lab: tombstones in real stores (files under DASKLAB_HOME; Firestore through
its emulator, started and stopped here), the rule in the controller, and the publishTime through the entry point."""

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cloudevents.http import CloudEvent

from dasklab import entry
from dasklab.adapters import procs
from dasklab.adapters.firestore import COLLECTION, FirestoreTombstones
from dasklab.adapters.local import LocalBackend
from dasklab.adapters.files import FileTombstones
from dasklab.core import config
from dasklab.core.config import Config
from dasklab.core.errors import TransientError
from dasklab.core.messages import parse_command
from dasklab.core.model import READY, TEARING_DOWN
from dasklab.core.reconcile import Controller
from dasklab.core.tombstones import TOMBSTONE_TTL_S
from dasklab.local.serve import push_envelope
from tests.fakes import FakeBackend, ListEvents

DAY = TOMBSTONE_TTL_S
T0 = 1_800_000_000.0


@pytest.fixture(params=["files", "firestore"])
def store(request, tmp_path):
    return FileTombstones(tmp_path) if request.param == "files" else request.getfixturevalue("firestore_tombstones")


def test_a_tombstone_keeps_the_latest_stop_lab_for_24_hours(store):
    assert store.fetch_stopped("a", T0) is None
    store.apply_stopped("a", T0 + 10, T0 + 10)
    store.apply_stopped("a", T0 + 5, T0 + 20)  # an older stop-lab delivered late never lowers it
    assert store.fetch_stopped("a", T0 + 30) == T0 + 10 and store.fetch_stopped("b", T0 + 30) is None
    assert store.fetch_stopped("a", T0 + 10 + DAY - 1) == T0 + 10
    assert store.fetch_stopped("a", T0 + 10 + DAY) is None  # past Pub/Sub's retry horizon
    store.apply_stopped("a", T0 + 2 * DAY, T0 + 2 * DAY)
    assert store.fetch_stopped("a", T0 + 2 * DAY) == T0 + 2 * DAY


def test_concurrent_stop_labs_keep_the_latest(store):
    times = [T0 + i for i in range(12)]
    threads = [threading.Thread(target=store.apply_stopped, args=("a", t, T0 + 20)) for t in reversed(times)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.fetch_stopped("a", T0 + 30) == max(times)


def test_expired_tombstones_are_pruned_from_disk(tmp_path):
    store = FileTombstones(tmp_path)
    store.apply_stopped("old", T0, T0)
    store.apply_stopped("new", T0 + DAY, T0 + DAY)
    assert sorted(p.stem for p in (tmp_path / "tombstones").glob("*.json")) == ["new"]


def test_firestore_keeps_an_expiry_for_its_ttl_policy(firestore_tombstones):
    firestore_tombstones.apply_stopped("a", T0, T0 + 60)
    doc = firestore_tombstones._db().document(f"{COLLECTION}/a").get().to_dict()
    assert doc["lab"] == "a" and doc["stopped_at"] == T0
    assert doc["expire_at"] == datetime.fromtimestamp(T0 + 60 + DAY, timezone.utc)


def test_firestore_keeps_what_was_reported_across_instances_until_it_expires(firestore_tombstones):
    from dasklab.adapters.firestore import REPORTED_TTL_S, FirestoreReports
    one, other = (FirestoreReports(firestore_tombstones.project) for _ in range(2))  # two function instances
    assert not one.fetch_reported("operation-1", T0)
    one.apply_reported("operation-1", T0)
    assert other.fetch_reported("operation-1", T0 + 60) and not other.fetch_reported("operation-2", T0 + 60)
    assert not other.fetch_reported("operation-1", T0 + REPORTED_TTL_S + 1)


# --- the rule in the controller ----------------------------------------------------------------------

def controller(tombstones):
    clock = [T0 + 100]
    ctl = Controller(FakeBackend(), ListEvents(), Config(poll_s=0, tick_budget_s=0), clock=lambda: clock[0],
                     sleep=lambda s: None, tombstones=tombstones)
    return ctl, clock


def cmd(**body):
    return parse_command(json.dumps({"lab": "a", **body}))


START, STOP = {"type": "start-lab", "owner": "alice"}, {"type": "stop-lab"}


def settle(ctl, clock, passes=12):
    for _ in range(passes):
        clock[0] += 1
        ctl.reconcile_all("reconcile")


def test_a_start_lab_published_before_the_stop_lab_never_creates_the_lab(store):
    ctl, clock = controller(store)
    ctl.handle(cmd(**STOP), "m2", published=T0 + 2)  # overtook the start-lab
    ctl.handle(cmd(**START), "m1", published=T0 + 1)
    settle(ctl, clock)
    assert ctl.backend.labs == {}
    ctl.handle(cmd(**START), "m3", published=T0 + 3)  # a new start-lab starts it again
    assert ctl.backend.fetch_lab("a").state.start_published == T0 + 3


def test_a_start_lab_redelivered_after_its_stop_lab_does_not_recreate_the_lab(store):
    ctl, clock = controller(store)
    ctl.handle(cmd(**START), "m1", published=T0 + 1)
    settle(ctl, clock)
    ctl.handle(cmd(**STOP), "m2", published=T0 + 2)
    settle(ctl, clock)
    assert ctl.backend.labs == {}
    clock[0] += DAY - 200  # redelivered within the 24 h horizon
    ctl.handle(cmd(**START), "m1", published=T0 + 1)
    settle(ctl, clock)
    assert ctl.backend.labs == {}


def test_an_older_stop_lab_leaves_a_newer_lab_alone(tmp_path):
    ctl, clock = controller(FileTombstones(tmp_path))
    ctl.handle(cmd(**START), "m3", published=T0 + 3)
    settle(ctl, clock)
    ctl.handle(cmd(**STOP), "m2", published=T0 + 2)  # published before the start-lab that created the lab
    settle(ctl, clock)
    assert ctl.backend.fetch_lab("a").state.phase == READY


def test_a_newer_start_lab_waits_for_the_teardown_then_creates(tmp_path):
    ctl, clock = controller(FileTombstones(tmp_path))
    ctl.handle(cmd(**START), "m1", published=T0 + 1)
    settle(ctl, clock)
    ctl.handle(cmd(**STOP), "m2", published=T0 + 2)
    if "a" in ctl.backend.labs:
        assert ctl.backend.fetch_lab("a").state.phase == TEARING_DOWN
        with pytest.raises(TransientError, match="being torn down"):  # redelivered by Pub/Sub
            ctl.handle(cmd(**START), "m3", published=T0 + 3)
    settle(ctl, clock)
    ctl.handle(cmd(**START), "m3", published=T0 + 3)
    assert ctl.backend.fetch_lab("a").state.start_published == T0 + 3


class Racing:
    """Tombstones where a stop-lab runs between the start-lab's first look and its create (and finds no lab)."""

    def __init__(self, inner, race):
        self.inner, self.race, self.raced = inner, race, False

    def fetch_stopped(self, lab, now):
        found = self.inner.fetch_stopped(lab, now)
        if not self.raced:
            self.raced = True
            self.race()
        return found

    def apply_stopped(self, lab, published, now):
        self.inner.apply_stopped(lab, published, now)


def test_a_stop_lab_racing_the_create_still_wins(tmp_path):
    ctl, clock = controller(None)
    ctl.tombstones = Racing(FileTombstones(tmp_path), lambda: ctl.handle(cmd(**STOP), "m2", published=T0 + 2))
    created = []
    real = ctl.backend.apply_create
    ctl.backend.apply_create = lambda lab: created.append(lab.name) or real(lab)
    ctl.handle(cmd(**START), "m1", published=T0 + 1)
    assert ctl.tombstones.raced and created == ["a"]  # the stop-lab found no lab: the create went ahead
    lab = ctl.backend.fetch_lab("a")
    assert lab is None or lab.state.phase == TEARING_DOWN  # then its re-read saw the tombstone
    settle(ctl, clock)
    assert ctl.backend.labs == {}


# --- through the entry point: the Pub/Sub publishTime -------------------------------------------------

from tests.test_entry import local_env  # noqa: E402,F401  (the entry point on a local home)


def event(payload, message_id, published: str) -> CloudEvent:
    envelope = push_envelope(payload, message_id)
    envelope["message"]["publishTime"] = published
    return CloudEvent({"type": "google.cloud.pubsub.topic.v1.messagePublished", "id": message_id,
                       "source": "//pubsub.googleapis.com/projects/p/topics/dasklab-control"}, envelope)


def _stamp(base: datetime, micro: int = 0, sec: int = 0) -> str:
    return (base + timedelta(seconds=sec, microseconds=micro)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_the_entry_point_passes_the_publish_time(local_env, caplog):
    from functions import main
    base = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=1)  # tombstones expire: recent times
    main.control(event({"type": "stop-lab", "lab": "late"}, "m2", _stamp(base, micro=2)))
    main.control(event({"type": "start-lab", "lab": "late", "owner": "alice"}, "m1",
                       _stamp(base, micro=1)))  # a microsecond before the stop-lab
    assert LocalBackend(local_env).fetch_lab("late") is None
    line = next(json.loads(r.message) for r in caplog.records if '"action": "start-lab"' in r.message)
    assert line["message_id"] == "m1" and "before the lab's stop-lab" in line["reason"]
    assert (local_env / "tombstones" / "late.json").exists()
    main.control(event({"type": "start-lab", "lab": "late", "owner": "alice"}, "m3", _stamp(base, sec=1)))
    assert LocalBackend(local_env).fetch_lab("late").state.phase == "provisioning"
    main.control(event({"type": "start-lab", "lab": "bad", "owner": "alice"}, "m4", "yesterday"))
    error = next(json.loads(r.message) for r in caplog.records if '"severity": "ERROR"' in r.message)
    assert error["field"] == "message.publishTime" and LocalBackend(local_env).fetch_lab("bad") is None


def test_each_backend_keeps_its_tombstones_in_its_store(tmp_path):
    from dasklab import runtime
    store = runtime.build_tombstones(Config(backend="gke", project="p", firestore_database="labs"))
    assert isinstance(store, FirestoreTombstones) and (store.project, store.database) == ("p", "labs")
    local = runtime.build_tombstones(Config(home=str(tmp_path)))
    assert isinstance(local, FileTombstones) and local.root == tmp_path / "tombstones"
    assert runtime.build_controller(Config(home=str(tmp_path))).tombstones.root == local.root


def test_store_errors_are_classified_and_a_refusing_store_does_not_block_a_stop(tmp_path, caplog):
    from google.api_core import exceptions as gexc
    from dasklab.adapters.firestore import _translate
    from dasklab.core.errors import PermanentError
    for error, kind in [(gexc.PermissionDenied("no"), PermanentError), (gexc.NotFound("no database"), PermanentError),
                        (gexc.ServiceUnavailable("later"), TransientError), (gexc.Aborted("contention"), TransientError),
                        (gexc.DeadlineExceeded("slow"), TransientError), (gexc.TooManyRequests("rate"), TransientError)]:
        assert type(_translate(error, "write")) is kind

    class Refusing:
        def fetch_stopped(self, lab, now):
            return None

        def apply_stopped(self, lab, published, now):
            raise PermanentError("403 Missing or insufficient permissions")

    ctl, clock = controller(Refusing())
    ctl.handle(cmd(**START), "m1", published=T0 + 1)
    settle(ctl, clock)
    ctl.handle(cmd(**STOP), "m2", published=T0 + 2)
    settle(ctl, clock)
    assert ctl.backend.labs == {}  # stopped all the same, and said
    assert any('"action": "tombstone"' in r.message and "insufficient permissions" in r.message
               for r in caplog.records)
