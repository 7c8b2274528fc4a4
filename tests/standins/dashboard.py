"""Test stand-in for many labs' Dask scheduler dashboards (distributed 2026.8's HTTP API), one HTTP server on
127.0.0.1 behind the Kubernetes stand-in's service proxy: a class of 100 labs without 100 scheduler processes.

Each lab (its namespace) is a path prefix /lab/<namespace>/, registered as the backend of its scheduler Service. Its
workers are its Running worker pods in the Kubernetes stand-in (the chart's workers connect once their container
runs); its work is what the test gives it (`set_tasks`): long tasks, as a student's computation. Every answer
follows the distributed source named beside it (distributed 2026.8.0, the version installed here)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DashboardStandin:
    def __init__(self, kube):
        self.kube = kube
        self._tasks: dict[str, int] = {}  # namespace → long tasks submitted and not done
        self._idle_since: dict[str, float | None] = {}
        self._retired: dict[str, set[str]] = {}  # namespace → worker names retired (they left the scheduler)
        self._lock = threading.Lock()
        self.hits = 0
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, body) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode() if body is not None else b""
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                _, _, ns, rest = self.path.split("/", 3)
                self._answer(standin._get(ns, "/" + rest.split("?")[0]))

            def do_POST(self):
                _, _, ns, rest = self.path.split("/", 3)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                self._answer(standin._post(ns, "/" + rest.split("?")[0], body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "DashboardStandin":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the test's side ---

    def add(self, ns: str) -> str:
        """A scheduler starts for the namespace: its backend URL. Scheduler.__init__ sets idle_since = time()."""
        with self._lock:
            self._tasks[ns], self._idle_since[ns], self._retired[ns] = 0, time.time(), set()
        return f"{self.url}/lab/{ns}"

    def forget(self, ns: str) -> None:
        with self._lock:
            for d in (self._tasks, self._idle_since, self._retired):
                d.pop(ns, None)

    def set_tasks(self, ns: str, n: int) -> None:
        with self._lock:
            self._tasks[ns] = n

    # --- the scheduler's side ---

    def _workers(self, ns: str) -> list[str]:
        """Worker pods whose container runs (as tests.gke_world starts a worker process for), less those retired."""
        pods = self.kube.list("pods", ns, "component=worker")
        return sorted(p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"
                      and all("running" in c["state"] for c in p["status"].get("containerStatuses") or ())
                      and p["metadata"]["name"] not in self._retired.get(ns, ()))

    def _get(self, ns: str, path: str):
        with self._lock:
            if ns not in self._tasks:
                return None
            self.hits += 1
            tasks = self._tasks[ns]
        workers = self._workers(ns)
        if path == "/health":  # distributed/http/health.py HealthHandler: "ok"
            return "ok"
        if path == "/json/counts.json":
            # distributed/http/scheduler/json.py CountsJSON; a task no worker can run is `unrunnable`
            # (Scheduler._transition_waiting_no_worker), one on a worker is `processing` there
            return {"workers": len(workers), "processing": tasks if workers else 0,
                    "unrunnable": 0 if workers else tasks, "waiting": 0, "memory": 0, "released": 0, "erred": 0,
                    "tasks": tasks, "bytes": 0, "clients": 1 + bool(tasks), "desired_workers": self._target(tasks)}
        if path == "/api/v1/adaptive_target":  # distributed/http/scheduler/api.py AdaptiveTargetHandler
            return {"workers": self._target(tasks)}
        if path == "/api/v1/check_idle":  # Scheduler.check_idle
            with self._lock:
                if tasks:  # unrunnable, or processing on a worker: not idle
                    self._idle_since[ns] = None
                elif not self._idle_since[ns]:
                    self._idle_since[ns] = time.time()
                return {"idle_since": self._idle_since[ns]}
        if path == "/api/v1/get_workers":  # GetWorkersHandler: name and address of each; the chart's name = pod
            return {"num_workers": len(workers), "workers": [{"name": w, "address": f"tcp://{w}:0"} for w in workers]}
        if path == "/json/identity.json":  # Scheduler.identity(): no per-worker metrics needed here
            return {"workers": {}}
        return None

    def _post(self, ns: str, path: str, body: dict):
        if path != "/api/v1/retire_workers" or ns not in self._tasks:
            return None
        # RetireWorkersHandler → Scheduler.retire_workers: a mapping keyed by the addresses retired; they leave
        names = {a.removeprefix("tcp://").rsplit(":", 1)[0]: a for a in body.get("workers", [])}
        known = set(self._workers(ns))
        with self._lock:
            self._retired[ns] |= known & set(names)
        return {names[n]: {"name": n} for n in sorted(known & set(names))}

    @staticmethod
    def _target(tasks: int) -> int:
        """Scheduler.adaptive_target for long tasks of unknown duration (0.5 s each, target duration 5 s): one
        worker while any task waits or runs (cpu = ceil(0.5 / 5) = 1; `max(1, cpu)` with no workers); none without
        tasks (every idle worker is a worker to close)."""
        return 1 if tasks else 0
