"""The GKE backend's lab records in Firestore (adapters.records) against the real emulator: compare-and-swap on the
document's update time, create-if-absent, forget once, and one unreadable record left out of a listing."""

import json
import uuid

import pytest

from dasklab.adapters.records import LABS, FirestoreLabRecords
from dasklab.core.errors import ConflictError, RecordUnreadable
from dasklab.core.model import Lab
from tests.conftest import make_spec, make_state


@pytest.fixture
def records(firestore_emulator, monkeypatch):
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    return FirestoreLabRecords(f"test-{uuid.uuid4().hex[:12]}")


def lab(name="lab1", **spec):
    return Lab(make_spec(name=name, values={"worker": {"env": [{"name": "TOKEN", "value": "s3cret"}]}}, **spec),
               make_state(phase="provisioning"))


def test_create_is_compare_and_swap_and_a_record_reads_back_whole(records):
    created = records.apply_create(lab())
    assert created.version.startswith("fs:")
    assert records.apply_create(lab()) is None  # another invocation's create: it exists
    again = records.fetch_record("lab1")
    assert again == created and again.spec.values["worker"]["env"][0]["value"] == "s3cret"
    assert records.fetch_record("nobody") is None


def test_a_write_needs_the_version_it_read(records):
    first = records.apply_create(lab())
    second = records.apply_record(first.with_state(phase="installing"))
    assert second.version != first.version and records.fetch_record("lab1") == second
    with pytest.raises(ConflictError):  # a concurrent invocation wrote since `first` was read
        records.apply_record(first.with_state(phase="failed"))
    assert records.fetch_record("lab1").state.phase == "installing"
    with pytest.raises(ConflictError):
        records.apply_forget(first)
    assert records.apply_forget(second) is True
    assert records.apply_forget(second) is False  # another invocation forgot it first
    with pytest.raises(ConflictError):  # a record forgotten meanwhile is not written back
        records.apply_record(second.with_state(phase="ready"))
    assert records.fetch_record("lab1") is None


def test_a_class_s_labs_are_listed_by_their_class(records):
    for name in ("intro-ada", "intro-bob"):
        records.apply_create(lab(name, class_name="intro", placement="shared"))
    records.apply_create(lab("solo"))
    assert [x.name for x in records.fetch_records("intro")[0]] == ["intro-ada", "intro-bob"]
    assert [x.name for x in records.fetch_records()[0]] == ["intro-ada", "intro-bob", "solo"]


def test_an_unreadable_record_is_left_out_of_the_listing_with_its_reason(records):
    for name in ("a", "b", "c"):
        records.apply_create(lab(name))
    db = records._db()
    db.document(f"{LABS}/b").update({"record": "{not json"})
    bad = lab("c").to_dict()
    bad["spec"]["colour"] = "blue"  # a key this version does not know
    db.document(f"{LABS}/c").update({"record": json.dumps(bad)})
    labs, unreadable = records.fetch_records()
    assert [x.name for x in labs] == ["a"]
    assert set(unreadable) == {"b", "c"} and "colour" in unreadable["c"] and unreadable["b"]
    with pytest.raises(RecordUnreadable, match="lab b"):
        records.fetch_record("b")
