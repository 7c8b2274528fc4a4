"""Pure builders for the Dask Helm release on GKE: chart values and the manifests of its install Job (no SDK)."""

import copy
import hashlib
import json
from dataclasses import dataclass

from dasklab.adapters.dashboard import SCHEDULER_HTTP_ROUTES
from dasklab.core.config import Config
from dasklab.core.model import MANAGED_BY, SHARED, LabSpec, build_system_resources, parse_cpu, parse_memory, \
    system_slot
from dasklab.core.overrides import SYSTEM_DEFAULT_REQUESTS, WORKER_STRATEGY

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
# Their limits and caps: build_system_resources, within model.system_slot.
CONTROLLER_DEFAULTS = {
    "scheduler": {"resources": {"requests": dict(SYSTEM_DEFAULT_REQUESTS)}},
    "jupyter": {"resources": {"requests": dict(SYSTEM_DEFAULT_REQUESTS)}},
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


def build_system_quantities(spec: LabSpec, component: str, system_machine: str) -> dict:
    """The scheduler's or Jupyter's `resources` as the chart gets them: requests and limits, within their slot of a
    system node (model.system_slot: half the lab's share of the node, in a class's shared cluster or its own)."""
    asked = ((spec.values or {}).get(component) or {}).get("resources")
    got = build_system_resources(asked, SYSTEM_DEFAULT_REQUESTS, system_slot(system_machine, spec.placement == SHARED))
    written = [b.get(k) for b in (asked or {}).values() if isinstance(b, dict) for k in ("cpu", "memory")]

    def show(key: str, value) -> object:  # as the request or the defaults wrote it when the same quantity
        parse = parse_cpu if key == "cpu" else parse_memory
        same = [w for w in (*written, SYSTEM_DEFAULT_REQUESTS[key]) if w is not None and _parses_to(parse, w, value)]
        if same:
            return same[0]
        return _cpu(value) if key == "cpu" else f"{value >> 20}Mi" if value % 2**20 == 0 else str(value)
    return {kind: {key: show(key, v) for key, v in q.items()} for kind, q in got.items()}


def _parses_to(parse, written, value) -> bool:
    try:
        return parse(written) == value
    except ValueError:
        return False


def build_helm_values(spec: LabSpec, *, system_pool: str, worker_pool: str, replicas: int | None = None,
                      system_machine: str = Config.system_machine_type) -> dict:
    """Chart values: controller defaults ← the request's `values` ← what the controller enforces.

    Enforced: one scheduler, which serves its HTTP API (distributed.http.scheduler.api) and is never public; workers
    are sized by the spec, replaced as WORKER_STRATEGY says, start at the initial count (the controller scales the
    Deployment afterwards), run alone on the worker pool and are named after their pods (so a Dask worker maps to
    its pod and node);
    every Service stays ClusterIP and no Ingress is made (a public Jupyter is a separate LoadBalancer Service
    with source ranges, see `build_public_jupyter_service`); Jupyter logs in with a random token read from a
    Secret, has no RBAC to scale workers, and the chart's known default password is removed. The scheduler, workers
    and Jupyter run as LAB_ACCOUNT (no token in their pods), whatever account the values name; the scheduler and
    Jupyter get requests and limits within their slot of a `system_machine` node (build_system_quantities). Every
    image runs the lab's Dask version (`build_images`). `replicas`: the worker count a later revision (helm upgrade)
    keeps, instead of the initial one.
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
                      "serviceAccountName": LAB_ACCOUNT, "image": images["scheduler"], "replicas": 1,
                      "resources": build_system_quantities(spec, "scheduler", system_machine),
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
                    "resources": build_system_quantities(spec, "jupyter", system_machine),
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
HELM_LIMITS = {"cpu": "500m", "memory": "256Mi"}  # and limits (a quota on limits.*); memory never past its request
DASHBOARD_PORT = 8787
# GKE's API server reaches a pod (the service proxy, webhooks) through the konnectivity-agent pods of kube-system,
# so their traffic comes from a pod address (github.com/tigera/operator/pull/5212: "On AKS and GKE the apiserver
# proxies admission calls through those pods")
KONNECTIVITY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "konnectivity-agent"}}}


def _quantities(values: dict, component: str, kind: str) -> tuple[float, int]:
    """(cores, bytes) of a system component's `kind` (requests, limits) in the release's values (which have both)."""
    got = ((values.get(component) or {}).get("resources") or {})[kind]
    return parse_cpu(got["cpu"]), parse_memory(got["memory"])


def build_quota(spec: LabSpec, values: dict, namespace: str) -> dict:
    """A student's share of a shared cluster (kubernetes.io/docs/concepts/policy/resource-quotas/), on requests and
    on limits alike: for each, its maximum workers plus the Deployments' rolling-update surge (maxSurge 25 %, rounded
    up) times a worker's size, its scheduler's and Jupyter's (twice: their surge) and the install Job's. `values`
    are the release's: the scheduler and Jupyter within their slot (build_system_quantities), so a lab's quota never
    grows past its share of the system pool however much its values ask."""
    workers = spec.max_workers + -(-spec.max_workers // 4)
    hard = {"pods": str(workers + 5)}
    for kind, helm in (("requests", HELM_REQUESTS), ("limits", HELM_LIMITS)):
        sched, jup = _quantities(values, "scheduler", kind), _quantities(values, "jupyter", kind)
        cpu = workers * spec.worker_cpu + 2 * (sched[0] + jup[0]) + parse_cpu(helm["cpu"])
        memory = workers * spec.worker_memory + 2 * (sched[1] + jup[1]) + parse_memory(helm["memory"])
        hard.update({f"{kind}.cpu": f"{round(cpu * 1000)}m", f"{kind}.memory": str(int(memory))})
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": _meta("dasklab-quota", namespace, spec.name),
            "spec": {"hard": hard}}


def build_limit_range(spec: LabSpec, values: dict, namespace: str) -> dict:
    """The lab namespace's LimitRange (kubernetes.io/docs/concepts/policy/limit-range/), in every placement: a
    container that sets no resources gets the install Job's (HELM_REQUESTS / HELM_LIMITS); none may be limited past
    the largest the lab runs: a worker (on the worker pool) or the scheduler's or Jupyter's slot of a system node,
    so no other container can take a system node the lab shares."""
    sizes = [(spec.worker_cpu, spec.worker_memory), (parse_cpu(HELM_LIMITS["cpu"]),
                                                     parse_memory(HELM_LIMITS["memory"])),
             *(_quantities(values, c, "limits") for c in ("scheduler", "jupyter"))]
    most = {"cpu": str(_cpu(max(c for c, _ in sizes))), "memory": str(max(m for _, m in sizes))}
    return {"apiVersion": "v1", "kind": "LimitRange", "metadata": _meta("dasklab-limits", namespace, spec.name),
            "spec": {"limits": [{"type": "Container", "max": most, "default": dict(HELM_LIMITS),
                                 "defaultRequest": dict(HELM_REQUESTS)}]}}


# Egress to the internet leaves out what is not the internet (RFC 1918 private ranges: the VPC's nodes, other clusters,
# this cluster's Pod and Service ranges; RFC 6598 100.64.0.0/10, which GKE also accepts for Pod and Service ranges
# (cloud.google.com/kubernetes-engine/docs/concepts/alias-ips, "non-RFC 1918"); link-local 169.254.0.0/16, the
# metadata server 169.254.169.254 and the GKE metadata server's 169.254.169.252 included)
NOT_INTERNET = ("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")
KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}


def build_network_policies(spec: LabSpec, release: str, namespace: str) -> list[dict]:
    """The lab namespace's NetworkPolicies, in every placement (kubernetes.io/docs/concepts/services-networking/
    network-policies/: a pod selected by a policy of a direction is isolated in it and admits only what some rule of
    those policies allows; a connection needs the source's egress and the target's ingress).

    Ingress: every pod is isolated; pods of the same namespace reach each other; the API server's proxy (through
    konnectivity-agent) reaches only the scheduler's dashboard and Jupyter; a public Jupyter its source ranges.
    Egress of the chart's pods (app=dask, release=<release>: scheduler, workers, Jupyter): to pods of their own
    namespace; to kube-dns in kube-system on 53 (UDP and TCP); to the internet, 0.0.0.0/0 except NOT_INTERNET (for
    pip and public data). Nothing else: not another lab's namespace, not the nodes, not the metadata server. The
    Helm install Job is not selected: it reaches the API server and the chart repository."""
    def policy(name: str, selector: dict, ingress: list | None, egress: list | None = None) -> dict:
        body = {"podSelector": selector, "policyTypes": ["Ingress"] if egress is None else ["Egress"]}
        if ingress is not None:
            body["ingress"] = ingress
        if egress is not None:
            body["egress"] = egress
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": _meta(name, namespace, spec.name), "spec": body}

    def ports(*numbers: int, protocol: str = "TCP") -> list[dict]:
        return [{"protocol": protocol, "port": n} for n in numbers]

    chart = {"app": CHART, "release": release}

    def component(*names: str) -> dict:
        return {"matchLabels": dict(chart),
                "matchExpressions": [{"key": "component", "operator": "In", "values": list(names)}]}

    found = [policy("dasklab-deny-ingress", {}, None),
             policy("dasklab-same-namespace", {}, [{"from": [{"podSelector": {}}]}]),
             policy("dasklab-api-server-proxy", component("scheduler"),
                    [{"from": [KONNECTIVITY], "ports": ports(DASHBOARD_PORT)}]),
             policy("dasklab-api-server-proxy-jupyter", component("jupyter"),
                    [{"from": [KONNECTIVITY], "ports": ports(JUPYTER_PORT)}]),
             policy("dasklab-egress", {"matchLabels": dict(chart)}, None, [
                 {"to": [{"podSelector": {}}]},
                 {"to": [KUBE_DNS], "ports": ports(53, protocol="UDP") + ports(53)},
                 {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(NOT_INTERNET)}}]}])]
    if spec.public_source_ranges:
        found.append(policy("dasklab-public-jupyter", component("jupyter"),
                            [{"from": [{"ipBlock": {"cidr": c}} for c in spec.public_source_ranges],
                              "ports": ports(JUPYTER_PORT)}]))
    return found


def build_token_secret(namespace: str, lab: str, token: str) -> dict:
    """The Secret holding Jupyter's token (the chart's Jupyter reads it as JUPYTER_TOKEN)."""
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(TOKEN_SECRET, namespace, lab),
            "type": "Opaque", "stringData": {TOKEN_KEY: token}}


STUDENT_ACCESS = "dasklab-connect"  # Role and RoleBinding: what the lab's people need to connect to it


def build_student_access(namespace: str, lab: str, release: str, identities: tuple[str, ...]) -> list[dict]:
    """Role and RoleBinding (kind User: a Google account, as GKE authenticates it) granting `identities`, in the lab's
    namespace only, what connecting needs: get the release's Jupyter and scheduler Services; get and list the pods
    (their names are generated, so resourceNames cannot name them: port-forwarding to a Service resolves a pod);
    port-forward to them (get for the WebSocket upgrade, create for kubectl's SPDY POST); the service proxy with every
    method Jupyter's API uses (the namespace holds only this lab's Services, and a proxied service's name carries its
    port); get the lab's token Secret by name. Nothing else: no list of Secrets, no exec, attach or logs, no create of
    pods, no other namespace (kubernetes.io/docs/reference/access-authn-authz/rbac/)."""
    full = chart_fullname(release)
    rules = [
        {"apiGroups": [""], "resources": ["services"], "resourceNames": [f"{full}-jupyter", f"{full}-scheduler"],
         "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
        {"apiGroups": [""], "resources": ["services/proxy"], "verbs": ["get", "create", "update", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [TOKEN_SECRET], "verbs": ["get"]},
    ]
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(STUDENT_ACCESS, namespace, lab), "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(STUDENT_ACCESS, namespace, lab),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": STUDENT_ACCESS},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": who} for who in identities]},
    ]


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
                  helm_image: str, system_pool: str, worker_pool: str, replicas: int | None = None,
                  system_machine: str = Config.system_machine_type) -> Release:
    """The release's values and the manifests that install it: namespace, the lab's ServiceAccount, installer RBAC,
    values ConfigMap, the Job running `helm upgrade --install … -f /values/values.yaml`, and the public Jupyter
    Service if asked.
    A later revision (update-lab: other values, `replicas` the workers running then) gets a Job of another name,
    so each revision is its own `helm upgrade`."""
    import yaml  # PyYAML: only the install path pays for it

    values = build_helm_values(spec, system_pool=system_pool, worker_pool=worker_pool, replicas=replicas,
                               system_machine=system_machine)
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
                                      "resources": {"requests": dict(HELM_REQUESTS), "limits": dict(HELM_LIMITS)},
                                      "volumeMounts": [{"name": "values", "mountPath": "/values",
                                                        "readOnly": True}]}],
                      "volumes": [{"name": "values", "configMap": {"name": values_cm}}]}}}},
    ]
    if spec.public_source_ranges:
        manifests.append(build_public_jupyter_service(release, namespace, lab, spec.public_source_ranges))
    return Release(release, namespace, values, job_name, tuple(manifests))
