"""The seed's three config.yaml files, verbatim, through the controller: as start-lab values on the GKE world (the
real clients, the chart rendered, real Dask workers) they give labs of 4, 4 and 15 workers, every override said;
as update-lab values they move one lab along the seed's steps 4 and 6."""

import json
from pathlib import Path

import pytest
import yaml
from dasklab.adapters.gke import place_of
from dasklab.core.config import Config
from dasklab.core.errors import ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.model import READY
from dasklab.core.overrides import note_field
from dasklab.core.reconcile import Controller

from tests.fakes import FakeBackend, ListEvents
from tests.gke_world import LOCATION, PROJECT
from tests.test_gke import controller, drive, handle, lab_of, phase, workers, world  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # the slow tier: `pytest -m slow` (.ci/run runs both tiers)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAID = {"values.scheduler.serviceType", "values.jupyter.serviceType", "values.jupyter.password",
        "values.worker.replicas"}  # what every seed file asks that the controller replaces or sizes


def seed(i: int) -> str:
    return (EXAMPLES / f"seed-{i}.yaml").read_text()


def pip_env(container: dict) -> str | None:
    return next((e["value"] for e in container.get("env") or () if e["name"] == "EXTRA_PIP_PACKAGES"), None)


@pytest.mark.parametrize("i, count, nodes", [(1, 4, 2), (2, 4, 2), (3, 15, 5)], ids=["seed-1", "seed-2", "seed-3"])
def test_each_seed_file_verbatim_gives_its_lab_on_gke(world, controller, i, count, nodes):
    ctl, ns = controller, place_of("lab1").namespace
    handle(ctl, parse_command(json.dumps({"v": 1, "type": "start-lab", "lab": "lab1", "owner": "alice",
                                          "values": seed(i)})))
    drive(ctl, world, lambda: phase(ctl) == READY and workers(ctl) == count, timeout=240)
    lab = lab_of(ctl)
    assert (lab.spec.initial_workers, lab.spec.max_workers, lab.spec.mixed_environment) == (count, count, False)
    cluster = f"projects/{PROJECT}/locations/{LOCATION}/clusters/lab1"
    assert world.gke.node_count(cluster, "workers") == nodes  # 3 workers of 1 CPU / 3 GB per e2-standard-4
    # the LoadBalancers asked for are ClusterIP, and said; so is every other override
    assert {s["spec"]["type"] for s in world.kube.list("services", ns)} == {"ClusterIP"}
    [ready] = [e for e in ctl.events.published if e["event"] == "lab-ready"]
    assert ready["notes"] == list(lab.spec.notes) and SAID <= {note_field(n) for n in lab.spec.notes}
    # the packages each component asked for are what its pods run, as written
    pods = {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"]["template"]["spec"]["containers"][0]
            for d in world.kube.list("deployments", ns) if d["metadata"]["labels"].get("chart")}
    values = yaml.safe_load(seed(i))
    for component in ("jupyter", "scheduler", "worker"):
        asked = (values.get(component) or {}).get("env")
        assert pip_env(pods[component]) == (asked[0]["value"] if asked else None), component
    if i == 3:  # Jupyter's matplotlib, which the workers lack: accepted, and how to add it is said
        note = next(n for n in lab.spec.notes if note_field(n) == "values.jupyter.env.EXTRA_PIP_PACKAGES")
        assert '--lab lab1 --values FILE` with the same values but worker.env EXTRA_PIP_PACKAGES: "pyarrow gcsfs ' \
               'matplotlib"' in note
        assert pods["worker"]["resources"]["limits"] == {"cpu": "1", "memory": str(3 * 10**9)}


def test_the_seed_files_as_update_lab_walk_one_lab_through_steps_4_and_6():
    """start-lab seed-1 (4 workers), update-lab seed-2 (packages: the workers replaced), update-lab seed-3 (refused
    until restart: true, as it gives the scheduler resources; then 15 workers at most, the matplotlib note), and
    update-lab seed-1 back (at most 4 again): each file verbatim, each revision's notes in its lab-updated."""
    clock = [1_000_000.0]
    ctl = Controller(FakeBackend(), ListEvents(), Config(backend="gke", project="p", poll_s=0, tick_budget_s=0),
                     clock=lambda: clock[0], sleep=lambda s: None)

    def send(mid, **kw):
        return ctl.handle(parse_command(json.dumps({"v": 1, "lab": "x", **kw})), mid)

    def settle():
        for _ in range(12):
            clock[0] += 1
            ctl.reconcile_all("reconcile")
        return ctl.backend.fetch_lab("x")

    send("m1", type="start-lab", owner="alice", values=seed(1))
    lab = settle()
    assert lab.state.phase == READY and (lab.spec.max_workers, lab.state.target_workers) == (4, 4)
    send("m2", type="update-lab", values=seed(2))
    lab = settle()
    assert (lab.spec.revision, lab.state.revision, lab.spec.max_workers) == (2, 2, 4)
    assert any(n.startswith("values.scheduler.env: no gcsfs pyarrow on the scheduler") for n in lab.spec.notes)
    with pytest.raises(ValidationError) as e:
        send("m3", type="update-lab", values=seed(3))
    assert e.value.field == "restart" and "values.scheduler.resources" in e.value.rule
    send("m4", type="update-lab", values=seed(3), restart=True)
    lab = settle()
    assert (lab.spec.revision, lab.state.revision, lab.spec.max_workers) == (3, 3, 15)
    assert (lab.spec.worker_cpu, lab.spec.worker_memory, lab.spec.mixed_environment) == (1.0, 3 * 10**9, False)
    fields = {note_field(n) for n in lab.spec.notes}
    assert {"values.worker.replicas", "values.jupyter.env.EXTRA_PIP_PACKAGES", "values.scheduler.env"} <= fields
    send("m5", type="update-lab", values=seed(1), restart=True)
    lab = settle()
    assert (lab.spec.revision, lab.spec.max_workers) == (4, 4) and lab.state.target_workers <= 4
    updated = [e for e in ctl.events.events if e["event"] == "lab-updated"]
    assert [e["revision"] for e in updated] == [2, 3, 4]
    for event in updated:  # each update's overrides said again, as at start-lab (replicas: by build_update)
        assert SAID - {"values.worker.replicas"} <= {note_field(n) for n in event["notes"]}, event["notes"]
    assert "values.worker.replicas" in {note_field(n) for n in updated[1]["notes"]}


NOTEBOOK = """
import seedonly

def imports_inside(x):
    import seedonly as module
    return module.double(x)

def uses_the_top_import(x):
    return seedonly.double(x)
"""


def test_the_scheduler_unpickles_graphs_the_fact_its_note_rests_on(tmp_path, monkeypatch):
    """Why a package the workers have and the scheduler lacks is said in a note: distributed's scheduler deserializes
    every submitted graph (Scheduler.update_graph), so a graph naming a module it lacks is refused at submission
    with its "different environments" error, before anything runs, while a task that imports the module inside its
    function runs. Real scheduler and worker processes; the module is on the notebook's and the worker's path only;
    the functions are a notebook's (defined in __main__, so pickled by value)."""
    import os
    import sys

    from dasklab.adapters.local import start_scheduler
    from dasklab.adapters.procs import spawn, stop_pid_group
    from distributed import Client

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "seedonly.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    notebook = {"__name__": "__main__"}
    exec(NOTEBOOK, notebook)  # noqa: S102 - the test's own text
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # distributed is installed: nothing else needed
    started = start_scheduler(["--no-dashboard"], file=tmp_path / "s.json", env=env, log_path=tmp_path / "s.log")
    assert started, (tmp_path / "s.log").read_text()
    pid, info = started
    worker = None
    try:
        worker = spawn([sys.executable, "-m", "distributed.cli.dask_worker", info["address"], "--nthreads", "1",
                        "--no-dashboard", "--host", "127.0.0.1"], env={**env, "PYTHONPATH": str(tmp_path / "pkg")},
                       log_path=tmp_path / "w.log")
        with Client(info["address"], timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            assert client.submit(notebook["imports_inside"], 4, pure=False).result(timeout=60) == 8
            for named in (notebook["uses_the_top_import"], notebook["seedonly"].double):
                with pytest.raises(RuntimeError, match="Error during deserialization of the task graph"):
                    client.submit(named, 2, pure=False).result(timeout=60)
        assert "No module named 'seedonly'" in (tmp_path / "s.log").read_text()
    finally:
        for p in (worker, pid):
            if p:
                stop_pid_group(p)
