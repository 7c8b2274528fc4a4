"""Autoscaling: one seeded, bursty workload on real local Dask, run three ways in one invocation.

  static    a scheduler and `max` worker processes the whole time (the local backend, min = max)
  adaptive  distributed's own `Adaptive` in-process: LocalCluster(processes=True) + cluster.adapt(min, max),
            its defaults (interval 1 s, wait_count 3, target_duration 5 s) — the anchor to meet and beat
  dasklab   dasklab's controller on the local backend, polling the dashboard API in a reconcile tick loop

The workload is closed-loop, like a person at a notebook: submit a burst of sleep tasks, wait for its results,
pause, submit the next. Every result stays held (in worker memory) until the end, after the last scale-down,
when each phase's results are gathered and checked against their known values (a lost or recomputed-wrong
result counts as lost). The same sampler reads the scheduler's worker and task counts every 0.25 s (by
`run_on_scheduler`; /json/counts.json has no count of queued tasks) for all three runs.

Run:  python benchmarks/autoscale.py                      # the three runs, the table, docs/autoscale.png
      python benchmarks/autoscale.py --params confirm_s=6,cooldown_s=0,down_fraction=1
      python benchmarks/autoscale.py --sweep               # static + adaptive once, then dasklab per setting
      python benchmarks/autoscale.py --sweep "confirm_s=4,cooldown_s=0" "confirm_s=8,down_fraction=1"
      (a key left out takes DEFAULT_PARAMS' value; exit 0 unless a result is lost or a process is left behind;
      Ctrl-C or SIGTERM stops every process started and exits 130 / 143)

Goals: makespan ≤ 1.10× static, worker-seconds ≤ 0.55× static; against Adaptive, worker-seconds ≤ 1.0× at a
makespan ≤ 1.05×. Worker-seconds are integrated over the run (first submit → last result) from the sampled
count of workers the scheduler knows (joined workers; starting ones are not counted, for any mode).

Keep the module's top level light: LocalCluster's nannies start workers with multiprocessing "spawn", which
imports this file again in every worker process of the Adaptive run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLOT = REPO / "docs" / "autoscale.png"
SAMPLE_S = 0.25
TAIL_MAX_S = 40.0  # after the last result, watch the scale-down for at most this long (not in the metrics)
GOALS = {"makespan_vs_static": 1.10, "ws_vs_static": 0.55, "ws_vs_adaptive": 1.0, "makespan_vs_adaptive": 1.05}
TUNABLE = ("poll_s", "confirm_s", "cooldown_s", "down_fraction")
# what the benchmark runs dasklab with unless --params says otherwise: the winner of the last sweep (smallest
# worst goal ratio among poll 1/confirm 2, poll 0.5/confirm 2, 1.5 and 1, all with cooldown 0, down_fraction 1)
DEFAULT_PARAMS = {"poll_s": 0.5, "confirm_s": 1.5, "cooldown_s": 0.0, "down_fraction": 1.0}
# the built-in sweep: the repository's defaults (at poll 1 s), then shorter windows
SWEEP = [
    {"poll_s": 1.0, "confirm_s": 20.0, "cooldown_s": 15.0, "down_fraction": 0.5},  # the repository's defaults
    {"poll_s": 1.0, "confirm_s": 10.0, "cooldown_s": 0.0, "down_fraction": 1.0},
    {"poll_s": 1.0, "confirm_s": 6.0, "cooldown_s": 0.0, "down_fraction": 1.0},
    {"poll_s": 1.0, "confirm_s": 4.0, "cooldown_s": 4.0, "down_fraction": 0.5},
    {"poll_s": 1.0, "confirm_s": 4.0, "cooldown_s": 0.0, "down_fraction": 1.0},
    {"poll_s": 1.0, "confirm_s": 3.0, "cooldown_s": 0.0, "down_fraction": 1.0},
    {"poll_s": 1.0, "confirm_s": 2.0, "cooldown_s": 0.0, "down_fraction": 1.0},
    {"poll_s": 0.5, "confirm_s": 2.0, "cooldown_s": 0.0, "down_fraction": 1.0},
]


# --- tasks (pickled by value: the workers never import this module) ----------------------------------

def work(seconds, value):
    time.sleep(seconds)
    return value


def combine(*parts, seconds=0.0):
    time.sleep(seconds)
    return sum(parts)


def _snapshot(dask_scheduler):
    """Run on the scheduler: (time, workers, queued tasks, processing tasks)."""
    s = dask_scheduler
    return (time.time(), len(s.workers), len(s.queued) + len(s.unrunnable),
            sum(len(ws.processing) for ws in s.workers.values()))


# --- the workload ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    name: str
    kind: str  # "burst": independent tasks; "long": map → grouped reduces → one total
    durations: tuple[float, ...]
    values: tuple[int, ...]
    pause_after: float

    @property
    def expected(self) -> int:
        return sum(self.values)

    @property
    def task_seconds(self) -> float:
        groups = -(-len(self.durations) // LONG_GROUP)
        return sum(self.durations) + (groups * LONG_REDUCE_S + LONG_FINAL_S if self.kind == "long" else 0.0)


LONG_GROUP, LONG_REDUCE_S, LONG_FINAL_S = 8, 0.5, 0.2


def build_workload(seed: int) -> list[Phase]:
    """Two bursts a short pause apart; a long idle gap; one long job; a long gap; two bursts a pause apart.

    Short pauses (3-5 s) are a person reading a result; long gaps (22-28 s) the next exercise. A burst is
    40 tasks of 0.5-1.0 s (~30 task-seconds: enough for the scheduler's adaptive target to ask for 6
    workers); the long job is 40 tasks of 1-2 s reduced in groups of 8, then totalled (~63 task-seconds).
    On 6 static workers the cluster is busy about a third of the time.
    """
    rng = random.Random(seed)

    def tasks(n: int, lo: float, hi: float) -> tuple[tuple[float, ...], tuple[int, ...]]:
        return (tuple(round(rng.uniform(lo, hi), 3) for _ in range(n)), tuple(rng.randint(1, 1000) for _ in range(n)))

    def pause() -> float:
        return round(rng.uniform(3, 5), 2)

    def gap() -> float:
        return round(rng.uniform(22, 28), 2)

    return [Phase("b1", "burst", *tasks(40, 0.5, 1.0), pause()),
            Phase("b2", "burst", *tasks(40, 0.5, 1.0), gap()),
            Phase("long", "long", *tasks(40, 1.0, 2.0), gap()),
            Phase("b3", "burst", *tasks(40, 0.5, 1.0), pause()),
            Phase("b4", "burst", *tasks(40, 0.5, 1.0), 0.0)]


@dataclass
class PhaseRun:
    phase: Phase
    onset: float  # just before the first submit of the phase
    end: float  # when its last result was known to the client
    held: list  # futures held until the end, gathered and checked then


def drive(client, workload: list[Phase], stop: threading.Event) -> list[PhaseRun]:
    from distributed import wait

    runs = []
    for ph in workload:
        onset = time.time()
        if ph.kind == "burst":
            held = client.map(work, ph.durations, ph.values, pure=False)
            wait(held)
        else:
            maps = client.map(work, ph.durations, ph.values, pure=False)
            reduces = [client.submit(combine, *maps[i:i + LONG_GROUP], seconds=LONG_REDUCE_S, pure=False)
                       for i in range(0, len(maps), LONG_GROUP)]
            held = [client.submit(combine, *reduces, seconds=LONG_FINAL_S, pure=False)]
            wait(held)
            del maps, reduces
        runs.append(PhaseRun(ph, onset, time.time(), held))
        if ph.pause_after and stop.wait(ph.pause_after):
            raise KeyboardInterrupt
    return runs


def check_results(client, runs: list[PhaseRun]) -> dict[str, int]:
    """Gather every phase's held results now and compare each with its known value: phase → results lost."""
    lost = {}
    for r in runs:
        expected = list(r.phase.values) if r.phase.kind == "burst" else [r.phase.expected]
        try:
            got = client.gather(r.held, errors="raise")
            lost[r.phase.name] = sum(g != e for g, e in zip(got, expected)) + abs(len(got) - len(expected))
        except Exception:  # noqa: BLE001 - whatever makes a result impossible to gather, it is lost
            lost[r.phase.name] = len(expected)
    return lost


# --- sampling ----------------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Every SAMPLE_S: the scheduler's worker/queued/processing counts, and what the autoscaler requested."""

    def __init__(self, address: str, requested):
        super().__init__(daemon=True, name="sampler")
        self.address, self.requested = address, requested
        self.samples: list[tuple[float, int, int, int, int | None]] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        from distributed import Client

        try:
            with Client(self.address, timeout=30) as c:
                nxt = time.time()
                while not self.halt.is_set():
                    t, workers, queued, processing = c.run_on_scheduler(_snapshot)
                    try:
                        req = self.requested()
                    except (OSError, ValueError, KeyError):  # a record being rewritten: no value this time
                        req = None
                    self.samples.append((t, workers, queued, processing, req))
                    nxt += SAMPLE_S
                    self.halt.wait(max(0.0, nxt - time.time()))
        except Exception as e:  # noqa: BLE001 - kept and raised again by run_workload, not swallowed
            self.error = e

    def latest_workers(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def stop(self):
        self.halt.set()
        self.join(timeout=30)


@dataclass
class ModeRun:
    name: str
    label: str
    t0: float = 0.0
    t_end: float = 0.0
    phases: list[PhaseRun] = field(default_factory=list)
    samples: list = field(default_factory=list)
    up_requests: list[float] = field(default_factory=list)  # times the autoscaler decided to scale up
    joins: list[float] = field(default_factory=list)  # scheduler add-worker event times
    removals: list[tuple[float, int, int]] = field(default_factory=list)  # (time, processing, recomputed)
    lost: dict[str, int] = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)
    min_workers: int = 1
    params: dict = field(default_factory=dict)


def run_workload(mode: ModeRun, address: str, workload: list[Phase], requested, stop: threading.Event,
                 tail: bool) -> ModeRun:
    """Sample, drive the workload, watch the last scale-down (tail), then check the held results."""
    from distributed import Client

    sampler = Sampler(address, requested)
    sampler.start()
    try:
        with Client(address, timeout=30) as client:
            if stop.wait(1.0):
                raise KeyboardInterrupt
            mode.t0 = time.time()
            mode.phases = drive(client, workload, stop)
            mode.t_end = mode.phases[-1].end
            deadline = time.time() + (TAIL_MAX_S if tail else 0.0)
            while time.time() < deadline and (sampler.latest_workers() or 0) > mode.min_workers:
                if stop.wait(0.1):
                    raise KeyboardInterrupt
            if tail:
                stop.wait(1.0)  # a second at min, for the plot
            mode.lost = check_results(client, mode.phases)
            for t, msg in client.get_events("all"):
                if msg.get("action") == "add-worker":
                    mode.joins.append(t)
                elif msg.get("action") == "remove-worker":
                    mode.removals.append((t, len(msg.get("processing-tasks", ()) or ()),
                                          len(msg.get("lost-computed-tasks", ()) or ())))
    finally:
        sampler.stop()
    if sampler.error is not None:
        raise RuntimeError(f"{mode.name}: sampler failed: {sampler.error!r}") from sampler.error
    mode.samples = sampler.samples
    return mode


# --- the three modes ---------------------------------------------------------------------------------

class DecisionLog(logging.Handler):
    """The controller's JSON log lines, with the time each was logged."""

    def __init__(self, echo: bool = False):
        super().__init__()
        self.entries: list[dict] = []
        self.echo = echo

    def emit(self, record):
        try:
            entry = json.loads(record.getMessage())
        except ValueError:
            entry = {"message": record.getMessage()}
        entry["_t"] = record.created
        self.entries.append(entry)
        if self.echo:
            print(f"    {record.getMessage()}", flush=True)


class CountingHandler(logging.Handler):
    def __init__(self, level=logging.NOTSET):
        super().__init__(level)
        self.count, self.first = 0, ""

    def emit(self, record):
        self.count += 1
        self.first = self.first or f"{record.name}: {record.getMessage().strip()[:100]}"


def _local_lab(home: Path, lab: str, initial: int, lo: int, hi: int, params: dict, echo: bool):
    """A local lab through dasklab's own controller: start-lab, reconcile until ready, `initial` workers joined."""
    from dasklab.adapters.local import LocalBackend
    from dasklab.adapters.files import FileEvents
    from dasklab.core.config import Config
    from dasklab.core.messages import parse_command
    from dasklab.core.reconcile import Controller
    from distributed import Client

    backend = LocalBackend(home)
    cfg = Config(home=str(home), tick_budget_s=24 * 3600, **params)
    ctl = Controller(backend, FileEvents(home / "status.jsonl"), cfg)
    log = DecisionLog(echo)
    logger = logging.getLogger("dasklab")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, DecisionLog)] + [log]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        ctl.handle(parse_command(json.dumps({"type": "start-lab", "lab": lab, "owner": "bench",
                                             "workers": {"initial": initial, "min": lo, "max": hi}})))
        deadline = time.time() + 60
        while backend.fetch_lab(lab).state.phase != "ready":
            if time.time() > deadline:
                raise RuntimeError(f"lab {lab} not ready after 60 s")
            ctl.reconcile_all("reconcile")
            time.sleep(0.2)
        address = backend.connection_info(backend.fetch_lab(lab))["scheduler"]
        with Client(address, timeout=30) as c:
            c.wait_for_workers(initial, timeout=60)
    except BaseException:
        backend.stop_all()
        raise
    return backend, ctl, log, address


def run_static(home: Path, workload, a, stop) -> ModeRun:
    mode = ModeRun("static", f"static ({a.max} workers)", min_workers=a.max)
    backend, _, _, address = _local_lab(home, "static", a.max, a.max, a.max, {}, False)
    try:
        return run_workload(mode, address, workload, lambda: a.max, stop, tail=False)
    finally:
        backend.stop_all()


class _Halted(Exception):
    """Raised in the reconcile thread's sleep to end its tick when the run is over."""


def run_dasklab(home: Path, workload, a, stop, params: dict, label: str = "") -> ModeRun:
    from dasklab.core.messages import parse_command

    mode = ModeRun("dasklab", label or "dasklab " + fmt_params(params), min_workers=a.min, params=params)
    backend, ctl, log, address = _local_lab(home, "dasklab", a.min, a.min, a.max, params, a.verbose)
    halt = threading.Event()

    def sleep(seconds: float) -> None:  # the tick's pause between passes; it ends the tick once halted
        if halt.wait(seconds):
            raise _Halted

    died: list[BaseException] = []

    def ticking() -> None:
        try:
            ctl.tick(parse_command(b'{"type": "reconcile"}'), "bench")
        except _Halted:
            pass
        except Exception as e:  # noqa: BLE001 - a dead controller voids the run: raised below
            died.append(e)

    ctl.sleep = sleep
    loop = threading.Thread(target=ticking, daemon=True, name="reconcile")
    try:
        loop.start()
        run_workload(mode, address, workload, lambda: backend.fetch_lab("dasklab").state.target_workers,
                     stop, tail=True)
    finally:
        halt.set()
        loop.join(timeout=30)
        backend.stop_all()
    if died:
        raise RuntimeError(f"the controller's reconcile loop died: {died[0]!r}") from died[0]
    mode.decisions = [e for e in log.entries if e.get("lab") == "dasklab"]
    mode.up_requests = [e["_t"] for e in mode.decisions if e.get("action") == "scale-up"]
    return mode


def run_adaptive(home: Path, workload, a, stop) -> ModeRun:
    mode = ModeRun("adaptive", f"Adaptive (distributed {_dist_version()})", min_workers=a.min)
    home.mkdir(parents=True, exist_ok=True)
    # the nannies' worker processes read this at start: quiet their connection-closed chatter on retirement
    saved = os.environ.get("DASK_LOGGING__DISTRIBUTED")
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "critical"
    try:
        return _run_adaptive(mode, home, workload, a, stop)
    finally:
        if saved is None:
            os.environ.pop("DASK_LOGGING__DISTRIBUTED", None)
        else:
            os.environ["DASK_LOGGING__DISTRIBUTED"] = saved


def _run_adaptive(mode: ModeRun, home: Path, workload, a, stop) -> ModeRun:
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=a.min, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", memory_limit="3GB", local_directory=str(home),
                           silence_logs=logging.ERROR)
    adaptive = None
    try:
        cluster.wait_for_workers(a.min, timeout=60)
        adaptive = cluster.adapt(minimum=a.min, maximum=a.max)  # interval 1 s, wait_count 3, target 5 s
        run_workload(mode, cluster.scheduler_address, workload, lambda: len(cluster.worker_spec), stop, tail=True)
        mode.up_requests = [t for t, rec in list(adaptive.log) if rec.get("status") == "up"]
        mode.decisions = [{"_t": t, **rec} for t, rec in list(adaptive.log)]
    finally:
        if adaptive is not None:
            adaptive.stop(reason="benchmark done")
        cluster.close(timeout=30)
    return mode


def _dist_version() -> str:
    import distributed
    return distributed.__version__


# --- metrics ------------------------------------------------------------------------------------------

def worker_seconds(samples, t0: float, t1: float) -> float:
    """∫ workers dt over [t0, t1], each sample's count held until the next sample."""
    total = 0.0
    for (t, w, *_), nxt in zip(samples, samples[1:] + [(float("inf"),)]):
        a, b = max(t, t0), min(nxt[0], t1)
        if b > a:
            total += w * (b - a)
    return total


def _first(times, lo: float, hi: float) -> float | None:
    return next((t for t in sorted(times) if lo <= t < hi), None)


@dataclass(frozen=True)
class PhaseTiming:
    duration: float  # onset → last result
    requested: float | None  # onset → first scale-up decision (None: no scale-up before the phase ended)
    joined: float | None  # onset → first worker joined after that decision
    to_min: float | None  # last result → back at min workers (None: not before the next phase)


def phase_timings(m: ModeRun) -> list[PhaseTiming]:
    out = []
    for i, p in enumerate(m.phases):
        nxt = m.phases[i + 1].onset if i + 1 < len(m.phases) else float("inf")
        req = _first(m.up_requests, p.onset, nxt)
        req = req if req is not None and req <= p.end else None
        join = _first(m.joins, req, nxt) if req is not None else None
        back = None if m.name == "static" else next(
            (s[0] for s in m.samples if p.end <= s[0] < nxt and s[1] <= m.min_workers), None)
        out.append(PhaseTiming(p.end - p.onset, None if req is None else req - p.onset,
                               None if join is None else join - p.onset, None if back is None else back - p.end))
    return out


@dataclass
class Metrics:
    makespan: float
    ws: float
    peak: int
    mean: float
    cold: int  # phases whose onset led to a scale-up decision
    react_req: list[float]
    react_join: list[float]
    down: list[float]  # phase end → back at min, where that happened before the next onset
    down_total: int
    lost: int
    recomputed: int


def metrics(m: ModeRun) -> Metrics:
    run = [s for s in m.samples if m.t0 <= s[0] <= m.t_end]
    ws = worker_seconds(m.samples, m.t0, m.t_end)
    pt = phase_timings(m)
    return Metrics(makespan=m.t_end - m.t0, ws=ws, peak=max((s[1] for s in run), default=0),
                   mean=ws / max(1e-9, m.t_end - m.t0), cold=sum(p.requested is not None for p in pt),
                   react_req=[p.requested for p in pt if p.requested is not None],
                   react_join=[p.joined for p in pt if p.joined is not None],
                   down=[p.to_min for p in pt if p.to_min is not None],
                   down_total=len(pt) if m.name != "static" else 0,
                   lost=sum(m.lost.values()), recomputed=sum(r[2] for r in m.removals))


def oracle_ws(static: ModeRun, lo: int, hi: int) -> float:
    """Worker-seconds of an autoscaler that scales instantly to the tasks in flight (processing + queued,
    within min..max), with no start-up time: read from the static run's samples. A lower bound."""
    clamped = [(t, min(hi, max(lo, q + p)), *rest) for t, _, q, p, *rest in static.samples]
    return worker_seconds(clamped, static.t0, static.t_end)


def goals(d: Metrics, static: Metrics | None, adaptive: Metrics | None) -> list[tuple[str, float, float]]:
    """(goal, measured ratio, target ratio) for the goals that can be computed."""
    out = []
    if static is not None:
        out += [("makespan vs static", d.makespan / static.makespan, GOALS["makespan_vs_static"]),
                ("worker-s vs static", d.ws / static.ws, GOALS["ws_vs_static"])]
    if adaptive is not None:
        out += [("worker-s vs Adaptive", d.ws / adaptive.ws, GOALS["ws_vs_adaptive"]),
                ("makespan vs Adaptive", d.makespan / adaptive.makespan, GOALS["makespan_vs_adaptive"])]
    return out


# --- output -------------------------------------------------------------------------------------------

def fmt_params(p: dict) -> str:
    return " ".join(f"{k.removesuffix('_s').removesuffix('_fraction')}={v:g}" for k, v in p.items())


def _medmax(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} / {max(xs):.1f}" if xs else "—"


def print_runs(console, runs: list[ModeRun], ms: list[Metrics], title: str) -> None:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("run", no_wrap=True)
    for col in ("makespan s", "worker-s", "mean / peak workers", "cold bursts",
                "onset→requested s\nmed / max", "onset→joined s\nmed / max", "end→min s\nmed / max (reached)",
                "results lost"):
        t.add_column(col, justify="right")
    for r, m in zip(runs, ms):
        down = "—" if r.name == "static" else f"{_medmax(m.down)} ({len(m.down)}/{m.down_total})"
        t.add_row(r.label, f"{m.makespan:.1f}", f"{m.ws:.0f}", f"{m.mean:.2f} / {m.peak}",
                  "—" if r.name == "static" else f"{m.cold}/{len(r.phases)}", _medmax(m.react_req),
                  _medmax(m.react_join), down, f"{m.lost}" + (f" ({m.recomputed} recomputed)" if m.recomputed else ""))
    console.print(t)


def print_goals(console, rows: list[tuple[str, float, float]], who: str) -> None:
    from rich.table import Table

    t = Table(title=f"goals for {who}", title_justify="left")
    for col in ("goal", "measured", "target", "measured / target", ""):
        t.add_column(col, justify="left" if col == "goal" else "right")
    for name, ratio, target in rows:
        t.add_row(name, f"{ratio:.3f}×", f"≤ {target:.2f}×", f"{ratio / target:.2f}",
                  "[green]met[/]" if ratio <= target else "[red]not met[/]")
    console.print(t)


def print_phases(console, runs: list[ModeRun]) -> None:
    from rich.table import Table

    t = Table(title="per phase: duration s  (onset→requested / onset→joined / end→min; – = none)",
              title_justify="left")
    t.add_column("phase (pause after)")
    t.add_column("task-s", justify="right")
    for r in runs:
        t.add_column(r.name, justify="right")
    timings = [phase_timings(r) for r in runs]
    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    for i, pr in enumerate(runs[0].phases):
        cells = [f"{pts[i].duration:.1f}" + ("" if r.name == "static" else
                                             f"  ({f(pts[i].requested)} / {f(pts[i].joined)} / {f(pts[i].to_min)})")
                 for r, pts in zip(runs, timings)]
        t.add_row(f"{pr.phase.name} ({pr.phase.pause_after:.1f}s)", f"{pr.phase.task_seconds:.0f}", *cells)
    console.print(t)


def plot(runs: list[ModeRun], path: Path, seed: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, sharex=True, figsize=(11, 2.6 * len(runs) + 0.6), squeeze=False)
    top = max(max((s[1] for s in r.samples), default=1) for r in runs) + 1
    qtop = max(max((s[2] + s[3] for s in r.samples), default=1) for r in runs) * 1.1 + 1
    for ax, r in zip(axes[:, 0], runs):
        m = metrics(r)
        xs = [s[0] - r.t0 for s in r.samples]
        q = ax.twinx()
        for p in r.phases:
            q.axvspan(p.onset - r.t0, p.end - r.t0, color="0.93", zorder=0)
        q.fill_between(xs, [s[2] + s[3] for s in r.samples], step="post", color="tab:orange", alpha=0.25,
                       label="tasks processing + queued", lw=0)
        q.step(xs, [s[2] for s in r.samples], where="post", color="tab:orange", lw=0.8, label="queued tasks")
        q.set_ylim(0, qtop)
        q.set_ylabel("tasks")
        ax.set_zorder(q.get_zorder() + 1)
        ax.patch.set_visible(False)
        if r.name != "static":
            ax.step(xs, [s[4] if s[4] is not None else float("nan") for s in r.samples], where="post",
                    color="tab:blue", ls="--", lw=1, label="requested")
        ax.step(xs, [s[1] for s in r.samples], where="post", color="tab:blue", lw=1.8, label="workers (joined)")
        for t in r.up_requests:
            ax.axvline(t - r.t0, color="tab:green", lw=0.6, alpha=0.6)
        ax.axvline(r.t_end - r.t0, color="k", lw=0.8, ls=":")
        ax.set_ylim(0, top)
        ax.set_ylabel("workers")
        ax.set_title(f"{r.label}: makespan {m.makespan:.1f} s, {m.ws:.0f} worker-s, lost {m.lost}",
                     loc="left", fontsize=9)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = q.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel(f"seconds since first submit (grey: a phase is running; green: scale-up decision; "
                           f"dotted: last result) — seed {seed}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- processes left behind ----------------------------------------------------------------------------

def leftovers(home: Path) -> list[str]:
    """Processes started by this run that are still alive: our children, and anything whose environment
    or command line names this run's scratch directory (the local backend's detached workers)."""
    import psutil

    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    marker = str(home).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes() or marker in (entry / "cmdline").read_bytes():
                mine.add(int(entry.name))
        except OSError:
            continue
    mine.discard(os.getpid())
    out = []
    for pid in sorted(mine):
        try:
            p = psutil.Process(pid)
            cmd = " ".join(p.cmdline())
            # multiprocessing's resource tracker (started by the nannies' "spawn") is no Dask process: it
            # waits on a pipe from this process and exits with it
            if p.status() != psutil.STATUS_ZOMBIE and "multiprocessing.resource_tracker" not in cmd:
                out.append(f"{pid} {cmd[:120]}")
        except psutil.Error:
            continue
    return out


# --- main -----------------------------------------------------------------------------------------------

def parse_params(text: str) -> dict:
    params = dict(DEFAULT_PARAMS)
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in TUNABLE:
            raise SystemExit(f"--params: unknown {key!r}; tunable: {', '.join(TUNABLE)}")
        params[key] = float(value)
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("--max", type=int, default=6)
    ap.add_argument("--params", default="", help=f"dasklab's policy parameters, e.g. confirm_s=6,cooldown_s=0 "
                                                f"(defaults {fmt_params(DEFAULT_PARAMS)})")
    ap.add_argument("--sweep", nargs="*", metavar="SET", default=None,
                    help="run static and adaptive once, then dasklab for each parameter set (built-in sets if none)")
    ap.add_argument("--modes", default="static,adaptive,dasklab", help="a subset of static,adaptive,dasklab")
    ap.add_argument("--plot", default=str(PLOT), help="where to save the figure ('' for none)")
    ap.add_argument("--verbose", action="store_true", help="echo the controller's JSON decisions")
    ap.add_argument("--dump", default="", help="write every run's samples, phases and decisions to this JSON file")
    a = ap.parse_args(argv)
    if not 0 <= a.min <= a.max:
        raise SystemExit("need 0 ≤ min ≤ max")

    from rich.console import Console

    console = Console(width=160)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    # retirements make distributed log moved keys, closed connections and cancelled nanny closes: counted, not
    # shown. Import it first: its import installs its own stream handler.
    import distributed  # noqa: F401
    dist_log = logging.getLogger("distributed")
    dist_errors = CountingHandler(logging.ERROR)
    dist_log.handlers, dist_log.propagate = [dist_errors], False
    dist_log.setLevel(logging.ERROR)

    workload = build_workload(a.seed)
    sweep = None
    if a.sweep is not None:
        sweep = [parse_params(s) for s in a.sweep] or [dict(p) for p in SWEEP]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    console.print(f"workload seed {a.seed}: " + ", ".join(
        f"{p.name} {len(p.durations)}×{p.kind} {p.task_seconds:.0f} task-s"
        + (f" +{p.pause_after:.1f}s" if p.pause_after else "") for p in workload)
        + f"; min {a.min}, max {a.max}; {os.cpu_count()} CPUs, load average "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg()))

    home = Path(tempfile.mkdtemp(prefix="dasklab-autoscale-"))
    runs: list[ModeRun] = []
    status = 0
    started = time.time()
    try:
        def announce(what):
            console.print(f"[dim]{time.time() - started:6.1f}s[/] running {what} …")

        if "static" in modes:
            announce("static")
            runs.append(run_static(home / "static", workload, a, stop))
        if "adaptive" in modes:
            announce("adaptive")
            runs.append(run_adaptive(home / "adaptive", workload, a, stop))
        settings = sweep if sweep is not None else ([parse_params(a.params)] if "dasklab" in modes else [])
        for i, params in enumerate(settings):
            announce(f"dasklab {fmt_params(params)}")
            runs.append(run_dasklab(home / f"dasklab-{i}", workload, a, stop, params))
    except KeyboardInterrupt as e:
        console.print(f"[red]interrupted ({e}): everything started was stopped[/]")
        status = 130 if not str(e).startswith("signal") else 143
    finally:
        left = leftovers(home)
        shutil.rmtree(home, ignore_errors=True)
    if status:
        console.print(f"processes left: {len(left)}")
        return status

    ms = [metrics(r) for r in runs]
    if a.dump:
        dump(runs, Path(a.dump))
    by = {r.name: m for r, m in zip(runs, ms) if r.name != "dasklab"}
    console.print(f"[dim]all runs took {time.time() - started:.0f} s; load average now "
                  f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}[/]")
    static_run = next((r for r in runs if r.name == "static"), None)
    if static_run is not None:
        o = oracle_ws(static_run, a.min, a.max)
        console.print(f"lower bound: an instant autoscaler following the tasks in flight would use {o:.0f} worker-s "
                      f"= {o / by['static'].ws:.2f}× static (the worker-s goal is ≤ {GOALS['ws_vs_static']:.2f}×)")
    ours = [(r, m) for r, m in zip(runs, ms) if r.name == "dasklab"]
    if sweep is None:
        print_runs(console, runs, ms, f"autoscaling on real local Dask — seed {a.seed}, min {a.min}, max {a.max}")
        print_phases(console, runs)
        for r, m in ours:
            if by:
                print_goals(console, goals(m, by.get("static"), by.get("adaptive")), r.label)
        if "adaptive" in by and "static" in by:
            print_goals(console, goals(by["adaptive"], by["static"], None), "Adaptive (for reference)")
        if a.plot:
            plot(runs, Path(a.plot), a.seed)
            console.print(f"figure: {a.plot}")
    else:
        print_runs(console, runs, ms, f"sweep — seed {a.seed}, min {a.min}, max {a.max}")
        print_sweep(console, ours, by)
    lost = sum(m.lost for m in ms)
    if dist_errors.count:
        console.print(f"[dim]distributed logged {dist_errors.count} error(s) in this process (first: "
                      f"{dist_errors.first})[/]")
    console.print(f"results lost: {lost}; processes left: {len(left)}" + "".join(f"\n  {x}" for x in left))
    return 1 if lost or left else 0


def dump(runs: list[ModeRun], path: Path) -> None:
    path.write_text(json.dumps([{
        "name": r.name, "label": r.label, "params": r.params, "t0": r.t0, "t_end": r.t_end, "lost": r.lost,
        "phases": [{"name": p.phase.name, "onset": p.onset, "end": p.end} for p in r.phases],
        "samples": r.samples, "up_requests": r.up_requests, "joins": r.joins, "removals": r.removals,
        "decisions": r.decisions} for r in runs], default=str))


def print_sweep(console, ours, by) -> None:
    from rich.table import Table

    t = Table(title="dasklab parameter sweep (ratios; green = goal met; worst = the largest ratio/target, ≤ 1 all met)",
              title_justify="left")
    t.add_column("poll, confirm, cooldown, down_fraction")
    for col in ("makespan s", "worker-s", "mk / static\n≤ 1.10", "ws / static\n≤ 0.55", "ws / Adaptive\n≤ 1.0",
                "mk / Adaptive\n≤ 1.05", "worst", "lost"):
        t.add_column(col, justify="right")
    scored = []
    for r, m in ours:
        g = goals(m, by.get("static"), by.get("adaptive"))
        worst = max((ratio / target for _, ratio, target in g), default=float("nan"))
        scored.append((worst, r, m, g))
        t.add_row(", ".join(f"{r.params[k]:g}" for k in TUNABLE), f"{m.makespan:.1f}", f"{m.ws:.0f}",
                  *[f"[{'green' if ratio <= target else 'red'}]{ratio:.3f}[/]" for _, ratio, target in g],
                  f"{worst:.2f}", str(m.lost))
    console.print(t)
    if scored:
        best = min(scored, key=lambda s: s[0])
        console.print(f"best (smallest worst goal ratio): {fmt_params(best[1].params)} → worst {best[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
