"""The lab reconciler: one lab one step — observe (backend) → plan (policy) → act under the lab's lease; its budget, its
creation and its stop."""

import zlib
from contextlib import contextmanager
from dataclasses import replace

from dasklab.core import logs
from dasklab.core.context import ACCEPTED, NOTHING_TO_DO, Part, iso
from dasklab.core.errors import ConflictError, JupyterUnreachable, LeaseHeld, PermanentError, SchedulerUnreachable, \
    StepRefused, TransientError
from dasklab.core.environment import environment_record
from dasklab.core.messages import StopLab
from dasklab.core.overrides import note_field
from dasklab.core.tombstones import plan_stop_outdated, plan_superseded
from dasklab.core.classes import BudgetDecision, plan_budget, usage_of
from dasklab.core.model import FAILED, PROVISIONING, READY, TEARING_DOWN, Lab, LabState, estimate_cost, \
    node_seconds_at
from dasklab.core.policy import HOLD, plan_health, plan_health_probe, plan_idle_check, plan_provision_step, \
    plan_retirement, plan_scale, plan_start, plan_teardown


BUDGET_EVENTS = {"warn": "budget-warning", "minimum": "budget-minimum", "teardown": "budget-reached"}


class LabReconciler(Part):
    """One lab at a time: its state machine, autoscaling, rollout, health, budget, teardown."""

    def reconcile_lab(self, lab: Lab, tick: str, mid: str = "", idle: bool | None = None) -> None:
        """Move one lab one step: teardown if a tick says so, else autoscale a ready lab or advance its phase.
        With `idle` (default: on a teardown-idle tick) a lab without work is asked since when it is idle, and
        Jupyter is read once the scheduler alone would let the lab go."""
        now = self.clock()
        phase = lab.state.phase
        if lab.state.lease_holder not in ("", self.holder) and now < lab.state.lease_until:
            raise LeaseHeld(f"lab {lab.name} is being acted on by {lab.state.lease_holder} (lease until "
                            f"{iso(lab.state.lease_until)}): left to it")
        if phase != TEARING_DOWN and lab.spec.budget_usd is not None:
            lab = self._enforce_lab_budget(lab, now, mid)
            if lab is None:
                return
        if phase != TEARING_DOWN:
            idle = tick == "teardown-idle" if idle is None else idle
            load = self._load_or_none(lab, idle, now) if phase == READY else None
            verdict = plan_teardown(tick, lab.spec, lab.state, load, now)
            if verdict.delete and verdict.cause == "idle":
                verdict = plan_teardown(tick, lab.spec, lab.state, load, now, self._jupyter_or_none(lab))
            if verdict.delete:
                self.begin_teardown(lab, verdict.reason, mid)
                return
            if tick != "reconcile":
                logs.emit("INFO", lab=lab.name, action="keep", tick=tick, reason=verdict.reason, message_id=mid)
                return
            if load is not None and lab.spec.revision != lab.state.revision:
                self._roll_out(lab, load, mid)  # no autoscaling while workers are being replaced
                return
            if load is not None:
                self._autoscale(lab, load, mid)
                return
        self._advance(lab, now, mid)

    def _advance(self, lab: Lab, now: float, mid: str) -> None:
        """One step of the lifecycle state machine (provisioning, installing, failure, deletion)."""
        step = plan_provision_step(lab.state.phase, self.backend.fetch_infra(lab))
        if step.action == "none":
            return
        if step.action == "forget":
            if self.backend.apply_forget(lab):  # False: another invocation forgot it (and said so) first
                logs.decision(lab.name, "forget", lab.state.phase, "gone", step.reason, mid)
            return
        if step.action not in ("provision", "install", "delete"):  # a wait, or a phase the infra decided: no act
            return self._advance_step(lab, step, now, mid)
        with self._acting(lab) as lab:
            self._advance_step(lab, step, now, mid)

    def _advance_step(self, lab: Lab, step, now: float, mid: str) -> None:
        if step.action == "provision":
            self.backend.apply_provision(lab)
        elif step.action == "install":
            self.backend.apply_install(lab)
        elif step.action == "delete":
            self._publish_deleted(lab, now)  # events are at least once: published before the act they report
            self.backend.apply_delete(lab)
        if step.phase == lab.state.phase:
            return
        before = lab.state.phase
        changes = {"phase": step.phase, "reason": step.reason}
        if step.phase == READY:
            changes["ready_at"] = now
        if step.phase == READY:  # published before the phase is recorded: a crash between repeats it, never loses it
            self.events.publish({"event": "lab-ready", "lab": lab.name, "owner": lab.spec.owner, "time": now,
                                 "connection": self.backend.connection_info(lab), "revision": lab.spec.revision,
                                 "environment": self._environment(lab), "notes": list(lab.spec.notes)})
        elif step.phase == FAILED:
            self.events.publish({"event": "lab-failed", "lab": lab.name, "owner": lab.spec.owner, "time": now,
                                 "reason": step.reason})
        try:
            lab = self.backend.apply_record(self.accounted(lab, now).with_state(**changes))
        except ConflictError:  # a command recorded a decision meanwhile (keep-alive, scale): the phase is the infra's
            fresh = self.backend.fetch_lab(lab.name)
            if fresh is None or fresh.state.phase != before:
                raise
            lab = self.backend.apply_record(self.accounted(fresh, now).with_state(**changes))
        logs.decision(lab.name, step.action, before, step.phase, step.reason, mid)

    def _roll_out(self, lab: Lab, load, mid: str) -> None:
        """One step of an update; once the backend runs the new revision everywhere, say so and record it. Until
        then the workers' health is read on every pass: a replacement that cannot start (its packages fail to
        install, its image cannot be pulled, no node for it) holds the rollout, and the lab says why."""
        with self._acting(lab) as leased:
            done = self.backend.apply_update(leased)
        lab = self.backend.fetch_lab(lab.name) or lab  # as the act and the lease given back left it
        if not done:
            self._check_health(lab, load, self.backend.fetch_requested(lab), self.clock(), mid, rolling=True)
            return
        spec, before = lab.spec, lab.state.revision
        self.events.publish({"event": "lab-updated", "lab": lab.name, "owner": spec.owner, "time": self.clock(),
                             "revision": spec.revision, "from_revision": before,
                             "environment": self._environment(lab), "notes": list(spec.notes)})
        lab = self.backend.apply_record(lab.with_state(revision=spec.revision))
        logs.decision(lab.name, "updated", before, spec.revision, f"revision {spec.revision} runs everywhere", mid)

    def _autoscale(self, lab: Lab, load, mid: str) -> None:
        now = self.clock()
        requested = self.backend.fetch_requested(lab)
        lab = self._check_health(lab, load, requested, now, mid)
        decision = plan_scale(lab.spec, lab.state, load, requested, now, self.params)
        usage = _usage_changes(lab.state, load.busy, decision.target, now)
        if decision.target != lab.state.target_workers or decision.remember or usage:
            before = lab.state.target_workers
            changes = dict(decision.remember, target_workers=decision.target, **usage)
            lab = self.backend.apply_record(self.accounted(lab, now).with_state(**changes))
            if decision.action != HOLD:
                logs.decision(lab.name, f"scale-{decision.action}", before, decision.target, decision.reason, mid,
                              nodes=[lab.spec.nodes_for(before), lab.spec.nodes_for(decision.target)])
        self._converge(lab, load, requested, mid)

    def _check_health(self, lab: Lab, load, requested: int, now: float, mid: str, rolling: bool = False) -> Lab:
        """Say why workers are missing: a lab-degraded event once per new set of causes, lab-recovered once none is
        left, both recorded on the lab. The backend is asked only while workers are missing, are being replaced, have
        just started (the lab's first HEALTH_RECENT_S: a package that failed to install), or the lab is degraded
        (nothing extra at rest); memory pressure comes from the load itself."""
        state = lab.state
        ask = plan_health_probe(state, load.workers, requested, now, rolling,
                                getattr(self.backend, "installs_at_start", False))
        problems = self.backend.fetch_worker_health(lab) if ask else ()
        verdict = plan_health(lab.spec, state, load, problems, now)
        if verdict.action == HOLD:
            return lab
        self.events.publish({"event": f"lab-{verdict.action}", "lab": lab.name, "owner": lab.spec.owner, "time": now,
                             "reason": verdict.reason, "causes": [c for c in verdict.causes.split("+") if c],
                             "workers": {"joined": load.workers, "requested": requested,
                                         "target": state.target_workers}})  # at least once: before the record
        lab = self.backend.apply_record(self.accounted(lab, now).with_state(
            degraded=verdict.causes, degraded_reason=verdict.reason if verdict.causes else ""))
        logs.decision(lab.name, verdict.action, state.degraded or "healthy", verdict.causes or "healthy",
                      verdict.reason, mid)
        return lab

    def _converge(self, lab: Lab, load, requested: int, mid: str) -> None:
        """Move the backend toward the recorded target: start missing workers, retire extra ones, else settle."""
        target = lab.state.target_workers
        if requested < target:
            with self._acting(lab) as lab:
                self.backend.apply_workers(lab, target)
        elif load.workers > target and load.workers >= requested:
            with self._acting(lab) as lab:  # workers chosen under the lease: nobody else retires meanwhile
                workers = self.backend.dashboard(lab).fetch_workers()
                chosen = plan_retirement(workers, len(workers) - target)
                if chosen:
                    self.backend.apply_scale_down(lab, chosen, target)
                    logs.emit("INFO", lab=lab.name, action="retire", reason=f"{len(workers)} → {target} workers",
                              workers=chosen, message_id=mid)
        else:
            self.backend.apply_settle(lab)

    @contextmanager
    def _acting(self, lab: Lab):
        """Hold the lab's lease while acting on it: taken with the record's compare-and-swap (ConflictError if another
        invocation wrote the record since it was read), given back after the act (it expires by itself otherwise,
        so a holder that died is taken over). Yields the lab as leased (its new version)."""
        now = self.clock()
        leased = self.backend.apply_record(lab.with_state(lease_holder=self.holder,
                                                          lease_until=now + self.config.lease_s))
        try:
            yield leased
        finally:
            try:
                current = self.backend.fetch_lab(lab.name)
                if current is not None and current.state.lease_holder == self.holder:
                    self.backend.apply_record(current.with_state(lease_holder="", lease_until=0.0))
            except TransientError as e:  # it expires at lease_until
                logs.emit("WARNING", lab=lab.name, action="lease", reason=f"not given back, expires: {e}")

    def apply_failed(self, lab: Lab, reason: str, mid: str) -> None:
        """A lab the cloud refuses to manage goes to failed with the refusal as its reason (published first); the
        teardown-idle tick then deletes it. A lab already failed or tearing down only gets an ERROR line."""
        try:
            lab = self.backend.fetch_lab(lab.name) or lab  # the step may have recorded a decision before the refusal
            if lab.state.phase in (FAILED, TEARING_DOWN):
                logs.emit("ERROR", lab=lab.name, action="refused", reason=reason, message_id=mid)
                return
            now = self.clock()
            self.events.publish({"event": "lab-failed", "lab": lab.name, "owner": lab.spec.owner, "time": now,
                                 "reason": reason})
            self.backend.apply_record(self.accounted(lab, now).with_state(phase=FAILED, reason=reason))
        except TransientError as e:  # the next pass meets the refusal again and records it then
            logs.emit("WARNING", lab=lab.name, action="mark-failed", reason=f"retry later: {e}", message_id=mid)
            return
        logs.emit("ERROR", lab=lab.name, action="mark-failed", **{"from": lab.state.phase, "to": FAILED},
                  reason=reason, message_id=mid)

    def apply_start(self, spec, mid: str, published: float | None, check=None) -> tuple[str, str]:
        """Create the lab of this spec unless it exists or a later stop-lab says otherwise (start-lab and classes).
        `check(spec)`, if given, runs only when the lab is to be created: it refuses it (raises) or returns the spec
        to create (e.g. with a note)."""
        now = self.clock()
        timed, published = published is not None, now if published is None else published
        stopped = self.fetch_stopped(spec.name, now)
        existing = self.backend.fetch_lab(spec.name)
        late, why = plan_superseded(published, stopped)
        if late:  # a redelivered (or overtaken) start-lab: the lab's later stop-lab wins
            logs.emit("INFO", lab=spec.name, action="start-lab", reason=why, message_id=mid)
            if existing is not None and existing.state.phase != TEARING_DOWN and \
                    existing.state.start_published < stopped:  # created by a start-lab that raced the stop-lab
                self.begin_teardown(existing, why, mid)
            return NOTHING_TO_DO, why
        verdict, reason = plan_start(existing and existing.spec, spec)
        if verdict == "conflict":
            raise PermanentError(reason)
        if verdict == "duplicate" and timed and published > existing.state.start_published:  # a newer start-lab
            if existing.state.phase == TEARING_DOWN:  # once the old lab is gone
                raise TransientError(f"lab {spec.name} is being torn down: this start-lab is retried until it is "
                                     "gone")
            # the lab stands for this start-lab now: a stop-lab published before it leaves the lab alone
            self.backend.apply_record(existing.with_state(start_published=published))
        if verdict == "create":
            spec = check(spec) if check is not None else spec
            self.backend.apply_environment(spec)  # e.g. a pip install that fails: refused before anything exists
            now = self.clock()
            lab = Lab(spec, LabState(phase=PROVISIONING, created_at=now, last_accounted=now,
                                     target_workers=spec.initial_workers, start_published=published,
                                     peak_workers=spec.initial_workers))
            try:
                created = self.backend.apply_create(lab)
            except PermanentError as e:  # refused (a quota, a permission): the owner hears it, then the sender
                self.events.publish({"event": "lab-failed", "lab": spec.name, "owner": spec.owner, "time": now,
                                     "reason": str(e)})
                logs.emit("ERROR", lab=spec.name, action="create", **{"from": "gone", "to": FAILED}, reason=str(e),
                          message_id=mid)
                raise
            if not created:
                verdict, reason = "duplicate", "created concurrently by another invocation"
            else:
                logs.decision(spec.name, "create", "gone", PROVISIONING, reason, mid, owner=spec.owner,
                              workers=[spec.min_workers, spec.initial_workers, spec.max_workers])
                for note in spec.notes:  # each override of the request, said once, at create
                    logs.emit("WARNING", lab=spec.name, action="override", field=note_field(note), reason=note,
                              message_id=mid)
                # a stop-lab that ran meanwhile wrote its tombstone before looking for the lab: it saw this lab
                # or this read sees its tombstone
                late, why = plan_superseded(published, self.fetch_stopped(spec.name, now))
                if late and (created := self.backend.fetch_lab(spec.name)) is not None:
                    self.begin_teardown(created, why, mid)
                    return NOTHING_TO_DO, why
                notes = "".join(f"; note: {note}" for note in spec.notes)
                return ACCEPTED, f"{reason}: provisioning {spec.initial_workers} worker(s), min {spec.min_workers}, " \
                                 f"max {spec.max_workers}; lab-ready follows{notes}"
        logs.emit("INFO", lab=spec.name, action="start-lab", reason=reason, message_id=mid)
        return NOTHING_TO_DO, reason

    def apply_stop(self, cmd: StopLab, mid: str, published: float | None = None,
                 reason: str = "stop-lab requested", step: bool = True) -> tuple[str, str]:
        """Tear the lab down; `reason` is recorded on it (its lab-deleted and class report say it). With `step`
        False the teardown is only recorded: the next pass takes its steps."""
        if self.tombstones is not None:  # first, so an older start-lab (redelivered, or overtaken) never recreates
            now = self.clock()
            try:
                self.tombstones.apply_stopped(cmd.lab, now if published is None else published, now)
            except PermanentError as e:  # a store refusing for good (no database, no permission): still stop
                logs.emit("ERROR", lab=cmd.lab, action="tombstone", reason=f"not kept: {e}", message_id=mid)
        lab = self.fetch_lab_or_none(cmd.lab, "stop-lab", mid)
        if lab is None:
            return NOTHING_TO_DO, f"no lab named {cmd.lab}"
        outdated, why = plan_stop_outdated(self.clock() if published is None else published,
                                           lab.state.start_published)
        if outdated:
            logs.emit("INFO", lab=lab.name, action="stop-lab", reason=why, message_id=mid)
            return NOTHING_TO_DO, why
        already = lab.state.phase == TEARING_DOWN
        self.begin_teardown(lab, reason, mid, step)  # already tearing down: the next step, as a tick would
        if already:
            return NOTHING_TO_DO, "already being torn down"
        return ACCEPTED, f"teardown started ({lab.state.phase} → {TEARING_DOWN}); lab-deleted follows"

    def fetch_stopped(self, name: str, now: float) -> float | None:
        return self.tombstones.fetch_stopped(name, now) if self.tombstones is not None else None

    def fetch_lab_or_none(self, name: str, action: str, mid: str) -> Lab | None:
        lab = self.backend.fetch_lab(name)
        if lab is None:
            logs.emit("INFO", lab=name, action=action, reason="no such lab: nothing to do", message_id=mid)
        return lab

    def _enforce_lab_budget(self, lab: Lab, now: float, mid: str) -> Lab | None:
        """A student's budget: warned, then down to its minimum, then torn down (None: teardown begun)."""
        cost = estimate_cost(lab.spec, now - lab.state.created_at, node_seconds_at(lab, now))
        decision = plan_budget(cost, lab.spec.budget_usd, lab.state.budget_stage, "lab")
        if decision.action == "none":
            return lab
        who = {"lab": lab.name, "owner": lab.spec.owner, "class": lab.spec.class_name or None,
               "student": lab.spec.student or None}
        self.publish_budget(decision, cost, lab.spec.budget_usd,
                             **{k: v for k, v in who.items() if v})
        if decision.action == "teardown":
            self.begin_teardown(lab, decision.reason, mid)
            return None
        if decision.action == "minimum":
            return self.apply_minimum(lab, decision.stage, decision.reason, mid)
        logs.decision(lab.name, "budget-warning", lab.state.budget_stage, decision.stage, decision.reason, mid)
        return self.backend.apply_record(lab.with_state(budget_stage=decision.stage))

    def apply_minimum(self, lab: Lab, stage: str, reason: str, mid: str) -> Lab:
        """The lab's workers down to its minimum (gracefully, by the autoscaler), and kept there."""
        spec = lab.spec
        lab = self.backend.apply_record(replace(lab, spec=replace(spec, max_workers=spec.min_workers,
                                                                  pinned_workers=None)).with_state(budget_stage=stage))
        logs.decision(lab.name, "budget-minimum", spec.max_workers, spec.min_workers, reason, mid)
        return lab

    def publish_budget(self, decision: BudgetDecision, cost: float, budget: float, **who) -> None:
        """The budget step's event, after the warning it went past (if it did: each owner is warned first)."""
        steps = ([("warn", decision.passed_warning)] if decision.passed_warning else []) + \
            [(decision.action, decision.reason)]
        for action, reason in steps:
            self.events.publish({"event": BUDGET_EVENTS[action], **who, "time": self.clock(),
                                 "estimated_cost_usd": cost, "budget_usd": budget, "reason": reason})

    def _environment(self, lab: Lab) -> dict:
        """The lab's environment for its events; on GKE with the chart version that names the default images."""
        gke = self.config.backend == "gke"
        return environment_record(lab.spec.values, self.config.chart_version if gke else "",
                                  (lab.spec.dask_version or self.config.dask_version) if gke else "")

    def _load_or_none(self, lab: Lab, idle: bool, now: float):
        """The scheduler's load; with `idle`, and if idleness could end the lab now, when it became idle."""
        try:
            dashboard = self.backend.dashboard(lab)
            load = dashboard.fetch_load(idle=False)
            if idle and plan_idle_check(lab.spec, lab.state, load, now):
                load = replace(load, idle_since=dashboard.fetch_idle_since())
            return load
        except SchedulerUnreachable as e:
            logs.emit("WARNING", lab=lab.name, action="observe", reason=f"scheduler unreachable: {e}")
            return None

    def _jupyter_or_none(self, lab: Lab):
        """What the lab's Jupyter reports (NO_JUPYTER when it runs none); None when it does not answer."""
        try:
            return self.backend.fetch_jupyter(lab)
        except JupyterUnreachable as e:
            logs.emit("WARNING", lab=lab.name, action="observe", reason=f"Jupyter unreachable: {e}")
            return None

    def begin_teardown(self, lab: Lab, reason: str, mid: str, step: bool = True) -> None:
        now = self.clock()
        if lab.state.phase != TEARING_DOWN:
            before = lab.state.phase
            lab = self.backend.apply_record(self.accounted(lab, now).with_state(phase=TEARING_DOWN, reason=reason))
            logs.decision(lab.name, "teardown", before, TEARING_DOWN, reason, mid)
        if step:
            self.step_now(lab, mid)

    def contain(self, name: str, owner: str, reason: str, mid: str, trace: str | None = None,
                 cause: str = "error") -> None:
        """A lab this pass cannot handle (its record unreadable, an unexpected error, a step refused): logged with
        its traceback on every pass, and said once per distinct reason in a lab-degraded event (what was said is
        kept in the reports store, so a new function instance does not say it again); the other labs go on."""
        logs.emit("ERROR" if cause == "error" else "WARNING", lab=name, action="contain", reason=reason,
                  message_id=mid, traceback=trace)
        key, now = f"degraded-{name}-{zlib.crc32(reason.encode()):08x}", self.clock()
        try:
            if self.reports is not None and self.reports.fetch_reported(key, now):
                return
            self.events.publish({"event": "lab-degraded", "lab": name, "owner": owner or None, "time": now,
                                 "reason": reason, "causes": [cause]})
            if self.reports is not None:
                self.reports.apply_reported(key, now)
        except TransientError as e:  # said again on a later pass (events are at least once)
            logs.emit("WARNING", lab=name, action="contain", reason=f"report later: {e}", message_id=mid)

    def step_now(self, lab: Lab, mid: str) -> None:
        """A command's decision is recorded: its first step now, unless another invocation is acting on the lab (then
        that one, or the next pass, takes it from the record)."""
        try:
            self.reconcile_lab(lab, "reconcile", mid)
        except LeaseHeld as e:
            logs.emit("INFO", lab=lab.name, action="step", reason=f"later: {e}", message_id=mid)
        except StepRefused as e:  # the decision stands; the refused step holds, is said, and is tried again later
            self.contain(lab.name, lab.spec.owner, f"held: {e}", mid, cause="refused")

    def accounted(self, lab: Lab, now: float) -> Lab:
        """Add the node time since the last recorded decision (nodes follow the recorded target)."""
        return lab.with_state(node_seconds=node_seconds_at(lab, now), last_accounted=now)

    def _publish_deleted(self, lab: Lab, now: float) -> None:
        lab = self.accounted(lab, now)
        lifetime = now - lab.state.created_at
        self.events.publish({
            "event": "lab-deleted", "lab": lab.name, "owner": lab.spec.owner, "time": now,
            "reason": lab.state.reason, "lifetime_s": round(lifetime, 1),
            "node_hours": round(lab.state.node_seconds / 3600, 4),
            "estimated_cost_usd": estimate_cost(lab.spec, lifetime, lab.state.node_seconds),
            **({"class": lab.spec.class_name, "student": lab.spec.student} if lab.spec.class_name else {})})
        if lab.spec.class_name and self.classes is not None:  # the class report outlives the lab
            self.classes.apply_usage(lab.spec.class_name, lab.spec.student, usage_of(lab, now))


def _usage_changes(state: LabState, busy: bool, target: int, now: float) -> dict:
    """What the class report keeps on the lab: the peak worker target, and time busy (written on changes only)."""
    changes = {"peak_workers": target} if target > state.peak_workers else {}
    if busy and state.busy_since is None:
        changes["busy_since"] = now
    elif not busy and state.busy_since is not None:
        changes.update(busy_s=state.busy_s + now - state.busy_since, busy_since=None)
    return changes

