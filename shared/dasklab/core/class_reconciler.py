"""The class reconciler: one class one step — observe its labs → plan (plan_class, plan_budget) → act through the lab
reconciler."""

from dataclasses import replace

from dasklab.core import logs
from dasklab.core.context import Part, iso, poisoned
from dasklab.core.errors import PermanentError, TransientError
from dasklab.core.messages import StopLab, parse_command
from dasklab.core.specs import build_spec, build_system_usd_h
from dasklab.core.classes import CLASS_KEPT_S, DEFAULT_LEAD_S, LEAD_SAMPLES, AccessChange, ClassRecord, Classes, \
    class_cost, class_usage, plan_access, plan_budget, plan_class, plan_class_lifetime, plan_lead_time
from dasklab.core.model import DEFAULT_PLACEMENT, FAILED, PROVISIONING, READY, REQUESTED, SHARED, TEARING_DOWN, Lab


class ClassReconciler(Part):
    """One class at a time: its labs started and stopped, ready, over, budget."""

    def store(self) -> Classes:
        if self.classes is None:
            raise PermanentError("this controller has no class store: classes are not available")
        return self.classes

    def fetch_class_labs(self, name: str, labs: list[Lab] | None = None) -> dict[str, Lab]:
        """The class's labs that exist, by student."""
        labs = self.backend.fetch_labs() if labs is None else labs
        return {lab.spec.student: lab for lab in labs if lab.spec.class_name == name}

    def plan_lead(self, record: ClassRecord) -> tuple[float, str]:
        return plan_lead_time(record.lead_samples, DEFAULT_LEAD_S.get(self.config.backend, DEFAULT_LEAD_S["gke"]))

    def _student_spec(self, record: ClassRecord, student: str):
        """A student's lab: the start-lab the class's template gives, built and capped as any start-lab's."""
        template = parse_command(record.template)
        cmd = template.student_lab(student)
        placement = record.placement or DEFAULT_PLACEMENT
        spec = build_spec(cmd, self.config, placement)
        lifetime, note = plan_class_lifetime(cmd.max_lifetime, self.config.default_lifetime_s,
                                             self.config.max_lifetime_s, record.duration_s,
                                             self.plan_lead(record)[0] if record.at is not None else 0.0)
        return replace(spec, class_name=record.name, student=student, placement=placement,
                       access=template.access_of(student), student_identity=template.identities.get(student, ""),
                       class_size=len(record.roster), system_usd_h=build_system_usd_h(
                           self.config, len(record.roster), placement == SHARED),
                       budget_usd=record.budget_student_usd, keep_alive_until=record.keep_alive_until,
                       max_lifetime_s=lifetime, notes=spec.notes + ((note,) if note else ()) + record.notes)

    def reconcile_class(self, record: ClassRecord, mid: str = "", labs: list[Lab] | None = None) -> bool:
        """Observe the class's labs, plan (plan_class, plan_budget), act: each lab one step. False if a lab's step
        is to be retried."""
        store, now = self.store(), self.clock()
        if record.deleted_at is not None and now - record.deleted_at > CLASS_KEPT_S:
            store.apply_forget_class(record)
            return True
        mine = self.fetch_class_labs(record.name, labs)
        gaps = self._unlisted(record)
        if gaps:  # a lab left out of the listing is not ended: nothing is decided from its absence
            logs.emit("WARNING", action="reconcile-class", reason=f"class step later: {', '.join(gaps)} did not "
                      "answer, so the class's labs are not all known", message_id=mid, **{"class": record.name})
            return False
        record = self._enforce_class_budget(record, mine, now, mid)
        lead, _ = self.plan_lead(record)
        unreadable = {s: str(poisoned(self.backend)[("lab", record.lab_name(s))]) for s in record.roster
                      if ("lab", record.lab_name(s)) in poisoned(self.backend)}
        plan = plan_class(record, mine, now, lead, unreadable)
        if plan.ended:
            record = store.apply_class(replace(record, stopped=now, stop_reason=plan.ended))
            logs.decision(record.name, "class-end", list(record.roster), [], plan.ended, mid, **{"class": record.name})
        ok, added, dropped, refused = True, {}, set(), {}
        for student, why in plan.stop:
            if student not in record.roster:  # removed: once added again, a new lab is created
                dropped.add(student)
            ok = self._class_step(record, student, mid, lambda: self._stop_student(mine[student], why, record,
                                                                                   now, mid)) is not None and ok
        if not plan.ended and not record.is_stopped:  # the people of each lab, as the latest start-class names them
            template = parse_command(record.template)
            wanted = {s: (template.access_of(s), template.identities.get(s, "")) for s in record.roster}
            for change in plan_access(wanted, mine):
                ok = self._class_step(record, change.student, mid,
                                      lambda: self._apply_access(mine[change.student], change, mid)) is not None and ok
        for student in plan.start:
            done = self._class_step(record, student, mid,
                                    lambda: self.c.labs.apply_start(self._student_spec(record, student), mid, record.published))
            if done is None:
                ok = False
            elif done:  # refused: the student is shown failed with the reason, the class does not wait for them
                refused[student] = done
            else:
                added[student] = now
        if refused:
            record = store.apply_class(replace(record, refused={**record.refused, **refused}))
            plan = plan_class(record, mine, now, lead, unreadable)
        changes = {}
        if plan.ready:
            changes.update(self._class_ready(record, mine, lead, now, dict(plan.failed)))
        if plan.deleted:
            self._publish_class_deleted(record, now)
            changes["deleted_at"] = now
        if changes or added or dropped & set(record.started):
            if dropped:  # a lab deleted meanwhile wrote its usage: the record is read again
                record = store.fetch_class(record.name) or record
            started = {s: t for s, t in {**record.started, **added}.items() if s not in dropped}
            changes.setdefault("ready_roster", tuple(s for s in record.ready_roster if s not in dropped))
            store.apply_class(replace(record, started=started, **changes))
        return ok

    def _apply_access(self, lab: Lab, change: AccessChange, mid: str) -> None:
        """The lab's in-cluster binding first (compared and written by the backend, where the lab is installed; a lab
        not installed yet gets it from its record), then its record: a failure in between repeats both next pass; a
        record written meanwhile by another step is a ConflictError (retried next pass, compared again)."""
        new = lab.with_spec(access=change.access, student_identity=change.identity)
        apply = getattr(self.backend, "apply_access", None)  # the local backend has no in-cluster identities
        if apply is not None and lab.state.phase not in (REQUESTED, PROVISIONING, FAILED):
            apply(new)
        self.backend.apply_record(new)
        logs.decision(lab.name, "access", list(lab.spec.access), list(change.access), change.reason, mid,
                      **{"class": lab.spec.class_name})

    def _unlisted(self, record: ClassRecord) -> list[str]:
        """What the backend's last listing could not see of this class: unreachable zones, or its labs' (or shared
        cluster's) records unreadable."""
        students = set(record.roster) | set(record.started)
        mine = {("class", record.name)} | {("lab", record.lab_name(s)) for s in students}
        contained = poisoned(self.backend)  # unreadable for good: that student is failed, not awaited
        return [f"zone {z}" for z in getattr(self.backend, "missing_zones", ())] + [
            f"{kind} {name}" for kind, name in getattr(self.backend, "unreadable", ()) if (kind, name) in mine
            and (kind, name) not in contained]

    def _class_step(self, record: ClassRecord, student: str, mid: str, step) -> str | None:
        """One student's step: "" once done; None after a transient failure (retried on the next pass); the reason
        of a refusal (said, and not retried: the lab's own events say the rest)."""
        try:
            step()
            return ""
        except TransientError as e:
            logs.emit("WARNING", action="reconcile-class", lab=record.lab_name(student), reason=f"retry later: {e}",
                      message_id=mid, **{"class": record.name})
            return None
        except PermanentError as e:
            logs.emit("ERROR", action="reconcile-class", lab=record.lab_name(student), reason=str(e), message_id=mid,
                      **{"class": record.name})
            return str(e) or type(e).__name__

    def _stop_student(self, lab: Lab, reason: str, record: ClassRecord, now: float, mid: str) -> None:
        """A normal stop-lab (its tombstone at the class's message time) with the class's reason: graceful, reported
        by lab-deleted."""
        published = record.stopped if record.is_stopped else record.published if lab.spec.student not in \
            record.roster else now
        logs.emit("INFO", action="class-stop-lab", lab=lab.name, reason=reason, message_id=mid,
                  **{"class": record.name})
        self.c.labs.apply_stop(StopLab(lab=lab.name), mid, max(published, lab.state.start_published), reason)

    def _class_ready(self, record: ClassRecord, mine: dict[str, Lab], lead: float, now: float,
                     failed: dict[str, str]) -> dict:
        """Publish class-ready with who connects how (no secret: tokens stay with the backend); returns the record's
        changes (the roster announced, the creation times observed for the lead time)."""
        table = []
        for student in record.roster:
            lab = mine.get(student)
            row = {"student": student, "lab": record.lab_name(student)}
            if lab is not None and lab.state.phase == READY:
                row.update(phase=READY, connection=self.backend.connection_info(lab))
            elif student in failed:
                row.update(phase=FAILED, reason=failed[student])
            else:
                row.update(phase="gone", reason=record.usage.get(student, {}).get("reason", "ended"))
            table.append(row)
        placement = record.placement or DEFAULT_PLACEMENT
        self.events.publish({"event": "class-ready", "class": record.name, "owner": record.owner, "time": now,
                             "placement": placement + ("" if record.placement else " (the default)"),
                             "at": record.at and iso(record.at), "ends_at": record.end and iso(record.end),
                             "lead_time_s": round(lead), "labs": table,
                             "connect": f"dasklab connect --class {record.name}  # the instructor: tokens included"})
        ready = sum(row["phase"] == READY for row in table)
        logs.decision(record.name, "class-ready", list(record.ready_roster), list(record.roster),
                      f"{ready} of {len(table)} lab(s) of class {record.name} ready" +
                      (f", {len(failed)} failed: {', '.join(failed)}" if failed else ""), **{"class": record.name})
        seen = [lab.state.ready_at - lab.state.created_at for s, lab in mine.items()
                if s not in record.ready_roster and lab.state.ready_at is not None]
        return {"ready_roster": tuple(record.roster),
                "lead_samples": (tuple(record.lead_samples) + tuple(round(x, 1) for x in seen))[-LEAD_SAMPLES:]}

    def _publish_class_deleted(self, record: ClassRecord, now: float) -> None:
        usage = class_usage(record, {}, now)
        self.events.publish({
            "event": "class-deleted", "class": record.name, "owner": record.owner, "time": now,
            "reason": record.stop_reason, "students": len(usage),
            "node_hours": round(sum(u["node_hours"] for u in usage.values()), 4),
            "estimated_cost_usd": round(sum(u["cost_usd"] for u in usage.values()), 4),
            "per_student": {s: {"node_hours": u["node_hours"], "estimated_cost_usd": u["cost_usd"]}
                            for s, u in sorted(usage.items())}})
        logs.decision(record.name, "class-deleted", "stopped", "gone", record.stop_reason, **{"class": record.name})

    def _enforce_class_budget(self, record: ClassRecord, mine: dict[str, Lab], now: float,
                              mid: str) -> ClassRecord:
        """The class's budget over all its labs (those gone included): warned, labs to their minimum, class
        stopped."""
        if record.budget_class_usd is None or record.is_stopped:
            return record
        cost = class_cost(record, mine, now)
        decision = plan_budget(cost, record.budget_class_usd, record.budget_stage, "class")
        if decision.action == "none":
            return record
        self.c.labs.publish_budget(decision, cost, record.budget_class_usd,
                             **{"class": record.name, "owner": record.owner})
        logs.decision(record.name, f"class-budget-{decision.action}", record.budget_stage, decision.stage,
                      decision.reason, mid, **{"class": record.name})
        if decision.action == "teardown":
            return self.store().apply_class(replace(record, stopped=now, stop_reason=decision.reason))
        if decision.action == "minimum":
            for lab in mine.values():
                if lab.state.phase != TEARING_DOWN and lab.spec.max_workers > lab.spec.min_workers:
                    self.c.labs.apply_minimum(lab, lab.state.budget_stage, decision.reason, mid)
        return self.store().apply_class(replace(record, budget_stage=decision.stage))
