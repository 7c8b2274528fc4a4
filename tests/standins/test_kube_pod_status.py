"""The Kubernetes stand-in's pod status, read by the real client as the kubelet and scheduler report it: a crashed
container (lastState.terminated, restartCount, CrashLoopBackOff), image pulls refused, Unschedulable with the
scheduler's message; and the GKE adapter's reading of them (pod_problems)."""

import pytest
from kubernetes import client

from dasklab.adapters.gke import pod_problems
from tests.standins.test_kube_standin import NS, TOKEN, deployment, pods_of, refused  # noqa: F401
from tests.standins.kube import KubeStandin

GB = 10**9


@pytest.fixture
def kube():
    with KubeStandin(TOKEN, nodes=("node-a",), pods_per_node=2) as standin:
        yield standin


@pytest.fixture
def core(kube):
    return client.CoreV1Api(kube.api_client())


@pytest.fixture
def apps(kube):
    return client.AppsV1Api(kube.api_client())


def test_an_oom_kill_then_a_back_off_then_a_restart(kube, core, apps):
    apps.create_namespaced_deployment(NS, deployment("w"))
    (name,) = pods_of(core, "app=w")
    assert refused(core.read_namespaced_pod_log, name, NS, previous=True)[0] == 400  # no previous run yet
    kube.crash_container(NS, name, reason="OOMKilled", exit_code=137, log="MemoryError?\n")
    pod = core.read_namespaced_pod(name, NS)
    (c,) = pod.status.container_statuses
    assert pod.status.phase == "Running" and not c.ready and c.restart_count == 1
    assert (c.last_state.terminated.reason, c.last_state.terminated.exit_code) == ("OOMKilled", 137)
    assert c.state.waiting.reason == "CrashLoopBackOff" and f"pod={name}_{NS}(" in c.state.waiting.message
    assert apps.read_namespaced_deployment("w", NS).status.unavailable_replicas == 1
    assert core.read_namespaced_pod_log(name, NS, previous=True) == "MemoryError?\n"
    (problem,) = pod_problems(pod, 3 * GB)
    assert (problem.kind, problem.worker, problem.restarts, problem.memory_limit) == ("oom-killed", name, 1, 3 * GB)
    assert problem.detail == "CrashLoopBackOff; last run OOMKilled, exit code 137" and problem.at > 0

    kube.restart_container(NS, name)
    (c,) = core.read_namespaced_pod(name, NS).status.container_statuses
    assert c.ready and c.state.running and c.last_state.terminated.reason == "OOMKilled" and c.restart_count == 1
    (problem,) = pod_problems(core.read_namespaced_pod(name, NS), 3 * GB)
    assert problem.detail == "OOMKilled, exit code 137"  # still said while recent; plan_health ages it out


def test_a_refused_image_keeps_the_pod_pending(kube, core, apps):
    kube.refuse_image("ghcr.io/dask/dask:2025.11.0", "ghcr.io/dask/dask:2025.11.0: not found")
    apps.create_namespaced_deployment(NS, deployment("w"))
    (name,) = pods_of(core, "app=w")
    pod = core.read_namespaced_pod(name, NS)
    (c,) = pod.status.container_statuses
    assert pod.status.phase == "Pending" and pod.spec.node_name == "node-a"
    assert c.state.waiting.reason == "ErrImagePull" and "not found" in c.state.waiting.message
    status, body = refused(core.read_namespaced_pod_log, name, NS)
    assert status == 400 and "is waiting to start: ErrImagePull" in body["message"]
    apps.patch_namespaced_deployment_scale("w", NS, {"spec": {"replicas": 1}})  # any change: the kubelet retries
    (c,) = core.read_namespaced_pod(name, NS).status.container_statuses
    assert c.state.waiting.reason == "ImagePullBackOff"
    (problem,) = pod_problems(core.read_namespaced_pod(name, NS), GB)
    assert problem.kind == "image-pull" and problem.detail.startswith("ImagePullBackOff: Back-off pulling image")


def test_unschedulable_pods_carry_the_schedulers_message(kube, core, apps):
    apps.create_namespaced_deployment(NS, deployment("w", replicas=3))
    pending = [p for p in pods_of(core, "app=w").values() if p.status.phase == "Pending"]
    (pod,) = pending
    (cond,) = [c for c in pod.status.conditions if c.type == "PodScheduled"]
    assert (cond.status, cond.reason, cond.message) == ("False", "Unschedulable",
                                                        "0/1 nodes are available: 1 Too many pods.")
    (problem,) = pod_problems(pod, GB)
    assert (problem.kind, problem.detail) == ("pending", "0/1 nodes are available: 1 Too many pods.")
