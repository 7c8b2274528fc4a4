"""`dasklab demo --json` end to end: real Dask, the Pub/Sub emulator, the functions-framework server."""

import json
import os
import sys

import pytest

from tests.conftest import run_to_end

pytestmark = pytest.mark.slow  # the slow tier: `pytest -m slow` (.ci/run runs both tiers)


def test_demo_tells_the_whole_story():
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    out = run_to_end([sys.executable, "-m", "dasklab.cli", "demo", "--json"], timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    timeline = [json.loads(line) for line in out.stdout.splitlines()]
    events = [e["event"] for e in timeline]

    def at(prefix: str) -> float:
        return next(e["t"] for e in timeline if e["event"].startswith(prefix))

    assert "bus = Pub/Sub emulator" in events[0]
    # the demo's own events, and the controller's decisions that are seconds apart from them (the controller's
    # lines are tailed from its log, so near-simultaneous ones may print a fraction of a second late)
    order = ["start-lab published", "lab ready", "workload started", "scale-up 1 → ", "workload done", "scale-down",
             "results gathered after scale-down", "update-lab published", "update 1 → 2", "lab at revision 2",
             "results gathered after the update", "teardown-idle job fired", "lab deleted", "controller stopped"]
    times = [at(p) for p in order]
    assert times == sorted(times), list(zip(order, times))
    for decision in ("create gone → provisioning", "install provisioning → installing", "mark-ready installing → ready",
                     "teardown ready → tearing-down",
                     "forget tearing-down → gone"):
        assert at(decision) >= at("start-lab published")
    assert any(e.endswith("; 0 lost") for e in events)
    # the update: a package added, the workers replaced, the results kept, the package used on a worker
    after = next(e for e in events if e.startswith("results gathered after the update"))
    assert "0 lost; inflection on a worker: camelize('dask_lab') = DaskLab" in after
    replaced = next(e for e in events if e.startswith("lab at revision 2"))
    old, new = replaced.removeprefix("lab at revision 2: workers ").split(" replaced by ")
    assert not set(old.split(", ")) & set(new.split(", "))
    assert events[-1] == "controller stopped; processes left: 0"
    assert timeline[-1]["t"] < 120  # the whole story in under two minutes
