"""Who may connect to a class's labs follows the class's latest start-class: a roster entry that gains, loses or
changes its Google account, or a changed owner_identity, rewrites each student's `dasklab-connect` RoleBinding on the
next class step (compared with the cluster's, written when different); an update-lab keeps it. On the GKE test world,
read through the Kubernetes stand-in's RBAC with each person's own token."""

import json
import time

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from dasklab.adapters.files import FileClasses
from dasklab.adapters.release import STUDENT_ACCESS, TOKEN_SECRET
from dasklab.core.classes import AccessChange, plan_access
from dasklab.core.messages import parse_command
from dasklab.core.model import READY, TEARING_DOWN, Lab, LabState
from dasklab.core.reconcile import Controller
from dasklab.core.trust import plan_authorize

from tests.conftest import make_spec
from tests.gke_world import CONFIG, World, drive_class

PROF, PROF2 = "prof@example.edu", "prof2@example.edu"


def msg(**kw):
    return parse_command(json.dumps({"v": 1, **kw}))


def lab_of(student: str, access=(), identity="", phase=READY) -> Lab:
    return Lab(make_spec(name=f"intro-{student}", owner="prof", class_name="intro", student=student,
                         access=tuple(access), student_identity=identity), LabState(phase=phase))


def test_plan_access_names_each_lab_whose_people_changed():
    labs = {"ann": lab_of("ann", ("ann@x.org", PROF), "ann@x.org"), "bob": lab_of("bob", (PROF,)),
            "cy": lab_of("cy", ("cy@x.org", PROF), "cy@x.org"), "dee": lab_of("dee", (PROF,)),
            "eve": lab_of("eve", ("eve@x.org",), "eve@x.org", phase=TEARING_DOWN), "gone": lab_of("gone", (PROF,))}
    wanted = {"ann": (("ann@y.org", PROF), "ann@y.org"),  # changed
              "bob": (("bob@x.org", PROF), "bob@x.org"),  # gained
              "cy": ((PROF,), ""),  # lost
              "dee": ((PROF,), ""),  # unchanged
              "eve": ((), "")}  # being torn down: left alone; "gone" is off the roster (it is being stopped)
    assert plan_access(wanted, labs) == (
        AccessChange("ann", ("ann@y.org", PROF), "ann@y.org",
                     "the class names other people for this lab: +ann@y.org; -ann@x.org"),
        AccessChange("bob", ("bob@x.org", PROF), "bob@x.org", "the class names other people for this lab: +bob@x.org"),
        AccessChange("cy", (PROF,), "", "the class names other people for this lab: -cy@x.org"))
    # the owner's account changed: every lab, the student's own identity kept
    moved = plan_access({s: ((PROF2,), "") for s in ("bob", "dee")}, labs)
    assert [(c.student, c.access, c.reason) for c in moved] == [
        ("bob", (PROF2,), f"the class names other people for this lab: +{PROF2}; -{PROF}"),
        ("dee", (PROF2,), f"the class names other people for this lab: +{PROF2}; -{PROF}")]
    assert plan_access({"ann": (("ann@x.org", PROF), "ann@x.org")}, labs) == ()


def test_a_resent_start_class_rewrites_who_may_connect_and_an_update_keeps_it(tmp_path, firestore_env):
    world, events = World(tmp_path), []
    ctl = Controller(world.backend(), type("Events", (), {"publish": lambda self, e: events.append(e)})(), CONFIG,
                     classes=FileClasses(tmp_path))

    def start(roster, mid, **kw):
        ctl.handle(msg(type="start-class", **{"class": "intro"}, owner="prof", roster=roster,
                       workers={"initial": 1, "min": 1, "max": 2}, machine_type="e2-standard-4",
                       worker_resources={"cpu": 1, "memory": "3G"}, max_lifetime="2h", **kw), mid,
                   published=time.time())

    def ns(student):
        return f"dasklab-intro-{student}"

    def subjects(student):
        binding = world.kube.get("rolebindings", ns(student), STUDENT_ACCESS)
        return None if binding is None else [s["name"] for s in binding.get("subjects") or ()]

    def reads_token(who, student) -> bool:
        world.kube.add_user(f"{who}-token", who)
        try:
            client.CoreV1Api(world.kube.api_client(f"{who}-token")).read_namespaced_secret(TOKEN_SECRET, ns(student))
            return True
        except ApiException as e:
            assert e.status == 403, e
            return False

    try:
        start(["ann=ann@x.org", "bob", "cy=cy@x.org"], "m1", owner_identity=PROF)
        drive_class(ctl, world, lambda: any(e["event"] == "class-ready" for e in events), timeout=180)
        assert (subjects("ann"), subjects("bob"), subjects("cy")) == (["ann@x.org", PROF], [PROF], ["cy@x.org", PROF])
        assert reads_token("ann@x.org", "ann") and not reads_token("bob@x.org", "bob")

        # ann changes account, bob gains one, cy loses hers, the instructor's account changes
        start(["ann=ann@y.org", "bob=bob@x.org", "cy"], "m2", owner_identity=PROF2)
        drive_class(ctl, world, lambda: subjects("cy") == [PROF2], timeout=60)
        assert (subjects("ann"), subjects("bob")) == (["ann@y.org", PROF2], ["bob@x.org", PROF2])
        assert reads_token("ann@y.org", "ann") and reads_token("bob@x.org", "bob") and reads_token(PROF2, "cy")
        for who, student in (("ann@x.org", "ann"), ("cy@x.org", "cy"), (PROF, "ann"), (PROF, "bob")):
            assert not reads_token(who, student), f"{who} kept access to {student}'s lab"
        ann = ctl.backend.fetch_lab("intro-ann")  # the record too: the trust rules read the student from it
        assert (ann.spec.student_identity, ann.spec.access) == ("ann@y.org", ("ann@y.org", PROF2))
        stop = {"type": "stop-lab", "lab": "intro-ann"}
        assert plan_authorize("ann@y.org", False, stop, ann, None).allowed
        assert not plan_authorize("ann@x.org", False, stop, ann, None).allowed

        # no one named any more: cy's binding goes
        start(["ann=ann@y.org", "bob=bob@x.org", "cy"], "m3")
        drive_class(ctl, world, lambda: subjects("cy") is None, timeout=60)
        assert (subjects("ann"), subjects("bob")) == (["ann@y.org"], ["bob@x.org"])

        # an update-lab keeps the people (and puts back a binding changed behind the controller's back)
        client.RbacAuthorizationV1Api(world.kube.api_client()).patch_namespaced_role_binding(
            STUDENT_ACCESS, ns("ann"), [{"op": "add", "path": "/subjects",
                                         "value": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                                    "name": "mallory@x.org"}]}])
        values = {"worker": {"env": [{"name": "X", "value": "1"}]}}
        ctl.handle(msg(type="update-lab", lab="intro-ann", values=values), "u1")
        drive_class(ctl, world, lambda: ctl.backend.fetch_lab("intro-ann").state.revision == 2, timeout=120)
        assert subjects("ann") == ["ann@y.org"] and not reads_token("mallory@x.org", "ann")
        assert ctl.backend.fetch_lab("intro-ann").spec.access == ("ann@y.org",)
    finally:
        world.close()


@pytest.mark.parametrize("phase", ["provisioning", "requested"])
def test_a_lab_not_installed_yet_gets_its_people_from_its_record(phase):
    """Before the install (no namespace yet) only the record changes: the install reads the binding's subjects
    from it."""
    from dasklab.core.class_reconciler import ClassReconciler

    class Backend:
        written, applied = [], []

        def apply_record(self, lab):
            self.written.append(lab)
            return lab

        def apply_access(self, lab):
            self.applied.append(lab)

    part = ClassReconciler(type("Controller", (), {"backend": Backend()})())
    change = AccessChange("ann", ("ann@y.org",), "ann@y.org", "changed")
    part._apply_access(lab_of("ann", ("ann@x.org",), "ann@x.org", phase=phase), change, "m")
    assert Backend.applied == [] and [w.spec.access for w in Backend.written] == [("ann@y.org",)]


# --- the instructor's table: who connects how ------------------------------------------------------------------

def test_the_class_table_says_who_connects_how_and_shows_tokens_only_when_asked(tmp_path, monkeypatch, capsys):
    """Per student: their account (or none: the instructor connects for them) and the command they run; a lab's
    token, or a Jupyter URL carrying it, only with --show-tokens."""
    from dasklab import cli
    from dasklab.adapters.local import LocalBackend
    from dasklab.core.config import Config
    from dasklab.report import NO_IDENTITY, build_connect_rows

    monkeypatch.setenv("DASKLAB_HOME", str(tmp_path))
    for name in ("DASKLAB_PROJECT", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    ctl = Controller(LocalBackend(tmp_path), type("Events", (), {"publish": lambda self, e: None})(),
                     Config(home=str(tmp_path)), classes=FileClasses(tmp_path))
    ctl.handle(msg(type="start-class", **{"class": "intro"}, owner="prof", roster=["ann=ann@x.org", "bob"],
                   owner_identity=PROF), "m1")
    assert cli.main(["connect", "--class", "intro", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["student"], r["identity"], r["connect"]) for r in rows] == [
        ("ann", "ann@x.org", "dasklab connect --lab intro-ann"), ("bob", NO_IDENTITY, "dasklab connect --lab intro-bob")]
    assert cli.main(["connect", "--class", "intro"]) == 0
    text = capsys.readouterr().out
    assert NO_IDENTITY in text and "dasklab connect --lab intro-bob" in text and PROF in text
    assert "token" not in text

    class Backend:  # a lab whose Jupyter is up: its login URL carries the token
        def connection_info(self, lab):
            return {"jupyter": "http://127.0.0.1:1/lab", "jupyter_token": "kubectl get secret … | base64 -d",
                    "dashboard": "http://127.0.0.1:2/status"}

        def jupyter_login_url(self, lab):
            return "http://127.0.0.1:1/lab?token=SECRET"

    record, labs = ctl.classes.fetch_class("intro"), {"ann": lab_of("ann")}
    hidden = build_connect_rows(record, labs, Backend())
    assert "SECRET" not in json.dumps(hidden) and "jupyter_token" not in hidden[0]
    assert hidden[0]["jupyter"] == "http://127.0.0.1:1/lab" and hidden[1]["phase"] == "gone"
    shown = build_connect_rows(record, labs, Backend(), show_tokens=True)
    assert shown[0]["jupyter"] == "http://127.0.0.1:1/lab?token=SECRET" and "jupyter_token" in shown[0]
    assert cli.main(["connect", "--class", "intro", "--show-tokens"]) == 0
    assert "tokens included: keep this to yourself" in capsys.readouterr().out
