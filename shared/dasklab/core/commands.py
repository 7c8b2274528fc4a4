"""Command handlers: each message → the decision it asks for, recorded, then the lab's or class's first step; returns
the outcome its sender is told."""

from dataclasses import replace
from datetime import datetime, timezone

from dasklab.core import logs
from dasklab.core.context import ACCEPTED, DONE, NOTHING_TO_DO, Part, iso
from dasklab.core.errors import PermanentError, ValidationError
from dasklab.core.messages import Command, KeepAlive, NightlyTeardown, Reconcile, ReconcileClass, Scale, \
    StartClass, StartLab, StopClass, StopLab, TeardownIdle, UpdateLab
from dasklab.core.specs import build_spec, build_update, check_caps
from dasklab.core.overrides import note_field
from dasklab.core.tombstones import UNPIN, plan_ordered, plan_ordered_limits
from dasklab.core.classes import ClassRecord, wakeup_message
from dasklab.core.model import FAILED, READY, TEARING_DOWN
from dasklab.core.policy import plan_jupyter_restart, plan_update
from dasklab.core.trust import check_authorized, parse_admins
from dasklab.core.config import region_of
from dasklab.core.quotas import REFUSE, WARN, QuotaDecision, build_need, build_reserved, build_scale_need, \
    plan_quota, with_quota_note


class Commands(Part):
    """start-lab, update-lab, stop-lab, keep-alive, scale, start-class, stop-class, and the class wake-up."""

    def handle(self, cmd: Command, message_id: str = "", published: float | None = None,
               request_id: str = "", sender: str | None = None) -> None:
        """Run one command or tick; `published` is its Pub/Sub publishTime (epoch seconds; None: now). A command's
        handler returns its outcome (accepted, done or nothing to do, and why), published for its sender; a
        refusal is raised (PermanentError) and published by the entry point. `sender` is the verified identity the
        HTTPS entry point set; None is a direct publish, which topic IAM allows administrators (and the entry
        point, which always sets it) alone: an administrator's."""
        if sender is not None:
            self.authorize(cmd, sender)
        if isinstance(cmd, (StartLab, StopLab, StartClass, StopClass, UpdateLab, Scale, Reconcile, TeardownIdle,
                            NightlyTeardown)):  # ordered by publishTime; a teardown tick spares labs created after it
            handler = {StartLab: self.start_lab, StopLab: self.c.labs.apply_stop, StartClass: self.start_class,
                       StopClass: self.stop_class, UpdateLab: self.update_lab, Scale: self.scale,
                       Reconcile: self.c.fleet.tick, TeardownIdle: self.c.fleet.tick,
                       NightlyTeardown: self.c.fleet.tick}[type(cmd)]
            outcome = handler(cmd, message_id, published)
        else:
            handler = {KeepAlive: self.keep_alive, ReconcileClass: self.wake_class}[type(cmd)]
            outcome = handler(cmd, message_id)
        if outcome is not None:  # ticks have no sender waiting
            self.publish_outcome(cmd.type, getattr(cmd, "lab", None), message_id, request_id, *outcome,
                                 **{"class": getattr(cmd, "class_", None)})

    def authorize(self, cmd: Command, sender: str) -> None:
        """The trust rules again on the records as read now (defence in depth behind the HTTPS entry point)."""
        import msgspec
        lab = self.backend.fetch_lab(cmd.lab) if getattr(cmd, "lab", None) else None
        klass = self.c.class_steps.store().fetch_class(cmd.class_) if getattr(cmd, "class_", None) else None
        check_authorized(sender, sender in parse_admins(self.config.admins), msgspec.to_builtins(cmd), lab, klass)

    def publish_outcome(self, command: str | None, lab: str | None, message_id: str, request_id: str, outcome: str,
                        reason: str, **extra) -> None:
        """The `command-outcome` status event: what became of the command with this message id, and why."""
        event = {"event": "command-outcome", "command": command, "lab": lab, "outcome": outcome, "reason": reason,
                 "message_id": message_id, "request_id": request_id or None, "time": self.clock(), **extra}
        self.events.publish({k: v for k, v in event.items() if v is not None})

    def start_lab(self, cmd: StartLab, mid: str, published: float | None = None) -> tuple[str, str]:
        def check(spec):  # once the lab is to be created: what it needs at its maximum, against the quotas
            return with_quota_note(spec, self.check_quotas(build_need([spec], self.config)))
        return self.c.labs.apply_start(build_spec(cmd, self.config), mid, published, check)

    def plan_quotas(self, need, labs: list | None = None):
        """plan_quota: the need against the project's quotas as read now (the backend's), beside what the labs that
        exist may still take; None when the backend has no quotas (the local one)."""
        fetch = getattr(self.backend, "fetch_quotas", None)
        try:
            quotas = fetch() if fetch is not None else None
        except PermanentError as e:  # e.g. no compute.regions.get (an IAM not redeployed): said, never blocking
            return QuotaDecision(WARN, f"quota: not checked: {e}")
        if quotas is None:
            return None
        labs = self.backend.fetch_labs() if labs is None else labs
        return plan_quota(need, quotas, build_reserved(labs, self.config), region_of(self.config.location))

    def check_quotas(self, need, labs: list | None = None) -> str:
        """Refused (ValidationError naming each quota short, its limit, usage and the need) before anything is
        created; the warning when it fits only at the current usage; "" when it fits or is not checked."""
        decision = self.plan_quotas(need, labs) if need else None
        if decision is not None and decision.action == REFUSE:
            raise ValidationError("quota", decision.reason)
        return decision.reason if decision is not None and decision.action == WARN else ""

    def class_need(self, cmd: StartClass, adding: list, existing: dict):
        """What a start-class's new labs (`adding`) need; the class's cluster too unless a lab of it exists."""
        cluster_exists = any(lab.spec.class_name == cmd.class_ for lab in existing.values())
        return build_need(adding, self.config, new_cluster=not cluster_exists)

    def class_probe(self, cmd: StartClass) -> ClassRecord:
        """The class a start-class describes (nothing stored): its students' labs are built from it."""
        import msgspec
        return ClassRecord(cmd.class_, roster=tuple(cmd.roster), template=msgspec.to_builtins(cmd),
                           placement=cmd.placement, duration_s=cmd.duration, at=cmd.at.timestamp() if cmd.at else None)

    def preflight_class(self, cmd: StartClass):
        """What `dasklab quota` prints: the decision start-class would take on the quotas now (None: no quotas)."""
        existing = {lab.name: lab for lab in self.backend.fetch_labs()}
        probe = self.class_probe(cmd)
        adding = [spec for spec in (self.c.class_steps._student_spec(probe, s) for s in cmd.roster)
                  if spec.name not in existing]
        return self.plan_quotas(self.class_need(cmd, adding, existing), list(existing.values()))

    def update_lab(self, cmd: UpdateLab, mid: str, published: float | None = None) -> tuple[str, str]:
        """Record the new values as the next revision (after their environment is ready), then converge: the
        backend replaces what they change, step by step, on this and the following reconcile passes. An update-lab
        published before the lab's start-lab or its latest applied update-lab changes nothing."""
        lab = self.backend.fetch_lab(cmd.lab)
        if lab is None:
            raise PermanentError(f"no lab named {cmd.lab}: start it with start-lab")
        if mid and mid in lab.state.update_ids:
            logs.emit("INFO", lab=lab.name, action="update-lab", reason="message already applied: a redelivery",
                      message_id=mid)
            return NOTHING_TO_DO, "message already applied: a redelivery"
        older, why = plan_ordered("update-lab", published, lab.state.start_published, lab.state.update_published)
        if older:
            logs.emit("INFO", lab=lab.name, action="update-lab", reason=why, message_id=mid)
            return NOTHING_TO_DO, why
        if lab.state.phase in (TEARING_DOWN, FAILED):
            raise PermanentError(f"lab {lab.name} is {lab.state.phase}: nothing to update")
        new = build_update(cmd, lab.spec, self.config)
        verdict, reason = plan_update(lab.spec, new, cmd.restart)
        if verdict == "refuse":
            raise ValidationError("restart", reason)
        if verdict == "duplicate":
            if (published or 0.0) > lab.state.update_published:  # the newest now: an older one later changes nothing
                self.backend.apply_record(lab.with_state(update_published=published))
            logs.emit("INFO", lab=lab.name, action="update-lab", reason=reason, message_id=mid)
            return NOTHING_TO_DO, reason
        jupyter = plan_jupyter_restart(lab.spec, new)  # said again in lab-updated: the kernels' state goes
        if jupyter:
            new = replace(new, notes=new.notes + (f"revision {lab.spec.revision + 1}: {jupyter}",))
        self.backend.apply_environment(new)
        before = lab.spec.revision
        ids = (lab.state.update_ids + ((mid,) if mid else ()))[-20:]
        lab = self.backend.apply_record(replace(lab, spec=replace(new, revision=before + 1)).with_state(
            revision_workers=lab.state.target_workers, update_ids=ids,
            update_published=max(published or 0.0, lab.state.update_published)))
        logs.decision(lab.name, "update", before, lab.spec.revision, reason, mid, notes=list(new.notes) or None)
        if lab.state.phase == READY:
            self.c.labs.step_now(lab, mid)
        return ACCEPTED, f"revision {lab.spec.revision} recorded ({reason}); lab-updated follows"

    def keep_alive(self, cmd: KeepAlive, mid: str) -> tuple[str, str]:
        now = self.clock()
        until = cmd.deadline(now)
        if until <= now:
            raise ValidationError("until", "must be in the future")
        if cmd.class_ is not None:
            return self.keep_class_alive(cmd, until, mid)
        lab = self.c.labs.fetch_lab_or_none(cmd.lab, "keep-alive", mid)
        if lab is None:
            return NOTHING_TO_DO, f"no lab named {cmd.lab}"
        if lab.spec.keep_alive_until is not None and lab.spec.keep_alive_until >= until:
            logs.emit("INFO", lab=lab.name, action="keep-alive", reason="already kept alive that long",
                      message_id=mid)
            return NOTHING_TO_DO, f"already kept alive until {iso(lab.spec.keep_alive_until)}"
        self.backend.apply_record(lab.with_spec(keep_alive_until=until))
        logs.decision(lab.name, "keep-alive", lab.spec.keep_alive_until, until, "keep-alive requested", mid)
        cap = lab.state.created_at + lab.spec.max_lifetime_s
        capped = f"; its maximum lifetime still ends it at {iso(cap)}" if cap < until else ""
        return DONE, f"kept alive until {iso(until)}{capped}"

    def scale(self, cmd: Scale, mid: str, published: float | None = None) -> tuple[str, str]:
        """New worker limits. Each limit (min, max, pin) keeps the publish time of the scale that set it last: a scale
        published before the lab's start-lab changes nothing, and an older one changes only the limits no newer
        scale has set (the others are said)."""
        check_caps(cmd, self.config)
        lab = self.c.labs.fetch_lab_or_none(cmd.lab, "scale", mid)
        if lab is None:
            return NOTHING_TO_DO, f"no lab named {cmd.lab}"
        asked = {"min": cmd.min, "max": cmd.max, "pin": UNPIN if cmd.unpin else cmd.pin}
        asked = {k: v for k, v in asked.items() if v is not None}
        stamps = lab.state.scale_published
        kept, why = plan_ordered_limits(published, lab.state.start_published, stamps, tuple(asked))
        if not kept:
            logs.emit("INFO", lab=lab.name, action="scale", reason=why, message_id=mid)
            return NOTHING_TO_DO, why
        spec, asked = lab.spec, {k: v for k, v in asked.items() if k in kept}
        new = replace(spec, min_workers=asked.get("min", spec.min_workers),
                      max_workers=asked.get("max", spec.max_workers),
                      pinned_workers=None if asked.get("pin") == UNPIN else asked.get("pin", spec.pinned_workers))
        if new.min_workers > new.max_workers:
            raise ValidationError("min", f"min ({new.min_workers}) must be ≤ max ({new.max_workers})")
        if new.pinned_workers is not None and not new.min_workers <= new.pinned_workers <= new.max_workers:
            raise ValidationError("pin", f"{new.pinned_workers} must be between min ({new.min_workers}) "
                                         f"and max ({new.max_workers})")
        if new.nodes_for(new.max_workers) > self.config.max_nodes:
            raise ValidationError("max", f"{new.max_workers} workers need {new.nodes_for(new.max_workers)} nodes, "
                                         f"above the controller cap max_nodes={self.config.max_nodes}")
        if new.max_workers > spec.max_workers:  # what the higher maximum adds, against the quotas
            note = self.check_quotas(build_scale_need(spec, new, self.config))
            new, why = with_quota_note(new, note), "; ".join(w for w in (why, note) if w)
        stamped = {**stamps, **{k: max(published, stamps.get(k, 0.0)) for k in kept}} if published else stamps
        said = f"; {why}" if why else ""
        if new == spec:
            if stamped != stamps:  # the newest scale now: an older one arriving later changes nothing
                self.backend.apply_record(lab.with_state(scale_published=stamped))
            logs.emit("INFO", lab=lab.name, action="scale", reason="limits unchanged" + said, message_id=mid)
            return NOTHING_TO_DO, "limits unchanged" + said
        lab = self.backend.apply_record(replace(lab, spec=new).with_state(scale_published=stamped))
        logs.decision(lab.name, "limits", [spec.min_workers, spec.max_workers, spec.pinned_workers],
                      [new.min_workers, new.max_workers, new.pinned_workers], "scale requested" + said, mid)
        if lab.state.phase == READY:
            self.c.labs.step_now(lab, mid)
        pin = "" if new.pinned_workers is None else f", pinned at {new.pinned_workers}"
        return DONE, f"limits now min {new.min_workers}, max {new.max_workers}{pin}; workers follow{said}"

    def start_class(self, cmd: StartClass, mid: str, published: float | None = None) -> tuple[str, str]:
        """Record the class (roster, template, at, duration, budgets), then one class step: the labs missing are
        created (now, or a lead time before `at`), those of students no longer listed stopped gracefully."""
        store, now = self.c.class_steps.store(), self.clock()
        published = now if published is None else published
        if cmd.duration is not None and cmd.duration > self.config.max_lifetime_s:
            raise ValidationError("duration", f"{cmd.duration}s is above the controller cap max_lifetime="
                                              f"{self.config.max_lifetime_s}s: no lab may run that long")
        probe = self.class_probe(cmd)
        existing = {lab.name: lab for lab in self.backend.fetch_labs()}
        adding = []  # the labs this start-class creates
        for i, student in enumerate(cmd.roster):  # every lab validated as a start-lab before anything is written
            spec = self.c.class_steps._student_spec(probe, student)
            if spec.name not in existing:
                adding.append(spec)
            lifetime_notes = [n for n in spec.notes if note_field(n) in ("duration", "max_lifetime")]
            other = existing.get(spec.name)
            if other is not None and (other.spec.class_name, other.spec.owner) != (cmd.class_, cmd.owner):
                raise ValidationError(f"roster[{i}]", f"lab {spec.name} exists and is not a lab of class "
                                                      f"{cmd.class_} (owner {other.spec.owner}): rename the student")
        record = store.fetch_class(cmd.class_)
        if record is not None and record.stopped is not None and published < record.stopped:
            why = (f"start-class published at {iso(published)}, before the class's stop at {iso(record.stopped)}: "
                   "the stop wins; send a new start-class to start the class again")
            logs.emit("INFO", action="start-class", reason=why, message_id=mid, **{"class": cmd.class_})
            return NOTHING_TO_DO, why
        if record is not None and published < record.published:
            why = (f"start-class published at {iso(published)}, before the one the class stands for "
                   f"({iso(record.published)}): the newer one stays")
            logs.emit("INFO", action="start-class", reason=why, message_id=mid, **{"class": cmd.class_})
            return NOTHING_TO_DO, why
        if record is not None and not record.is_stopped and record.owner != cmd.owner:
            raise ValidationError("owner", f"class {cmd.class_} exists and belongs to {record.owner}")
        # what its new labs need at their maximum against the quotas, before anything is written (refused: raised)
        quota_note = self.check_quotas(self.class_need(cmd, adding, existing), list(existing.values()))
        fresh = record is None or record.is_stopped
        base = record if not fresh else ClassRecord(
            cmd.class_, created_at=now, stopped=record and record.stopped, version=record.version if record else "",
            lead_samples=record.lead_samples if record else ())
        new = replace(base, owner=cmd.owner, roster=tuple(cmd.roster), template=probe.template, refused={},
                      at=cmd.at.timestamp() if cmd.at else None, duration_s=cmd.duration,
                      budget_student_usd=cmd.budget.student, budget_class_usd=cmd.budget.class_,
                      placement=cmd.placement, published=published,
                      notes=(quota_note,) if quota_note else () if adding else base.notes)
        if not fresh and replace(new, published=record.published) == record:
            if published > record.published:
                store.apply_class(new)
            logs.emit("INFO", action="start-class", reason="class unchanged", message_id=mid, **{"class": new.name})
            self.c.class_steps.reconcile_class(store.fetch_class(new.name) or new, mid)
            return NOTHING_TO_DO, f"class {new.name} unchanged: its {len(new.roster)} lab(s) are as asked"
        new = store.apply_class(new)
        before = set() if fresh else set(record.roster)
        added, removed = [s for s in new.roster if s not in before], sorted(before - set(new.roster))
        logs.decision(new.name, "start-class", sorted(before), list(new.roster), "start-class", mid,
                      **{"class": new.name})
        lead, lead_why = self.c.class_steps.plan_lead(new)
        if self.wakeups is not None:  # set, moved, or dropped when the new start-class has no such time
            starts = new.at - lead if new.at is not None and new.at - lead > now else None
            for key, when in ((f"{new.name}-start", starts), (f"{new.name}-end", new.end)):
                if when is not None:
                    self.wakeups.apply_wakeup(key, when, wakeup_message(new.name))
                elif record is not None:
                    self.wakeups.apply_cancel(key)
        self.c.class_steps.reconcile_class(new, mid)
        parts = [f"class {new.name}: {len(new.roster)} student(s)"]
        if added:
            when = f"provisioning starts at {iso(new.at - lead)} ({lead_why}) to be ready at {iso(new.at)}" \
                if new.at is not None and new.at - lead > now else "provisioning"
            parts.append(f"{len(added)} lab(s) added ({', '.join(added)}): {when}")
        if removed:
            parts.append(f"{len(removed)} lab(s) removed gracefully ({', '.join(removed)})")
        if new.end is not None:
            parts.append(f"the labs end at {iso(new.end)}")
        parts += lifetime_notes + list(new.notes)  # the same for every student: said once
        return ACCEPTED, "; ".join(parts) + "; class-ready follows"

    def stop_class(self, cmd: StopClass, mid: str, published: float | None = None) -> tuple[str, str]:
        """Every lab of the class stopped gracefully; the stop is kept, so an older start-class never restarts it."""
        store, now = self.c.class_steps.store(), self.clock()
        published = now if published is None else published
        record = store.fetch_class(cmd.class_)
        if record is None:  # kept as a tombstone: a start-class published before it must not start the class
            store.apply_class(ClassRecord(cmd.class_, created_at=now, stopped=published, deleted_at=now,
                                          stop_reason="stop-class requested"))
            return NOTHING_TO_DO, f"no class named {cmd.class_}"
        if published < record.published:
            why = (f"stop-class published at {iso(published)}, before the start-class the class stands for "
                   f"({iso(record.published)}): the class stays")
            logs.emit("INFO", action="stop-class", reason=why, message_id=mid, **{"class": record.name})
            return NOTHING_TO_DO, why
        already = record.is_stopped
        if record.stopped is None or record.stopped < published:
            record = store.apply_class(replace(record, stopped=published, stop_reason=record.stop_reason if already
                                               else "stop-class requested"))
        if self.wakeups is not None:
            for key in (f"{record.name}-start", f"{record.name}-end"):
                self.wakeups.apply_cancel(key)
        labs = self.c.class_steps.fetch_class_labs(record.name)
        self.c.class_steps.reconcile_class(record, mid)
        if already:
            return NOTHING_TO_DO, f"class {record.name} already stopped ({record.stop_reason})"
        logs.decision(record.name, "stop-class", list(record.roster), [], "stop-class requested", mid,
                      **{"class": record.name})
        return ACCEPTED, f"class {record.name}: teardown of {len(labs)} lab(s) started; class-deleted follows"

    def keep_class_alive(self, cmd: KeepAlive, until: float, mid: str) -> tuple[str, str]:
        """keep-alive for every lab of the class, and for the labs it creates later."""
        store = self.c.class_steps.store()
        record = store.fetch_class(cmd.class_)
        if record is None or record.is_stopped:
            return NOTHING_TO_DO, f"no class named {cmd.class_}"
        if (record.keep_alive_until or 0) < until:
            record = store.apply_class(replace(record, keep_alive_until=until))
        labs = [lab for lab in self.c.class_steps.fetch_class_labs(record.name).values() if lab.state.phase != TEARING_DOWN]
        for lab in labs:
            self.keep_alive(KeepAlive(lab=lab.name, until=datetime.fromtimestamp(until, timezone.utc)), mid)
        return DONE, f"class {record.name}: {len(labs)} lab(s) kept alive until {iso(until)}, and any started later"

    def wake_class(self, cmd: ReconcileClass, mid: str) -> None:
        """A class's wake-up (a lead time before `at`, its end): one step of that class now."""
        record = self.c.class_steps.store().fetch_class(cmd.class_)
        if record is not None:
            self.c.class_steps.reconcile_class(record, mid)
        if self.wakeups is not None:
            # A Cloud Scheduler job's cron (`M H D Mon *`) fires every year, so a handled wake-up is deleted here,
            # after the step (if the step raises, the message is retried and the jobs stay). Every wake-up of a
            # class sends this same message and the step is level-based on the time, so each wake-up of the class
            # whose time has passed is done with, whichever fired. Here, not on the minute tick: two calls per
            # wake-up, none per tick. One whose message was lost fires a year on and is deleted then.
            for key in (f"{cmd.class_}-start", f"{cmd.class_}-end"):
                self.wakeups.apply_expire(key, self.clock())
