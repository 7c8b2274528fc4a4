"""The class report and the tables the CLI prints: usage per student, read from the class store and the backend
(the CLI's `class-report` and the class demo both show it)."""

import sys
import time

from dasklab.core.errors import PermanentError


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
