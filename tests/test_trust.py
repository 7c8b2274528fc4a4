"""The trust model: plan_authorize's table, and the controller applying it to the sender attribute it receives."""

from dataclasses import replace
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent

from dasklab.adapters.local import LocalBackend
from dasklab.core import config
from dasklab.core.classes import ClassRecord
from dasklab.core.model import Lab, LabSpec, LabState
from dasklab.core.trust import ADMIN, CLASS_OWNER, OWN_START, OWNER, STUDENT, TICKS, plan_authorize
from dasklab.local.serve import push_envelope
from tests.test_entry import ATTRS, local_env, outcomes  # noqa: F401 (a fixture)

ANN, BOB, ROOT = "ann@example.edu", "bob@example.edu", "root@example.edu"
SPEC = LabSpec(name="lab-a", owner=ANN, min_workers=0, max_workers=2, initial_workers=1, machine_type="e2-standard-4",
               worker_cpu=1.0, worker_memory=2**30, idle_timeout_s=600, max_lifetime_s=3600)
ANNS = Lab(SPEC, LabState())
STUDENT_LAB = Lab(replace(SPEC, name="cls-bob", owner="prof@example.edu", class_name="cls", student="bob",
                          student_identity=BOB), LabState())
CLASS = ClassRecord("cls", owner="prof@example.edu", roster=("bob",))


@pytest.mark.parametrize("sender, admin, command, lab, klass, allowed, rule", [
    (ANN, False, {"type": "stop-lab", "lab": "lab-a"}, ANNS, None, True, OWNER),
    (ANN, False, {"type": "scale", "lab": "lab-a", "max": 3}, ANNS, None, True, OWNER),
    (ANN, False, {"type": "update-lab", "lab": "lab-a"}, ANNS, None, True, OWNER),
    (ANN, False, {"type": "keep-alive", "lab": "lab-a"}, ANNS, None, True, OWNER),
    (BOB, False, {"type": "stop-lab", "lab": "lab-a"}, ANNS, None, False, OWNER),
    (BOB, False, {"type": "scale", "lab": "lab-a", "max": 3}, ANNS, None, False, OWNER),
    (BOB, False, {"type": "keep-alive", "lab": "lab-a"}, ANNS, None, False, OWNER),
    (ROOT, True, {"type": "stop-lab", "lab": "lab-a"}, ANNS, None, True, ADMIN),
    (ROOT, True, {"type": "start-lab", "lab": "x", "owner": ANN}, None, None, True, ADMIN),
    (BOB, False, {"type": "start-lab", "lab": "x", "owner": ANN}, None, None, False, OWN_START),
    (BOB, False, {"type": "start-lab", "lab": "x", "owner": BOB}, None, None, True, OWN_START),
    (BOB, False, {"type": "start-lab", "lab": "lab-a", "owner": BOB}, ANNS, None, False, OWNER),
    (BOB, False, {"type": "keep-alive", "lab": "cls-bob"}, STUDENT_LAB, None, True, STUDENT),
    (BOB, False, {"type": "stop-lab", "lab": "cls-bob"}, STUDENT_LAB, None, True, STUDENT),
    (BOB, False, {"type": "scale", "lab": "cls-bob", "max": 3}, STUDENT_LAB, None, False, STUDENT),
    (ANN, False, {"type": "stop-lab", "lab": "cls-bob"}, STUDENT_LAB, None, False, OWNER),
    (BOB, False, {"type": "stop-class", "class": "cls"}, None, CLASS, False, CLASS_OWNER),
    (BOB, False, {"type": "keep-alive", "class": "cls"}, None, CLASS, False, CLASS_OWNER),
    ("prof@example.edu", False, {"type": "stop-class", "class": "cls"}, None, CLASS, True, CLASS_OWNER),
    (BOB, False, {"type": "start-class", "class": "cls", "owner": BOB}, None, CLASS, False, CLASS_OWNER),
    (BOB, False, {"type": "stop-lab", "lab": "nope"}, None, None, True, OWNER),  # its handler says there is none
    (ROOT, True, {"type": "nightly-teardown"}, None, None, False, TICKS),
    (BOB, False, {"type": "reconcile"}, None, None, False, TICKS),
])
def test_who_may_send_what(sender, admin, command, lab, klass, allowed, rule):
    verdict = plan_authorize(sender, admin, command, lab, klass)
    assert (verdict.allowed, verdict.rule) == (allowed, rule), verdict.reason


def send(payload, mid, sender=None):
    from functions import main
    attributes = {"request_id": f"r-{mid}", **({"sender": sender} if sender else {})}
    main.control(CloudEvent(ATTRS, push_envelope(payload, mid, attributes)))
    return {o["message_id"]: o for o in outcomes(Path(config.current().home))}[mid]


def test_the_controller_checks_the_sender_attribute_on_the_records(local_env, monkeypatch):
    monkeypatch.setenv("DASKLAB_ADMINS", ROOT)
    config.current.cache_clear()
    assert send({"type": "start-lab", "lab": "lab-a", "owner": ANN}, "m-1", ANN)["outcome"] == "accepted"
    refused = send({"type": "stop-lab", "lab": "lab-a"}, "m-2", BOB)  # bob is told why, on the status topic
    assert (refused["outcome"], refused["field"], refused["rule"], refused["request_id"]) == (
        "refused", "lab", OWNER, "r-m-2")
    assert "belongs to ann@example.edu, not bob@example.edu" in refused["reason"]
    assert LocalBackend(local_env).fetch_lab("lab-a").state.phase != "tearing-down"
    assert send({"type": "start-lab", "lab": "lab-b", "owner": ANN}, "m-3", BOB)["rule"] == OWN_START
    assert send({"type": "scale", "lab": "lab-a", "max": 3}, "m-4", ROOT)["outcome"] == "done"  # an administrator
    tick = send({"type": "teardown-idle"}, "m-5", BOB)  # a tick on the control topic: refused before any rule
    assert (tick["outcome"], tick["field"], tick["rule"]) == ("refused", "type",
                                                            "ticks are accepted only from the timers' topic")
    assert send({"type": "stop-lab", "lab": "lab-a"}, "m-6", ANN)["outcome"] == "accepted"
    assert LocalBackend(local_env).fetch_lab("lab-a") is None  # ann's own stop: gone
    forged = send({"type": "stop-lab", "lab": "lab-a"}, "m-7", "Not An Identity")
    assert (forged["outcome"], forged["field"]) == ("refused", "message.attributes.sender")


def test_an_identity_owner_still_makes_a_valid_gke_label():
    import re

    from dasklab.adapters.gke.base import build_labels
    from dasklab.core.messages import LABEL_VALUE
    labels = build_labels(ANNS)
    assert labels["owner"] == "ann_example_edu" and re.fullmatch(LABEL_VALUE, labels["owner"])
