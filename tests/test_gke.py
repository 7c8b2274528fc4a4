"""The core on the GKE backend through the real clients: GKE, Kubernetes and instance-group stand-ins, a fake
helm rendering the chart, and real Dask processes for the scheduler and every worker pod."""

import argparse
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import yaml
from dasklab.adapters.gke import place_of
from dasklab.adapters.procs import pid_alive
from dasklab.core.errors import PermanentError, TransientError, ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.reconcile import Controller
from dasklab.core.model import RECORD_SCHEMA, TEARING_DOWN
from distributed import Client
from google.cloud import container_v1 as gke
from google.cloud.firestore import DELETE_FIELD

from tests.dask_checks import alive, process_tree, recomputed
from tests.gke_world import CONFIG, LOCATION, PROJECT, Crash, World
from tests.standins.dashboard import DashboardStandin
from tests.standins.gke import GKE_VM_LABELS

SEED_VALUES = (Path(__file__).parent.parent / "examples" / "config.yaml").read_text()
PARENT = f"projects/{PROJECT}/locations/{LOCATION}"


class Events:
    def __init__(self):
        self.published: list[dict] = []

    def publish(self, event: dict) -> None:
        self.published.append(event)


def cmd(**kw):
    return parse_command(json.dumps({"v": 1, **kw}))


def start_msg(lab="lab1", **kw):
    base = {"type": "start-lab", "lab": lab, "owner": "alice", "workers": {"initial": 1, "min": 1, "max": 6},
            "machine_type": "e2-standard-4", "worker_resources": {"cpu": 1, "memory": "3G"},
            "idle_timeout": "1s", "max_lifetime": "1h", "values": SEED_VALUES}
    return cmd(**{**base, **kw})


@pytest.fixture
def world(tmp_path, request, firestore_env):
    w = World(tmp_path, **getattr(request, "param", {}))
    yield w
    tree = process_tree(w.pids())  # nannies and the workers they started
    pids = w.close()
    assert not [p for p in pids if pid_alive(p)], "a Dask process survived"
    assert not alive(tree), "a nanny or worker process survived"


@pytest.fixture
def controller(world):
    return Controller(world.backend(), Events(), CONFIG, reports=world.reports())


def handle(ctl, message, mid="m"):
    """Deliver a message as Pub/Sub does: again after a crash (at least once)."""
    for _ in range(20):
        try:
            return ctl.handle(message, mid)
        except Crash:
            continue
    raise AssertionError("never delivered")


def drive(ctl, world, until, timeout=60.0, tick="reconcile"):
    """Reconcile passes (the tick's polling loop), the cloud's glue running between them; a crash ends a pass."""
    deadline, passes = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        world.sync()
        passes += 1
        try:
            ctl.reconcile_all(tick)
        except Crash:
            pass
        world.sync()
        result = until()
        if result:
            return passes
        time.sleep(0.1)
    raise AssertionError(f"not reached in {timeout}s")


def lab_of(ctl, name="lab1"):
    return ctl.backend.fetch_lab(name)


def phase(ctl, name="lab1"):
    lab = lab_of(ctl, name)
    return lab and lab.state.phase


def workers(ctl, name="lab1") -> int:
    return ctl.backend.dashboard(lab_of(ctl, name)).fetch_load().workers


def slow_inc(x):
    time.sleep(0.3)
    return x + 1


REGIONAL = {"config": replace(CONFIG, location="us-central1")}


@pytest.mark.parametrize("world, crashing", [
    pytest.param({}, False, id="zonal-clean"),  # the fast tier's GKE story
    pytest.param({}, True, id="zonal-crash-after-every-kind-of-write", marks=pytest.mark.slow),
    pytest.param(REGIONAL, False, id="regional-clean", marks=pytest.mark.slow)], indirect=["world"])
def test_lab_story_on_gke(world, controller, caplog, crashing):
    caplog.set_level(logging.INFO, logger="dasklab")
    ctl, backend, ns = controller, controller.backend, place_of("lab1").namespace
    parent = f"projects/{PROJECT}/locations/{world.config.location}"
    cluster_name = f"{parent}/clusters/lab1"
    regional = world.config.location == "us-central1"
    world.crashing = crashing
    world.stage = "start"
    world.gke.operation_s = 3.0  # the creation outlasts the start-labs and a first pass, however loaded the machine
    for _ in range(3):  # duplicates: one cluster
        handle(ctl, start_msg())
    if crashing:  # it crashed after the record's creation: the next pass creates the cluster
        drive(ctl, world, lambda: world.gke.clusters)
    assert [c.rsplit("/", 1)[1] for c in world.gke.clusters] == ["lab1"]
    created = world.gke.clusters[cluster_name]
    assert len(created.locations) == (3 if regional else 1)
    exclusion = created.maintenance_policy.window.maintenance_exclusions["dasklab-lab-lifetime"]
    assert exclusion.end_time - exclusion.start_time == timedelta(hours=2)  # max_lifetime 1h + 1h for the teardown
    assert dict(created.resource_labels) == {"managed-by": "dasklab", "lab": "lab1", "owner": "alice"}  # identity only
    assert not created.autopilot.enabled
    pools = {p.name: p for p in created.node_pools}
    assert set(pools) == {"system", "workers"} and not pools["workers"].autoscaling.enabled
    assert pools["workers"].config.machine_type == "e2-standard-4" and pools["workers"].config.disk_type == "pd-balanced"

    world.stage = "provision"
    passes = drive(ctl, world, lambda: phase(ctl) == "ready")
    assert passes >= 3, "creation takes operation polls, then the Helm Job, then the scheduler"
    world.gke.operation_s = 0.3
    ready = [e for e in ctl.events.published if e["event"] == "lab-ready"]
    assert len(ready) == 1 + crashing * (len(ready) - 1)  # a crash may repeat an event, never lose it
    assert "port-forward" in ready[0]["connection"]["dashboard"]
    assert ready[0]["connection"]["dask_version"] == CONFIG.dask_version == "2026.3.0"
    assert lab_of(ctl).version.startswith("fs:")  # the record is in the lab records store (Firestore)
    assert_no_user_text_in_labels(world, lab_of(ctl))

    # the release: one Helm Job (a duplicate is the same Job), values enforced, no public Service
    assert len({run["job"] for run in world.helm_runs}) == 1
    values = world.helm_runs[-1]["values"]
    routes = {e["name"]: e["value"] for e in values["scheduler"]["env"]}["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"]
    assert "distributed.http.scheduler.api" in json.loads(routes)
    services = world.kube.list("services", ns)
    assert services and {s["spec"]["type"] for s in services} == {"ClusterIP"}  # the seed asked for LoadBalancers
    token = world.token(ns)
    assert len(token) >= 43 and token not in json.dumps(world.helm_runs)
    # what the chart rendered: every image at the labs' Dask version, Jupyter's password line empty
    images = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"]
              for d in world.kube.list("deployments", ns) if d["metadata"]["labels"].get("chart")}
    assert images == {"lab1-dask-scheduler": "ghcr.io/dask/dask:2026.3.0", "lab1-dask-worker": "ghcr.io/dask/dask:2026.3.0",
                      "lab1-dask-jupyter": "ghcr.io/dask/dask-notebook:2026.3.0"}
    config = world.kube.get("configmaps", ns, "lab1-dask-jupyter-config")["data"]["jupyter_notebook_config.py"]
    assert "c.NotebookApp.password = ''\n" in config

    world.stage = "scale-up"
    with Client(world.scheduler_address(ns), timeout=20) as client:
        futures = client.map(slow_inc, range(90), pure=False)
        drive(ctl, world, lambda: workers(ctl) == 6)
        assert backend.fetch_requested(lab_of(ctl)) == 6
        if regional:  # one node per zone, then the empty third one is trimmed: 3 workers per e2-standard-4
            drive(ctl, world, lambda: sum(world.gke.zone_counts(cluster_name, "workers").values()) == 2)
        else:
            assert world.gke.node_count(cluster_name, "workers") == 2
        client.gather(futures)

        world.stage = "scale-down"
        retired, before = [], {p["metadata"]["name"]: p["spec"]["nodeName"]
                               for p in world.kube.list("pods", ns, "component=worker")}
        deleted_before, zones = len(world.migs.deleted), {n: g.zone for n, g in world.migs.nodes().items()}
        scale_down = backend.apply_scale_down

        def spy(lab, addresses, target):
            names = {w.address: w.name for w in backend.dashboard(lab).fetch_workers()}
            pods = {p["metadata"]["name"] for p in world.kube.list("pods", ns, "component=worker")}
            try:
                scale_down(lab, addresses, target)
            finally:  # once the replicas are lowered (crash or not), exactly the retired workers' pods went
                gone = pods - {p["metadata"]["name"] for p in world.kube.list("pods", ns, "component=worker")}
                assert gone in (set(), {names[a] for a in addresses})
                retired.extend(gone)

        backend.apply_scale_down = spy
        drive(ctl, world, lambda: workers(ctl) == 1 and backend.fetch_requested(lab_of(ctl)) == 1
              and sum(world.gke.zone_counts(cluster_name, "workers").values()) == 1)
        assert sum(client.gather(futures)) == sum(range(1, 91))  # 0 lost results
        assert recomputed(client) == 0  # on nanny workers, as the chart runs them
        survivors = {p["metadata"]["name"] for p in world.kube.list("pods", ns, "component=worker")}
        assert set(before) - survivors == set(retired) and len(survivors) == 1
        assert world.migs.removed_at_random == []  # GKE never chose a node
        emptied = {before[p] for p in retired} - {before[p] for p in survivors}
        deleted = world.migs.deleted[deleted_before:]
        assert sorted(deleted) == sorted(emptied) and len(emptied) == 1  # exactly the emptied node, in its zone
        assert {zones[n] for n in deleted} <= {g.zone for g in world.migs.groups() if g.pool == "workers"}

    world.stage = "teardown"
    time.sleep(1.2)
    drive(ctl, world, lambda: lab_of(ctl) is None, tick="teardown-idle")
    assert world.gke.clusters == {}
    deleted = [e for e in ctl.events.published if e["event"] == "lab-deleted"]
    assert deleted and deleted[-1]["node_hours"] > 0
    assert "lab-failed" not in [e["event"] for e in ctl.events.published]

    lines = caplog.text + json.dumps(ctl.events.published)
    assert token not in lines, "the Jupyter token leaked into a log line or an event"
    if crashing:
        sites = " ".join(world.crashed)
        for site in ("record create", "create_cluster", "record write", "POST jobs", "POST configmaps", "PATCH pods",
                     "POST proxy /api/v1/retire", "PATCH nodes", "PATCH deployments scale", "delete_instances",
                     "set_node_pool_size", "delete_cluster", "record forget"):
            assert site in sites, f"no crash after {site}: {world.crashed}"


def assert_no_user_text_in_labels(world, lab):
    """The cluster's labels, which GKE copies onto its VMs (and so into billing exports), say whose it is: nothing
    of the chart values (env included), notes or packages is on the cluster or on any of its VMs."""
    def leaves(value):
        if isinstance(value, dict):
            return [x for v in value.values() for x in leaves(v)]
        if isinstance(value, list):
            return [x for v in value for x in leaves(v)]
        return [str(value).lower()] if len(str(value)) >= 4 else []

    written = leaves(lab.spec.values) + leaves(list(lab.spec.notes))
    assert written, "the lab's values hold text to look for"
    clusters = world.gke.clusters
    vms = world.gke.vm_labels()
    assert vms, "the cluster has VMs"
    for labels in [*(dict(c.resource_labels) for c in clusters.values()), *vms.values()]:
        assert set(labels) <= {"managed-by", "lab", "owner", *GKE_VM_LABELS}, labels
        assert not [v for v in labels.values() for text in written if text in v], labels


@pytest.mark.slow
def test_gke_refusals_are_retried_not_failures(world, controller):
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(), "m1")
    with pytest.raises(TransientError, match="Please wait"):  # never a delete while creating
        backend.apply_delete(lab_of(ctl))
    # a stop-lab while creating is recorded at once (the record needs no cluster operation, which GKE would refuse
    # while the creation runs); the teardown waits for the creation, no failure
    ctl.handle(cmd(type="stop-lab", lab="lab1"), "m2")
    assert phase(ctl) == TEARING_DOWN and len(world.gke.clusters) == 1
    ctl.reconcile_all("reconcile")
    assert phase(ctl) == TEARING_DOWN
    drive(ctl, world, lambda: lab_of(ctl) is None)
    ctl.handle(start_msg(), "m3")
    drive(ctl, world, lambda: phase(ctl) == "ready")

    lab = lab_of(ctl)
    world.gke.operation_s = 60.0  # a resize that cannot end between the two calls, however loaded the machine
    backend.apply_workers(lab, 4)  # the resize operation now runs…
    with pytest.raises(TransientError, match="runs on cluster"):
        backend.apply_workers(lab, 7)  # …so another waits
    world.gke.operation_s = 0.3
    world.gke.advance_all()

    other = Controller(world.backend(), Events(), CONFIG)  # a concurrent invocation: conflicts, never doubled
    ctl.handle(cmd(type="stop-lab", lab="lab1"), "m4")
    other.reconcile_all("reconcile")
    drive(ctl, world, lambda: lab_of(ctl) is None)
    lifecycle = [e["event"] for e in ctl.events.published if e["event"] != "command-outcome"]
    assert lifecycle == ["lab-deleted", "lab-ready", "lab-deleted"]
    assert [(e["message_id"], e["outcome"]) for e in ctl.events.published if e["event"] == "command-outcome"] == [
        ("m1", "accepted"), ("m2", "accepted"), ("m3", "accepted"), ("m4", "accepted")]


@pytest.mark.slow
def test_a_start_lab_redelivered_after_its_stop_lab_creates_no_cluster(world, firestore_tombstones):
    """The deployed function's tombstones (Firestore, here its emulator) outlive the lab's cluster."""
    ctl = Controller(world.backend(), Events(), CONFIG, tombstones=firestore_tombstones)
    t0 = time.time()
    ctl.handle(start_msg(), "m1", published=t0)
    drive(ctl, world, lambda: phase(ctl) == "ready")
    for _ in range(20):  # the stop-lab, redelivered while GKE refuses the delete
        try:
            ctl.handle(cmd(type="stop-lab", lab="lab1"), "m2", published=t0 + 1)
            break
        except TransientError:
            world.gke.advance_all()
    drive(ctl, world, lambda: lab_of(ctl) is None)
    assert world.gke.clusters == {}
    ctl.handle(start_msg(), "m1", published=t0)  # Pub/Sub redelivers the start-lab
    ctl.reconcile_all("reconcile")
    assert world.gke.clusters == {} and lab_of(ctl) is None
    ctl.handle(start_msg(), "m3", published=t0 + 2)  # a new start-lab creates it again
    assert phase(ctl) == "provisioning"


def test_failed_cluster_creation_and_failed_release(world, controller):
    ctl = controller
    ctl.handle(start_msg(lab="broken"), "m1")
    (op,) = world.gke.operations
    world.gke.fail_operation(op, "Insufficient regional quota", grpc.StatusCode.RESOURCE_EXHAUSTED)
    drive(ctl, world, lambda: phase(ctl, "broken") == "failed")
    assert ctl.events.published[-1]["event"] == "lab-failed"
    assert "Insufficient regional quota" in ctl.events.published[-1]["reason"]

    world.helm_fails = True
    ctl.handle(start_msg(lab="nochart"), "m2")
    drive(ctl, world, lambda: phase(ctl, "nochart") == "failed")
    failed = ctl.events.published[-1]
    assert failed["lab"] == "nochart" and "INSTALLATION FAILED" in failed["reason"]  # the tail of the Job's log

    drive(ctl, world, lambda: not world.gke.clusters, tick="teardown-idle")  # failed labs are deleted


@pytest.mark.slow
def test_public_jupyter_only_with_source_ranges(world, controller):
    ctl = controller
    ctl.handle(start_msg(expose={"source_ranges": ["203.0.113.0/24"]}), "m1")
    drive(ctl, world, lambda: phase(ctl) == "ready")
    services = {s["metadata"]["name"]: s["spec"] for s in world.kube.list("services", place_of("lab1").namespace)}
    public = {name: spec for name, spec in services.items() if spec["type"] == "LoadBalancer"}
    assert list(public) == ["lab1-dask-jupyter-public"]
    assert public["lab1-dask-jupyter-public"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert public["lab1-dask-jupyter-public"]["selector"]["component"] == "jupyter"
    ctl.handle(cmd(type="stop-lab", lab="lab1"), "m2")
    assert world.kube.get("services", place_of("lab1").namespace, "lab1-dask-jupyter-public") is None
    drive(ctl, world, lambda: lab_of(ctl) is None)


@pytest.mark.slow
def test_scheduler_api_is_reached_only_through_the_authenticated_proxy(world, controller):
    ctl, ns = controller, place_of("lab1").namespace
    ctl.handle(start_msg(), "m1")
    drive(ctl, world, lambda: phase(ctl) == "ready" and workers(ctl) == 1)
    assert {s["spec"]["type"] for s in world.kube.list("services", ns)} == {"ClusterIP"}  # no address outside
    transport = ctl.backend.dashboard(lab_of(ctl)).transport
    assert transport.base == f"/api/v1/namespaces/{ns}/services/lab1-dask-scheduler:lab1-dask-webui/proxy"
    retire = world.kube.url + transport.base + "/api/v1/retire_workers"
    for auth in ({}, {"Authorization": "Bearer not-the-token"}):  # the mutating API, without the identity
        request = urllib.request.Request(retire, data=b'{"n": 1}', method="POST",
                                         headers={"Content-Type": "application/json", **auth})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    time.sleep(1)
    assert workers(ctl) == 1  # nothing was retired
    proxied = [path for method, path in world.kube.requests if "/proxy/" in path]
    assert proxied and all(path.startswith(transport.base) for path in proxied)


def test_unmanaged_clusters_are_never_touched(world, controller):
    ctl = controller
    theirs = gke.Cluster(name="theirs", resource_labels={"team": "data"}, node_pools=[gke.NodePool(
        name="default", initial_node_count=1, config=gke.NodeConfig(machine_type="e2-standard-4"))])
    world.gke.client().create_cluster(parent=PARENT, cluster=theirs)
    world.gke.advance_all()
    assert ctl.backend.fetch_labs() == []
    for message in (cmd(type="stop-lab", lab="theirs"), start_msg(lab="theirs"),
                    cmd(type="scale", lab="theirs", max=2)):
        with pytest.raises(PermanentError, match="not managed by dasklab"):
            ctl.handle(message, "m")
    for tick in ("reconcile", "teardown-idle", "nightly-teardown"):
        ctl.reconcile_all(tick)
    assert not {"DeleteCluster", "SetLabels", "SetNodePoolSize"} & set(world.gke.calls)
    assert list(world.gke.clusters) == [f"{PARENT}/clusters/theirs"]


def test_from_config_reaches_kubernetes_without_gcloud(monkeypatch, tmp_path):
    """Real clients from google.auth.default(); Kubernetes from the cluster's endpoint and CA certificate and a
    token refreshed once it is no longer valid (no gcloud, no kubeconfig)."""
    import base64

    import google.auth
    from dasklab.adapters.gke import GkeBackend
    from dasklab.core.config import Config
    from google.auth import credentials as ga_credentials

    class Creds(ga_credentials.Credentials):
        refreshes = 0

        def refresh(self, request):
            Creds.refreshes += 1
            self.token = f"token-{Creds.refreshes}"

        @property
        def valid(self):
            return self.token is not None and not getattr(self, "stale", False)

    creds = Creds()
    monkeypatch.setattr(google.auth, "default", lambda scopes=None: (creds, "p"))
    backend = GkeBackend.from_config(Config(backend="gke", project=PROJECT, location=LOCATION,
                                            node_service_account="nodes@p.iam.gserviceaccount.com"))
    ca = b"-----BEGIN CERTIFICATE-----\nZGFza2xhYg==\n-----END CERTIFICATE-----\n"
    cluster = gke.Cluster(name="lab1", endpoint="192.0.2.10",
                          master_auth=gke.MasterAuth(cluster_ca_certificate=base64.b64encode(ca).decode()))
    api = backend._kube_for(cluster)
    conf = api.configuration
    assert conf.host == "https://192.0.2.10" and Path(conf.ssl_ca_cert).read_bytes() == ca
    assert conf.api_key == {"authorization": "Bearer token-1"}
    assert backend._kube_for(cluster) is api and Creds.refreshes == 1  # still valid: no refresh
    creds.stale = True
    backend._kube_for(cluster)
    assert Creds.refreshes == 2 and conf.api_key == {"authorization": "Bearer token-2"}
    api.close()
    Path(conf.ssl_ca_cert).unlink()


def pin(ctl, n, mid="pin"):
    handle(ctl, cmd(type="scale", lab="lab1", pin=n), mid)


@pytest.mark.parametrize("strategy", ["surge", "blue-green"])
@pytest.mark.slow
def test_an_upgrade_in_the_middle_of_a_scale_down_converges_through_renamed_nodes(world, controller, strategy):
    """GKE upgrades the worker pool (a repair or an upgrade the exclusion does not hold off) right after the
    controller cordoned the emptied node: the upgrade replaces nodes under new names (surge) or moves them to new
    instance groups (blue-green). The lab ends with its workers, no result lost, and no empty node left."""
    ctl, backend, ns = controller, controller.backend, place_of("lab1").namespace
    cluster = f"{PARENT}/clusters/lab1"
    handle(ctl, start_msg())
    drive(ctl, world, lambda: phase(ctl) == "ready")
    pin(ctl, 6)
    drive(ctl, world, lambda: workers(ctl) == 6 and world.gke.node_count(cluster, "workers") == 2)
    before = set(world.migs.nodes())
    upgrades = []

    def upgrade_after_cordon(site):
        if site == "PATCH nodes" and not upgrades:
            upgrades.append(world.gke.start_upgrade(cluster, "workers", strategy=strategy, duration_s=4))

    world.on_write = upgrade_after_cordon
    with Client(world.scheduler_address(ns), timeout=20) as client:
        futures = client.map(slow_inc, range(12), pure=False)
        assert sum(client.gather(futures)) == sum(range(1, 13))
        pin(ctl, 1)
        assert upgrades, "the scale-down cordoned no node"
        with pytest.raises(TransientError, match="is currently upgrading cluster lab1|runs on cluster lab1"):
            backend.apply_workers(lab_of(ctl), 15)  # 5 nodes: a resize, which waits for GKE's own operation
        def state():
            return (world.gke.operations[upgrades[0]].status == gke.Operation.Status.DONE, workers(ctl),
                    backend.fetch_requested(lab_of(ctl)), world.gke.zone_counts(cluster, "workers"),
                    [n["metadata"]["name"] for n in world.kube.list("nodes", None, "dasklab/removing")])

        try:
            drive(ctl, world, lambda: (s := state())[0] and s[1:3] == (1, 1) and sum(s[3].values()) == 1
                  and not s[4], timeout=90)
        except AssertionError as e:
            raise AssertionError(f"{e}: (upgrade done, workers, requested, nodes per zone, marked) = {state()}")
        assert sum(client.gather(futures)) == sum(range(1, 13))  # 0 lost (recomputed if a node went)
    after = set(world.migs.nodes())
    assert not (after & before) - {n for n in before if n.startswith(("gke-lab1-system",))} or strategy == "surge"
    workers_left = [n for n, g in world.migs.nodes().items() if g.pool == "workers"]
    assert len(workers_left) == 1 and workers_left[0] not in before  # a renamed node
    assert world.migs.removed_at_random == []  # GKE never chose a node to drop for a resize
    assert len(world.gke.clusters[cluster].node_pools[1].instance_group_urls) == 1


@pytest.mark.parametrize("kind", ["rate-limit", "too-many-requests"])
@pytest.mark.slow
def test_compute_rate_limits_are_retried_with_backoff(world, controller, kind, caplog):
    caplog.set_level(logging.INFO, logger="dasklab")
    ctl, cluster = controller, f"{PARENT}/clusters/lab1"
    handle(ctl, start_msg())
    drive(ctl, world, lambda: phase(ctl) == "ready")
    pin(ctl, 6)
    drive(ctl, world, lambda: workers(ctl) == 6 and world.gke.node_count(cluster, "workers") == 2)
    world.migs.fail_next("deleteInstances", kind, times=2)
    from dasklab.core.errors import RateLimited
    with pytest.raises(RateLimited, match="rate limited"):  # the message is redelivered
        ctl.handle(cmd(type="scale", lab="lab1", pin=3), "pin")
    started = time.monotonic()
    drive(ctl, world, lambda: world.gke.node_count(cluster, "workers") == 1 and workers(ctl) == 3, timeout=60)
    assert world.migs.refused == [kind, kind] and phase(ctl) == "ready"
    assert "rate limited, next try in 10s" in caplog.text  # a pass met it again: that lab waits, the pass goes on
    assert time.monotonic() - started >= 9  # not hammered at every poll


@pytest.mark.slow
def test_a_compute_permission_refusal_on_deleting_a_node_holds_the_node_not_the_lab(world, controller, caplog):
    """Compute 403 on deleteInstances (the scale-down's permission, not the lab's): StepRefused. The node is held
    (cordoned, not deleted), the lab stays ready and says why; once the permission is back the node goes."""
    caplog.set_level(logging.INFO, logger="dasklab")
    ctl, cluster = controller, f"{PARENT}/clusters/lab1"
    handle(ctl, start_msg())
    drive(ctl, world, lambda: phase(ctl) == "ready")
    pin(ctl, 6)
    drive(ctl, world, lambda: workers(ctl) == 6 and world.gke.node_count(cluster, "workers") == 2)
    world.migs.fail_next("deleteInstances", "permission", times=3)
    pin(ctl, 3)  # recorded; its step's refusal holds the node and is said (lab-degraded), not the scale's
    drive(ctl, world, lambda: world.migs.refused == ["permission"] * 3)
    held = [n["metadata"]["name"] for n in world.kube.list("nodes", None, "dasklab/removing")]
    assert len(held) == 1 and world.kube.get("nodes", None, held[0])["spec"]["unschedulable"]  # held, cordoned
    assert held[0] not in world.migs.deleted and phase(ctl) == "ready" and workers(ctl) == 3
    assert "compute.instanceGroupManagers.update" in caplog.text and "the node(s) stay, cordoned" in caplog.text
    [said] = [e for e in ctl.events.published if e["event"] == "lab-degraded" and "refused" in e["causes"]]  # once
    assert said["causes"] == ["refused"] and "the node(s) stay, cordoned" in said["reason"]
    drive(ctl, world, lambda: world.gke.node_count(cluster, "workers") == 1)  # the permission is back: it goes
    assert held[0] in world.migs.deleted and phase(ctl) == "ready"
    assert not [e for e in ctl.events.published if e["event"] in ("lab-failed", "lab-deleted")]


@pytest.mark.parametrize("world", [{"namespace_termination_s": 3.0}], indirect=True)
@pytest.mark.slow
def test_vanished_pods_and_nodes_are_done_and_a_terminating_namespace_is_waited_out(world, controller):
    """Everyday races that must not fail a lab: a pod or a node gone between the list and the patch (404 — a Spot VM
    reclaimed) is done; a create into a namespace being deleted (403 NamespaceLifecycle) waits until it is gone."""
    ctl, cluster, ns = controller, f"{PARENT}/clusters/lab1", place_of("lab1").namespace
    handle(ctl, start_msg())
    drive(ctl, world, lambda: phase(ctl) == "ready")
    pin(ctl, 6)
    drive(ctl, world, lambda: workers(ctl) == 6 and world.gke.node_count(cluster, "workers") == 2)
    world.kube.fail_next("PATCH", f"/namespaces/{ns}/pods/", 404)  # the first pod annotated: gone
    world.kube.fail_next("PATCH", "/api/v1/nodes/", 404)  # the first node cordoned: gone
    pin(ctl, 1)
    drive(ctl, world, lambda: workers(ctl) == 1 and world.gke.node_count(cluster, "workers") == 1)
    assert phase(ctl) == "ready" and not [e for e in ctl.events.published if e["event"] == "lab-failed"]
    assert not world.kube.handler.failures  # both were met

    lab = lab_of(ctl)
    world.admin.delete_namespace(ns)  # e.g. the namespace of an earlier lab of that name, still being deleted
    with pytest.raises(TransientError, match="being terminated"):
        ctl.backend.apply_install(lab)
    deadline = time.monotonic() + 20
    while world.kube.get("namespaces", None, ns) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
        ctl.backend.fetch_infra(lab)  # requests: the stand-in finalizes the namespace when it is due
    ctl.backend.apply_install(lab)  # gone: the install goes on
    assert world.kube.get("namespaces", None, ns)["status"]["phase"] == "Active"


@pytest.mark.slow
def test_a_degraded_cluster_keeps_its_ready_lab_autoscaling_and_status_says_why(world, controller, monkeypatch,
                                                                                capsys):
    """DEGRADED: the cluster "requires user action to restore full functionality" (Cluster.Status docstring) but
    runs. The lab stays ready, scales on, and `dasklab status` says DEGRADED with GKE's status message."""
    from dasklab import cli, runtime
    ctl, cluster = controller, f"{PARENT}/clusters/lab1"
    handle(ctl, start_msg())
    drive(ctl, world, lambda: phase(ctl) == "ready")
    why = "Nodes of node pool workers cannot be repaired: check the node service account's permissions"
    world.gke.degrade(cluster, why)
    pin(ctl, 4)
    drive(ctl, world, lambda: workers(ctl) == 4)
    assert world.gke.clusters[cluster].status.name == "DEGRADED" and phase(ctl) == "ready"
    assert not [e for e in ctl.events.published if e["event"] in ("lab-failed", "lab-deleted")]
    infra = ctl.backend.fetch_infra(lab_of(ctl))
    assert (infra.cluster, infra.release) == ("running", "deployed") and f"cluster DEGRADED: {why}" in infra.detail
    monkeypatch.setattr(runtime, "build_backend", lambda cfg: ctl.backend)
    monkeypatch.setattr(runtime, "build_classes", lambda cfg: type("NoClasses", (), {"fetch_classes": list})())
    assert cli.cmd_status(argparse.Namespace(json=False, class_=None), CONFIG) == 0
    assert f"lab1: cluster DEGRADED: {why}" in capsys.readouterr().out
    world.gke.recover(cluster)
    ctl.backend.fetch_labs()
    assert "cluster_status" not in ctl.backend.connection_info(lab_of(ctl))


@pytest.mark.slow
def test_a_create_refused_for_quota_publishes_lab_failed_naming_the_quota(world, controller):
    ctl = controller
    quota = ("Insufficient regional quota to satisfy request: resource \"CPUS\": request requires '12.0' and is "
             "short '4.0'. project has a quota of '8.0' with '8.0' available.")
    world.gke.fail_next("CreateCluster", grpc.StatusCode.PERMISSION_DENIED, quota)
    with pytest.raises(PermanentError, match='resource "CPUS"'):
        ctl.handle(start_msg(), "m1")
    (failed,) = ctl.events.published
    assert failed["event"] == "lab-failed" and 'resource "CPUS"' in failed["reason"] and failed["owner"] == "alice"
    world.gke.fail_next("SetNodePoolSize", grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "Quota exceeded for quota metric 'Mutate requests' and limit 'Mutate requests per minute'")
    ctl.handle(start_msg(), "m2")
    drive(ctl, world, lambda: phase(ctl) == "ready")
    from dasklab.core.errors import RateLimited
    with pytest.raises(RateLimited):
        ctl.backend.apply_workers(lab_of(ctl), 6)
    ctl.backend.apply_workers(lab_of(ctl), 6)  # the next try goes through


@pytest.mark.parametrize("world", [{"error_cluster_ttl_s": 0.5}], indirect=True)
def test_a_failed_create_publishes_lab_failed_once_even_when_gke_removed_the_cluster_first(world, controller):
    ctl = controller
    ctl.handle(start_msg(lab="broken"), "m1")
    (op,) = world.gke.operations
    world.gke.fail_operation(op, "Insufficient regional quota to satisfy request: resource \"CPUS\"",
                             grpc.StatusCode.PERMISSION_DENIED)
    deadline = time.monotonic() + 20
    while world.gke.clusters and time.monotonic() < deadline:  # the controller is away; GKE removes the cluster
        time.sleep(0.1)
    assert not world.gke.clusters, "GKE kept the ERROR cluster"
    creates = world.gke.calls.count("CreateCluster")
    for _ in range(5):
        ctl.reconcile_all("reconcile")
    failed = [e for e in ctl.events.published if e["event"] == "lab-failed"]
    assert len(failed) == 1 and failed[0]["lab"] == "broken" and 'resource "CPUS"' in failed[0]["reason"]
    assert world.gke.calls.count("CreateCluster") == creates and not world.gke.clusters  # never re-created
    fresh = Controller(world.backend(), Events(), CONFIG)  # a new function instance: it knows from the store
    fresh.reconcile_all("reconcile")
    assert not [e for e in fresh.events.published if e["event"] == "lab-failed"]


class OddDashboard(DashboardStandin):
    """A scheduler dashboard of another shape: its counts.json lacks `processing` (a key the controller reads)."""

    def _get(self, ns: str, path: str):
        answer = super()._get(ns, path)
        return {k: v for k, v in answer.items() if k != "processing"} if path == "/json/counts.json" else answer


@pytest.mark.slow
def test_poisoned_records_of_each_kind_are_contained_and_the_healthy_labs_autoscale_and_tear_down(world, controller):
    """Issue 20 on the GKE path: among healthy ready labs, a record that is not JSON, one with a spec key this
    version lacks, one of a newer schema, a document without its record field, and a lab whose step raises an
    unexpected exception (its scheduler Service routes to a dashboard of another shape). Each is contained: said
    once in lab-degraded (not again by a new instance), its record and cluster left as they are though it is idle.
    The busy lab autoscales from its real scheduler's load, the idle one is torn down by the teardown-idle tick, a
    reconcile tick completes, and the teardown tick is redelivered only for the lab whose step raised."""
    ctl, db = controller, world.records()._db()
    poisoned = ("bad-json", "unknown-key", "newer", "no-record", "buggy")
    sizes = {"busy": (1, 3), "idle": (1, 3)}  # the poisoned ones run no worker: fewer processes, the same story
    for name in ("busy", "idle", *poisoned):
        least, most = sizes.get(name, (0, 3))
        ctl.handle(start_msg(lab=name, idle_timeout="1h" if name == "busy" else "1s",
                             workers={"initial": least, "min": least, "max": most}), name)
    drive(ctl, world, lambda: all(phase(ctl, n) == "ready" for n in ("busy", "idle", *poisoned)), timeout=180)

    records = {n: lab_of(ctl, n).to_dict() for n in ("unknown-key", "newer")}  # what other writers left
    records["unknown-key"]["spec"]["gpu"] = "nvidia-l4"
    records["newer"]["schema"] = RECORD_SCHEMA + 1
    for name, text in (("bad-json", "{\"spec\": {"), *((n, json.dumps(r)) for n, r in records.items())):
        db.document(f"dasklab-labs/{name}").update({"record": text})
    db.document("dasklab-labs/no-record").update({"record": DELETE_FIELD})
    odd = OddDashboard(world.kube).start()
    try:
        world.kube.register_service_backend(place_of("buggy").namespace, "buggy-dask-scheduler", 80,
                                            odd.add(place_of("buggy").namespace))
        stored = {n: db.document(f"dasklab-labs/{n}").get().to_dict() for n in poisoned}
        busy = place_of("busy").namespace
        with Client(world.scheduler_address(busy), timeout=20) as client:
            futures = client.map(slow_inc, range(60), pure=False)
            passes = drive(ctl, world, lambda: workers(ctl, "busy") == 3, timeout=120)  # scaled up from its load
            assert ctl.backend.fetch_requested(lab_of(ctl, "busy")) == 3
            assert sum(client.gather(futures)) == sum(range(1, 61))
        assert [lab.name for lab in ctl.backend.fetch_labs()] == ["buggy", "busy", "idle"]
        assert set(ctl.backend.unreadable) == {("lab", n) for n in poisoned if n != "buggy"}
        time.sleep(1.2)  # every lab but the busy one idle past its timeout (a reconcile tick would end them too)
        with pytest.raises(TransientError, match="retry for buggy$"):  # every other lab done with
            ctl.handle(cmd(type="teardown-idle"), "idle-tick")
        assert phase(ctl, "idle") == TEARING_DOWN and phase(ctl, "busy") == "ready"
        drive(ctl, world, lambda: lab_of(ctl, "idle") is None)
        ctl.handle(cmd(type="reconcile"), "tick")  # a reconcile tick completes
        assert phase(ctl, "buggy") == "ready"
        assert {c.rsplit("/", 1)[1] for c in world.gke.clusters} == {"busy", *poisoned}  # the idle ones left alone
        assert {n: db.document(f"dasklab-labs/{n}").get().to_dict() for n in poisoned} == stored  # never written
    finally:
        odd.stop()
    events = ctl.events.published
    degraded = {}
    for e in events:
        if e["event"] == "lab-degraded" and e["lab"] in poisoned:
            degraded.setdefault(e["lab"], []).append(e["reason"])
    assert passes >= 2 and {n: len(said) for n, said in degraded.items()} == dict.fromkeys(poisoned, 1)  # once each
    said = {n: s[0] for n, s in degraded.items()}
    assert "Expecting" in said["bad-json"] and "unknown key(s) gpu" in said["unknown-key"]
    assert f"schema {RECORD_SCHEMA + 1}" in said["newer"] and "no record field" in said["no-record"]
    assert said["buggy"] == "KeyError: 'processing'"
    assert not [e for e in events if e["event"] == "lab-failed"]
    assert [e["lab"] for e in events if e["event"] == "lab-deleted"] == ["idle"]
    fresh = Controller(world.backend(), Events(), CONFIG, reports=world.reports())  # a new function instance
    fresh.reconcile_all("reconcile")
    assert not [e for e in fresh.events.published if e["event"] == "lab-degraded"]  # said already


@pytest.mark.slow
def test_missing_zones_make_a_pass_incomplete(world, controller):
    ctl = controller
    ctl.handle(start_msg(), "m1")
    world.gke.advance_all()
    world.gke.missing_zones = {LOCATION}
    assert ctl.reconcile_all("reconcile") == [f"zone {LOCATION}"]  # not reported done
    with pytest.raises(TransientError, match=f"retry for zone {LOCATION}"):
        ctl.handle(cmd(type="nightly-teardown"), "m2")  # redelivered, not acknowledged
    world.gke.missing_zones = set()
    # the lab is listed from its record though its cluster's zone did not answer: the teardown reached it, and the
    # tick is redelivered all the same (a cluster's status may be missing from the pass)
    assert phase(ctl) == "tearing-down"
    ctl.handle(cmd(type="nightly-teardown"), "m2")
    drive(ctl, world, lambda: lab_of(ctl) is None)


def pip_packages():
    import os
    return os.environ.get("EXTRA_PIP_PACKAGES")


@pytest.mark.parametrize("crashing", [False, True], ids=["clean", "crash-after-every-kind-of-write"])
@pytest.mark.slow
def test_update_lab_replaces_every_worker_gracefully_by_a_new_helm_revision(world, controller, crashing):
    ctl = controller
    ctl.handle(start_msg(), "m1")
    drive(ctl, world, lambda: phase(ctl) == "ready")
    ctl.handle(cmd(type="scale", lab="lab1", pin=2), "m2")
    drive(ctl, world, lambda: workers(ctl) == 2)
    ns = place_of("lab1").namespace
    pods_before = {p["metadata"]["name"] for p in world.kube.list("pods", ns, "component=worker")}
    values = yaml.safe_load(SEED_VALUES)
    packages = "s3fs gcsfs dask-ml pyarrow --upgrade"
    for component in ("jupyter", "worker"):
        values[component]["env"] = [{"name": "EXTRA_PIP_PACKAGES", "value": packages}]
    at_retire: list[tuple[set[str], int, int]] = []  # (workers joined, worker pods running, worker nodes)
    with Client(world.scheduler_address(ns), timeout=20) as client:
        held = client.map(lambda x: x * 7, range(100), pure=False)  # held: the results stay in worker memory
        client.gather(held)
        assert set(client.run(pip_packages).values()) == {"s3fs gcsfs dask-ml --upgrade"}  # the seed's

        def on_write(site):
            if site.startswith("POST proxy /api/v1/retire_workers"):  # who was there when the old ones retired
                running = [p for p in world.kube.list("pods", ns, "component=worker")
                           if p["status"].get("phase") == "Running"]
                at_retire.append(({w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values()},
                                  len(running), world.gke.node_count(f"{PARENT}/clusters/lab1", "workers")))

        world.on_write, world.crashing, world.stage = on_write, crashing, "update"
        handle(ctl, cmd(type="update-lab", lab="lab1", values=values), "u1")
        handle(ctl, cmd(type="update-lab", lab="lab1", values=values), "u1")  # a redelivery: the same revision
        drive(ctl, world, lambda: lab_of(ctl).state.revision == 2, timeout=120)
        world.on_write, world.crashing = None, False
        pods_after = {p["metadata"]["name"] for p in world.kube.list("pods", ns, "component=worker")}
        assert len(pods_after) == 2 and not pods_before & pods_after  # a new ReplicaSet: every worker pod replaced
        assert {w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values()} == pods_after
        assert at_retire and all(pods_after <= there for there, _, _ in at_retire)  # the new had joined before
        assert set(client.run(pip_packages).values()) == {packages}  # every worker runs the new pod template
        assert sum(client.gather(held)) == 7 * sum(range(100))  # the results moved to the new workers
        assert recomputed(client) == 0  # moved, not computed again
    install, upgrade = world.helm_runs
    assert install["job"] != upgrade["job"] and upgrade["args"][:3] == ["upgrade", "--install", "lab1"]
    assert upgrade["values"]["worker"]["replicas"] == 2  # the workers running then, not the initial count
    assert upgrade["values"]["worker"]["strategy"] == {"type": "RollingUpdate",
                                                       "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}}
    (limits,) = world.kube.list("limitranges", ns)  # a lab of its own has its LimitRange too, kept by the update
    assert limits["spec"]["limits"][0]["max"] == {"cpu": "1", "memory": str(3 * 10**9)}  # the seed's largest
    deployment = world.kube.get("deployments", ns, "lab1-dask-worker")
    assert deployment["spec"].get("minReadySeconds", 0) == 0  # the hold was lifted
    assert deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    # side by side: 4 pods running on 2 nodes (3 workers fit one e2-standard-4) when the old ones retired
    assert {running for _, running, _ in at_retire} == {4} and {n for _, _, n in at_retire} == {2}
    updated = [e for e in ctl.events.published if e["event"] == "lab-updated"]
    assert [(e["from_revision"], e["revision"]) for e in updated] == [(1, 2)] * len(updated) and updated
    assert len(updated) == 1 or crashing  # a crash may repeat an event, never lose it
    assert "pyarrow" in updated[0]["environment"]["worker"]["extra_pip_packages"]
    ready = next(e for e in ctl.events.published if e["event"] == "lab-ready")
    assert ready["environment"]["worker"]["extra_pip_packages"] == ["dask-ml", "gcsfs", "s3fs"]
    if crashing:
        sites = " ".join(world.crashed)
        for site in ("update: PATCH deployments", "update: POST jobs", "update: set_node_pool_size",
                     "update: POST proxy /api/v1/retire_workers"):
            assert site in sites, f"no crash after {site}: {world.crashed}"
    values["scheduler"]["resources"]["limits"]["memory"] = "4G"
    with pytest.raises(ValidationError, match="held in memory is lost"):
        ctl.handle(cmd(type="update-lab", lab="lab1", values=values), "u2")
    assert len(world.helm_runs) == 2 and lab_of(ctl).spec.revision == 2


@pytest.mark.slow
def test_a_package_pip_cannot_install_is_said_though_the_workers_run_and_a_fixed_update_recovers(world, controller):
    """The chart's images pip-install EXTRA_PIP_PACKAGES in their entrypoint and start the worker whatever pip said
    (dask-docker's prepare.sh has no `set -e`): the update completes, the new workers run without the package, and
    the lab is degraded with pip's words from the head of their log. An update that fixes the name recovers it."""
    ctl = controller
    ctl.handle(start_msg(), "m1")
    drive(ctl, world, lambda: phase(ctl) == "ready" and workers(ctl) == 1)
    assert not [e for e in ctl.events.published if e["event"] == "lab-degraded"]  # the seed's packages installed
    world.uninstallable = {"pyarow"}
    values = yaml.safe_load(SEED_VALUES)
    for component in ("jupyter", "worker"):
        values[component]["env"] = [{"name": "EXTRA_PIP_PACKAGES", "value": "pyarow"}]
    handle(ctl, cmd(type="update-lab", lab="lab1", values=values), "u1")

    def degraded():
        return [e for e in ctl.events.published if e["event"] == "lab-degraded"]

    drive(ctl, world, lambda: lab_of(ctl).state.revision == 2 and degraded(), timeout=120)
    (event,) = degraded()
    assert event["causes"] == ["install-failed"], event
    assert "the worker runs without them" in event["reason"] and "fix the package list in values.worker.env" in \
        event["reason"] and "No matching distribution found for pyarow" in event["reason"]
    assert lab_of(ctl).state.degraded == "install-failed" and workers(ctl) == 1  # degraded, not down
    values["worker"]["env"] = values["jupyter"]["env"] = [{"name": "EXTRA_PIP_PACKAGES", "value": "pyarrow"}]
    handle(ctl, cmd(type="update-lab", lab="lab1", values=values), "u2")
    drive(ctl, world, lambda: lab_of(ctl).state.revision == 3 and lab_of(ctl).state.degraded == "", timeout=120)
    (recovered,) = [e for e in ctl.events.published if e["event"] == "lab-recovered"]
    assert "was install-failed" in recovered["reason"], recovered


@pytest.mark.slow
def test_jupyter_behind_the_service_proxy_holds_an_idle_lab_while_a_kernel_is_busy(tmp_path, caplog,
                                                                                    firestore_env):
    """The chart's Jupyter as a real Jupyter Server behind the stand-in's service proxy (its token from the Secret):
    a kernel running a long cell keeps a lab whose scheduler is idle; once the cell is done the lab goes."""
    from tests.notebook import Notebook

    world = World(tmp_path, jupyter=True)
    try:
        ctl, ns = Controller(world.backend(), Events(), CONFIG), place_of("lab1").namespace
        handle(ctl, start_msg(idle_timeout="3s"))
        drive(ctl, world, lambda: phase(ctl) == "ready", timeout=120)
        token = world.token(ns)
        nb = Notebook(world.jupyter_url(ns), token)
        procs_wait = time.monotonic() + 90
        while True:  # JupyterLab answers a few seconds after the release is deployed
            try:
                nb.open()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < procs_wait, "Jupyter never answered"
                time.sleep(0.5)
        cell = nb.send("import time; time.sleep(20); print('done')")
        deadline = time.monotonic() + 20
        while ctl.backend.fetch_jupyter(lab_of(ctl)).busy_kernels != 1:  # read through the proxy, as the tick does
            assert time.monotonic() < deadline, "the kernel never looked busy through the proxy"
            time.sleep(0.3)
        time.sleep(4)  # past the idle timeout: the scheduler is idle, only the kernel is busy
        caplog.set_level(logging.INFO, logger="dasklab")
        world.sync()
        handle(ctl, cmd(type="teardown-idle"))
        assert phase(ctl) == "ready"
        keeps = [json.loads(r.getMessage()) for r in caplog.records if '"action": "keep"' in r.getMessage()]
        assert keeps[-1]["reason"] == "1 of 1 Jupyter kernel(s) busy", keeps
        assert nb.wait(cell, timeout=60) == "done"
        nb.close()
        time.sleep(4)
        handle(ctl, cmd(type="teardown-idle"))
        drive(ctl, world, lambda: phase(ctl) is None, timeout=60)
        deleted = [e for e in ctl.events.published if e["event"] == "lab-deleted"][-1]
        assert "no Jupyter kernel busy or activity" in deleted["reason"], deleted
        assert token not in caplog.text and token not in json.dumps(ctl.events.published)
    finally:
        pids = world.close()
    assert not [p for p in pids if pid_alive(p)], "a process survived"
