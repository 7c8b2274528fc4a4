"""Classes: a lab per student from one start-class — the class record, its store and wake-up ports, and the pure
plans the reconcile applies (which labs to start or stop, when to start provisioning, budgets)."""

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from dasklab.core.model import FAILED, READY, TEARING_DOWN, Lab

DEFAULT_LEAD_S = {"gke": 15 * 60, "local": 60}  # until a class has seen its labs' creation times (GKE: 5–15 min)
LEAD_PERCENTILE, LEAD_MARGIN, LEAD_TICK_S, LEAD_SAMPLES = 0.9, 1.25, 60.0, 20
BUDGET_WARN, BUDGET_MINIMUM, BUDGET_TEARDOWN = 0.8, 0.9, 1.0  # shares of a budget at which each step is taken
CLASS_KEPT_S = 30 * 86400  # a deleted class's record (its report, its stop) is kept this long


@dataclass(frozen=True)
class ClassRecord:
    """A class as its start-class asked for it, plus what the controller remembers about it."""

    name: str
    owner: str = ""
    roster: tuple[str, ...] = ()
    template: dict = field(default_factory=dict)  # the start-class as sent (roster included): each lab's start-lab
    at: float | None = None  # epoch s: when the labs must be ready
    duration_s: int | None = None  # the labs end at (at, else created_at) + duration
    budget_student_usd: float | None = None
    budget_class_usd: float | None = None
    placement: str = ""
    published: float = 0.0  # publish time of the start-class this record stands for
    created_at: float = 0.0  # when the class was first recorded (this session)
    stopped: float | None = None  # publish time of its latest stop-class (or when it ended): older starts lose
    stop_reason: str = ""
    keep_alive_until: float | None = None  # a class-wide keep-alive, given to labs created later too
    started: dict = field(default_factory=dict)  # student → when their lab was created (a lab gone is not recreated)
    lead_samples: tuple[float, ...] = ()  # observed requested → ready durations of its labs, seconds
    ready_roster: tuple[str, ...] = ()  # the students of the roster class-ready was last published for
    budget_stage: str = ""  # "", "warned", "minimum": the class budget's steps already taken
    usage: dict = field(default_factory=dict)  # student → final figures of their lab once deleted (the report)
    refused: dict = field(default_factory=dict)  # student → why their lab was refused (not retried until a new
    # start-class is recorded)
    notes: tuple[str, ...] = ()  # what its labs are told at creation (a quota that fits only at the current usage)
    deleted_at: float | None = None  # when class-deleted was published
    version: str = ""  # the store's concurrency token ("" = not stored yet)

    @property
    def end(self) -> float | None:
        if self.duration_s is None:
            return None
        return (self.at if self.at is not None else self.created_at) + self.duration_s

    @property
    def is_stopped(self) -> bool:
        return self.stopped is not None and self.stopped >= self.published

    def lab_name(self, student: str) -> str:
        return f"{self.name}-{student}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("version")
        return data

    @classmethod
    def from_dict(cls, data: dict, version: str = "") -> "ClassRecord":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "version"}
        for name in ("roster", "lead_samples", "ready_roster", "notes"):
            known[name] = tuple(known.get(name, ()))
        return cls(**known, version=version)


class Classes(Protocol):
    """Where class records live (files locally, Firestore on Google Cloud); writes are optimistic on `version`."""

    def fetch_classes(self) -> list[ClassRecord]: ...

    def fetch_class(self, name: str) -> ClassRecord | None: ...

    def apply_class(self, record: ClassRecord) -> ClassRecord:
        """Store the record: create it when `version` is "" (ConflictError if it exists), else replace it if its
        version is still current (ConflictError otherwise). Returns it with its new version."""

    def apply_usage(self, name: str, student: str, usage: dict) -> None:
        """Merge one student's final usage into the class record (atomic; nothing if the class is gone)."""

    def apply_forget_class(self, record: ClassRecord) -> None:
        """Delete the record (its time is over)."""


class Wakeups(Protocol):
    """One-off timers: at `at_epoch` the message is published on the control topic (at least once). The local
    timer fires them locally; a one-off Cloud Scheduler job on Google Cloud."""

    def apply_wakeup(self, key: str, at_epoch: float, message: dict) -> None:
        """Create or move the wake-up `key` (idempotent)."""

    def apply_cancel(self, key: str) -> None:
        """Drop the wake-up `key` (nothing if there is none)."""

    def apply_expire(self, key: str, now: float) -> None:
        """Drop the wake-up `key` if its time has passed (it fired; nothing if there is none)."""


def wakeup_message(name: str) -> dict:
    return {"v": 1, "type": "reconcile-class", "class": name}


# --- pure plans ---

@dataclass(frozen=True)
class ClassPlan:
    start: tuple[str, ...] = ()  # students whose lab is created now
    stop: tuple[tuple[str, str], ...] = ()  # (student, reason) whose lab is stopped gracefully now
    ready: bool = False  # every student's lab is ready: publish class-ready
    deleted: bool = False  # the class is over and every lab is gone: publish class-deleted
    ended: str = ""  # the class ends now (its duration is over): the reason, recorded as its stop
    failed: tuple[tuple[str, str], ...] = ()  # (student, why) whose lab was refused, failed or cannot be read
    reason: str = ""


def plan_class(record: ClassRecord, labs: dict[str, Lab], now: float, lead_s: float,
               unreadable: dict[str, str] | None = None) -> ClassPlan:
    """One step of a class: which students' labs to start or stop, and whether it is ready or over. `labs` are the
    class's labs that exist, by student; `unreadable` those whose record cannot be read (student → why). A student
    whose lab was refused, failed or cannot be read counts as failed, with the reason: the class is ready once every
    other lab is, and never waits for them."""
    unreadable = unreadable or {}
    end = record.end
    ended = "" if record.is_stopped or end is None or now < end else \
        f"the class's duration ({record.duration_s}s) ended at {_iso(end)}"
    if record.is_stopped or ended:
        why = ended or record.stop_reason or "stop-class requested"
        stop = tuple((s, why) for s, lab in sorted(labs.items()) if lab.state.phase != TEARING_DOWN)
        deleted = not labs and record.deleted_at is None
        return ClassPlan(stop=stop, deleted=deleted, ended=ended,
                         reason=f"{why}: {len(labs)} lab(s) left" if labs else f"{why}: every lab is gone")
    removed = tuple((s, f"removed from the roster of class {record.name}") for s, lab in sorted(labs.items())
                    if s not in record.roster and lab.state.phase != TEARING_DOWN)
    begin = None if record.at is None else record.at - lead_s
    if begin is not None and now < begin:
        return ClassPlan(stop=removed, reason=f"provisioning starts at {_iso(begin)}: at {_iso(record.at)} minus "
                                              f"the lead time {lead_s:.0f}s")
    failed = {s: unreadable[s] if s in unreadable else labs[s].state.reason if s in labs else record.refused[s]
              for s in record.roster if s in unreadable or (s in labs and labs[s].state.phase == FAILED)
              or (s not in labs and s in record.refused)}
    start = tuple(s for s in record.roster if s not in labs and s not in record.started and s not in failed)
    # ended: started, not listed, and its final figures kept (written when its lab was deleted); a lab started but
    # not listed yet (or not readable this pass) is still to come, not ended
    gone = [s for s in record.roster if s in record.started and s not in labs and s in record.usage and s not in failed]
    coming = [s for s in record.roster if s in record.started and s not in labs and s not in record.usage
              and s not in failed]
    ready = [s for s in record.roster if s in labs and labs[s].state.phase == READY]
    complete = not start and not coming and bool(ready or failed) and \
        len(ready) + len(gone) + len(failed) == len(record.roster)
    announce = complete and any(s not in record.ready_roster for s in record.roster)  # a removal alone: no new one
    parts = [f"{len(ready)}/{len(record.roster)} lab(s) ready"] + [f"starting {', '.join(start)}"] * bool(start) + \
        [f"not listed yet: {', '.join(coming)}"] * bool(coming) + [f"ended: {', '.join(gone)}"] * bool(gone) + \
        [f"failed: {', '.join(failed)}"] * bool(failed)
    return ClassPlan(start=start, stop=removed, ready=announce, failed=tuple(sorted(failed.items())),
                     reason="; ".join(parts))


@dataclass(frozen=True)
class AccessChange:
    student: str
    access: tuple[str, ...]  # the Google accounts that may connect to the lab, as the class now names them
    identity: str  # the student's own account ("" if none)
    reason: str


def plan_access(wanted: dict[str, tuple[tuple[str, ...], str]], labs: dict[str, Lab]) -> tuple[AccessChange, ...]:
    """Whose lab's people differ from what the class's latest start-class names (`wanted`: student → (accounts that
    may connect, the student's own)): a roster entry that gained, lost or changed its identity, a changed
    owner_identity. A lab being torn down is left alone (its namespace goes with it)."""
    changes = []
    for student, lab in sorted(labs.items()):
        if student not in wanted or lab.state.phase == TEARING_DOWN:
            continue
        access, identity = wanted[student]
        if (tuple(lab.spec.access), lab.spec.student_identity) == (tuple(access), identity):
            continue
        added = [a for a in access if a not in lab.spec.access]
        removed = [a for a in lab.spec.access if a not in access]
        said = [f"+{', +'.join(added)}"] * bool(added) + [f"-{', -'.join(removed)}"] * bool(removed)
        changes.append(AccessChange(student, tuple(access), identity,
                                    f"the class names other people for this lab: {'; '.join(said) or 'reordered'}"))
    return tuple(changes)


def plan_lead_time(samples: tuple[float, ...] | list[float], default_s: float) -> tuple[float, str]:
    """How long before `at` provisioning starts: the 90th percentile (nearest rank) of the last LEAD_SAMPLES
    observed requested → ready durations, × LEAD_MARGIN, plus a reconcile tick's period; `default_s` until a lab
    has been observed."""
    recent = sorted(samples[-LEAD_SAMPLES:])
    if not recent:
        return float(default_s), f"default lead time {default_s:.0f}s (no lab creation observed yet)"
    p = recent[max(0, math.ceil(LEAD_PERCENTILE * len(recent)) - 1)]
    lead = p * LEAD_MARGIN + LEAD_TICK_S
    return lead, (f"p90 of {len(recent)} observed creation time(s) {p:.0f}s × {LEAD_MARGIN} + {LEAD_TICK_S:.0f}s "
                  f"(a reconcile tick) = {lead:.0f}s")


def plan_class_lifetime(asked_s: int | None, default_s: int, cap_s: int, duration_s: int | None,
                        lead_s: float) -> tuple[int, str]:
    """A student lab's maximum lifetime and, when it differs from what the class would need, why: a lab lives from
    its creation (up to `lead_s` before `at`) to the class's end, so without an asked max_lifetime it gets enough
    for the class (up to the controller cap); an asked one is kept, and said when it ends the lab early."""
    base = asked_s if asked_s is not None else min(default_s, cap_s)
    if duration_s is None:
        return base, ""
    needed = math.ceil(duration_s + lead_s)
    if asked_s is not None:
        return base, "" if needed <= base else (
            f"max_lifetime: {asked_s}s ends each lab before the class does (the duration {duration_s}s plus up to "
            f"{lead_s:.0f}s of early provisioning); leave max_lifetime out to cover the class")
    if needed <= base:
        return base, ""
    if needed <= cap_s:
        return needed, ""  # the lab's lifetime follows the class: nothing the sender asked is changed
    return cap_s, (f"duration: a lab provisioned {lead_s:.0f}s early reaches the controller cap max_lifetime="
                   f"{cap_s}s before the class's end: its last {needed - cap_s}s are cut")


@dataclass(frozen=True)
class BudgetDecision:
    action: str  # none, warn, minimum, teardown
    stage: str  # the stage to record: "", "warned", "minimum" (teardown ends it)
    reason: str
    passed_warning: str = ""  # the warning this step went past unsaid (said first, so no owner misses it)


def plan_budget(cost: float, budget: float | None, stage: str, what: str = "lab") -> BudgetDecision:
    """The budget's next step for a lab or class that has cost `cost` USD so far: a warning at BUDGET_WARN of the
    budget, its workers down to their minimum at BUDGET_MINIMUM, torn down at the budget. Each step once; a cost
    that went past the warning between two passes still gets it said (passed_warning), before the step taken."""
    if budget is None:
        return BudgetDecision("none", stage, "no budget")
    share = cost / budget
    said = f"estimated cost ${cost:.4f} = {share:.0%} of the {what}'s budget ${budget:.2f}"
    warning = (f"{said} (≥ {BUDGET_WARN:.0%}): workers go to the minimum at {BUDGET_MINIMUM:.0%}, the {what} is "
               f"torn down at 100%")
    passed = f"{warning} (passed {BUDGET_WARN:.0%} since the last pass)" if share >= BUDGET_MINIMUM and stage == "" \
        else ""
    if share >= BUDGET_TEARDOWN:
        return BudgetDecision("teardown", stage, f"{said}: budget reached, tearing down", passed)
    if share >= BUDGET_MINIMUM and stage != "minimum":
        return BudgetDecision("minimum", "minimum", f"{said} (≥ {BUDGET_MINIMUM:.0%}): workers down to the minimum; "
                                                    f"torn down at 100%", passed)
    if share >= BUDGET_WARN and stage == "":
        return BudgetDecision("warn", "warned", warning)
    return BudgetDecision("none", stage, said)


def usage_of(lab: Lab, now: float) -> dict:
    """A lab's figures for the class report: node-hours, cost, peak workers, time busy (live, up to `now`)."""
    from dasklab.core.model import estimate_cost, node_seconds_at
    state = lab.state
    node_s = node_seconds_at(lab, now)
    busy = state.busy_s + (now - state.busy_since if state.busy_since is not None else 0.0)
    lifetime = now - state.created_at
    return {"lab": lab.name, "phase": state.phase, "node_hours": round(node_s / 3600, 4),
            "cost_usd": estimate_cost(lab.spec, lifetime, node_s), "peak_workers": state.peak_workers,
            "busy_s": round(busy, 1), "lifetime_s": round(lifetime, 1), "reason": state.reason,
            "created_at": state.created_at}


_SUMMED = ("node_hours", "cost_usd", "busy_s", "lifetime_s")


def merge_usage(kept: dict | None, usage: dict) -> dict:
    """A student's figures once `usage` (one lab's, keyed by its creation time) is added to those kept: a student
    removed and added again has had two labs, and the report and the class's cost count both. Adding the same
    lab's figures again (a redelivered deletion) replaces them, so nothing is counted twice."""
    runs = dict((kept or {}).get("runs") or ({} if not kept else {str(kept.get("created_at", "")): kept}))
    runs[str(usage.get("created_at", ""))] = {k: v for k, v in usage.items() if k != "runs"}
    latest = max(runs.values(), key=lambda u: u.get("created_at") or 0.0)
    total = {k: round(sum(u.get(k, 0.0) for u in runs.values()), 6) for k in _SUMMED}
    return {**latest, **total, "peak_workers": max(u.get("peak_workers", 0) for u in runs.values()),
            "labs": len(runs), "runs": runs}


def class_usage(record: ClassRecord, labs: dict[str, Lab], now: float) -> dict[str, dict]:
    """Every student's usage: the labs of theirs that are gone (kept in the record) plus the live one."""
    rows = {s: dict(u, phase="gone") for s, u in record.usage.items()}
    for s, why in record.refused.items():  # refused before anything ran: nothing spent, the reason said
        rows.setdefault(s, {"lab": record.lab_name(s), "phase": FAILED, "node_hours": 0.0, "cost_usd": 0.0,
                            "peak_workers": 0, "busy_s": 0.0, "lifetime_s": 0.0, "reason": why})
    for s, lab in labs.items():
        rows[s] = merge_usage(record.usage.get(s), usage_of(lab, now))
    return {s: {k: v for k, v in u.items() if k != "runs"} for s, u in rows.items()}


def class_cost(record: ClassRecord, labs: dict[str, Lab], now: float) -> float:
    return round(sum(u["cost_usd"] for u in class_usage(record, labs, now).values()), 4)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
