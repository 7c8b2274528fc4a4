"""`dasklab demo`: the whole lab story on real Dask through the real entry point, printed as a timeline."""

import json
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from .adapters import procs
from .adapters.local import LocalBackend
from .model import READY
from .serve import LocalController

LAB = "demo"
TASKS, TASK_SECONDS = 120, 0.5
SETTINGS = {"DASKLAB_POLL_S": 1, "DASKLAB_CONFIRM_S": 4, "DASKLAB_COOLDOWN_S": 2, "DASKLAB_TICK_BUDGET_S": 170}
START = {"v": 1, "type": "start-lab", "lab": LAB, "owner": "demo", "workers": {"initial": 1, "min": 1, "max": 6},
         "machine_type": "e2-standard-4", "idle_timeout": "10s", "max_lifetime": "1h"}
SHOWN = {"create", "provision", "install", "mark-ready", "scale-up", "scale-down", "retire", "teardown", "delete",
         "forget", "mark-failed", "refused"}


def _slow_square(x: int) -> int:
    time.sleep(TASK_SECONDS)
    return x * x


class Timeline:
    """Prints timestamped events (ours and the controller's decisions, tailed from its log)."""

    def __init__(self, json_lines: bool):
        self.t0, self.json_lines = time.monotonic(), json_lines
        self.console = Console(highlight=False)
        self.lock = threading.Lock()

    def say(self, source: str, what: str, **fields) -> None:
        t = round(time.monotonic() - self.t0, 1)
        with self.lock:
            if self.json_lines:
                print(json.dumps({"t": t, "source": source, "event": what, **fields}), flush=True)
            else:
                extra = f"  [dim]{fields['reason']}[/dim]" if fields.get("reason") else ""
                self.console.print(f"[bold]+{t:5.1f}s[/bold]  {source:<10} {what}{extra}")

    def follow(self, log: Path, stop: threading.Event) -> None:
        """Tail the controller's log and show its decisions."""
        offset = 0
        while not stop.is_set():
            if log.exists():
                with open(log) as f:
                    f.seek(offset)
                    for line in f:
                        if line.startswith("{"):
                            self._decision(line)
                    offset = f.tell()
            stop.wait(0.2)

    def _decision(self, line: str) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            return
        if entry.get("action") in SHOWN:
            change = f" {entry['from']} → {entry['to']}" if "from" in entry and "to" in entry else ""
            self.say("controller", f"{entry['action']}{change}", reason=entry.get("reason"))


def _wait(what: str, check, timeline: Timeline, timeout: float, progress=lambda: "") -> object:
    """Poll `check` with a visible progress line until it returns something truthy."""
    deadline = time.monotonic() + timeout
    with timeline.console.status(what) as status:
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            status.update(f"{what} {progress()}")
            time.sleep(0.25)
    raise TimeoutError(f"demo: {what} did not happen within {timeout:.0f}s")


def run_demo(json_lines: bool = False) -> int:
    from distributed import Client

    timeline = Timeline(json_lines)
    home = Path(tempfile.mkdtemp(prefix="dasklab-demo-"))
    backend = LocalBackend(home)
    stop_tail = threading.Event()
    ctl = LocalController(home, settings=SETTINGS)
    pids: list[int] = []
    ok = False

    def lab():
        return backend.fetch_lab(LAB)

    def load():
        current = lab()
        return backend.dashboard(current).fetch_load() if current and current.state.phase == READY else None

    try:
        ctl.start()
        pids += [ctl.server.proc.pid] + ([ctl.emulator.proc.pid] if ctl.emulator else [])
        tail = threading.Thread(target=timeline.follow, args=(ctl.functions_log, stop_tail), daemon=True)
        tail.start()
        timeline.say("demo", f"local controller up: bus = {ctl.bus}; functions-framework at {ctl.server.url}")
        mid = ctl.publish(START)
        timeline.say("demo", f"start-lab published (message {mid}): 1 worker, min 1, max 6, idle timeout 10s")
        ready = _wait("waiting for the lab to be ready", lambda: (l := lab()) and l.state.phase == READY and l,
                      timeline, 60, lambda: f"(phase {getattr(lab(), 'state', None) and lab().state.phase})")
        info = backend.connection_info(ready)
        pids += backend.pids(ready)
        timeline.say("demo", f"lab ready: dashboard {info['dashboard']}, scheduler {info['scheduler']}")

        with Client(info["scheduler"], timeout=20) as client:
            futures = client.map(_slow_square, range(TASKS), pure=False)
            timeline.say("demo", f"workload started: {TASKS} tasks × {TASK_SECONDS}s of sleep")
            _wait("running", lambda: all(f.done() for f in futures), timeline, 120,
                  lambda: f"(workers {(l := load()) and l.workers}, processing {l and l.processing}, "
                          f"queued {l and l.queued})")
            pids += backend.pids(lab())
            timeline.say("demo", f"workload done; {TASKS} results held in worker memory while the lab scales down")
            _wait("waiting for graceful scale-down to the minimum",
                  lambda: (l := load()) and l.workers == 1 and lab().state.target_workers == 1, timeline, 90,
                  lambda: f"(workers {(l := load()) and l.workers})")
            total = sum(client.gather(futures))
            expected = sum(x * x for x in range(TASKS))
            lost = 0 if total == expected else TASKS
            timeline.say("demo", f"results gathered after scale-down: sum {total} (expected {expected}); "
                                 f"{lost} lost")
            del futures
        timeline.say("demo", "client disconnected; the lab is now idle")
        _wait("waiting for the idle timeout (10s)",
              lambda: (l := load()) and l.idle_since and time.time() - l.idle_since >= 10 and l.clients == 0,
              timeline, 60, lambda: f"(idle since {(l := load()) and l.idle_since and round(time.time() - l.idle_since)}s)")
        mid = ctl.run_job("dasklab-teardown-idle")
        timeline.say("timer", f"teardown-idle job fired (message {mid})")
        _wait("waiting for the lab to be deleted", lambda: lab() is None, timeline, 60)
        timeline.say("demo", "lab deleted")
        ok = True
    finally:
        ctl.stop()
        stop_tail.set()
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"demo failed: logs kept in {home}/logs and {home}/labs", file=sys.stderr)
    left = [p for p in pids if procs.pid_alive(p)]
    timeline.say("demo", f"controller stopped; processes left: {len(left)}")
    return 0 if not left and lost == 0 else 1
