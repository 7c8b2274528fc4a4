"""Pure builders of the Dask Helm release (values, install Job, public Service) and of a GKE cluster's labels."""

import json
import re
from pathlib import Path

import pytest
import yaml
from dasklab.adapters.gke import (
    build_labels,
    encode_description,
    place_of,
)
from dasklab.core.config import Config
from dasklab.core.errors import PermanentError, ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.specs import build_spec
from dasklab.core.model import Lab, LabState, nodes_per_zone
from dasklab.adapters.release import (
    LAB_ACCOUNT,
    POOL_LABEL,
    TOKEN_SECRET,
    build_helm_values,
    build_release,
    build_token_secret,
    chart_fullname,
)

from tests.conftest import make_spec

SEED = (Path(__file__).parent.parent / "examples" / "config.yaml").read_text()
POOLS = {"system_pool": "system", "worker_pool": "workers"}


def seed_spec(**kw):
    message = {"v": 1, "type": "start-lab", "lab": "intro-dask", "owner": "alice", "values": SEED,
               "workers": {"initial": 2, "min": 1, "max": 8}, **kw}
    return build_spec(parse_command(json.dumps(message)), Config())


def release(spec, **kw):
    return build_release(spec, release=spec.name, namespace=f"dasklab-{spec.name}", chart_repo="https://helm.dask.org",
                         chart_version="2024.1.1", helm_image="alpine/helm:3.16.3", **POOLS, **kw)


def env(component: dict) -> dict:
    return {e["name"]: e for e in component["env"]}


def test_seed_values_are_kept_but_exposure_and_control_are_enforced():
    values = build_helm_values(seed_spec(), **POOLS)
    # the request's values pass through…
    assert env(values["worker"])["EXTRA_PIP_PACKAGES"]["value"] == "s3fs gcsfs dask-ml --upgrade"
    assert values["scheduler"]["resources"]["limits"] == {"cpu": 1, "memory": "3G"}
    # …but nothing is public (the seed asks for two LoadBalancers) and no Ingress is made
    assert values["scheduler"]["serviceType"] == values["jupyter"]["serviceType"] == "ClusterIP"
    assert not values["jupyter"]["ingress"]["enabled"] and not values["webUI"]["ingress"]["enabled"]
    routes = json.loads(env(values["scheduler"])["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"]["value"])
    assert "distributed.http.scheduler.api" in routes and "distributed.http.scheduler.json" in routes
    # workers: the controller's count and sizes, alone on the worker pool, named after their pods
    worker = values["worker"]
    assert worker["replicas"] == 2  # initial, not the seed's 3
    assert worker["resources"]["limits"] == worker["resources"]["requests"] == {"cpu": 1, "memory": "3000000000"}
    assert worker["nodeSelector"] == {POOL_LABEL: "workers"} and values["scheduler"]["nodeSelector"] == {
        POOL_LABEL: "system"}
    assert worker["extraArgs"][-2:] == ["--name", "$(POD_NAME)"]
    assert env(worker)["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert values["additional_worker_groups"] == []
    # Jupyter: a token from a Secret, no RBAC to scale workers, no known default password
    jupyter = values["jupyter"]
    assert env(jupyter)["JUPYTER_TOKEN"] == {"name": "JUPYTER_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": TOKEN_SECRET, "key": "token"}}}
    assert jupyter["rbac"] is False and jupyter["password"] == ""
    # every pod runs as the lab's account, which mounts no token, and the namespace enforces Pod Security baseline
    assert {values[c]["serviceAccountName"] for c in ("scheduler", "worker", "jupyter")} == {LAB_ACCOUNT}
    namespace, account = release(seed_spec()).manifests[:2]
    assert account == {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
                       "metadata": {"name": LAB_ACCOUNT, "namespace": "dasklab-intro-dask",
                                    "labels": {"managed-by": "dasklab", "lab": "intro-dask"}}}
    labels = namespace["metadata"]["labels"]
    assert {k.rsplit("/", 1)[1]: v for k, v in labels.items() if k.startswith("pod-security.kubernetes.io/")} == {
        "enforce": "baseline", "enforce-version": "latest", "warn": "restricted", "warn-version": "latest",
        "audit": "restricted", "audit-version": "latest"}


def test_enforced_settings_win_over_the_request():
    spec = make_spec(name="lab", worker_cpu=0.5, values={
        "scheduler": {"serviceType": "LoadBalancer", "env": [
            {"name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES", "value": "[]"}, {"name": "KEEP", "value": "1"}]},
        "worker": {"replicas": 9, "extraArgs": ["--name", "mine", "--lifetime", "1h"]},
        "jupyter": {"env": [{"name": "JUPYTER_TOKEN", "value": "guessable"}]},
        "additional_worker_groups": [{"name": "big"}]})
    values = build_helm_values(spec, **POOLS)
    assert values["scheduler"]["serviceType"] == "ClusterIP" and env(values["scheduler"])["KEEP"]["value"] == "1"
    assert "scheduler.api" in env(values["scheduler"])["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"]["value"]
    assert values["worker"]["replicas"] == 1 and values["additional_worker_groups"] == []
    assert values["worker"]["extraArgs"] == ["--lifetime", "1h", "--name", "$(POD_NAME)"]
    assert values["worker"]["resources"]["limits"]["cpu"] == "500m" and values["worker"]["threads_per_worker"] == 1
    assert "guessable" not in json.dumps(values)


def test_install_job_runs_helm_on_the_pinned_chart_with_values_from_a_configmap():
    rel = release(seed_spec())
    kinds = [m["kind"] for m in rel.manifests]
    assert kinds == ["Namespace", "ServiceAccount", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"]
    assert all(m["metadata"]["labels"]["managed-by"] == "dasklab" for m in rel.manifests)
    assert all(m["metadata"].get("namespace") == "dasklab-intro-dask" for m in rel.manifests[1:])
    role = rel.manifests[3]
    assert {g for rule in role["rules"] for g in rule["apiGroups"]} <= {"", "apps"}  # no RBAC escalation
    values_cm, job = rel.manifests[5], rel.manifests[6]
    assert yaml.safe_load(values_cm["data"]["values.yaml"]) == rel.values
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["helm"] and container["args"] == [
        "upgrade", "--install", "intro-dask", "dask", "--repo", "https://helm.dask.org", "--version", "2024.1.1",
        "--namespace", "dasklab-intro-dask", "-f", "/values/values.yaml"]
    assert pod["volumes"] == [{"name": "values", "configMap": {"name": values_cm["metadata"]["name"]}}]
    assert pod["serviceAccountName"] == "dasklab-helm" and pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {POOL_LABEL: "system"}


def test_job_name_is_a_hash_of_what_it_installs():
    a, b = release(seed_spec()), release(seed_spec())
    assert a.job_name == b.job_name and re.fullmatch(r"dasklab-helm-[0-9a-f]{10}", a.job_name)
    assert release(seed_spec(workers={"initial": 3, "max": 8})).job_name != a.job_name
    other_chart = build_release(seed_spec(), release="intro-dask", namespace="dasklab-intro-dask",
                                chart_repo="https://helm.dask.org", chart_version="2025.1.0",
                                helm_image="alpine/helm:3.16.3", **POOLS)
    assert other_chart.job_name != a.job_name
    # the limits a scale command changes are not install inputs: the same Job
    assert release(seed_spec(workers={"initial": 2, "min": 0, "max": 4})).job_name == a.job_name


def test_public_jupyter_only_with_source_ranges_and_never_the_scheduler():
    assert not [m for m in release(seed_spec()).manifests if m["kind"] == "Service"]
    rel = release(seed_spec(expose={"source_ranges": ["203.0.113.0/24", "198.51.100.7/32"]}))
    (service,) = [m for m in rel.manifests if m["kind"] == "Service"]
    assert service["metadata"]["name"] == "intro-dask-jupyter-public"
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24", "198.51.100.7/32"]
    assert service["spec"]["selector"] == {"app": "dask", "release": "intro-dask", "component": "jupyter"}
    assert service["spec"]["ports"][0]["targetPort"] == 8888
    assert rel.values["scheduler"]["serviceType"] == "ClusterIP"


def test_token_secret_and_names():
    secret = build_token_secret("ns", "lab", "t0ken")
    assert secret["stringData"] == {"token": "t0ken"} and secret["metadata"]["name"] == TOKEN_SECRET
    assert chart_fullname("lab1") == "lab1-dask" and chart_fullname("intro-dask") == "intro-dask"
    place = place_of("a" * 40)
    assert len(place.namespace) <= 63 and place.cluster == "a" * 40
    assert (nodes_per_zone(5, 1), nodes_per_zone(5, 3), nodes_per_zone(0, 3)) == (5, 2, 0)


def test_cluster_labels_say_whose_it_is_and_nothing_a_user_wrote():
    seed = (Path(__file__).resolve().parents[1] / "examples" / "seed-3.yaml").read_text()
    spec = build_spec(parse_command(json.dumps({"type": "start-lab", "lab": "intro", "owner": "alice",
                                                "values": seed})),
                      Config(backend="gke", project="p"))  # values, packages and override notes
    lab = Lab(spec, LabState(phase="provisioning", created_at=1.5, target_workers=15))
    assert spec.notes and build_labels(lab) == {"managed-by": "dasklab", "lab": "intro", "owner": "alice"}
    assert encode_description(lab) == "dasklab lab intro of alice"
    student = Lab(make_spec(name="intro-ada", class_name="intro", student="ada", placement="shared",
                            values={"worker": {"env": [{"name": "K", "value": "private"}]}}), LabState())
    assert build_labels(student) == {"managed-by": "dasklab", "placement": "shared", "class": "intro"}
    own = Lab(make_spec(name="intro-bob", class_name="intro", student="bob"), LabState())
    assert build_labels(own) == {"managed-by": "dasklab", "lab": "intro-bob", "owner": "alice", "class": "intro"}
    for labels in (build_labels(lab), build_labels(student), build_labels(own)):
        for key, value in labels.items():  # GKE's label rules
            assert re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key) and re.fullmatch(r"[a-z0-9_-]{0,63}", value)


def test_every_image_runs_the_pinned_dask_version():
    spec = seed_spec()
    assert spec.dask_version == Config().dask_version == "2026.3.0"
    values = build_helm_values(spec, **POOLS)
    assert {c: values[c]["image"] for c in ("scheduler", "worker", "jupyter")} == {
        "scheduler": {"repository": "ghcr.io/dask/dask", "tag": "2026.3.0"},
        "worker": {"repository": "ghcr.io/dask/dask", "tag": "2026.3.0"},
        "jupyter": {"repository": "ghcr.io/dask/dask-notebook", "tag": "2026.3.0"}}
    other = build_spec(parse_command(json.dumps({"v": 1, "type": "start-lab", "lab": "a", "owner": "b"})),
                       Config(dask_version="2025.12.0"))
    assert build_helm_values(other, **POOLS)["worker"]["image"]["tag"] == "2025.12.0"


def test_a_custom_repository_is_allowed_when_its_tag_states_the_dask_version():
    spec = seed_spec(values={"worker": {"image": {"repository": "example.org/lab/dask", "tag": "2025.12.0-py3.12"}}})
    assert spec.dask_version == "2025.12.0"
    values = build_helm_values(spec, **POOLS)
    assert values["worker"]["image"] == {"repository": "example.org/lab/dask", "tag": "2025.12.0-py3.12"}
    assert values["scheduler"]["image"] == {"repository": "ghcr.io/dask/dask", "tag": "2025.12.0"}


@pytest.mark.parametrize("component, tag, rule", [
    ("worker", "2024.1.0", "Dask 2024.1.0 is outside 2025.9.0 ≤ Dask ≤ 2026.3.x"),
    ("scheduler", "2026.6.0", "Dask 2026.6.0 is outside 2025.9.0 ≤ Dask ≤ 2026.3.x"),
    ("jupyter", "latest", "'latest' states no Dask version; labs run 2025.9.0 ≤ Dask ≤ 2026.3.x"),
])
def test_an_image_tag_outside_the_window_is_refused_naming_the_field(component, tag, rule):
    with pytest.raises(ValidationError) as err:
        seed_spec(values={component: {"image": {"repository": "example.org/dask", "tag": tag}}})
    assert err.value.field == f"values.{component}.image.tag" and err.value.rule.startswith(rule)


def test_components_stating_different_dask_versions_are_refused():
    with pytest.raises(ValidationError, match="values.worker.image.tag: every component must run the same Dask"):
        seed_spec(values={"scheduler": {"image": {"tag": "2026.3.0"}}, "worker": {"image": {"tag": "2025.12.0"}}})


def test_the_configured_dask_version_is_checked_when_the_config_is_read():
    from dasklab.core.config import from_env
    assert from_env({"DASKLAB_DASK_VERSION": "2025.9.1"}).dask_version == "2025.9.1"
    with pytest.raises(ValidationError, match="DASKLAB_DASK_VERSION: Dask 2026.8.0 is outside"):
        from_env({"DASKLAB_DASK_VERSION": "2026.8.0"})


def test_a_cluster_read_in_an_earlier_pass_is_not_trusted(monkeypatch):
    """Issue 20: what the GKE backend keeps of a cluster it read (endpoint, pools) serves the pass that read it; a
    warm instance's next invocation reads the cluster again instead of acting on what it was minutes ago."""
    import time as real_time
    from google.cloud import container_v1 as gke
    from dasklab.adapters.gke import base
    backend = base.GkeBase.__new__(base.GkeBase)
    backend._seen_at = {}
    cluster = gke.Cluster(name="lab1", endpoint="10.0.0.1")
    backend._remember(cluster)
    assert backend._seen(place_of("lab1")) is cluster
    later = real_time.monotonic() + base.SEEN_S + 1
    monkeypatch.setattr(base.time, "monotonic", lambda: later)
    assert backend._seen(place_of("lab1")) is None


def greedy_spec(placement: str, jupyter: dict | None = None):
    """A lab whose Jupyter asks for most of an e2-standard-4 (the system machine) and a scheduler asking nothing."""
    jupyter = jupyter or {"requests": {"cpu": 3, "memory": "12G"}}
    message = {"v": 1, "type": "start-lab", "lab": "intro-ann", "owner": "alice", "workers": {"max": 4},
               "worker_resources": {"cpu": 1, "memory": "3G"}, "values": {"jupyter": {"resources": jupyter}}}
    return build_spec(parse_command(json.dumps(message)), Config(backend="gke", project="p"), placement)


def test_the_scheduler_and_jupyter_get_limits_within_their_slot_of_a_system_node():
    # nothing asked: requests as before; memory limited to its request, CPU to the component's slot
    values = build_helm_values(make_spec(placement="shared"), **POOLS)
    assert values["scheduler"]["resources"] == {"requests": {"cpu": "500m", "memory": "1G"},
                                                "limits": {"cpu": "625m", "memory": "1G"}}
    # shared e2-standard-4: (4 - 0.25) CPU and (16 - 1) GiB allocatable, 3 labs a node, half each → 625m / 2.5 GiB
    greedy = build_helm_values(greedy_spec("shared"), **POOLS)["jupyter"]["resources"]
    assert greedy == {"requests": {"cpu": "625m", "memory": "2560Mi"}, "limits": {"cpu": "625m", "memory": "2560Mi"}}
    # in a cluster of its own the lab has the whole node: half of it each
    own = build_helm_values(greedy_spec(""), **POOLS)["jupyter"]["resources"]
    assert own == {"requests": {"cpu": "1875m", "memory": "7680Mi"}, "limits": {"cpu": "1875m", "memory": "7680Mi"}}
    # within the slot, the request is honoured as asked (a limit alone is the request too, as Kubernetes does)
    modest = greedy_spec("shared", {"limits": {"cpu": "600m", "memory": "2G"}})
    assert build_helm_values(modest, **POOLS)["jupyter"]["resources"] == {
        "requests": {"cpu": "600m", "memory": "2G"}, "limits": {"cpu": "600m", "memory": "2G"}}
    assert not [n for n in modest.notes if n.startswith("values.jupyter.resources")]
    # the system machine sets the slot: an e2-standard-8 packs 7 labs (7.75 CPU, 31 GiB allocatable)
    big = build_helm_values(greedy_spec("shared"), **POOLS, system_machine="e2-standard-8")["jupyter"]["resources"]
    assert big["limits"] == {"cpu": "553m", "memory": "2267Mi"}
    # one scheduler: more would take other labs' room on the system nodes (the allowlist refuses another count)
    with pytest.raises(ValidationError, match="values.scheduler.replicas"):
        parse_command(json.dumps({"v": 1, "type": "start-lab", "lab": "a", "owner": "o", "values": {
            "scheduler": {"replicas": 5}}}))
    (note,) = [n for n in greedy_spec("shared").notes if n.startswith("values.jupyter.resources")]
    assert note.startswith("values.jupyter.resources: capped at 0.625 CPU / 2.5 GiB (requests and limits), half "
                           "the lab's share of one e2-standard-4 system node shared by 3 labs")


def test_quota_and_limit_range_bound_the_lab_whatever_its_values_ask():
    from dasklab.adapters.release import build_limit_range, build_quota
    spec = greedy_spec("shared")
    rel = release(spec)
    (job,) = [m for m in rel.manifests if m["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}}
    hard = build_quota(spec, rel.values, "ns")["spec"]["hard"]
    # 4 workers + 1 surge of 1 CPU / 3 G; scheduler and Jupyter twice (their surge) at their capped slot; the Job
    assert hard == {"pods": "10",
                    "requests.cpu": f"{5000 + 2 * (500 + 625) + 100}m",
                    "requests.memory": str(5 * 3 * 10**9 + 2 * (10**9 + 2560 * 2**20) + 256 * 2**20),
                    "limits.cpu": f"{5000 + 2 * (625 + 625) + 500}m",
                    "limits.memory": str(5 * 3 * 10**9 + 2 * (10**9 + 2560 * 2**20) + 256 * 2**20)}
    limits = build_limit_range(spec, rel.values, "ns")
    assert limits["kind"] == "LimitRange" and limits["spec"]["limits"] == [{
        "type": "Container", "max": {"cpu": "1", "memory": str(3 * 10**9)},  # a worker is the largest container
        "default": {"cpu": "500m", "memory": "256Mi"}, "defaultRequest": {"cpu": "100m", "memory": "256Mi"}}]
