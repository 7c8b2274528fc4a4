"""The seed's config.yaml files give the labs they describe; values.worker.replicas is the user's intent; every
override of a request is said: on the lab (spec.notes), one WARNING line each at create, in lab-ready, status
and connect; every chart value the release builder changes is named by a note."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dasklab.adapters.release import build_helm_values
from dasklab.core.config import Config
from dasklab.core.errors import ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.specs import build_spec
from dasklab.core.model import READY, Lab, LabState, parse_cpu, parse_memory
from dasklab.core.overrides import note_field
from dasklab.core.reconcile import Controller
from tests.fakes import FakeBackend, ListEvents

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GKE = Config(backend="gke", project="p")
LOCAL = Config()


def seed(i: int) -> str:
    return (EXAMPLES / f"seed-{i}.yaml").read_text()


def spec_of(config=GKE, **kw):
    return build_spec(parse_command(json.dumps({"type": "start-lab", "lab": "intro", "owner": "alice", **kw})), config)


@pytest.mark.parametrize("i, workers, nodes", [(1, 4, 2), (2, 4, 2), (3, 15, 5)])
def test_each_seed_config_yaml_sent_verbatim_gives_the_lab_it_describes(i, workers, nodes):
    spec = spec_of(values=seed(i))  # as it is: no mixed_environment
    assert (spec.initial_workers, spec.max_workers) == (workers, workers)
    assert spec.values == yaml.safe_load(seed(i))
    # seed 3: 15 workers of 1 CPU / 3 GB (its limits) on e2-standard-4: 3 a node → 5 nodes, under max_nodes=8
    assert (spec.worker_cpu, spec.worker_memory, spec.machine_type) == (1.0, 3 * 10**9, "e2-standard-4")
    assert spec.nodes_for(spec.max_workers) == nodes <= GKE.max_nodes and spec.max_workers <= GKE.max_workers
    fields = {note_field(n) for n in spec.notes}
    assert {"values.scheduler.serviceType", "values.jupyter.serviceType", "values.jupyter.password",
            "values.worker.replicas"} <= fields
    jupyter = next(n for n in spec.notes if note_field(n) == "values.jupyter.serviceType")
    assert "LoadBalancer replaced by ClusterIP" in jupyter and "expose.source_ranges" in jupyter
    if i == 3:  # its requests (0.5 CPU / 2.5G) are replaced by its limits; Jupyter's matplotlib is said
        assert "values.worker.resources.requests" in fields
        assert "values.jupyter.env.EXTRA_PIP_PACKAGES" in fields and not spec.mixed_environment
    if i > 1:  # the scheduler lists no packages: said, with the update that adds them
        assert "values.scheduler.env" in fields


def test_more_workers_than_the_caps_allow_are_refused_and_the_user_lowers_them():
    big = seed(3).replace("replicas: 15", "replicas: 17")
    with pytest.raises(ValidationError) as e:
        spec_of(values=big)
    assert (e.value.field, e.value.rule) == ("values.worker.replicas",
                                             "17 is above the controller cap max_workers=16")
    # on smaller machines the node cap refuses first: e2-standard-2 holds one such worker a node
    with pytest.raises(ValidationError) as e:
        spec_of(values=seed(3), machine_type="e2-standard-2")
    assert e.value.field == "values.worker.replicas" and "above the controller cap max_nodes=8" in e.value.rule
    # what the user does instead: fewer workers, or the bigger machine type
    assert spec_of(values=seed(3).replace("replicas: 15", "replicas: 8"),
                   machine_type="e2-standard-2").max_workers == 8
    assert spec_of(values=seed(3), machine_type="e2-standard-8").nodes_for(15) == 3


@pytest.mark.parametrize("workers, replicas, expected", [
    ({}, None, (0, 0, 4)),  # neither: the default maximum
    ({}, 6, (0, 6, 6)),  # replicas: the initial count and the maximum
    ({"max": 8}, 6, (0, 6, 8)),  # a larger max stands
    ({"min": 2}, 6, (2, 6, 6)),
    ({"initial": 2, "max": 8}, 6, (0, 2, 8)),  # workers.initial wins, said in a note
    ({}, 0, (0, 0, 1)),
    ({"max": 3}, 6, "values.worker.replicas: 6 is above workers.max (3): raise workers.max to at least 6 or "
                    "lower values.worker.replicas"),
    ({"min": 3}, 2, "values.worker.replicas: 2 is below workers.min (3)"),
    ({"min": 5, "max": 2}, None, "workers: min (5) must be ≤ max (2)"),
])
def test_the_replicas_rule(workers, replicas, expected):
    values = {"worker": {"replicas": replicas}} if replicas is not None else {}
    if isinstance(expected, str):
        with pytest.raises(ValidationError) as e:
            spec_of(workers=workers, values=values)
        assert str(e.value).startswith(expected), str(e.value)
        return
    spec = spec_of(workers=workers, values=values)
    assert (spec.min_workers, spec.initial_workers, spec.max_workers) == expected
    if "initial" in workers:
        assert any(n.startswith("values.worker.replicas: 6 replaced by workers.initial (2)") for n in spec.notes)


HOSTILE = {
    "scheduler": {"serviceType": "NodePort", "loadBalancerIP": "1.2.3.4", "nodeSelector": {"pool": "mine"},
                  "env": [{"name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES", "value": "[]"}]},
    "webUI": {"ingress": {"enabled": True}},
    "worker": {"replicas": 2, "threads_per_worker": 8, "extraArgs": ["--name", "fixed", "--lifetime", "1h"],
               "resources": {"limits": {"cpu": 2, "memory": "6G"}, "requests": {"cpu": "100m"}},
               "nodeSelector": {"pool": "mine"}, "env": [{"name": "POD_NAME", "value": "w"}],
               "strategy": {"type": "Recreate"}},
    "additional_worker_groups": [{"name": "gpu", "replicas": 4}],
    "jupyter": {"serviceType": "LoadBalancer", "rbac": True, "serviceAccountName": "admin", "password": "sha1:abc",
                "ingress": {"enabled": True},
                "env": [{"name": "JUPYTER_TOKEN", "value": "known"}, {"name": "KEEP", "value": "me"}]},
}


def changed(user, final, path="values"):
    """Paths of what the user wrote that the final chart values no longer hold (quantities compared by value)."""
    if isinstance(user, dict):
        if not isinstance(final, dict):
            return [path]
        return [p for k, v in user.items() for p in changed(v, final.get(k), f"{path}.{k}")]
    if isinstance(user, list):
        return [] if isinstance(final, list) and all(u in final for u in user) else [path]
    leaf = path.rsplit(".", 1)[-1]
    for parse, key in ((parse_cpu, "cpu"), (parse_memory, "memory")):
        if leaf == key and final is not None:
            return [] if parse(user) == parse(final) else [path]
    return [] if user == final else [path]


@pytest.mark.parametrize("values", [HOSTILE, *(yaml.safe_load(seed(i)) for i in (1, 2, 3))],
                         ids=["hostile", "seed-1", "seed-2", "seed-3"])
def test_every_value_the_release_builder_changes_is_named_by_a_note(values):
    spec = spec_of(values=values, worker_resources={"cpu": 1, "memory": "3G"}, mixed_environment=True)
    final = build_helm_values(spec, system_pool="system", worker_pool="workers")
    fields = [note_field(n) for n in spec.notes]
    missing = [p for p in changed(values, final) if not any(p == f or p.startswith(f + ".") for f in fields)]
    assert not missing, (missing, spec.notes)
    assert len(fields) == len(set(fields))  # one note per field


def test_the_local_backend_says_what_it_does_not_run():
    spec = spec_of(LOCAL, values=seed(2))
    fields = [note_field(n) for n in spec.notes]
    # its Jupyter runs, with the workers' packages (the lab's venv): only the LoadBalancers are not used
    assert "values.jupyter" not in fields and "values.worker.env" not in fields, spec.notes
    assert any("not used (the local lab listens on 127.0.0.1)" in n for n in spec.notes)
    spec = spec_of(LOCAL, values=seed(3))
    assert "values.jupyter: resources not applied by the local lab" in " ".join(spec.notes)


def test_a_request_the_controller_keeps_as_is_has_no_notes():
    values = {"worker": {"resources": {"limits": {"cpu": 1, "memory": "3G"}}, "env": [{"name": "A", "value": "b"}]},
              "scheduler": {"serviceType": "ClusterIP"}}
    assert spec_of(values=values).notes == ()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(json.loads(record.getMessage()))


def test_notes_are_logged_once_at_create_and_carried_by_lab_ready():
    clock = [1_000_000.0]
    ctl = Controller(FakeBackend(), ListEvents(), Config(backend="gke", poll_s=0, tick_budget_s=0),
                     clock=lambda: clock[0], sleep=lambda s: None)
    lines, logger = Lines(), logging.getLogger("dasklab")
    logger.addHandler(lines)
    try:
        body = {"type": "start-lab", "lab": "intro", "owner": "alice", "values": seed(1)}
        for _ in range(2):  # a duplicate says nothing again
            ctl.handle(parse_command(json.dumps(body)), "m1")
        for _ in range(10):
            clock[0] += 1
            ctl.reconcile_all("reconcile")
    finally:
        logger.removeHandler(lines)
    spec = ctl.backend.fetch_lab("intro").spec
    assert ctl.backend.fetch_lab("intro").state.phase == READY and spec.notes
    warnings = [line for line in lines.lines if line["severity"] == "WARNING"]
    assert [w["reason"] for w in warnings] == list(spec.notes)
    assert all(w["action"] == "override" and w["field"] == note_field(w["reason"]) and w["message_id"] == "m1"
               for w in warnings)
    [ready] = [e for e in ctl.events.events if e["event"] == "lab-ready"]
    assert ready["notes"] == list(spec.notes)


def test_status_and_connect_show_the_notes(home):
    from dasklab.adapters.local import LocalBackend
    spec = spec_of(LOCAL, values=seed(1))
    LocalBackend(home).apply_create(Lab(spec, LabState(phase="provisioning")))  # a record; no process is started
    env = {**os.environ, "DASKLAB_HOME": str(home), "DASKLAB_BACKEND": "local"}
    env.pop("PUBSUB_EMULATOR_HOST", None)

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "dasklab.cli", *args], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert json.loads(run("status", "--json"))[0]["notes"] == list(spec.notes)
    table, connect = run("status"), run("connect", "intro")
    for note in spec.notes:
        assert f"intro: note: {note}" in table and f"note: {note}" in connect
    assert json.loads(run("connect", "intro", "--json"))["notes"] == list(spec.notes)


def test_the_cli_says_the_notes_before_it_sends(home):
    env = {**os.environ, "DASKLAB_HOME": str(home), "DASKLAB_BACKEND": "local"}
    env.pop("PUBSUB_EMULATOR_HOST", None)
    out = subprocess.run([sys.executable, "-m", "dasklab.cli", "start-lab", "--lab", "intro", "--values",
                          str(EXAMPLES / "seed-1.yaml")], env=env, capture_output=True, text=True, timeout=60)
    assert "note: values.jupyter.serviceType: LoadBalancer not used" in out.stderr
    assert out.returncode == 2 and "dasklab local serve" in out.stderr  # no controller runs here
