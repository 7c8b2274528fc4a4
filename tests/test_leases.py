"""One actor per lab (issue 20): two controllers in two processes reconcile one fleet of real local labs (records in
files, real Dask under nannies) at once; each decision to retire workers is acted on once, by one of them."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dasklab.core.errors import ConflictError
from tests.conftest import cmd, drive

pytestmark = pytest.mark.slow  # the slow tier: `pytest -m slow` (.ci/run runs both tiers)

RACER = """
import logging, sys, time
from pathlib import Path
from dasklab.adapters.local import LocalBackend
from dasklab.adapters.files import FileEvents
from dasklab.core.reconcile import Controller
from tests.conftest import FAST

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
home = Path(sys.argv[1])
ctl = Controller(LocalBackend(home), FileEvents(home / "status.jsonl"), FAST)
print("started", flush=True)
while not (home / "stop-racers").exists():  # a reconcile tick's passes, as the polling loop runs them
    ctl.reconcile_all("reconcile")
    time.sleep(0.05)
"""

ROOT = Path(__file__).resolve().parents[1]


def workers(backend, name="race") -> int:
    return backend.dashboard(backend.fetch_lab(name)).fetch_load().workers


def record_pin(backend, pin: int) -> None:
    """The owner's pin, recorded as scale records it (compare-and-swap; a racer's write in between: again)."""
    for _ in range(50):
        try:
            backend.apply_record(backend.fetch_lab("race").with_spec(pinned_workers=pin))
            return
        except ConflictError:
            time.sleep(0.05)
    raise AssertionError("the pin could not be recorded")


def test_two_controller_processes_never_act_twice_on_one_decision(controller, home):
    ctl, backend = controller, controller.backend
    ctl.handle(cmd(type="start-lab", lab="race", owner="alice", workers={"initial": 4, "min": 0, "max": 4},
                   idle_timeout="1h", max_lifetime="1h", values={"jupyter": {"enabled": False}}), "m1")
    drive(ctl, lambda: (lab := backend.fetch_lab("race")) and lab.state.phase == "ready" and workers(backend) == 4)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(home)], stdout=subprocess.PIPE, text=True,
                               cwd=ROOT) for _ in range(2)]
    try:
        assert all(r.stdout.readline().strip() == "started" for r in racers)
        cycles = 3
        for _ in range(cycles):  # a pin recorded (as scale does), its act left to the racing controllers
            for pin, want in ((1, 1), (4, 4)):
                record_pin(backend, pin)
                deadline = time.monotonic() + 60
                while workers(backend) != want or len(backend.pids(backend.fetch_lab("race"))) != want + 1:
                    assert time.monotonic() < deadline, f"pin {pin} not reached"
                    time.sleep(0.1)
    finally:
        (home / "stop-racers").touch()
        logs = [r.communicate(timeout=60)[0] for r in racers]
    lines = [(i, json.loads(line)) for i, log in enumerate(logs) for line in log.splitlines()
             if line.startswith("{")]
    retires = [(i, entry) for i, entry in lines if entry.get("action") == "retire"]
    # three decisions to go from 4 to 1 worker: three acts in all, each retiring 3 workers, by either racer
    assert len(retires) == cycles, [entry["reason"] for _, entry in retires]
    assert all(len(entry["workers"]) == 3 for _, entry in retires)
    assert {i for i, _ in lines if _.get("action") in ("retire", "scale-up", "scale-down")} <= {0, 1}
    held = [entry for _, entry in lines if "being acted on by" in entry.get("reason", "")]
    assert held, "the racers never met: the test proves nothing"
    final = backend.fetch_lab("race").state
    assert final.lease_holder == "" and final.target_workers == 4
