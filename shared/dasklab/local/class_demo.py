"""`dasklab demo --class N`: a class on real Dask through the real entry point — one start-class, a busy lab that
autoscales, idle labs torn down, one kept alive — printed as the demo's timeline, then the class report."""

from datetime import datetime

from dasklab.core.config import Config
from dasklab.core.errors import ValidationError
from dasklab.core.model import READY, TEARING_DOWN
from dasklab.local.demo import SHOWN, TASK_SECONDS, DemoRun, Timeline, Watch, _slow_square, _wait

CLASS = "demo"
MAX_STUDENTS = 8  # each lab runs a scheduler, a worker and Jupyter on this machine
IDLE_S, KEEP_FOR = 10, "10m"
WORKERS = {"initial": 1, "min": 1, "max": 4}
TASKS = 160  # × TASK_SECONDS on up to 4 workers: busy past the moment the idle labs are torn down
CLASS_SHOWN = SHOWN | {"start-class", "class-ready", "keep-alive", "keep", "stop-class", "class-deleted"}


def build_roster(n: int) -> list[str]:
    """The students: busy, then idle, then kept; any more are idle ones."""
    if not 1 <= n <= MAX_STUDENTS:
        raise ValidationError("--class", f"{n} student(s): give 1 to {MAX_STUDENTS} (each lab runs a scheduler, a "
                                         f"worker and Jupyter on this machine)")
    return ["busy", "idle", "kept"][:n] + [f"idle{i}" for i in range(2, n - 1)]


def build_start_class(roster: list[str]) -> dict:
    return {"v": 1, "type": "start-class", "class": CLASS, "owner": "prof", "roster": roster, "workers": WORKERS,
            "machine_type": "e2-standard-4", "idle_timeout": f"{IDLE_S}s", "max_lifetime": "1h"}


def _event(run: DemoRun, kind: str, seen: list[dict]):
    """The first status event of this kind for the class (events pulled meanwhile are kept in `seen`)."""
    seen += run.ctl.fetch_events()
    return next((e for e in seen if e.get("event") == kind and e.get("class") == CLASS), None)


def run_class_demo(n: int, json_lines: bool = False) -> int:
    from distributed import Client

    from dasklab.report import fetch_class_report, print_class_report

    roster = build_roster(n)
    busy, kept = roster[0], "kept" if "kept" in roster else None
    idle = [s for s in roster if s.startswith("idle")]
    lab_of = {s: f"{CLASS}-{s}" for s in roster}
    timeline = Timeline(json_lines, shown=CLASS_SHOWN, labs=True)
    events: list[dict] = []
    problems: list[str] = []
    summary: dict = {}
    with DemoRun(timeline, prefix="dasklab-class-demo-") as run:
        ctl, backend = run.ctl, run.backend
        watch = {s: Watch(backend, lab) for s, lab in lab_of.items()}
        phases = lambda: "(" + ", ".join(f"{s} {w.phase()}" for s, w in watch.items()) + ")"  # noqa: E731
        mid = ctl.publish(build_start_class(roster))
        timeline.say("demo", f"start-class published (message {mid}): class {CLASS}, {n} student(s) "
                             f"({', '.join(roster)}); each lab 1 worker, min 1, max {WORKERS['max']}, idle timeout "
                             f"{IDLE_S}s", lab=CLASS)

        ready = _wait("waiting for class-ready", lambda: _event(run, "class-ready", events), timeline, 90, phases)
        rows = [{"student": r["student"], "lab": r["lab"], "phase": r["phase"],
                 **{k: (r.get("connection") or {}).get(k) for k in ("jupyter", "scheduler", "dashboard")}}
                for r in ready["labs"]]
        summary["class_ready_t"] = timeline.say("demo", f"class-ready: {len(rows)} lab(s); who connects how (no "
                                                        f"token: `dasklab connect --class {CLASS}` gives them to the "
                                                        f"instructor)", lab=CLASS, labs=rows)
        timeline.table(f"class {CLASS}: who connects how", ("student", "lab", "phase", "jupyter", "scheduler",
                                                            "dashboard"),
                       [tuple(r.values()) for r in rows])
        for w in watch.values():
            run.track(w.lab())

        if kept:
            mid = ctl.publish({"v": 1, "type": "keep-alive", "lab": lab_of[kept], "for": KEEP_FOR})
            until = _wait(f"waiting for {lab_of[kept]}'s keep-alive",
                          lambda: (lab := watch[kept].lab()) and lab.spec.keep_alive_until, timeline, 30)
            timeline.say("demo", f"keep-alive published (message {mid}) for {lab_of[kept]}: kept alive until "
                                 f"{_clock(until)} ({KEEP_FOR})", lab=lab_of[kept])

        scheduler = next(r["scheduler"] for r in rows if r["student"] == busy)
        with Client(scheduler, timeout=20) as client:
            futures = client.map(_slow_square, range(TASKS), pure=False)
            timeline.say("demo", f"workload started on {lab_of[busy]}: {TASKS} tasks × {TASK_SECONDS}s of sleep; "
                                 f"the other labs are left untouched", lab=lab_of[busy])
            quiet = [s for s in roster if s != busy]
            if quiet:
                # an idle lab the minute tick already tore down for idleness is past its timeout too
                past = lambda s: watch[s].idle_for() >= IDLE_S or (  # noqa: E731
                    s in idle and watch[s].phase() in (TEARING_DOWN, "gone"))
                _wait(f"waiting for the idle timeout ({IDLE_S}s) of {', '.join(lab_of[s] for s in quiet)}",
                      lambda: all(past(s) for s in quiet), timeline, 90,
                      lambda: "(idle for " + ", ".join(f"{s} {watch[s].idle_for():.0f}s" for s in quiet) +
                              f"; {busy} {watch[busy].workers()})")
                mid = ctl.run_job("dasklab-teardown-idle")
                timeline.say("timer", f"teardown-idle job fired (message {mid})")
            if idle:
                _wait("waiting for the idle lab(s) to be deleted", lambda: all(watch[s].lab() is None for s in idle),
                      timeline, 60, phases)
                summary["idle_deleted_t"] = timeline.say("demo", f"deleted for idleness: "
                                                                 f"{', '.join(lab_of[s] for s in idle)}")
            if kept:
                lab = watch[kept].lab()
                if lab is None or lab.state.phase != READY:
                    problems.append(f"{lab_of[kept]} is {watch[kept].phase()} after the idle teardown")
                summary["kept_alive_t"] = timeline.say(
                    "demo", f"{lab_of[kept]} still {watch[kept].phase()}, idle for {watch[kept].idle_for():.0f}s ≥ "
                            f"idle timeout {IDLE_S}s: kept alive until {_clock(lab.spec.keep_alive_until)}"
                    if lab else f"{lab_of[kept]} gone", lab=lab_of[kept], phase=watch[kept].phase())
            _wait(f"running on {lab_of[busy]}", lambda: all(f.done() for f in futures), timeline, 120,
                  watch[busy].workers)
            run.track(watch[busy].lab())
            total, expected = sum(client.gather(futures)), sum(x * x for x in range(TASKS))
            if total != expected:
                problems.append(f"{lab_of[busy]}: sum {total}, expected {expected}")
            peak = watch[busy].lab().state.peak_workers
            summary["busy_peak"] = peak
            timeline.say("demo", f"workload done on {lab_of[busy]}: sum {total} (expected {expected}); peak "
                                 f"{peak} worker(s) from {WORKERS['initial']}", lab=lab_of[busy], peak_workers=peak)
            if peak <= WORKERS["initial"]:
                problems.append(f"{lab_of[busy]} never scaled above {WORKERS['initial']} worker(s)")
        mid = ctl.publish({"v": 1, "type": "stop-class", "class": CLASS})
        timeline.say("demo", f"stop-class published (message {mid})", lab=CLASS)
        _wait("waiting for class-deleted", lambda: _event(run, "class-deleted", events), timeline, 60, phases)
        timeline.say("demo", "class-deleted: every lab is gone", lab=CLASS)
        report = fetch_class_report(Config(backend="local", home=str(run.home)), CLASS)
        timeline.say("demo", f"class report: {len(report['students'])} student(s), {report['node_hours']:.4f} "
                             f"node-hours, ${report['estimated_cost_usd']:.4f} estimated", lab=CLASS,
                     students=report["students"])
        if not json_lines:
            print_class_report(report)
    summary["total_t"] = timeline.say("demo", _summary(summary, lab_of, busy, kept, idle, run.left, problems),
                                      **summary)
    return 0 if not run.left and not problems else 1


def _summary(s: dict, lab_of: dict, busy: str, kept: str | None, idle: list[str], left: list[int],
             problems: list[str]) -> str:
    parts = [f"class-ready at +{s['class_ready_t']}s", f"{lab_of[busy]} scaled to {s['busy_peak']} workers"]
    if idle:
        parts.append(f"{', '.join(lab_of[x] for x in idle)} torn down for idleness by +{s['idle_deleted_t']}s")
    if kept:
        parts.append(f"{lab_of[kept]} kept alive past the idle timeout at +{s['kept_alive_t']}s")
    parts.append(f"{len(left)} process(es) left")
    return "summary: " + "; ".join(parts) + "".join(f"; PROBLEM: {p}" for p in problems)


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S")
