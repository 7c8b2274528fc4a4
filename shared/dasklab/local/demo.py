"""`dasklab demo`: the whole lab story on real Dask through the real entry point, printed as a timeline."""

import json
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from dasklab.adapters import procs
from dasklab.adapters.local import LocalBackend
from dasklab.core.model import READY
from dasklab.local.serve import LocalController, follow_log

LAB = "demo"
TASKS, TASK_SECONDS = 120, 0.5
SETTINGS = {"DASKLAB_POLL_S": 1, "DASKLAB_CONFIRM_S": 4, "DASKLAB_COOLDOWN_S": 2}
START = {"v": 1, "type": "start-lab", "lab": LAB, "owner": "demo", "workers": {"initial": 1, "min": 1, "max": 6},
         "machine_type": "e2-standard-4", "idle_timeout": "10s", "max_lifetime": "1h"}
SHOWN = {"create", "provision", "install", "mark-ready", "scale-up", "scale-down", "retire", "teardown", "delete",
         "forget", "mark-failed", "refused", "update", "rollout-start", "rollout-retire", "jupyter-restart", "updated"}
EXTRA = "inflection"  # a small pure-Python package the base environment lacks: the update adds it
UPDATE = {"v": 1, "type": "update-lab", "lab": LAB,
          "values": {c: {"env": [{"name": "EXTRA_PIP_PACKAGES", "value": EXTRA}]} for c in ("jupyter", "worker")}}


def _uses_the_package(word: str) -> str:
    import importlib
    return importlib.import_module(EXTRA).camelize(word)  # only in the lab's environment after the update


def _slow_square(x: int) -> int:
    time.sleep(TASK_SECONDS)
    return x * x


class Timeline:
    """Prints timestamped events (ours and the controller's decisions, tailed from its log)."""

    def __init__(self, json_lines: bool):
        self.t0, self.json_lines = time.monotonic(), json_lines
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
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
        follow_log(log, stop, self._decision)

    def _decision(self, entry: dict) -> None:
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


class Watch:
    """What the demo reads from the lab while it waits (the same records and dashboard the controller uses)."""

    def __init__(self, backend: LocalBackend):
        self.backend = backend

    def lab(self):
        return self.backend.fetch_lab(LAB)

    def load(self):
        lab = self.lab()
        return self.backend.dashboard(lab).fetch_load() if lab and lab.state.phase == READY else None

    def phase(self) -> str:
        lab = self.lab()
        return lab.state.phase if lab else "gone"

    def workers(self) -> str:
        load = self.load()
        return f"(workers {load.workers}, processing {load.processing}, queued {load.queued})" if load else ""

    def idle_for(self) -> float:
        load = self.load()
        return time.time() - load.idle_since if load and load.idle_since and load.clients == 0 else 0.0


def run_demo(json_lines: bool = False) -> int:
    from distributed import Client

    timeline = Timeline(json_lines)
    home = Path(tempfile.mkdtemp(prefix="dasklab-demo-"))
    backend = LocalBackend(home)
    watch = Watch(backend)
    stop_tail = threading.Event()
    ctl = LocalController(home, settings=SETTINGS)
    pids: list[int] = []
    ok = lost = False
    try:
        ctl.start()
        pids += [ctl.server.proc.pid] + ([ctl.emulator.proc.pid] if ctl.emulator else [])
        threading.Thread(target=timeline.follow, args=(ctl.functions_log, stop_tail), daemon=True).start()
        timeline.say("demo", f"local controller up: bus = {ctl.bus}; functions-framework at {ctl.server.url}")
        mid = ctl.publish(START)
        timeline.say("demo", f"start-lab published (message {mid}): 1 worker, min 1, max 6, idle timeout 10s")
        _wait("waiting for the lab to be ready", lambda: watch.phase() == READY, timeline, 60,
              lambda: f"(phase {watch.phase()})")
        lab = watch.lab()
        info = backend.connection_info(lab)
        pids += backend.pids(lab)
        timeline.say("demo", f"lab ready: dashboard {info['dashboard']}, scheduler {info['scheduler']}"
                             + (f", Jupyter {info['jupyter']}" if info.get("jupyter") else ""))

        with Client(info["scheduler"], timeout=20) as client:
            futures = client.map(_slow_square, range(TASKS), pure=False)
            timeline.say("demo", f"workload started: {TASKS} tasks × {TASK_SECONDS}s of sleep")
            _wait("running", lambda: all(f.done() for f in futures), timeline, 120, watch.workers)
            pids += backend.pids(watch.lab())
            timeline.say("demo", f"workload done; {TASKS} results held in worker memory while the lab scales down")
            _wait("waiting for graceful scale-down to the minimum",
                  lambda: watch.lab().state.target_workers == 1 and backend.fetch_requested(watch.lab()) == 1,
                  timeline, 90, watch.workers)
            total, expected = sum(client.gather(futures)), sum(x * x for x in range(TASKS))
            lost = total != expected
            timeline.say("demo", f"results gathered after scale-down: sum {total} (expected {expected}); "
                                 f"{TASKS if lost else 0} lost")
            before = {w.name for w in backend.dashboard(watch.lab()).fetch_workers()}
            mid = ctl.publish(UPDATE)
            timeline.say("demo", f"update-lab published (message {mid}): EXTRA_PIP_PACKAGES={EXTRA} for jupyter and "
                                 f"worker; the results stay in worker memory")
            _wait("waiting for the workers to be replaced", lambda: watch.lab().state.revision == 2, timeline, 90,
                  watch.workers)
            pids += backend.pids(watch.lab())
            after = {w.name for w in backend.dashboard(watch.lab()).fetch_workers()}
            jupyter = backend.connection_info(watch.lab()).get("jupyter")
            timeline.say("demo", f"lab at revision 2: workers {', '.join(sorted(before))} replaced by "
                                 f"{', '.join(sorted(after))}" + (
                                     f"; Jupyter still at {jupyter}"
                                     if jupyter and jupyter == info.get("jupyter") else ""))
            total = sum(client.gather(futures))
            lost = lost or total != expected or bool(before & after)
            camel = client.submit(_uses_the_package, "dask_lab", pure=False).result()
            timeline.say("demo", f"results gathered after the update: sum {total} (expected {expected}); "
                                 f"{TASKS if total != expected else 0} lost; {EXTRA} on a worker: "
                                 f"camelize('dask_lab') = {camel}")
            client.cancel(futures)
        timeline.say("demo", "client disconnected; the lab is now idle")
        _wait("waiting for the idle timeout (10s)", lambda: watch.idle_for() >= 10, timeline, 60,
              lambda: f"(idle for {watch.idle_for():.0f}s)")
        mid = ctl.run_job("dasklab-teardown-idle")
        timeline.say("timer", f"teardown-idle job fired (message {mid})")
        _wait("waiting for the lab to be deleted", lambda: watch.lab() is None, timeline, 60)
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
    return 0 if not left and not lost else 1
