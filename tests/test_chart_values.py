"""The chart-values allowlist: each key that would take a lab out of its box is refused naming its field (or, for a
key the controller sets itself, replaced and said); the seed passes verbatim; every key of the table is reachable and
nothing beside it is; the docs' table (docs/security.md) is the module's."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from dasklab.adapters.release import INSTALLER, build_helm_values, chart_fullname
from dasklab.core.chart_values import ACCEPTED, LIST, NOT_ACCEPTED, DOCS_PAGE, DOCS_SECTION, build_docs_table
from dasklab.core.config import Config
from dasklab.core.errors import ValidationError
from dasklab.core.messages import EXPOSE_RULE, StartClass, StartLab, parse_command
from dasklab.core.overrides import note_field
from dasklab.core.specs import build_spec
from tests.gke_world import CONFIG, World

REPO = Path(__file__).resolve().parents[1]
GKE = Config(backend="gke", project="p")
HOST_ROOT = {"volumes": [{"name": "root", "hostPath": {"path": "/"}}],
             "volumeMounts": [{"name": "root", "mountPath": "/host"}]}
NO_TOKEN = "c.ServerApp.token = ''\nc.IdentityProvider.token = ''\n"


def start(values, **kw) -> dict:
    return {"v": 1, "type": "start-lab", "lab": "intro", "owner": "alice", "values": values, **kw}


def spec_of(values, **kw):
    return build_spec(parse_command(json.dumps(start(values, **kw))), GKE)


def refusal(message: dict) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        cmd = parse_command(json.dumps(message))
        if isinstance(cmd, StartLab):
            build_spec(cmd, GKE)
        elif isinstance(cmd, StartClass):
            build_spec(cmd.student_lab(cmd.roster[0]), GKE)
    return e.value


ATTACKS = [
    # mount the node's root filesystem
    ({"worker": {"mounts": HOST_ROOT}}, "values.worker.mounts", NOT_ACCEPTED),
    ({"jupyter": {"mounts": HOST_ROOT}}, "values.jupyter.mounts", NOT_ACCEPTED),
    # widen the security context
    ({"worker": {"securityContext": {"runAsUser": 0}}}, "values.worker.securityContext", NOT_ACCEPTED),
    ({"scheduler": {"securityContext": {"runAsNonRoot": False}}}, "values.scheduler.securityContext", NOT_ACCEPTED),
    # tolerations beyond the controller's (onto nodes tainted for others)
    ({"worker": {"tolerations": [{"operator": "Exists"}]}}, "values.worker.tolerations", NOT_ACCEPTED),
    ({"jupyter": {"tolerations": [{"operator": "Exists"}]}}, "values.jupyter.tolerations", NOT_ACCEPTED),
    ({"scheduler": {"affinity": {"nodeAffinity": {}}}}, "values.scheduler.affinity", NOT_ACCEPTED),
    # turn Jupyter's token off: its config, its command line, or the variables its start script reads
    ({"jupyter": {"extraConfig": NO_TOKEN}}, "values.jupyter.extraConfig", NOT_ACCEPTED),
    ({"jupyter": {"args": ["start.sh", "jupyter", "lab", "--IdentityProvider.token="]}}, "values.jupyter.args",
     NOT_ACCEPTED),
    ({"jupyter": {"command": ["jupyter", "lab", "--ServerApp.token="]}}, "values.jupyter.command", NOT_ACCEPTED),
    ({"jupyter": {"env": [{"name": "NOTEBOOK_ARGS", "value": "--IdentityProvider.token="}]}},
     "values.jupyter.env.0.name", "could turn the token off"),
    ({"jupyter": {"env": [{"name": "KEEP", "value": "1"}, {"name": "JUPYTER_CONFIG_DIR", "value": "/tmp"}]}},
     "values.jupyter.env.1.name", "could turn the token off"),
    # read a Secret of the namespace (the lab's token) into a variable
    ({"worker": {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "dasklab-jupyter-token",
                                                                      "key": "token"}}}]}},
     "values.worker.env.0.valueFrom", NOT_ACCEPTED),
    # other chart keys the lab does not need
    ({"worker": {"annotations": {"a": "b"}}}, "values.worker.annotations", NOT_ACCEPTED),
    ({"scheduler": {"livenessProbe": {"exec": {"command": ["sh"]}}}}, "values.scheduler.livenessProbe", NOT_ACCEPTED),
    ({"worker": {"image": {"pullSecrets": [{"name": "regcred"}]}}}, "values.worker.image.pullSecrets", NOT_ACCEPTED),
    ({"worker": {"image": {"dask_worker": "sh"}}}, "values.worker.image.dask_worker", NOT_ACCEPTED),
    ({"scheduler": {"servicePort": 22}}, "values.scheduler.servicePort", NOT_ACCEPTED),
    ({"worker": {"custom_scheduler_url": "tcp://elsewhere:8786"}}, "values.worker.custom_scheduler_url",
     NOT_ACCEPTED),
    ({"scheduler": {"metrics": {"enabled": True}}}, "values.scheduler.metrics", NOT_ACCEPTED),
    ({"scheduler": {"extraArgs": ["--preload", "evil.py"]}}, "values.scheduler.extraArgs", NOT_ACCEPTED),
    ({"webUI": {"ingress": {"enabled": False, "hostname": "dask.example.org"}}}, "values.webUI.ingress.hostname",
     NOT_ACCEPTED),
    ({"worker": {"resources": {"limits": {"cpu": 1, "nvidia.com/gpu": 1}}}},
     "values.worker.resources.limits.nvidia.com/gpu", NOT_ACCEPTED),
    ({"nameOverride": "other"}, "values.nameOverride", NOT_ACCEPTED),
    ({"surprise": {"any": "thing"}}, "values.surprise", NOT_ACCEPTED),
    # accepted keys, with values outside what they accept
    ({"scheduler": {"replicas": 2}}, "values.scheduler.replicas", "must be 1 (one scheduler a lab"),
    ({"jupyter": {"replicas": 0}}, "values.jupyter.replicas", "must be 1"),
    ({"worker": {"image": {"pullPolicy": "Sometimes"}}}, "values.worker.image.pullPolicy",
     "must be one of Always, IfNotPresent, Never"),
    ({"worker": {"nodeSelector": {"pool": {"nested": "x"}}}}, "values.worker.nodeSelector",
     "must be a mapping of node label names to text values"),
    ({"worker": {"extraArgs": "--lifetime 1h"}}, "values.worker.extraArgs", "must be a list of text arguments"),
    ({"jupyter": {"password": {"hash": "x"}}}, "values.jupyter.password", "must be a single value"),
    ({"worker": {"env": {"A": "b"}}}, "values.worker.env", "must be a list"),
    ({"worker": "big"}, "values.worker", "must be a mapping"),
]


@pytest.mark.parametrize("values, field, rule", ATTACKS, ids=[a[1] for a in ATTACKS])
def test_each_key_outside_the_table_is_refused_naming_its_field(values, field, rule):
    e = refusal(start(values))
    assert (e.field, rule in e.rule) == (field, True), f"{e.field}: {e.rule}"
    if rule == NOT_ACCEPTED:
        assert e.rule.endswith(f"(see {DOCS_PAGE}: {DOCS_SECTION})")


@pytest.mark.parametrize("kind", ["start-lab", "update-lab", "start-class"])
@pytest.mark.parametrize("as_text", [False, True])
def test_every_command_carrying_values_refuses_the_same(kind, as_text):
    values = {"worker": {"replicas": 2, "mounts": HOST_ROOT}}
    values = yaml.safe_dump(values) if as_text else values
    message = {"start-lab": start(values), "update-lab": {"type": "update-lab", "lab": "intro", "values": values},
               "start-class": {"type": "start-class", "class": "c1", "owner": "t", "roster": ["ann"],
                               "values": values}}[kind]
    e = refusal(message)
    assert (e.field, e.rule) == ("values.worker.mounts", NOT_ACCEPTED)


def test_the_seeds_are_accepted_verbatim():
    for path in [REPO / "examples" / "config.yaml", *sorted((REPO / "examples").glob("seed-*.yaml"))]:
        text = path.read_text()
        spec = spec_of(text)  # as they are: no mixed_environment
        assert spec.values == yaml.safe_load(text), path


def _sample(parts: tuple) -> dict:
    """Values setting the key `parts` (its path split, LIST for a list's items) to a value it accepts."""
    entry = ACCEPTED[".".join(parts).replace("." + LIST, LIST)]
    leaf = parts[-1]
    value = (entry.only[0] if entry.only else {"labels": {"pool": "mine"}, "strings": ["--lifetime", "1h"],
                                                "any": [{"name": "g"}]}.get(entry.shape)
             or {"cpu": 1, "memory": "3G", "tag": "2026.3.0", "replicas": 1, "threads_per_worker": 1,
                 "enabled": True, "rbac": True, "name": "A", "value": "b"}.get(leaf, "x"))
    if LIST in parts:  # an env item: both of its keys
        i = parts.index(LIST)
        return _nest(parts[:i], [{"name": "A", "value": "b", parts[-1]: value}])
    return _nest(parts, value)


def _nest(parts: tuple, value):
    for part in reversed(parts):
        value = {part: value}
    return value


def _parts(path: str) -> tuple:
    return tuple(path.replace(LIST, "." + LIST).split("."))


@pytest.mark.parametrize("path", list(ACCEPTED))
def test_every_key_of_the_table_is_accepted_and_nothing_beside_it(path):
    parts = _parts(path)
    values = _sample(parts)
    spec = spec_of(values)
    assert spec.values == values  # kept as written, for Helm
    # a key beside it (in the same mapping, or in the same list item) is refused, named in full
    beside = copy.deepcopy(values)
    holder, field = beside, "values"
    for part in parts[:-1]:
        holder = holder[part] if part != LIST else holder[0]
        field += f".{part}" if part != LIST else ".0"
    holder["zz"] = 1
    e = refusal(start(beside))
    assert (e.field, e.rule) == (f"{field}.zz", NOT_ACCEPTED)


def test_a_borrowed_service_account_is_replaced_and_said():
    values = {c: {"serviceAccountName": INSTALLER} for c in ("scheduler", "worker", "jupyter")}
    spec = spec_of(values)
    notes = {note_field(n): n for n in spec.notes}
    for c in ("scheduler", "worker", "jupyter"):
        assert "replaced by the lab's own service account, which has no Kubernetes rights" in \
               notes[f"values.{c}.serviceAccountName"]
    final = build_helm_values(spec, system_pool=CONFIG.system_pool, worker_pool=CONFIG.worker_pool)
    assert all(final[c]["serviceAccountName"] != INSTALLER for c in ("scheduler", "worker", "jupyter"))
    # and what the chart renders from them (the test world's rendition of the chart's templates)
    rendered = []
    World._render(type("W", (), {"kube": None, "manifests": {}})(), "dasklab-intro", "intro", chart_fullname("intro"), final, rendered)
    pods = [o["spec"]["template"]["spec"] for o in rendered if o["kind"] == "Deployment"]
    assert len(pods) == 3 and all(pod.get("serviceAccountName") != INSTALLER for pod in pods)


def test_the_docs_table_is_the_modules():
    page = (REPO / DOCS_PAGE).read_text()  # the refusal's pointer leads to the table
    sections = page.split("\n## ")
    titles = [s.split("\n", 1)[0] for s in sections]
    section = sections[titles.index(DOCS_SECTION)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(ACCEPTED)  # exactly the module's keys, in its order
    assert build_docs_table() in section  # and what it says of each (`python -m dasklab.core.chart_values`)
    assert EXPOSE_RULE in " ".join(section.split())  # the expose bound, quoted


def test_an_update_of_a_scheduler_key_the_controller_replaces_does_not_restart_the_scheduler():
    from dasklab.core.policy import plan_update
    from dasklab.core.specs import build_update
    current = spec_of({"scheduler": {"serviceType": "LoadBalancer"}})
    update = parse_command(json.dumps({"type": "update-lab", "lab": "intro", "values": {
        "scheduler": {"serviceType": "ClusterIP", "serviceAccountName": INSTALLER}}}))
    action, reason = plan_update(current, build_update(update, current), restart=False)
    assert action == "update", reason
