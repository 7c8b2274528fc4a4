"""Every lab stays in its box, whatever accepted values ask: start-labs drawn at random from the chart-values allowlist
(core/chart_values.ACCEPTED), hostile where a key allows it, go through the message schema and the release builder
and are rendered as the chart dask/dask 2024.1.1 renders them (tests/gke_world.render_chart, checked against a real
helm by tests.chart_render_check). The assertions are on the rendered objects, never on the request."""

import json
import random

import pytest
import yaml
from kubernetes import client
from dasklab.adapters.gke import place_of
from dasklab.adapters.release import (LAB_ACCOUNT, POD_SECURITY_LABELS, POOL_LABEL, TOKEN_KEY, TOKEN_SECRET,
                                      build_helm_values, build_limit_range, build_namespace)
from dasklab.core.chart_values import ACCEPTED
from dasklab.core.config import Config
from dasklab.core.messages import parse_command
from dasklab.core.specs import build_spec

from tests.gke_world import CONFIG, render_chart
from tests.standins import pod_security
from tests.test_gke import SEED_VALUES, cmd, controller, drive, lab_of, phase, start_msg, world  # noqa: F401

POOLS = {"system_pool": CONFIG.system_pool, "worker_pool": CONFIG.worker_pool}
ROOT = {"volumes": [{"name": "root", "hostPath": {"path": "/"}}], "volumeMounts": [{"name": "root", "mountPath": "/h"}]}
# what a hostile user puts where a key takes anything (the controller replaces it whole)
HOSTILE_ANY = [{"name": "evil", "mounts": ROOT, "serviceAccountName": "dasklab-helm", "securityContext": {
    "runAsUser": 0}, "tolerations": [{"operator": "Exists"}]}]
SAMPLES = {
    "cpu": ["250m", "1", 2, "0.5"], "memory": ["512Mi", "3G", "1Gi"],
    "repository": ["ghcr.io/dask/dask", "example.org/me/dask"], "tag": [None],  # a tag must state the Dask version
    "serviceAccountName": ["dasklab-helm", "default", "kube-system-admin"], "loadBalancerIP": ["203.0.113.7"],
    "enabled": [True, False], "rbac": [True], "password": ["sha1:aae8550c0a44:9507d45e087d5ee481a5ce9f4f16f37a0867"],
    "threads_per_worker": [1, 8], "replicas": [0, 2, 4],
}


def _value(rng: random.Random, path: str, entry):
    leaf = path.rsplit(".", 1)[-1]
    if entry.only:
        return rng.choice(entry.only)
    if entry.shape == "labels":
        return rng.choice([{"disk": "ssd"}, {POOL_LABEL: "somebody-elses-pool"}])
    if entry.shape == "strings":
        return rng.choice([["--name", "mine"], ["--lifetime", "1h"], []])
    if entry.shape == "any":
        return rng.choice([HOSTILE_ANY, {"type": "Recreate"}])
    return rng.choice(SAMPLES.get(leaf, SAMPLES.get(path.split(".")[-2], ["x"])))


def _env(rng: random.Random, component: str) -> list[dict]:
    names = ["EXTRA_PIP_PACKAGES", "MY_SETTING", "JUPYTER_TOKEN", "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES",
             "POD_NAME"]
    return [{"name": name, "value": "pandas" if name == "EXTRA_PIP_PACKAGES" else ""}
            for name in rng.sample(names, rng.randint(0, 3))]


def random_values(rng: random.Random) -> dict:
    """A values mapping of accepted keys only, each present at random."""
    values: dict = {}
    for path, entry in ACCEPTED.items():
        if rng.random() < 0.5 or "[]" in path:
            continue
        *parents, leaf = path.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        value = _value(rng, path, entry)
        if value is not None:
            node[leaf] = value
    for component in ("scheduler", "worker", "jupyter"):
        if rng.random() < 0.5:
            values.setdefault(component, {})["env"] = _env(rng, component)
    return values


def pod_templates(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["labels"]["component"]: o["spec"]["template"] for o in objects if o["kind"] == "Deployment"}


@pytest.mark.parametrize("seed", range(60))
def test_no_accepted_values_render_a_pod_outside_its_box(seed):
    rng = random.Random(seed)
    values = random_values(rng)
    msg = {"v": 1, "type": "start-lab", "lab": "lab1", "owner": "ann", "values": values,
           "mixed_environment": True}  # what must agree among components is another rule (test_environment.py)
    spec = build_spec(parse_command(json.dumps(msg)), Config(backend="gke", project="p"), rng.choice(["", "shared"]))
    objects = render_chart(build_helm_values(spec, **POOLS))
    templates = pod_templates(objects)
    jupyter_on = values.get("jupyter", {}).get("enabled", True)
    assert set(templates) == {"scheduler", "worker"} | ({"jupyter"} if jupyter_on else set())  # no extra workers
    labels = build_namespace("dasklab-lab1", "lab1")["metadata"]["labels"]
    assert {k: v for k, v in labels.items() if k.startswith("pod-security")} == POD_SECURITY_LABELS
    for component, template in templates.items():
        pod = template["spec"]
        assert pod["serviceAccountName"] == LAB_ACCOUNT, (component, values)
        assert not pod.get("securityContext") and not pod.get("tolerations") and not pod.get("affinity")
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert all("configMap" in v for v in pod.get("volumes") or ()), (component, pod.get("volumes"))
        assert all(not c.get("securityContext") for c in pod["containers"])
        pool = CONFIG.worker_pool if component == "worker" else CONFIG.system_pool
        assert pod["nodeSelector"][POOL_LABEL] == pool
        for container in pod["containers"]:  # a worker and its system slot: every container limited
            assert container["resources"]["limits"].keys() >= {"cpu", "memory"}, component
        assert pod_security.refusal(labels, {"metadata": template["metadata"], "spec": pod}) == ""
    if jupyter_on:  # Jupyter logs in with the lab's token only, from its Secret
        (jupyter,) = templates["jupyter"]["spec"]["containers"]
        tokens = [e for e in jupyter["env"] if e["name"] == "JUPYTER_TOKEN"]
        assert tokens == [{"name": "JUPYTER_TOKEN", "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET,
                                                                                 "key": TOKEN_KEY}}}]
        assert "command" not in jupyter and "args" not in jupyter
        (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
        assert "c.NotebookApp.password = ''" in config["data"]["jupyter_notebook_config.py"]
    assert {o["spec"]["type"] for o in objects if o["kind"] == "Service"} == {"ClusterIP"}
    assert not [o for o in objects if o["kind"] in ("Ingress", "ServiceAccount", "Role", "RoleBinding")]


def test_the_hostile_samples_would_leave_the_box_without_the_controller():
    """The samples are hostile: rendered as sent (no controller in between), they do leave the box."""
    values = {"worker": {"serviceAccountName": "dasklab-helm", "nodeSelector": {POOL_LABEL: "somebody-elses-pool"}},
              "additional_worker_groups": HOSTILE_ANY, "jupyter": {"rbac": True, "serviceType": "LoadBalancer"},
              "scheduler": {"serviceType": "LoadBalancer"}}
    objects = render_chart(values)
    templates = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"}
    assert templates["lab1-dask-worker"]["serviceAccountName"] == "dasklab-helm"
    evil = next(t for name, t in templates.items() if "evil" in name)
    assert evil["volumes"] == ROOT["volumes"] and evil["tolerations"]
    labels = build_namespace("dasklab-lab1", "lab1")["metadata"]["labels"]
    assert pod_security.refusal(labels, {"metadata": {}, "spec": evil}).startswith('violates PodSecurity "baseline')
    assert "LoadBalancer" in {o["spec"]["type"] for o in objects if o["kind"] == "Service"}
    assert [o for o in objects if o["kind"] == "Role"]


@pytest.mark.slow
def test_a_lab_an_earlier_version_installed_gets_its_boundaries_at_its_next_update(world, controller):
    """A lab installed before its namespace carried Pod Security labels and egress policies (simulated: removed
    from a running lab) gets both from its next update-lab, before the new revision's pods start."""
    ctl, ns = controller, place_of("lab1").namespace
    ctl.handle(start_msg(), "m1")
    drive(ctl, world, lambda: phase(ctl) == "ready")
    api = client.CoreV1Api(world.kube.api_client())
    api.patch_namespace(ns, {"metadata": {"labels": {k: None for k in POD_SECURITY_LABELS}}})
    client.NetworkingV1Api(world.kube.api_client()).delete_namespaced_network_policy("dasklab-egress", ns)
    assert not set(POD_SECURITY_LABELS) & set(world.kube.get("namespaces", None, ns)["metadata"]["labels"])
    values = yaml.safe_load(SEED_VALUES)
    for component in ("worker", "jupyter"):  # the scheduler's environment kept: it is not restarted
        values[component]["env"] = [{"name": "EXTRA_PIP_PACKAGES", "value": "s3fs gcsfs dask-ml pyarrow --upgrade"}]
    ctl.handle(cmd(type="update-lab", lab="lab1", values=values), "u1")
    drive(ctl, world, lambda: lab_of(ctl).state.revision == 2, timeout=120)
    labels = world.kube.get("namespaces", None, ns)["metadata"]["labels"]
    assert {k: labels.get(k) for k in POD_SECURITY_LABELS} == POD_SECURITY_LABELS
    assert world.kube.get("networkpolicies", ns, "dasklab-egress") is not None


def test_a_lab_whose_scheduler_the_api_server_refuses_fails_saying_why(world, controller, monkeypatch):
    """Pods refused at admission are not waited on forever: with a LimitRange that allows no container above half a
    CPU (an administrator's, say), the scheduler's Deployment says ReplicaFailure and the lab fails with the API
    server's words in lab-failed."""
    from dasklab.adapters.gke import helm

    def small(spec, values, namespace):
        manifest = build_limit_range(spec, values, namespace)
        manifest["spec"]["limits"][0]["max"]["cpu"] = "500m"
        return manifest
    monkeypatch.setattr(helm, "build_limit_range", small)
    ctl = controller
    ctl.handle(start_msg(), "m1")
    drive(ctl, world, lambda: phase(ctl) == "failed", timeout=120)
    failed = ctl.events.published[-1]
    assert failed["event"] == "lab-failed"
    assert "the scheduler's pods are refused by the API server" in failed["reason"]
    assert "maximum cpu usage per Container is 500m" in failed["reason"]
