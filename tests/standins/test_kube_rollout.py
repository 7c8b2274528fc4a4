"""The Kubernetes stand-in's Deployment rollouts, each rule as kubernetes.io/docs/concepts/workloads/controllers/
deployment/ documents it, proven through the real `kubernetes` client over HTTP (time is the stand-in's clock)."""

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from tests.standins.kube import KubeStandin

NS = "default"
REVISION = "deployment.kubernetes.io/revision"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def kube(clock):
    with KubeStandin("t", nodes={"node-a": 20}, clock=clock) as standin:
        yield standin


@pytest.fixture
def apps(kube):
    return client.AppsV1Api(kube.api_client())


def deployment(replicas: int, image: str = "img:1", **spec) -> dict:
    labels = {"app": "w"}
    return {"metadata": {"name": "w"}, "spec": {
        "replicas": replicas, "selector": {"matchLabels": labels}, **spec,
        "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "main", "image": image}]}}}}


def sets(apps) -> dict[str, tuple[int, str, str]]:
    """image → (replicas, revision, pod-template-hash) of each ReplicaSet."""
    return {rs.spec.template.spec.containers[0].image: (rs.spec.replicas, rs.metadata.annotations[REVISION],
                                                        rs.metadata.labels["pod-template-hash"])
            for rs in apps.list_namespaced_replica_set(NS).items}


def counts(apps) -> dict[str, int]:
    return {image: n for image, (n, _, _) in sets(apps).items()}


def new_image(apps, image: str) -> None:
    apps.patch_namespaced_deployment("w", NS, {"spec": {"template": {"spec": {"containers": [
        {"name": "main", "image": image}]}}}})


def test_a_replicaset_per_template_with_its_hash_and_revision(apps):
    apps.create_namespaced_deployment(NS, deployment(2))
    (rs,) = apps.list_namespaced_replica_set(NS).items
    pth = rs.metadata.labels["pod-template-hash"]
    assert rs.metadata.name == f"w-{pth}" and rs.spec.selector.match_labels["pod-template-hash"] == pth
    assert rs.metadata.annotations[REVISION] == "1"
    new_image(apps, "img:2")
    assert {i: (n, r) for i, (n, r, _) in sets(apps).items()} == {"img:1": (0, "1"), "img:2": (2, "2")}
    assert apps.read_namespaced_deployment("w", NS).metadata.annotations[REVISION] == "2"
    new_image(apps, "img:1")  # back to the first template: its ReplicaSet is the new one, under a new revision
    assert {i: (n, r) for i, (n, r, _) in sets(apps).items()} == {"img:1": (2, "3"), "img:2": (0, "2")}
    assert sets(apps)["img:1"][2] == pth


def test_rolling_update_rounds_surge_up_and_unavailable_down_and_waits_min_ready_seconds(apps, clock):
    # 3 replicas at the default 25 %: maxSurge ceil(0.75) = 1, maxUnavailable floor(0.75) = 0
    apps.create_namespaced_deployment(NS, deployment(3, minReadySeconds=10))
    clock.t += 10
    assert apps.read_namespaced_deployment("w", NS).status.available_replicas == 3
    new_image(apps, "img:2")
    assert counts(apps) == {"img:1": 3, "img:2": 1}  # one above replicas, none of the old gone
    status = apps.read_namespaced_deployment("w", NS).status
    assert (status.replicas, status.ready_replicas, status.available_replicas) == (4, 4, 3)
    clock.t += 9.9
    assert counts(apps) == {"img:1": 3, "img:2": 1}  # ready, not yet available
    for step in ({"img:1": 2, "img:2": 2}, {"img:1": 1, "img:2": 3}, {"img:1": 0, "img:2": 3}):
        clock.t += 10
        assert counts(apps) == step  # each new pod available for minReadySeconds lets one old pod go


def test_max_surge_100_and_no_unavailable_keeps_every_old_pod_until_the_new_are_available(apps, clock):
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}}
    apps.create_namespaced_deployment(NS, deployment(3, strategy=strategy))
    apps.patch_namespaced_deployment("w", NS, {"spec": {"minReadySeconds": 3600}})
    assert counts(apps) == {"img:1": 3}  # not a template change: no new ReplicaSet
    new_image(apps, "img:2")
    clock.t += 600
    assert counts(apps) == {"img:1": 3, "img:2": 3}  # all new pods at once, the old kept (held)
    apps.patch_namespaced_deployment("w", NS, {"spec": {"minReadySeconds": 0}})
    assert counts(apps) == {"img:1": 0, "img:2": 3}  # the hold lifted: the old go at once
    status = apps.read_namespaced_deployment("w", NS).status
    assert (status.replicas, status.updated_replicas, status.available_replicas) == (3, 3, 3)


def test_recreate_kills_the_old_pods_before_creating_new_ones(kube, apps):
    apps.create_namespaced_deployment(NS, deployment(2, strategy={"type": "Recreate"}))
    old = {p["metadata"]["name"] for p in kube.list("pods", NS)}
    new_image(apps, "img:2")
    assert counts(apps) == {"img:1": 0, "img:2": 2}
    (rs,) = [r for r in apps.list_namespaced_replica_set(NS).items if r.spec.template.spec.containers[0].image == "img:2"]
    pods = kube.objects
    versions = [v["spec"]["replicas"] for v in kube.objects["apps/v1/replicasets", NS, rs.metadata.name].history]
    assert versions[0] == 0 and versions[-1] == 2  # created empty while the old pods ran
    gone = [pods["v1/pods", NS, name] for name in old]
    assert all(p.deleted for p in gone) and {p["metadata"]["name"] for p in kube.list("pods", NS)}.isdisjoint(old)


def test_max_surge_and_max_unavailable_both_zero_is_invalid(apps):
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}
    with pytest.raises(ApiException) as info:
        apps.create_namespaced_deployment(NS, deployment(1, strategy=strategy))
    assert info.value.status == 422 and "may not be 0 when `maxSurge` is 0" in info.value.body
