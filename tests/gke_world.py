"""Test world for the GKE backend: the GKE, Kubernetes and instance-group stand-ins glued as the cloud glues them
(pool sizes → instances → Nodes), a fake `helm` that renders what the dask/dask chart 2024.1.1 renders, and real Dask
processes for the scheduler and for every Running worker pod, run from the rendered containers' args (workers under
their nannies; stopped when the pod goes, restarted if they exit, as restartPolicy Always does)."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml
from dasklab.adapters.compute import Migs
from dasklab.adapters.gke import GkeBackend, class_cluster
from dasklab.adapters.local import start_scheduler
from dasklab.adapters.jupyter import start_jupyter, stop_jupyter, write_token
from dasklab.adapters.records import FirestoreLabRecords
from dasklab.adapters.procs import pid_alive, spawn, stop_pid_group, wait_until
from dasklab.core.config import Config
from dasklab.adapters.release import POOL_LABEL, TOKEN_KEY, TOKEN_SECRET, _merge, chart_fullname
from kubernetes import client as k8s

from tests.dask_checks import LOG_LENGTH_ENV
from tests.standins.compute import MigStandin
from tests.standins.gke import GkeStandin
from tests.standins.kube import KubeStandin

PROJECT, LOCATION, TOKEN = "dasklab-test", "us-central1-a", "kube-test-token"
CONFIG = Config(backend="gke", project=PROJECT, location=LOCATION, poll_s=0.2, confirm_s=1.0, cooldown_s=0.5,
                down_fraction=0.5, tick_budget_s=0, node_service_account=f"dasklab-nodes@{PROJECT}.iam.gserviceaccount.com")
MUTATING = ("POST", "PUT", "PATCH", "DELETE")
# The defaults of the chart dask/dask 2024.1.1 (dask/values.yaml at that tag) for what its templates read below.
_POD = {"tolerations": [], "affinity": {}, "nodeSelector": {}, "securityContext": {}, "livenessProbe": {},
        "readinessProbe": {}, "resources": {}, "env": None}  # each component's pod keys, all empty
CHART_DEFAULTS = {
    "scheduler": {"enabled": True, "image": {"repository": "ghcr.io/dask/dask", "tag": "2024.1.0",
                                             "pullPolicy": "IfNotPresent", "pullSecrets": None},
                  "replicas": 1, "serviceType": "ClusterIP", "loadBalancerIP": None, "servicePort": 8786,
                  "serviceAnnotations": {}, "extraArgs": [], **_POD},
    "webUI": {"servicePort": 80, "ingress": {"enabled": False}},
    "worker": {"name": "worker", "image": {"repository": "ghcr.io/dask/dask", "tag": "2024.1.0",
                                           "pullPolicy": "IfNotPresent", "dask_worker": "dask-worker",
                                           "pullSecrets": None},
               "replicas": 3, "strategy": {"type": "RollingUpdate"}, "custom_scheduler_url": None,
               "default_resources": {"cpu": 1, "memory": "4GiB"}, "extraArgs": [], "mounts": {}, "annotations": {},
               "portDashboard": 8790, **_POD},
    "additional_worker_groups": [],
    "jupyter": {"enabled": True, "rbac": True, "image": {"repository": "ghcr.io/dask/dask-notebook", "tag": "2024.1.0",
                                                         "pullPolicy": "IfNotPresent", "pullSecrets": None},
                "serviceType": "ClusterIP", "servicePort": 80,
                "password": "sha1:aae8550c0a44:9507d45e087d5ee481a5ce9f4f16f37a0867318c", "command": None, "args": None,
                "extraConfig": "# Extra Jupyter config goes here\n# E.g\n# c.NotebookApp.port = 8888", "mounts": {},
                "serviceAccountName": "dask-jupyter", "ingress": {"enabled": False}, **_POD},
}


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
    def __init__(self, tmp: Path, *, worker_capacity: int = 3, jupyter: bool = False, config: Config = CONFIG,
                 namespace_termination_s: float = 0.0, **gke_options):
        self.tmp, self.worker_capacity, self.config = tmp, worker_capacity, config
        self.jupyter = jupyter  # a real Jupyter Server per lab behind the service proxy (else it has no endpoints)
        self.jupyters: dict[str, tuple[int, int]] = {}  # namespace → (Jupyter pid, port)
        self.gke = GkeStandin(**{"operation_s": 0.3, **gke_options}).start()
        self.kube = KubeStandin(TOKEN, nodes=(), namespace_termination_s=namespace_termination_s)
        self.migs = MigStandin(self.gke).start()
        self.admin = k8s.CoreV1Api(self.kube.api_client())
        self.schedulers: dict[str, tuple[int, int]] = {}  # namespace → (scheduler pid, port)
        self.workers: dict[tuple[str, str], int] = {}  # (namespace, pod) → worker pid
        self.helm_fails = False
        self.worker_node_quota: int | None = None  # instances past it are never created (the project's CPU quota)
        self.helm_runs: list[dict] = []
        self.manifests: dict[tuple[str, str], dict] = {}  # (namespace, Deployment) → the manifest helm last applied
        self.stage = ""  # crash injection keys include it, so each stage crashes at each call site once
        self.crashing = False
        self.crashed: list[str] = []
        self.on_write = None  # called with each Kubernetes write's call site, after it succeeded
        # the lab records in the Firestore emulator (tests: the `firestore_env` fixture), a project of this world's own
        # that outlives every controller instance
        if not os.environ.get("FIRESTORE_EMULATOR_HOST"):
            raise RuntimeError("the GKE test world keeps its lab records in the Firestore emulator: use firestore_env")
        self.records_project = f"test-{uuid.uuid4().hex[:12]}"
        self.uninstallable: set[str] = set()  # packages pip cannot install (the image's entrypoint says so)
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
        for name in ("create_cluster", "set_node_pool_size", "delete_cluster"):
            self._crash_after(clusters, name)
        migs = Migs(lambda: self._crash_after(self.migs.client(), "delete_instances"))
        records = self.records()
        for name, site in (("apply_create", "record create"), ("apply_record", "record write"),
                           ("apply_forget", "record forget")):  # the record writes, in Firestore
            self._crash_after(records, name, site)
        return GkeBackend(self.config, clusters, lambda cluster: api, migs, records, sleep=lambda s: time.sleep(0.02))

    def reports(self):
        """What the controller's functions reported once (a contained lab's lab-degraded), in the same database."""
        from dasklab.adapters.firestore import FirestoreReports
        return FirestoreReports(self.records_project)

    def records(self) -> FirestoreLabRecords:
        """The lab records as the controller's functions share them."""
        return FirestoreLabRecords(self.records_project)

    def _crash_after(self, obj, name: str, site: str = ""):
        raw = getattr(obj, name)

        def wrapped(*args, **kwargs):
            result = raw(*args, **kwargs)
            self._maybe_crash(site or name)
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
        running = {name for name, c in self.gke.clusters.items()  # nodes serve in all three (Cluster.Status)
                   if c.status.name in ("RUNNING", "RECONCILING", "DEGRADED")}
        nodes = {n: g for n, g in self.migs.nodes().items() if g.cluster in running}
        if self.worker_node_quota is not None:
            pool = sorted(n for n, g in nodes.items() if g.pool == CONFIG.worker_pool)
            nodes = {n: g for n, g in nodes.items() if n not in pool[self.worker_node_quota:]}
        capacity = {n: (self.worker_capacity if g.pool == CONFIG.worker_pool else 20) for n, g in nodes.items()}
        self.kube.set_nodes(capacity,
                            node_labels={n: {POOL_LABEL: g.pool, "topology.kubernetes.io/zone": g.zone}
                                         for n, g in nodes.items()})
        for ns in list(self.schedulers):
            if not self.lab_stands(ns):
                self._forget(ns)
        for ns in list(self.schedulers):  # a helm Job's hook may still be adding one (its POST timed out)
            self._sync_workers(ns)

    def lab_stands(self, ns: str) -> bool:
        """A lab's pods go with its cluster, or with its namespace in a shared one."""
        clusters = {c.rsplit("/", 1)[1] for c in self.gke.clusters}
        namespace = self.kube.get("namespaces", None, ns)
        klass = ((namespace or {}).get("metadata", {}).get("labels") or {}).get("class")
        return bool(namespace) and (class_cluster(klass) if klass else ns.removeprefix("dasklab-")) in clusters

    def _forget(self, ns: str) -> None:
        for key in [k for k in self.workers if k[0] == ns]:
            stop_pid_group(self.workers.pop(key))
        stop_pid_group(self.schedulers.pop(ns)[0])
        if ns in self.jupyters:
            stop_jupyter(self.jupyters.pop(ns)[0])
        if self.kube.get("namespaces", None, ns):
            self.admin.delete_namespace(ns)

    def _sync_workers(self, ns: str) -> None:
        pods = {p["metadata"]["name"]: p for p in self.kube.list("pods", ns, "component=worker")
                if p["status"].get("phase") == "Running"
                and all("running" in c["state"] for c in p["status"].get("containerStatuses") or ())}
        for key in [k for k in self.workers if k[0] == ns and k[1] not in pods]:
            stop_pid_group(self.workers.pop(key))  # its pod went, or its container ended: the process is killed
        for name, pod in pods.items():
            if (ns, name) not in self.workers or not pid_alive(self.workers[(ns, name)]):  # restartPolicy Always
                self.workers[(ns, name)] = self._start_worker(ns, name, pod)

    def _start_worker(self, ns: str, name: str, pod: dict) -> int:
        """The pod's container as a process: its rendered args with `dask-worker` run by this python (under a nanny,
        as the chart's worker runs), the scheduler Service's name resolved, $(POD_NAME) expanded as the kubelet does."""
        (container,) = pod["spec"]["containers"]
        args, env = list(container["args"]), {e["name"]: e for e in container.get("env") or []}
        assert args[0] == "dask-worker" and "--no-nanny" not in args, args
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        full = chart_fullname(pod["metadata"]["labels"]["release"])
        assert args[1] == f"{full}-scheduler:8786", args
        args[1] = f"tcp://127.0.0.1:{self.schedulers[ns][1]}"
        args = [name if a == "$(POD_NAME)" else a for a in args[1:]]
        literal = {n: str(e["value"]) for n, e in env.items() if "value" in e}  # e.g. EXTRA_PIP_PACKAGES
        self._prepare(ns, name, literal.get("EXTRA_PIP_PACKAGES", ""))
        return spawn([sys.executable, "-m", "distributed.cli.dask_worker", *args, "--host", "127.0.0.1"],
                     env=self._env(literal), log_path=self.tmp / "logs" / f"{name}.log")

    def _prepare(self, ns: str, pod: str, packages: str) -> None:
        """The image's entrypoint (dask-docker base/prepare.sh: `set -x`, no `set -e`) before the worker: it echoes,
        runs `pip install $EXTRA_PIP_PACKAGES`, and starts the worker whatever pip said. Packages are not really
        installed here: one in `uninstallable` fails as pip says it, the others print pip's success line."""
        if not packages:
            return
        names = packages.split()
        bad = [p for p in names if p in self.uninstallable]
        log = ["+ '[' '' ']'", "+ '[' -e /opt/app/environment.yml ']'", "+ echo 'no environment.yml'",
               "no environment.yml", f"+ '[' '{packages}' ']'",
               "+ echo 'EXTRA_PIP_PACKAGES environment variable found.  Installing'.",
               "EXTRA_PIP_PACKAGES environment variable found.  Installing.", f"+ /opt/conda/bin/pip install {packages}"]
        if bad:
            log += [f"ERROR: Could not find a version that satisfies the requirement {bad[0]} (from versions: none)",
                    f"ERROR: No matching distribution found for {bad[0]}"]
        else:
            log.append("Successfully installed " + " ".join(p for p in names if not p.startswith("-")))
        self.kube.write_log(ns, pod, "\n".join(log + ["+ dask-worker …"]) + "\n")

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
        if ns in self.schedulers:  # helm upgrade of an installed release: a new revision of its objects
            self._upgrade(ns, release, full, values)
            self.kube.complete_job(ns, name, log=f'Release "{release}" has been upgraded.\nSTATUS: deployed\n')
            return
        self._render(ns, release, full, values)
        if not self.kube.list("pods", ns, "component=scheduler"):  # refused at admission: no scheduler runs (helm
            self.kube.complete_job(ns, name, log=f'Release "{release}" has been upgraded.\nSTATUS: deployed\n')
            return  # does not wait for pods by default: its Job succeeds all the same)
        # the scheduler pod's container as a process: its rendered args and env, on ports free here
        (container,) = self.kube.get("deployments", ns, f"{full}-scheduler")["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[:3] == ["dask-scheduler", "--port=8786", "--dashboard-address=:8787"], args
        env = {e["name"]: e["value"] for e in container["env"]}
        pid, port, dash = self._start_scheduler(ns, args[3:], env)
        self.schedulers[ns] = (pid, port)
        self.kube.register_service_backend(ns, f"{full}-scheduler", 80, f"http://127.0.0.1:{dash}")
        if self.jupyter:  # the chart's Jupyter pod: JUPYTER_TOKEN from the Secret, the scheduler's address
            token_file = self.tmp / f"jupyter-{ns}" / "token"
            write_token(token_file, self.token(ns))
            started = start_jupyter(sys.executable, token_file=token_file, root_dir=self.tmp / f"jupyter-{ns}",
                                    runtime_dir=self.tmp / f"jupyter-{ns}" / "runtime",
                                    scheduler_address=f"tcp://127.0.0.1:{port}", env=self._env(),
                                    log_path=self.tmp / "logs" / f"jupyter-{ns}.log")
            assert started, f"the Jupyter of {ns} exited: {(self.tmp / 'logs' / f'jupyter-{ns}.log').read_text()[-999:]}"
            jpid, jport = started
            self.jupyters[ns] = (jpid, jport)
            self.kube.register_service_backend(ns, f"{full}-jupyter", 80, f"http://127.0.0.1:{jport}")
        self.kube.complete_job(ns, name, log=f'Release "{release}" has been upgraded.\nSTATUS: deployed\n')

    def _start_scheduler(self, ns: str, args: list[str], env: dict, port: int = 0) -> tuple[int, int, int]:
        """The namespace's scheduler pod as a dask-scheduler process on 127.0.0.1: on `port` (0: one the OS gives
        it) with a dashboard on one the OS gives it, both read back from its scheduler file (pid, port, dashboard
        port), as the local lab starts its own."""
        log = self.tmp / "logs" / f"scheduler-{ns}.log"
        started = start_scheduler(args, file=self.tmp / "schedulers" / f"{ns}.json", port=port,
                                  env=self._env({**env, **LOG_LENGTH_ENV}), log_path=log)
        assert started, f"the scheduler of {ns} exited: {log.read_text()[-2000:]}"
        pid, info = started
        return pid, int(info["address"].rsplit(":", 1)[1]), int(info["services"]["dashboard"])

    def _upgrade(self, ns: str, release: str, full: str, values: dict) -> None:
        """`helm upgrade`: each Deployment patched from the manifest it last applied to the one the new values
        render, a three-way merge that keeps what only the live object holds (e.g. a minReadySeconds the controller
        set): "Helm 3 now uses a three-way strategic merge patch" (helm.sh/docs/faq/changes_since_helm2). Here a
        JSON merge patch of the two manifests' difference (lists replaced whole). A changed pod template gives the
        Deployment a new ReplicaSet; the scheduler's process restarts when its template changed. Other objects are
        left as they are."""
        apps = k8s.AppsV1Api(self.kube.api_client())
        rendered: list[dict] = []
        self._render(ns, release, full, values, out=rendered)
        for obj in rendered:
            if obj["kind"] != "Deployment":
                continue
            name = obj["metadata"]["name"]
            before = self.manifests[(ns, name)]
            if before == obj:
                continue
            old = self.kube.get("deployments", ns, name)
            apps.patch_namespaced_deployment(name, ns, _merge_patch(before, obj),
                                             _content_type="application/merge-patch+json")
            self.manifests[(ns, name)] = obj
            if name.endswith("-scheduler") and old["spec"]["template"] != obj["spec"]["template"]:  # restarted
                pid, port = self.schedulers[ns]
                stop_pid_group(pid)
                (container,) = obj["spec"]["template"]["spec"]["containers"]
                env = {e["name"]: e["value"] for e in container["env"]}
                pid, port, dash = self._start_scheduler(ns, container["args"][3:], env, port)  # where workers are
                self.schedulers[ns] = (pid, port)
                self.kube.register_service_backend(ns, f"{full}-scheduler", 80, f"http://127.0.0.1:{dash}")

    def _render(self, ns: str, release: str, full: str, values: dict, out: list | None = None) -> None:
        """What the chart dask/dask 2024.1.1 renders from the values, every key that reaches a pod: each object below
        mirrors the template named beside it (github.com/dask/helm-chart, tag 2024.1.1, dask/templates), each field
        where that template puts it. Created, or appended to `out` (an upgrade compares them with what runs).
        Not rendered: the Ingresses (off unless enabled; asserted off) and the Prometheus ServiceMonitor/PodMonitor
        (metrics.*: objects of the Prometheus operator, no pod)."""
        def make(obj: dict) -> None:
            if out is not None:
                out.append(obj)
                return
            self.kube.create(obj)
            if obj["kind"] == "Deployment":
                self.manifests[(ns, obj["metadata"]["name"])] = obj

        v = _merge(CHART_DEFAULTS, values)
        s, w, j, ui = v["scheduler"], v["worker"], v["jupyter"], v["webUI"]
        # _helpers.tpl: dask.name is nameOverride or the chart's name; dask.fullname is fullnameOverride, else the
        # release when it contains that name, else "<release>-<name>" (63 characters at most); dask.chart is
        # "<name>-<version>"
        name = v.get("nameOverride") or "dask"
        full = (v.get("fullnameOverride") or (release if name in release else f"{release}-{name}"))[:63].rstrip("-")
        chart = f"dask-{CONFIG.chart_version}"

        def meta(obj_name: str, component: str, annotations: dict | None = None) -> dict:  # every metadata.labels
            return {"name": obj_name, "namespace": ns, "labels": {"app": name, "heritage": "Helm", "release": release,
                                                                 "chart": chart, "component": component},
                    **optional(annotations=annotations)}

        def selector(component: str) -> dict:  # every template's selector and pod template labels
            return {"app": name, "release": release, "component": component}

        def image(component: dict) -> str:
            return f"{component['image']['repository']}:{component['image']['tag']}"

        def deployment(obj_name: str, component: str, replicas: int, strategy: dict, container: dict, pod: dict,
                       annotations: dict | None = None) -> dict:
            return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(obj_name, component),
                    "spec": {"replicas": replicas, "selector": {"matchLabels": selector(component)},
                             "strategy": strategy,
                             "template": {"metadata": {"labels": selector(component),
                                                       **optional(annotations=annotations)},
                                          "spec": {"containers": [container], **pod}}}}

        def quantities(resources: dict) -> dict:  # the API server answers quantities as strings ("1", not 1)
            return {k: {q: str(n) for q, n in (block or {}).items()} for k, block in (resources or {}).items()}

        def optional(**fields) -> dict:  # the templates' `{{- with … }}`: left out when empty
            return {k: val for k, val in fields.items() if val}

        def placement(c: dict) -> dict:  # the pod-level keys each Deployment template ends with, in its order
            return optional(nodeSelector=c.get("nodeSelector"), securityContext=c.get("securityContext"),
                            affinity=c.get("affinity"), tolerations=c.get("tolerations"),
                            serviceAccountName=c.get("serviceAccountName"))

        def probes(c: dict) -> dict:
            return optional(livenessProbe=c.get("livenessProbe"), readinessProbe=c.get("readinessProbe"))

        if s.get("enabled", True):
            # dask-scheduler-deployment.yaml
            make(deployment(f"{full}-scheduler", "scheduler", s["replicas"], {"type": "RollingUpdate"}, {
                "name": f"{full}-scheduler", "image": image(s), **optional(imagePullPolicy=s["image"]["pullPolicy"]),
                "args": ["dask-scheduler", f"--port={s['servicePort']}", "--dashboard-address=:8787",
                         *(s["extraArgs"] or [])],
                "ports": [{"containerPort": 8786}, {"containerPort": 8787}],
                **optional(resources=quantities(s["resources"]), env=s["env"]), **probes(s)},
                {**optional(imagePullSecrets=s["image"].get("pullSecrets")), **placement(s)}))
            # dask-scheduler-service.yaml
            make({"apiVersion": "v1", "kind": "Service",
                  "metadata": meta(f"{full}-scheduler", "scheduler", s.get("serviceAnnotations")),
                  "spec": {"ports": [{"name": f"{full}-scheduler", "port": s["servicePort"], "targetPort": 8786},
                                     {"name": f"{full}-webui", "port": ui["servicePort"], "targetPort": 8787}],
                           "selector": selector("scheduler"), "type": s["serviceType"],
                           **optional(loadBalancerIP=s["loadBalancerIP"])}})

        def worker(obj_name: str, wk: dict, strategy: dict, extra: dict) -> dict:
            # dask-worker-deployment.yaml; additional-worker-deployment.yaml (the same, less what `extra` adds):
            # --nthreads/--memory-limit only when resources.limits is set, values quoted; --worker-port with port
            limits = (wk["resources"] or {}).get("limits")
            default = wk["default_resources"]
            sizing = ["--nthreads", str(wk.get("threads_per_worker") or limits.get("cpu") or default["cpu"]),
                      "--memory-limit", str(limits.get("memory") or default["memory"])] if limits else []
            mounts = wk.get("mounts") or {}
            return deployment(obj_name, "worker", wk["replicas"], strategy, {
                "name": f"{full}-worker", "image": image(wk),
                "args": [wk["image"]["dask_worker"],
                         wk.get("custom_scheduler_url") or f"{full}-scheduler:{s['servicePort']}",
                         *sizing, "--no-dashboard", "--dashboard-address", str(wk["portDashboard"]),
                         *(["--worker-port", str(wk["port"])] if wk.get("port") else []), *(wk["extraArgs"] or [])],
                "ports": [{"containerPort": wk["portDashboard"], "name": "dashboard"}],
                **optional(resources=quantities(wk["resources"]), env=wk["env"],
                           volumeMounts=mounts.get("volumeMounts")),
                **extra}, {**optional(imagePullSecrets=wk["image"].get("pullSecrets"), volumes=mounts.get("volumes")),
                           **placement(wk)}, annotations=wk.get("annotations"))

        make(worker(f"{full}-worker", w, w["strategy"], {"imagePullPolicy": w["image"]["pullPolicy"], **probes(w)}))
        for group in v["additional_worker_groups"] or ():  # `merge . $.Values.worker`: the group's keys win
            g = _merge(w, {k: val for k, val in group.items() if val is not None})
            make(worker(f"{full}-worker-{g['name']}", g, {"type": g["strategy"]["type"]},
                        optional(imagePullPolicy=g["image"]["pullPolicy"])))
        if j.get("enabled", True):
            # dask-jupyter-config.yaml: the password line (the controller sets an empty one; the token logs in)
            config = f"c = get_config()\nc.NotebookApp.password = '{j['password']}'\n"
            if j.get("extraConfig"):
                config += f"\n# jupyter.extraConfig follows below\n{j['extraConfig']}\n"
            make({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{full}-jupyter-config", "jupyter"),
                  "data": {"jupyter_notebook_config.py": config}})
            # dask-jupyter-deployment.yaml: the config volume after the values' volumes, its mount before theirs
            mounts = j.get("mounts") or {}
            make(deployment(f"{full}-jupyter", "jupyter", 1, {"type": "RollingUpdate"}, {
                "name": f"{full}-jupyter", "image": image(j), **optional(imagePullPolicy=j["image"]["pullPolicy"]),
                **optional(command=j.get("command"), args=j.get("args")),
                "ports": [{"containerPort": 8888}], "resources": quantities(j["resources"]),
                "volumeMounts": [{"name": "config-volume", "mountPath": "/usr/local/etc/jupyter"},
                                 *(mounts.get("volumeMounts") or [])],
                "env": [{"name": "DASK_SCHEDULER_ADDRESS", "value": f"{full}-scheduler:{s['servicePort']}"},
                        *(j["env"] or [])], **probes(j)},
                {**optional(imagePullSecrets=j["image"].get("pullSecrets")),
                 "volumes": [*(mounts.get("volumes") or []),
                             {"name": "config-volume", "configMap": {"name": f"{full}-jupyter-config"}}],
                 **placement(j)}))
            # dask-jupyter-service.yaml
            make({"apiVersion": "v1", "kind": "Service", "metadata": meta(f"{full}-jupyter", "jupyter"),
                  "spec": {"ports": [{"name": f"{full}-jupyter", "port": j["servicePort"], "targetPort": 8888}],
                           "selector": selector("jupyter"), "type": j["serviceType"]}})
            if j["rbac"]:  # dask-jupyter-serviceaccount.yaml: named without the release (one release a namespace)
                labels = {"app": name, "release": release, "component": "jupyter"}
                make({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": "dask-jupyter", "namespace": ns, "labels": labels}})
                make({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                      "metadata": {"name": "dask-jupyter", "namespace": ns, "labels": labels},
                      "rules": [{"apiGroups": ["apps"], "resources": ["deployments"],
                                 "verbs": ["get", "list", "watch", "update", "patch"]},
                                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                                {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get", "list"]}]})
                make({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                      "metadata": {"name": "dask-jupyter", "namespace": ns, "labels": labels},
                      "subjects": [{"kind": "ServiceAccount", "name": "dask-jupyter"}],
                      "roleRef": {"kind": "Role", "name": "dask-jupyter", "apiGroup": "rbac.authorization.k8s.io"}})
        # the ingresses render only when enabled (the controller turns them off)
        assert not ui["ingress"]["enabled"] and not j["ingress"]["enabled"]

    # --- reading the world ---

    def token(self, ns: str) -> str:
        return base64.b64decode(self.kube.get("secrets", ns, TOKEN_SECRET)["data"][TOKEN_KEY]).decode()

    def scheduler_address(self, ns: str) -> str:
        return f"tcp://127.0.0.1:{self.schedulers[ns][1]}"

    def jupyter_url(self, ns: str) -> str:
        return f"http://127.0.0.1:{self.jupyters[ns][1]}"

    def pids(self) -> list[int]:
        return [p for p, _ in self.schedulers.values()] + list(self.workers.values()) + \
            [p for p, _ in self.jupyters.values()]

    def close(self) -> list[int]:
        """Stop everything; the pids that were running, to check none is left."""
        pids = self.pids()
        for pid, _ in self.jupyters.values():
            stop_jupyter(pid)
        for pid in pids:
            stop_pid_group(pid)
        self.jupyters.clear()
        self.workers.clear()
        self.schedulers.clear()
        self.migs.stop()
        self.kube.stop()
        self.gke.stop()
        return pids


def render_chart(values: dict, release: str = "lab1", namespace: str = "dasklab-lab1") -> list[dict]:
    """The objects the chart dask/dask 2024.1.1 renders from `values` (World._render), without a world."""
    out: list[dict] = []
    World._render(None, namespace, release, chart_fullname(release), values, out=out)
    return out


def _merge_patch(before: dict, after: dict) -> dict:
    """The RFC 7386 merge patch from one manifest to the next: what changed, null for what was dropped."""
    patch = {k: None for k in before if k not in after}
    for key, value in after.items():
        if isinstance(value, dict) and isinstance(before.get(key), dict):
            if value != before[key]:
                patch[key] = _merge_patch(before[key], value)
        elif value != before.get(key) or key not in before:
            patch[key] = value
    return patch


def jsonl(records) -> str:
    return "\n".join(json.dumps(r, default=str) for r in records)


def drive_class(ctl, world, until, timeout: float = 90.0, ticks=("reconcile",)) -> None:
    """Ticks and class passes, the world kept in step, until `until()` holds (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        world.sync()
        for tick in ticks:
            ctl.reconcile_all(tick)
        ctl.reconcile_classes()
        world.sync()
        if until():
            return
        time.sleep(0.1)
    raise AssertionError(f"not reached in {timeout}s")
