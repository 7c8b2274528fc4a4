"""Every lab stays in its box at the API server: its namespace enforces Pod Security baseline, its pods run as the
lab's ServiceAccount without a token, asserted on the pods the GKE world renders from the chart and the Kubernetes
stand-in admits (Pod Security and ServiceAccount admission as the API server does them)."""

import pytest
from dasklab.adapters.gke import place_of
from dasklab.adapters.release import (INSTALLER, LAB_ACCOUNT, build_helm_values, build_lab_account, build_namespace,
                                      build_release)
from kubernetes import client

from tests.conftest import make_spec
from tests.gke_world import CONFIG, render_chart
from tests.standins.kube import TOKEN_PATH, KubeStandin
from tests.test_gke import controller, drive, phase, start_msg, world  # noqa: F401 (fixtures)


def pods_by_component(world, ns: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for pod in world.kube.list("pods", ns):
        labels = pod["metadata"]["labels"]  # the chart's component, or the install Job's
        found.setdefault(labels.get("component") or INSTALLER * labels.get("job-name", "").startswith(INSTALLER),
                         []).append(pod)
    return found


def token_volumes(pod: dict) -> list[str]:
    return [v["name"] for v in pod["spec"].get("volumes") or () if "projected" in v
            and any("serviceAccountToken" in s for s in v["projected"]["sources"])]


def token_mounts(pod: dict) -> list[str]:
    return [m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts") or ()
            if m["mountPath"] == TOKEN_PATH]


def test_a_lab_runs_under_pod_security_baseline_as_its_own_account_without_a_token(world, controller):
    ctl, ns = controller, place_of("lab1").namespace
    ctl.handle(start_msg(), "m1")
    drive(ctl, world, lambda: phase(ctl) == "ready")
    labels = world.kube.get("namespaces", None, ns)["metadata"]["labels"]
    assert {k: v for k, v in labels.items() if k.startswith("pod-security.kubernetes.io/")} == {
        "pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/warn": "restricted", "pod-security.kubernetes.io/warn-version": "latest",
        "pod-security.kubernetes.io/audit": "restricted", "pod-security.kubernetes.io/audit-version": "latest"}
    pods = pods_by_component(world, ns)
    for component in ("scheduler", "worker", "jupyter"):  # the chart's pods, admitted: no token, the lab's account
        assert pods[component], component
        for pod in pods[component]:
            assert pod["spec"]["serviceAccountName"] == LAB_ACCOUNT
            assert token_volumes(pod) == [] and token_mounts(pod) == [], pod["metadata"]["name"]
    (helm,) = pods[INSTALLER]  # the install Job's pod keeps its account's token: helm talks to the API server
    assert helm["spec"]["serviceAccountName"] == INSTALLER
    assert len(token_volumes(helm)) == 1 and token_mounts(helm) == [TOKEN_PATH]
    assert world.kube.get("serviceaccounts", ns, LAB_ACCOUNT)["automountServiceAccountToken"] is False


def test_a_host_path_that_reaches_the_release_builder_is_refused_by_the_api_server(world):
    """Defence in depth: values the message allowlist would refuse, given straight to the release builder, render
    a worker pod mounting the node's root; the namespace's baseline refuses it at the API server (its ReplicaSet
    says ReplicaFailure), while the scheduler and Jupyter pods are admitted, as the lab's account, without token."""
    root = {"volumes": [{"name": "root", "hostPath": {"path": "/"}}],
            "volumeMounts": [{"name": "root", "mountPath": "/host"}]}
    spec = make_spec(name="lab1", values={"worker": {"mounts": root, "serviceAccountName": INSTALLER},
                                          "jupyter": {"serviceAccountName": INSTALLER}})
    release = build_release(spec, release="lab1", namespace="dasklab-lab1", chart_repo=CONFIG.chart_repo,
                            chart_version=CONFIG.chart_version, helm_image=CONFIG.helm_image,
                            system_pool=CONFIG.system_pool, worker_pool=CONFIG.worker_pool)
    *manifests, job = release.manifests
    for manifest in manifests:
        world.kube.create(manifest)
    client.BatchV1Api(world.kube.api_client()).create_namespaced_job("dasklab-lab1", job)  # the world's helm runs
    worker = world.kube.get("deployments", "dasklab-lab1", "lab1-dask-worker")["spec"]["template"]["spec"]
    assert worker["volumes"] == root["volumes"]  # rendered as the chart does…
    assert worker["serviceAccountName"] == LAB_ACCOUNT  # (the account is enforced, the mount is not)
    pods = pods_by_component(world, "dasklab-lab1")
    assert "worker" not in pods  # …and refused at the API server
    (replicaset,) = world.kube.list("replicasets", "dasklab-lab1", "component=worker")
    (failure,) = replicaset["status"]["conditions"]
    assert (failure["type"], failure["reason"]) == ("ReplicaFailure", "FailedCreate")
    assert failure["message"].endswith('is forbidden: violates PodSecurity "baseline:latest": hostPath volumes '
                                       '(volume "root")')
    for component in ("scheduler", "jupyter"):
        (pod,) = pods[component]
        assert pod["spec"]["serviceAccountName"] == LAB_ACCOUNT and token_volumes(pod) == []


ROOT = {"volumes": [{"name": "root", "hostPath": {"path": "/"}}], "volumeMounts": [{"name": "root", "mountPath": "/h"}]}
WIDENED = "violates PodSecurity \"baseline:latest\": "


@pytest.mark.parametrize("values, refused", [
    ({"worker": {"mounts": ROOT}}, {"worker": 'hostPath volumes (volume "root")'}),
    ({"jupyter": {"mounts": ROOT}}, {"jupyter": 'hostPath volumes (volume "root")'}),
    ({"worker": {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "65536"}]}}},
     {"worker": "forbidden sysctls (kernel.msgmax)"}),
    ({"scheduler": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}},
     {"scheduler": 'seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")'}),
    ({"jupyter": {"securityContext": {"seLinuxOptions": {"user": "system_u"}}}},
     {"jupyter": "seLinuxOptions (pod set forbidden securityContext.seLinuxOptions: user may not be set)"}),
    ({"worker": {"annotations": {"container.apparmor.security.beta.kubernetes.io/lab1-dask-worker": "unconfined"}}},
     {"worker": 'forbidden AppArmor profile (container.apparmor.security.beta.kubernetes.io/lab1-dask-worker='
                '"unconfined")'}),
    ({"worker": {"securityContext": {"runAsUser": 1000, "fsGroup": 100}}}, {}),  # within baseline: admitted
], ids=["worker-hostPath", "jupyter-hostPath", "sysctl", "seccomp-unconfined", "selinux-user", "apparmor", "user"])
def test_values_that_widen_a_pod_are_rendered_and_refused_at_the_api_server(values, refused):
    """Values that reach the release builder (the allowlist bypassed) are rendered as the chart renders them; the
    pods that leave baseline are refused at the API server (their ReplicaSet says why), the others are admitted."""
    with KubeStandin(nodes=("node-a",)) as kube:
        kube.create(build_namespace("dasklab-lab1", "lab1"))
        kube.create(build_lab_account("dasklab-lab1", "lab1"))
        for obj in render_chart(build_helm_values(make_spec(name="lab1", values=values), system_pool="system",
                                                  worker_pool="workers")):
            kube.create(obj)
        for component in ("scheduler", "worker", "jupyter"):
            (replicaset,) = kube.list("replicasets", "dasklab-lab1", f"component={component}")
            conditions = (replicaset.get("status") or {}).get("conditions") or []
            pods = kube.list("pods", "dasklab-lab1", f"component={component}")
            if component in refused:
                assert not pods and [c["reason"] for c in conditions] == ["FailedCreate"]
                assert conditions[0]["message"].endswith(f"is forbidden: {WIDENED}{refused[component]}")
            else:
                assert pods and not conditions, component
                assert all(p["spec"]["serviceAccountName"] == LAB_ACCOUNT and not token_volumes(p) for p in pods)
