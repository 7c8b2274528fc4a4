"""Adapter for one cluster's Kubernetes API (the `kubernetes` client): the reads and writes the GKE backend needs,
with ApiException translated into our errors; also the service-proxy Transport to the Dask dashboard."""

import json

import kubernetes.client as k8s
import urllib3
from kubernetes.client.exceptions import ApiException

from dasklab.core.errors import ConflictError, Gone, NoEndpoints, PermanentError, RateLimited, SchedulerUnreachable, \
    TransientError

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
REVISION = "deployment.kubernetes.io/revision"
TIMEOUT = 10.0  # seconds per request: a tick must not hang on one cluster


def translate(e: ApiException, what: str) -> Exception:
    """The one table for the kubernetes client: an ApiException (the API server's Status: code, reason, message,
    details) → ours, one row per answer, first match wins (k8s.io/apimachinery pkg/api/errors builds each)."""
    body = e.body or ""
    try:  # the Status's message names the refusal (the permission, the quota, the namespace)
        said = json.loads(body).get("message") or ""
    except (ValueError, AttributeError):
        said = ""
    reason = f"{e.status} {e.reason}" + (f": {said}" if said else "")
    if e.status == 404:  # NotFound: the object (or its namespace) is not there. A step on it is done (the call sites
        return Gone(f"{what}: {reason}")  # say so: missing_ok); a read returns None; anywhere else: the next pass
    if e.status == 409:  # Conflict (a stale resourceVersion) or AlreadyExists: another writer was first
        return ConflictError(f"{what}: {reason}")
    if e.status == 403 and ("NamespaceTerminating" in body or "because it is being terminated" in body):
        # the NamespaceLifecycle admission plugin refuses a create in a namespace being deleted: "unable to create
        # new content in namespace X because it is being terminated", cause NamespaceTerminating
        # (k8s.io/apiserver pkg/admission/plugin/namespace/lifecycle/admission.go): it goes; wait it out
        return TransientError(f"{what}: namespace being terminated: {reason}")
    if e.status == 429:  # TooManyRequests: API priority and fairness, an eviction a disruption budget holds
        retry = (e.headers or {}).get("Retry-After")
        return RateLimited(f"{what}: {reason}", float(retry) if retry and retry.isdigit() else 10.0)
    if e.status in (0, 410) or e.status >= 500:  # no answer, Expired (a stale list), server errors: transient
        return TransientError(f"{what}: {reason}")
    # 400 BadRequest, 422 Invalid: the request the controller built; 401 Unauthorized, 403 Forbidden (a permission
    # the controller's identity lacks, a ResourceQuota "exceeded quota"): refusals that concern the lab
    return PermanentError(f"{what}: {reason}")


class Kube:
    """One cluster's API, reached with the controller's own identity (the ApiClient carries it)."""

    def __init__(self, api: k8s.ApiClient):
        self.api = api
        self.core, self.apps, self.batch = k8s.CoreV1Api(api), k8s.AppsV1Api(api), k8s.BatchV1Api(api)
        self.rbac, self.net = k8s.RbacAuthorizationV1Api(api), k8s.NetworkingV1Api(api)

    def _call(self, what: str, fn, *args, missing_ok: bool = False, **kwargs):
        try:
            return fn(*args, _request_timeout=TIMEOUT, **kwargs)
        except ApiException as e:
            error = translate(e, what)
            if missing_ok and isinstance(error, Gone):  # a read of nothing, or a step on an object already gone
                return None
            raise error from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TransientError(f"{what}: {e}") from e

    # --- generic create (idempotent) ---

    def create(self, manifest: dict) -> bool:
        """Create an object from its manifest; False if one of that name exists already."""
        kind, meta = manifest["kind"], manifest["metadata"]
        ns = meta.get("namespace")
        fn = {"Namespace": lambda: self.core.create_namespace(manifest, _request_timeout=TIMEOUT),
              "ConfigMap": lambda: self.core.create_namespaced_config_map(ns, manifest, _request_timeout=TIMEOUT),
              "Secret": lambda: self.core.create_namespaced_secret(ns, manifest, _request_timeout=TIMEOUT),
              "Service": lambda: self.core.create_namespaced_service(ns, manifest, _request_timeout=TIMEOUT),
              "ServiceAccount": lambda: self.core.create_namespaced_service_account(ns, manifest,
                                                                                    _request_timeout=TIMEOUT),
              "Role": lambda: self.rbac.create_namespaced_role(ns, manifest, _request_timeout=TIMEOUT),
              "RoleBinding": lambda: self.rbac.create_namespaced_role_binding(ns, manifest,
                                                                              _request_timeout=TIMEOUT),
              "ResourceQuota": lambda: self.core.create_namespaced_resource_quota(ns, manifest,
                                                                                  _request_timeout=TIMEOUT),
              "LimitRange": lambda: self.core.create_namespaced_limit_range(ns, manifest, _request_timeout=TIMEOUT),
              "NetworkPolicy": lambda: self.net.create_namespaced_network_policy(ns, manifest,
                                                                                 _request_timeout=TIMEOUT),
              "Job": lambda: self.batch.create_namespaced_job(ns, manifest, _request_timeout=TIMEOUT)}[kind]
        try:
            fn()
        except ApiException as e:
            if e.status == 409 and "AlreadyExists" in (e.body or ""):
                return False
            raise translate(e, f"create {kind} {meta['name']}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TransientError(f"create {kind} {meta['name']}: {e}") from e
        return True

    # --- the lab's record (a ConfigMap, compared-and-swapped on resourceVersion) ---

    def namespaces(self, selector: str) -> dict[str, str]:
        """name → phase (Active, Terminating) of the namespaces with these labels."""
        return {n.metadata.name: "Terminating" if n.metadata.deletion_timestamp else
                (n.status and n.status.phase) or "Active"
                for n in self._call("list namespaces", self.core.list_namespace, label_selector=selector).items}

    def ensure_quota(self, manifest: dict) -> bool:
        """The ResourceQuota as the manifest says (created, or its `hard` patched); True if it changed."""
        return self.ensure_spec(manifest)

    def ensure_spec(self, manifest: dict) -> bool:
        """A ResourceQuota or LimitRange as the manifest says (created, or its spec patched); True if it changed."""
        kind, meta = manifest["kind"], manifest["metadata"]
        read, patch = {"ResourceQuota": (self.core.read_namespaced_resource_quota,
                                         self.core.patch_namespaced_resource_quota),
                       "LimitRange": (self.core.read_namespaced_limit_range,
                                      self.core.patch_namespaced_limit_range)}[kind]
        found = self._call(f"read {kind} {meta['namespace']}/{meta['name']}", read, meta["name"], meta["namespace"],
                           missing_ok=True)
        if found is None:
            return self.create(manifest)
        if self.core.api_client.sanitize_for_serialization(found.spec) == manifest["spec"]:
            return False
        self._call(f"patch {kind} {meta['name']}", patch, meta["name"], meta["namespace"], {"spec": manifest["spec"]})
        return True

    def ensure_labels(self, manifest: dict) -> bool:
        """A Namespace carries the manifest's labels (a merge patch of those that differ; others kept); True if it
        changed. A lab made by an earlier version gets the labels it lacks (its Pod Security level) this way."""
        name, want = manifest["metadata"]["name"], manifest["metadata"].get("labels") or {}
        found = self._call(f"read Namespace {name}", self.core.read_namespace, name)
        have = found.metadata.labels or {}
        missing = {k: v for k, v in want.items() if have.get(k) != v}
        if missing:
            self._call(f"patch Namespace {name}", self.core.patch_namespace, name, {"metadata": {"labels": missing}})
        return bool(missing)

    def ensure_subjects(self, role: dict, binding: dict) -> bool:
        """A RoleBinding's subjects as `binding` says (level-based: read, compared, written only when they differ):
        created with its Role when absent, its subjects replaced (a JSON patch: the whole list, so a subject left
        out loses access), deleted when the list is empty (no one is granted). True if anything changed."""
        meta, want = binding["metadata"], binding.get("subjects") or []
        ns, name = meta["namespace"], meta["name"]
        found = self._call(f"read RoleBinding {ns}/{name}", self.rbac.read_namespaced_role_binding, name, ns,
                           missing_ok=True)
        if found is None:
            return bool(want) and (self.create(role) | self.create(binding))
        if not want:
            self._call(f"delete RoleBinding {ns}/{name}", self.rbac.delete_namespaced_role_binding, name, ns,
                       missing_ok=True)
            return True
        if self.api.sanitize_for_serialization(found.subjects or []) == want:
            return False
        self._call(f"patch RoleBinding {ns}/{name}", self.rbac.patch_namespaced_role_binding, name, ns,
                   [{"op": "add", "path": "/subjects", "value": want}])
        return True

    def namespace_phase(self, ns: str) -> str | None:
        """Active, Terminating, or None if there is no such namespace."""
        found = self._call(f"read Namespace {ns}", self.core.read_namespace, ns, missing_ok=True)
        if found is None:
            return None
        return "Terminating" if found.metadata.deletion_timestamp else (found.status and found.status.phase) or "Active"

    def delete_namespace(self, ns: str) -> None:
        self._call(f"delete Namespace {ns}", self.core.delete_namespace, ns, missing_ok=True)

    def read_secret(self, ns: str, name: str, key: str) -> str | None:
        """One key of a Secret, decoded (None if the Secret or the key is missing)."""
        import base64
        secret = self._call(f"read Secret {ns}/{name}", self.core.read_namespaced_secret, name, ns, missing_ok=True)
        raw = (secret.data or {}).get(key) if secret else None
        return base64.b64decode(raw).decode() if raw else None

    def delete_service(self, ns: str, name: str) -> None:
        self._call(f"delete Service {ns}/{name}", self.core.delete_namespaced_service, name, ns, missing_ok=True)

    # --- the install Job ---

    def read_job(self, ns: str, name: str):
        return self._call(f"read Job {ns}/{name}", self.batch.read_namespaced_job, name, ns, missing_ok=True)

    def job_log_tail(self, ns: str, job: str, lines: int = 20) -> str:
        pods = self._call("list Job pods", self.core.list_namespaced_pod, ns, label_selector=f"job-name={job}").items
        if not pods:
            return ""
        pod = max(pods, key=lambda p: p.metadata.creation_timestamp or 0)
        try:
            return self.core.read_namespaced_pod_log(pod.metadata.name, ns, tail_lines=lines,
                                                     _request_timeout=TIMEOUT) or ""
        except ApiException as e:  # a pod that never started has no log: say why instead
            return f"(no log: {e.reason})"

    def pod_log_tail(self, ns: str, pod: str, previous: bool, lines: int = 20) -> str:
        """The last lines of a pod's log; `previous`: of its last terminated container (why it crashed)."""
        try:
            return self.core.read_namespaced_pod_log(pod, ns, previous=previous, tail_lines=lines,
                                                     _request_timeout=TIMEOUT) or ""
        except ApiException as e:  # no such run (never started, not restarted): say why instead
            return f"(no log: {e.status} {e.reason})"
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TransientError(f"log of {ns}/{pod}: {e}") from e

    def pod_log_head(self, ns: str, pod: str, limit_bytes: int = 16384) -> str:
        """The first `limit_bytes` of a pod's current container log (PodLogOptions.limitBytes reads from its
        start): what its entrypoint printed before the worker itself ("" when it has none yet)."""
        try:
            return self.core.read_namespaced_pod_log(pod, ns, limit_bytes=limit_bytes,
                                                     _request_timeout=TIMEOUT) or ""
        except ApiException as e:
            if e.status in (400, 404):  # its container is waiting to start, or the pod went since it was listed
                return ""
            raise translate(e, f"log of {ns}/{pod}") from e  # a 403 is said, not taken for an empty log
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TransientError(f"log of {ns}/{pod}: {e}") from e

    # --- workers ---

    def replicas(self, ns: str, deployment: str) -> int | None:
        scale = self._call(f"read scale {deployment}", self.apps.read_namespaced_deployment_scale, deployment, ns,
                           missing_ok=True)
        return None if scale is None else (scale.spec.replicas or 0)

    def scale(self, ns: str, deployment: str, replicas: int) -> None:
        self._call(f"scale {deployment}", self.apps.patch_namespaced_deployment_scale, deployment, ns,
                   {"spec": {"replicas": replicas}})

    def pods_of(self, ns: str, deployment: str) -> list:
        """The Deployment's active pods (selected by the Deployment's own selector)."""
        dep = self.deployment(ns, deployment)
        if dep is None:
            return []
        selector = ",".join(f"{k}={v}" for k, v in sorted((dep.spec.selector.match_labels or {}).items()))
        pods = self._call("list pods", self.core.list_namespaced_pod, ns, label_selector=selector).items
        return [p for p in pods if p.status.phase not in ("Succeeded", "Failed") and not p.metadata.deletion_timestamp]

    def deployment(self, ns: str, name: str):
        return self._call(f"read {name}", self.apps.read_namespaced_deployment, name, ns, missing_ok=True)

    def current_template_hash(self, ns: str, deployment) -> str | None:
        """The `pod-template-hash` of the Deployment's newest ReplicaSet (the highest
        `deployment.kubernetes.io/revision` among those it owns): its pods run the current template."""
        selector = ",".join(f"{k}={v}" for k, v in sorted((deployment.spec.selector.match_labels or {}).items()))
        sets = self._call("list replicasets", self.apps.list_namespaced_replica_set, ns, label_selector=selector).items
        owned = [rs for rs in sets if any(r.uid == deployment.metadata.uid for r in rs.metadata.owner_references or ())]
        newest = max(owned, key=lambda rs: int((rs.metadata.annotations or {}).get(REVISION, 0)), default=None)
        return newest and (newest.metadata.labels or {}).get("pod-template-hash")

    def set_min_ready(self, ns: str, deployment: str, seconds: int) -> None:
        """The Deployment's minReadySeconds: a new pod counts as available only once Ready that long."""
        self._call(f"patch {deployment}", self.apps.patch_namespaced_deployment, deployment, ns,
                   {"spec": {"minReadySeconds": seconds}})

    def set_deletion_cost(self, ns: str, pod: str, cost: int | None) -> None:
        """A pod gone since it was listed (a Spot node reclaimed, its ReplicaSet scaled) needs no cost: done."""
        self._call(f"annotate pod {pod}", self.core.patch_namespaced_pod, pod, ns,
                   {"metadata": {"annotations": {DELETION_COST: None if cost is None else str(cost)}}}, missing_ok=True)

    # --- nodes ---

    def nodes(self, selector: str) -> list:
        return self._call("list nodes", self.core.list_node, label_selector=selector).items

    def pods_on(self, node: str) -> list:
        pods = self._call("list pods", self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node}")
        return [p for p in pods.items if p.status.phase not in ("Succeeded", "Failed")]

    def cordon(self, node: str, labels: dict[str, str | None], unschedulable: bool = True) -> None:
        """A node gone since it was listed (a Spot VM reclaimed, an upgrade replaced it) is past cordoning: done."""
        self._call(f"cordon {node}", self.core.patch_node, node,
                   {"metadata": {"labels": labels}, "spec": {"unschedulable": unschedulable or None}}, missing_ok=True)

    def evict(self, ns: str, pod: str) -> None:
        self._call(f"evict {ns}/{pod}", self.core.create_namespaced_pod_eviction, pod, ns,
                   {"metadata": {"name": pod, "namespace": ns}}, missing_ok=True)

    def fetch_service_pod(self, ns: str, service: str, port: int) -> tuple[str, int] | None:
        """A Ready pod behind the Service and the pod port its `port` targets (a number, or a container port's name),
        as `kubectl port-forward svc/NAME` resolves them; None while no pod is Ready (Gone if the Service is not)."""
        svc = self._call(f"read Service {ns}/{service}", self.core.read_namespaced_service, service, ns)
        spec = next((p for p in svc.spec.ports or () if p.port == port), None)
        if spec is None or not svc.spec.selector:
            raise PermanentError(f"Service {ns}/{service} has no port {port} with a selector")
        selector = ",".join(f"{k}={v}" for k, v in sorted(svc.spec.selector.items()))
        pods = self._call(f"list pods of {service}", self.core.list_namespaced_pod, ns, label_selector=selector).items
        for pod in pods:
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
            if pod.status.phase != "Running" or not ready or pod.metadata.deletion_timestamp:
                continue
            target = spec.target_port if spec.target_port is not None else port
            if isinstance(target, str) and not target.isdigit():
                named = {cp.name: cp.container_port for c in pod.spec.containers for cp in c.ports or () if cp.name}
                if target not in named:
                    continue
                target = named[target]
            return pod.metadata.name, int(target)
        return None

    # --- the dashboard, through the API server's service proxy ---

    def proxy(self, ns: str, service: str, port: str) -> "ProxyTransport":
        return ProxyTransport(self.api, ns, service, port)


class ProxyTransport:
    """dashboard.Transport over `/api/v1/namespaces/NS/services/NAME:PORT/proxy/PATH`, with the controller's
    identity: the scheduler's HTTP API is never exposed outside the cluster."""

    def __init__(self, api: k8s.ApiClient, ns: str, service: str, port: str, timeout: float = 5.0):
        self.api, self.timeout = api, timeout
        self.base = f"/api/v1/namespaces/{ns}/services/{service}:{port}/proxy"

    def _call(self, method: str, path: str, body=None) -> bytes:
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            request = self.api.param_serialize(method, self.base + path, header_params=headers, body=body,
                                               auth_settings=["BearerToken"])
            response = self.api.call_api(*request, _request_timeout=self.timeout)
            response.read()
        except ApiException as e:
            raise SchedulerUnreachable(f"{path}: {e.status} {e.reason}") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise SchedulerUnreachable(f"{path}: {e}") from e
        # the API server answers 503 "no endpoints available for service …" when no ready pod backs the Service
        # (kubernetes pkg/registry/core/service/storage, ResourceLocation)
        if response.status == 503 and b"no endpoints available" in (response.data or b""):
            raise NoEndpoints(f"{self.base}: no endpoints available")
        if not 200 <= response.status < 300:
            raise SchedulerUnreachable(f"{path}: HTTP {response.status} {response.data[:120]!r}")
        return response.data

    def get(self, path: str) -> bytes:
        return self._call("GET", path)

    def post(self, path: str, body: bytes) -> bytes:
        return self._call("POST", path, json.loads(body))
