"""Isolation of labs, in both placements: a NetworkPolicy evaluator (tests/netpol.py) checked against the semantics
the Kubernetes documentation gives, then applied to the controller's policies and to what it created for three students
on the GKE world: each student's pods reach their own scheduler and Jupyter, never another student's, neither the
metadata server; the internet and kube-dns stay reachable. And no node credentials: every cluster has Workload
Identity, the GKE metadata server on every pool and nodes running as their own account."""

import json
import time
from dataclasses import replace

import pytest
from google.cloud import container_v1 as gke

from dasklab import runtime
from dasklab.adapters.gke import class_cluster, place_of
from dasklab.adapters.release import build_network_policies, build_release
from dasklab.core.config import Config, check_node_service_account
from dasklab.core.errors import ValidationError
from dasklab.adapters.files import FileClasses
from dasklab.adapters.procs import pid_alive
from dasklab.core.messages import parse_command
from dasklab.core.model import READY, Lab
from dasklab.core.reconcile import Controller

from tests.conftest import make_spec, make_state
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


def drive_class_to_ready(tmp_path, **kw):
    """Three students' labs of class `intro` driven to ready (placed as `kw` says: by default in one shared cluster)."""
    world = World(tmp_path)
    ctl = Controller(world.backend(), type("Events", (), {"publish": lambda self, e: events.append(e)})(), CONFIG,
                     classes=FileClasses(tmp_path))
    events: list[dict] = []
    ctl.handle(start_class(**kw), "m1")
    drive_class(ctl, world, lambda: any(e["event"] == "class-ready" for e in events))
    return world, ctl, events


def close(world) -> None:
    tree = process_tree(world.pids())
    pids = world.close()
    assert not [p for p in pids if pid_alive(p)] and not alive(tree)


@pytest.fixture
def shared_class(tmp_path, firestore_env):
    world, ctl, events = drive_class_to_ready(tmp_path)
    yield world, ctl, events
    close(world)


@pytest.fixture
def own_class(tmp_path, firestore_env):
    """The same class, each student's lab in a cluster of its own, with a worker each."""
    world, ctl, events = drive_class_to_ready(tmp_path, placement="own", workers={"initial": 1, "min": 1, "max": 2})
    yield world, ctl, events
    close(world)


def start_class(**kw):
    return parse_command(json.dumps({"v": 1, "type": "start-class", "class": "intro", "owner": "prof",
                                     "roster": list(STUDENTS), "workers": {"initial": 0, "min": 0, "max": 4},
                                     "machine_type": "e2-standard-4", "worker_resources": {"cpu": 1, "memory": "3G"},
                                     "idle_timeout": "1h", "max_lifetime": "2h", **kw}))


def test_each_students_pods_reach_only_their_own_scheduler_and_jupyter(shared_class):
    world, ctl, events = shared_class
    clusters = [c.rsplit("/", 1)[1] for c in world.gke.clusters]
    assert clusters == [class_cluster("intro")]  # one cluster for the class
    assert_no_node_credentials(world.gke.clusters[f"projects/{PROJECT}/locations/{LOCATION}/clusters/intro--shared"])
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
                own = [p for p in policies if p["metadata"]["namespace"] == source.namespace]
                assert allowed(own, namespaces, source, target, port) is (src == dst)  # refused at the source too
        assert_only_out_to_dns_and_internet(policies, {**namespaces, "kube-system": KUBE_SYSTEM}, source, src)
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


# ---- egress, and what a lab's pods reach outside the cluster ----------------------------------------------------

KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}
KUBE_DNS = Pod("kube-system", {"k8s-app": "kube-dns"}, "10.4.9.10")
METADATA = Pod("outside", {}, "169.254.169.254")  # the metadata server (the GKE metadata server: 169.254.169.252)
GKE_METADATA_SERVER = Pod("outside", {}, "169.254.169.252")
PYPI = Pod("outside", {}, "151.101.64.223")  # an internet address (pypi.org's)
NODE = Pod("outside", {}, "10.128.0.2")  # a VM of the VPC: a node's kubelet (10250)
API_SERVER = Pod("outside", {}, "172.16.0.2")  # a private control plane's endpoint


def lab_pods(world, lab) -> dict[str, Pod]:
    """The chart's pods of a lab in the world, by component (one worker suffices)."""
    ns = place_of(lab).namespace
    found = {}
    for p in world.kube.list("pods", ns):
        component = p["metadata"]["labels"].get("component")
        if component in ("scheduler", "jupyter", "worker"):
            found[component] = Pod(ns, p["metadata"]["labels"], p["status"].get("podIP", ""))
    return found


def assert_only_out_to_dns_and_internet(policies, namespaces, pod: Pod, where: str) -> None:
    """What a chart pod reaches beyond its namespace: kube-dns on 53, the internet; no node, no metadata server."""
    for protocol in ("UDP", "TCP"):
        assert allowed(policies, namespaces, pod, KUBE_DNS, 53, protocol), f"{where} → kube-dns:53/{protocol}"
    for port in (443, 80):
        assert allowed(policies, namespaces, pod, PYPI, port), f"{where} → the internet:{port}"
    for target, port in ((METADATA, 80), (GKE_METADATA_SERVER, 988), (NODE, 10250), (API_SERVER, 443),
                         (KUBE_DNS, 10054), (Pod("kube-system", {"k8s-app": "konnectivity-agent"}, "10.4.9.9"), 8132)):
        assert not allowed(policies, namespaces, pod, target, port), f"{where} → {target.ip}:{port}"


def test_a_labs_pods_reach_their_namespace_dns_and_the_internet_only_and_the_helm_job_is_not_held():
    """build_network_policies evaluated: egress is denied at the source, whatever the other lab's ingress says."""
    namespaces, mine, pods = {"kube-system": KUBE_SYSTEM}, {}, {}
    for i, name in enumerate(("ann", "bob")):
        spec, place = make_spec(name=name), place_of(name)
        mine[name] = build_network_policies(spec, place.release, place.namespace)
        namespaces[place.namespace] = {"kubernetes.io/metadata.name": place.namespace}
        for j, component in enumerate(("scheduler", "worker", "jupyter")):
            pods[(name, component)] = Pod(place.namespace, {"app": "dask", "release": place.release,
                                                            "component": component}, f"10.4.{i}.{j + 2}")
    policies = mine["ann"] + mine["bob"]
    for (src, src_kind), source in pods.items():
        for (dst, kind), target in pods.items():
            for port in (8786, 8787, 8888, 40000):
                assert allowed(policies, namespaces, source, target, port) is (src == dst)
                # the source's own policies alone refuse it: as if the other lab had no ingress policy at all
                assert allowed(mine[src], namespaces, source, target, port) is (src == dst), \
                    f"{src}'s {src_kind} → {dst}'s {kind}:{port}"
        assert_only_out_to_dns_and_internet(policies, namespaces, source, f"{src}'s {src_kind}")
    spec = make_spec(name="ann")
    release = build_release(spec, release="ann", namespace="dasklab-ann", chart_repo="https://helm.dask.org",
                            chart_version="2024.1.1", helm_image="alpine/helm:3.16.3", system_pool="system",
                            worker_pool="workers")
    (job,) = [m for m in release.manifests if m["kind"] == "Job"]
    helm = Pod("dasklab-ann", {**job["spec"]["template"]["metadata"]["labels"], "job-name": job["metadata"]["name"]})
    for target, port in ((API_SERVER, 443), (Pod("outside", {}, "34.118.0.1"), 443), (PYPI, 443), (KUBE_DNS, 53)):
        assert allowed(policies, namespaces, helm, target, port)  # the API server, the chart repository, DNS


def test_the_egress_rule_is_stated_where_it_is_built():
    (egress,) = [p for p in build_network_policies(make_spec(name="ann"), "ann", "dasklab-ann")
                 if "Egress" in p["spec"]["policyTypes"]]
    assert egress["spec"]["podSelector"] == {"matchLabels": {"app": "dask", "release": "ann"}}
    (internet,) = [r for r in egress["spec"]["egress"] if "ipBlock" in r["to"][0]]
    assert internet["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= \
        set(internet["to"][0]["ipBlock"]["except"])


# ---- no node credentials -----------------------------------------------------------------------------------------

def assert_no_node_credentials(cluster: gke.Cluster) -> None:
    assert cluster.workload_identity_config.workload_pool == f"{PROJECT}.svc.id.goog"
    assert cluster.network_config.datapath_provider.name == "ADVANCED_DATAPATH"  # enforces NetworkPolicy
    assert len(cluster.node_pools) == 2
    for pool in cluster.node_pools:
        assert pool.config.workload_metadata_config.mode.name == "GKE_METADATA", pool.name
        assert pool.config.service_account == CONFIG.node_service_account, pool.name


@pytest.mark.parametrize("account", ["", "default", "123456789012-compute@developer.gserviceaccount.com"])
def test_the_nodes_need_an_account_of_their_own(account):
    cfg = Config(backend="gke", project="p", node_service_account=account)
    with pytest.raises(ValidationError, match="DASKLAB_NODE_SERVICE_ACCOUNT") as refused:
        runtime.build_controller(cfg)  # the controller is refused before it builds a client
    assert "Compute Engine default" in str(refused.value)
    ok = "dasklab-nodes@p.iam.gserviceaccount.com"
    assert check_node_service_account(replace(cfg, node_service_account=ok)) == ok


def test_no_cluster_is_created_without_the_nodes_own_account(tmp_path, firestore_env):
    world = World(tmp_path, config=replace(CONFIG, node_service_account=""))
    try:
        backend = world.backend()
        with pytest.raises(ValidationError, match="DASKLAB_NODE_SERVICE_ACCOUNT"):
            backend.apply_create(Lab(make_spec(name="ann"), make_state(phase="requested")))
        assert world.gke.clusters == {} and backend.fetch_labs() == []  # the record went with the refusal
    finally:
        close(world)


@pytest.mark.slow
def test_own_clusters_isolate_each_lab_like_a_shared_one(own_class):
    world, ctl, events = own_class
    labs = {lab.spec.student: lab for lab in ctl.backend.fetch_labs()}
    assert sorted(labs) == list(STUDENTS) and {lab.spec.placement for lab in labs.values()} == {"own"}
    assert {lab.state.phase for lab in labs.values()} == {READY}
    assert len(world.gke.clusters) == 3
    for cluster in world.gke.clusters.values():
        assert_no_node_credentials(cluster)
    namespaces = {n["metadata"]["name"]: n["metadata"]["labels"] for n in world.kube.list("namespaces")}
    namespaces["kube-system"] = KUBE_SYSTEM
    mine = {s: world.kube.list("networkpolicies", place_of(lab).namespace) for s, lab in labs.items()}
    policies = [p for found in mine.values() for p in found]
    pods = {(s, kind): pod for s, lab in labs.items() for kind, pod in lab_pods(world, lab).items()}
    assert len(pods) == 9, sorted(pods)
    ports = {"scheduler": (8786, 8787), "jupyter": (8888,), "worker": (8790, 40000)}
    for (src, src_kind), source in pods.items():
        for (dst, kind), target in pods.items():
            for port in ports[kind]:
                where = f"{src}'s {src_kind} → {dst}'s {kind}:{port}"
                assert allowed(policies, namespaces, source, target, port) is (src == dst), where
                assert allowed(mine[src], namespaces, source, target, port) is (src == dst), where  # egress alone
        assert_only_out_to_dns_and_internet(policies, namespaces, source, f"{src}'s {src_kind}")
    for lab in labs.values():  # and the controller still reaches each scheduler, through the API server's proxy
        ctl.backend.dashboard(lab).fetch_load()
