"""GKE backend adapter: one Standard cluster per lab (container v1), its Kubernetes API (adapters.kube), the node
pool's instance groups (adapters.compute) and the official Dask Helm release installed by an in-cluster Job.

A class's labs with placement "shared" share their class's cluster instead (`place_of`): each lab is a namespace
there (release, token, ResourceQuota, NetworkPolicies; its record names the class), the worker pool is sized for the
class's labs together, a node is removed only when no other lab's pod runs on it, and the last lab's teardown deletes
the cluster.

Where a lab's record lives: in Firestore (adapters.records, injected as `records`), one document per lab holding its
spec and state (the chart values, env and notes included); `Lab.version` is that document's update time, and every
write is a compare-and-swap on it. The record is written before the cluster is created and outlives it: a creation
whose ERROR cluster GKE removed is still a lab, failed once from its CREATE_CLUSTER operation's error. A cluster's
resource labels say only whose it is (`managed-by`, `lab`, `owner`, and `class`/`placement` for a class): GKE copies
them onto the node VMs and disks (SetLabelsRequest), where they reach billing exports, so nothing a user wrote goes
there, and the controller never needs a cluster operation (SetLabels) to record a decision. Labs created by a
version that kept the record on the labels or in a ConfigMap are not read by this one: drain them before upgrading.

Workers: the release names each Dask worker after its pod, so worker → pod → node is exact. Scale-up raises the
worker pool (per zone, never lowering a zone) and the Deployment's replicas. Scale-down gives exactly the retired
workers' pods a low pod-deletion-cost, retires them through the scheduler (reached through the API server's
service proxy), cordons and marks the nodes they empty, lowers the replicas (the ReplicaSet deletes exactly those
pods) and deletes exactly the marked nodes' instances from the pool's managed instance groups; GKE never picks.
An update whose worker pod template changes replaces the workers gracefully (apply_update): the new pods start
beside the old ones (the pool grown for both), join the scheduler, then the old workers retire through it, so their
results move to the new ones, before Kubernetes deletes the old pods.
"""

import base64
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Callable

from google.api_core import exceptions as gexc
from google.cloud import container_v1 as gke

from dasklab.core import logs
from dasklab.core.config import Config
from dasklab.core.errors import Gone, JupyterUnreachable, PermanentError, RecordUnreadable, SchedulerUnreachable, \
    StepRefused, TransientError
from dasklab.core.model import INSTALLING, MANAGED_BY, NO_JUPYTER, PROVISIONING, REQUESTED, SHARED, TEARING_DOWN, \
    JupyterActivity, Lab, LabSpec, WorkerProblem, build_system_pool_size, nodes_per_zone, parse_memory, \
    system_nodes_for
from dasklab.core.policy import Infra, plan_rollout
from dasklab.adapters.release import POOL_LABEL, TOKEN_KEY, TOKEN_SECRET, build_namespace, build_network_policies, \
    build_quota, build_release, build_token_secret, chart_fullname
from dasklab.adapters.compute import Migs, parse_mig
from dasklab.adapters.googleapi import translate as _translate  # GKE's refusals → ours: the table shared with Compute
from dasklab.adapters.dashboard import Dashboard
from dasklab.adapters.jupyter import JupyterApi
from dasklab.adapters.kube import DELETION_COST, Kube
from dasklab.adapters.records import LabRecords

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
ZONE_LABEL = "topology.kubernetes.io/zone"
REMOVING_LABEL = "dasklab/removing"  # on a cordoned worker node: value = the namespace of the lab emptying it
DISK_TYPE = "pd-balanced"  # every machine family the schema offers supports it (C3 has no pd-standard, GKE's default)
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


# --- what a cluster says of itself (pure) ---

def build_labels(lab: Lab) -> dict[str, str]:
    """A cluster's resource labels: whose it is, nothing a user wrote. GKE copies them onto the cluster's VMs and
    disks (SetLabelsRequest docstring), where billing exports show them, and Compute allows 64 labels per resource,
    GKE's own `goog-*` labels included. A class's shared cluster is its class's, not its first lab's."""
    place = place_of(lab)
    if place.shared:
        return {"managed-by": MANAGED_BY, **class_labels(place)}
    return {"managed-by": MANAGED_BY, "lab": lab.name, "owner": lab.spec.owner,
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


PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
PIP_FAILURE = ("EXTRA_PIP_PACKAGES", "pip install", "No matching distribution", "Could not find a version")
# The chart's images run dask-docker's base/prepare.sh first: under `set -x` but not `set -e`, it echoes this, runs
# `pip install $EXTRA_PIP_PACKAGES` and then execs the worker whatever pip said, so a failed install leaves a
# running worker without the packages, and pip's ERROR lines at the head of the container's log.
PIP_STARTED = "EXTRA_PIP_PACKAGES environment variable found"


def build_install_failure(log_head: str) -> str:
    """pip's error lines from the head of a container's log, when its EXTRA_PIP_PACKAGES install failed ("" else)."""
    if PIP_STARTED not in log_head:
        return ""
    return "\n".join(line for line in log_head.splitlines() if line.startswith("ERROR: "))


def _epoch(when) -> float:
    return when.timestamp() if hasattr(when, "timestamp") else 0.0


def pod_problems(pod, memory_limit: int) -> list[WorkerProblem]:
    """What a worker pod's status says (core/v1 PodStatus): the PodScheduled condition False/Unschedulable with
    the scheduler's message; per container, state.waiting (CrashLoopBackOff, ErrImagePull, ImagePullBackOff) and
    lastState.terminated (reason OOMKilled, exit code 137) with restartCount. The crash log is added by the caller."""
    name, status, found = pod.metadata.name, pod.status, []
    for cond in status.conditions or ():
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            found.append(WorkerProblem("pending", name, cond.message or "Unschedulable"))
    limits = {c.name: ((c.resources and c.resources.limits) or {}).get("memory") for c in pod.spec.containers or ()}
    for c in status.container_statuses or ():
        waiting = c.state and c.state.waiting
        last = c.last_state and c.last_state.terminated
        limit = parse_memory(limits[c.name]) if limits.get(c.name) else memory_limit
        if waiting and waiting.reason in PULL_FAILURES:
            found.append(WorkerProblem("image-pull", name, f"{waiting.reason}: {waiting.message or ''}".strip(": ")))
            continue
        if not last:
            continue
        ended = f"{last.reason or 'terminated'}, exit code {last.exit_code}"
        if waiting and waiting.reason:
            ended = f"{waiting.reason}; last run {ended}"
        if last.reason == "OOMKilled":
            kind = "oom-killed"
        else:
            kind = "crash-looping" if waiting and waiting.reason == "CrashLoopBackOff" else "restarting"
        found.append(WorkerProblem(kind, name, ended, at=_epoch(last.finished_at), restarts=c.restart_count or 0,
                                   memory_limit=limit if kind == "oom-killed" else 0))
    return found


class GkeBackend:
    """The Backend protocol on GKE. Clients are injected (tests: the stand-ins); `from_config` builds real ones."""

    installs_at_start = True  # the chart's images pip-install EXTRA_PIP_PACKAGES in their entrypoint

    def __init__(self, config: Config, clusters: gke.ClusterManagerClient, kube_for: Callable[[gke.Cluster], object],
                 migs: Migs, records: LabRecords, *, sleep: Callable[[float], None] = time.sleep):
        self.config, self.clusters, self._kube_for, self.migs, self.sleep = config, clusters, kube_for, migs, sleep
        self.records = records  # the labs' records (spec and state), in a store of their own (Firestore)
        self.parent = f"projects/{config.project}/locations/{config.location}"
        self._seen: dict[str, gke.Cluster] = {}  # last cluster read by name: its endpoint and CA, to connect
        self.missing_zones: tuple[str, ...] = ()  # zones the last ListClusters could not reach
        # what the last fetch_labs could not read, with why: {("lab", name): reason}
        self.unreadable: dict[tuple[str, str], RecordUnreadable] = {}

    @classmethod
    def from_config(cls, config: Config) -> "GkeBackend":
        """Real clients with the function's identity (google.auth.default); Kubernetes without gcloud/kubeconfig:
        the cluster's endpoint and CA certificate, and an OAuth token refreshed whenever it is no longer valid."""
        import google.auth
        import kubernetes.client
        from google.auth.transport.requests import Request

        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
        apis: dict[tuple[str, str], kubernetes.client.ApiClient] = {}

        def kube_for(cluster: gke.Cluster):
            key = (cluster.name, cluster.endpoint)
            if key not in apis:
                with tempfile.NamedTemporaryFile("wb", suffix=".crt", delete=False) as ca:
                    ca.write(base64.b64decode(cluster.master_auth.cluster_ca_certificate))
                conf = kubernetes.client.Configuration(host=f"https://{cluster.endpoint}")
                conf.ssl_ca_cert = ca.name
                apis[key] = kubernetes.client.ApiClient(conf)
            if not credentials.valid:
                credentials.refresh(Request())
            apis[key].configuration.api_key = {"authorization": f"Bearer {credentials.token}"}
            return apis[key]

        def compute():
            from google.cloud import compute_v1
            return compute_v1.InstanceGroupManagersClient(credentials=credentials)

        from dasklab.adapters.records import FirestoreLabRecords
        return cls(config, gke.ClusterManagerClient(credentials=credentials), kube_for, Migs(compute),
                   FirestoreLabRecords(config.project, config.firestore_database))

    # --- GKE calls ---

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
            self._seen.pop(place.cluster, None)
            return None
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"read cluster {place.cluster}") from e
        self._seen[place.cluster] = cluster
        return cluster

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
        cluster = cluster or self._seen.get(place.cluster) or self._get(place)
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

    # --- records ---

    @staticmethod
    def _is_class_cluster(cluster: gke.Cluster) -> bool:
        return cluster.resource_labels.get("placement") == SHARED

    @staticmethod
    def _as_seen(lab: Lab, cluster: gke.Cluster | None) -> Lab:
        """A lab whose cluster someone else is deleting is tearing down."""
        if cluster is not None and cluster.status == Status.STOPPING and lab.state.phase != TEARING_DOWN:
            return lab.with_state(phase=TEARING_DOWN, reason="cluster being deleted")
        return lab

    def fetch_labs(self) -> list[Lab]:
        """Every lab record (one query) beside one ListClusters (the clusters' status; zones it could not reach are
        kept in `missing_zones`: the pass is incomplete). A record that cannot be read is left out and said in
        `unreadable` with its reason: the other labs go on. A record whose cluster is gone is still listed (a
        failed creation GKE removed: fetch_infra finds its operation's error)."""
        with ThreadPoolExecutor(max_workers=2) as calls:  # one listing of each, side by side
            clusters = calls.submit(self._gcall, "list clusters", self.clusters.list_clusters, parent=self.parent)
            records = calls.submit(self.records.fetch_records)
            listing, (labs, unread) = clusters.result(), records.result()
        self.missing_zones = tuple(listing.missing_zones)
        managed = {c.name: c for c in listing.clusters if c.resource_labels.get("managed-by") == MANAGED_BY}
        self._seen.update(managed)  # others: never touched
        for name, reason in sorted(unread.items()):
            logs.emit("WARNING", lab=name, action="observe", reason=f"record unreadable, lab left alone: {reason}")
        self.unreadable = {("lab", name): RecordUnreadable(name, reason) for name, reason in unread.items()}
        known = {place_of(lab).cluster for lab in labs} | {place_of(name).cluster for name in unread}
        for name in sorted(n for n, c in managed.items() if n not in known and c.status != Status.STOPPING):
            if not self._is_class_cluster(managed[name]):  # (a class's cluster is kept for labs still to come)
                logs.emit("WARNING", lab=name, action="observe", reason=f"managed cluster {name} has no lab record "
                          "(created by a version that kept it on the cluster?): left alone; drain before upgrading")
        return [self._as_seen(lab, managed.get(place_of(lab).cluster)) for lab in labs]

    def fetch_lab(self, name: str) -> Lab | None:
        """Its record (RecordUnreadable if it cannot be read), None if it has none; PermanentError if a cluster of
        that name exists that dasklab does not manage."""
        lab = self.records.fetch_record(name)
        cluster = self._get(place_of(lab or name))
        if lab is None:
            if cluster is not None and not self._is_class_cluster(cluster):
                self._check_managed(cluster)
            return None
        return self._as_seen(lab, cluster)

    def apply_record(self, lab: Lab) -> Lab:
        return self.records.apply_record(lab)

    def apply_forget(self, lab: Lab) -> bool:
        """The record goes once the infrastructure is gone; False if another invocation forgot it first."""
        return self.records.apply_forget(lab)

    def _failed_creation(self, place: Place, since: float) -> str:
        """The error of the latest CREATE_CLUSTER operation of the cluster, if it failed after `since` (the lab's
        creation): GKE removes a cluster whose creation failed, and the operation is the evidence left."""
        ops = self._gcall("list operations", self.clusters.list_operations, parent=self.parent).operations
        mine = [o for o in ops if o.operation_type == gke.Operation.Type.CREATE_CLUSTER
                and o.target_link.endswith(f"/clusters/{place.cluster}") and o.start_time]
        if not mine:
            return ""
        op = max(mine, key=lambda o: o.start_time)
        started = datetime.fromisoformat(op.start_time.replace("Z", "+00:00")).timestamp()
        if op.status != gke.Operation.Status.DONE or not op.error.message or started < since - 300:
            return ""  # (300 s: GKE's clock and ours may differ a little)
        return f"operation {op.name}: {op.error.message}"

    # --- provisioning ---

    def _zones(self) -> list[str]:
        return [z.strip() for z in self.config.node_zones.split(",") if z.strip()]

    def apply_create(self, lab: Lab) -> bool:
        """Record the lab (create = compare-and-swap: False if it exists), then create its cluster; a refused
        creation drops the record again (the refusal is reported by the caller, once). A shared lab: the first of
        its class creates the class's cluster; the others, once it runs, get their namespace and their record
        (TransientError until then: the class step retries them)."""
        place = place_of(lab)
        if place.shared:
            cluster = self._get(place)
            if cluster is not None:
                self._check_managed(cluster)
                if cluster.resource_labels.get("class") != place.class_name:
                    raise PermanentError(f"cluster {cluster.name} is not the shared cluster of class "
                                         f"{place.class_name}")
                if cluster.status not in UP:
                    raise TransientError(f"class cluster {cluster.name} is {cluster.status.name}: lab {lab.name} is "
                                         "created in it once it runs")
                self._kube(place, cluster).create(build_namespace(place.namespace, lab.name, place.class_name))
                return self.records.apply_create(lab) is not None
        recorded = self.records.apply_create(lab)
        if recorded is None:
            return False
        try:
            created = self._create_cluster(lab, place)
        except PermanentError:
            self.records.apply_forget(recorded)
            raise
        if not created and place.shared:  # created meanwhile by another lab of the class: this lab goes in once it runs
            self.records.apply_forget(recorded)
            raise TransientError(f"class cluster {place.cluster} created concurrently: retrying {lab.name}")
        return True

    def _create_cluster(self, lab: Lab, place: Place) -> bool:
        cfg, spec = self.config, lab.spec
        zones = self._zones()
        zone_count = cfg.zone_count
        off = gke.NodePoolAutoscaling(enabled=False)  # the controller sizes the pools
        account = {"service_account": cfg.node_service_account, "oauth_scopes": [CLOUD_PLATFORM]} \
            if cfg.node_service_account else {}  # with its own account a node's access is IAM's, not scopes'
        # a class's cluster: system nodes for every student's scheduler and Jupyter, worker nodes for their initial
        # workers, and Dataplane V2, which enforces NetworkPolicy with no separate setting
        # (cloud.google.com/kubernetes-engine/docs/concepts/dataplane-v2)
        students = max(1, spec.class_size) if place.shared else 1
        system = build_system_pool_size(students, place.shared, cfg.system_machine_type, cfg.system_nodes, zone_count)
        network = {"network_config": gke.NetworkConfig(
            datapath_provider=gke.DatapathProvider.ADVANCED_DATAPATH)} if place.shared else {}
        cluster = gke.Cluster(
            name=place.cluster, description=encode_description(lab), **network,
            resource_labels=build_labels(lab), locations=zones, maintenance_policy=build_maintenance_policy(lab),
            node_pools=[
                gke.NodePool(name=cfg.system_pool, initial_node_count=system, autoscaling=off,
                             config=gke.NodeConfig(machine_type=cfg.system_machine_type, disk_type=DISK_TYPE,
                                                   **account)),
                gke.NodePool(name=cfg.worker_pool, autoscaling=off,
                             initial_node_count=nodes_per_zone(spec.nodes_for(lab.state.target_workers * students),
                                                               zone_count),
                             config=gke.NodeConfig(machine_type=spec.machine_type, spot=spec.spot, disk_type=DISK_TYPE,
                                                   **account)),
            ])
        try:
            self.clusters.create_cluster(parent=self.parent, cluster=cluster)
        except gexc.AlreadyExists:
            return False
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"create cluster {cluster.name}") from e
        return True

    def apply_provision(self, lab: Lab) -> None:
        """(Re)create the lab's cluster (its record exists): a crash came between the two, or the class's cluster
        is gone."""
        self._create_cluster(lab, place_of(lab))

    def _release(self, lab: Lab):
        cfg, place = self.config, place_of(lab)
        return build_release(lab.spec, release=place.release, namespace=place.namespace, chart_repo=cfg.chart_repo,
                             chart_version=cfg.chart_version, helm_image=cfg.helm_image,
                             system_pool=cfg.system_pool, worker_pool=cfg.worker_pool,
                             replicas=lab.state.revision_workers if lab.spec.revision > 1 else None)

    def release_job(self, lab: Lab) -> str:
        """The name of the Helm Job of the lab's recorded revision (a hash of what it installs)."""
        return self._release(lab).job_name

    def fetch_infra(self, lab: Lab) -> Infra:
        place = place_of(lab)
        cluster = self._get(place)
        if cluster is None:
            failed = lab.state.phase in (REQUESTED, PROVISIONING, INSTALLING) and \
                self._failed_creation(place, lab.state.created_at)
            return Infra("error", detail=f"{failed} (GKE removed the cluster)") if failed else Infra("absent")
        pending, error = self._operations(cluster)
        cluster = self._get(place)
        if cluster is None:
            return Infra("absent")
        if cluster.status == Status.PROVISIONING:
            return Infra("creating", detail="cluster being created" + (
                f" (operation {pending[0].name} {pending[0].status.name})" if pending else ""))
        if cluster.status == Status.STOPPING:
            return Infra("deleting")
        if cluster.status == Status.ERROR:
            return Infra("error", detail=cluster.status_message or error or f"cluster {cluster.status.name}")
        if cluster.status not in UP:
            return Infra("creating", detail=f"cluster {cluster.status.name}")
        if place.shared and lab.state.phase == TEARING_DOWN:  # the lab is its namespace: the cluster stays
            phase = self._kube(place, cluster).namespace_phase(place.namespace)
            if phase == "Terminating":
                return Infra("deleting", detail=f"namespace {place.namespace} being deleted")
            if phase is None:
                return Infra("absent")
        release, detail = self._release_state(lab, cluster)
        note = self._cluster_note(cluster)
        return Infra("running", release, "; ".join(d for d in (note, detail) if d))

    @staticmethod
    def _cluster_note(cluster: gke.Cluster | None) -> str:
        """What a running cluster that is not plainly RUNNING says (DEGRADED, RECONCILING: its status message)."""
        if cluster is None or cluster.status == Status.RUNNING or cluster.status not in UP:
            return ""
        return f"cluster {cluster.status.name}" + (f": {cluster.status_message}" if cluster.status_message else "")

    def _release_state(self, lab: Lab, cluster: gke.Cluster) -> tuple[str, str]:
        """Follow the install Job: absent, installing, failed (with the tail of its log) or deployed (Job done
        and the scheduler answering through the API server's proxy)."""
        place, release = place_of(lab), self._release(lab)
        kube = self._kube(place, cluster)
        job = kube.read_job(place.namespace, release.job_name)
        if job is None:
            return "absent", ""
        conditions = {c.type: c.status for c in (job.status.conditions or [])}
        if conditions.get("Failed") == "True":
            tail = kube.job_log_tail(place.namespace, release.job_name).strip()[-800:]
            return "failed", f"helm job {release.job_name} failed: {tail}"
        if conditions.get("Complete") != "True":
            return "installing", f"helm job {release.job_name} running"
        try:
            self.dashboard(lab).transport.get("/health")
        except SchedulerUnreachable as e:
            return "installing", f"release installed; scheduler not answering yet ({e})"
        return "deployed", ""

    def apply_install(self, lab: Lab) -> None:
        """Namespace, Jupyter's token Secret, installer RBAC, values ConfigMap and the Helm Job (each created
        if absent: a repeated install is harmless; a later invocation follows the Job). In a shared cluster the
        namespace also gets its ResourceQuota and NetworkPolicies first, so no pod of the release runs without them."""
        place = place_of(lab)
        kube = self._kube(place, self._running(place))
        release = self._release(lab)
        kube.create(build_namespace(place.namespace, lab.name, place.class_name))
        kube.create(build_token_secret(place.namespace, lab.name, secrets.token_urlsafe(32)))
        if place.shared:
            self._grow_system_pool(lab, place, kube)
            for manifest in [build_quota(lab.spec, release.values, place.namespace),
                             *build_network_policies(lab.spec, place.release, place.namespace)]:
                kube.create(manifest)
        for manifest in release.manifests[1:]:
            kube.create(manifest)

    def _grow_system_pool(self, lab: Lab, place: Place, kube: Kube) -> None:
        """A class cluster's system pool holds every lab's scheduler and Jupyter: raised when the class has grown
        past what it was created for (students added to the roster). Never lowered."""
        cluster = self._seen.get(place.cluster) or self._running(place)
        pool = next((p for p in cluster.node_pools if p.name == self.config.system_pool), None)
        if pool is None:
            return
        sizes = self.migs.target_sizes(list(pool.instance_group_urls))
        labs, unread = self.records.fetch_records(place.class_name)
        labs = len(labs) + len(unread)
        need = nodes_per_zone(system_nodes_for(labs, self.config.system_machine_type), len(sizes))
        if sizes and min(sizes.values()) < need:
            resize = gke.SetNodePoolSizeRequest(name=f"{self._path(place)}/nodePools/{pool.name}", node_count=need)
            self._gcall(f"resize pool {pool.name}", self.clusters.set_node_pool_size, request=resize)
            logs.emit("INFO", lab=lab.name, action="resize-pool", pool=pool.name, **{"from": sizes, "to": need},
                      reason=f"{labs} labs' schedulers and Jupyters need {need} system node(s) per zone")

    def apply_environment(self, spec) -> None:
        """Nothing: the chart's images install EXTRA_PIP_PACKAGES at container start."""

    def apply_update(self, lab: Lab) -> bool:
        """One step of running the recorded revision, re-derived from the cluster at each call:
        1. no Job of this revision yet: hold the worker rollout, then create the revision's values ConfigMap and
           hash-named Job running `helm upgrade` (created if absent, so a repeat is the same Job). The hold is the
           worker Deployment's minReadySeconds at HOLD_S: with the release's RollingUpdate maxSurge 100 % /
           maxUnavailable 0, Kubernetes starts every new worker pod at once and keeps each old one until new ones
           are available, which they are not while held; helm's three-way merge keeps it (the chart renders no
           minReadySeconds);
        2. the Job runs: wait (a failed Job is reported by fetch_infra: the lab fails with the Job's log tail);
        3. the Job completed: `_roll_workers`. True once no worker pod of an older template is left."""
        place = place_of(lab)
        cluster = self._running(place)
        kube = self._kube(place, cluster)
        release = self._release(lab)
        job = kube.read_job(place.namespace, release.job_name)
        if job is None:
            kube.set_min_ready(place.namespace, place.workers, HOLD_S)  # before the Job: a crash between repeats it
            for manifest in release.manifests[1:]:  # the namespace exists; RBAC is created if absent
                kube.create(manifest)
            logs.emit("INFO", lab=lab.name, action="helm-upgrade", job=release.job_name,
                      reason=f"revision {lab.spec.revision}: helm upgrade by Job {release.job_name}, the old "
                             f"workers held until their replacements joined")
            return False
        conditions = {c.type: c.status for c in (job.status.conditions or [])}
        if conditions.get("Complete") != "True":
            return False
        return self._roll_workers(lab, cluster, kube)

    def _roll_workers(self, lab: Lab, cluster: gke.Cluster, kube: Kube) -> bool:
        """One step of replacing the worker pods of an older template (plan_rollout, as the local backend): room
        in the pool for old + new pods, then wait until every new pod's worker joined the scheduler, then retire
        the old workers through it (their results move to the new ones) and lift the hold, so Kubernetes deletes
        the old pods. The old/new split is each pod's pod-template-hash against the newest ReplicaSet's."""
        place = place_of(lab)
        deployment = kube.deployment(place.namespace, place.workers)
        if deployment is None:
            raise TransientError(f"lab {lab.name}: no worker Deployment")
        if (deployment.status.observed_generation or 0) < (deployment.metadata.generation or 0):
            return False  # the Deployment controller has not acted on the new template yet
        current = kube.current_template_hash(place.namespace, deployment)
        pods = kube.pods_of(place.namespace, place.workers)
        stale = {p.metadata.name for p in pods if (p.metadata.labels or {}).get("pod-template-hash") != current}
        fresh = {p.metadata.name for p in pods} - stale
        want = deployment.spec.replicas or 0
        if not stale:
            if deployment.spec.min_ready_seconds:
                kube.set_min_ready(place.namespace, place.workers, 0)
            return True
        self._ensure_nodes(lab, cluster, len(stale) + want,
                           f"{len(stale)} old and {want} new workers run side by side while they are replaced")
        dashboard = self.dashboard(lab)
        workers = dashboard.fetch_workers()
        step = plan_rollout(len(stale), len(fresh), len({w.name for w in workers} & fresh), want)
        if step.action != "retire":
            return False  # Kubernetes starts the new pods; their workers join
        addresses = [w.address for w in workers if w.name in stale]
        logs.emit("INFO", lab=lab.name, action="rollout-retire", revision=lab.spec.revision, reason=step.reason,
                  workers=sorted(w.name for w in workers if w.name in stale))
        if set(dashboard.apply_retire(addresses)) != set(addresses):
            return False  # one still holds results: the hold stays, a later pass retires it
        kube.set_min_ready(place.namespace, place.workers, 0)  # the new pods are available: the old ones go
        return False

    # --- workers and nodes ---

    def fetch_requested(self, lab: Lab) -> int:
        place = place_of(lab)
        return self._kube(place).replicas(place.namespace, place.workers) or 0

    def fetch_worker_health(self, lab: Lab) -> tuple[WorkerProblem, ...]:
        """From the worker pods' status, with the previous container's log tail for a crash, and for a running
        worker the head of its log: a failed EXTRA_PIP_PACKAGES install at container start shows there."""
        place = place_of(lab)
        kube, found = self._kube(place), []
        for pod in kube.pods_of(place.namespace, place.workers):
            problems = pod_problems(pod, lab.spec.worker_memory)
            for problem in problems:
                if problem.kind in ("crash-looping", "restarting"):
                    tail = kube.pod_log_tail(place.namespace, pod.metadata.name, previous=True)
                    kind = "install-failed" if any(word in tail for word in PIP_FAILURE) else problem.kind
                    problem = replace(problem, kind=kind, log_tail=tail)
                found.append(problem)
            running = [c for c in pod.status.container_statuses or () if c.state and c.state.running]
            if running and not problems:  # a worker that started: did its packages install?
                errors = build_install_failure(kube.pod_log_head(place.namespace, pod.metadata.name))
                if errors:
                    found.append(WorkerProblem("install-failed", pod.metadata.name,
                                               "the worker runs without them: the image starts it after a failed "
                                               "pip install", log_tail=errors))
        return tuple(found)

    def dashboard(self, lab: Lab) -> Dashboard:
        place = place_of(lab)
        kube = self._kube(place)
        nodes: dict[str, str] = {}

        def node_of(worker: str) -> str:  # worker name = pod name
            if worker not in nodes:
                nodes.update({p.metadata.name: p.spec.node_name or f"unscheduled:{p.metadata.name}"
                              for p in kube.pods_of(place.namespace, place.workers)})
            return nodes.get(worker, worker)

        return Dashboard(kube.proxy(place.namespace, f"{place.fullname}-scheduler", f"{place.fullname}-webui"),
                         node_of=node_of)

    def fetch_jupyter(self, lab: Lab) -> JupyterActivity:
        """The chart's Jupyter through the API server's service proxy (`<fullname>-jupyter` port 80), logging in
        with the token of the Secret the controller made; NO_JUPYTER if the values disable it or no pod serves."""
        if ((lab.spec.values or {}).get("jupyter") or {}).get("enabled", True) is False:
            return NO_JUPYTER
        place = place_of(lab)
        kube = self._kube(place)
        token = kube.read_secret(place.namespace, TOKEN_SECRET, TOKEN_KEY)
        if token is None:
            raise JupyterUnreachable(f"lab {lab.name}: no Secret {TOKEN_SECRET}")
        return JupyterApi(kube.proxy(place.namespace, f"{place.fullname}-jupyter", "80"), token).fetch_activity()

    def _worker_pool(self, cluster: gke.Cluster):
        pool = next((p for p in cluster.node_pools if p.name == self.config.worker_pool), None)
        if pool is None:
            raise PermanentError(f"cluster {cluster.name} has no node pool {self.config.worker_pool}")
        return pool

    def _class_targets(self, lab: Lab, target: int, kube: Kube) -> dict[str, int]:
        """Worker targets of the labs in the pool: this lab's `target`; in a shared cluster, the other labs' recorded
        targets too."""
        place = place_of(lab)
        if not place.shared:
            return {lab.name: target}
        labs, _ = self.records.fetch_records(place.class_name)
        return {**{other.name: other.state.target_workers for other in labs}, lab.name: target}

    def _nodes_needed(self, lab: Lab, target: int, kube: Kube) -> int:
        """Worker nodes the pool needs for the workers of every lab in it, packed together."""
        return lab.spec.nodes_for(sum(self._class_targets(lab, target, kube).values()))

    def _ensure_nodes(self, lab: Lab, cluster: gke.Cluster, workers: int, why: str) -> None:
        """Room in the worker pool for `workers` pods of this lab (and, in a shared cluster, the other labs'
        targets): its size raised per zone, never lowering a zone (a lower count would let GKE remove nodes at
        random); TransientError while another operation runs on the cluster."""
        place = place_of(lab)
        pool = self._worker_pool(cluster)
        sizes = self.migs.target_sizes(list(pool.instance_group_urls))
        nodes = self._nodes_needed(lab, workers, self._kube(place, cluster))
        need = nodes_per_zone(nodes, len(sizes))
        if sizes and sum(sizes.values()) < nodes:  # zones may differ after chosen removals
            pending, _ = self._operations(cluster)
            if pending:
                raise TransientError(f"operation {pending[0].name} runs on cluster {cluster.name}: resize later")
            count = max(need, *sizes.values())
            resize = gke.SetNodePoolSizeRequest(name=f"{self._path(place)}/nodePools/{pool.name}", node_count=count)
            self._gcall(f"resize pool {pool.name}", self.clusters.set_node_pool_size, request=resize)
            logs.emit("INFO", lab=lab.name, action="resize-pool", **{"from": sizes, "to": count},
                      reason=f"{why}: {workers} workers need {need} node(s) per zone")

    def apply_workers(self, lab: Lab, target: int) -> None:
        """Nodes first (per zone, never lowering a zone), then the Deployment's replicas."""
        place = place_of(lab)
        cluster = self._running(place)
        self._ensure_nodes(lab, cluster, target, f"a target of {target}")
        kube = self._kube(place, cluster)
        replicas = kube.replicas(place.namespace, place.workers)
        if replicas is None:
            raise TransientError(f"lab {lab.name}: no worker Deployment yet")
        if replicas < target:
            if place.shared and kube.ensure_quota(build_quota(lab.spec, self._release(lab).values, place.namespace)):
                logs.emit("INFO", lab=lab.name, action="resize-quota", reason=f"quota for at most "
                          f"{lab.spec.max_workers} workers of {lab.spec.worker_cpu} CPU / {lab.spec.worker_memory} B")
            kube.scale(place.namespace, place.workers, target)

    def apply_scale_down(self, lab: Lab, addresses: list[str], target: int) -> None:
        place = place_of(lab)
        cluster = self._running(place)
        kube, dashboard = self._kube(place, cluster), self.dashboard(lab)
        names = {w.address: w.name for w in dashboard.fetch_workers()}
        retiring = {names[a] for a in addresses if a in names}
        pods = kube.pods_of(place.namespace, place.workers)
        for pod in pods:  # exactly the retired workers' pods are cheap to delete (stale marks are cleared)
            want = str(LOW_COST) if pod.metadata.name in retiring else None
            if (pod.metadata.annotations or {}).get(DELETION_COST) != want:
                kube.set_deletion_cost(place.namespace, pod.metadata.name, want and LOW_COST)
        # the scheduler moves their results to the survivors first; a worker it did not retire keeps its pod
        retired = {names[a] for a in dashboard.apply_retire(addresses) if a in names}
        for name in sorted(retiring - retired):
            kube.set_deletion_cost(place.namespace, name, None)
        target, retiring = target + len(retiring - retired), retired
        on_node: dict[str, set[str]] = {}
        for pod in pods:
            on_node.setdefault(pod.spec.node_name or "", set()).add(pod.metadata.name)
        emptied = sorted(n for n, held in on_node.items() if n and held <= retiring
                         and not (place.shared and self._others_on(kube, n, place)))
        for node in emptied:  # cordoned and marked before the pods go, so a crash cannot lose track of them
            kube.cordon(node, {REMOVING_LABEL: place.namespace})
        kube.scale(place.namespace, place.workers, target)
        survivors = {p.metadata.name for p in kube.pods_of(place.namespace, place.workers)}
        if survivors & retiring or len(survivors) != target:
            logs.emit("WARNING", lab=lab.name, action="retire", reason="the ReplicaSet kept pods of retired workers",
                      workers=sorted(survivors & retiring))
        self._remove_marked_nodes(lab, cluster, kube)

    def apply_settle(self, lab: Lab) -> None:
        """Between scaling decisions: follow a pool operation in flight, finish an interrupted node removal, and
        remove worker nodes left empty beyond what the target needs (an upgrade replaced a node marked for removal
        under a new name, or a regional pool has a node in every zone). Nothing is removed while an operation GKE
        or we started changes the pool. The cluster as listed in this pass will do (no GKE call at rest)."""
        place = place_of(lab)
        cluster = self._seen.get(place.cluster) or self._get(place)
        if cluster is None or cluster.status not in UP:
            return
        if cluster.status != Status.RUNNING or any(pool.status != gke.NodePool.Status.RUNNING
                                                   for pool in cluster.node_pools):
            if self._operations(cluster)[0]:
                return  # GKE replaces or resizes nodes now: their names are not settled yet
            cluster = self._get(place) or cluster
        kube = self._kube(place, cluster)
        nodes = kube.nodes(f"{POOL_LABEL}={self.config.worker_pool}")  # one call at rest
        if self._mark_excess_nodes(lab, cluster, kube, nodes):
            nodes = kube.nodes(f"{POOL_LABEL}={self.config.worker_pool}")
        self._remove_marked_nodes(lab, cluster, kube, nodes)

    def _mark_excess_nodes(self, lab: Lab, cluster: gke.Cluster, kube: Kube, nodes: list) -> bool:
        """Cordon and mark the empty worker nodes beyond `nodes_for(target)`, once every worker of the target runs.
        The pool's instance groups say how many nodes there are (Node objects lag behind an upgrade's changes), and
        only nodes of its current groups are candidates. True if it marked any."""
        place = place_of(lab)
        target = lab.state.target_workers
        unmarked = [n for n in nodes if REMOVING_LABEL not in (n.metadata.labels or {})]
        targets = self._class_targets(lab, target, kube)
        needed = lab.spec.nodes_for(sum(targets.values()))
        excess = len(unmarked) - needed
        if excess <= 0:
            return False
        if place.shared and (lab.name != min(targets) or any(not self._daemon(p) for p in kube.pods_on(""))):
            return False  # one lab of the class trims the shared pool, and not while any pod waits for a node
        pods = kube.pods_of(place.namespace, place.workers)
        if kube.replicas(place.namespace, place.workers) != target or len(pods) != target \
                or any(not p.spec.node_name for p in pods):
            return False  # workers still come or go: a node that looks empty may be about to get one
        urls = list(self._worker_pool(cluster).instance_group_urls)
        excess = min(excess, sum(self.migs.target_sizes(urls).values()) - needed)
        if excess <= 0:
            return False
        busy = {p.spec.node_name for p in pods}
        empty = sorted(n.metadata.name for n in unmarked if n.metadata.name not in busy
                       and any(n.metadata.name.startswith(parse_mig(u)[2].removesuffix("-grp") + "-") for u in urls)
                       and not any(not self._daemon(p) for p in kube.pods_on(n.metadata.name)))[:excess]
        for name in empty:
            kube.cordon(name, {REMOVING_LABEL: place.namespace})
            logs.emit("INFO", lab=lab.name, action="mark-node", node=name,
                      reason=f"empty, and {len(unmarked)} worker nodes are more than {target} workers need")
        return bool(empty)

    @staticmethod
    def _daemon(pod) -> bool:
        return any(ref.kind == "DaemonSet" for ref in pod.metadata.owner_references or ())

    def _others_on(self, kube: Kube, node: str, place: Place) -> list:
        """Pods on the node that are not DaemonSets' nor of this lab (in a shared pool: other students')."""
        return [p for p in kube.pods_on(node) if not self._daemon(p) and p.metadata.namespace != place.namespace]

    @staticmethod
    def _group_of(node: str, zone: str, urls: list[str]) -> str | None:
        """The instance group a node belongs to: one of its zone's (two per zone during a blue-green upgrade), whose
        name without -grp begins the node's name (GKE names instances <group base>-<suffix>)."""
        mine = [u for u in urls if parse_mig(u)[1] == zone]
        return next((u for u in mine if node.startswith(parse_mig(u)[2].removesuffix("-grp") + "-")),
                    mine[0] if len(mine) == 1 else None)

    def _remove_marked_nodes(self, lab: Lab, cluster: gke.Cluster, kube: Kube, nodes: list | None = None) -> None:
        """Delete the instances of the nodes this lab marked, once no worker of it runs there. A marked node no
        group holds any more (an upgrade replaced it) is forgotten: the settle pass trims its replacement."""
        place = place_of(lab)
        if nodes is None:
            marked = kube.nodes(f"{POOL_LABEL}={self.config.worker_pool},{REMOVING_LABEL}={place.namespace}")
        else:
            marked = [n for n in nodes if (n.metadata.labels or {}).get(REMOVING_LABEL) == place.namespace]
        if not marked:
            return
        pool = self._worker_pool(cluster)
        if pool.status != gke.NodePool.Status.RUNNING:
            return  # an operation changes the pool's groups: after it
        busy = {p.spec.node_name for p in kube.pods_of(place.namespace, place.workers)}
        urls = list(pool.instance_group_urls)
        by_group: dict[str, list[str]] = {}
        unplaced: list[str] = []
        for node in marked:
            name = node.metadata.name
            if name in busy or (place.shared and self._others_on(kube, name, place)):
                # a scale-down was interrupted and its workers came back, or another student's pod runs there
                # (a shared pool removes only nodes that are empty): keep the node
                kube.cordon(name, {REMOVING_LABEL: None}, unschedulable=False)
                continue
            for pod in kube.pods_on(name):  # DaemonSet pods go with the node; anything else moves first
                if not self._daemon(pod):
                    kube.evict(pod.metadata.namespace, pod.metadata.name)
            url = self._group_of(name, node.metadata.labels.get(ZONE_LABEL, ""), urls)
            if url is None:  # cannot be deleted by name: it stays cordoned, the others go, the lab says why
                unplaced.append(f"{name} (zone {node.metadata.labels.get(ZONE_LABEL, '')!r})")
                continue
            by_group.setdefault(url, []).append(name)
        for url, names in sorted(by_group.items()):
            self.migs.delete_instances(url, names)
            logs.emit("INFO", lab=lab.name, action="remove-nodes", nodes=names, zone=parse_mig(url)[1],
                      reason="emptied by retirement: their instances deleted from the node pool's group")
        if unplaced:
            raise StepRefused(f"node(s) {', '.join(unplaced)} in no instance group of pool {self.config.worker_pool}: "
                              "kept cordoned, not deleted; tried again on a later pass")

    # --- teardown and access ---

    def apply_delete(self, lab: Lab) -> None:
        """Delete the cluster (NotFound = done; GKE refuses while another operation runs → TransientError).
        The public Jupyter load balancer goes first: its forwarding rule would outlive the cluster."""
        place = place_of(lab)
        cluster = self._get(place)
        if cluster is None:
            return
        self._check_managed(cluster)
        if lab.spec.public_source_ranges and cluster.status in UP:
            self._kube(place, cluster).delete_service(place.namespace, f"{place.fullname}-jupyter-public")
        try:
            if place.shared and not self._delete_from_class(lab, place, cluster):
                return
        except Gone:  # the class's cluster went meanwhile: done
            return
        try:
            self.clusters.delete_cluster(name=self._path(place))
        except gexc.NotFound:
            return
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"delete cluster {place.cluster}") from e

    def _delete_from_class(self, lab: Lab, place: Place, cluster: gke.Cluster) -> bool:
        """A shared lab's teardown: its namespace goes (everything of its release in it); True if the class's
        cluster is then verifiably empty and goes too: no other lab of the class is recorded (but those tearing down
        whose namespace is no longer Active: two last labs deleted side by side, the second deletes the cluster), no
        other lab's namespace in it is Active, no record of the class is unreadable. A cluster that cannot be read
        (not running; its API not answering) is never deleted on the absence of evidence: TransientError, the
        teardown waits (GKE deletes an ERROR cluster itself)."""
        if cluster.status == Status.STOPPING:
            return False
        if cluster.status not in UP:
            raise TransientError(f"class cluster {place.cluster} is {cluster.status.name}: its labs cannot be read, "
                                 f"so it is not deleted for lab {lab.name}; waiting")
        kube = self._kube(place, cluster)
        others = self._others_in_class(kube, place, lab)  # read before anything goes: a failed read deletes nothing
        if others:
            kube.delete_namespace(place.namespace)
            others = self._others_in_class(kube, place, lab)  # again: another last lab may have gone meanwhile
        if others:
            logs.emit("INFO", lab=lab.name, action="delete-namespace", namespace=place.namespace,
                      reason=f"class cluster {place.cluster} kept: {len(others)} other lab(s) in it")
            return False
        logs.emit("INFO", lab=lab.name, action="delete-class-cluster", cluster=place.cluster,
                  reason=f"the last lab of class {place.class_name} is gone: its cluster goes (its namespace with it)")
        return True

    def _others_in_class(self, kube: Kube, place: Place, lab: Lab) -> list[str]:
        """The other labs of a class's cluster: their records (an unreadable one counts) and their Active namespaces
        in it. Raises (TransientError) when either cannot be read."""
        labs, unread = self.records.fetch_records(place.class_name)
        recorded = {other.name for other in labs if other.name != lab.name and (
            other.state.phase != TEARING_DOWN or kube.namespace_phase(place_of(other).namespace) == "Active")}
        selector = f"managed-by={MANAGED_BY},class={place.class_name}"
        active = {ns for ns, phase in kube.namespaces(selector).items() if phase != "Terminating"} - {place.namespace}
        return sorted(recorded | {name for name in unread if name != lab.name} | active)

    def connection_info(self, lab: Lab) -> dict:
        """Commands to reach the lab from a workstation with kubectl; the token is read from its Secret, never
        carried here."""
        place, cfg = place_of(lab), self.config
        ns, full = place.namespace, place.fullname
        info = {
            "cluster": place.cluster, "namespace": ns, "dask_version": lab.spec.dask_version or cfg.dask_version,
            "credentials": f"gcloud container clusters get-credentials {place.cluster} --location {cfg.location} "
                           f"--project {cfg.project}",
            "dashboard": f"kubectl -n {ns} port-forward svc/{full}-scheduler 8787:80  # then http://localhost:8787",
            "jupyter": f"kubectl -n {ns} port-forward svc/{full}-jupyter 8888:80  # then http://localhost:8888",
            "jupyter_token": f"kubectl -n {ns} get secret dasklab-jupyter-token -o jsonpath='{{.data.token}}' "
                             "| base64 -d",
            "scheduler": f"kubectl -n {ns} port-forward svc/{full}-scheduler 8786:8786  # then tcp://localhost:8786",
        }
        note = self._cluster_note(self._seen.get(place.cluster))  # as last read (the listing): no call here
        if note:
            info["cluster_status"] = note
        if lab.spec.public_source_ranges:
            info["jupyter_public"] = (f"kubectl -n {ns} get svc {full}-jupyter-public  # its EXTERNAL-IP, open to "
                                      f"{', '.join(lab.spec.public_source_ranges)}")
        return info
