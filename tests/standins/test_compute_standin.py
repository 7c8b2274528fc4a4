"""Tests for the instance-group stand-in through the real InstanceGroupManagersClient (REST), and the compute adapter's
reading of what Compute answers: multi-zone pools, chosen deletions, 401/403/429 as Compute sends them."""

import pytest
from dasklab.adapters.compute import Migs
from dasklab.core.errors import PermanentError, RateLimited
from google.api_core import exceptions
from google.cloud import container_v1 as gke

from tests.standins.compute import MigStandin
from tests.standins.gke import GkeStandin

REGION = "projects/lab-proj/locations/us-central1"


@pytest.fixture
def world():
    with GkeStandin(operation_s=0) as g, MigStandin(g) as m:
        pools = [gke.NodePool(name="workers", initial_node_count=2, config=gke.NodeConfig(machine_type="e2-standard-4"))]
        g.client().create_cluster(parent=REGION, cluster=gke.Cluster(name="lab-1", node_pools=pools))
        yield g, m


def test_a_regional_pool_has_one_group_per_zone_and_chosen_deletions_shrink_only_their_zone(world):
    g, m = world
    urls = list(g.clusters[f"{REGION}/clusters/lab-1"].node_pools[0].instance_group_urls)
    migs = Migs(m.client)
    assert migs.target_sizes(urls) == {"us-central1-a": 2, "us-central1-b": 2, "us-central1-c": 2}
    victim = next(g for g in m.groups() if g.zone == "us-central1-b").instances[0]
    migs.delete_instances(urls[1], [victim])
    assert migs.target_sizes(urls) == {"us-central1-a": 2, "us-central1-b": 1, "us-central1-c": 2}
    assert m.deleted == [victim] and m.removed_at_random == []
    migs.delete_instances(urls[1], [victim])  # again: skipped, harmless
    with pytest.raises(PermanentError, match="Invalid value for field 'instances'"):  # another zone's instance
        client = m.client()
        from google.cloud.compute_v1 import InstanceGroupManagersDeleteInstancesRequest as Req
        try:
            client.delete_instances(project="lab-proj", zone="us-central1-a", instance_group_manager=urls[0].rsplit(
                "/", 1)[1], instance_group_managers_delete_instances_request_resource=Req(
                instances=["zones/us-central1-b/instances/x"]))
        except exceptions.BadRequest as e:
            raise PermanentError(str(e))


@pytest.mark.parametrize("kind, sdk_error, ours", [
    ("unauthenticated", exceptions.Unauthorized, PermanentError),
    ("permission", exceptions.Forbidden, PermanentError),
    ("quota", exceptions.Forbidden, PermanentError),
    ("rate-limit", exceptions.Forbidden, RateLimited),
    ("too-many-requests", exceptions.TooManyRequests, RateLimited),
])
def test_refusals_arrive_as_compute_sends_them_and_are_classified(world, kind, sdk_error, ours):
    g, m = world
    url = g.clusters[f"{REGION}/clusters/lab-1"].node_pools[0].instance_group_urls[0]
    project, zone, name = "lab-proj", url.split("/zones/")[1].split("/")[0], url.rsplit("/", 1)[1]
    times = 3 if kind == "unauthenticated" else 1  # a 401 is retried after a token refresh, twice
    m.fail_next("get", kind, times)
    with pytest.raises(sdk_error) as raw:  # the real REST client's exception, not PermissionDenied/Unauthenticated
        m.client().get(project=project, zone=zone, instance_group_manager=name)
    assert not isinstance(raw.value, (exceptions.PermissionDenied, exceptions.Unauthenticated))
    m.fail_next("deleteInstances", kind, times)
    with pytest.raises(ours) as translated:
        Migs(m.client).delete_instances(url, [g.groups()[0].instances[0]])
    assert not (ours is PermanentError and isinstance(translated.value, RateLimited))
    if kind == "permission":
        assert "compute.instanceGroupManagers.update" in str(translated.value)
    assert m.refused == [kind] * 2 * times


def test_regions_get_serves_quotas_with_usage_from_the_node_vms(world):
    from dasklab.adapters.compute import Regions
    from dasklab.core.quotas import Quota
    g, m = world
    # the fixture's cluster: a regional pool of 2 e2-standard-4 nodes per zone (GKE's defaults: pd-standard, 100 GB)
    regions = Regions(m.regions_client)
    quotas = regions.fetch_quotas("lab-proj", "us-central1")
    assert quotas["CPUS"] == Quota(2400, 6 * 4) and quotas["IN_USE_ADDRESSES"] == Quota(2300, 6)
    assert quotas["DISKS_TOTAL_GB"].usage == 600 and quotas["SSD_TOTAL_GB"].usage == 0
    assert regions.fetch_quotas("lab-proj", "europe-west1")["CPUS"].usage == 0  # another region's VMs: not counted
    # private nodes hold no external address; a pd-balanced disk counts as SSD; an N2 node against N2_CPUS
    pools = [gke.NodePool(name="p", initial_node_count=1, config=gke.NodeConfig(
        machine_type="n2-standard-8", disk_type="pd-balanced", disk_size_gb=50))]
    g.client().create_cluster(parent=REGION, cluster=gke.Cluster(
        name="lab-2", node_pools=pools, network_config=gke.NetworkConfig(default_enable_private_nodes=True)))
    m.limits["CPUS"], m.other_usage = 24, {"CPUS": 2}
    quotas = regions.fetch_quotas("lab-proj", "us-central1")
    assert quotas["N2_CPUS"].usage == 24 and quotas["SSD_TOTAL_GB"].usage == 150
    assert quotas["IN_USE_ADDRESSES"].usage == 6 and quotas["CPUS"] == Quota(24, 26)
    m.quotas_unavailable = True  # fails open: no quotas, a warning
    assert regions.fetch_quotas("lab-proj", "us-central1") == {}
    m.fail_next("regions.get", "regions-permission")
    with pytest.raises(PermanentError, match="compute.regions.get"):
        regions.fetch_quotas("lab-proj", "us-central1")
