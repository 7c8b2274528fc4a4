"""Tests for the GKE stand-in, driven through the real ClusterManagerClient: each rule refuses like GKE does."""

import base64
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.api_core import exceptions
from google.cloud import container_v1 as gke

from tests.standins.gke import GkeStandin, ManualClock

PROJECT = "lab-proj"
REGION = f"projects/{PROJECT}/locations/us-central1"
ZONE = f"projects/{PROJECT}/locations/us-central1-a"
CLUSTER = f"{REGION}/clusters/lab-1"
POOL = f"{CLUSTER}/nodePools/workers"
Status, OpStatus, OpType = gke.Cluster.Status, gke.Operation.Status, gke.Operation.Type


CLOCK = ManualClock()


@pytest.fixture
def standin():
    global CLOCK
    CLOCK = ManualClock()
    s = GkeStandin(operation_s=3, endpoint="127.0.0.1:6443", clock=CLOCK)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(standin):
    return standin.client()


def pool(name="workers", count=2, spot=False, **kw) -> gke.NodePool:
    config = gke.NodeConfig(machine_type="e2-standard-4", spot=spot)
    return gke.NodePool(name=name, initial_node_count=count, config=config, **kw)


def create(client, parent=REGION, name="lab-1", **kw) -> gke.Operation:
    kw.setdefault("node_pools", [pool()])
    return client.create_cluster(parent=parent, cluster=gke.Cluster(name=name, **kw))


def set_labels(client, labels, fingerprint, name=CLUSTER) -> gke.Operation:
    return client.set_labels(request={"name": name, "resource_labels": labels, "label_fingerprint": fingerprint})


def resize(client, node_count, name=POOL) -> gke.Operation:
    return client.set_node_pool_size(request={"name": name, "node_count": node_count})


def autoscale(client, autoscaling, name=POOL) -> gke.Operation:
    return client.set_node_pool_autoscaling(request={"name": name, "autoscaling": autoscaling})


def op_name(op: gke.Operation) -> str:
    return op.self_link.split("/v1/", 1)[1]


def wait(client, op: gke.Operation) -> gke.Operation:
    """Time passes until the operation is done (polls do not move it)."""
    for _ in range(3600):
        if op.status == OpStatus.DONE:
            return op
        CLOCK.advance(1)
        op = client.get_operation(name=op_name(op))
    raise AssertionError(f"operation {op.name} never finished")


def running(client, **kw) -> gke.Cluster:
    wait(client, create(client, **kw))
    return client.get_cluster(name=f"{kw.get('parent', REGION)}/clusters/{kw.get('name', 'lab-1')}")


# ---- happy paths -----------------------------------------------------------------------------


def test_create_cluster_progresses_pending_running_done_with_time_not_polls(client):
    op = create(client, resource_labels={"owner": "ada"}, description="a lab", node_pools=[pool(count=2)])
    assert (op.status, op.operation_type) == (OpStatus.PENDING, OpType.CREATE_CLUSTER)
    assert op.target_link == f"https://container.googleapis.com/v1/{CLUSTER}"
    assert op.self_link == f"https://container.googleapis.com/v1/{REGION}/operations/{op.name}"
    assert op.name.startswith("operation-") and op.location == "us-central1"
    c = client.get_cluster(name=CLUSTER)
    assert (c.status, c.endpoint, c.master_auth.cluster_ca_certificate) == (Status.PROVISIONING, "", "")

    polls = [client.get_operation(name=op_name(op)).status for _ in range(5)]
    assert polls == [OpStatus.PENDING] * 5  # polling alone moves nothing
    statuses = []
    for _ in range(3):
        CLOCK.advance(1)
        statuses.append(client.get_operation(name=op_name(op)).status)
    assert statuses == [OpStatus.RUNNING, OpStatus.RUNNING, OpStatus.DONE]
    CLOCK.advance(1)
    assert client.get_operation(name=op_name(op)).status == OpStatus.DONE  # stays DONE

    c = client.get_cluster(name=CLUSTER)
    assert c.status == Status.RUNNING and c.endpoint == "127.0.0.1:6443"
    assert base64.b64decode(c.master_auth.cluster_ca_certificate).startswith(b"-----BEGIN CERTIFICATE-----")
    assert (c.location, list(c.locations)) == ("us-central1", ["us-central1-a", "us-central1-b", "us-central1-c"])
    assert dict(c.resource_labels) == {"owner": "ada"} and c.label_fingerprint and c.description == "a lab"
    assert c.create_time.endswith("Z") and c.self_link.endswith(CLUSTER)
    assert c.current_node_count == 2 * 3  # node count is per zone
    np = c.node_pools[0]
    assert (np.config.machine_type, np.status) == ("e2-standard-4", gke.NodePool.Status.RUNNING)


def test_list_clusters_and_operations_filter_by_project_and_location(client):
    create(client, name="east", parent=f"projects/{PROJECT}/locations/us-east1")
    create(client, name="west")
    create(client, name="other", parent="projects/other-proj/locations/us-central1")
    names = lambda resp: sorted(c.name for c in resp.clusters)  # noqa: E731
    assert names(client.list_clusters(parent=REGION)) == ["west"]
    assert names(client.list_clusters(parent=f"projects/{PROJECT}/locations/-")) == ["east", "west"]
    ops = client.list_operations(parent=f"projects/{PROJECT}/locations/-").operations
    assert sorted(o.target_link.rsplit("/", 1)[1] for o in ops) == ["east", "west"]
    assert [o.location for o in client.list_operations(parent=REGION).operations] == ["us-central1"]


def test_deprecated_project_zone_fields_are_accepted(client):
    running(client, parent=ZONE)
    c = client.get_cluster(project_id=PROJECT, zone="us-central1-a", cluster_id="lab-1")
    assert c.name == "lab-1" and list(c.locations) == ["us-central1-a"]


def test_delete_cluster_stops_then_disappears_when_the_operation_is_done(client):
    running(client)
    op = client.delete_cluster(name=CLUSTER)
    assert op.operation_type == OpType.DELETE_CLUSTER
    assert client.get_cluster(name=CLUSTER).status == Status.STOPPING
    wait(client, op)
    with pytest.raises(exceptions.NotFound):
        client.get_cluster(name=CLUSTER)
    assert client.list_clusters(parent=REGION).clusters == []


# ---- naming and label rules --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1lab", "Lab", "lab-", "lab_1", "lab.1", "a" * 41, "-lab", ""])
def test_invalid_cluster_names_are_refused(client, name):
    with pytest.raises(exceptions.InvalidArgument, match="cluster.name"):
        create(client, name=name)


@pytest.mark.parametrize("name", ["a", "a" * 40, "lab-2-x9"])
def test_valid_cluster_names_are_accepted(client, name):
    assert create(client, name=name).operation_type == OpType.CREATE_CLUSTER


@pytest.mark.parametrize(
    "labels",
    [
        {f"k{i}": "v" for i in range(65)},
        {"": "v"},
        {"1key": "v"},
        {"Key": "v"},
        {"k" * 64: "v"},
        {"key": "V"},
        {"key": "v" * 64},
        {"key": "a.b"},
    ],
    ids=["65-labels", "empty-key", "digit-key", "upper-key", "long-key", "upper-value", "long-value", "dot-value"],
)
def test_invalid_labels_are_refused_on_create_and_set_labels(client, labels):
    with pytest.raises(exceptions.InvalidArgument):
        create(client, resource_labels=labels)
    c = running(client)
    with pytest.raises(exceptions.InvalidArgument):
        set_labels(client, labels, c.label_fingerprint)


def test_boundary_labels_are_accepted(client):
    labels = {f"k{i}": "" for i in range(59)} | {"k" * 63: "v" * 63}  # 60, and GKE's 4 on each VM: 64
    assert create(client, resource_labels=labels)


def test_cluster_labels_go_onto_its_vms_beside_gke_s_and_64_is_the_vm_s_limit(standin, client):
    labels = {f"k{i}": "" for i in range(61)}
    with pytest.raises(exceptions.InvalidArgument, match="VMs would carry 65, above Compute's 64"):
        create(client, resource_labels=labels)
    c = running(client, resource_labels={"team": "data"}, node_pools=[pool(count=2)])
    vms = standin.vm_labels()
    assert set(vms) == set(standin.instances()) and vms and all(
        v == {"team": "data", "goog-gke-node": "", "goog-k8s-cluster-name": c.name,
              "goog-k8s-cluster-location": "us-central1", "goog-k8s-node-pool-name": "workers"} for v in vms.values())
    wait(client, set_labels(client, {"team": "ml"}, c.label_fingerprint))
    assert {v["team"] for v in standin.vm_labels().values()} == {"ml"}  # SetLabels reaches the VMs
    with pytest.raises(exceptions.InvalidArgument, match="above Compute's 64"):
        set_labels(client, labels, client.get_cluster(name=CLUSTER).label_fingerprint)


def test_duplicate_cluster_is_already_exists(client):
    create(client)
    with pytest.raises(exceptions.AlreadyExists, match=f"Already exists: {CLUSTER}"):
        create(client)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_cluster(name=CLUSTER),
        lambda c: c.delete_cluster(name=CLUSTER),
        lambda c: set_labels(c, {}, ""),
        lambda c: c.get_node_pool(name=POOL),
        lambda c: c.list_node_pools(parent=CLUSTER),
        lambda c: resize(c, 1),
        lambda c: c.get_operation(name=f"{REGION}/operations/operation-1-0"),
    ],
    ids=["get", "delete", "set-labels", "get-pool", "list-pools", "resize", "get-operation"],
)
def test_missing_resources_are_not_found(client, call):
    with pytest.raises(exceptions.NotFound):
        call(client)


def test_missing_node_pool_and_operation_in_another_location_are_not_found(client):
    op = create(client)
    client.get_node_pool(name=POOL)
    with pytest.raises(exceptions.NotFound):
        client.get_node_pool(name=f"{CLUSTER}/nodePools/nope")
    with pytest.raises(exceptions.NotFound):
        client.get_operation(name=f"projects/{PROJECT}/locations/europe-west1/operations/{op.name}")


@pytest.mark.parametrize("name", ["lab-1", "projects/p/clusters/lab-1", f"{REGION}/clusters/lab-1/extra"])
def test_malformed_resource_names_are_invalid_argument(client, name):
    with pytest.raises(exceptions.InvalidArgument):
        client.get_cluster(name=name)


# ---- node pool and topology rules -------------------------------------------------------------


@pytest.mark.parametrize(
    "cluster, match",
    [
        (dict(node_pools=[pool(name="Workers")]), "node_pool.name"),
        (dict(node_pools=[pool(name="w" * 41)]), "node_pool.name"),
        (dict(node_pools=[gke.NodePool(name="workers", initial_node_count=1)]), "config must be set"),
        (dict(node_pools=[pool(count=-1)]), "initial_node_count must be >= 0"),
        (dict(node_pools=[pool(), pool()]), "must be unique"),
        (dict(node_pools=[pool(autoscaling=gke.NodePoolAutoscaling(enabled=True, min_node_count=3, max_node_count=1))]),
         "autoscaling limits"),
        (dict(node_pools=[pool()], initial_node_count=1), "cannot be set together"),
        (dict(node_pools=[], initial_node_count=0), "greater than zero"),
        (dict(node_pools=[pool()], locations=["us-east1-b"]), "not in region"),
        (dict(node_pools=[pool(locations=["europe-west1-b"])]), "not in region"),
    ],
    ids=[
        "upper-pool-name", "long-pool-name", "no-config", "negative-count", "duplicate-pool", "autoscaling-min>max",
        "pools-and-initial-count", "no-pools-no-count", "zone-outside-region", "pool-zone-outside-region",
    ],
)  # fmt: skip
def test_invalid_node_pools_and_topology_are_refused(client, cluster, match):
    with pytest.raises(exceptions.InvalidArgument, match=match):
        create(client, **cluster)


def test_legacy_initial_node_count_makes_a_default_pool(client):
    c = running(client, node_pools=[], initial_node_count=2)
    assert [p.name for p in c.node_pools] == ["default-pool"] and c.current_node_count == 6


def test_node_pool_size_is_per_zone_and_initial_count_is_unchanged(client, standin):
    running(client, node_pools=[pool(count=1, spot=True)])
    np = client.get_node_pool(name=POOL)
    assert len(np.instance_group_urls) == 3 and np.config.spot
    assert re.fullmatch(
        rf"https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-a/"
        r"instanceGroupManagers/gke-lab-1-workers-[0-9a-f]+-grp",
        np.instance_group_urls[0],
    )
    op = resize(client, 4)
    assert (op.operation_type, op.target_link) == (OpType.SET_NODE_POOL_SIZE, np.self_link)
    assert client.get_node_pool(name=POOL).status == gke.NodePool.Status.RECONCILING
    assert standin.node_count(CLUSTER, "workers") == 1  # applied when the operation is DONE
    wait(client, op)
    assert standin.node_count(CLUSTER, "workers") == 4
    assert client.get_cluster(name=CLUSTER).current_node_count == 12
    assert client.get_node_pool(name=POOL).initial_node_count == 1


def test_zonal_cluster_has_one_zone(client, standin):
    running(client, parent=ZONE, node_pools=[pool(count=3)])
    c = client.get_cluster(name=f"{ZONE}/clusters/lab-1")
    assert list(c.locations) == ["us-central1-a"] and c.current_node_count == 3
    assert len(c.node_pools[0].instance_group_urls) == 1


def test_negative_node_pool_size_is_invalid(client):
    running(client)
    with pytest.raises(exceptions.InvalidArgument):
        resize(client, -1)


def test_set_node_pool_autoscaling_applies_when_done_and_validates_limits(client):
    running(client)
    bad = gke.NodePoolAutoscaling(enabled=True, min_node_count=0, max_node_count=0)
    with pytest.raises(exceptions.InvalidArgument):
        autoscale(client, bad)
    good = gke.NodePoolAutoscaling(enabled=True, min_node_count=0, max_node_count=5)
    wait(client, autoscale(client, good))
    assert client.get_node_pool(name=POOL).autoscaling.max_node_count == 5


def test_autopilot_refuses_node_pool_calls_and_must_be_regional(client):
    c = running(client, node_pools=[], autopilot=gke.Autopilot(enabled=True))
    assert c.autopilot.enabled and c.status == Status.RUNNING
    for call in (
        lambda: client.list_node_pools(parent=CLUSTER),
        lambda: client.get_node_pool(name=f"{CLUSTER}/nodePools/default-pool"),
        lambda: resize(client, 1, f"{CLUSTER}/nodePools/default-pool"),
    ):
        with pytest.raises(exceptions.InvalidArgument, match="Autopilot node pools cannot be accessed or modified"):
            call()
    with pytest.raises(exceptions.InvalidArgument):
        create(client, parent=ZONE, name="ap-zonal", node_pools=[], autopilot=gke.Autopilot(enabled=True))
    with pytest.raises(exceptions.InvalidArgument):
        create(client, name="ap-pools", autopilot=gke.Autopilot(enabled=True))


# ---- one operation at a time, fingerprints, failures --------------------------------------------


def test_mutations_wait_for_the_running_operation(client, standin):
    op = create(client)
    busy = re.escape(f"Operation {op.name} is currently creating cluster lab-1. Please wait and try again once it is done.")
    fp = client.get_cluster(name=CLUSTER).label_fingerprint
    for call in (
        lambda: client.delete_cluster(name=CLUSTER),  # deleting a PROVISIONING cluster
        lambda: set_labels(client, {"a": "b"}, fp),
        lambda: resize(client, 3),
        lambda: autoscale(client, gke.NodePoolAutoscaling(enabled=False)),
    ):
        with pytest.raises(exceptions.FailedPrecondition, match=busy):
            call()
    standin.advance_all()
    resizing = resize(client, 3)
    with pytest.raises(exceptions.FailedPrecondition, match="is currently resizing a node pool for cluster lab-1"):
        client.delete_cluster(name=CLUSTER)
    wait(client, resizing)
    assert client.delete_cluster(name=CLUSTER).operation_type == OpType.DELETE_CLUSTER


def test_set_labels_requires_the_current_fingerprint_which_changes_on_success(client):
    c = running(client, resource_labels={"phase": "idle"})
    with pytest.raises(exceptions.FailedPrecondition, match="fingerprint mismatch.*supplied was \"\""):
        set_labels(client, {"phase": "busy"}, "")
    op = set_labels(client, {"phase": "busy"}, c.label_fingerprint)
    assert op.operation_type == OpType.SET_LABELS
    wait(client, op)
    after = client.get_cluster(name=CLUSTER)
    assert dict(after.resource_labels) == {"phase": "busy"}  # replaced, not merged
    assert after.label_fingerprint != c.label_fingerprint
    with pytest.raises(exceptions.FailedPrecondition, match="fingerprint mismatch"):
        set_labels(client, {}, c.label_fingerprint)


def test_failed_operation_is_done_with_error_and_cluster_in_error(client, standin):
    op = create(client)
    standin.fail_operation(op.name, message="Insufficient regional quota", code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    done = wait(client, op)
    assert (done.status, done.error.code, done.error.message) == (OpStatus.DONE, 8, "Insufficient regional quota")
    c = client.get_cluster(name=CLUSTER)
    assert (c.status, c.status_message, c.endpoint) == (Status.ERROR, "Insufficient regional quota", "")
    wait(client, client.delete_cluster(name=CLUSTER))  # an ERROR cluster can be deleted
    assert CLUSTER not in standin.clusters


def test_operation_s_zero_finishes_at_once():
    with GkeStandin(operation_s=0) as s:
        op = create(s.client())
        assert op.status == OpStatus.DONE and s.clusters[CLUSTER].status == Status.RUNNING


# ---- hooks, concurrency, lifecycle ---------------------------------------------------------------


def test_fail_next_injects_one_error_and_calls_are_recorded(client, standin):
    standin.fail_next("CreateCluster", grpc.StatusCode.RESOURCE_EXHAUSTED, "quota")
    with pytest.raises(exceptions.ResourceExhausted, match="quota"):
        create(client)
    create(client)
    standin.fail_next("GetCluster")  # UNAVAILABLE: the real client retries Get* by itself
    assert client.get_cluster(name=CLUSTER).name == "lab-1"
    assert standin.calls == ["CreateCluster", "CreateCluster", "GetCluster", "GetCluster"]
    with pytest.raises(ValueError):
        standin.fail_next("GetClusterz")


def test_unimplemented_methods_are_refused(client):
    with pytest.raises(exceptions.MethodNotImplemented):
        client.create_node_pool(parent=CLUSTER, node_pool=pool())


def test_latency_is_applied_per_call(client, standin):
    standin.latency_s = 0.05
    t0 = time.perf_counter()
    client.list_clusters(parent=REGION)
    assert time.perf_counter() - t0 >= 0.05


def test_concurrent_creates_and_label_writes_are_serialized(client, standin):
    def attempt(call):
        try:
            call()
            return "ok"
        except exceptions.GoogleAPICallError as e:
            return type(e).__name__

    with ThreadPoolExecutor(8) as pool_:
        results = list(pool_.map(lambda _: attempt(lambda: create(client)), range(8)))
    assert sorted(results) == ["AlreadyExists"] * 7 + ["ok"]
    standin.advance_all()
    fp = client.get_cluster(name=CLUSTER).label_fingerprint
    with ThreadPoolExecutor(8) as pool_:
        results = list(
            pool_.map(
                lambda i: attempt(
                    lambda: set_labels(client, {"n": str(i)}, fp)
                ),
                range(8),
            )
        )
    assert sorted(results) == ["FailedPrecondition"] * 7 + ["ok"]


def test_stop_leaves_no_threads():
    before = set(threading.enumerate())
    with GkeStandin() as s:
        s.client().list_clusters(parent=REGION)
    assert set(threading.enumerate()) - before == set()


def test_clone_cluster_seeds_a_running_copy_under_a_new_name(standin, client):
    running(client, resource_labels={"lab": "lab-1"})
    standin.clone_cluster(CLUSTER, "lab-2", {"lab": "lab-2"})
    original, clone = client.get_cluster(name=CLUSTER), client.get_cluster(name=f"{REGION}/clusters/lab-2")
    assert (clone.name, clone.status, dict(clone.resource_labels)) == ("lab-2", gke.Cluster.Status.RUNNING,
                                                                    {"lab": "lab-2"})
    assert clone.self_link.endswith("/clusters/lab-2") and clone.id != original.id
    assert clone.label_fingerprint != original.label_fingerprint
    assert [p.name for p in clone.node_pools] == [p.name for p in original.node_pools]
    assert all("lab-2" in url for p in clone.node_pools for url in p.instance_group_urls)
    wait(client, resize(client, 3, name=f"{REGION}/clusters/lab-2/nodePools/workers"))  # each has its own pools
    assert standin.node_count(f"{REGION}/clusters/lab-2", "workers") == 3
    assert standin.node_count(CLUSTER, "workers") != 3
    with pytest.raises(ValueError, match="exists"):
        standin.clone_cluster(CLUSTER, "lab-2", {})


# ---- GKE's own operations, on the clock ------------------------------------------------------------


def test_an_upgrade_blocks_other_calls_with_gkes_text_and_surge_replaces_nodes_under_new_names(client, standin):
    running(client, parent=ZONE, node_pools=[pool(count=2)])
    cluster = f"{ZONE}/clusters/lab-1"
    before = set(standin.instances())
    op_id = standin.start_upgrade(cluster, "workers", strategy="surge", duration_s=30)
    busy = re.escape(f"Operation {op_id} is currently upgrading cluster lab-1. Please wait and try again once it is "
                     "done.")
    with pytest.raises(exceptions.FailedPrecondition, match=busy):
        resize(client, 3, f"{cluster}/nodePools/workers")
    assert client.get_node_pool(name=f"{cluster}/nodePools/workers").status == gke.NodePool.Status.RECONCILING
    CLOCK.advance(11)  # one node of two replaced (a step every 10 s): the new one first, then the old one goes
    middle = set(standin.instances())
    assert len(middle) == 2 and len(middle - before) == 1
    CLOCK.advance(20)
    after = set(standin.instances())
    assert len(after) == 2 and not after & before and standin.removed_at_random == []
    done = client.get_operation(name=f"{ZONE}/operations/{op_id}")
    assert (done.status, done.operation_type) == (OpStatus.DONE, OpType.AUTO_UPGRADE_NODES)
    wait(client, resize(client, 3, f"{cluster}/nodePools/workers"))  # free again


def test_a_blue_green_upgrade_has_two_groups_per_zone_then_the_green_ones(client, standin):
    running(client, node_pools=[pool(count=1)])
    blue = list(client.get_node_pool(name=POOL).instance_group_urls)
    standin.start_upgrade(CLUSTER, "workers", strategy="blue-green", duration_s=100)
    CLOCK.advance(1)
    during = list(client.get_node_pool(name=POOL).instance_group_urls)
    assert len(during) == 6 and set(blue) < set(during)
    zones = [u.split("/zones/")[1].split("/")[0] for u in during]
    assert all(zones.count(z) == 2 for z in zones)
    assert sum(standin.zone_counts(CLUSTER, "workers").values()) == 6  # blue and green nodes
    CLOCK.advance(100)
    after = list(client.get_node_pool(name=POOL).instance_group_urls)
    assert len(after) == 3 and not set(after) & set(blue)
    assert standin.zone_counts(CLUSTER, "workers") == {f"us-central1-{z}": 1 for z in "abc"}


def test_a_repair_blocks_for_minutes_and_master_upgrade_reconciles(client, standin):
    running(client)
    op_id = standin.start_repair(CLUSTER, "workers", duration_s=330)
    CLOCK.advance(300)
    with pytest.raises(exceptions.FailedPrecondition, match=f"Operation {op_id} is currently repairing cluster lab-1"):
        resize(client, 2)
    CLOCK.advance(31)
    upgrade = standin.start_upgrade(CLUSTER, duration_s=10)
    assert client.get_cluster(name=CLUSTER).status == Status.RECONCILING
    CLOCK.advance(10)
    c = client.get_cluster(name=CLUSTER)
    assert c.status == Status.RUNNING and c.current_master_version > "1.35.1"
    assert client.get_operation(name=f"{REGION}/operations/{upgrade}").operation_type == OpType.UPGRADE_MASTER


def test_auto_upgrade_starts_by_itself_unless_a_no_upgrades_exclusion_covers_now():
    clock = ManualClock()
    with GkeStandin(operation_s=2, clock=clock, auto_upgrade_after_s=60) as s:
        c = s.client()
        start = clock()
        held = gke.MaintenancePolicy(window=gke.MaintenanceWindow(maintenance_exclusions={"lab": gke.TimeWindow(
            start_time=start, end_time=start + __import__("datetime").timedelta(hours=9),
            maintenance_exclusion_options=gke.MaintenanceExclusionOptions(scope=0))}))
        create(c, name="held", maintenance_policy=held)
        create(c, name="free")
        clock.advance(61)
        types = {o.target_link.rsplit("/", 1)[1]: o.operation_type for o in c.list_operations(parent=REGION).operations
                 if o.operation_type == OpType.UPGRADE_MASTER}
        assert types == {"free": OpType.UPGRADE_MASTER}
        assert c.get_cluster(name=f"{REGION}/clusters/free").release_channel.channel == gke.ReleaseChannel.Channel.REGULAR


def test_maintenance_exclusions_follow_the_documented_limits(client):
    from datetime import timedelta
    start = CLOCK()

    def policy(**windows):
        return gke.MaintenancePolicy(window=gke.MaintenanceWindow(maintenance_exclusions={
            k: gke.TimeWindow(start_time=start, end_time=start + v,
                              maintenance_exclusion_options=gke.MaintenanceExclusionOptions(scope=0))
            for k, v in windows.items()}))

    with pytest.raises(exceptions.InvalidArgument, match="at most 30 days"):
        create(client, maintenance_policy=policy(long=timedelta(days=31)))
    with pytest.raises(exceptions.InvalidArgument, match="end time must be after"):
        create(client, maintenance_policy=policy(empty=timedelta(0)))
    with pytest.raises(exceptions.InvalidArgument, match="At most 3"):
        create(client, maintenance_policy=policy(**{f"e{i}": timedelta(hours=1) for i in range(4)}))
    create(client, maintenance_policy=policy(lab=timedelta(hours=13)))


def test_a_cluster_left_in_error_is_removed_by_gke_and_its_failed_creation_stays_listed():
    clock = ManualClock()
    with GkeStandin(operation_s=2, clock=clock, error_cluster_ttl_s=120) as s:
        c = s.client()
        op = create(c, resource_labels={"lab": "x"})
        s.fail_operation(op.name, 'Insufficient regional quota to satisfy request: resource "CPUS"', 7)
        clock.advance(3)
        assert c.get_cluster(name=CLUSTER).status == Status.ERROR
        clock.advance(100)
        assert c.get_cluster(name=CLUSTER).status == Status.ERROR  # for a while
        clock.advance(25)
        assert c.get_cluster(name=CLUSTER).status == Status.STOPPING
        clock.advance(3)
        with pytest.raises(exceptions.NotFound):
            c.get_cluster(name=CLUSTER)
        ops = {o.operation_type: o for o in c.list_operations(parent=REGION).operations}
        assert 'resource "CPUS"' in ops[OpType.CREATE_CLUSTER].error.message
        assert ops[OpType.DELETE_CLUSTER].status == OpStatus.DONE  # GKE's own deletion


# ---- what GKE refuses --------------------------------------------------------------------------------


@pytest.mark.parametrize("config, match", [
    (gke.NodeConfig(machine_type="e2-standard-5"), "Machine type with name 'e2-standard-5' does not exist"),
    (gke.NodeConfig(machine_type="x1-mega-4"), "does not exist in zone"),
    (gke.NodeConfig(machine_type="c3-standard-4"), "disk type 'pd-standard' is not supported"),
    (gke.NodeConfig(machine_type="n4-standard-4", disk_type="pd-balanced"), "not supported"),
    (gke.NodeConfig(machine_type="e2-standard-4", service_account="dasklab-nodes"), "valid service account email"),
])
def test_node_configs_gke_refuses(client, config, match):
    with pytest.raises(exceptions.InvalidArgument, match=match):
        create(client, node_pools=[gke.NodePool(name="workers", initial_node_count=1, config=config)])


def test_node_configs_gke_accepts(client):
    ok = [gke.NodeConfig(machine_type="c3-standard-4", disk_type="pd-balanced",
                         service_account="dasklab-nodes@lab-proj.iam.gserviceaccount.com"),
          gke.NodeConfig(machine_type="e2-standard-4"), gke.NodeConfig(machine_type="e2-medium")]
    for i, config in enumerate(ok):
        create(client, name=f"ok-{i}", node_pools=[gke.NodePool(name="p", initial_node_count=1, config=config)])


def test_a_cluster_with_no_node_at_all_is_refused(client):
    with pytest.raises(exceptions.InvalidArgument, match="at least one node"):
        create(client, node_pools=[pool("system", count=0), pool("workers", count=0)])
    create(client, node_pools=[pool("system", count=1), pool("workers", count=0)])


def test_missing_zones_leave_their_clusters_out_and_are_said(client, standin):
    running(client, parent=ZONE, name="in-a")
    running(client, parent=f"projects/{PROJECT}/locations/us-central1-b", name="in-b")
    standin.missing_zones = {"us-central1-a"}
    listing = client.list_clusters(parent=f"projects/{PROJECT}/locations/-")
    assert [c.name for c in listing.clusters] == ["in-b"] and list(listing.missing_zones) == ["us-central1-a"]
    listing = client.list_clusters(parent=ZONE)
    assert listing.clusters == [] and list(listing.missing_zones) == ["us-central1-a"]


def test_a_running_cluster_degrades_with_a_status_message_and_still_serves(client, standin):
    """Cluster.Status docstring: DEGRADED "requires user action to restore full functionality. Details can be found
    in the statusMessage field". Only a running cluster degrades; it keeps its nodes and accepts operations."""
    with pytest.raises(ValueError, match="only a running cluster degrades"):
        create(client)
        standin.degrade(CLUSTER, "never")  # still PROVISIONING
    CLOCK.advance(3)
    standin.degrade(CLUSTER, "Nodes cannot be repaired: user action needed")
    c = client.get_cluster(name=CLUSTER)
    assert (c.status, c.status_message) == (Status.DEGRADED, "Nodes cannot be repaired: user action needed")
    assert c.current_node_count == 6 and wait(client, resize(client, 3)).status == OpStatus.DONE  # 2 × 3 zones
    standin.recover(CLUSTER)
    c = client.get_cluster(name=CLUSTER)
    assert (c.status, c.status_message) == (Status.RUNNING, "")


# ---- Workload Identity and the nodes' account (cloud.google.com/kubernetes-engine/docs/how-to/workload-identity) --

WI = gke.WorkloadIdentityConfig(workload_pool=f"{PROJECT}.svc.id.goog")
GKE_METADATA = gke.WorkloadMetadataConfig(mode=gke.WorkloadMetadataConfig.Mode.GKE_METADATA)


def metadata_pool(mode=None, name="workers") -> gke.NodePool:
    config = gke.NodeConfig(machine_type="e2-standard-4")
    if mode is not None:
        config.workload_metadata_config = gke.WorkloadMetadataConfig(mode=mode)
    return gke.NodePool(name=name, initial_node_count=1, config=config)


@pytest.mark.parametrize("workload_pool", ["other-proj.svc.id.goog", PROJECT, f"{PROJECT}.svc.id.goog.evil",
                                           "lab-proj.svc.id.goo"])
def test_a_workload_pool_other_than_the_projects_own_is_refused(client, standin, workload_pool):
    with pytest.raises(exceptions.InvalidArgument, match=f'Must be "{PROJECT}.svc.id.goog"'):
        create(client, workload_identity_config=gke.WorkloadIdentityConfig(workload_pool=workload_pool))
    assert standin.clusters == {}


def test_the_gke_metadata_server_needs_workload_identity_on_the_cluster(client, standin):
    with pytest.raises(exceptions.InvalidArgument, match="GKE_METADATA requires Workload Identity"):
        create(client, node_pools=[metadata_pool(), metadata_pool(gke.WorkloadMetadataConfig.Mode.GKE_METADATA, "s")])
    assert standin.clusters == {}
    Mode = gke.WorkloadMetadataConfig.Mode
    create(client, workload_identity_config=WI,
           node_pools=[metadata_pool(Mode.GKE_METADATA, "a"), metadata_pool(None, "b"), metadata_pool(Mode.GCE_METADATA, "c")])
    c = client.get_cluster(name=CLUSTER)  # recorded and returned: a pool left unset runs the GKE metadata server too
    assert c.workload_identity_config.workload_pool == f"{PROJECT}.svc.id.goog"
    assert [p.config.workload_metadata_config.mode for p in c.node_pools] == \
        [Mode.GKE_METADATA, Mode.GKE_METADATA, Mode.GCE_METADATA]
    create(client, name="no-wi", node_pools=[metadata_pool()])  # without Workload Identity: the node's metadata
    c = client.get_cluster(name=f"{REGION}/clusters/no-wi")
    assert not c.workload_identity_config.workload_pool
    assert c.node_pools[0].config.workload_metadata_config.mode == Mode.MODE_UNSPECIFIED


def test_a_pool_without_its_own_account_runs_as_the_default_one(client):
    account = f"dasklab-nodes@{PROJECT}.iam.gserviceaccount.com"
    pools = [metadata_pool(None, "a"), gke.NodePool(name="b", initial_node_count=1, config=gke.NodeConfig(
        machine_type="e2-standard-4", service_account=account))]
    create(client, node_pools=pools)
    assert [p.config.service_account for p in client.get_cluster(name=CLUSTER).node_pools] == ["default", account]
