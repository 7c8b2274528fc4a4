"""Adapter for the Dask scheduler's dashboard HTTP API: read load, retire workers (any transport)."""

import json
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Callable, Protocol

from dasklab.core import logs
from dasklab.core.errors import SchedulerUnreachable
from dasklab.core.model import DaskLoad, WorkerInfo

# The scheduler must serve these routes; distributed.http.scheduler.api is off by default.
SCHEDULER_HTTP_ROUTES = [
    "distributed.http.scheduler.json",
    "distributed.http.health",
    "distributed.http.scheduler.api",
    "distributed.http.scheduler.info",
    "distributed.http.proxy",
    "distributed.http.statics",
]
# Every call the controller makes to the scheduler's HTTP API and every field it reads from the answer (a request's
# body fields for a POST). tests/test_scheduler_contract.py proves each one on the labs' pinned Dask and on the
# installed one, and fails when the code here uses a path or a field this does not list.
SCHEDULER_API: dict[str, tuple[str, ...]] = {
    "GET /health": (),
    "GET /json/counts.json": ("workers", "processing", "clients", "desired_workers", "tasks", "released", "erred",
                              "memory", "waiting", "unrunnable", "bytes"),
    "GET /api/v1/adaptive_target": ("workers",),
    "GET /api/v1/check_idle": ("idle_since",),
    "GET /api/v1/get_workers": ("workers", "address", "name"),
    "GET /json/identity.json": ("workers", "metrics", "task_counts", "executing", "ready", "memory", "waiting",
                                "managed_bytes"),
    "POST /api/v1/retire_workers": ("workers",),  # answered with a mapping keyed by the retired addresses
}
FIRE_AND_FORGET_CLIENTS = 1  # the scheduler always counts its own "fire-and-forget" client


class Transport(Protocol):
    def get(self, path: str) -> bytes: ...
    def post(self, path: str, body: bytes) -> bytes: ...


class HttpTransport:
    """Plain HTTP to a dashboard this process can reach (the local lab, on 127.0.0.1)."""

    def __init__(self, base_url: str, timeout: float = 5.0):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def _call(self, req: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError
            raise SchedulerUnreachable(f"{req.full_url}: {e}") from e

    def get(self, path: str) -> bytes:
        return self._call(urllib.request.Request(self.base_url + path))

    def post(self, path: str, body: bytes) -> bytes:
        return self._call(urllib.request.Request(self.base_url + path, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"}))


def _json(raw: bytes, path: str):
    try:
        return json.loads(raw)
    except ValueError as e:
        raise SchedulerUnreachable(f"{path}: not JSON ({raw[:80]!r})") from e


def _worker_load(identity: dict) -> float:
    """Tasks on a worker plus what it holds, as one number (1 task ≈ 64 MiB moved)."""
    metrics = identity.get("metrics", {})
    tasks = sum(metrics.get("task_counts", {}).get(k, 0) for k in ("executing", "ready", "memory", "waiting"))
    return tasks + metrics.get("managed_bytes", 0) / 2**26


def _pending(counts: dict) -> int:
    """Tasks known to the scheduler but not running nor done: waiting on dependencies, without a worker, or
    queued on the scheduler (its default: tasks beyond the workers' saturation wait in its `queued` set).

    counts.json has no count of queued tasks (only /metrics, which needs prometheus_client in the scheduler's
    image, has one), so it is what is left of `tasks` once released, erred, processing and in-memory tasks
    are taken out. `memory` counts replicas, so while a result sits on two workers this falls short by one
    (AMM drops extra replicas within seconds); it never counts a task that is not pending.
    """
    g = counts.get
    left = g("tasks", 0) - g("released", 0) - g("erred", 0) - g("processing", 0) - g("memory", 0)
    return max(left, g("waiting", 0) + g("unrunnable", 0), 0)


class Dashboard:
    """The scheduler's HTTP API behind a transport; `node_of` maps a worker name to its node."""

    def __init__(self, transport: Transport, node_of: Callable[[str], str] = lambda name: name):
        self.transport, self.node_of = transport, node_of

    def fetch_load(self, idle: bool = True) -> DaskLoad:
        """One call, /json/counts.json (counts and the adaptive target); with `idle` a second one, for when the
        scheduler became idle (/api/v1/check_idle)."""
        counts = _json(self.transport.get("/json/counts.json"), "counts.json")
        target = counts.get("desired_workers")
        if target is None:  # a counts.json without it (none seen in distributed since 2022): ask the API
            target = _json(self.transport.get("/api/v1/adaptive_target"), "adaptive_target")["workers"]
        load = DaskLoad(workers=counts["workers"], processing=counts["processing"], queued=_pending(counts),
                        clients=max(0, counts["clients"] - FIRE_AND_FORGET_CLIENTS), adaptive_target=int(target),
                        idle_since=None, memory_bytes=int(counts.get("bytes", 0)))
        if idle:
            load = replace(load, idle_since=self.fetch_idle_since())
        return load

    def fetch_idle_since(self) -> float | None:
        """Since when the scheduler has had no task (epoch s), None while it has some (/api/v1/check_idle)."""
        return _json(self.transport.get("/api/v1/check_idle"), "check_idle").get("idle_since")

    def fetch_workers(self) -> tuple[WorkerInfo, ...]:
        """The workers with their nodes, and their load where the scheduler can report it.

        /json/identity.json answers 500 while tasks run (distributed 2026.8 cannot encode its tuple-keyed
        task counts), so membership comes from /api/v1/get_workers and load is best effort.
        """
        listed = self._listed()
        try:
            identity = _json(self.transport.get("/json/identity.json"), "identity.json").get("workers", {})
        except SchedulerUnreachable:
            identity = {}
        return tuple(sorted((WorkerInfo(address=w["address"], name=str(w["name"]), node=self.node_of(str(w["name"])),
                                        load=_worker_load(identity.get(w["address"], {}))) for w in listed),
                            key=lambda w: w.name))

    def _listed(self) -> list[dict]:
        return _json(self.transport.get("/api/v1/get_workers"), "get_workers")["workers"]

    def apply_retire(self, addresses: list[str]) -> list[str]:
        """Retire workers gracefully: the scheduler moves their data to the others, then removes them. Returns
        the addresses retired.

        A failed call is not the end of it: distributed < 2025.9.0 answers 500 although it retired them, and a
        timeout may come after the retirement was done. The workers are read again: those that left the
        scheduler are retired; those still there are not (the caller keeps them, a later pass tries again).
        """
        if not addresses:
            return []
        try:
            raw = self.transport.post("/api/v1/retire_workers", json.dumps({"workers": addresses}).encode())
            return sorted(_json(raw, "retire_workers"))
        except SchedulerUnreachable as e:
            left = sorted(set(addresses) - {w["address"] for w in self._listed()})
            logs.emit("WARNING", action="retire-reread", reason=f"retire_workers failed ({e}); {len(left)} of "
                      f"{len(addresses)} left the scheduler: those are retired", workers=left)
            return left
