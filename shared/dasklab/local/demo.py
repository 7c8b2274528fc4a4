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
SHOWN = frozenset({"create", "provision", "install", "mark-ready", "scale-up", "scale-down", "retire", "teardown",
                   "delete", "forget", "mark-failed", "refused", "update", "rollout-start", "rollout-retire",
                   "jupyter-restart", "updated"})
EXTRA = "inflection"  # a small pure-Python package the base environment lacks: the update adds it
UPDATE = {"v": 1, "type": "update-lab", "lab": LAB,
          "values": {c: {"env": [{"name": "EXTRA_PIP_PACKAGES", "value": EXTRA}]} for c in ("jupyter", "worker")}}


def _uses_the_package(word: str) -> str:
    import importlib
    return importlib.import_module(EXTRA).camelize(word)  # only in the lab's environment after the update


class Heartbeat:
    """A short task every 2 s, as a notebook that goes on working would send: the scale-down and update stretches
    are not idle time, so the minute tick's idle check (10 s timeout) never ends the lab in the middle of the story."""

    def __init__(self, client):
        self.client, self.stop = client, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        from distributed import fire_and_forget
        while not self.stop.wait(2.0):
            fire_and_forget(self.client.submit(time.sleep, 0.2, pure=False))

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _slow_square(x: int) -> int:
    time.sleep(TASK_SECONDS)
    return x * x


class Timeline:
    """Prints timestamped events (ours and the controller's decisions, tailed from its log). With `labs`, each line
    names its lab (the class demo has several)."""

    def __init__(self, json_lines: bool, shown: frozenset | set = SHOWN, labs: bool = False):
        self.t0, self.json_lines, self.shown, self.labs = time.monotonic(), json_lines, shown, labs
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        self.lock = threading.Lock()
        self.seen: list[dict] = []  # the controller's decisions shown so far (with their time)

    def say(self, source: str, what: str, **fields) -> float:
        t = round(time.monotonic() - self.t0, 1)
        with self.lock:
            if self.json_lines:
                print(json.dumps({"t": t, "source": source, "event": what, **fields}), flush=True)
            else:
                extra = f"  [dim]{fields['reason']}[/dim]" if fields.get("reason") else ""
                lab = f"{fields.get('lab') or '':<12} " if self.labs else ""
                self.console.print(f"[bold]+{t:5.1f}s[/bold]  {source:<10} {lab}{what}{extra}")
        return t

    def follow(self, log: Path, stop: threading.Event) -> None:
        """Tail the controller's log and show its decisions."""
        follow_log(log, stop, self._decision)

    def _decision(self, entry: dict) -> None:
        if entry.get("action") in self.shown:
            change = f" {entry['from']} → {entry['to']}" if "from" in entry and "to" in entry else ""
            t = self.say("controller", f"{entry['action']}{change}", reason=entry.get("reason"), lab=entry.get("lab"))
            self.seen.append({**entry, "t": t})

    def table(self, title: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        """A table under the last line (text only: in JSON lines the rows are in that line's fields)."""
        if self.json_lines:
            return
        from rich.table import Table
        table = Table(title=title)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*(("-" if v is None else str(v)) for v in row))
        with self.lock:
            self.console.print(table)


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
    """What the demo reads from a lab while it waits (the same records and dashboard the controller uses)."""

    def __init__(self, backend: LocalBackend, name: str = LAB):
        self.backend, self.name = backend, name

    def lab(self):
        return self.backend.fetch_lab(self.name)

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
        """Idle as the idle teardown counts it: no task and no client, since it became idle or ready (the later)."""
        lab, load = self.lab(), self.load()
        if not (lab and load and load.idle_since and load.clients == 0):
            return 0.0
        return time.time() - max(load.idle_since, lab.state.ready_at or 0.0)


class DemoRun:
    """Startup and cleanup shared by the demos: the local controller, its log tailed into the timeline, the process
    ids seen (none may be left), the home removed on success and kept (for its logs) on failure."""

    def __init__(self, timeline: Timeline, prefix: str = "dasklab-demo-"):
        self.timeline = timeline
        self.home = Path(tempfile.mkdtemp(prefix=prefix))
        self.backend = LocalBackend(self.home)
        self.ctl = LocalController(self.home, settings=SETTINGS)
        self.stop_tail = threading.Event()
        self.pids: list[int] = []
        self.left: list[int] = []

    def __enter__(self) -> "DemoRun":
        try:
            self.ctl.start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.pids += [self.ctl.server.proc.pid, self.ctl.ticks_server.proc.pid] + (
            [self.ctl.emulator.proc.pid] if self.ctl.emulator else [])
        for log in (self.ctl.functions_log, self.ctl.ticks_log):  # commands' decisions, ticks' decisions
            threading.Thread(target=self.timeline.follow, args=(log, self.stop_tail), daemon=True).start()
        self.timeline.say("demo", f"local controller up: bus = {self.ctl.bus}; functions-framework at "
                                  f"{self.ctl.server.url}")
        return self

    def track(self, lab) -> None:
        """Remember a lab's process ids, to check at the end that none is left."""
        if lab is not None:
            self.pids += self.backend.pids(lab)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.ctl.stop()
        self.stop_tail.set()
        if exc_type is None:
            shutil.rmtree(self.home, ignore_errors=True)
        else:
            print(f"demo failed: logs kept in {self.home}/logs and {self.home}/labs", file=sys.stderr)
        self.left = [p for p in self.pids if procs.pid_alive(p)]
        self.timeline.say("demo", f"controller stopped; processes left: {len(self.left)}")


def run_demo(json_lines: bool = False) -> int:
    from distributed import Client

    timeline = Timeline(json_lines)
    lost = False
    with DemoRun(timeline) as run:
        ctl, backend, watch = run.ctl, run.backend, Watch(run.backend)
        mid = ctl.publish(START)
        timeline.say("demo", f"start-lab published (message {mid}): 1 worker, min 1, max 6, idle timeout 10s")
        _wait("waiting for the lab to be ready", lambda: watch.phase() == READY, timeline, 60,
              lambda: f"(phase {watch.phase()})")
        lab = watch.lab()
        info = backend.connection_info(lab)
        run.track(lab)
        timeline.say("demo", f"lab ready: dashboard {info['dashboard']}, scheduler {info['scheduler']}"
                             + (f", Jupyter {info['jupyter']}" if info.get("jupyter") else ""))

        with Client(info["scheduler"], timeout=20) as client:
            futures = client.map(_slow_square, range(TASKS), pure=False)
            timeline.say("demo", f"workload started: {TASKS} tasks × {TASK_SECONDS}s of sleep")
            _wait("running", lambda: all(f.done() for f in futures), timeline, 120, watch.workers)
            run.track(watch.lab())
            timeline.say("demo", f"workload done; {TASKS} results held in worker memory while the lab scales down "
                                 "(a 0.2s task every 2s meanwhile, as a notebook still in use)")
            with Heartbeat(client):
                _wait("waiting for graceful scale-down to the minimum", lambda: watch.lab().state.target_workers == 1
                      and backend.fetch_requested(watch.lab()) == 1, timeline, 90, watch.workers)
                total, expected = sum(client.gather(futures)), sum(x * x for x in range(TASKS))
                lost = total != expected
                timeline.say("demo", f"results gathered after scale-down: sum {total} (expected {expected}); "
                                     f"{TASKS if lost else 0} lost")
                before = {w.name for w in backend.dashboard(watch.lab()).fetch_workers()}
                mid = ctl.publish(UPDATE)
                timeline.say("demo", f"update-lab published (message {mid}): EXTRA_PIP_PACKAGES={EXTRA} for "
                                     "jupyter and worker; the results stay in worker memory")
                _wait("waiting for the workers to be replaced", lambda: watch.lab().state.revision == 2, timeline,
                      90, watch.workers)
                run.track(watch.lab())
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
    return 0 if not run.left and not lost else 1
