"""GKE backend, the ground every role stands on: where a lab lives (Place), the cluster's identity labels, and the GKE
calls (errors translated, operations polled)."""

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from google.api_core import exceptions as gexc
from google.cloud import container_v1 as gke

from dasklab.core.config import Config
from dasklab.core.errors import PermanentError, RecordUnreadable, TransientError
from dasklab.core.model import MANAGED_BY, NODE_DISK_TYPE, SHARED, TEARING_DOWN, Lab, LabSpec
from dasklab.adapters.release import chart_fullname
from dasklab.adapters.compute import Migs, Regions
from dasklab.adapters.googleapi import translate as _translate  # GKE's refusals → ours: the table shared with Compute
from dasklab.adapters.kube import Kube
from dasklab.adapters.records import LabRecords

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
SEEN_S = 30.0  # a cluster read this recently (the pass's listing) is used as read; an older one is read again
ZONE_LABEL = "topology.kubernetes.io/zone"
REMOVING_LABEL = "dasklab/removing"  # on a cordoned worker node: value = the namespace of the lab emptying it
DISK_TYPE = NODE_DISK_TYPE  # every machine family the schema offers supports it (C3 has no pd-standard, GKE's default)
EXCLUSION = "dasklab-lab-lifetime"  # the maintenance exclusion's name
LOW_COST = -1000  # pod-deletion-cost of a retired worker's pod: its ReplicaSet removes it first
HOLD_S = 86400  # the worker Deployment's minReadySeconds while an update's new workers join: old pods are kept
Status = gke.Cluster.Status
# The running clusters (Cluster.Status docstrings): RUNNING "fully usable"; RECONCILING "work is actively being done on
# the cluster, such as upgrading the master or node software"; DEGRADED "requires user action to restore full
# functionality" (its API and nodes still serve: the lab stays and says why). Only ERROR ("unusable. It will be
# automatically deleted") is a failed cluster.
UP = (Status.RUNNING, Status.RECONCILING, Status.DEGRADED)




@dataclass(frozen=True)
class Place:
    """Where a lab lives: its cluster, its namespace, its Helm release (and the chart's object names)."""

    cluster: str
    namespace: str
    release: str
    class_name: str = ""  # set when the cluster is its class's shared cluster

    @property
    def shared(self) -> bool:
        return bool(self.class_name)

    @property
    def fullname(self) -> str:
        return chart_fullname(self.release)

    @property
    def workers(self) -> str:
        return f"{self.fullname}-worker"


def class_cluster(class_name: str) -> str:
    """The shared cluster of a class: `<class>--shared` (cut, with a hash, to GKE's 40 characters)."""
    name = f"{class_name}--shared"
    if len(name) <= 40:
        return name
    import hashlib
    return f"{class_name[:29].rstrip('-')}--{hashlib.sha256(class_name.encode()).hexdigest()[:8]}"


def place_of(lab: "Lab | LabSpec | str") -> Place:
    """THE lab ↔ (cluster, namespace) mapping: a cluster of its own (named after the lab), or its class's shared
    cluster when its spec says placement "shared"; one namespace per lab always."""
    spec = lab.spec if isinstance(lab, Lab) else lab
    if isinstance(spec, str):
        return Place(cluster=spec, namespace=f"dasklab-{spec}", release=spec)
    if spec.placement == SHARED and spec.class_name:
        return Place(class_cluster(spec.class_name), f"dasklab-{spec.name}", spec.name, spec.class_name)
    return Place(cluster=spec.name, namespace=f"dasklab-{spec.name}", release=spec.name)


def build_labels(lab: Lab) -> dict[str, str]:
    """A cluster's resource labels: whose it is, nothing a user wrote. GKE copies them onto the cluster's VMs and
    disks (SetLabelsRequest docstring), where billing exports show them, and Compute allows 64 labels per resource,
    GKE's own `goog-*` labels included. A class's shared cluster is its class's, not its first lab's."""
    place = place_of(lab)
    if place.shared:
        return {"managed-by": MANAGED_BY, **class_labels(place)}
    owner = re.sub(r"[^a-z0-9_-]", "_", lab.spec.owner)[:63]  # an identity's '@' and '.' are no label characters
    return {"managed-by": MANAGED_BY, "lab": lab.name, "owner": owner,
            **({"class": lab.spec.class_name} if lab.spec.class_name else {})}


def class_labels(place: Place) -> dict[str, str]:
    """What marks a class's shared cluster (and its labs' namespaces)."""
    return {"placement": SHARED, "class": place.class_name} if place.shared else {}


def encode_description(lab: Lab) -> str:
    """A readable line (its record is in the lab records store)."""
    place = place_of(lab)
    return f"dasklab class {place.class_name}" if place.shared else f"dasklab lab {lab.name} of {lab.spec.owner}"


def build_maintenance_policy(lab: Lab) -> gke.MaintenancePolicy:
    """No GKE upgrade while the lab may live: a no-upgrades maintenance exclusion from its creation to its maximum
    lifetime plus an hour for the teardown (GKE allows such an exclusion up to 30 days; a lab lives 12 h at most).
    Auto-repair is not held off by exclusions: the controller still converges through GKE's own operations."""
    start = datetime.fromtimestamp(lab.state.created_at or time.time(), timezone.utc)
    window = gke.TimeWindow(start_time=start, end_time=start + timedelta(seconds=lab.spec.max_lifetime_s + 3600),
                            maintenance_exclusion_options=gke.MaintenanceExclusionOptions(
                                scope=gke.MaintenanceExclusionOptions.Scope.NO_UPGRADES))
    return gke.MaintenancePolicy(window=gke.MaintenanceWindow(maintenance_exclusions={EXCLUSION: window}))


class GkeBase:
    """What every role of GkeBackend shares: its clients, and reading a cluster."""

    def __init__(self, config: Config, clusters: gke.ClusterManagerClient, kube_for: Callable[[gke.Cluster], object],
                 migs: Migs, records: LabRecords, *, sleep: Callable[[float], None] = time.sleep,
                 regions: Regions | None = None):
        self.config, self.clusters, self._kube_for, self.migs, self.sleep = config, clusters, kube_for, migs, sleep
        self.regions = regions  # the region's quotas (None: not checked)
        self.records = records  # the labs' records (spec and state), in a store of their own (Firestore)
        self.parent = f"projects/{config.project}/locations/{config.location}"
        # the clusters read in the last SEEN_S (the listing of this pass, a get): where to connect, which pools; a
        # cache within a pass, never trusted across invocations (an older one is read again)
        self._seen_at: dict[str, tuple[gke.Cluster, float]] = {}
        self.missing_zones: tuple[str, ...] = ()  # zones the last ListClusters could not reach
        # what the last fetch_labs could not read, with why: {("lab", name): reason}
        self.unreadable: dict[tuple[str, str], RecordUnreadable] = {}

    def _path(self, place: Place) -> str:
        return f"{self.parent}/clusters/{place.cluster}"

    def _gcall(self, what: str, fn, **kwargs):
        try:
            return fn(**kwargs)
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, what) from e

    def _get(self, place: Place) -> gke.Cluster | None:
        try:
            cluster = self.clusters.get_cluster(name=self._path(place))
        except gexc.NotFound:
            self._seen_at.pop(place.cluster, None)
            return None
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"read cluster {place.cluster}") from e
        self._remember(cluster)
        return cluster

    def _remember(self, *clusters: gke.Cluster) -> None:
        now = time.monotonic()
        self._seen_at.update({c.name: (c, now) for c in clusters})

    def _seen(self, place: Place) -> gke.Cluster | None:
        """The cluster as read within the last SEEN_S (this pass), else None: the caller reads it again."""
        cluster, at = self._seen_at.get(place.cluster, (None, 0.0))
        return cluster if time.monotonic() - at < SEEN_S else None

    @staticmethod
    def _check_managed(cluster: gke.Cluster) -> None:
        if cluster.resource_labels.get("managed-by") != MANAGED_BY:
            raise PermanentError(f"cluster {cluster.name} is not managed by dasklab: refusing to touch it")

    def _running(self, place: Place) -> gke.Cluster:
        cluster = self._get(place)
        if cluster is None or cluster.status not in UP:
            raise TransientError(f"cluster {place.cluster} is not running")
        self._check_managed(cluster)
        return cluster

    def _kube(self, place: Place, cluster: gke.Cluster | None = None) -> Kube:
        cluster = cluster or self._seen(place) or self._get(place)
        if cluster is None or not cluster.endpoint:
            raise TransientError(f"cluster {place.cluster} has no Kubernetes endpoint yet")
        return Kube(self._kube_for(cluster))

    def _operations(self, cluster: gke.Cluster) -> tuple[list, str]:
        """Poll the cluster's unfinished operations (GKE advances them; polling is a read) → (those still
        unfinished, the error of the latest failed one)."""
        ops = self._gcall("list operations", self.clusters.list_operations, parent=self.parent).operations
        name = cluster.name
        mine = [o for o in ops if o.target_link.endswith(f"/clusters/{name}") or f"/clusters/{name}/" in o.target_link]
        pending, error = [], ""
        for op in mine:
            if op.status != gke.Operation.Status.DONE:
                op = self._gcall("poll operation", self.clusters.get_operation,
                                 name=f"{self.parent}/operations/{op.name}")
            if op.status != gke.Operation.Status.DONE:
                pending.append(op)
            elif op.error.message:
                error = op.error.message
        return pending, error

    def _wait(self, op, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while op.status != gke.Operation.Status.DONE and time.monotonic() < deadline:
            self.sleep(0.2)
            op = self._gcall("poll operation", self.clusters.get_operation, name=f"{self.parent}/operations/{op.name}")
        return op

    @staticmethod
    def _is_class_cluster(cluster: gke.Cluster) -> bool:
        return cluster.resource_labels.get("placement") == SHARED

    @staticmethod
    def _as_seen(lab: Lab, cluster: gke.Cluster | None) -> Lab:
        """A lab whose cluster someone else is deleting is tearing down."""
        if cluster is not None and cluster.status == Status.STOPPING and lab.state.phase != TEARING_DOWN:
            return lab.with_state(phase=TEARING_DOWN, reason="cluster being deleted")
        return lab
