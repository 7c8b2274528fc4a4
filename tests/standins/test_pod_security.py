"""Tests of the Kubernetes stand-in's Pod Security admission and ServiceAccount token mounting, each rule proven
through the real `kubernetes` client over HTTP (and the checks' wording as a table)."""

import pytest
from kubernetes import client

from tests.standins import pod_security
from tests.standins.kube import TOKEN_PATH, KubeStandin
from tests.standins.test_kube_standin import TOKEN, refused

BASELINE = {"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/enforce-version": "latest"}


@pytest.fixture
def kube():
    with KubeStandin(TOKEN, nodes=("node-a",), pods_per_node=20) as standin:
        yield standin


@pytest.fixture
def core(kube):
    return client.CoreV1Api(kube.api_client())


def container(**security) -> dict:
    return {"name": "c", "image": "ghcr.io/dask/dask:2024.1.0", **({"securityContext": security} if security else {})}


def pod(name: str = "p", meta: dict | None = None, **spec) -> dict:
    return {"metadata": {"name": name, **(meta or {})}, "spec": {"containers": [container()], **spec}}


# --- the checks (kubernetes.io/docs/concepts/security/pod-security-standards/) ------------------------------------

HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


@pytest.mark.parametrize("spec, meta, baseline", [
    ({}, {}, ""),  # "Allows the default (minimally specified) Pod configuration"
    ({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}, {}, 'hostPath volumes (volume "root")'),
    ({"hostNetwork": True, "hostPID": True}, {}, "host namespaces (hostNetwork=true, hostPID=true)"),
    ({"containers": [container(privileged=True)]}, {},
     'privileged (container "c" must not set securityContext.privileged=true)'),
    ({"containers": [container(capabilities={"add": ["NET_ADMIN", "SYS_ADMIN", "CHOWN"]})]}, {},
     'non-default capabilities (container "c" must not include "NET_ADMIN", "SYS_ADMIN" in '
     'securityContext.capabilities.add)'),
    ({"containers": [{**container(), "ports": [{"containerPort": 80, "hostPort": 80}]}]}, {},
     'hostPort (container "c" uses hostPort 80)'),
    ({}, {"annotations": {"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}},
     'forbidden AppArmor profile (container.apparmor.security.beta.kubernetes.io/c="unconfined")'),
    ({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}}, {},
     'seLinuxOptions (pod set forbidden securityContext.seLinuxOptions: type "spc_t")'),
    ({"containers": [container(procMount="Unmasked")]}, {},
     'procMount (container "c" must not set securityContext.procMount to "Unmasked")'),
    ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, {},
     'seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")'),
    ({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"},
                                      {"name": "net.ipv4.tcp_syncookies", "value": "1"}]}}, {},
     "forbidden sysctls (kernel.msgmax)"),
    ({"securityContext": {"runAsUser": 0}, "containers": [container(capabilities={"add": ["CHOWN"]})]}, {}, ""),
])
def test_baseline_checks(spec, meta, baseline):
    """Each Baseline control refuses what it names, in the admission plugin's words; root and the default
    capabilities are allowed (they are Restricted's)."""
    labels = {"pod-security.kubernetes.io/enforce": "baseline"}
    assert pod_security.refusal(labels, pod(meta=meta, **spec)) == (
        f'violates PodSecurity "baseline:latest": {baseline}' if baseline else "")


def test_restricted_checks_and_what_passes_them():
    """Restricted adds the container-level controls: a plain pod fails four of them, a hardened one none; its volume
    rule replaces baseline's hostPath one."""
    labels = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "v1.35"}
    assert pod_security.refusal(labels, pod()) == (
        'violates PodSecurity "restricted:v1.35": allowPrivilegeEscalation != false (container "c" must set '
        'securityContext.allowPrivilegeEscalation=false), unrestricted capabilities (container "c" must set '
        'securityContext.capabilities.drop=["ALL"]), runAsNonRoot != true (pod or container "c" must set '
        'securityContext.runAsNonRoot=true), seccompProfile (pod or container "c" must set '
        'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")')
    assert pod_security.refusal(labels, pod(containers=[container(**HARDENED)])) == ""
    hardened_pod = pod(containers=[container(allowPrivilegeEscalation=False, capabilities={"drop": ["ALL"]})],
                       securityContext={"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                       volumes=[{"name": "root", "hostPath": {"path": "/"}}])
    assert pod_security.refusal(labels, hardened_pod) == (
        'violates PodSecurity "restricted:v1.35": restricted volume types (volume "root" uses restricted volume '
        'type "hostPath")')
    assert pod_security.refusal({}, hardened_pod) == ""  # unlabelled: privileged, "entirely unrestricted"


# --- enforcement at the API server (pod-security-admission) ---------------------------------------------------------

def test_a_violating_pod_is_refused_403(kube, core):
    core.create_namespace({"metadata": {"name": "lab", "labels": BASELINE}})
    status, body = refused(core.create_namespaced_pod, "lab", pod("x", volumes=[
        {"name": "root", "hostPath": {"path": "/"}}]))
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == 'pods "x" is forbidden: violates PodSecurity "baseline:latest": hostPath volumes ' \
                              '(volume "root")'
    assert core.create_namespaced_pod("lab", pod("ok")).metadata.name == "ok"
    core.create_namespace({"metadata": {"name": "open"}})  # no label: privileged, the API server's default
    core.create_namespaced_pod("open", pod("x", volumes=[{"name": "root", "hostPath": {"path": "/"}}]))


def test_invalid_labels_are_refused_422(core):
    status, body = refused(core.create_namespace, {"metadata": {"name": "lab", "labels": {
        "pod-security.kubernetes.io/enforce": "strict"}}})
    assert (status, body["reason"]) == (422, "Invalid")
    assert "pod-security.kubernetes.io/enforce" in body["message"]


def test_workloads_are_created_but_their_pods_are_refused(kube, core):
    """"enforce mode is not applied to workload resources, only to the resulting pod objects": the Deployment and
    the Job are created; the ReplicaSet reports ReplicaFailure/FailedCreate (copied to the Deployment), no pod runs."""
    core.create_namespace({"metadata": {"name": "lab", "labels": BASELINE}})
    apps, batch = client.AppsV1Api(kube.api_client()), client.BatchV1Api(kube.api_client())
    labels = {"app": "w"}
    apps.create_namespaced_deployment("lab", {"metadata": {"name": "w"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [container(privileged=True)]}}}})
    assert core.list_namespaced_pod("lab").items == []
    (rs,) = apps.list_namespaced_replica_set("lab").items
    (failure,) = rs.status.conditions
    assert (failure.type, failure.status, failure.reason) == ("ReplicaFailure", "True", "FailedCreate")
    assert failure.message == (f'pods "{rs.metadata.name}-" is forbidden: violates PodSecurity "baseline:latest": '
                               'privileged (container "c" must not set securityContext.privileged=true)')
    conditions = {c.type: c for c in apps.read_namespaced_deployment("w", "lab").status.conditions}
    assert conditions["ReplicaFailure"].message == failure.message
    batch.create_namespaced_job("lab", {"metadata": {"name": "j"}, "spec": {"template": {"spec": {
        "restartPolicy": "Never", "hostNetwork": True, "containers": [container()]}}}})
    assert core.list_namespaced_pod("lab").items == []


# --- ServiceAccount admission (configure-service-account: "Opt out of API credential automounting") ------------------

def token_volumes(p: client.V1Pod) -> list[str]:
    return [v.name for v in p.spec.volumes or () if v.name.startswith("kube-api-access-")]


def test_pods_get_the_token_of_their_service_account_unless_it_or_they_opt_out(core):
    core.create_namespace({"metadata": {"name": "lab"}})
    plain = core.create_namespaced_pod("lab", pod("plain"))
    assert plain.spec.service_account_name == "default"  # every namespace has one
    (volume,) = token_volumes(plain)
    assert [(m.name, m.mount_path, m.read_only) for m in plain.spec.containers[0].volume_mounts] == [
        (volume, TOKEN_PATH, True)]
    sources = core.read_namespaced_pod("plain", "lab").spec.volumes[0].projected.sources
    assert sources[0].service_account_token.path == "token"
    core.create_namespaced_service_account("lab", {"metadata": {"name": "quiet"},
                                                   "automountServiceAccountToken": False})
    quiet = core.create_namespaced_pod("lab", pod("quiet", serviceAccountName="quiet"))
    assert token_volumes(quiet) == [] and not quiet.spec.containers[0].volume_mounts
    asked = core.create_namespaced_pod("lab", pod("asked", serviceAccountName="quiet",
                                                  automountServiceAccountToken=True))
    assert len(token_volumes(asked)) == 1  # "the Pod spec takes precedence"
    opted = core.create_namespaced_pod("lab", pod("opted", automountServiceAccountToken=False))
    assert token_volumes(opted) == []
    status, body = refused(core.create_namespaced_pod, "lab", pod("lost", serviceAccountName="nobody"))
    assert (status, body["message"]) == (403, 'pods "lost" is forbidden: error looking up service account '
                                               'lab/nobody: serviceaccount "nobody" not found')
