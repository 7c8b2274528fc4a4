"""Test stand-in for GKE (google.container.v1.ClusterManager): a strict in-process gRPC server for the real client.

Operations progress with an injectable clock, not with polls: each finishes `operation_s` after it started, and GKE's
own operations (upgrades, repairs, the removal of clusters left in ERROR) start and run on the same clock. The node
pools' managed instance groups (one per zone, two per zone during a blue-green upgrade) and their instances live
here too; tests.standins.compute serves them over the Compute REST API."""

from __future__ import annotations

import base64
import hashlib
import itertools
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

import grpc
from google.cloud import container_v1 as gke
from google.cloud.container_v1.services.cluster_manager.transports import ClusterManagerGrpcTransport
from google.rpc import status_pb2

Code = grpc.StatusCode
API = "https://container.googleapis.com/v1"
COMPUTE = "https://www.googleapis.com/compute/v1"
CA_CERT = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nZGFza2xhYi10ZXN0\n-----END CERTIFICATE-----\n").decode()

# Real GKE message: "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,38}[a-z0-9])?)'" (cluster and node pool names).
NAME_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,38}[a-z0-9])?")
LABEL_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_VALUE_RE = re.compile(r"[a-z0-9_-]{0,63}")
# A cluster's resource labels go onto its VMs: SetLabelsRequest's docstring, "sets the Google Cloud Platform labels on
# a Google Container Engine cluster, which will in turn set them for Google Compute Engine resources used by that
# cluster", beside GKE's own labels on every node VM. Compute allows at most 64 labels per resource
# (cloud.google.com/compute/docs/labeling-resources, "Requirements for labels"), those included.
GKE_VM_LABELS = ("goog-gke-node", "goog-k8s-cluster-name", "goog-k8s-cluster-location", "goog-k8s-node-pool-name")
VM_MAX_LABELS = 64
REGION_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+")
ZONE_RE = re.compile(r"([a-z]+-[a-z]+[0-9]+)-[a-z]")
_PROJECT = r"(?P<project>[a-z][-a-z0-9]{4,28}[a-z0-9]|[0-9]+)"
PARENT_RE = re.compile(rf"projects/{_PROJECT}/locations/(?P<location>[a-z0-9-]+)")
CLUSTER_RE = re.compile(PARENT_RE.pattern + r"/clusters/(?P<cluster>[^/]+)")
NODE_POOL_RE = re.compile(CLUSTER_RE.pattern + r"/nodePools/(?P<pool>[^/]+)")
OPERATION_RE = re.compile(PARENT_RE.pattern + r"/operations/(?P<op>[^/]+)")

OpType = gke.Operation.Type
# A cluster's status, as GKE documents each (google.cloud.container_v1 Cluster.Status docstrings):
# PROVISIONING "is being created"; RUNNING "has been created and is fully usable"; RECONCILING "some work is actively
# being done on the cluster, such as upgrading the master or node software" (here: a control-plane upgrade);
# STOPPING "is being deleted"; ERROR "is unusable. It will be automatically deleted" (here: a failed creation,
# removed after `error_cluster_ttl_s`); DEGRADED "requires user action to restore full functionality" (here:
# `degrade`, e.g. nodes GKE cannot repair). RECONCILING and DEGRADED clusters still run: their API and nodes serve.
# The details of the last three are in `status_message`.
# One mutating operation per cluster: "Operation operation-… is currently <doing> cluster <c>. Please wait and try
# again once it is done." (FAILED_PRECONDITION; the text as GKE users report it, e.g. hashicorp/terraform-provider-google
# issues on "is currently upgrading cluster", quoted in dasklab issue 10). GKE's own operations block the same way.
BUSY_VERB = {
    OpType.CREATE_CLUSTER: "creating cluster {c}",
    OpType.DELETE_CLUSTER: "deleting cluster {c}",
    OpType.SET_LABELS: "setting labels on cluster {c}",
    OpType.SET_NODE_POOL_SIZE: "resizing a node pool for cluster {c}",
    OpType.UPDATE_CLUSTER: "updating cluster {c}",
    OpType.UPGRADE_MASTER: "upgrading cluster {c}",
    OpType.UPGRADE_NODES: "upgrading cluster {c}",
    OpType.AUTO_UPGRADE_NODES: "upgrading cluster {c}",
    OpType.AUTO_REPAIR_NODES: "repairing cluster {c}",
}
GKE_OWN = (OpType.UPGRADE_MASTER, OpType.UPGRADE_NODES, OpType.AUTO_UPGRADE_NODES, OpType.AUTO_REPAIR_NODES)
# Versions: the REGULAR channel's default (cloud.google.com/kubernetes-engine/docs/release-notes-regular); a cluster
# created without release_channel is enrolled in REGULAR (cloud.google.com/kubernetes-engine/docs/concepts/release-channels)
VERSIONS = ("1.35.1-gke.1000", "1.35.2-gke.1200")
# Machine types GKE knows, by family and CPU count (cloud.google.com/compute/docs/general-purpose-machines)
MACHINE_RE = re.compile(r"(?P<family>e2|n2|n2d|c3|n4|c4)-(?P<shape>standard|highmem|highcpu)-(?P<cpus>[0-9]+)"
                        r"|e2-(?:micro|small|medium)")
MACHINE_CPUS = {"e2": {2, 4, 8, 16, 32}, "n2": {2, 4, 8, 16, 32, 48, 64, 80, 96, 128},
                "n2d": {2, 4, 8, 16, 32, 48, 64, 80, 96, 128, 224}, "c3": {4, 8, 22, 44, 88, 176},
                "n4": {2, 4, 8, 16, 32, 48, 64, 80}, "c4": {2, 4, 8, 16, 32, 48, 96, 192}}
# Boot disk types each family supports (cloud.google.com/compute/docs/general-purpose-machines, "Supported disk types"
# of each series: C3 has no pd-standard; N4 and C4 take Hyperdisk only)
FAMILY_DISKS = {"e2": {"pd-standard", "pd-balanced", "pd-ssd"},
                "n2": {"pd-standard", "pd-balanced", "pd-ssd", "hyperdisk-balanced"},
                "n2d": {"pd-standard", "pd-balanced", "pd-ssd", "hyperdisk-balanced"},
                "c3": {"pd-balanced", "pd-ssd", "hyperdisk-balanced"},
                "n4": {"hyperdisk-balanced"}, "c4": {"hyperdisk-balanced"}}
# NodeConfig.service_account: "The Google Cloud Platform Service Account to be used by the node VMs" - an e-mail, or
# "default" (NodeConfig field docstring; a non-e-mail is refused as invalid)
SERVICE_ACCOUNT_RE = re.compile(r"default|[a-z][-a-z0-9]{4,28}[a-z0-9]@[-a-z0-9.]+\.iam\.gserviceaccount\.com"
                                r"|[0-9]+-compute@developer\.gserviceaccount\.com")
# Workload Identity (cloud.google.com/kubernetes-engine/docs/how-to/workload-identity): a Standard cluster enables it
# with the workload pool of its own project, PROJECT_ID.svc.id.goog (gcloud --workload-pool), and it "must be enabled
# at the cluster level before" a node pool runs the GKE metadata server; WorkloadMetadataConfig.Mode docstring:
# GKE_METADATA "can only be enabled if Workload Identity is enabled at the cluster level". The node pools of a cluster
# that has it run the GKE metadata server unless they say otherwise (the how-to, "Create a new cluster").
WORKLOAD_POOL = "{project}.svc.id.goog"
Metadata = gke.WorkloadMetadataConfig.Mode
# Maintenance exclusions of scope no-upgrades last at most 30 days, at most 3 of them per cluster
# (cloud.google.com/kubernetes-engine/docs/concepts/maintenance-windows-and-exclusions, "Types of exclusions")
NO_UPGRADES_MAX, NO_UPGRADES_COUNT = timedelta(days=30), 3
Scope = gke.MaintenanceExclusionOptions.Scope


class StandinAbort(Exception):
    """Raised by a handler; the harness turns it into a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class GrpcStandin:
    """Shared harness: one unary gRPC service on 127.0.0.1, call log, one-shot fault injection, latency."""

    service: str = ""

    def __init__(self, *, latency_s: float = 0.0, clock: Callable[[], datetime] | None = None):
        self.latency_s = latency_s
        self.calls: list[str] = []
        self.address: str | None = None
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._lock = threading.RLock()
        self._injected: dict[str, list[tuple[grpc.StatusCode, str]]] = {}
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._channels: list[grpc.Channel] = []

    def _methods(self) -> dict[str, tuple[Callable, type, type]]:
        """Method name → (handler, request class, response class)."""
        raise NotImplementedError

    def start(self):
        handlers = {  # responses are serialized under the lock (see _wrap), so no response_serializer
            name: grpc.unary_unary_rpc_method_handler(self._wrap(name, fn, resp), request_deserializer=req.deserialize)
            for name, (fn, req, resp) in self._methods().items()
        }
        self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix=type(self).__name__)
        self._server = grpc.server(self._executor)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.service, handlers),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._executor.shutdown(wait=True)
            self._server = self._executor = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def fail_next(self, method: str, code: grpc.StatusCode = Code.UNAVAILABLE, message: str = "injected by stand-in"):
        """Make the next call of `method` (e.g. "GetCluster") fail once. Note: the real client retries
        UNAVAILABLE/DEADLINE_EXCEEDED on its idempotent methods (Get*/List*/Delete*)."""
        if method not in self._methods():
            raise ValueError(f"unknown method {method!r}")
        with self._lock:
            self._injected.setdefault(method, []).append((code, message))

    def _wrap(self, name: str, fn: Callable, response_cls: type):
        serialize = getattr(response_cls, "serialize", None) or response_cls.SerializeToString
        def handler(request, context):
            with self._lock:
                self.calls.append(name)
                injected = self._injected.get(name)
                fault = injected.pop(0) if injected else None
                self._before_call()
            if self.latency_s:
                time.sleep(self.latency_s)
            try:
                if fault:
                    raise StandinAbort(*fault)
                with self._lock:
                    return serialize(fn(request))
            except StandinAbort as e:
                context.abort(e.code, e.message)

        return handler

    def _before_call(self) -> None:
        """Under the lock, before each call is served (GKE: operations that are due finish)."""

    def _now(self) -> datetime:
        return self._clock()


class ManualClock:
    """A clock the test moves by hand (`advance`): the stand-ins' operations progress with it."""

    def __init__(self, start: datetime | None = None):
        self.t = start or datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


def copy_message(msg):
    return type(msg).deserialize(type(msg).serialize(msg))


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _match(regex: re.Pattern, value: str, what: str) -> re.Match:
    m = regex.fullmatch(value or "")
    if not m:  # resource names projects/P/locations/L/… (container v1 REST reference: the `name` path parameters)
        raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid {what}: {value!r}.")
    return m


@dataclass
class _Op:
    proto: gke.Operation
    cluster: str  # cluster resource name
    due: datetime  # when it is DONE
    apply: Callable[[], None]
    error: status_pb2.Status | None = None
    steps: list[tuple[datetime, Callable[[], None]]] = field(default_factory=list)  # done on the way, in time order
    started: datetime | None = None


@dataclass
class Group:
    """A managed instance group of a node pool in one zone; its instances are the pool's nodes there."""

    cluster: str  # GKE cluster resource name
    pool: str
    zone: str
    url: str
    instances: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def base(self) -> str:  # baseInstanceName: instances are named <base>-<4 letters> (instanceGroupManagers reference)
        return self.name.removesuffix("-grp")


class GkeStandin(GrpcStandin):
    """Strict GKE stand-in. Operations finish `operation_s` after they start, on `clock` (or via advance_all())."""

    service = "google.container.v1.ClusterManager"

    def __init__(
        self,
        *,
        operation_s: float = 0.3,
        endpoint: str = "192.0.2.10",
        latency_s: float = 0.0,
        clock: Callable[[], datetime] | None = None,
        error_cluster_ttl_s: float | None = None,
        auto_upgrade_after_s: float | None = None,
        seed: int = 0,
    ):
        super().__init__(latency_s=latency_s, clock=clock)
        self.operation_s = operation_s
        self.endpoint = endpoint
        self.error_cluster_ttl_s = error_cluster_ttl_s  # GKE removes a cluster whose creation failed, later
        self.auto_upgrade_after_s = auto_upgrade_after_s  # GKE auto-upgrades a REGULAR cluster this long after creation
        self.removed_at_random: list[str] = []  # instances a resize removed (GKE's choice, not the caller's)
        self.deleted: list[str] = []  # instances deleted by instanceGroupManagers.deleteInstances (the caller's)
        self.missing_zones: set[str] = set()  # zones ListClusters cannot reach (injected)
        self._clusters: dict[str, gke.Cluster] = {}
        self._ops: dict[str, _Op] = {}
        self._busy: dict[str, str] = {}  # cluster name → id of its operation not yet DONE
        self._groups: dict[str, Group] = {}  # instance group URL → group
        self._error_since: dict[str, datetime] = {}
        self._upgraded: set[str] = set()
        self._rng = random.Random(seed)
        self._seq = itertools.count(1)

    def client(self) -> gke.ClusterManagerClient:
        return gke.ClusterManagerClient(transport=ClusterManagerGrpcTransport(channel=self._channel()))

    # ---- inspection and test hooks -------------------------------------------------------------
    @property
    def clusters(self) -> dict[str, gke.Cluster]:
        with self._lock:
            self.tick()
            return {name: copy_message(c) for name, c in self._clusters.items()}

    @property
    def operations(self) -> dict[str, gke.Operation]:
        with self._lock:
            self.tick()
            return {op_id: copy_message(op.proto) for op_id, op in self._ops.items()}

    def groups(self) -> list[Group]:
        """Every instance group of every pool (a copy), as GKE created them."""
        with self._lock:
            self.tick()
            return [Group(g.cluster, g.pool, g.zone, g.url, list(g.instances)) for g in self._groups.values()]

    def instances(self) -> dict[str, Group]:
        """Every instance (node) → its group."""
        return {name: g for g in self.groups() for name in g.instances}

    def vm_labels(self) -> dict[str, dict[str, str]]:
        """Every instance (node VM) → its labels: its cluster's resource labels as they are now, and GKE's own."""
        with self._lock:
            self.tick()
            found = {}
            for g in self._groups.values():
                c = self._clusters.get(g.cluster)
                if c is None:
                    continue
                location = g.cluster.split("/locations/", 1)[1].split("/", 1)[0]
                own = dict(zip(GKE_VM_LABELS, ("", c.name, location, g.pool)))
                found.update({name: {**c.resource_labels, **own} for name in g.instances})
            return found

    def zone_counts(self, cluster: str, pool: str) -> dict[str, int]:
        """Nodes of a pool in each zone (every group of the zone)."""
        counts: dict[str, int] = {}
        for g in self.groups():
            if (g.cluster, g.pool) == (cluster, pool):
                counts[g.zone] = counts.get(g.zone, 0) + len(g.instances)
        if not counts and (cluster not in self._clusters
                           or not any(p.name == pool for p in self._clusters[cluster].node_pools)):
            raise KeyError(f"no node pool {pool} in {cluster}")
        return counts

    def node_count(self, cluster: str, pool: str) -> int:
        """Nodes PER ZONE of a pool (GKE keeps initial_node_count unchanged on resize); ValueError if zones differ."""
        counts = set(self.zone_counts(cluster, pool).values())
        if len(counts) > 1:
            raise ValueError(f"zones of {pool} differ: {self.zone_counts(cluster, pool)}")
        return counts.pop() if counts else 0

    def delete_instances(self, url: str, names: list[str]) -> None:
        """instanceGroupManagers.deleteInstances took these instances out of the group: the pool shrinks there."""
        with self._lock:
            group = self._groups[url]
            for name in names:
                group.instances.remove(name)
                self.deleted.append(name)
            self._recount(group.cluster)

    def fail_operation(
        self, operation: str, message: str = "Operation failed (stand-in)", code: grpc.StatusCode | int = 13
    ) -> None:
        """Make a pending operation finish DONE with `error` and leave its cluster in ERROR."""
        with self._lock:
            op = self._ops[operation.rsplit("/", 1)[-1]]
            if op.proto.status == gke.Operation.Status.DONE:
                raise ValueError(f"operation {op.proto.name} is already DONE")
            code = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
            op.error = status_pb2.Status(code=code, message=message)

    def start_upgrade(self, cluster: str, pool: str | None = None, *, strategy: str = "surge",
                      duration_s: float = 60.0, by_gke: bool = True) -> str:
        """Start an upgrade: of the control plane (UPGRADE_MASTER) when `pool` is None, else of a pool's nodes.
        A surge upgrade replaces the pool's nodes one at a time under new names (max surge 1: the new instance
        comes first); a blue-green upgrade adds a second (green) instance group in every zone, then drains and
        removes the blue ones (cloud.google.com/kubernetes-engine/docs/concepts/node-pool-upgrade-strategies).
        Returns the operation's id. It blocks the cluster's other operations until it is done."""
        with self._lock:
            self.tick()
            return self._upgrade(cluster, pool, strategy, duration_s, by_gke)

    def _upgrade(self, cluster: str, pool: str | None, strategy: str, duration_s: float, by_gke: bool) -> str:
        with self._lock:
            self._check_idle(cluster)
            c = self._clusters[cluster]
            target = c.current_master_version
            new = next((v for v in VERSIONS if v > target), VERSIONS[-1])
            if pool is None:
                c.status = gke.Cluster.Status.RECONCILING

                def done():
                    c.status, c.current_master_version = gke.Cluster.Status.RUNNING, new

                return self._start_op(cluster, OpType.UPGRADE_MASTER, c.self_link, done, duration_s).name
            np = next(p for p in c.node_pools if p.name == pool)
            np.status = gke.NodePool.Status.RECONCILING
            start, steps = self._now(), []
            blue = [g for g in self._groups.values() if (g.cluster, g.pool) == (cluster, pool)]
            if strategy == "surge":
                old = [(g, name) for g in blue for name in g.instances]
                for i, (g, name) in enumerate(old):
                    at = start + timedelta(seconds=duration_s * (i + 1) / (len(old) + 1))
                    steps.append((at, lambda g=g, name=name: self._surge(g, name)))
            elif strategy == "blue-green":
                green = []
                for g in blue:
                    prefix, _, _ = g.url.rsplit("-", 2)  # …/gke-<cluster>-<pool>-<hash>-grp: a new hash
                    url = f"{prefix}-{hashlib.sha256(f'{g.url}/{next(self._seq)}'.encode()).hexdigest()[:8]}-grp"
                    green.append(Group(g.cluster, g.pool, g.zone, url))
                    self._groups[url] = green[-1]
                    self._resize(green[-1], len(g.instances))
                np.instance_group_urls = [*np.instance_group_urls, *(g.url for g in green)]
                self._recount(cluster)

                def swap():  # the blue pool is drained (soak over) and its groups deleted
                    for g in blue:
                        self._groups.pop(g.url, None)
                    np.instance_group_urls = [g.url for g in green]
                    self._recount(cluster)

                steps.append((start + timedelta(seconds=duration_s * 0.9), swap))
            else:
                raise ValueError(f"unknown upgrade strategy {strategy!r}")

            def finished():
                np.status, np.version = gke.NodePool.Status.RUNNING, new

            kind = OpType.UPGRADE_NODES if not by_gke else OpType.AUTO_UPGRADE_NODES
            return self._start_op(cluster, kind, np.self_link, finished, duration_s, steps).name

    def degrade(self, cluster: str, message: str) -> None:
        """GKE marks a running cluster DEGRADED when it needs the user's action to be fully functional again, saying
        why in `status_message` (Cluster.Status docstring), e.g. "Nodes cannot be repaired". It still runs: its API
        answers and its nodes stay. `recover` makes it RUNNING again."""
        with self._lock:
            self.tick()
            c = self._clusters[cluster]
            if c.status not in (gke.Cluster.Status.RUNNING, gke.Cluster.Status.RECONCILING):
                raise ValueError(f"cluster {cluster} is {c.status.name}: only a running cluster degrades")
            c.status, c.status_message = gke.Cluster.Status.DEGRADED, message

    def recover(self, cluster: str) -> None:
        """The user's action restored it: RUNNING, no status message."""
        with self._lock:
            c = self._clusters[cluster]
            c.status, c.status_message = gke.Cluster.Status.RUNNING, ""

    def start_repair(self, cluster: str, pool: str, *, duration_s: float = 300.0) -> str:
        """GKE's node auto-repair: an AUTO_REPAIR_NODES operation that blocks the cluster (a repair can take over 5
        minutes; maintenance exclusions do not hold it off: cloud.google.com/kubernetes-engine/docs/how-to/node-auto-repair)."""
        with self._lock:
            self.tick()
            self._check_idle(cluster)
            c = self._clusters[cluster]
            np = next(p for p in c.node_pools if p.name == pool)
            return self._start_op(cluster, OpType.AUTO_REPAIR_NODES, np.self_link, lambda: None, duration_s).name

    def clone_cluster(self, source: str, name: str, resource_labels: dict[str, str]) -> None:
        """Seed a copy of the idle cluster `source` (full name) as `name` (short), with its own labels: for
        benchmarks that need hundreds of running clusters without creating each. Every occurrence of the source's
        short name (self links, node pool instance groups) becomes `name`."""
        with self._lock:
            old = source.rsplit("/", 1)[-1]
            target = f"{source.rsplit('/', 1)[0]}/{name}"
            if target in self._clusters:
                raise ValueError(f"cluster {target} exists")
            self._check_idle(source)
            c = gke.Cluster.from_json(gke.Cluster.to_json(self._clusters[source]).replace(old, name))
            c.resource_labels.clear()
            c.resource_labels.update(resource_labels)
            c.label_fingerprint = self._fingerprint(target)
            c.id = hashlib.sha256(target.encode()).hexdigest()[:32]
            self._clusters[target] = c
            for g in [g for g in self._groups.values() if g.cluster == source]:
                url = g.url.replace(old, name)
                self._groups[url] = Group(target, g.pool, g.zone, url, [i.replace(old, name) for i in g.instances])

    def advance_all(self) -> None:
        """Finish every operation that is not DONE (its steps first)."""
        with self._lock:
            for op in list(self._ops.values()):
                if op.proto.status != gke.Operation.Status.DONE:
                    for _, step in op.steps:
                        step()
                    op.steps.clear()
                    self._finish(op)

    def tick(self) -> None:
        """GKE's side, at the clock's time: steps and ends of operations that are due, ERROR clusters removed after
        `error_cluster_ttl_s`, auto-upgrades of clusters no maintenance exclusion holds off."""
        with self._lock:
            now = self._now()
            for op in list(self._ops.values()):
                if op.proto.status == gke.Operation.Status.DONE:
                    continue
                while op.steps and op.steps[0][0] <= now:
                    op.steps.pop(0)[1]()
                if now >= op.due:
                    self._finish(op)
                elif op.proto.status == gke.Operation.Status.PENDING and now > op.started:
                    op.proto.status = gke.Operation.Status.RUNNING
            for name, c in list(self._clusters.items()):
                if name in self._busy:
                    continue
                if c.status == gke.Cluster.Status.ERROR and self.error_cluster_ttl_s is not None:
                    since = self._error_since.setdefault(name, now)  # (a clone's error: from now)
                    if now - since >= timedelta(seconds=self.error_cluster_ttl_s):
                        self._gke_deletes(name)
                elif (c.status == gke.Cluster.Status.RUNNING and self.auto_upgrade_after_s is not None
                      and name not in self._upgraded and not self._excluded(c, now)
                      and now - datetime.fromisoformat(c.create_time.replace("Z", "+00:00"))
                      >= timedelta(seconds=self.auto_upgrade_after_s)):
                    self._upgraded.add(name)
                    self._upgrade(name, None, "surge", max(self.operation_s, 1.0), True)

    # ---- request helpers -----------------------------------------------------------------------
    def _before_call(self) -> None:
        self.tick()

    @staticmethod
    def _name(req, *ids: str) -> str:
        """req.name, or the v1 name built from the deprecated project_id/zone/<ids> fields."""
        if req.name:
            return req.name
        values = [getattr(req, f) for f in ids]
        if not (req.project_id and req.zone and all(values)):
            return ""
        segment = {"cluster_id": "clusters", "node_pool_id": "nodePools", "operation_id": "operations"}
        return f"projects/{req.project_id}/locations/{req.zone}" + "".join(
            f"/{segment[f]}/{v}" for f, v in zip(ids, values)
        )

    @staticmethod
    def _parent(req) -> str:
        if req.parent:
            return req.parent
        return f"projects/{req.project_id}/locations/{req.zone}" if req.project_id and req.zone else ""

    def _cluster(self, name: str) -> gke.Cluster:
        _match(CLUSTER_RE, name, "cluster name")
        if name not in self._clusters:  # NOT_FOUND for an unknown cluster (projects.locations.clusters.get)
            raise StandinAbort(Code.NOT_FOUND, f"Not found: {name}.")
        return self._clusters[name]

    def _standard_cluster(self, name: str) -> gke.Cluster:
        c = self._cluster(name)
        if c.autopilot.enabled:  # node pools are Standard-only (cloud.google.com/kubernetes-engine/docs/concepts/autopilot-overview)
            raise StandinAbort(Code.INVALID_ARGUMENT, "Autopilot node pools cannot be accessed or modified.")
        return c

    def _pool(self, name: str) -> tuple[gke.Cluster, gke.NodePool]:
        m = _match(NODE_POOL_RE, name, "node pool name")
        c = self._standard_cluster(name.rsplit("/nodePools/", 1)[0])
        pool = next((p for p in c.node_pools if p.name == m["pool"]), None)
        if pool is None:  # NOT_FOUND for an unknown pool (projects.locations.clusters.nodePools.get)
            raise StandinAbort(Code.NOT_FOUND, f"Not found: {name}.")
        return c, pool

    def _check_idle(self, cluster_name: str) -> None:
        op_id = self._busy.get(cluster_name)
        if op_id:
            op = self._ops[op_id].proto
            doing = BUSY_VERB[op.operation_type].format(c=cluster_name.rsplit("/", 1)[-1])
            raise StandinAbort(
                Code.FAILED_PRECONDITION,
                f"Operation {op_id} is currently {doing}. Please wait and try again once it is done.",
            )

    @staticmethod
    def _check_labels(labels) -> None:
        # Labels: at most 64; keys [a-z][a-z0-9_-]{0,62}, values [a-z0-9_-]{0,63}
        # (cloud.google.com/kubernetes-engine/docs/how-to/creating-managing-labels, "Requirements for labels")
        if len(labels) > 64:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Too many labels ({len(labels)}); at most 64 are allowed.")
        if len(labels) + len(GKE_VM_LABELS) > VM_MAX_LABELS:  # the VMs' labels (see GKE_VM_LABELS)
            raise StandinAbort(Code.INVALID_ARGUMENT,
                               f"Too many labels ({len(labels)}): with GKE's own {len(GKE_VM_LABELS)} the cluster's "
                               f"VMs would carry {len(labels) + len(GKE_VM_LABELS)}, above Compute's "
                               f"{VM_MAX_LABELS} per resource.")
        for key, value in labels.items():
            if not LABEL_KEY_RE.fullmatch(key):
                raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid label key {key!r}.")
            if not LABEL_VALUE_RE.fullmatch(value):
                raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid value {value!r} for label {key!r}.")

    @staticmethod
    def _check_autoscaling(a: gke.NodePoolAutoscaling) -> None:
        # NodePoolAutoscaling field docstrings: per-zone (min/max_node_count) and total_* limits are exclusive;
        # "min_node_count ... >= 0 and <= max_node_count", "max_node_count ... >= 1"
        if not a.enabled:
            return
        per_zone = a.min_node_count or a.max_node_count
        total = a.total_min_node_count or a.total_max_node_count
        if per_zone and total:
            raise StandinAbort(Code.INVALID_ARGUMENT, "Per-zone and total autoscaling limits cannot both be set.")
        lo, hi = (a.total_min_node_count, a.total_max_node_count) if total else (a.min_node_count, a.max_node_count)
        if lo < 0 or hi < 1 or lo > hi:
            raise StandinAbort(
                Code.INVALID_ARGUMENT, f"Invalid autoscaling limits: min {lo} must be in [0, max] and max {hi} >= 1."
            )

    @staticmethod
    def _check_node_config(pool: str, config: gke.NodeConfig, zone: str) -> None:
        m = MACHINE_RE.fullmatch(config.machine_type)
        if m is None or (m["family"] and int(m["cpus"]) not in MACHINE_CPUS[m["family"]]):
            raise StandinAbort(  # machine types per family: cloud.google.com/compute/docs/general-purpose-machines
                Code.INVALID_ARGUMENT, f"Invalid value for field 'resource.machineType': "
                f"'zones/{zone}/machineTypes/{config.machine_type}'. Machine type with name "
                f"'{config.machine_type}' does not exist in zone '{zone}'.")
        family = m["family"] or "e2"
        disk = config.disk_type or "pd-standard"  # NodeConfig.disk_type docstring: "If unspecified, ... 'pd-standard'"
        if disk not in FAMILY_DISKS[family]:
            raise StandinAbort(  # supported disk types per series: cloud.google.com/compute/docs/general-purpose-machines
                Code.INVALID_ARGUMENT, f"Node pool {pool!r}: disk type {disk!r} is not supported by machine type "
                f"{config.machine_type!r} (supported: {', '.join(sorted(FAMILY_DISKS[family]))}).")
        if config.service_account and not SERVICE_ACCOUNT_RE.fullmatch(config.service_account):
            raise StandinAbort(  # NodeConfig.service_account docstring: a service account's e-mail, or "default"
                Code.INVALID_ARGUMENT, f'Invalid value for field "node_pool.config.service_account": '
                f'"{config.service_account}". Must be a valid service account email address.')

    @staticmethod
    def _check_workload_pool(workload_pool: str, project: str) -> None:
        """WorkloadIdentityConfig.workload_pool: "" (Workload Identity off) or the request's project's pool."""
        want = WORKLOAD_POOL.format(project=project)
        if workload_pool and workload_pool != want:
            raise StandinAbort(Code.INVALID_ARGUMENT, f'Invalid value for field "cluster.workload_identity_config.'
                                                      f'workload_pool": "{workload_pool}". Must be "{want}".')

    @staticmethod
    def _check_metadata(pool: gke.NodePool, workload_pool: str) -> None:
        """GKE_METADATA only with Workload Identity on the cluster, which it is then for every pool left unset."""
        config = pool.config.workload_metadata_config
        if config.mode == Metadata.GKE_METADATA and not workload_pool:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Node pool {pool.name!r}: workload metadata mode GKE_METADATA "
                                                      "requires Workload Identity to be enabled on the cluster.")
        if workload_pool and config.mode == Metadata.MODE_UNSPECIFIED:
            pool.config.workload_metadata_config = gke.WorkloadMetadataConfig(mode=Metadata.GKE_METADATA)

    def _check_maintenance(self, policy: gke.MaintenancePolicy) -> None:
        exclusions = policy.window.maintenance_exclusions
        no_upgrades = 0
        for name, w in exclusions.items():
            if not w.end_time or not w.start_time or w.end_time <= w.start_time:
                raise StandinAbort(  # TimeWindow.end_time docstring: "should take place after the start time"
                    Code.INVALID_ARGUMENT, f"Maintenance exclusion {name!r}: the end time must be after the start time.")
            scope = w.maintenance_exclusion_options.scope  # NO_UPGRADES is "the default exclusion behavior"
            if scope == Scope.NO_UPGRADES:
                no_upgrades += 1
                if w.end_time - w.start_time > NO_UPGRADES_MAX:
                    raise StandinAbort(Code.INVALID_ARGUMENT, f"Maintenance exclusion {name!r}: a no_upgrades "
                                       f"exclusion can last at most 30 days.")
        if no_upgrades > NO_UPGRADES_COUNT:
            raise StandinAbort(Code.INVALID_ARGUMENT, "At most 3 no_upgrades maintenance exclusions are allowed.")

    @staticmethod
    def _excluded(c: gke.Cluster, now: datetime) -> bool:
        """A maintenance exclusion holds GKE's auto-upgrades off (maintenance-windows-and-exclusions)."""
        return any(w.start_time <= now < w.end_time for w in c.maintenance_policy.window.maintenance_exclusions.values())

    def _fingerprint(self, name: str) -> str:
        return hashlib.sha256(f"{name}:{next(self._seq)}".encode()).hexdigest()[:8]

    def _recount(self, name: str) -> None:
        c = self._clusters.get(name)
        if c is not None:
            c.current_node_count = sum(len(g.instances) for g in self._groups.values() if g.cluster == name)

    def _resize(self, group: Group, want: int) -> None:
        """GKE sizes the group: new instances get random names; a lower size removes instances AT RANDOM
        (SetNodePoolSize reference: nodes are removed without regard to what runs on them)."""
        have = group.instances
        while len(have) < want:
            candidate = f"{group.base}-{''.join(self._rng.choice('bcdfghjklmnpqrstvwxz') for _ in range(4))}"
            if candidate not in have:
                have.append(candidate)
        while len(have) > want:
            victim = self._rng.choice(have)
            have.remove(victim)
            self.removed_at_random.append(victim)

    def _surge(self, group: Group, old: str) -> None:
        """One node of a surge upgrade: a new instance under a new name, then the old one goes."""
        if group.url not in self._groups or old not in group.instances:
            return
        self._resize(group, len(group.instances) + 1)
        group.instances.remove(old)
        self._recount(group.cluster)

    def _gke_deletes(self, name: str) -> None:
        """GKE removes a cluster whose creation failed (its resource labels go with it); a DELETE_CLUSTER operation
        of its own, listed like any other (dasklab issue 10: "GKE moves it to ERROR and later deletes it")."""
        c = self._clusters[name]
        c.status = gke.Cluster.Status.STOPPING
        self._start_op(name, OpType.DELETE_CLUSTER, c.self_link, lambda: self._drop(name), self.operation_s)

    def _drop(self, name: str) -> None:
        self._clusters.pop(name, None)
        self._error_since.pop(name, None)
        for url in [u for u, g in self._groups.items() if g.cluster == name]:
            del self._groups[url]

    # ---- operations ----------------------------------------------------------------------------
    def _start_op(self, cluster_name: str, op_type, target: str, apply: Callable[[], None],
                  duration_s: float | None = None, steps=()) -> gke.Operation:
        project, location = PARENT_RE.match(cluster_name).group("project", "location")
        now = self._now()
        op_id = f"operation-{int(now.timestamp() * 1000)}-{next(self._seq):08x}"
        proto = gke.Operation(
            name=op_id,
            zone=location,
            location=location,
            operation_type=op_type,
            status=gke.Operation.Status.PENDING,
            self_link=f"{API}/projects/{project}/locations/{location}/operations/{op_id}",
            target_link=target,
            start_time=_rfc3339(now),
        )
        duration = self.operation_s if duration_s is None else duration_s
        op = _Op(proto, cluster_name, now + timedelta(seconds=duration), apply, steps=list(steps), started=now)
        self._ops[op_id] = op
        self._busy[cluster_name] = op_id
        if duration <= 0:
            self._finish(op)
        return proto

    def _finish(self, op: _Op) -> None:
        op.proto.status = gke.Operation.Status.DONE
        op.proto.end_time = _rfc3339(self._now())
        self._busy.pop(op.cluster, None)
        if op.error is None:
            op.apply()
            return
        op.proto.error = op.error
        op.proto.status_message = op.error.message
        c = self._clusters.get(op.cluster)
        if c is not None:
            c.status, c.status_message = gke.Cluster.Status.ERROR, op.error.message
            self._error_since[op.cluster] = self._now()

    def _get_operation(self, req: gke.GetOperationRequest) -> gke.Operation:
        name = self._name(req, "operation_id")
        m = _match(OPERATION_RE, name, "operation name")
        op = self._ops.get(m["op"])
        # an operation is found only under its own project and location (projects.locations.operations.get)
        if op is None or op.proto.location != m["location"] or f"/projects/{m['project']}/" not in op.proto.self_link:
            raise StandinAbort(Code.NOT_FOUND, f"Not found: {name}.")
        return op.proto

    def _list_operations(self, req: gke.ListOperationsRequest) -> gke.ListOperationsResponse:
        m = _match(PARENT_RE, self._parent(req), "parent")
        prefix = f"{API}/projects/{m['project']}/locations/"
        ops = [
            op.proto
            for op in self._ops.values()
            if op.proto.self_link.startswith(prefix) and m["location"] in ("-", op.proto.location)
        ]
        return gke.ListOperationsResponse(operations=ops)

    # ---- clusters ------------------------------------------------------------------------------
    def _zones(self, location: str, requested) -> list[str]:
        # A zonal cluster's location is a zone, a regional one's a region with three zones by default; node
        # locations must lie in the cluster's region and include a zonal cluster's zone (Cluster.locations docstring)
        zone = ZONE_RE.fullmatch(location)
        region = zone.group(1) if zone else location
        if not zone and not REGION_RE.fullmatch(location):
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid location {location!r}.")
        zones = list(requested) or ([location] if zone else [f"{region}-{s}" for s in "abc"])
        for z in zones:
            m = ZONE_RE.fullmatch(z)
            if not m or m.group(1) != region:
                raise StandinAbort(Code.INVALID_ARGUMENT, f"Zone {z!r} is not in region {region!r}.")
        if zone and location not in zones:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Locations must include the cluster zone {location!r}.")
        return sorted(set(zones))

    def _build_pool(self, cluster_name: str, pool: gke.NodePool, region: str, zones: list[str],
                    workload_pool: str = "") -> gke.NodePool:
        if not NAME_RE.fullmatch(pool.name):  # the message GKE answers for a bad node pool name (its regex)
            raise StandinAbort(
                Code.INVALID_ARGUMENT,
                f'Invalid value for field "node_pool.name": "{pool.name}". Must be a match of regex '
                f"'{NAME_RE.pattern}'.",
            )
        if "config" not in pool:  # NodePool.config docstring: "The node configuration of the pool."
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Node pool {pool.name!r}: config must be set.")
        if pool.initial_node_count < 0:  # NodePool.initial_node_count docstring: "must be ... >= 0"
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Node pool {pool.name!r}: initial_node_count must be >= 0.")
        self._check_autoscaling(pool.autoscaling)
        pool.config.machine_type = pool.config.machine_type or "e2-medium"  # NodeConfig.machine_type: default e2-medium
        pool_zones = self._zones(region, pool.locations or zones)
        self._check_node_config(pool.name, pool.config, pool_zones[0])
        self._check_metadata(pool, workload_pool)
        # NodeConfig.service_account docstring: "if no Service Account is specified, the "default" service account
        # is used" (the Compute Engine default account): what GKE then reports
        pool.config.service_account = pool.config.service_account or "default"
        project, cluster = CLUSTER_RE.fullmatch(cluster_name).group("project", "cluster")
        pool.locations = pool_zones
        pool.self_link = f"{API}/{cluster_name}/nodePools/{pool.name}"
        # one managed instance group per zone (NodePool.instance_group_urls docstring), each with its own hash:
        # gke-<cluster>-<pool>-<8 hex>-grp, instances gke-<cluster>-<pool>-<8 hex>-<4 chars>
        pool.instance_group_urls = [
            f"{COMPUTE}/projects/{project}/zones/{z}/instanceGroupManagers/gke-{cluster}-{pool.name}-"
            f"{hashlib.sha256(f'{cluster_name}/{pool.name}/{z}'.encode()).hexdigest()[:8]}-grp"
            for z in pool_zones
        ]
        pool.status = gke.NodePool.Status.PROVISIONING
        return pool

    def _create_cluster(self, req: gke.CreateClusterRequest) -> gke.Operation:
        parent = self._parent(req)
        m = _match(PARENT_RE, parent, "parent")
        location = m["location"]
        c = copy_message(req.cluster)
        if not NAME_RE.fullmatch(c.name):  # the message GKE answers for a bad cluster name
            raise StandinAbort(
                Code.INVALID_ARGUMENT,
                f'Invalid value for field "cluster.name": "{c.name}". Must be a match of regex '
                f"'{NAME_RE.pattern}' (only lowercase alphanumerics and '-' allowed, must start with a letter "
                "and end with an alphanumeric, and must be no longer than 40 characters).",
            )
        name = f"{parent}/clusters/{c.name}"
        if name in self._clusters:  # ALREADY_EXISTS for a second cluster of that name (projects.locations.clusters.create)
            raise StandinAbort(Code.ALREADY_EXISTS, f"Already exists: {name}.")
        self._check_labels(c.resource_labels)
        self._check_maintenance(c.maintenance_policy)
        self._check_workload_pool(c.workload_identity_config.workload_pool, m["project"])
        zones = self._zones(location, c.locations)
        if c.autopilot.enabled:  # Autopilot is regional only and manages its nodes (autopilot-overview)
            if ZONE_RE.fullmatch(location):
                raise StandinAbort(Code.INVALID_ARGUMENT, "Autopilot clusters must be regional clusters.")
            if c.node_pools or c.initial_node_count:
                raise StandinAbort(
                    Code.INVALID_ARGUMENT, "Autopilot clusters cannot set node_pools or initial_node_count."
                )
        elif c.node_pools:
            # Cluster.initial_node_count / node_config docstrings: "must not be set" with node_pools
            if c.initial_node_count or "node_config" in c:
                raise StandinAbort(
                    Code.INVALID_ARGUMENT,
                    "Cluster.initial_node_count and Cluster.node_config cannot be set together with node_pools.",
                )
            if len({p.name for p in c.node_pools}) != len(c.node_pools):  # NodePool.name: unique in the cluster
                raise StandinAbort(Code.INVALID_ARGUMENT, "Node pool names must be unique within a cluster.")
            if not any(p.initial_node_count for p in c.node_pools):
                # a Standard cluster needs a node for its system pods (cloud.google.com/kubernetes-engine/docs/
                # how-to/node-pools: "a cluster must have at least one node pool ... with at least one node")
                raise StandinAbort(Code.INVALID_ARGUMENT, "Cluster must have at least one node: every node pool has "
                                                          "initial_node_count 0.")
        elif c.initial_node_count <= 0:  # Cluster.initial_node_count docstring: "must be ... >= 1"
            raise StandinAbort(Code.INVALID_ARGUMENT, "Cluster.initial_node_count must be greater than zero.")
        else:
            config = c.node_config if "node_config" in c else gke.NodeConfig(machine_type="e2-medium")
            c.node_pools = [gke.NodePool(name="default-pool", config=config, initial_node_count=c.initial_node_count)]
        region = ZONE_RE.fullmatch(zones[0]).group(1)
        c.node_pools = [self._build_pool(name, p, region, zones, c.workload_identity_config.workload_pool)
                        for p in c.node_pools]
        c.location = c.zone = location
        c.locations = zones
        c.self_link = f"{API}/{name}"
        c.id = hashlib.sha256(name.encode()).hexdigest()[:32]
        c.create_time = _rfc3339(self._now())
        c.status = gke.Cluster.Status.PROVISIONING
        c.label_fingerprint = self._fingerprint(name)
        c.endpoint = ""
        if "release_channel" not in c or not c.release_channel.channel:  # enrolled in REGULAR (release-channels)
            c.release_channel = gke.ReleaseChannel(channel=gke.ReleaseChannel.Channel.REGULAR)
        c.current_master_version = c.initial_cluster_version or VERSIONS[0]
        self._clusters[name] = c

        def done():
            c.status = gke.Cluster.Status.RUNNING
            c.endpoint = self.endpoint
            c.master_auth.cluster_ca_certificate = CA_CERT
            for p in c.node_pools:
                p.status = gke.NodePool.Status.RUNNING
                p.version = c.current_master_version
                for url in p.instance_group_urls:
                    zone = url.split("/zones/")[1].split("/")[0]
                    self._groups[url] = Group(name, p.name, zone, url)
                    self._resize(self._groups[url], p.initial_node_count)
            self._recount(name)

        return self._start_op(name, OpType.CREATE_CLUSTER, c.self_link, done)

    def _get_cluster(self, req: gke.GetClusterRequest) -> gke.Cluster:
        return self._cluster(self._name(req, "cluster_id"))

    def _list_clusters(self, req: gke.ListClustersRequest) -> gke.ListClustersResponse:
        m = _match(PARENT_RE, self._parent(req), "parent")
        clusters = [
            c
            for name, c in self._clusters.items()
            if CLUSTER_RE.fullmatch(name)["project"] == m["project"] and m["location"] in ("-", c.location)
        ]
        # ListClustersResponse.missing_zones: "If any zones are listed here, the list of clusters returned may be
        # missing those zones." A cluster with a zone out of reach is left out.
        missing = sorted(z for z in self.missing_zones if any(z in c.locations for c in clusters)
                         or m["location"] in ("-", z, z.rsplit("-", 1)[0]))
        clusters = [c for c in clusters if not set(c.locations) & self.missing_zones]
        return gke.ListClustersResponse(clusters=clusters, missing_zones=missing)

    def _delete_cluster(self, req: gke.DeleteClusterRequest) -> gke.Operation:
        name = self._name(req, "cluster_id")
        c = self._cluster(name)
        self._check_idle(name)  # deleting a cluster still being created is refused like any other overlap
        c.status = gke.Cluster.Status.STOPPING
        return self._start_op(name, OpType.DELETE_CLUSTER, c.self_link, lambda: self._drop(name))

    def _set_labels(self, req: gke.SetLabelsRequest) -> gke.Operation:
        name = self._name(req, "cluster_id")
        c = self._cluster(name)
        labels = dict(req.resource_labels)
        self._check_labels(labels)
        self._check_idle(name)
        if req.label_fingerprint != c.label_fingerprint:
            # SetLabelsRequest.label_fingerprint docstring: "the fingerprint of the previous set of labels ... Make a
            # get() request to the resource to get the latest fingerprint"; the text is GKE's
            raise StandinAbort(
                Code.FAILED_PRECONDITION,
                "Labels could not be set due to fingerprint mismatch; try again with the proper fingerprint: "
                f'incorrect fingerprint supplied was "{req.label_fingerprint}", '
                f'the expected one is "{c.label_fingerprint}".',
            )

        def done():
            c.resource_labels = labels  # replaced, not merged (SetLabelsRequest.resource_labels docstring)
            c.label_fingerprint = self._fingerprint(name)

        return self._start_op(name, OpType.SET_LABELS, c.self_link, done)

    # ---- node pools ----------------------------------------------------------------------------
    def _get_node_pool(self, req: gke.GetNodePoolRequest) -> gke.NodePool:
        return self._pool(self._name(req, "cluster_id", "node_pool_id"))[1]

    def _list_node_pools(self, req: gke.ListNodePoolsRequest) -> gke.ListNodePoolsResponse:
        c = self._standard_cluster(req.parent or self._name(req, "cluster_id"))
        return gke.ListNodePoolsResponse(node_pools=list(c.node_pools))

    def _pool_op(self, name: str, op_type, mutate: Callable[[gke.NodePool], None]) -> gke.Operation:
        cluster_name = name.rsplit("/nodePools/", 1)[0]
        c, pool = self._pool(name)
        self._check_idle(cluster_name)
        pool.status = gke.NodePool.Status.RECONCILING

        def done():
            mutate(pool)
            pool.status = gke.NodePool.Status.RUNNING
            self._recount(cluster_name)

        return self._start_op(cluster_name, op_type, pool.self_link, done)

    def _set_node_pool_size(self, req: gke.SetNodePoolSizeRequest) -> gke.Operation:
        name = self._name(req, "cluster_id", "node_pool_id")
        self._pool(name)  # NOT_FOUND / Autopilot come before argument errors
        if req.node_count < 0:  # SetNodePoolSizeRequest.node_count docstring: "The desired node count for the pool"
            raise StandinAbort(Code.INVALID_ARGUMENT, f"node_count must be >= 0, got {req.node_count}.")
        cluster_name, pool_name = name.rsplit("/nodePools/", 1)

        def resize(_):  # the count is per zone: every group of the pool is set to it (GKE picks whom to remove)
            for g in [g for g in self._groups.values() if (g.cluster, g.pool) == (cluster_name, pool_name)]:
                self._resize(g, req.node_count)

        return self._pool_op(name, OpType.SET_NODE_POOL_SIZE, resize)

    def _set_node_pool_autoscaling(self, req: gke.SetNodePoolAutoscalingRequest) -> gke.Operation:
        name = self._name(req, "cluster_id", "node_pool_id")
        self._pool(name)
        self._check_autoscaling(req.autoscaling)
        autoscaling = copy_message(req.autoscaling)
        return self._pool_op(name, OpType.UPDATE_CLUSTER, lambda pool: setattr(pool, "autoscaling", autoscaling))

    def _methods(self):
        return {
            "CreateCluster": (self._create_cluster, gke.CreateClusterRequest, gke.Operation),
            "GetCluster": (self._get_cluster, gke.GetClusterRequest, gke.Cluster),
            "ListClusters": (self._list_clusters, gke.ListClustersRequest, gke.ListClustersResponse),
            "DeleteCluster": (self._delete_cluster, gke.DeleteClusterRequest, gke.Operation),
            "SetLabels": (self._set_labels, gke.SetLabelsRequest, gke.Operation),
            "GetOperation": (self._get_operation, gke.GetOperationRequest, gke.Operation),
            "ListOperations": (self._list_operations, gke.ListOperationsRequest, gke.ListOperationsResponse),
            "GetNodePool": (self._get_node_pool, gke.GetNodePoolRequest, gke.NodePool),
            "ListNodePools": (self._list_node_pools, gke.ListNodePoolsRequest, gke.ListNodePoolsResponse),
            "SetNodePoolSize": (self._set_node_pool_size, gke.SetNodePoolSizeRequest, gke.Operation),
            "SetNodePoolAutoscaling": (
                self._set_node_pool_autoscaling,
                gke.SetNodePoolAutoscalingRequest,
                gke.Operation,
            ),
        }
