"""Test stand-in for GKE (google.container.v1.ClusterManager): a strict in-process gRPC server for the real client."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
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
REGION_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+")
ZONE_RE = re.compile(r"([a-z]+-[a-z]+[0-9]+)-[a-z]")
_PROJECT = r"(?P<project>[a-z][-a-z0-9]{4,28}[a-z0-9]|[0-9]+)"
PARENT_RE = re.compile(rf"projects/{_PROJECT}/locations/(?P<location>[a-z0-9-]+)")
CLUSTER_RE = re.compile(PARENT_RE.pattern + r"/clusters/(?P<cluster>[^/]+)")
NODE_POOL_RE = re.compile(CLUSTER_RE.pattern + r"/nodePools/(?P<pool>[^/]+)")
OPERATION_RE = re.compile(PARENT_RE.pattern + r"/operations/(?P<op>[^/]+)")

OpType = gke.Operation.Type
# "Operation operation-… is currently <doing> cluster <c>. Please wait and try again once it is done."
BUSY_VERB = {
    OpType.CREATE_CLUSTER: "creating cluster {c}",
    OpType.DELETE_CLUSTER: "deleting cluster {c}",
    OpType.SET_LABELS: "setting labels on cluster {c}",
    OpType.SET_NODE_POOL_SIZE: "resizing a node pool for cluster {c}",
    OpType.UPDATE_CLUSTER: "updating cluster {c}",
}


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

    def _now(self) -> datetime:
        return self._clock()


def copy_message(msg):
    return type(msg).deserialize(type(msg).serialize(msg))


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _match(regex: re.Pattern, value: str, what: str) -> re.Match:
    m = regex.fullmatch(value or "")
    if not m:
        raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid {what}: {value!r}.")
    return m


@dataclass
class _Op:
    proto: gke.Operation
    cluster: str  # cluster resource name
    polls_left: int
    apply: Callable[[], None]
    error: status_pb2.Status | None = None


class GkeStandin(GrpcStandin):
    """Strict GKE stand-in. Operations advance one step per GetOperation poll (or via advance_all())."""

    service = "google.container.v1.ClusterManager"

    def __init__(
        self,
        *,
        polls_per_operation: int = 3,
        endpoint: str = "192.0.2.10",
        latency_s: float = 0.0,
        clock: Callable[[], datetime] | None = None,
    ):
        super().__init__(latency_s=latency_s, clock=clock)
        self.polls_per_operation = polls_per_operation
        self.endpoint = endpoint
        self._clusters: dict[str, gke.Cluster] = {}
        self._ops: dict[str, _Op] = {}
        self._busy: dict[str, str] = {}  # cluster name → id of its operation not yet DONE
        self._sizes: dict[tuple[str, str], int] = {}  # (cluster name, pool) → nodes per zone
        self._seq = itertools.count(1)

    def client(self) -> gke.ClusterManagerClient:
        return gke.ClusterManagerClient(transport=ClusterManagerGrpcTransport(channel=self._channel()))

    # ---- inspection and test hooks -------------------------------------------------------------
    @property
    def clusters(self) -> dict[str, gke.Cluster]:
        with self._lock:
            return {name: copy_message(c) for name, c in self._clusters.items()}

    @property
    def operations(self) -> dict[str, gke.Operation]:
        with self._lock:
            return {op_id: copy_message(op.proto) for op_id, op in self._ops.items()}

    def node_count(self, cluster: str, pool: str) -> int:
        """Current nodes PER ZONE of a pool (GKE keeps initial_node_count unchanged on resize)."""
        with self._lock:
            return self._sizes[(cluster, pool)]

    def set_node_count(self, cluster: str, pool: str, per_zone: int) -> None:
        """The pool's size changed outside the GKE API: its managed instance groups deleted chosen instances
        (compute instanceGroupManagers.deleteInstances) and GKE reports the groups' size."""
        with self._lock:
            if (cluster, pool) not in self._sizes:
                raise KeyError(f"no node pool {pool} in {cluster}")
            self._sizes[(cluster, pool)] = per_zone
            c = self._clusters[cluster]
            c.current_node_count = self._node_total(cluster, c)

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
            self._sizes.update({(target, p.name): self._sizes[(source, p.name)] for p in c.node_pools})

    def advance_all(self) -> None:
        """Finish every operation that is not DONE."""
        with self._lock:
            for op in list(self._ops.values()):
                if op.proto.status != gke.Operation.Status.DONE:
                    self._finish(op)

    # ---- request helpers -----------------------------------------------------------------------
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
        if name not in self._clusters:
            raise StandinAbort(Code.NOT_FOUND, f"Not found: {name}.")
        return self._clusters[name]

    def _standard_cluster(self, name: str) -> gke.Cluster:
        c = self._cluster(name)
        if c.autopilot.enabled:
            raise StandinAbort(Code.INVALID_ARGUMENT, "Autopilot node pools cannot be accessed or modified.")
        return c

    def _pool(self, name: str) -> tuple[gke.Cluster, gke.NodePool]:
        m = _match(NODE_POOL_RE, name, "node pool name")
        c = self._standard_cluster(name.rsplit("/nodePools/", 1)[0])
        pool = next((p for p in c.node_pools if p.name == m["pool"]), None)
        if pool is None:
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
        if len(labels) > 64:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Too many labels ({len(labels)}); at most 64 are allowed.")
        for key, value in labels.items():
            if not LABEL_KEY_RE.fullmatch(key):
                raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid label key {key!r}.")
            if not LABEL_VALUE_RE.fullmatch(value):
                raise StandinAbort(Code.INVALID_ARGUMENT, f"Invalid value {value!r} for label {key!r}.")

    @staticmethod
    def _check_autoscaling(a: gke.NodePoolAutoscaling) -> None:
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

    def _fingerprint(self, name: str) -> str:
        return hashlib.sha256(f"{name}:{next(self._seq)}".encode()).hexdigest()[:8]

    def _node_total(self, name: str, c: gke.Cluster) -> int:
        return sum(self._sizes[(name, p.name)] * len(p.locations) for p in c.node_pools)

    # ---- operations ----------------------------------------------------------------------------
    def _start_op(self, cluster_name: str, op_type, target: str, apply: Callable[[], None]) -> gke.Operation:
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
        op = _Op(proto, cluster_name, self.polls_per_operation, apply)
        self._ops[op_id] = op
        self._busy[cluster_name] = op_id
        if op.polls_left <= 0:
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

    def _get_operation(self, req: gke.GetOperationRequest) -> gke.Operation:
        name = self._name(req, "operation_id")
        m = _match(OPERATION_RE, name, "operation name")
        op = self._ops.get(m["op"])
        if op is None or op.proto.location != m["location"] or f"/projects/{m['project']}/" not in op.proto.self_link:
            raise StandinAbort(Code.NOT_FOUND, f"Not found: {name}.")
        if op.proto.status != gke.Operation.Status.DONE:
            op.polls_left -= 1
            if op.polls_left <= 0:
                self._finish(op)
            else:
                op.proto.status = gke.Operation.Status.RUNNING
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

    def _build_pool(self, cluster_name: str, pool: gke.NodePool, region: str, zones: list[str]) -> gke.NodePool:
        if not NAME_RE.fullmatch(pool.name):
            raise StandinAbort(
                Code.INVALID_ARGUMENT,
                f'Invalid value for field "node_pool.name": "{pool.name}". Must be a match of regex '
                f"'{NAME_RE.pattern}'.",
            )
        if "config" not in pool:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Node pool {pool.name!r}: config must be set.")
        if pool.initial_node_count < 0:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"Node pool {pool.name!r}: initial_node_count must be >= 0.")
        self._check_autoscaling(pool.autoscaling)
        pool.config.machine_type = pool.config.machine_type or "e2-medium"
        pool_zones = self._zones(region, pool.locations or zones)
        project, cluster = CLUSTER_RE.fullmatch(cluster_name).group("project", "cluster")
        tag = hashlib.sha256(f"{cluster_name}/{pool.name}".encode()).hexdigest()[:8]
        pool.locations = pool_zones
        pool.self_link = f"{API}/{cluster_name}/nodePools/{pool.name}"
        pool.instance_group_urls = [
            f"{COMPUTE}/projects/{project}/zones/{z}/instanceGroupManagers/gke-{cluster}-{pool.name}-{tag}-grp"
            for z in pool_zones
        ]
        pool.status = gke.NodePool.Status.PROVISIONING
        return pool

    def _create_cluster(self, req: gke.CreateClusterRequest) -> gke.Operation:
        parent = self._parent(req)
        m = _match(PARENT_RE, parent, "parent")
        location = m["location"]
        c = copy_message(req.cluster)
        if not NAME_RE.fullmatch(c.name):
            raise StandinAbort(
                Code.INVALID_ARGUMENT,
                f'Invalid value for field "cluster.name": "{c.name}". Must be a match of regex '
                f"'{NAME_RE.pattern}' (only lowercase alphanumerics and '-' allowed, must start with a letter "
                "and end with an alphanumeric, and must be no longer than 40 characters).",
            )
        name = f"{parent}/clusters/{c.name}"
        if name in self._clusters:
            raise StandinAbort(Code.ALREADY_EXISTS, f"Already exists: {name}.")
        self._check_labels(c.resource_labels)
        zones = self._zones(location, c.locations)
        if c.autopilot.enabled:
            if ZONE_RE.fullmatch(location):
                raise StandinAbort(Code.INVALID_ARGUMENT, "Autopilot clusters must be regional clusters.")
            if c.node_pools or c.initial_node_count:
                raise StandinAbort(
                    Code.INVALID_ARGUMENT, "Autopilot clusters cannot set node_pools or initial_node_count."
                )
        elif c.node_pools:
            if c.initial_node_count or "node_config" in c:
                raise StandinAbort(
                    Code.INVALID_ARGUMENT,
                    "Cluster.initial_node_count and Cluster.node_config cannot be set together with node_pools.",
                )
            if len({p.name for p in c.node_pools}) != len(c.node_pools):
                raise StandinAbort(Code.INVALID_ARGUMENT, "Node pool names must be unique within a cluster.")
        elif c.initial_node_count <= 0:
            raise StandinAbort(Code.INVALID_ARGUMENT, "Cluster.initial_node_count must be greater than zero.")
        else:
            config = c.node_config if "node_config" in c else gke.NodeConfig(machine_type="e2-medium")
            c.node_pools = [gke.NodePool(name="default-pool", config=config, initial_node_count=c.initial_node_count)]
        region = ZONE_RE.fullmatch(zones[0]).group(1)
        c.node_pools = [self._build_pool(name, p, region, zones) for p in c.node_pools]
        c.location = c.zone = location
        c.locations = zones
        c.self_link = f"{API}/{name}"
        c.id = hashlib.sha256(name.encode()).hexdigest()[:32]
        c.create_time = _rfc3339(self._now())
        c.status = gke.Cluster.Status.PROVISIONING
        c.label_fingerprint = self._fingerprint(name)
        c.endpoint = ""
        self._clusters[name] = c
        self._sizes.update({(name, p.name): p.initial_node_count for p in c.node_pools})

        def done():
            c.status = gke.Cluster.Status.RUNNING
            c.endpoint = self.endpoint
            c.master_auth.cluster_ca_certificate = CA_CERT
            for p in c.node_pools:
                p.status = gke.NodePool.Status.RUNNING
            c.current_node_count = self._node_total(name, c)

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
        return gke.ListClustersResponse(clusters=clusters)

    def _delete_cluster(self, req: gke.DeleteClusterRequest) -> gke.Operation:
        name = self._name(req, "cluster_id")
        c = self._cluster(name)
        self._check_idle(name)
        c.status = gke.Cluster.Status.STOPPING

        def done():
            del self._clusters[name]
            for key in [k for k in self._sizes if k[0] == name]:
                del self._sizes[key]

        return self._start_op(name, OpType.DELETE_CLUSTER, c.self_link, done)

    def _set_labels(self, req: gke.SetLabelsRequest) -> gke.Operation:
        name = self._name(req, "cluster_id")
        c = self._cluster(name)
        labels = dict(req.resource_labels)
        self._check_labels(labels)
        self._check_idle(name)
        if req.label_fingerprint != c.label_fingerprint:
            raise StandinAbort(
                Code.FAILED_PRECONDITION,
                "Labels could not be set due to fingerprint mismatch; try again with the proper fingerprint: "
                f'incorrect fingerprint supplied was "{req.label_fingerprint}", '
                f'the expected one is "{c.label_fingerprint}".',
            )

        def done():
            c.resource_labels = labels
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
            c.current_node_count = self._node_total(cluster_name, c)

        return self._start_op(cluster_name, op_type, pool.self_link, done)

    def _set_node_pool_size(self, req: gke.SetNodePoolSizeRequest) -> gke.Operation:
        name = self._name(req, "cluster_id", "node_pool_id")
        self._pool(name)  # NOT_FOUND / Autopilot come before argument errors
        if req.node_count < 0:
            raise StandinAbort(Code.INVALID_ARGUMENT, f"node_count must be >= 0, got {req.node_count}.")
        key = (name.rsplit("/nodePools/", 1)[0], name.rsplit("/", 1)[-1])
        return self._pool_op(name, OpType.SET_NODE_POOL_SIZE, lambda _: self._sizes.__setitem__(key, req.node_count))

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
