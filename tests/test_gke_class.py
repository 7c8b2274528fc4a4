"""A class of three students in one shared GKE cluster, through the real clients on the GKE world with real Dask:
one cluster, a namespace, Helm release, token, quota and policies per student; the busy student's lab autoscales
alone; the shared pool removes only empty nodes; an idle lab, and at night the labs not kept alive, go with their
namespaces while the cluster stays; students added later join it; the last lab's teardown deletes the cluster."""

import json
import logging
import time
from dataclasses import replace

import pytest

from dasklab.adapters.gke import class_cluster, place_of
from dasklab.adapters.files import FileClasses
from dasklab.adapters.procs import pid_alive
from dasklab.adapters.release import POOL_LABEL
from dasklab.core.messages import parse_command
from dasklab.core.model import READY, node_hour_usd
from dasklab.core.reconcile import Controller
from distributed import Client

from tests.dask_checks import alive, process_tree
from tests.gke_world import CONFIG, LOCATION, PROJECT, World, drive_class

STUDENTS = ("ann", "bob", "cy")
CLUSTER = f"projects/{PROJECT}/locations/{LOCATION}/clusters/{class_cluster('intro')}"


def msg(**kw):
    return parse_command(json.dumps({"v": 1, **kw}))


def slow_inc(x):
    time.sleep(0.3)
    return x + 1


@pytest.mark.slow
def test_three_students_share_one_cluster(tmp_path, caplog, firestore_env):
    caplog.set_level(logging.INFO, logger="dasklab")
    world, events = World(tmp_path), []
    ctl = Controller(world.backend(), type("Events", (), {"publish": lambda self, e: events.append(e)})(), CONFIG,
                     classes=FileClasses(tmp_path))
    backend = ctl.backend

    def drive(until, timeout=90.0, ticks=("reconcile",)):
        drive_class(ctl, world, until, timeout, ticks)

    def lab(student):
        return backend.fetch_lab(f"intro-{student}")

    def worker_pods(student):
        pods = world.kube.list("pods", f"dasklab-intro-{student}", "component=worker")
        return {p["metadata"]["name"]: p for p in pods}

    try:
        ctl.handle(msg(type="start-class", **{"class": "intro"}, owner="prof", roster=list(STUDENTS),
                       workers={"initial": 1, "min": 1, "max": 4}, machine_type="e2-standard-4",
                       worker_resources={"cpu": 1, "memory": "3G"}, idle_timeout="25s", max_lifetime="2h"), "m1")
        drive(lambda: any(e["event"] == "class-ready" for e in events))
        ctl.handle(msg(type="keep-alive", lab="intro-cy", **{"for": "1h"}), "m2")  # cy stays; bob is left idle

        # one cluster for the class; per student a namespace, a release, a token, a quota, isolation policies
        assert list(world.gke.clusters) == [CLUSTER]
        assert world.gke.clusters[CLUSTER].resource_labels["placement"] == "shared"
        assert sorted(r["namespace"] for r in world.helm_runs) == [f"dasklab-intro-{s}" for s in STUDENTS]
        assert len({r["args"][2] for r in world.helm_runs}) == 3  # three releases
        tokens = {s: world.token(f"dasklab-intro-{s}") for s in STUDENTS}
        assert len(set(tokens.values())) == 3 and all(len(t) >= 32 for t in tokens.values())
        for s in STUDENTS:
            ns = f"dasklab-intro-{s}"
            (quota,) = world.kube.list("resourcequotas", ns)
            # 4 workers + 25 % surge = 5 of 1 CPU, the scheduler and Jupyter twice (0.5 CPU each), the Job 0.1 CPU;
            # their limits: the same memory, CPU up to their slot of the system node (625m each) and 0.5 for the Job
            assert quota["spec"]["hard"] == {"pods": "10", "requests.cpu": "7100m",
                                             "requests.memory": str(5 * 3 * 10**9 + 4 * 10**9 + 256 * 2**20),
                                             "limits.cpu": "8000m",
                                             "limits.memory": str(5 * 3 * 10**9 + 4 * 10**9 + 256 * 2**20)}
            assert quota["status"]["used"]["pods"] == "3"  # scheduler, Jupyter, one worker (the Job's pod ended)
            assert {p["metadata"]["name"] for p in world.kube.list("networkpolicies", ns)} == {
                "dasklab-deny-ingress", "dasklab-same-namespace", "dasklab-api-server-proxy",
                "dasklab-api-server-proxy-jupyter", "dasklab-egress"}
            info = backend.connection_info(lab(s))
            assert info["cluster"] == "intro--shared" and info["namespace"] == ns
            assert "get-credentials intro--shared" in info["credentials"]
            # each pays a third of the class's one system node
            assert lab(s).spec.system_usd_h == pytest.approx(node_hour_usd("e2-standard-4") / 3, abs=1e-6)
        assert len({p["spec"]["nodeName"] for s in STUDENTS for p in worker_pods(s).values()}) == 1  # 3 on a node

        # ann is busy: her lab alone scales up, the pool grows for the class's workers together
        cy_pods = set(worker_pods("cy"))
        with Client(world.scheduler_address("dasklab-intro-ann"), timeout="20s") as client:
            futures = client.map(slow_inc, range(60))
            # the 4th pod runs on a node added for it; a Running pod's worker joins its scheduler a moment later
            drive(lambda: lab("ann").state.target_workers == 4 and [p["status"].get("phase") for p in worker_pods(
                "ann").values()] == ["Running"] * 4 and set(worker_pods("ann")) <= {
                w.name for w in backend.dashboard(lab("ann")).fetch_workers()}, timeout=60)
            assert lab("cy").state.target_workers == 1 and set(worker_pods("cy")) == cy_pods
            pool = world.gke.clusters[CLUSTER].node_pools[1]
            assert sum(backend.migs.target_sizes(list(pool.instance_group_urls)).values()) == 2  # (1 + 1 + 4) / 3

            # a node holding another student's worker is never removed, even if ann's workers on it all retire
            world.sync()
            shared_node = next(p["spec"]["nodeName"] for p in worker_pods("cy").values())
            mine = [p for p in worker_pods("ann").values() if p["spec"]["nodeName"] == shared_node]
            assert mine, "ann has a worker on cy's node"
            addresses = {w.name: w.address for w in backend.dashboard(lab("ann")).fetch_workers()}
            deleted_before = list(world.migs.deleted)
            backend.apply_scale_down(lab("ann"), [addresses[p["metadata"]["name"]] for p in mine], 4 - len(mine))
            assert world.migs.deleted == deleted_before and world.kube.get("nodes", None, shared_node)
            assert not world.kube.get("nodes", None, shared_node)["spec"].get("unschedulable")
            assert set(worker_pods("cy")) == cy_pods and not world.migs.removed_at_random
            assert sum(client.gather(futures)) == sum(range(1, 61))

        # ann's work is over: she scales back to her minimum; only empty nodes leave the pool
        drive(lambda: lab("ann").state.target_workers == 1 and len(worker_pods("ann")) == 1, timeout=90)
        assert set(worker_pods("cy")) == cy_pods and not world.migs.removed_at_random
        ctl.handle(msg(type="keep-alive", lab="intro-ann", **{"for": "1h"}), "m3")

        # bob was idle all along: his lab goes with its namespace; the cluster stays for the others
        drive(lambda: lab("bob") is None, timeout=90, ticks=("reconcile", "teardown-idle"))
        assert any(e["event"] == "lab-deleted" and e["lab"] == "intro-bob" for e in events)
        assert world.kube.get("namespaces", None, "dasklab-intro-bob") is None
        assert list(world.gke.clusters) == [CLUSTER] and lab("ann").state.phase == READY
        assert "dasklab-intro-bob" not in world.schedulers
        assert set(worker_pods("cy")) == cy_pods  # cy's worker never moved

        # two students join: their labs go into the same cluster, and its system pool grows for their schedulers
        ctl.handle(msg(type="start-class", **{"class": "intro"}, owner="prof", roster=[*STUDENTS, "dan", "eve"],
                       workers={"initial": 1, "min": 1, "max": 4}, machine_type="e2-standard-4",
                       worker_resources={"cpu": 1, "memory": "3G"}, idle_timeout="25s", max_lifetime="2h"), "m5")
        drive(lambda: all(getattr(lab(s), "state", None) and lab(s).state.phase == READY for s in ("dan", "eve")))
        assert lab("bob") is None and list(world.gke.clusters) == [CLUSTER]  # bob's lab ended: not recreated
        system = world.gke.clusters[CLUSTER].node_pools[0]
        assert sum(backend.migs.target_sizes(list(system.instance_group_urls)).values()) == 2  # 4 labs, 3 a node

        # the nightly teardown takes the labs not kept alive (dan's, eve's), per lab: the cluster stays for ann and cy
        ctl.reconcile_all("nightly-teardown")
        drive(lambda: lab("dan") is None and lab("eve") is None)
        assert list(world.gke.clusters) == [CLUSTER] and {lab("ann").state.phase, lab("cy").state.phase} == {READY}
        assert world.kube.get("namespaces", None, "dasklab-intro-dan") is None

        # a scale past the maximum the quota was sized for: the quota follows before the workers are asked for
        ctl.handle(msg(type="scale", lab="intro-cy", min=2, max=8), "m6")
        drive(lambda: [p["status"].get("phase") for p in worker_pods("cy").values()] == ["Running"] * 2)
        (quota,) = world.kube.list("resourcequotas", "dasklab-intro-cy")
        assert quota["spec"]["hard"]["pods"] == "15" and quota["spec"]["hard"]["requests.cpu"] == "12100m"

        # the class ends: the last lab's teardown deletes the class's cluster
        ctl.handle(msg(type="stop-class", **{"class": "intro"}), "m4")
        drive(lambda: CLUSTER not in world.gke.clusters and any(e["event"] == "class-deleted" for e in events),
              timeout=90)
        assert not backend.fetch_labs()
        deletions = [r.getMessage() for r in caplog.records if "delete-class-cluster" in r.getMessage()]
        assert len(deletions) >= 1
    finally:
        tree = process_tree(world.pids())
        pids = world.close()
        assert not [p for p in pids if pid_alive(p)] and not alive(tree)


def test_own_placement_stays_available(tmp_path, firestore_env):
    """placement "own": a cluster per student, as before."""
    world, events = World(tmp_path), []
    ctl = Controller(world.backend(), type("Events", (), {"publish": lambda self, e: events.append(e)})(), CONFIG,
                     classes=FileClasses(tmp_path))
    try:
        ctl.handle(msg(type="start-class", **{"class": "intro"}, owner="prof", roster=["ann", "bob"],
                       workers={"initial": 0, "min": 0, "max": 2}, placement="own"), "m1")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(world.gke.clusters) < 2:
            ctl.reconcile_classes()
            time.sleep(0.1)
        assert sorted(c.rsplit("/", 1)[1] for c in world.gke.clusters) == ["intro-ann", "intro-bob"]
        assert {lab.spec.placement for lab in ctl.backend.fetch_labs()} == {"own"}
        assert place_of(ctl.backend.fetch_lab("intro-ann")).cluster == "intro-ann"
    finally:
        world.close()


def test_the_docs_placement_table_is_what_the_cost_model_computes():
    """docs/deploy.md's "Placement of a class" figures are placement_cost's, and the default follows the cheaper."""
    import re
    from pathlib import Path

    from dasklab.core.model import DEFAULT_PLACEMENT, estimate_cost, placement_cost, system_pool_usd_h
    from tests.conftest import make_spec

    own, shared = (placement_cost(p, students=30, hours=3, workers=6) for p in ("own", "shared"))
    section = Path(__file__).parent.parent.joinpath("docs", "deploy.md").read_text().split("## Placement of a class")[1]
    table = section.split("\n\n")[2]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    for key, row in (("control_plane_usd", "control-plane fees"), ("system_nodes_usd", "system nodes (schedulers, "
                                                                                       "Jupyters)"),
                     ("worker_nodes_usd", "worker nodes"), ("total_usd", "**total**")):
        cells = rows[row].split("|")[2:4]  # the figure each cell ends with (the total's comes first)
        figures = [re.findall(r"\$(\d+\.\d\d)", cell)[0 if key == "total_usd" else -1] for cell in cells]
        assert tuple(map(float, figures)) == (own[key], shared[key]), row
    assert (own["clusters"], own["system_nodes"], own["worker_nodes"]) == (30, 30, 60)
    assert (shared["clusters"], shared["system_nodes"], shared["worker_nodes"]) == (1, 10, 60)
    assert DEFAULT_PLACEMENT == "shared" and shared["total_usd"] < own["total_usd"]
    # with 2 workers a student, sharing saves on worker nodes too (the page says 30 vs 20)
    assert (placement_cost("own", 30, 3, 2)["worker_nodes"], placement_cost("shared", 30, 3, 2)["worker_nodes"]) == \
        (30, 20)
    # a shared lab's estimate carries its share of the class cluster's fee
    spec = make_spec(class_name="intro", student="ann", placement="shared", class_size=30)
    assert estimate_cost(spec, 3 * 3600, 0) == pytest.approx(0.10 * 3 / 30)
    assert estimate_cost(make_spec(), 3 * 3600, 0) == pytest.approx(0.30)
    # ... and its workers' fraction of the shared pool's nodes: one worker of three a node is a third of a node
    assert spec.workers_per_node == make_spec().workers_per_node == 3
    assert (spec.node_share(1), spec.node_share(4), make_spec().node_share(1)) == (pytest.approx(1 / 3),
                                                                                  pytest.approx(4 / 3), 1)
    # ... and its share of the system pool, which the page's table counts whole: a lab of its own pays its pool
    node = node_hour_usd("e2-standard-4")
    assert system_pool_usd_h(1, False, "e2-standard-4", 1, 1) == pytest.approx(node, abs=1e-6)  # to the micro-$
    assert round(30 * 3 * system_pool_usd_h(30, True, "e2-standard-4", 1, 1), 2) == shared["system_nodes_usd"]
    assert system_pool_usd_h(2, True, "e2-standard-4", 1, 3) == pytest.approx(3 * node / 2, abs=1e-6)  # 1 a zone
    assert estimate_cost(replace(spec, system_usd_h=0.5), 3600, 0) == pytest.approx(0.10 / 30 + 0.5)


@pytest.mark.slow
def test_a_degraded_class_cluster_loses_only_the_stopped_students_namespace(tmp_path, firestore_env):
    """GKE marks the class's cluster DEGRADED (it runs, but needs the user's action: Cluster.Status). A student's
    stop-lab deletes only that student's namespace; while the cluster's API does not answer the last teardown waits;
    once it answers and no other lab is in it, the last student's teardown deletes the cluster."""
    from dasklab.core.errors import TransientError

    world, events = World(tmp_path), []
    ctl = Controller(world.backend(), type("Events", (), {"publish": lambda self, e: events.append(e)})(), CONFIG,
                     classes=FileClasses(tmp_path))
    backend = ctl.backend
    try:
        ctl.handle(msg(type="start-class", **{"class": "intro"}, owner="prof", roster=["ann", "bob"],
                       workers={"initial": 0, "min": 0, "max": 2}, max_lifetime="2h"), "m1")
        drive_class(ctl, world, lambda: any(e["event"] == "class-ready" for e in events))
        world.gke.degrade(CLUSTER, "Nodes of node pool workers cannot be repaired: user action needed")
        ctl.handle(msg(type="stop-lab", lab="intro-ann"), "m2")
        drive_class(ctl, world, lambda: backend.fetch_lab("intro-ann") is None)
        assert CLUSTER in world.gke.clusters and world.kube.get("namespaces", None, "dasklab-intro-ann") is None
        assert world.kube.get("namespaces", None, "dasklab-intro-bob") is not None
        assert backend.fetch_lab("intro-bob").state.phase == READY
        assert "cluster DEGRADED: Nodes of node pool workers cannot be repaired" in \
            backend.connection_info(backend.fetch_lab("intro-bob"))["cluster_status"]

        real, failed = backend.records.fetch_records, []

        def fail_once(class_name=None):  # the read of the class's records that proves its cluster empty fails once
            if class_name and not failed:
                failed.append(class_name)
                raise TransientError("the lab records did not answer (injected)")
            return real(class_name)

        backend.records.fetch_records = fail_once
        with pytest.raises(TransientError):  # the stop-lab is redelivered
            ctl.handle(msg(type="stop-lab", lab="intro-bob"), "m3")
        assert failed == ["intro"]
        backend.records.fetch_records = real
        assert world.gke.clusters[CLUSTER].status.name == "DEGRADED"  # not deleted on the absence of evidence
        assert backend.fetch_lab("intro-bob").state.phase == "tearing-down"  # nothing lost: retried
        drive_class(ctl, world, lambda: backend.fetch_lab("intro-bob") is None)  # forgotten once its cluster is gone
        assert CLUSTER not in world.gke.clusters
    finally:
        world.close()


@pytest.mark.slow
def test_one_students_values_cannot_take_anothers_share_of_the_system_pool(tmp_path, firestore_env):
    """Fair shares (issue 21): ann's lab asks for a Jupyter of 3 CPU / 12 GB, most of the class's one e2-standard-4
    system node. It runs capped at its slot (625m / 2.5 GiB, said in a note), so bob, who joins later, still gets
    his scheduler and Jupyter on that node (the stand-in's scheduler fits requests to the node's allocatable). Pods
    ann's namespace would add past its quota (limits.* included) are refused; a LimitRange bounds each container."""
    from kubernetes import client as k8s
    from kubernetes.client import ApiException

    world, events = World(tmp_path), []
    world.kube.fit_resources = True  # NodeResourcesFit: each node 4 CPU / 16Gi allocatable
    ctl = Controller(world.backend(), type("Events", (), {"publish": lambda self, e: events.append(e)})(), CONFIG,
                     classes=FileClasses(tmp_path))
    backend = ctl.backend
    template = dict(owner="prof", workers={"initial": 1, "min": 1, "max": 2}, machine_type="e2-standard-4",
                    worker_resources={"cpu": 1, "memory": "3G"}, max_lifetime="2h")
    most = {"cpu": 3, "memory": "12G"}
    greedy = {"jupyter": {"resources": {"requests": most, "limits": most}}}

    def system_pods(student):
        return {p["metadata"]["labels"]["component"]: p for p in world.kube.list("pods", f"dasklab-intro-{student}")
                if p["metadata"]["labels"].get("component") in ("scheduler", "jupyter")}

    def ready(student):
        lab = backend.fetch_lab(f"intro-{student}")
        return lab is not None and lab.state.phase == READY

    try:
        ctl.handle(msg(type="start-class", **{"class": "intro"}, roster=["ann"], values=greedy, **template), "m1")
        drive_class(ctl, world, lambda: ready("ann") and len(system_pods("ann")) == 2)
        assert any(n.startswith("values.jupyter.resources: capped at 0.625 CPU / 2.5 GiB") and "shared by 3 labs" in n
                   for n in backend.fetch_lab("intro-ann").spec.notes)
        # the next students' template asks nothing special; bob joins the same cluster, on the same system node
        ctl.handle(msg(type="start-class", **{"class": "intro"}, roster=["ann", "bob"], **template), "m2")
        drive_class(ctl, world, lambda: ready("bob") and [p["status"].get("phase") for p in system_pods(
            "bob").values()] == ["Running"] * 2, timeout=60)

        system = {n["metadata"]["name"] for n in world.kube.list("nodes", None, f"{POOL_LABEL}={CONFIG.system_pool}")}
        assert len(system) == 1  # two labs: one system node holds them
        for student in ("ann", "bob"):
            for component, pod in system_pods(student).items():
                assert pod["status"]["phase"] == "Running" and pod["spec"]["nodeName"] in system, (student, component)
        (container,) = system_pods("ann")["jupyter"]["spec"]["containers"]
        assert container["resources"] == {"requests": {"cpu": "625m", "memory": "2560Mi"},
                                          "limits": {"cpu": "625m", "memory": "2560Mi"}}
        (container,) = system_pods("bob")["jupyter"]["spec"]["containers"]
        assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1G"},
                                          "limits": {"cpu": "625m", "memory": "1G"}}

        # ann's namespace: its quota caps limits too, sized by the capped values, and a LimitRange bounds a container
        ns = "dasklab-intro-ann"
        (quota,) = world.kube.list("resourcequotas", ns)
        # (2 workers + 1 surge) of 1 CPU / 3 G, the scheduler and Jupyter twice at their limits, the Job's 0.5 / 256Mi
        assert quota["spec"]["hard"]["limits.cpu"] == f"{3000 + 2 * (625 + 625) + 500}m"
        assert quota["spec"]["hard"]["limits.memory"] == str(3 * 3 * 10**9 + 2 * (10**9 + 2560 * 2**20) + 256 * 2**20)
        (limit_range,) = world.kube.list("limitranges", ns)
        assert limit_range["spec"]["limits"][0]["max"] == {"cpu": "1", "memory": str(3 * 10**9)}
        core = k8s.CoreV1Api(world.kube.api_client())

        def extra(name, cpu="1", memory="3G"):
            size = {"cpu": cpu, "memory": memory}
            container = {"name": "c", "image": "ghcr.io/dask/dask:2024.1.0",
                         "resources": {"requests": size, "limits": size}}
            return {"metadata": {"name": name},
                    "spec": {"nodeSelector": {POOL_LABEL: CONFIG.system_pool}, "containers": [container]}}

        with pytest.raises(ApiException) as info:  # a container larger than the lab's largest: LimitRange
            core.create_namespaced_pod(ns, extra("huge", cpu="3", memory="12G"))
        assert info.value.status == 403 and json.loads(info.value.body)["message"] == (
            'pods "huge" is forbidden: [maximum cpu usage per Container is 1, but limit is 3, '
            'maximum memory usage per Container is 3000000000, but limit is 12G]')
        made = 0
        with pytest.raises(ApiException) as info:  # pods past the quota: refused, whatever node they aim at
            for made in range(1, 20):
                core.create_namespaced_pod(ns, extra(f"extra-{made}"))
        assert info.value.status == 403 and "exceeded quota: dasklab-quota" in info.value.body and made > 1
        (quota,) = world.kube.list("resourcequotas", ns)
        for key in ("requests.cpu", "requests.memory", "limits.cpu", "limits.memory"):
            hard, used = (quota["status"][part][key] for part in ("hard", "used"))
            assert parse_quantity(key, used) <= parse_quantity(key, hard), key
        # bob's pods stayed where they were, Running
        assert [p["status"]["phase"] for p in system_pods("bob").values()] == ["Running"] * 2
    finally:
        world.close()


def parse_quantity(key: str, value: str) -> float:
    from dasklab.core.model import parse_cpu, parse_memory
    return parse_cpu(value) if key.endswith("cpu") else parse_memory(value)
