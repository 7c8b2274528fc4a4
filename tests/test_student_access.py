"""Students reach exactly their own lab: a roster entry's Google account is bound, in that student's namespace only,
to what connecting needs; checked with each student's own token against the Kubernetes stand-in's RBAC, on the GKE
test world with a real Jupyter per lab."""

import base64
import json

import msgspec
import pytest
from kubernetes import client
from kubernetes.client import ApiException

from dasklab.adapters.files import FileClasses
from dasklab.adapters.gke import place_of
from dasklab.adapters.jupyter import JupyterApi
from dasklab.adapters.kube import Kube
from dasklab.adapters.release import STUDENT_ACCESS, TOKEN_KEY, TOKEN_SECRET, build_student_access
from dasklab.core.errors import ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.reconcile import Controller

from tests.gke_world import CONFIG, World, drive_class

pytestmark = pytest.mark.slow  # the slow tier: `pytest -m slow` (.ci/run runs both tiers)

STUDENTS = ("ann", "bob", "cy")
PROF = "prof@example.edu"


def msg(**kw):
    return parse_command(json.dumps({"v": 1, **kw}))


def start_class(roster, **kw):
    return msg(type="start-class", **{"class": "intro"}, owner="prof", roster=list(roster), **kw)


def test_a_roster_entry_may_carry_the_students_google_account():
    cmd = start_class(["ann=Ann@Example.edu", "bob"], owner_identity=PROF)
    assert cmd.roster == ["ann", "bob"]  # the names, as before: the labs are intro-ann and intro-bob
    assert cmd.identities == {"ann": "ann@example.edu"}
    assert cmd.access_of("ann") == ("ann@example.edu", PROF) and cmd.access_of("bob") == (PROF,)
    again = msg(**json.loads(json.dumps({"v": 1, **msgspec.to_builtins(cmd)})))
    assert again.identities == cmd.identities  # the class's stored template reads back the same
    assert start_class(["ann"]).access_of("ann") == ()
    for roster, kw, field in ((["ann", "bob=bob"], {}, "roster[1]"), (["ann=", "bob"], {}, "roster[0]"),
                              (["ann=a@b.c d"], {}, "roster[0]"), (["ann"], {"owner_identity": "prof"},
                                                                   "owner_identity"),
                              (["ann"], {"identities": {"zed": "z@example.edu"}}, "identities.zed")):
        with pytest.raises(ValidationError) as info:
            start_class(roster, **kw)
        assert info.value.field == field, (roster, str(info.value))


def test_the_access_role_grants_connecting_and_nothing_more():
    role, binding = build_student_access("dasklab-intro-ann", "intro-ann", "intro-ann", ("ann@example.edu", PROF))
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": who}
                                   for who in ("ann@example.edu", PROF)]
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == STUDENT_ACCESS
    granted = {(r, v, tuple(rule.get("resourceNames", ()))) for rule in role["rules"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert ("secrets", "get", (TOKEN_SECRET,)) in granted
    assert not {(r, v) for r, v, _ in granted} & {("secrets", "list"), ("pods/exec", "create"), ("pods", "create"),
                                                   ("pods/attach", "create"), ("pods/log", "get")}
    assert all("@" not in v for m in (role, binding) for v in m["metadata"]["labels"].values())


def refused(call, *args, **kwargs):
    with pytest.raises(ApiException) as info:
        call(*args, **kwargs)
    body = info.value.body or ""
    return info.value.status, json.loads(body)["message"] if body.startswith("{") else body


def start_ready_class(world: World, tmp_path) -> Controller:
    """The class of STUDENTS (each with their Google account, PROF its owner's) ready on the GKE world, and a bearer
    token `<who>-token` per person for the Kubernetes stand-in."""
    events = []
    ctl = Controller(world.backend(), type("Events", (), {"publish": lambda self, e: events.append(e)})(), CONFIG,
                     classes=FileClasses(tmp_path))
    ctl.handle(start_class([f"{s}={s}@example.edu" for s in STUDENTS], owner_identity=PROF,
                           workers={"initial": 1, "min": 1, "max": 2}, machine_type="e2-standard-4",
                           worker_resources={"cpu": 1, "memory": "3G"}, max_lifetime="2h"), "m1")
    drive_class(ctl, world, lambda: any(e["event"] == "class-ready" for e in events), timeout=180)
    for who in (*STUDENTS, "prof"):
        world.kube.add_user(f"{who}-token", f"{who}@example.edu")
    return ctl


def test_three_students_each_reach_their_own_lab_and_nothing_else(tmp_path, firestore_env):
    world = World(tmp_path, jupyter=True)
    try:
        ctl = start_ready_class(world, tmp_path)

        def api(who):
            return world.kube.api_client(f"{who}-token")

        def ns(student):
            return f"dasklab-intro-{student}"

        def jupyter_pod(student, who="prof"):
            (pod,) = client.CoreV1Api(api(who)).list_namespaced_pod(ns(student),
                                                                   label_selector="component=jupyter").items
            return pod.metadata.name

        def connects(who, student):
            """Through the API server, as `who`: read the lab's token, then Jupyter's API through the service proxy
            (GET its status, POST a kernel), and the right to port-forward to its pod (SelfSubjectAccessReview)."""
            core = client.CoreV1Api(api(who))
            secret = core.read_namespaced_secret(TOKEN_SECRET, ns(student))
            token = base64.b64decode(secret.data[TOKEN_KEY]).decode()
            assert token == world.token(ns(student))
            lab = ctl.backend.fetch_lab(f"intro-{student}")
            transport = Kube(api(who)).proxy(ns(student), f"{place_of(lab).fullname}-jupyter", "80")
            assert JupyterApi(transport, token).fetch_activity().busy_kernels == 0
            kernel = json.loads(transport.post(f"/api/kernels?token={token}", b"{}"))
            assert kernel["id"] and kernel["execution_state"] in ("starting", "idle", "busy")
            pod = jupyter_pod(student, who)
            review = client.AuthorizationV1Api(api(who)).create_self_subject_access_review({"spec": {
                "resourceAttributes": {"verb": "create", "resource": "pods", "subresource": "portforward",
                                       "namespace": ns(student), "name": pod}}})
            assert review.status.allowed
            # authorized; the stand-in serves no stream and asks for the upgrade a real client makes
            assert refused(core.connect_post_namespaced_pod_portforward, pod, ns(student), ports="8888") == \
                (400, "Upgrade request required")

        for student in STUDENTS:
            connects(student, student)
            # the Role and its binding: the student's account and the owner's, in labels nowhere
            binding = world.kube.get("rolebindings", ns(student), STUDENT_ACCESS)
            assert [s["name"] for s in binding["subjects"]] == [f"{student}@example.edu", PROF]
        # the roster's account is the lab's student: she may stop her own class lab, another student may not
        from dasklab.core.trust import plan_authorize
        ann_lab, stop = ctl.backend.fetch_lab("intro-ann"), {"type": "stop-lab", "lab": "intro-ann"}
        assert ann_lab.spec.student_identity == "ann@example.edu"
        assert plan_authorize("ann@example.edu", False, stop, ann_lab, None).allowed
        assert not plan_authorize("bob@example.edu", False, stop, ann_lab, None).allowed

        ann, bob_pod = client.CoreV1Api(api("ann")), jupyter_pod("bob")
        # bob's Secret, with the API server's words
        assert refused(ann.read_namespaced_secret, TOKEN_SECRET, ns("bob")) == (403, (
            f'secrets "{TOKEN_SECRET}" is forbidden: User "ann@example.edu" cannot get resource "secrets" in API '
            f'group "" in the namespace "{ns("bob")}"'))
        assert refused(ann.list_namespace)[0] == 403
        assert refused(ann.list_namespaced_secret, ns("ann"))[0] == 403  # not even her own namespace's
        assert refused(ann.list_namespaced_pod, ns("bob"))[0] == 403
        for pod_ns, pod in ((ns("bob"), bob_pod), (ns("ann"), jupyter_pod("ann"))):  # no exec at all
            status, message = refused(ann.connect_post_namespaced_pod_exec, pod, pod_ns, command=["sh"])
            assert status == 403 and 'cannot create resource "pods/exec"' in message
        assert refused(ann.connect_post_namespaced_pod_portforward, bob_pod, ns("bob"), ports="8888")[0] == 403
        bob_lab = ctl.backend.fetch_lab("intro-bob")
        with pytest.raises(Exception, match="403"):
            Kube(api("ann")).proxy(ns("bob"), f"{place_of(bob_lab).fullname}-jupyter", "80").get("/api/status")
        pod = {"metadata": {"name": "mine"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        for where in (ns("ann"), ns("bob"), "default"):
            assert refused(ann.create_namespaced_pod, where, pod)[0] == 403
        assert refused(ann.read_namespaced_pod_log, jupyter_pod("ann"), ns("ann"))[0] == 403
        assert refused(client.AppsV1Api(api("ann")).list_namespaced_deployment, ns("ann"))[0] == 403

        # the owner's account connects to every student's lab (to help), with the same limits
        prof = client.CoreV1Api(api("prof"))
        for student in STUDENTS:
            connects("prof", student)
            assert refused(prof.list_namespaced_secret, ns(student))[0] == 403
            assert refused(prof.connect_post_namespaced_pod_exec, jupyter_pod(student), ns(student),
                           command=["sh"])[0] == 403
            assert refused(prof.create_namespaced_pod, ns(student), pod)[0] == 403
        assert refused(prof.list_namespace)[0] == 403
    finally:
        world.close()
