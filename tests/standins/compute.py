"""Test stand-in for Compute Engine (compute v1 REST) behind GKE node pools: managed instance groups for the real
InstanceGroupManagersClient (get: targetSize, and deleteInstances, strict about membership and names), and regions.get
for the real RegionsClient, its `quotas` counting the VMs, boot disks and external addresses of the groups it holds.

The groups and their instances are the GkeStandin's (one group per zone of each pool, two during a blue-green
upgrade; a resize adds instances or removes them AT RANDOM, as GKE does); deleting chosen instances shrinks the group,
and so the pool in that zone. Refusals are injectable as Compute sends them over REST: 401, 403 (a missing permission,
a quota), 429 (rate limits).
"""

from __future__ import annotations

import http.server
import itertools
import json
import re
import threading

from tests.standins.gke import GkeStandin, Group

PATH = re.compile(r"/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/instanceGroupManagers/"
                  r"(?P<name>[^/]+)(?P<verb>/deleteInstances)?")
REGION_PATH = re.compile(r"/compute/v1/projects/(?P<project>[^/]+)/regions/(?P<region>[a-z]+-[a-z]+[0-9]+)")
# Region.quotas (cloud.google.com/compute/docs/reference/rest/v1/regions: each entry a `metric`, its `limit` and its
# `usage`); what each VM counts against (cloud.google.com/compute/resource-usage): its vCPUs against its family's CPU
# quota (E2 and N1: CPUS; N2: N2_CPUS; C3: C3_CPUS …), its boot disk's GB against SSD_TOTAL_GB (pd-balanced, pd-ssd)
# or DISKS_TOTAL_GB (pd-standard), an external IPv4 address against IN_USE_ADDRESSES unless its nodes are private.
CPU_QUOTA = {"e2": "CPUS", "n1": "CPUS", "n2": "N2_CPUS", "n2d": "N2D_CPUS", "c3": "C3_CPUS", "n4": "N4_CPUS",
             "c4": "C4_CPUS"}
DISK_QUOTA = {"pd-standard": "DISKS_TOTAL_GB", "pd-balanced": "SSD_TOTAL_GB", "pd-ssd": "SSD_TOTAL_GB"}
SHARED_CORE_CPUS = {"e2-micro": 2, "e2-small": 2, "e2-medium": 2}  # (each holds 2 vCPUs, bursting)
# limits of a roomy project (a new one's are far lower: a test sets them)
DEFAULT_LIMITS = {"CPUS": 2400.0, "N2_CPUS": 2400.0, "C3_CPUS": 2400.0, "IN_USE_ADDRESSES": 2300.0,
                  "SSD_TOTAL_GB": 500000.0, "DISKS_TOTAL_GB": 500000.0, "INSTANCES": 6000.0}
# Instance names: RFC 1035 labels of at most 63 characters (compute instances.insert reference, "name")
INSTANCE = re.compile(r"(?:.*/)?zones/(?P<zone>[^/]+)/instances/(?P<name>[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)")
# The error bodies Compute sends (cloud.google.com/compute/docs/api/errors; API keys and quotas:
# cloud.google.com/compute/api-quota "rateLimitExceeded" with 403 for per-minute API quotas, 429 for others)
ERRORS = {
    "unauthenticated": (401, "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
                             "cookie or other valid authentication credential.", "authError"),
    "permission": (403, "Required 'compute.instanceGroupManagers.update' permission for "
                        "'projects/{project}/zones/{zone}/instanceGroupManagers/{name}'", "forbidden"),
    "regions-permission": (403, "Required 'compute.regions.get' permission for 'projects/{project}/regions/{region}'",
                           "forbidden"),
    "quota": (403, "Quota 'CPUS' exceeded. Limit: 8.0 in region {region}.", "quotaExceeded"),
    "rate-limit": (403, "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service "
                        "'compute.googleapis.com' for consumer 'project_number:1'.", "rateLimitExceeded"),
    "too-many-requests": (429, "Quota exceeded for quota metric 'Heavy-weight read requests' and limit 'Heavy-weight "
                               "read requests per minute' of service 'compute.googleapis.com'.", "rateLimitExceeded"),
}


class _Token:
    """Credentials with a bearer token that refreshes (google-auth retries a 401 after a refresh)."""

    def __new__(cls):
        from google.auth.credentials import Credentials

        class Token(Credentials):
            def refresh(self, request):
                self.token = "standin-token"

        creds = Token()
        creds.token = "standin-token"
        return creds


class _Refused(Exception):
    def __init__(self, status: int, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


class MigStandin:
    """Serves compute v1 instanceGroupManagers get/deleteInstances on 127.0.0.1 for a GkeStandin's node pools."""

    def __init__(self, gke: GkeStandin):
        self.gke = gke
        self.calls: list[tuple[str, str]] = []
        self.refused: list[str] = []  # the injected refusals answered, by kind
        self._faults: list[tuple[str, str]] = []  # (verb "get"|"deleteInstances", kind of ERRORS)
        self._ops = itertools.count(1)
        self.limits = dict(DEFAULT_LIMITS)  # the project's regional quota limits, by metric
        self.other_usage: dict[str, float] = {}  # what the project uses besides these node pools (VMs of its own)
        self.quotas_unavailable = False  # regions.get fails open: no `quotas`, a `quotaStatusWarning` instead
        self._lock = threading.RLock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

    @property
    def removed_at_random(self) -> list[str]:
        return self.gke.removed_at_random

    @property
    def deleted(self) -> list[str]:
        return self.gke.deleted

    def fail_next(self, verb: str, kind: str, times: int = 1) -> None:
        """Answer the next `times` `verb` calls ("get", "deleteInstances" or "regions.get") with the refusal `kind` (a key of
        ERRORS). google-auth refreshes the token and retries twice on a 401, so a 401 that stays takes times=3."""
        if kind not in ERRORS or verb not in ("get", "deleteInstances", "regions.get"):
            raise ValueError(f"unknown fault {verb} {kind}")
        with self._lock:
            self._faults += [(verb, kind)] * times
    # --- lifecycle ---

    def start(self) -> MigStandin:
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = standin._handle(self.command, self.path.split("?", 1)[0], body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="mig-standin", daemon=True)
        self._thread.start()
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> MigStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def regions_client(self):
        """The real RegionsClient, over REST to this stand-in."""
        from google.cloud import compute_v1
        from google.cloud.compute_v1.services.regions.transports import RegionsRestTransport
        return compute_v1.RegionsClient(transport=RegionsRestTransport(host=self.address, url_scheme="http",
                                                                       credentials=_Token()))

    def usage(self, region: str) -> dict[str, float]:
        """What the node VMs of the region's groups hold, per quota metric, plus `other_usage`."""
        used = dict(self.other_usage)
        clusters = self.gke.clusters
        for group in self.groups():
            cluster = clusters.get(group.cluster)
            pool = next((p for p in (cluster.node_pools if cluster else ()) if p.name == group.pool), None)
            if pool is None or group.zone.rsplit("-", 1)[0] != region or not group.instances:
                continue
            n, machine = len(group.instances), pool.config.machine_type
            family, cpus = machine.split("-")[0], SHARED_CORE_CPUS.get(machine) or int(machine.rsplit("-", 1)[1])
            disk = DISK_QUOTA.get(pool.config.disk_type or "pd-standard")  # NodeConfig.disk_type default
            private = cluster.network_config.default_enable_private_nodes or \
                cluster.private_cluster_config.enable_private_nodes or pool.network_config.enable_private_nodes
            # NodeConfig.disk_size_gb docstring: "If unspecified, the default disk size is 100GB"
            for metric, amount in ((CPU_QUOTA[family], cpus * n), ("INSTANCES", n),
                                   (disk, (pool.config.disk_size_gb or 100) * n),
                                   ("IN_USE_ADDRESSES", 0 if private else n)):
                if metric:
                    used[metric] = used.get(metric, 0.0) + amount
        return used

    def _region(self, project: str, region: str) -> dict:
        """regions.get: the Region resource (cloud.google.com/compute/docs/reference/rest/v1/regions)."""
        body = {"kind": "compute#region", "name": region, "status": "UP",
                "selfLink": f"https://www.googleapis.com/compute/v1/projects/{project}/regions/{region}",
                "zones": [f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{region}-{z}"
                          for z in "abcf"]}
        if self.quotas_unavailable:  # Region.quotaStatusWarning: "populated only if fetching of the quotas fails"
            return {**body, "quotaStatusWarning": {"code": "UNREACHABLE", "message": "Quota information is not "
                                                   "available for this region."}}
        used = self.usage(region)
        return {**body, "quotas": [{"metric": m, "limit": limit, "usage": used.get(m, 0.0)}
                                   for m, limit in sorted(self.limits.items())]}

    def client(self):
        """The real InstanceGroupManagersClient, over REST to this stand-in."""
        from google.cloud import compute_v1
        from google.cloud.compute_v1.services.instance_group_managers.transports import (
            InstanceGroupManagersRestTransport,
        )
        transport = InstanceGroupManagersRestTransport(host=self.address, url_scheme="http",
                                                       credentials=_Token())
        return compute_v1.InstanceGroupManagersClient(transport=transport)

    # --- the groups, GKE's ---

    def groups(self) -> list[Group]:
        return self.gke.groups()

    def nodes(self) -> dict[str, Group]:
        """Every instance of every group: node name → its group (pool and zone)."""
        return self.gke.instances()

    # --- the API ---

    def _handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        with self._lock:
            self.calls.append((method, path))
            try:
                region = REGION_PATH.fullmatch(path)
                if region is not None and method == "GET":
                    self._fault("regions.get", region["project"], "", region["region"], region["region"])
                    return 200, self._region(region["project"], region["region"])
                m = PATH.fullmatch(path)
                if m is None or (method == "POST") != bool(m["verb"]) or method not in ("GET", "POST"):
                    # only instanceGroupManagers.get (GET) and .deleteInstances (POST) exist here (compute v1 reference)
                    raise _Refused(404, f"The requested URL {path} was not found.")
                verb = "deleteInstances" if m["verb"] else "get"
                self._fault(verb, m["project"], m["zone"], m["name"], m["zone"].rsplit("-", 1)[0])
                group = next((g for g in self.groups() if g.url.endswith(
                    f"/projects/{m['project']}/zones/{m['zone']}/instanceGroupManagers/{m['name']}")), None)
                if group is None:
                    # a group unknown in that project and zone: 404 notFound (cloud.google.com/compute/docs/api/errors)
                    raise _Refused(404, f"The resource 'projects/{m['project']}/zones/{m['zone']}/"
                                        f"instanceGroupManagers/{m['name']}' was not found")
                if method == "GET":
                    return 200, {"kind": "compute#instanceGroupManager", "name": group.name, "zone": group.zone,
                                 "selfLink": group.url, "targetSize": len(group.instances),
                                 "baseInstanceName": group.name.removesuffix("-grp")}
                return 200, self._delete(group, json.loads(body or b"{}"))
            except _Refused as e:
                return e.status, {"error": {"code": e.status, "message": e.message,
                                            "errors": [{"message": e.message, "reason": e.reason}]}}

    def _fault(self, verb: str, project: str, zone: str, name: str, region: str) -> None:
        fault = next((f for f in self._faults if f[0] == verb), None)
        if fault:  # an injected refusal, as ERRORS cites
            self._faults.remove(fault)
            self.refused.append(fault[1])
            status, text, reason = ERRORS[fault[1]]
            raise _Refused(status, text.format(project=project, zone=zone, name=name, region=region), reason)

    def _delete(self, group: Group, request: dict) -> dict:
        have = group.instances
        names, skip = [], bool(request.get("skipInstancesOnValidationError"))
        for ref in request.get("instances") or []:
            m = INSTANCE.fullmatch(ref)
            if m is None or m["zone"] != group.zone:  # instances are zonal URLs of the group's zone
                raise _Refused(400, f"Invalid value for field 'instances': '{ref}'.")
            if m["name"] not in have:
                # InstanceGroupManagersDeleteInstancesRequest.skip_instances_on_validation_error docstring: with it,
                # instances that are not members are skipped; without it the request fails
                if skip:
                    continue
                raise _Refused(400, f"The instance '{m['name']}' is not a member of the instance group "
                                    f"'{group.name}'.")
            names.append(m["name"])
        if names:
            self.gke.delete_instances(group.url, names)
        op = f"operation-{next(self._ops)}"
        project = group.url.split("/projects/")[1].split("/")[0]
        return {"kind": "compute#operation", "name": op, "operationType": "deleteInstances", "status": "DONE",
                "progress": 100, "zone": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{group.zone}",
                "targetLink": group.url, "selfLink": f"{group.url.split('/instanceGroupManagers/')[0]}/operations/{op}"}
