"""Test stand-in for Compute Engine managed instance groups (compute v1 REST) behind GKE node pools, for the real
InstanceGroupManagersClient: get (targetSize) and deleteInstances, strict about membership and names.

Each group belongs to a node pool of a GkeStandin cluster (its `instance_group_urls`). The group's instances follow
the pool's size as GKE sets it (a resize adds instances, or removes instances AT RANDOM, as GKE does); deleting
chosen instances shrinks the group and the pool's size (`GkeStandin.set_node_count`). Instances are the cluster's
nodes: `nodes()` lists them for a Kubernetes stand-in.
"""

from __future__ import annotations

import http.server
import itertools
import json
import random
import re
import threading
from dataclasses import dataclass

from tests.standins.gke import GkeStandin

PATH = re.compile(r"/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/instanceGroupManagers/"
                  r"(?P<name>[^/]+)(?P<verb>/deleteInstances)?")
INSTANCE = re.compile(r"(?:.*/)?zones/(?P<zone>[^/]+)/instances/(?P<name>[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)")
SAFE = "bcdfghjklmnpqrstvwxz"


@dataclass(frozen=True)
class Group:
    cluster: str  # GKE cluster resource name
    pool: str
    zone: str
    url: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[1]


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class MigStandin:
    """Serves compute v1 instanceGroupManagers get/deleteInstances on 127.0.0.1 for a GkeStandin's node pools."""

    def __init__(self, gke: GkeStandin, *, seed: int = 0):
        self.gke = gke
        self.calls: list[tuple[str, str]] = []
        self.removed_at_random: list[str] = []  # instances a resize removed (GKE's choice, not ours)
        self.deleted: list[str] = []  # instances deleted by deleteInstances (the caller's choice)
        self._rng = random.Random(seed)
        self._instances: dict[str, list[str]] = {}  # group url → instance names
        self._ops = itertools.count(1)
        self._lock = threading.RLock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

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

    def client(self):
        """The real InstanceGroupManagersClient, over REST to this stand-in."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import compute_v1
        from google.cloud.compute_v1.services.instance_group_managers.transports import (
            InstanceGroupManagersRestTransport,
        )
        transport = InstanceGroupManagersRestTransport(host=self.address, url_scheme="http",
                                                       credentials=AnonymousCredentials())
        return compute_v1.InstanceGroupManagersClient(transport=transport)

    # --- the groups, following GKE ---

    def groups(self) -> list[Group]:
        found = []
        for name, cluster in self.gke.clusters.items():
            for pool in cluster.node_pools:
                for url in pool.instance_group_urls:
                    found.append(Group(name, pool.name, url.split("/zones/")[1].split("/")[0], url))
        return found

    def _sync(self, group: Group) -> list[str]:
        """The group's instances after GKE's latest resize of its pool (GKE removes at random)."""
        have = self._instances.setdefault(group.url, [])
        want = self.gke.node_count(group.cluster, group.pool)
        base = group.name.removesuffix("-grp")
        while len(have) < want:
            candidate = f"{base}-{''.join(self._rng.choice(SAFE) for _ in range(4))}"
            if candidate not in have:
                have.append(candidate)
        while len(have) > want:
            victim = self._rng.choice(have)
            have.remove(victim)
            self.removed_at_random.append(victim)
        return have

    def nodes(self) -> dict[str, Group]:
        """Every instance of every group: node name → its group (pool and zone)."""
        with self._lock:
            live = self.groups()
            for url in set(self._instances) - {g.url for g in live}:
                del self._instances[url]  # the cluster went, and its groups
            return {name: g for g in live for name in self._sync(g)}

    # --- the API ---

    def _handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        with self._lock:
            self.calls.append((method, path))
            try:
                m = PATH.fullmatch(path)
                if m is None or (method == "POST") != bool(m["verb"]) or method not in ("GET", "POST"):
                    raise _Refused(404, f"The requested URL {path} was not found.")
                group = next((g for g in self.groups() if g.url.endswith(
                    f"/projects/{m['project']}/zones/{m['zone']}/instanceGroupManagers/{m['name']}")), None)
                if group is None:
                    raise _Refused(404, f"The resource 'projects/{m['project']}/zones/{m['zone']}/"
                                        f"instanceGroupManagers/{m['name']}' was not found")
                if method == "GET":
                    return 200, {"kind": "compute#instanceGroupManager", "name": group.name, "zone": group.zone,
                                 "selfLink": group.url, "targetSize": len(self._sync(group)),
                                 "baseInstanceName": group.name.removesuffix("-grp")}
                return 200, self._delete(group, json.loads(body or b"{}"))
            except _Refused as e:
                return e.status, {"error": {"code": e.status, "message": e.message,
                                            "errors": [{"message": e.message, "reason": "invalid"}]}}

    def _delete(self, group: Group, request: dict) -> dict:
        have = self._sync(group)
        names, skip = [], bool(request.get("skipInstancesOnValidationError"))
        for ref in request.get("instances") or []:
            m = INSTANCE.fullmatch(ref)
            if m is None or m["zone"] != group.zone:
                raise _Refused(400, f"Invalid value for field 'instances': '{ref}'.")
            if m["name"] not in have:
                if skip:
                    continue
                raise _Refused(400, f"The instance '{m['name']}' is not a member of the instance group "
                                    f"'{group.name}'.")
            names.append(m["name"])
        if names:
            zones = {g.zone for g in self.groups() if (g.cluster, g.pool) == (group.cluster, group.pool)}
            if len(zones) > 1:
                raise _Refused(501, "stand-in: deleting instances of a multi-zone pool is not modelled")
            for name in names:
                have.remove(name)
                self.deleted.append(name)
            self.gke.set_node_count(group.cluster, group.pool, len(have))
        op = f"operation-{next(self._ops)}"
        project = group.url.split("/projects/")[1].split("/")[0]
        return {"kind": "compute#operation", "name": op, "operationType": "deleteInstances", "status": "DONE",
                "progress": 100, "zone": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{group.zone}",
                "targetLink": group.url, "selfLink": f"{group.url.split('/instanceGroupManagers/')[0]}/operations/{op}"}
