"""What `dasklab status` and `class-report` show, read from the backend and the class store (the CLI and the class
demo print it): a row per lab, a row per class, usage per student, and the tables they are printed in."""

import sys
import time
from dataclasses import replace

from dasklab.core.errors import PermanentError, SchedulerUnreachable, TransientError


def _span(seconds: float | None) -> str:
    """A duration for people: 45s, 12m05s, 3h07m, 2d04h."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

def print_table(title: str, columns: tuple[str, ...], rows: list[tuple], empty: str = "nothing") -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(("-" if v is None else str(v)) for v in row))
    Console(width=None if sys.stdout.isatty() else 200).print(table if rows else empty)

def _class_labs(cfg, name: str):
    from dasklab.runtime import build_backend, build_classes
    record = build_classes(cfg).fetch_class(name)
    if record is None or not record.roster:
        raise PermanentError(f"no class named {name!r} on the {cfg.backend} backend: see `dasklab status`")
    backend = build_backend(cfg)
    return record, backend, {lab.spec.student: lab for lab in backend.fetch_labs() if lab.spec.class_name == name}

NO_IDENTITY = "no identity: the instructor connects for them"
_TOKENS = ("jupyter_token",)  # what reaches a lab's Jupyter without asking who you are


def build_connect_rows(record, labs: dict, backend, show_tokens: bool = False) -> list[dict]:
    """The instructor's `connect --class` table: per student their lab, its phase, the Google account that may
    connect to it (the roster's `ann=ann@example.edu`, else none: the instructor connects for them), and the command
    they run themselves. A lab's token (or a Jupyter URL carrying it) only with `show_tokens`: the instructor's own
    terminal, never to be shared."""
    from dasklab.core.messages import parse_command
    template = parse_command(record.template)
    login = getattr(backend, "jupyter_login_url", None)  # the local lab's Jupyter URL with its token
    rows = []
    for student in record.roster:
        lab, name = labs.get(student), record.lab_name(student)
        row = {"student": student, "lab": name, "phase": lab.state.phase if lab else "gone",
               "identity": template.identities.get(student) or NO_IDENTITY, "connect": f"dasklab connect --lab {name}"}
        if lab is not None:
            info = backend.connection_info(lab)
            if show_tokens and login and (url := login(lab)):
                info["jupyter"] = url
            row.update({k: v for k, v in info.items() if show_tokens or k not in _TOKENS})
        rows.append(row)
    return rows


def fetch_class_report(cfg, name: str) -> dict:
    """Usage per student (node-hours, cost, peak workers, time busy), live labs and labs gone alike."""
    from dasklab.core.classes import class_usage
    record, _, labs = _class_labs(cfg, name)
    usage = class_usage(record, labs, time.time())
    students = [{"student": s, **usage.get(s, {"lab": record.lab_name(s), "phase": "not started", "node_hours": 0.0,
                                               "cost_usd": 0.0, "peak_workers": 0, "busy_s": 0.0, "lifetime_s": 0.0,
                                               "reason": ""})}
                for s in sorted(set(record.roster) | set(usage))]
    return {"class": record.name, "owner": record.owner, "students": students,
            "node_hours": round(sum(r["node_hours"] for r in students), 4),
            "estimated_cost_usd": round(sum(r["cost_usd"] for r in students), 4),
            "budget_usd": record.budget_class_usd, "budget_student_usd": record.budget_student_usd}

def print_class_report(report: dict) -> None:
    print_table(f"class {report['class']}: usage per student (estimated)",
                ("student", "lab", "phase", "node-hours", "cost", "peak workers", "busy", "lifetime", "ended because"),
                [(r["student"], r["lab"] + (f" ({r['labs']} labs)" if r.get("labs", 1) > 1 else ""), r["phase"], f"{r['node_hours']:.4f}", f"${r['cost_usd']:.4f}",
                  r["peak_workers"], _span(r["busy_s"]), _span(r["lifetime_s"]),
                  r["reason"] if r["phase"] in ("gone", "tearing-down") else "")
                 for r in report["students"]])
    budget = f" (budget ${report['budget_usd']:.2f})" if report["budget_usd"] else ""
    print(f"class {report['class']}: {report['node_hours']:.4f} node-hours, ${report['estimated_cost_usd']:.4f} "
          f"estimated{budget}")


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "-"
    s = max(0, int(now - then))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

def timer_jobs(cfg) -> list:
    """The timers that tick the labs: infra/dasklab.yaml's jobs, the nightly one at its configured time on GKE
    (`infra apply` sets it; the local timer fires the file's schedule as it is)."""
    from dasklab.core.timers import load_infra
    jobs = load_infra()["jobs"]
    if cfg.backend != "gke":
        return jobs
    from dasklab.cloud.infra import NIGHTLY_TYPE, nightly_schedule
    return [replace(j, schedule=nightly_schedule(cfg.nightly_at), time_zone=cfg.nightly_time_zone)
            if j.message["type"] == NIGHTLY_TYPE else j for j in jobs]

def _revision(lab) -> str:
    """The revision the lab runs, and the one it is moving to while an update converges."""
    running, asked = lab.state.revision, lab.spec.revision
    return str(running) if running == asked else f"{running} → {asked}"

def fetch_status(cfg, now: float | None = None) -> list[dict]:
    """One row per lab: what `dasklab status` shows, with what the controller decides from (limits, pin,
    keep-alive, idle timeout, lifetime, cost) and the next teardown the timers would bring if nothing changes.
    Costs and times are as of `now` (default: the clock)."""
    from dasklab.core.model import TEARING_DOWN, estimate_cost, node_seconds_at
    from dasklab.core.policy import plan_next_teardown
    from dasklab.core.timers import upcoming_ticks
    from dasklab.runtime import build_backend
    from dasklab.runtime import build_classes
    backend, now, rows = build_backend(cfg), time.time() if now is None else now, []
    labs = backend.fetch_labs()
    classes = {r.name: r for r in build_classes(cfg).fetch_classes()} if any(lab.spec.class_name for lab in labs) \
        else {}
    horizon = max((lab.state.created_at + lab.spec.max_lifetime_s for lab in labs), default=now)
    ticks = upcoming_ticks(timer_jobs(cfg), now, horizon + 60) if labs else []  # the lifetime cap's tick included
    for lab in labs:
        spec, state = lab.spec, lab.state
        load = None
        if state.phase == "ready":
            try:
                load = backend.dashboard(lab).fetch_load()
            except (SchedulerUnreachable, TransientError):
                pass
        if state.phase == TEARING_DOWN:
            teardown = {"at": _iso(now), "in_s": 0, "tick": None, "reason": f"being torn down: {state.reason}"}
        else:
            found = plan_next_teardown(spec, state, load, ticks)
            teardown = found and {"at": _iso(found[0]), "in_s": round(found[0] - now), "tick": found[1],
                                  "reason": found[2]}
            record = classes.get(spec.class_name)
            if record is not None and record.end is not None and (not found or record.end < found[0]):
                teardown = {"at": _iso(record.end), "in_s": round(record.end - now), "tick": None,
                            "reason": f"class {record.name} ends (its duration, {_span(record.duration_s)})"}
        lifetime, info = now - state.created_at, backend.connection_info(lab)
        rows.append({
            "lab": lab.name, "owner": spec.owner, "phase": state.phase, "class": spec.class_name or None,
            "student": spec.student or None, "budget_usd": spec.budget_usd,
            "workers": {"current": load.workers if load else None, "target": state.target_workers,
                        "min": spec.min_workers, "max": spec.max_workers},
            "pinned": spec.pinned_workers,
            "processing": load.processing if load else None, "queued": load.queued if load else None,
            "clients": load.clients if load else None,
            "idle_for": _ago(now, load.idle_since) if load and load.idle_since else "-",
            "idle_timeout_s": spec.idle_timeout_s, "keep_alive_until": _iso(spec.keep_alive_until),
            "keep_alive_s": round(spec.keep_alive_until - now) if (spec.keep_alive_until or 0) > now else None,
            "next_teardown": teardown,
            "age": _ago(now, state.created_at), "lifetime_left_s": round(spec.max_lifetime_s - lifetime),
            "estimated_cost_usd": estimate_cost(spec, lifetime, node_seconds_at(lab, now)),
            "dask": info.get("dask_version"), "notes": list(spec.notes),
            "dashboard": info.get("dashboard"), "reason": state.reason, "revision": _revision(lab),
            "degraded": state.degraded_reason or None, "cluster": info.get("cluster_status")})
    return rows

def fetch_class_status(cfg, rows: list[dict], now: float | None = None) -> list[dict]:
    """One row per class: its roster, labs by phase, live estimated cost (labs gone included) against its budget,
    when it is ready and when it ends (as of `now`, default: the clock)."""
    from dasklab.core.classes import class_cost
    from dasklab.runtime import build_backend, build_classes
    backend, now, out = build_backend(cfg), time.time() if now is None else now, []
    labs = backend.fetch_labs()
    for record in build_classes(cfg).fetch_classes():
        if not record.roster:
            continue  # a stop-class kept for a class never started
        mine = {lab.spec.student: lab for lab in labs if lab.spec.class_name == record.name}
        phases = [r["phase"] for r in rows if r.get("class") == record.name]
        out.append({"class": record.name, "owner": record.owner, "students": len(record.roster),
                    "labs": {p: phases.count(p) for p in sorted(set(phases))},
                    "estimated_cost_usd": class_cost(record, mine, now), "budget_usd": record.budget_class_usd,
                    "budget_student_usd": record.budget_student_usd, "at": _iso(record.at), "ends_at": _iso(record.end),
                    "stopped": record.stop_reason if record.is_stopped else None,
                    "failed": {**dict(record.refused), **{lab.spec.student: lab.state.reason for lab in mine.values()
                                                         if lab.state.phase == "failed"}},
                    "ready": set(record.roster) <= set(record.ready_roster)})
    return out
