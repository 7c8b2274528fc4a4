"""`dasklab demo --class N --json` end to end: a class on real Dask, the Pub/Sub emulator, the functions-framework
server; its outcomes read from the timeline, and no process of its home left on the machine."""

import json
import os
import sys
import time

import psutil
import pytest

from dasklab import cli
from dasklab.adapters import procs
from dasklab.local.serve import LocalController

from tests.conftest import run_to_end

pytestmark = pytest.mark.slow  # the slow tier: `pytest -m slow` (.ci/run runs both tiers)

HOME_PREFIX = "dasklab-class-demo-"  # the demo's home (a temporary folder): every process it starts carries it


def _processes_of_a_class_demo() -> set[int]:
    """Processes whose command line or environment names a class demo's home (the functions server and the labs'
    processes get DASKLAB_HOME, Jupyter its root folder under it)."""
    found = set()
    for p in psutil.process_iter():
        try:
            if HOME_PREFIX in " ".join(p.cmdline()) or any(HOME_PREFIX in v for v in p.environ().values()):
                found.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_class_demo_busy_scales_idle_torn_down_kept_alive():
    n = 4  # busy, idle, kept, and one more idle one
    before = _processes_of_a_class_demo()
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    out = run_to_end([sys.executable, "-m", "dasklab.cli", "demo", "--class", str(n), "--json"], timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + "\n" + out.stderr[-2000:]
    timeline = [json.loads(line) for line in out.stdout.splitlines()]
    assert "bus = Pub/Sub emulator" in timeline[0]["event"]  # class-ready came over the status topic

    def first(prefix: str, lab: str | None = None, source: str | None = None) -> dict:
        return next(e for e in timeline if e["event"].startswith(prefix) and (lab is None or e.get("lab") == lab)
                    and (source is None or e["source"] == source))

    def decisions(lab: str) -> list[dict]:
        return [e for e in timeline if e["source"] == "controller" and e.get("lab") == lab]

    # class-ready: the connect table, a row per student, every lab ready, no token anywhere
    ready = first("class-ready:", source="demo")
    assert [r["student"] for r in ready["labs"]] == ["busy", "idle", "kept", "idle2"]
    assert all(r["phase"] == "ready" and r["scheduler"].startswith("tcp://127.0.0.1:") and
               r["jupyter"].endswith("/lab") for r in ready["labs"])
    assert "token=" not in out.stdout and not any("token" in key for r in ready["labs"] for key in r)

    # the busy lab scaled above its one initial worker, and the idle teardown kept it (it was busy)
    ups = [e for e in decisions("demo-busy") if e["event"].startswith("scale-up 1 → ")]
    assert ups and int(ups[0]["event"].rsplit(" ", 1)[1]) > 1
    fired = first("teardown-idle job fired")["t"]
    assert any(e["event"] == "keep" and e["reason"].startswith("busy:") and e["t"] >= fired
               for e in decisions("demo-busy"))

    # the idle labs torn down for idleness before the class stopped (by the teardown-idle job, or by a reconcile
    # tick that judged their idleness a moment before it: both apply plan_teardown)
    stop = first("stop-class published")["t"]
    for lab in ("demo-idle", "demo-idle2"):
        [teardown] = [e for e in decisions(lab) if e["event"] == "teardown ready → tearing-down"]
        assert teardown["reason"].startswith("idle for") and "≥ idle timeout 10s" in teardown["reason"]
        assert ready["t"] < teardown["t"] <= stop
        assert any(e["event"] == "forget tearing-down → gone" for e in decisions(lab))

    # the kept lab: kept at that teardown, still ready once the idle labs were gone, torn down only by stop-class
    assert any(e["event"] == "keep" and e["reason"].startswith("kept alive for") for e in decisions("demo-kept"))
    kept = first("demo-kept still ready", lab="demo-kept")
    assert kept["phase"] == "ready" and kept["t"] >= first("deleted for idleness")["t"]
    [teardown] = [e for e in decisions("demo-kept") if e["event"] == "teardown ready → tearing-down"]
    assert teardown["t"] >= stop and teardown["reason"] == "stop-class requested"

    # the class report: a row per student, with what each lab did
    report = {r["student"]: r for r in first("class report:")["students"]}
    assert sorted(report) == ["busy", "idle", "idle2", "kept"]
    assert all(r["phase"] == "gone" and r["node_hours"] > 0 and r["cost_usd"] > 0 for r in report.values())
    assert report["busy"]["peak_workers"] > 1 and report["busy"]["busy_s"] > 0
    assert report["idle"]["peak_workers"] == 1 and report["idle"]["busy_s"] == 0
    assert report["idle"]["reason"].startswith("idle for") and report["kept"]["reason"] == "stop-class requested"
    assert report["kept"]["lifetime_s"] > report["idle"]["lifetime_s"]

    # nothing left behind: by the demo's own count, and on the machine
    assert first("controller stopped")["event"] == "controller stopped; processes left: 0"
    assert _processes_of_a_class_demo() - before == set()


def test_class_demo_refuses_a_bad_size(capsys):
    for bad in ("0", "9", "-1"):
        assert cli.main(["demo", "--class", bad]) == 2
        assert f"--class: {bad} student(s): give 1 to 8" in capsys.readouterr().err


@pytest.mark.parametrize("emulator", [False, True], ids=["direct-push", "emulator"])
def test_the_local_controller_hands_each_status_event_over_once(tmp_path, emulator):
    """What the class demo waits on: the status events, from the status file (direct push) or pulled from the
    emulator's status subscription; each one once."""
    env_before = os.environ.get("PUBSUB_EMULATOR_HOST")
    with LocalController(tmp_path, emulator=emulator, fire_timers=False) as ctl:
        pids = [ctl.server.proc.pid, ctl.ticks_server.proc.pid] + ([ctl.emulator.proc.pid] if ctl.emulator else [])
        mid = ctl.publish({"v": 1, "type": "stop-lab", "lab": "nosuch"})
        got, deadline = [], time.time() + 60
        while not got and time.time() < deadline:
            got = [e for e in ctl.fetch_events() if e.get("message_id") == mid]
            time.sleep(0.2)
        assert [(e["event"], e["outcome"], e["reason"]) for e in got] == \
            [("command-outcome", "nothing-to-do", "no lab named nosuch")]
        assert [e for e in ctl.fetch_events() if e.get("message_id") == mid] == []
    assert not any(procs.pid_alive(p) for p in pids) and os.environ.get("PUBSUB_EMULATOR_HOST") == env_before
