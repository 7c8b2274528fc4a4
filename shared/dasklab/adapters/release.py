"""Pure builders for the Dask Helm release on GKE: chart values and the manifests of its install Job (no SDK)."""

import copy
import hashlib
import json
from dataclasses import dataclass

from dasklab.adapters.dashboard import SCHEDULER_HTTP_ROUTES
from dasklab.core.config import Config
from dasklab.core.model import MANAGED_BY, LabSpec, parse_cpu, parse_memory
from dasklab.core.overrides import WORKER_STRATEGY

CHART = "dask"  # the official chart dask/dask
POOL_LABEL = "cloud.google.com/gke-nodepool"  # GKE puts it on every node of a pool
VALUES_KEY = "values.yaml"
TOKEN_SECRET = "dasklab-jupyter-token"  # key "token": Jupyter's login token, never in values, logs or events
TOKEN_KEY = "token"
INSTALLER = "dasklab-helm"  # ServiceAccount, Role and RoleBinding of the install Job, limited to the namespace
# The ServiceAccount the lab's scheduler, workers and Jupyter run as: no role, and no token mounted in their pods
# (automountServiceAccountToken false: kubernetes.io/docs/tasks/configure-pod-container/configure-service-account/
# "Opt out of API credential automounting"); the install Job keeps its own account and token, helm needs them.
LAB_ACCOUNT = "dasklab-lab"
# Pod Security Admission (kubernetes.io/docs/concepts/security/pod-security-admission/) on every lab namespace:
# enforce BASELINE, the strictest level the chart's pods can run under. Not restricted: restricted requires every
# container's securityContext.allowPrivilegeEscalation=false and capabilities.drop=["ALL"]
# (kubernetes.io/docs/concepts/security/pod-security-standards/, Restricted), and the chart dask/dask 2024.1.1 renders
# only a pod-level securityContext (scheduler/worker/jupyter.securityContext), no container-level one, so no values
# can make its pods pass. Warn and audit at restricted report what still separates a lab from it. `latest`: each
# Kubernetes release's baseline checks as they come (the chart's pods set none of the fields they restrict).
POD_SECURITY_LEVEL = "baseline"
POD_SECURITY_VERSION = "latest"
POD_SECURITY_LABELS = {**{f"pod-security.kubernetes.io/{mode}": level for mode, level in (
    ("enforce", POD_SECURITY_LEVEL), ("warn", "restricted"), ("audit", "restricted"))},
                       **{f"pod-security.kubernetes.io/{mode}-version": POD_SECURITY_VERSION
                          for mode in ("enforce", "warn", "audit")}}
JUPYTER_PORT = 8888
WEBUI_PORT = 80  # the chart's webUI.servicePort: the scheduler Service's dashboard port
# The images of the chart 2024.1.1 (values.yaml: scheduler/worker.image.repository, jupyter.image.repository);
# the controller sets their tag to the lab's Dask version.
IMAGES = {"scheduler": "ghcr.io/dask/dask", "worker": "ghcr.io/dask/dask", "jupyter": "ghcr.io/dask/dask-notebook"}

# What every lab gets unless its values say otherwise (the scheduler and Jupyter share the system pool).
CONTROLLER_DEFAULTS = {
    "scheduler": {"resources": {"requests": {"cpu": "500m", "memory": "1G"}}},
    "jupyter": {"resources": {"requests": {"cpu": "500m", "memory": "1G"}}},
}


def chart_fullname(release: str) -> str:
    """The chart's `dask.fullname`: `<release>-dask`, or the release itself when it already contains "dask"."""
    name = release if CHART in release else f"{release}-{CHART}"
    return name[:63].rstrip("-")


def _merge(base: dict, over: dict) -> dict:
    """Deep merge of chart values: mappings merge, anything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _with_env(env, enforced: list[dict]) -> list[dict]:
    """The component's env list with the enforced variables replacing any of the same name."""
    names = {e["name"] for e in enforced}
    return [e for e in (env or []) if e.get("name") not in names] + enforced


def _cpu(cores: float):
    return int(cores) if float(cores).is_integer() else f"{round(cores * 1000)}m"


def build_images(spec: LabSpec, values: dict) -> dict:
    """Each component's `image`: the chart's repository (or the request's) at the lab's Dask version (or the
    request's tag, which states that version: build_spec checked it)."""
    version = spec.dask_version or Config.dask_version
    images = {}
    for component, repository in IMAGES.items():
        image = (values.get(component) or {}).get("image") or {}
        images[component] = {"repository": image.get("repository") or repository,
                             "tag": str(image["tag"]) if image.get("tag") is not None else version}
    return images


def build_helm_values(spec: LabSpec, *, system_pool: str, worker_pool: str, replicas: int | None = None) -> dict:
    """Chart values: controller defaults ← the request's `values` ← what the controller enforces.

    Enforced: the scheduler serves its HTTP API (distributed.http.scheduler.api) and is never public; workers
    are sized by the spec, replaced as WORKER_STRATEGY says, start at the initial count (the controller scales the
    Deployment afterwards), run alone on the worker pool and are named after their pods (so a Dask worker maps to
    its pod and node);
    every Service stays ClusterIP and no Ingress is made (a public Jupyter is a separate LoadBalancer Service
    with source ranges, see `build_public_jupyter_service`); Jupyter logs in with a random token read from a
    Secret, has no RBAC to scale workers, and the chart's known default password is removed. The scheduler, workers
    and Jupyter run as LAB_ACCOUNT (no token in their pods). Every image runs the
    lab's Dask version (`build_images`). `replicas`: the worker count a later revision (helm upgrade) keeps,
    instead of the initial one.
    """
    values = _merge(CONTROLLER_DEFAULTS, spec.values or {})
    images = build_images(spec, values)

    def on(pool: str) -> dict:
        return {POOL_LABEL: pool}

    quantity = {"cpu": _cpu(spec.worker_cpu), "memory": str(spec.worker_memory)}
    scheduler, worker, jupyter = (values.get(k) or {} for k in ("scheduler", "worker", "jupyter"))
    user_args = list(worker.get("extraArgs") or [])
    while "--name" in user_args:  # the controller names workers
        i = user_args.index("--name")
        del user_args[i:i + 2]
    enforced = {
        "scheduler": {"serviceType": "ClusterIP", "loadBalancerIP": None, "nodeSelector": on(system_pool),
                      "image": images["scheduler"], "serviceAccountName": LAB_ACCOUNT,
                      "env": _with_env(scheduler.get("env"), [{"name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES",
                                                               "value": json.dumps(SCHEDULER_HTTP_ROUTES)}])},
        "webUI": {"ingress": {"enabled": False}},
        "worker": {"replicas": spec.initial_workers if replicas is None else replicas, "image": images["worker"],
                   "strategy": WORKER_STRATEGY, "serviceAccountName": LAB_ACCOUNT,
                   "resources": {"limits": dict(quantity), "requests": quantity},
                   "threads_per_worker": max(1, int(spec.worker_cpu)), "nodeSelector": on(worker_pool),
                   "env": _with_env(worker.get("env"), [{"name": "POD_NAME", "valueFrom": {
                       "fieldRef": {"fieldPath": "metadata.name"}}}]),
                   "extraArgs": user_args + ["--name", "$(POD_NAME)"]},
        "additional_worker_groups": [],
        "jupyter": {"serviceType": "ClusterIP", "rbac": False, "image": images["jupyter"],
                    "serviceAccountName": LAB_ACCOUNT, "password": "", "ingress": {"enabled": False},
                    "nodeSelector": on(system_pool),
                    "env": _with_env(jupyter.get("env"), [{"name": "JUPYTER_TOKEN", "valueFrom": {
                        "secretKeyRef": {"name": TOKEN_SECRET, "key": TOKEN_KEY}}}])},
    }
    return _merge(values, enforced)


def _meta(name: str, namespace: str | None, lab: str, **labels: str) -> dict:
    meta = {"name": name, "labels": {"managed-by": MANAGED_BY, "lab": lab, **labels}}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def build_namespace(namespace: str, lab: str, class_name: str = "") -> dict:
    """The lab's namespace, under Pod Security Admission (POD_SECURITY_LABELS); in a class's shared cluster labelled
    with the class (its labs are listed by it)."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(
        namespace, None, lab, **POD_SECURITY_LABELS, **({"class": class_name} if class_name else {}))}


def build_lab_account(namespace: str, lab: str) -> dict:
    """The ServiceAccount of the lab's pods (LAB_ACCOUNT): no token is mounted in a pod that runs as it."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(LAB_ACCOUNT, namespace, lab),
            "automountServiceAccountToken": False}


HELM_REQUESTS = {"cpu": "100m", "memory": "256Mi"}  # the install Job's container (a quota needs requests on every pod)
DASHBOARD_PORT = 8787
# GKE's API server reaches a pod (the service proxy, webhooks) through the konnectivity-agent pods of kube-system,
# so their traffic comes from a pod address (github.com/tigera/operator/pull/5212: "On AKS and GKE the apiserver
# proxies admission calls through those pods")
KONNECTIVITY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "konnectivity-agent"}}}


def _requests(component: dict, default: dict) -> tuple[float, int]:
    """(cores, bytes) a component's pod requests: its requests, else its limits (Kubernetes then copies them)."""
    resources = component.get("resources") or {}
    got = {**(resources.get("limits") or {}), **(resources.get("requests") or {})} or default
    return parse_cpu(got.get("cpu", default["cpu"])), parse_memory(got.get("memory", default["memory"]))


def build_quota(spec: LabSpec, values: dict, namespace: str) -> dict:
    """A student's share of a shared cluster (kubernetes.io/docs/concepts/policy/resource-quotas/): requests of its
    maximum workers plus the Deployments' rolling-update surge (maxSurge 25 %, rounded up), its scheduler and
    Jupyter (twice: their surge) and the install Job."""
    workers = spec.max_workers + -(-spec.max_workers // 4)
    sched = _requests(values.get("scheduler") or {}, CONTROLLER_DEFAULTS["scheduler"]["resources"]["requests"])
    jup = _requests(values.get("jupyter") or {}, CONTROLLER_DEFAULTS["jupyter"]["resources"]["requests"])
    helm = parse_cpu(HELM_REQUESTS["cpu"]), parse_memory(HELM_REQUESTS["memory"])
    cpu = workers * spec.worker_cpu + 2 * (sched[0] + jup[0]) + helm[0]
    memory = workers * spec.worker_memory + 2 * (sched[1] + jup[1]) + helm[1]
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": _meta("dasklab-quota", namespace, spec.name),
            "spec": {"hard": {"pods": str(workers + 5), "requests.cpu": f"{round(cpu * 1000)}m",
                              "requests.memory": str(int(memory))}}}


def build_network_policies(spec: LabSpec, release: str, namespace: str) -> list[dict]:
    """Ingress isolation of a lab's namespace (kubernetes.io/docs/concepts/services-networking/network-policies/):
    every pod is isolated; pods of the same namespace reach each other; the API server's proxy (through
    konnectivity-agent) reaches only the scheduler's dashboard and Jupyter; a public Jupyter its source ranges."""
    def policy(name: str, selector: dict, ingress: list | None) -> dict:
        body = {"podSelector": selector, "policyTypes": ["Ingress"]}
        if ingress is not None:
            body["ingress"] = ingress
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": _meta(name, namespace, spec.name), "spec": body}

    def ports(*numbers: int) -> list[dict]:
        return [{"protocol": "TCP", "port": n} for n in numbers]

    def component(*names: str) -> dict:
        return {"matchLabels": {"app": CHART, "release": release},
                "matchExpressions": [{"key": "component", "operator": "In", "values": list(names)}]}

    found = [policy("dasklab-deny-ingress", {}, None),
             policy("dasklab-same-namespace", {}, [{"from": [{"podSelector": {}}]}]),
             policy("dasklab-api-server-proxy", component("scheduler"),
                    [{"from": [KONNECTIVITY], "ports": ports(DASHBOARD_PORT)}]),
             policy("dasklab-api-server-proxy-jupyter", component("jupyter"),
                    [{"from": [KONNECTIVITY], "ports": ports(JUPYTER_PORT)}])]
    if spec.public_source_ranges:
        found.append(policy("dasklab-public-jupyter", component("jupyter"),
                            [{"from": [{"ipBlock": {"cidr": c}} for c in spec.public_source_ranges],
                              "ports": ports(JUPYTER_PORT)}]))
    return found


def build_token_secret(namespace: str, lab: str, token: str) -> dict:
    """The Secret holding Jupyter's token (the chart's Jupyter reads it as JUPYTER_TOKEN)."""
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(TOKEN_SECRET, namespace, lab),
            "type": "Opaque", "stringData": {TOKEN_KEY: token}}


def build_public_jupyter_service(release: str, namespace: str, lab: str, source_ranges) -> dict:
    """An opt-in LoadBalancer for Jupyter only, restricted to `source_ranges` (the chart's Jupyter Service has
    no loadBalancerSourceRanges, so this one is the controller's; it selects the chart's Jupyter pods)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(f"{chart_fullname(release)}-jupyter-public", namespace, lab),
            "spec": {"type": "LoadBalancer", "loadBalancerSourceRanges": list(source_ranges),
                     "selector": {"app": CHART, "release": release, "component": "jupyter"},
                     "ports": [{"name": "http", "port": 80, "targetPort": JUPYTER_PORT, "protocol": "TCP"}]}}


@dataclass(frozen=True)
class Release:
    """One Helm release of the dask/dask chart in its own namespace, and how the controller installs it."""

    name: str
    namespace: str
    values: dict
    job_name: str  # derives from a hash of everything the Job does: a duplicate Job is the same Job
    manifests: tuple[dict, ...]  # in creation order, the Job last but for the public Service


def build_release(spec: LabSpec, *, release: str, namespace: str, chart_repo: str, chart_version: str,
                  helm_image: str, system_pool: str, worker_pool: str, replicas: int | None = None) -> Release:
    """The release's values and the manifests that install it: namespace, the lab's ServiceAccount, installer RBAC,
    values ConfigMap, the Job running `helm upgrade --install … -f /values/values.yaml`, and the public Jupyter
    Service if asked.
    A later revision (update-lab: other values, `replicas` the workers running then) gets a Job of another name,
    so each revision is its own `helm upgrade`."""
    import yaml  # PyYAML: only the install path pays for it

    values = build_helm_values(spec, system_pool=system_pool, worker_pool=worker_pool, replicas=replicas)
    job = [helm_image, chart_repo, CHART, chart_version, release, namespace, values]
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:10]
    job_name, values_cm, lab = f"{INSTALLER}-{digest}", f"dasklab-values-{digest}", spec.name
    rules = [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["*"]},
             {"apiGroups": [""], "resources": ["services", "configmaps", "secrets"], "verbs": ["*"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    args = ["upgrade", "--install", release, CHART, "--repo", chart_repo, "--version", chart_version,
            "--namespace", namespace, "-f", f"/values/{VALUES_KEY}"]
    manifests = [
        build_namespace(namespace, lab),
        build_lab_account(namespace, lab),  # before the Job: its pods are refused until their account exists
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(INSTALLER, namespace, lab)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(INSTALLER, namespace, lab),
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(INSTALLER, namespace, lab),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": INSTALLER},
         "subjects": [{"kind": "ServiceAccount", "name": INSTALLER, "namespace": namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(values_cm, namespace, lab),
         "data": {VALUES_KEY: yaml.safe_dump(values, sort_keys=True)}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(job_name, namespace, lab),
         "spec": {"backoffLimit": 1, "activeDeadlineSeconds": 900, "template": {
             "metadata": {"labels": {"managed-by": MANAGED_BY, "lab": lab}},
             "spec": {"serviceAccountName": INSTALLER, "restartPolicy": "Never",
                      "nodeSelector": {POOL_LABEL: system_pool},
                      "containers": [{"name": "helm", "image": helm_image, "command": ["helm"], "args": args,
                                      "resources": {"requests": dict(HELM_REQUESTS)},
                                      "volumeMounts": [{"name": "values", "mountPath": "/values",
                                                        "readOnly": True}]}],
                      "volumes": [{"name": "values", "configMap": {"name": values_cm}}]}}}},
    ]
    if spec.public_source_ranges:
        manifests.append(build_public_jupyter_service(release, namespace, lab, spec.public_source_ranges))
    return Release(release, namespace, values, job_name, tuple(manifests))
