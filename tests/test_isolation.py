"""Isolation of the students of a shared class cluster: a NetworkPolicy evaluator (tests/netpol.py) checked against
the semantics the Kubernetes documentation gives, then applied to what the controller created for three students
on the GKE world: each student's pods reach their own scheduler and Jupyter, never another student's."""

import json
import time

import pytest
from dasklab.adapters.gke import class_cluster
from dasklab.adapters.files import FileClasses
from dasklab.adapters.procs import pid_alive
from dasklab.core.messages import parse_command
from dasklab.core.model import READY
from dasklab.core.reconcile import Controller

from tests.dask_checks import alive, process_tree
from tests.gke_world import CONFIG, LOCATION, PROJECT, World, drive_class
from tests.netpol import Pod, allowed, selects

NS = {"a": {"kubernetes.io/metadata.name": "a", "team": "x"}, "b": {"kubernetes.io/metadata.name": "b"}}


def policy(ns, selector=None, ingress=None, egress=None, types=None):
    spec = {"podSelector": selector or {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types:
        spec["policyTypes"] = types
    return {"metadata": {"namespace": ns, "name": "p"}, "spec": spec}


WEB = Pod("a", {"app": "web"}, "10.4.0.2", {"http": 8080})
CLIENT_A = Pod("a", {"app": "client"}, "10.4.0.3")
CLIENT_B = Pod("b", {"app": "client"}, "10.4.1.3")
OUTSIDE = Pod("elsewhere", {}, "203.0.113.9")


@pytest.mark.parametrize("policies, source, target, port, expect", [
    # no policy selects the pod: not isolated, everything reaches it
    ([], CLIENT_B, WEB, 80, True),
    # a policy selecting it with no ingress rule: default deny
    ([policy("a", types=["Ingress"])], CLIENT_A, WEB, 80, False),
    # a policy in another namespace does not select it
    ([policy("b", types=["Ingress"])], CLIENT_A, WEB, 80, True),
    # a policy whose podSelector misses it does not isolate it
    ([policy("a", {"matchLabels": {"app": "db"}}, ingress=[])], CLIENT_A, WEB, 80, True),
    # podSelector alone in a peer: pods of the policy's own namespace only
    ([policy("a", ingress=[{"from": [{"podSelector": {}}]}])], CLIENT_A, WEB, 80, True),
    ([policy("a", ingress=[{"from": [{"podSelector": {}}]}])], CLIENT_B, WEB, 80, False),
    # namespaceSelector alone: every pod of the selected namespaces
    ([policy("a", ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}]}])],
     CLIENT_B, WEB, 80, True),
    # both in one peer: AND ...
    ([policy("a", ingress=[{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}]}])],
     CLIENT_B, WEB, 80, False),
    # ... two peers: OR
    ([policy("a", ingress=[{"from": [{"namespaceSelector": {}}, {"podSelector": {"matchLabels": {"app": "db"}}}]}])],
     CLIENT_B, WEB, 80, True),
    # an empty rule allows everything; policies add up (one allowing suffices)
    ([policy("a", ingress=[]), policy("a", ingress=[{}])], CLIENT_B, WEB, 80, True),
    # ports: number, protocol, named container port, endPort range
    ([policy("a", ingress=[{"ports": [{"port": 80}]}])], CLIENT_B, WEB, 81, False),
    ([policy("a", ingress=[{"ports": [{"port": 80, "protocol": "UDP"}]}])], CLIENT_B, WEB, 80, False),
    ([policy("a", ingress=[{"ports": [{"port": "http"}]}])], CLIENT_B, WEB, 8080, True),
    ([policy("a", ingress=[{"ports": [{"port": 8000, "endPort": 8100}]}])], CLIENT_B, WEB, 8080, True),
    # ipBlock with except
    ([policy("a", ingress=[{"from": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}])], OUTSIDE, WEB, 80, True),
    ([policy("a", ingress=[{"from": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.0/28"]}}]}])],
     OUTSIDE, WEB, 80, False),
    # matchExpressions
    ([policy("a", ingress=[{"from": [{"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["client"]}]}}]}])], CLIENT_A, WEB, 80, True),
    ([policy("a", ingress=[{"from": [{"podSelector": {"matchExpressions": [
        {"key": "app", "operator": "NotIn", "values": ["client"]}]}}]}])], CLIENT_A, WEB, 80, False),
    # egress isolates the source: a policy with egress rules gets "Egress" by default
    ([policy("a", {"matchLabels": {"app": "client"}}, egress=[])], CLIENT_A, WEB, 80, False),
    ([policy("a", {"matchLabels": {"app": "client"}}, egress=[{"to": [{"podSelector": {}}]}])],
     CLIENT_A, WEB, 80, True),
])
def test_evaluator_follows_the_documented_semantics(policies, source, target, port, expect):
    assert allowed(policies, NS, source, target, port) is expect


def test_selector_operators():
    assert selects({}, {}) and selects({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}, {})
    assert not selects({"matchExpressions": [{"key": "x", "operator": "Exists"}]}, {"y": "1"})
    assert not selects({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
                       {"a": "1"})


STUDENTS = ("ann", "bob", "cy")


@pytest.fixture
def shared_class(tmp_path, firestore_env):
    """Three students' labs of class `intro` placed in one shared cluster (the default), driven to ready."""
    world = World(tmp_path)
    ctl = Controller(world.backend(), type("Events", (), {"publish": lambda self, e: events.append(e)})(), CONFIG,
                     classes=FileClasses(tmp_path))
    events: list[dict] = []
    ctl.handle(start_class(), "m1")
    drive_class(ctl, world, lambda: any(e["event"] == "class-ready" for e in events))
    yield world, ctl, events
    tree = process_tree(world.pids())
    pids = world.close()
    assert not [p for p in pids if pid_alive(p)] and not alive(tree)


def start_class(**kw):
    return parse_command(json.dumps({"v": 1, "type": "start-class", "class": "intro", "owner": "prof",
                                     "roster": list(STUDENTS), "workers": {"initial": 0, "min": 0, "max": 4},
                                     "machine_type": "e2-standard-4", "worker_resources": {"cpu": 1, "memory": "3G"},
                                     "idle_timeout": "1h", "max_lifetime": "2h", **kw}))


def test_each_students_pods_reach_only_their_own_scheduler_and_jupyter(shared_class):
    world, ctl, events = shared_class
    clusters = [c.rsplit("/", 1)[1] for c in world.gke.clusters]
    assert clusters == [class_cluster("intro")]  # one cluster for the class
    cluster = world.gke.clusters[f"projects/{PROJECT}/locations/{LOCATION}/clusters/intro--shared"]
    assert cluster.network_config.datapath_provider.name == "ADVANCED_DATAPATH"  # enforces NetworkPolicy
    labs = {lab.spec.student: lab for lab in ctl.backend.fetch_labs()}
    assert sorted(labs) == list(STUDENTS) and {lab.state.phase for lab in labs.values()} == {READY}
    assert {lab.spec.placement for lab in labs.values()} == {"shared"}
    ready = next(e for e in events if e["event"] == "class-ready")
    assert ready["placement"] == "shared (the default)"

    namespaces = {n["metadata"]["name"]: n["metadata"]["labels"] for n in world.kube.list("namespaces")}
    policies = [p for n in namespaces for p in world.kube.list("networkpolicies", n)]
    pods = {}
    for student in STUDENTS:
        ns = f"dasklab-intro-{student}"
        for p in world.kube.list("pods", ns):
            component = p["metadata"]["labels"].get("component")
            if component in ("scheduler", "jupyter"):
                pods[(student, component)] = Pod(ns, p["metadata"]["labels"], p["status"].get("podIP", ""))
    assert len(pods) == 6, sorted(pods)
    ports = {"scheduler": (8786, 8787), "jupyter": (8888,)}
    for (src, src_kind), source in pods.items():
        for (dst, kind), target in pods.items():
            for port in ports[kind]:
                assert allowed(policies, namespaces, source, target, port) is (src == dst), \
                    f"{src}'s {src_kind} → {dst}'s {kind}:{port}"
    # the API server's service proxy (konnectivity-agent in kube-system) reaches the dashboard and Jupyter only
    agent = Pod("kube-system", {"k8s-app": "konnectivity-agent"}, "10.4.9.9")
    namespaces["kube-system"] = {"kubernetes.io/metadata.name": "kube-system"}
    for student in STUDENTS:
        assert allowed(policies, namespaces, agent, pods[(student, "scheduler")], 8787)
        assert not allowed(policies, namespaces, agent, pods[(student, "scheduler")], 8786)
        assert allowed(policies, namespaces, agent, pods[(student, "jupyter")], 8888)
        assert not allowed(policies, namespaces, Pod("kube-system", {"k8s-app": "other"}),
                           pods[(student, "scheduler")], 8787)
    # and the controller still reaches every scheduler through that proxy
    assert all(ctl.backend.dashboard(lab).fetch_load().workers == 0 for lab in labs.values())
