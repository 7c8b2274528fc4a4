"""Tests of the Kubernetes API server stand-in, each rule proven through the real `kubernetes` client over HTTP."""

import asyncio
import copy
import http.server
import json
import re
import threading
import time

import dask
import distributed
import kmock
import pytest
from kubernetes import client
from kubernetes.client import ApiException

from tests.standins.kube import KubeStandin

TOKEN = "test-token"
NS = "default"


@pytest.fixture
def kube():
    with KubeStandin(TOKEN, nodes=("node-a", "node-b"), pods_per_node=10) as standin:
        yield standin


@pytest.fixture
def api(kube):
    return kube.api_client()


@pytest.fixture
def core(api):
    return client.CoreV1Api(api)


@pytest.fixture
def apps(api):
    return client.AppsV1Api(api)


@pytest.fixture
def batch(api):
    return client.BatchV1Api(api)


def refused(call, *args, **kwargs) -> tuple[int, dict]:
    """The HTTP status and the Status body of a call the server must refuse."""
    with pytest.raises(ApiException) as info:
        call(*args, **kwargs)
    return info.value.status, json.loads(info.value.body)


def deployment(name: str, replicas: int = 1, labels: dict | None = None) -> dict:
    labels = labels or {"app": name}
    return {"metadata": {"name": name}, "spec": {
        "replicas": replicas, "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels},
                     "spec": {"containers": [{"name": "main", "image": "ghcr.io/dask/dask:2025.11.0"}]}}}}


def job(name: str) -> dict:
    return {"metadata": {"name": name}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "helm", "image": "alpine/helm"}]}}}}


def pods_of(core, selector: str) -> dict[str, client.V1Pod]:
    return {p.metadata.name: p for p in core.list_namespaced_pod(NS, label_selector=selector).items}


# --- authentication ---------------------------------------------------------------------------------------------

def test_bearer_token_is_required(kube):
    status, body = refused(client.CoreV1Api(kube.api_client(token="wrong")).list_namespace)
    assert (status, body["kind"], body["reason"]) == (401, "Status", "Unauthorized")

    with client.ApiClient(client.Configuration(host=kube.url)) as anonymous:
        assert refused(client.CoreV1Api(anonymous).list_namespace)[0] == 401

    names = {n.metadata.name for n in client.CoreV1Api(kube.api_client(token=TOKEN)).list_namespace().items}
    assert {"default", "kube-system"} <= names


# --- namespaces and CRUD ------------------------------------------------------------------------------------------

def test_namespace_lifecycle_and_cascade(core):
    created, status, _ = core.create_namespace_with_http_info({"metadata": {"name": "lab-a"}})
    assert status == 201 and created.status.phase == "Active"
    assert "lab-a" in {n.metadata.name for n in core.list_namespace().items}
    core.create_namespaced_config_map("lab-a", {"metadata": {"name": "settings"}})

    deleted = core.delete_namespace("lab-a")
    assert deleted["status"]["phase"] == "Terminating"  # the client types this response as a plain object
    assert refused(core.read_namespace, "lab-a")[0] == 404
    assert refused(core.read_namespaced_config_map, "settings", "lab-a")[0] == 404  # content went with it
    assert core.list_namespaced_config_map("lab-a").items == []  # listing a missing namespace is empty, not 404

    status, body = refused(core.create_namespaced_config_map, "lab-a", {"metadata": {"name": "x"}})
    assert (status, body["reason"], body["message"]) == (404, "NotFound", 'namespaces "lab-a" not found')
    assert refused(core.delete_namespace, "default")[0] == 403
    assert refused(core.create_namespace, {"metadata": {"name": "Lab_A"}})[0] == 422
    assert refused(core.create_namespace, {"metadata": {"name": "a" * 64}})[0] == 422


def test_a_deleted_namespace_is_terminating_a_while_and_refuses_new_content():
    """A namespace being deleted stays Terminating until the namespace controller has emptied it; meanwhile the
    NamespaceLifecycle admission plugin refuses creates in it: 403 "unable to create new content in namespace X
    because it is being terminated", cause NamespaceTerminating (k8s.io/apiserver
    pkg/admission/plugin/namespace/lifecycle/admission.go). A second delete changes nothing."""
    clock = [0.0]
    with KubeStandin(TOKEN, nodes=(), clock=lambda: clock[0], namespace_termination_s=5.0) as kube:
        core = client.CoreV1Api(kube.api_client())
        core.create_namespace({"metadata": {"name": "lab-a"}})
        core.create_namespaced_config_map("lab-a", {"metadata": {"name": "settings"}})
        assert core.delete_namespace("lab-a")["status"]["phase"] == "Terminating"
        ns = core.read_namespace("lab-a")
        assert ns.status.phase == "Terminating" and ns.metadata.deletion_timestamp
        assert refused(core.read_namespaced_config_map, "settings", "lab-a")[0] == 404  # emptied
        status, body = refused(core.create_namespaced_secret, "lab-a", {"metadata": {"name": "token"}})
        assert (status, body["reason"]) == (403, "Forbidden")
        assert body["message"] == ('secrets "token" is forbidden: unable to create new content in namespace lab-a '
                                   "because it is being terminated")
        assert body["details"]["causes"][0]["reason"] == "NamespaceTerminating"
        assert refused(core.create_namespace, {"metadata": {"name": "lab-a"}})[0] == 409  # it still exists
        assert core.delete_namespace("lab-a")["metadata"]["deletionTimestamp"]
        clock[0] = 5.0
        assert refused(core.read_namespace, "lab-a")[0] == 404  # finalized: gone
        core.create_namespace({"metadata": {"name": "lab-a"}})  # and can be made again
        core.create_namespaced_secret("lab-a", {"metadata": {"name": "token"}})


KINDS = [  # (API class, method suffix, body beyond metadata)
    ("CoreV1Api", "config_map", {"data": {"threads": "2"}}),
    ("CoreV1Api", "secret", {"stringData": {"token": "s3cret"}}),
    ("CoreV1Api", "service_account", {}),
    ("CoreV1Api", "service", {"spec": {"selector": {"app": "x"}, "ports": [{"port": 80, "targetPort": 8787}]}}),
    ("CoreV1Api", "pod", {"spec": {"containers": [{"name": "main", "image": "busybox"}]}}),
    ("AppsV1Api", "deployment", {"spec": deployment("x")["spec"]}),
    ("BatchV1Api", "job", {"spec": job("x")["spec"]}),
    ("RbacAuthorizationV1Api", "role", {"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
    ("RbacAuthorizationV1Api", "role_binding", {
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dask-jupyter"},
        "subjects": [{"kind": "ServiceAccount", "name": "dask-jupyter", "namespace": NS}]}),
]


@pytest.mark.parametrize("api_class, kind, body", KINDS, ids=[k[1] for k in KINDS])
def test_namespaced_crud(api, api_class, kind, body):
    ops = getattr(client, api_class)(api)
    create, read, list_, replace, patch, delete = (getattr(ops, f"{verb}_namespaced_{kind}") for verb in (
        "create", "read", "list", "replace", "patch", "delete"))
    manifest = {"metadata": {"name": "thing", "labels": {"app": "x"}}, **copy.deepcopy(body)}

    created, status, _ = getattr(ops, f"create_namespaced_{kind}_with_http_info")(NS, manifest)
    assert status == 201
    meta = created.metadata
    assert meta.uid and meta.creation_timestamp and meta.generation == 1 and int(meta.resource_version) > 0
    status, err = refused(create, NS, manifest)
    assert (status, err["reason"]) == (409, "AlreadyExists")

    assert read("thing", NS).metadata.uid == meta.uid
    assert [o.metadata.name for o in list_(NS, field_selector="metadata.name=thing").items] == ["thing"]
    assert list_(NS, field_selector="metadata.name=other").items == []

    patched = patch("thing", NS, {"metadata": {"labels": {"tier": "a"}}})
    assert patched.metadata.labels == {"app": "x", "tier": "a"}
    assert int(patched.metadata.resource_version) > int(meta.resource_version)
    stale = api.sanitize_for_serialization(created)
    assert refused(replace, "thing", NS, stale)[1]["reason"] == "Conflict"
    assert refused(patch, "thing", NS, {"metadata": {"resourceVersion": meta.resource_version,
                                                       "labels": {"tier": "b"}}})[0] == 409

    fresh = api.sanitize_for_serialization(read("thing", NS))
    fresh["metadata"]["labels"]["tier"] = "c"
    replaced = replace("thing", NS, fresh)
    assert replaced.metadata.labels["tier"] == "c" and replaced.metadata.uid == meta.uid
    assert int(replaced.metadata.resource_version) > int(patched.metadata.resource_version)

    delete("thing", NS)
    assert refused(read, "thing", NS)[1]["reason"] == "NotFound"
    assert refused(delete, "thing", NS)[0] == 404
    assert refused(patch, "missing", NS, {"metadata": {"labels": {"a": "b"}}})[0] == 404


def test_server_set_metadata(apps):
    created = apps.create_namespaced_deployment(NS, deployment("web", 1))
    assert created.metadata.generation == 1 and created.status.observed_generation == 1

    labelled = apps.patch_namespaced_deployment("web", NS, {"metadata": {"labels": {"team": "a"}}})
    assert labelled.metadata.generation == 1  # metadata changes do not bump the generation
    again = apps.patch_namespaced_deployment("web", NS, {"metadata": {"labels": {"team": "a"}}})
    assert again.metadata.resource_version == labelled.metadata.resource_version  # a no-op write is not a write

    scaled = apps.patch_namespaced_deployment("web", NS, {"spec": {"replicas": 2}})
    assert scaled.metadata.generation == 2 and scaled.status.observed_generation == 2
    assert int(scaled.metadata.resource_version) > int(labelled.metadata.resource_version)

    body = apps.api_client.sanitize_for_serialization(scaled)
    body["metadata"]["creationTimestamp"] = "2000-01-01T00:00:00Z"
    assert apps.replace_namespaced_deployment("web", NS, body).metadata.creation_timestamp == \
        created.metadata.creation_timestamp
    body = apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment("web", NS))
    body["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000"
    assert refused(apps.replace_namespaced_deployment, "web", NS, body)[0] == 409


# --- validation --------------------------------------------------------------------------------------------------

def test_invalid_objects_are_refused_with_422(core, apps, batch):
    rbac = client.RbacAuthorizationV1Api(core.api_client)
    container = {"containers": [{"name": "main", "image": "busybox"}]}
    cases = [
        (core.create_namespaced_config_map, {"metadata": {"name": "Bad_Name"}}, "metadata.name"),
        (core.create_namespaced_config_map, {"metadata": {"name": "a" * 254}}, "metadata.name"),
        (core.create_namespaced_config_map, {"metadata": {"name": "ok", "labels": {"bad key": "x"}}},
         "metadata.labels"),
        (core.create_namespaced_config_map, {"metadata": {"name": "ok", "labels": {"k": "x" * 64}}},
         "metadata.labels"),
        (core.create_namespaced_config_map, {"metadata": {"name": "ok", "labels": {"k": "-x"}}}, "metadata.labels"),
        (core.create_namespaced_config_map, {"metadata": {"name": "ok", "annotations": {"a/b/c": "x"}}},
         "metadata.annotations"),
        (core.create_namespaced_config_map, {"metadata": {"name": "ok"}, "data": {"a key": "x"}}, "data[a key]"),
        (core.create_namespaced_service, {"metadata": {"name": "s" * 64}, "spec": {"ports": [{"port": 80}]}},
         "metadata.name"),
        (core.create_namespaced_service, {"metadata": {"name": "1-svc"}, "spec": {"ports": [{"port": 80}]}},
         "metadata.name"),
        (core.create_namespaced_service, {"metadata": {"name": "svc"}, "spec": {}}, "spec.ports"),
        (core.create_namespaced_pod, {"metadata": {"name": "p"}, "spec": {"containers": []}}, "spec.containers"),
        (core.create_namespaced_pod, {"metadata": {"name": "p", "annotations": {
            "controller.kubernetes.io/pod-deletion-cost": "cheap"}}, "spec": container},
         "metadata.annotations[controller.kubernetes.io/pod-deletion-cost]"),
        (apps.create_namespaced_deployment, {**deployment("web"), "spec": {
            **deployment("web")["spec"], "selector": {"matchLabels": {"app": "other"}}}},
         "spec.template.metadata.labels"),
        (batch.create_namespaced_job, {"metadata": {"name": "j"}, "spec": {"template": {"spec": container}}},
         "spec.template.spec.restartPolicy"),  # defaulted to Always, which a Job refuses
        (rbac.create_namespaced_role_binding, {"metadata": {"name": "rb"}, "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "Secret", "name": "x"}}, "roleRef.kind"),
    ]
    for create, body, field in cases:
        status, err = refused(create, NS, body)
        assert (status, err["reason"]) == (422, "Invalid"), body
        assert field in [c["field"] for c in err["details"]["causes"]], err
    core.create_namespaced_config_map(NS, {"metadata": {"name": "a" * 253, "labels": {"x.io/k": "v" * 63}}})
    core.create_namespaced_service(NS, {"metadata": {"name": "s" * 63}, "spec": {"ports": [{"port": 80}]}})

    apps.create_namespaced_deployment(NS, deployment("web"))
    moved = {"spec": {"selector": {"matchLabels": {"app": "web", "x": "y"}}}}
    causes = refused(apps.patch_namespaced_deployment, "web", NS, moved)[1]["details"]["causes"]
    assert (causes[-1]["field"], causes[-1]["message"].endswith("field is immutable")) == ("spec.selector", True)
    status, err = refused(core.create_namespaced_config_map, NS, {"metadata": {"name": "x", "namespace": "other"}})
    assert (status, err["reason"]) == (400, "BadRequest")


def raw(kube, method: str, path: str, body: dict, content_type: str = "application/json") -> tuple[int, dict]:
    """A write as any client could send it (the typed client refuses unknown fields before sending)."""
    import urllib.error
    import urllib.request
    request = urllib.request.Request(kube.url + path, data=json.dumps(body).encode(), method=method, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_every_write_is_checked_against_the_official_openapi_schema(kube, apps):
    """Beyond the semantic checks: fields the schema of the clusters' Kubernetes version does not know, or of the
    wrong type, are refused on create and patch (kubernetes-validate, strict)."""
    cms, deps = f"/api/v1/namespaces/{NS}/configmaps", f"/apis/apps/v1/namespaces/{NS}/deployments"
    cases = [
        (cms, {"metadata": {"name": "cm"}, "dta": {"a": "1"}}, "<root>"),
        (cms, {"metadata": {"name": "cm"}, "data": {"a": 1}}, "data.a"),
        (f"/api/v1/namespaces/{NS}/services", {"metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80,
                                               "protocl": "TCP"}]}}, "spec.ports.0"),
        (deps, {**deployment("typo"), "spec": {**deployment("typo")["spec"], "replica": 2}}, "spec"),
    ]
    for path, body, field in cases:
        status, err = raw(kube, "POST", path, body)
        assert (status, err["reason"]) == (422, "Invalid"), body
        causes = {c["field"]: c["message"] for c in err["details"]["causes"]}
        assert "OpenAPI schema" in causes.get(field, ""), causes
    apps.create_namespaced_deployment(NS, deployment("web"))
    status, err = raw(kube, "PATCH", f"{deps}/web", {"spec": {"paused": "yes"}}, "application/merge-patch+json")
    assert status == 422 and "OpenAPI schema" in err["message"]
    assert raw(kube, "POST", cms, {"metadata": {"name": "fine"}, "data": {"a": "1"}})[0] == 201


# --- selectors -----------------------------------------------------------------------------------------------------

def test_label_and_field_selectors(core):
    for name, labels in {"a": {"app": "web", "tier": "front"}, "b": {"app": "web", "tier": "back"},
                         "c": {"app": "db"}, "d": {}}.items():
        core.create_namespaced_config_map(NS, {"metadata": {"name": name, "labels": labels}})

    def names(**kwargs) -> set[str]:
        return {o.metadata.name for o in core.list_namespaced_config_map(NS, **kwargs).items}

    assert names() == {"a", "b", "c", "d"}
    assert names(label_selector="app=web") == names(label_selector="app==web") == {"a", "b"}
    assert names(label_selector="app!=web") == {"c", "d"}  # != also matches objects without the label
    assert names(label_selector="tier") == {"a", "b"}
    assert names(label_selector="!tier") == {"c", "d"}
    assert names(label_selector="tier in (front, cache)") == {"a"}
    assert names(label_selector="app notin (web)") == {"c", "d"}
    assert names(label_selector="app=web,tier!=front") == {"b"}
    assert names(field_selector="metadata.name=a") == {"a"}
    assert names(field_selector="metadata.name!=a", label_selector="app") == {"b", "c"}
    for selector in ("app in ()", "app web", "bad key=x", "app=(x"):
        status, err = refused(core.list_namespaced_config_map, NS, label_selector=selector)
        assert (status, err["reason"]) == (400, "BadRequest"), selector
    assert refused(core.list_namespaced_config_map, NS, field_selector="data.x=1")[1]["message"] == \
        "field label not supported: data.x"

    first = core.list_namespaced_config_map(NS, limit=3)
    rest = core.list_namespaced_config_map(NS, limit=3, _continue=first.metadata._continue)
    assert [o.metadata.name for o in first.items + rest.items] == ["a", "b", "c", "d"]
    assert rest.metadata._continue is None


# --- scale subresource and the Deployment controller -------------------------------------------------------------

def test_scale_subresource(core, apps):
    apps.create_namespaced_deployment(NS, deployment("web", 2))
    scale = apps.read_namespaced_deployment_scale("web", NS)
    assert (scale.kind, scale.api_version, scale.spec.replicas, scale.status.replicas, scale.status.selector) == \
        ("Scale", "autoscaling/v1", 2, 2, "app=web")

    scale = apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": 4}})
    assert (scale.spec.replicas, scale.status.replicas) == (4, 4)
    assert apps.read_namespaced_deployment("web", NS).spec.replicas == 4
    assert len(pods_of(core, "app=web")) == 4

    stale = {"metadata": {"name": "web", "resourceVersion": "1"}, "spec": {"replicas": 1}}
    assert refused(apps.replace_namespaced_deployment_scale, "web", NS, stale)[0] == 409
    assert refused(apps.patch_namespaced_deployment_scale, "web", NS, {"spec": {"replicas": -1}})[0] == 422
    scale = apps.replace_namespaced_deployment_scale("web", NS, {"metadata": {"name": "web"},
                                                                   "spec": {"replicas": 0}})
    assert scale.spec.replicas is None and scale.status.replicas == 0  # Go omitempty: 0 is absent
    assert pods_of(core, "app=web") == {}


def test_deployment_controller_runs_and_packs_pods(kube, core, apps):
    kube.set_nodes({"node-a": 2, "node-b": 2})
    labels = {"app": "dask", "component": "worker"}
    apps.create_namespaced_deployment(NS, deployment("lab-dask-worker", 3, labels))

    pods = pods_of(core, "app=dask,component=worker")
    (rs,) = apps.list_namespaced_replica_set(NS).items
    assert rs.metadata.owner_references[0].kind == "Deployment" and rs.spec.replicas == 3
    for name, pod in pods.items():
        assert re.fullmatch(rf"{rs.metadata.name}-[bcdfghjklmnpqrstvwxz2456789]{{5}}", name)
        assert pod.metadata.labels == {**labels, "pod-template-hash": rs.metadata.name.rsplit("-", 1)[1]}
        (ref,) = pod.metadata.owner_references
        assert (ref.kind, ref.name, ref.uid, ref.controller) == ("ReplicaSet", rs.metadata.name, rs.metadata.uid, True)
        assert pod.status.phase == "Running"
    assert sorted(p.spec.node_name for p in pods.values()) == ["node-a", "node-a", "node-b"]  # packed
    status = apps.read_namespaced_deployment_status("lab-dask-worker", NS).status
    assert (status.replicas, status.ready_replicas, status.available_replicas) == (3, 3, 3)

    apps.patch_namespaced_deployment_scale("lab-dask-worker", NS, {"spec": {"replicas": 5}})
    phases = sorted(p.status.phase for p in pods_of(core, "app=dask").values())
    assert phases == ["Pending", "Running", "Running", "Running", "Running"]  # no room for the fifth
    assert len(core.list_namespaced_pod(NS, field_selector="status.phase=Pending").items) == 1
    status = apps.read_namespaced_deployment("lab-dask-worker", NS).status
    assert (status.replicas, status.ready_replicas, status.unavailable_replicas) == (5, 4, 1)

    kube.set_nodes({"node-a": 2, "node-b": 2, "node-c": 2})  # the node pool grew: the pending pod starts
    assert sorted(p.status.phase for p in pods_of(core, "app=dask").values()) == ["Running"] * 5

    victim = sorted(pods)[0]
    core.create_namespaced_pod_eviction(victim, NS, {"metadata": {"name": victim}})
    assert victim not in pods_of(core, "app=dask") and len(pods_of(core, "app=dask")) == 5  # replaced

    apps.delete_namespaced_deployment("lab-dask-worker", NS)
    assert apps.list_namespaced_replica_set(NS).items == [] and pods_of(core, "app=dask") == {}  # garbage-collected


def test_cordoned_and_removed_nodes(kube, core, apps):
    assert [n.metadata.name for n in core.list_node().items] == ["node-a", "node-b"]
    core.patch_node("node-a", {"spec": {"unschedulable": True}})
    apps.create_namespaced_deployment(NS, deployment("web", 3))
    assert {p.spec.node_name for p in pods_of(core, "app=web").values()} == {"node-b"}

    kube.set_nodes(["node-c"])  # node-a and node-b removed (as a node pool resize would): their pods go
    assert [n.metadata.name for n in core.list_node().items] == ["node-c"]
    assert {p.spec.node_name for p in pods_of(core, "app=web").values()} == {"node-c"}
    assert len(pods_of(core, "app=web")) == 3


def test_node_selector_and_per_node_labels(kube, core, apps):
    pool = "cloud.google.com/gke-nodepool"
    kube.set_nodes({"a-system": 10, "b-worker": 10}, labels={"env": "test"},
                   node_labels={"a-system": {pool: "system"}, "b-worker": {pool: "workers"}})
    assert core.read_node("b-worker").metadata.labels[pool] == "workers"
    body = deployment("w", 2)
    body["spec"]["template"]["spec"]["nodeSelector"] = {pool: "workers"}
    apps.create_namespaced_deployment(NS, body)
    assert {p.spec.node_name for p in pods_of(core, "app=w").values()} == {"b-worker"}  # not first-fit on a-system
    body = deployment("x", 1)
    body["spec"]["template"]["spec"]["nodeSelector"] = {pool: "gpu"}
    apps.create_namespaced_deployment(NS, body)
    assert [p.status.phase for p in pods_of(core, "app=x").values()] == ["Pending"]  # no such node
    core.patch_node("a-system", {"metadata": {"labels": {"mark": "x"}}})
    kube.set_nodes({"a-system": 10, "b-worker": 10}, node_labels={"a-system": {pool: "system"}})
    assert core.read_node("a-system").metadata.labels["mark"] == "x"  # labels merge into existing nodes


def test_scale_down_follows_the_replicaset_deletion_ranking(kube, core, apps):
    kube.set_nodes({"node-a": 10})
    apps.create_namespaced_deployment(NS, deployment("web", 1))
    born = list(pods_of(core, "app=web"))  # creation order, oldest first
    for replicas in (2, 3, 4):
        apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": replicas}})
        born += [name for name in pods_of(core, "app=web") if name not in born]
    p1, p2, p3, p4 = born

    def cost(name: str, value: int) -> None:
        core.patch_namespaced_pod(name, NS, {"metadata": {"annotations": {
            "controller.kubernetes.io/pod-deletion-cost": str(value)}}})

    def scale_to(replicas: int) -> set[str]:
        apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": replicas}})
        return set(pods_of(core, "app=web"))

    cost(p2, -10)
    cost(p3, 5)
    assert scale_to(3) == {p1, p3, p4}  # lowest cost first
    assert scale_to(2) == {p1, p3}  # equal cost (0, the default): the newest first
    assert scale_to(1) == {p3}

    kube.set_nodes({"node-a": 2})
    pending = scale_to(3) - {p3}
    pending = {n for n in pending if pods_of(core, "app=web")[n].status.phase == "Pending"}
    (pending_pod,) = pending
    cost(pending_pod, 100)
    assert pending_pod not in scale_to(2)  # unscheduled before running, whatever its cost


# --- jobs ----------------------------------------------------------------------------------------------------------

def test_jobs_stay_active_until_completed(kube, core, batch):
    created = batch.create_namespaced_job(NS, job("helm-install"))
    assert created.status.active == 1 and created.status.succeeded is None
    (pod,) = pods_of(core, "job-name=helm-install").values()
    assert pod.status.phase == "Running" and pod.metadata.owner_references[0].kind == "Job"

    kube.complete_job(NS, "helm-install", log="STATUS: deployed\n")
    done = batch.read_namespaced_job_status("helm-install", NS).status
    assert (done.active, done.succeeded, done.conditions[0].type, done.conditions[0].status) == \
        (None, 1, "Complete", "True")
    assert done.completion_time is not None
    (pod,) = pods_of(core, "job-name=helm-install").values()
    assert pod.status.phase == "Succeeded"
    assert core.read_namespaced_pod_log(pod.metadata.name, NS) == "STATUS: deployed\n"

    batch.create_namespaced_job(NS, job("helm-upgrade"))
    kube.complete_job(NS, "helm-upgrade", succeeded=False, log="Error: UPGRADE FAILED\n")
    failed = batch.read_namespaced_job("helm-upgrade", NS).status
    assert (failed.failed, failed.succeeded, failed.conditions[0].type) == (1, None, "Failed")
    (pod,) = pods_of(core, "job-name=helm-upgrade").values()
    assert core.read_namespaced_pod_log(pod.metadata.name, NS, tail_lines=1) == "Error: UPGRADE FAILED\n"

    batch.delete_namespaced_job("helm-install", NS, propagation_policy="Background")
    assert pods_of(core, "job-name=helm-install") == {}


def test_on_job_created_hook_can_act_like_helm(kube, core, apps, batch):
    def helm(job_obj: dict) -> None:  # runs before the 201 is sent; may use the real client
        release = job_obj["metadata"]["labels"]["release"]
        apps.create_namespaced_deployment(NS, deployment(f"{release}-dask-scheduler", 1))
        kube.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{release}-dask-scheduler",
                                                                          "namespace": NS},
                     "spec": {"ports": [{"name": "http-dashboard", "port": 80, "targetPort": 8787}]}})
        kube.complete_job(NS, job_obj["metadata"]["name"], log=f"release {release} installed")

    kube.on_job_created(helm)
    batch.create_namespaced_job(NS, {**job("install-lab1"), "metadata": {"name": "install-lab1",
                                                                          "labels": {"release": "lab1"}}})
    assert batch.read_namespaced_job("install-lab1", NS).status.succeeded == 1
    assert apps.read_namespaced_deployment("lab1-dask-scheduler", NS).status.ready_replicas == 1
    assert core.read_namespaced_service("lab1-dask-scheduler", NS).spec.cluster_ip


# --- service proxy -------------------------------------------------------------------------------------------------

@pytest.fixture
def dask_dashboard():
    """A real distributed Scheduler on 127.0.0.1 (with the /api/v1 routes), in its own thread and loop."""
    routes = dask.config.get("distributed.scheduler.http.routes") + ["distributed.http.scheduler.api"]
    started, loop = threading.Event(), asyncio.new_event_loop()
    box: dict = {}

    async def serve():
        box["stop"] = asyncio.Event()
        with dask.config.set({"distributed.scheduler.http.routes": routes}):
            async with distributed.Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0") as s:
                box["url"] = f"http://127.0.0.1:{s.http_server.port}"
                started.set()
                await box["stop"].wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()))
    thread.start()
    assert started.wait(10)
    yield box["url"]
    loop.call_soon_threadsafe(box["stop"].set)
    thread.join(10)
    loop.close()


def test_service_proxy_reaches_a_real_dask_scheduler(kube, core, api, dask_dashboard):
    core.create_namespaced_service(NS, {"metadata": {"name": "lab-dask-scheduler"}, "spec": {
        "selector": {"app": "dask"}, "ports": [{"name": "tcp-comm", "port": 8786},
                                               {"name": "http-dashboard", "port": 80, "targetPort": 8787}]}})
    status, err = refused(core.connect_get_namespaced_service_proxy_with_path, "lab-dask-scheduler:80", NS,
                          "json/counts.json")
    assert (status, err["reason"], err["message"]) == (
        503, "ServiceUnavailable", 'no endpoints available for service "lab-dask-scheduler:80"')

    kube.register_service_backend(NS, "lab-dask-scheduler", 80, dask_dashboard)
    # The typed method turns a JSON body into str(dict); read the raw response to get the JSON itself.
    counts = core.connect_get_namespaced_service_proxy_with_path("lab-dask-scheduler:80", NS, "json/counts.json",
                                                                 _preload_content=False)
    assert counts.status == 200 and json.loads(counts.data)["workers"] == 0
    identity = core.connect_get_namespaced_service_proxy_with_path("lab-dask-scheduler:http-dashboard", NS,
                                                                   "json/identity.json", _preload_content=False)
    assert json.loads(identity.data)["type"] == "Scheduler"

    # The raw route, as an adapter would use it with client v37 (param_serialize + call_api).
    method, url, headers, body, post = api.param_serialize(
        "GET", f"/api/v1/namespaces/{NS}/services/lab-dask-scheduler:80/proxy/api/v1/adaptive_target",
        auth_settings=["BearerToken"])
    response = api.call_api(method, url, headers, body, post)
    response.read()
    assert response.status == 200 and json.loads(response.data) == {"workers": 0}
    assert response.getheader("Content-Type").startswith("application/json")
    request = api.param_serialize(
        "POST", f"/api/v1/namespaces/{NS}/services/lab-dask-scheduler:80/proxy/api/v1/retire_workers",
        header_params={"Content-Type": "application/json"}, body={"workers": []}, auth_settings=["BearerToken"])
    response = api.call_api(*request)
    response.read()
    assert (response.status, json.loads(response.data)) == (200, {})

    assert refused(core.connect_get_namespaced_service_proxy_with_path, "lab-dask-scheduler", NS, "health")[0] \
        == 503  # two named ports: the port must be given
    status, err = refused(core.connect_get_namespaced_service_proxy_with_path, "lab-dask-scheduler:8080", NS, "x")
    assert (status, err["message"]) == (503, 'no service port 8080 found for service "lab-dask-scheduler"')
    assert refused(core.connect_get_namespaced_service_proxy_with_path, "missing:80", NS, "health")[0] == 404
    assert refused(client.CoreV1Api(kube.api_client(token="wrong")).connect_get_namespaced_service_proxy_with_path,
                   "lab-dask-scheduler:80", NS, "health")[0] == 401


class _Echo(http.server.BaseHTTPRequestHandler):
    def _echo(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        payload = json.dumps({"method": self.command, "path": self.path, "body": body.decode(),
                              "content_type": self.headers.get("Content-Type"),
                              "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(418 if "teapot" in self.path else 202)
        self.send_header("Content-Type", "application/x-echo+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _echo

    def log_message(self, *args):
        pass


def test_service_proxy_passes_method_query_body_and_status(kube, core, api):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        core.create_namespaced_service(NS, {"metadata": {"name": "echo"}, "spec": {"ports": [{"port": 8080}]}})
        kube.register_service_backend(NS, "echo", 8080, f"http://127.0.0.1:{server.server_address[1]}")
        request = api.param_serialize(
            "POST", f"/api/v1/namespaces/{NS}/services/echo/proxy/a/b?x=1&y=a%2Fb",
            header_params={"Content-Type": "text/plain"}, body="hello", auth_settings=["BearerToken"])
        response = api.call_api(*request)
        response.read()
        assert response.status == 202 and response.getheader("Content-Type") == "application/x-echo+json"
        assert json.loads(response.data) == {"method": "POST", "path": "/a/b?x=1&y=a%2Fb", "body": "hello",
                                             "content_type": "text/plain", "authorization": None}
        assert refused(core.connect_get_namespaced_service_proxy_with_path, "echo:8080", NS, "teapot")[0] == 418
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- patches, hooks, lifecycle -------------------------------------------------------------------------------------

def test_patch_flavours(apps):
    body = deployment("web")
    body["spec"]["template"]["spec"]["containers"][0]["args"] = ["dask-scheduler"]
    apps.create_namespaced_deployment(NS, body)
    image = "ghcr.io/dask/dask:2026.1.0"
    strategic = apps.patch_namespaced_deployment("web", NS, {"spec": {"template": {"spec": {"containers": [
        {"name": "main", "image": image}]}}}})
    (container,) = strategic.spec.template.spec.containers
    assert (container.image, container.args) == (image, ["dask-scheduler"])  # merged by container name
    json_patched = apps.patch_namespaced_deployment("web", NS, [
        {"op": "replace", "path": "/spec/replicas", "value": 2}])
    assert json_patched.spec.replicas == 2
    merged = apps.patch_namespaced_deployment("web", NS, {"spec": {"template": {"spec": {"containers": [
        {"name": "main", "image": image}]}}}}, _content_type="application/merge-patch+json")
    assert merged.spec.template.spec.containers[0].args is None  # RFC 7386 replaces lists
    assert refused(apps.patch_namespaced_deployment, "web", NS, {"spec": {}},
                   _content_type="application/apply-patch+yaml")[0] == 415


def test_fail_next_latency_and_request_log(kube, core):
    kube.fail_next("GET", "/configmaps", status=503)
    assert refused(core.list_namespaced_config_map, NS)[1]["reason"] == "ServiceUnavailable"
    assert core.list_namespaced_config_map(NS).items == []  # one-shot

    kube.fail_next("POST", "/configmaps")
    assert refused(core.create_namespaced_config_map, NS, {"metadata": {"name": "x"}})[0] == 500
    assert kube.get("configmaps", NS, "x") is None  # the injected failure happened before any effect
    core.create_namespaced_config_map(NS, {"metadata": {"name": "x", "labels": {"a": "b"}}})
    assert kube.get("configmaps", NS, "x")["metadata"]["labels"] == {"a": "b"}
    assert [o["metadata"]["name"] for o in kube.list("configmaps", NS, "a=b")] == ["x"]
    assert len(kube.objects["v1/configmaps", NS, "x"].history) == 1

    kube.latency_s = 0.2
    started = time.monotonic()
    core.read_namespaced_config_map("x", NS)
    assert time.monotonic() - started >= 0.2
    kube.latency_s = 0.0
    assert kube.requests.count(("GET", f"/api/v1/namespaces/{NS}/configmaps")) == 2
    assert ("POST", f"/api/v1/namespaces/{NS}/configmaps") in kube.requests


def test_stop_leaves_nothing_behind():
    before = set(threading.enumerate())
    standin = KubeStandin(TOKEN)
    api = standin.api_client()
    client.CoreV1Api(api).list_namespace()
    url = standin.url
    standin.stop()
    standin.stop()  # idempotent
    assert set(threading.enumerate()) <= before
    config = client.Configuration(host=url)
    config.retries = 0
    with client.ApiClient(config) as dead, pytest.raises(Exception, match="Connection refused"):
        client.CoreV1Api(dead).list_namespace(_request_timeout=1)



def test_clone_namespace_copies_objects_with_new_identities(kube, core, apps):
    def pods(lab):
        return {p.metadata.name: p for p in core.list_pod_for_all_namespaces(label_selector=f"lab={lab}").items}

    core.create_namespace({"metadata": {"name": "lab-a"}})
    apps.create_namespaced_deployment("lab-a", deployment("lab-a-worker", 2, {"app": "dask", "lab": "lab-a"}))
    core.create_namespaced_config_map("lab-a", {"metadata": {"name": "record"}, "data": {"lab": "lab-a"}})
    core.create_namespaced_service("lab-a", {"metadata": {"name": "lab-a-scheduler"},
                                             "spec": {"ports": [{"name": "http", "port": 80}]}})
    kube.register_service_backend("lab-a", "lab-a-scheduler", 80, "http://127.0.0.1:9/lab-a")

    copied = kube.clone_namespace("lab-a", "lab-b", {"lab-a": "lab-b"})
    assert copied == 8  # the namespace, its default ServiceAccount, Deployment, ReplicaSet, 2 pods, ConfigMap, Service
    assert core.read_namespaced_config_map("record", "lab-b").data == {"lab": "lab-b"}
    old, new = pods("lab-a"), pods("lab-b")
    assert len(new) == 2 and all(p.metadata.namespace == "lab-b" for p in new.values())
    (rs,) = apps.list_namespaced_replica_set("lab-b").items
    assert all(p.metadata.owner_references[0].uid == rs.metadata.uid for p in new.values())  # owners remapped
    assert not {p.metadata.uid for p in old.values()} & {p.metadata.uid for p in new.values()}
    assert kube.handler.backends[("lab-b", "lab-b-scheduler", "80")] == "http://127.0.0.1:9/lab-b"
    apps.patch_namespaced_deployment_scale("lab-b-worker", "lab-b", {"spec": {"replicas": 1}})
    assert len(pods("lab-b")) == 1 and len(pods("lab-a")) == 2  # the controllers own the copies
    core.delete_namespace("lab-b")
    assert pods("lab-b") == {} and len(pods("lab-a")) == 2
    with pytest.raises(kmock.KubernetesError, match="already exists"):
        kube.clone_namespace("lab-a", "lab-a")


def test_resource_quota_admission_and_usage(kube, core, apps):
    """kubernetes.io/docs/concepts/policy/resource-quotas/: a pod past a hard limit is refused 403 "exceeded quota";
    with a quota on requests every container must state them; a ReplicaSet whose pods are refused reports
    ReplicaFailure/FailedCreate with that message; the quota's status says what is used."""
    core.create_namespace({"metadata": {"name": "q"}})
    core.create_namespaced_resource_quota("q", {"metadata": {"name": "lab"}, "spec": {"hard": {
        "pods": "3", "requests.cpu": "2500m", "requests.memory": "6G"}}})

    def pod(name, cpu="1", memory="2G"):
        resources = {"requests": {"cpu": cpu, "memory": memory}} if cpu else {}
        return {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i",
                                                                     "resources": resources}]}}

    core.create_namespaced_pod("q", pod("p1"))
    core.create_namespaced_pod("q", pod("p2"))
    status, body = refused(core.create_namespaced_pod, "q", pod("p3"))
    assert status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == ('pods "p3" is forbidden: exceeded quota: lab, requested: requests.cpu=1, used: '
                               'requests.cpu=2, limited: requests.cpu=2500m')
    status, body = refused(core.create_namespaced_pod, "q", pod("p4", cpu=None))
    assert status == 403 and body["message"].endswith("failed quota: lab: must specify requests.cpu,requests.memory")
    core.create_namespaced_pod("q", pod("small", cpu="500m", memory="1G"))  # fits: 2.5 CPU, 5 G, 3 pods
    used = core.read_namespaced_resource_quota("lab", "q").status.used
    assert used == {"pods": "3", "requests.cpu": "2500m", "requests.memory": "5000000000"}

    core.delete_namespaced_pod("small", "q")
    apps.create_namespaced_deployment("q", {**deployment("w", replicas=3), "spec": {
        **deployment("w", replicas=3)["spec"], "template": {"metadata": {"labels": {"app": "w"}}, "spec": {
            "containers": [{"name": "w", "image": "i", "resources": {"requests": {"cpu": "250m", "memory": "1G"}}}]}}}})
    pods = core.list_namespaced_pod("q", label_selector="app=w").items
    assert len(pods) == 1  # p1, p2 and one worker: the pod count is reached
    (rs,) = apps.list_namespaced_replica_set("q").items
    (condition,) = rs.status.conditions
    assert (condition.type, condition.reason) == ("ReplicaFailure", "FailedCreate")
    assert "exceeded quota: lab, requested: pods=1, used: pods=3, limited: pods=3" in condition.message
    core.delete_namespaced_pod("p1", "q")  # room again: the ReplicaSet creates the next pod, the condition goes
    apps.patch_namespaced_deployment_scale("w", "q", {"spec": {"replicas": 2}})
    assert len(core.list_namespaced_pod("q", label_selector="app=w").items) == 2
    assert not apps.list_namespaced_replica_set("q").items[0].status.conditions


def test_network_policies_are_stored_and_validated(kube, api):
    net = client.NetworkingV1Api(api)
    net.create_namespaced_network_policy(NS, {"metadata": {"name": "deny"}, "spec": {
        "podSelector": {}, "policyTypes": ["Ingress"]}})
    assert net.read_namespaced_network_policy("deny", NS).spec.policy_types == ["Ingress"]
    assert [p["metadata"]["name"] for p in kube.list("networkpolicies", NS)] == ["deny"]


def test_limit_range_defaults_and_bounds_each_container(kube, core):
    """kubernetes.io/docs/concepts/policy/limit-range/ (LimitRanger admission): a container without a limit or a
    request gets the LimitRange's default / defaultRequest at the pod's creation; one over `max` or under `min` is
    refused 403 Forbidden, worded as the plugin words it; the LimitRange's own defaults (a missing `default` is `max`,
    a missing `defaultRequest` is `default`) are filled in when it is stored."""
    core.create_namespace({"metadata": {"name": "lr"}})
    core.create_namespaced_limit_range("lr", {"metadata": {"name": "limits"}, "spec": {"limits": [{
        "type": "Container", "max": {"cpu": "2", "memory": "4Gi"}, "min": {"cpu": "50m"},
        "defaultRequest": {"cpu": "100m"}}]}})
    (item,) = core.read_namespaced_limit_range("limits", "lr").spec.limits
    assert item.default == {"cpu": "2", "memory": "4Gi"} and item.default_request == {"cpu": "100m", "memory": "4Gi"}

    def pod(name, **resources):
        return {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i",
                                                                     "resources": resources}]}}

    bare = core.create_namespaced_pod("lr", pod("bare")).spec.containers[0].resources
    assert (bare.requests, bare.limits) == ({"cpu": "100m", "memory": "4Gi"}, {"cpu": "2", "memory": "4Gi"})
    # a limit alone: the request is that limit (pod defaulting), not the LimitRange's defaultRequest
    given = core.create_namespaced_pod("lr", pod("given", limits={"cpu": "1", "memory": "1Gi"})).spec.containers[0]
    assert given.resources.requests == {"cpu": "1", "memory": "1Gi"}
    status, body = refused(core.create_namespaced_pod, "lr", pod("big", limits={"cpu": "4"}))
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == 'pods "big" is forbidden: maximum cpu usage per Container is 2, but limit is 4'
    status, body = refused(core.create_namespaced_pod, "lr", pod("both", requests={"cpu": "10m", "memory": "5Gi"}))
    assert status == 403 and body["message"] == (
        'pods "both" is forbidden: [minimum cpu usage per Container is 50m, but request is 10m, '
        'maximum memory usage per Container is 4Gi, but request is 5Gi]')
    assert {p["metadata"]["name"] for p in kube.list("pods", "lr")} == {"bare", "given"}


def test_quota_on_limits_needs_limits_and_caps_their_sum(kube, core):
    """kubernetes.io/docs/concepts/policy/resource-quotas/: with limits.cpu/limits.memory in a quota, a container
    without those limits is refused ("must specify"), unless a LimitRange gives it default limits first
    (LimitRanger runs before ResourceQuota); the sum of the limits is capped ("exceeded quota") and reported used."""
    core.create_namespace({"metadata": {"name": "ql"}})
    core.create_namespaced_resource_quota("ql", {"metadata": {"name": "lab"}, "spec": {"hard": {
        "requests.cpu": "4", "requests.memory": "8Gi", "limits.cpu": "3", "limits.memory": "4Gi"}}})

    def pod(name, **resources):
        return {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i",
                                                                     "resources": resources}]}}

    status, body = refused(core.create_namespaced_pod, "ql", pod("asks", requests={"cpu": "1", "memory": "1Gi"}))
    assert status == 403 and body["message"] == 'pods "asks" is forbidden: failed quota: lab: must specify ' \
                                                'limits.cpu,limits.memory'
    core.create_namespaced_pod("ql", pod("p1", requests={"cpu": "500m", "memory": "1Gi"},
                                         limits={"cpu": "2", "memory": "1Gi"}))
    status, body = refused(core.create_namespaced_pod, "ql", pod("p2", limits={"cpu": "2", "memory": "1Gi"}))
    assert status == 403 and body["message"] == ('pods "p2" is forbidden: exceeded quota: lab, requested: '
                                                 'limits.cpu=2, used: limits.cpu=2, limited: limits.cpu=3')
    core.create_namespaced_limit_range("ql", {"metadata": {"name": "d"}, "spec": {"limits": [{
        "type": "Container", "default": {"cpu": "500m", "memory": "512Mi"}, "defaultRequest": {"cpu": "100m"}}]}})
    core.create_namespaced_pod("ql", pod("bare"))  # defaulted by the LimitRange, then within the quota
    used = core.read_namespaced_resource_quota("lab", "ql").status.used
    assert used == {"requests.cpu": "600m", "requests.memory": str(2**30 + 2**29), "limits.cpu": "2500m",
                    "limits.memory": str(2**30 + 2**29)}


def test_the_scheduler_fits_requests_to_allocatable_when_asked():
    """kube-scheduler's NodeResourcesFit filter: a pod whose cpu request does not fit what is left of a node's
    allocatable stays Pending with "Insufficient cpu" (kubernetes.io/docs/concepts/scheduling-eviction/
    kube-scheduler/#filtering: PodFitsResources)."""
    with KubeStandin(nodes={"n1": 110}) as kube:  # 4 CPU, 16Gi allocatable (node_status)
        kube.fit_resources = True
        core = client.CoreV1Api(kube.api_client())
        core.create_namespace({"metadata": {"name": "s"}})
        for name, cpu in (("a", "3"), ("b", "1"), ("c", "100m")):
            core.create_namespaced_pod("s", {"metadata": {"name": name}, "spec": {"containers": [{
                "name": "c", "image": "i", "resources": {"requests": {"cpu": cpu}}}]}})
        pods = {p.metadata.name: p for p in core.list_namespaced_pod("s").items}
        assert {n: p.spec.node_name for n, p in pods.items()} == {"a": "n1", "b": "n1", "c": None}
        (condition,) = pods["c"].status.conditions
        assert condition.message == "0/1 nodes are available: 1 Insufficient cpu."
        core.delete_namespaced_pod("b", "s")
        assert core.read_namespaced_pod("c", "s").spec.node_name == "n1"
