"""Test world for the GKE backend: the GKE, Kubernetes and instance-group stand-ins glued as the cloud glues them
(pool sizes → instances → Nodes), a fake `helm` that renders what the dask/dask chart renders, and real Dask
processes for the scheduler and for every Running worker pod (stopped when its pod goes, restarted if it exits)."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from pathlib import Path

import yaml
from dasklab.adapters.compute import Migs
from dasklab.adapters.gke import GkeBackend
from dasklab.adapters.procs import free_port, pid_alive, spawn, stop_pid_group
from dasklab.core.config import Config
from dasklab.adapters.release import POOL_LABEL, TOKEN_KEY, TOKEN_SECRET, chart_fullname
from kubernetes import client as k8s

from tests.standins.compute import MigStandin
from tests.standins.gke import GkeStandin
from tests.standins.kube import KubeStandin

PROJECT, LOCATION, TOKEN = "dasklab-test", "us-central1-a", "kube-test-token"
CONFIG = Config(backend="gke", project=PROJECT, location=LOCATION, poll_s=0.2, confirm_s=1.0, cooldown_s=0.5,
                down_fraction=0.5, tick_budget_s=0)
MUTATING = ("POST", "PUT", "PATCH", "DELETE")


class Crash(Exception):
    """Injected right after an external call succeeded: the process died before it could go on."""


def _call_site(method: str, url: str) -> str:
    """('PATCH', '…/namespaces/ns/pods/p') → 'PATCH pods'; the service proxy by its path."""
    path = url.split("://", 1)[-1].split("/", 1)[-1].split("?")[0]
    if "/proxy/" in path:
        return f"{method} proxy {path.split('/proxy', 1)[1]}"
    parts = path.split("/")[2:] if path.startswith("api/") else path.split("/")[3:]
    if len(parts) >= 2 and parts[0] == "namespaces" and len(parts) > 2:
        parts = parts[2:]
    return " ".join([method, parts[0]] + parts[2:3]) if parts else method


class World:
    def __init__(self, tmp: Path, *, worker_capacity: int = 3, config: Config = CONFIG, **gke_options):
        self.tmp, self.worker_capacity, self.config = tmp, worker_capacity, config
        self.gke = GkeStandin(**{"operation_s": 0.3, **gke_options}).start()
        self.kube = KubeStandin(TOKEN, nodes=())
        self.migs = MigStandin(self.gke).start()
        self.admin = k8s.CoreV1Api(self.kube.api_client())
        self.schedulers: dict[str, tuple[int, int]] = {}  # namespace → (scheduler pid, port)
        self.workers: dict[tuple[str, str], int] = {}  # (namespace, pod) → worker pid
        self.helm_fails = False
        self.helm_runs: list[dict] = []
        self.stage = ""  # crash injection keys include it, so each stage crashes at each call site once
        self.crashing = False
        self.crashed: list[str] = []
        self.on_write = None  # called with each Kubernetes write's call site, after it succeeded
        self._lock = threading.Lock()
        self.kube.on_job_created(self._helm)

    # --- the controller's clients, optionally crashing after each new kind of write ---

    def backend(self) -> GkeBackend:
        api = self.kube.api_client()
        raw = api.call_api

        def call_api(method, url, *args, **kwargs):
            response = raw(method, url, *args, **kwargs)
            if method in MUTATING:
                if self.on_write:
                    self.on_write(_call_site(method, url))
                self._maybe_crash(_call_site(method, url))
            return response

        api.call_api = call_api
        clusters = self.gke.client()
        for name in ("create_cluster", "set_labels", "set_node_pool_size", "delete_cluster"):
            self._crash_after(clusters, name)
        migs = Migs(lambda: self._crash_after(self.migs.client(), "delete_instances"))
        return GkeBackend(self.config, clusters, lambda cluster: api, migs, sleep=lambda s: time.sleep(0.02))

    def _crash_after(self, obj, name: str):
        raw = getattr(obj, name)

        def wrapped(*args, **kwargs):
            result = raw(*args, **kwargs)
            self._maybe_crash(name)
            return result

        setattr(obj, name, wrapped)
        return obj

    def _maybe_crash(self, site: str) -> None:
        key = f"{self.stage}: {site}"
        with self._lock:
            if not self.crashing or key in self.crashed:
                return
            self.crashed.append(key)
        raise Crash(key)

    # --- the cloud's glue ---

    def sync(self) -> None:
        """Instances of running clusters become Nodes; Dask processes follow the pods; gone clusters are cleaned."""
        running = {name for name, c in self.gke.clusters.items() if c.status.name == "RUNNING"}
        nodes = {n: g for n, g in self.migs.nodes().items() if g.cluster in running}
        capacity = {n: (self.worker_capacity if g.pool == CONFIG.worker_pool else 20) for n, g in nodes.items()}
        self.kube.set_nodes(capacity,
                            node_labels={n: {POOL_LABEL: g.pool, "topology.kubernetes.io/zone": g.zone}
                                         for n, g in nodes.items()})
        labs = {c.rsplit("/", 1)[1] for c in self.gke.clusters}
        for ns in list(self.schedulers):
            if ns.removeprefix("dasklab-") not in labs:
                self._forget(ns)
        for ns in self.schedulers:
            self._sync_workers(ns)

    def _forget(self, ns: str) -> None:
        for key in [k for k in self.workers if k[0] == ns]:
            stop_pid_group(self.workers.pop(key))
        stop_pid_group(self.schedulers.pop(ns)[0])
        if self.kube.get("namespaces", None, ns):
            self.admin.delete_namespace(ns)

    def _sync_workers(self, ns: str) -> None:
        pods = {p["metadata"]["name"]: p for p in self.kube.list("pods", ns, "component=worker")
                if p["status"].get("phase") == "Running"}
        for key in [k for k in self.workers if k[0] == ns and k[1] not in pods]:
            stop_pid_group(self.workers.pop(key))  # its pod went: the container is killed
        for name, pod in pods.items():
            if (ns, name) not in self.workers or not pid_alive(self.workers[(ns, name)]):  # restartPolicy Always
                self.workers[(ns, name)] = self._start_worker(ns, name, pod)

    def _start_worker(self, ns: str, name: str, pod: dict) -> int:
        (container,) = pod["spec"]["containers"]
        args, env = container["args"], {e["name"]: e for e in container.get("env") or []}
        # the pod runs `dask-worker <fullname>-scheduler:8786 … --name $(POD_NAME)`; POD_NAME is the pod's name
        assert args[0] == "dask-worker" and args[args.index("--name") + 1] == "$(POD_NAME)", args
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        port = self.schedulers[ns][1]
        return spawn([sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}", "--name", name,
                      "--nthreads", args[args.index("--nthreads") + 1], "--no-nanny", "--no-dashboard",
                      "--host", "127.0.0.1"], env=self._env(), log_path=self.tmp / "logs" / f"{name}.log")

    def _env(self, extra: dict | None = None) -> dict:
        scratch = self.tmp / "scratch"
        scratch.mkdir(exist_ok=True)
        return {**os.environ, "DASK_TEMPORARY_DIRECTORY": str(scratch), **(extra or {})}

    # --- helm, as the install Job would run it ---

    def _helm(self, job: dict) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        pod = job["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        assert pod["containers"][0]["command"] == ["helm"] and args[:2] == ["upgrade", "--install"]
        assert args[args.index("--version") + 1] == CONFIG.chart_version and args[-2:] == ["-f", "/values/values.yaml"]
        release = args[2]
        values_cm = pod["volumes"][0]["configMap"]["name"]
        values = yaml.safe_load(self.kube.get("configmaps", ns, values_cm)["data"]["values.yaml"])
        self.helm_runs.append({"namespace": ns, "job": name, "args": args, "values": values, "pod": pod})
        if self.helm_fails:
            self.kube.complete_job(ns, name, succeeded=False, log="Error: INSTALLATION FAILED: chart not found\n")
            return
        full = chart_fullname(release)
        self._render(ns, release, full, values)
        port, dash = free_port(), free_port()
        env = {e["name"]: e["value"] for e in values["scheduler"]["env"]}
        pid = spawn([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                     str(port), "--dashboard-address", f"127.0.0.1:{dash}"], env=self._env(env),
                    log_path=self.tmp / "logs" / f"scheduler-{ns}.log")
        self.schedulers[ns] = (pid, port)
        self.kube.register_service_backend(ns, f"{full}-scheduler", 80, f"http://127.0.0.1:{dash}")
        self.kube.complete_job(ns, name, log=f'Release "{release}" has been upgraded.\nSTATUS: deployed\n')

    def _render(self, ns: str, release: str, full: str, values: dict) -> None:
        """What the chart's templates make of the values (the parts the controller relies on)."""
        def deployment(component: str, replicas: int, args: list, env: list, node_selector: dict) -> dict:
            labels = {"app": "dask", "release": release, "component": component}
            return {"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": f"{full}-{component}", "namespace": ns, "labels": labels},
                    "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {
                        "metadata": {"labels": labels},
                        "spec": {"nodeSelector": node_selector, "containers": [{
                            "name": f"{full}-{component}", "image": "ghcr.io/dask/dask", "args": args,
                            "env": env}]}}}}

        def service(component: str, kind: str, ports: list) -> dict:
            return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{full}-{component}", "namespace": ns},
                    "spec": {"type": kind, "ports": ports,
                             "selector": {"app": "dask", "release": release, "component": component}}}

        s, w, j = values["scheduler"], values["worker"], values["jupyter"]
        limits = w["resources"]["limits"]
        self.kube.create(deployment("scheduler", 1, ["dask-scheduler", "--port=8786", "--dashboard-address=:8787"],
                                    s["env"], s["nodeSelector"]))
        self.kube.create(service("scheduler", s["serviceType"], [
            {"name": f"{full}-scheduler", "port": 8786, "targetPort": 8786},
            {"name": f"{full}-webui", "port": 80, "targetPort": 8787}]))
        self.kube.create(deployment("worker", w["replicas"], [
            "dask-worker", f"{full}-scheduler:8786", "--nthreads", str(w["threads_per_worker"]), "--memory-limit",
            str(limits["memory"]), "--no-dashboard", "--dashboard-address", "8790", *w["extraArgs"]],
            w["env"], w["nodeSelector"]))
        self.kube.create(deployment("jupyter", 1, [], [{"name": "DASK_SCHEDULER_ADDRESS",
                                                         "value": f"{full}-scheduler:8786"}, *j["env"]],
                                    j["nodeSelector"]))
        self.kube.create(service("jupyter", j["serviceType"], [{"name": f"{full}-jupyter", "port": 80,
                                                                 "targetPort": 8888}]))

    # --- reading the world ---

    def token(self, ns: str) -> str:
        return base64.b64decode(self.kube.get("secrets", ns, TOKEN_SECRET)["data"][TOKEN_KEY]).decode()

    def scheduler_address(self, ns: str) -> str:
        return f"tcp://127.0.0.1:{self.schedulers[ns][1]}"

    def pids(self) -> list[int]:
        return [p for p, _ in self.schedulers.values()] + list(self.workers.values())

    def close(self) -> list[int]:
        """Stop everything; the pids that were running, to check none is left."""
        pids = self.pids()
        for pid in pids:
            stop_pid_group(pid)
        self.workers.clear()
        self.schedulers.clear()
        self.migs.stop()
        self.kube.stop()
        self.gke.stop()
        return pids


def jsonl(records) -> str:
    return "\n".join(json.dumps(r, default=str) for r in records)
