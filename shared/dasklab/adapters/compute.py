"""Adapter for Compute Engine (google-cloud-compute): a GKE node pool's managed instance groups (per-zone sizes, and
the deletion of chosen instances, the only way to take a chosen node out of a pool: a resize removes at random), and
the region's quotas the labs' nodes count against."""

import re
from typing import Callable

from google.api_core import exceptions as gexc

from dasklab.adapters.googleapi import translate
from dasklab.core.errors import PermanentError, StepRefused
from dasklab.core.quotas import Quota

_MIG_URL = re.compile(r"projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/instanceGroupManagers/(?P<name>[^/]+)$")


def parse_mig(url: str) -> tuple[str, str, str]:
    """(project, zone, name) of an instance group manager URL, as GKE lists them in `instance_group_urls`."""
    m = _MIG_URL.search(url)
    if not m:
        raise PermanentError(f"not an instance group manager URL: {url}")
    return m["project"], m["zone"], m["name"]


class Migs:
    """The node pools' instance groups. The client (its import costs ~2 s) is built on first use only."""

    def __init__(self, client_factory: Callable[[], object]):
        self._factory, self._client = client_factory, None

    @property
    def client(self):
        if self._client is None:
            self._client = self._factory()
        return self._client

    def target_sizes(self, urls: list[str]) -> dict[str, int]:
        """zone → target size of the zone's groups (what GKE reports as the pool's node count in that zone)."""
        sizes = {}
        for url in urls:
            project, zone, name = parse_mig(url)
            try:
                size = self.client.get(project=project, zone=zone, instance_group_manager=name).target_size
                sizes[zone] = sizes.get(zone, 0) + size  # two groups in a zone during a blue-green upgrade
            except (gexc.GoogleAPICallError, gexc.RetryError) as e:
                raise translate(e, f"read instance group {name}") from e
        return sizes

    def delete_instances(self, url: str, instances: list[str]) -> None:
        """Delete exactly these instances (node names) and shrink the group by as many; instances that are gone
        already are skipped, so a repeated call is harmless."""
        from google.cloud.compute_v1 import InstanceGroupManagersDeleteInstancesRequest

        project, zone, name = parse_mig(url)
        body = InstanceGroupManagersDeleteInstancesRequest(
            instances=[f"zones/{zone}/instances/{i}" for i in instances], skip_instances_on_validation_error=True)
        try:
            self.client.delete_instances(project=project, zone=zone, instance_group_manager=name,
                                         instance_group_managers_delete_instances_request_resource=body)
        except gexc.NotFound:
            return  # the group is gone with its pool: nothing left to delete
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            error = translate(e, f"delete instances {', '.join(instances)} from {name}")
            if type(error) is PermanentError:  # a permission or policy refusing the scale-down: not the lab's fault
                raise StepRefused(f"{error}: the node(s) stay, cordoned, and their removal is tried again") from e
            raise error from e


class Regions:
    """The region's quotas (compute v1 `regions.get`: `Region.quotas`, each a metric with its limit and usage). The
    client is built on first use only."""

    def __init__(self, client_factory: Callable[[], object]):
        self._factory, self._client = client_factory, None

    def fetch_quotas(self, project: str, region: str) -> dict[str, Quota]:
        """metric → its limit and usage. Empty when the region reports none: regions.get fails open, with
        `quota_status_warning` set, when quota data is unavailable (Region docstring)."""
        if self._client is None:
            self._client = self._factory()
        try:
            found = self._client.get(project=project, region=region)
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise translate(e, f"read the quotas of region {region}") from e
        return {q.metric: Quota(q.limit, q.usage) for q in found.quotas}
