"""Fair shares on shared nodes (issue 21): the controller keeps a lab namespace's LimitRange and ResourceQuota sized
for what the lab runs now (an update-lab may change its worker size), through the Kube adapter on the Kubernetes
stand-in, which admits pods against them as the API server does."""

from dataclasses import replace

import pytest
from dasklab.adapters.kube import Kube
from dasklab.adapters.release import build_helm_values, build_limit_range, build_quota
from dasklab.core.errors import PermanentError

from tests.conftest import make_spec
from tests.standins.kube import KubeStandin


def worker_pod(name: str, cpu: str, memory: str) -> dict:
    resources = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "worker", "image": "ghcr.io/dask/dask:2024.1.0", "resources": resources}]}}


def test_the_limit_range_and_quota_follow_the_labs_worker_size():
    with KubeStandin(nodes=()) as standin:
        kube, ns = Kube(standin.api_client()), "dasklab-lab"
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        small = make_spec(placement="shared", max_workers=2)
        values = build_helm_values(small, system_pool="system", worker_pool="workers")
        for build in (build_limit_range, build_quota):
            assert kube.ensure_spec(build(small, values, ns)) is True  # created
            assert kube.ensure_spec(build(small, values, ns)) is False  # as the manifest says: nothing to do
        with pytest.raises(PermanentError, match="maximum cpu usage per Container is 1, but limit is 2"):
            _create(kube, ns, worker_pod("w0", "2", "6G"))
        # an update-lab doubles the worker size: both follow, and the bigger workers are admitted
        big = replace(small, worker_cpu=2.0, worker_memory=6 * 10**9)
        assert kube.ensure_spec(build_limit_range(big, values, ns)) is True
        assert kube.ensure_spec(build_quota(big, values, ns)) is True
        (limits,) = standin.list("limitranges", ns)
        assert limits["spec"]["limits"][0]["max"] == {"cpu": "2", "memory": str(6 * 10**9)}
        for i in range(3):  # 2 workers + 1 surge
            _create(kube, ns, worker_pod(f"w{i}", "2", "6G"))
        with pytest.raises(PermanentError, match="exceeded quota: dasklab-quota"):
            for i in range(3, 8):  # past the quota's room (its scheduler's and Jupyter's share left aside)
                _create(kube, ns, worker_pod(f"w{i}", "2", "6G"))


def _create(kube: Kube, ns: str, pod: dict) -> None:
    """A pod written as the install Job's chart would be, refusals translated by the adapter."""
    kube._call(f"create Pod {pod['metadata']['name']}", kube.core.create_namespaced_pod, ns, pod)
