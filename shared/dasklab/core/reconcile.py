"""Reconcile: per message or tick, observe the lab (adapters) → plan (policy) → act (adapters), one step."""

import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable

from dasklab.core import logs
from dasklab.core.backend import Backend, Events
from dasklab.core.config import Config
from dasklab.core.errors import JupyterUnreachable, PermanentError, RateLimited, SchedulerUnreachable, StepRefused, \
    TransientError, ValidationError
from dasklab.core.environment import environment_record
from dasklab.core.messages import Command, KeepAlive, NightlyTeardown, Reconcile, ReconcileClass, Scale, StartClass, \
    StartLab, StopClass, StopLab, TeardownIdle, UpdateLab, build_spec, build_system_usd_h, build_update, check_caps, parse_command
from dasklab.core.overrides import note_field
from dasklab.core.tombstones import Tombstones, plan_stop_outdated, plan_superseded
from dasklab.core.classes import CLASS_KEPT_S, DEFAULT_LEAD_S, LEAD_SAMPLES, BudgetDecision, ClassRecord, Classes, \
    Wakeups, class_cost, class_usage, plan_budget, plan_class, plan_class_lifetime, plan_lead_time, usage_of, \
    wakeup_message
from dasklab.core.model import DEFAULT_PLACEMENT, FAILED, PROVISIONING, READY, SHARED, TEARING_DOWN, Lab, \
    LabState, estimate_cost, node_seconds_at
from dasklab.core.policy import HOLD, ScaleParams, plan_health, plan_health_probe, plan_idle_check, \
    plan_jupyter_restart, plan_provision_step, plan_retirement, plan_scale, plan_start, plan_teardown, plan_update

GOLDEN = (5 ** 0.5 - 1) / 2  # the rotation of the pass's starting point per minute (see reconcile_all)
# What became of a command, published on the status topic for whoever sent it (`dasklab` waits for it).
ACCEPTED, DONE, REFUSED, NOTHING_TO_DO = "accepted", "done", "refused", "nothing-to-do"
BUDGET_EVENTS = {"warn": "budget-warning", "minimum": "budget-minimum", "teardown": "budget-reached"}

@dataclass
class Controller:
    backend: Backend
    events: Events
    config: Config
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    params: ScaleParams = field(init=False)
    # lab → (not before, rate limits in a row): this invocation's pacing after a rate limit, nothing more
    _backoff: dict = field(init=False, default_factory=dict)
    tombstones: Tombstones | None = None  # where stop-labs outlive their labs (None: not remembered)
    classes: Classes | None = None  # class records (None: start-class is refused)
    wakeups: Wakeups | None = None  # one-off timers for a class's `at` and end (None: the reconcile ticks alone)

    def __post_init__(self):
        self.params = ScaleParams(self.config.confirm_s, self.config.cooldown_s, self.config.down_fraction,
                                  warmup_s=self.config.warmup_s)

    # --- commands ---

    def handle(self, cmd: Command, message_id: str = "", published: float | None = None,
               request_id: str = "") -> None:
        """Run one command or tick; `published` is its Pub/Sub publishTime (epoch seconds; None: now). A command's
        handler returns its outcome (accepted, done or nothing to do, and why), published for its sender; a
        refusal is raised (PermanentError) and published by the entry point."""
        if isinstance(cmd, (StartLab, StopLab, StartClass, StopClass)):
            handler = {StartLab: self.start_lab, StopLab: self.stop_lab, StartClass: self.start_class,
                       StopClass: self.stop_class}[type(cmd)]
            outcome = handler(cmd, message_id, published)
        else:
            handler = {UpdateLab: self.update_lab, KeepAlive: self.keep_alive, Scale: self.scale,
                       Reconcile: self.tick, TeardownIdle: self.tick, NightlyTeardown: self.tick,
                       ReconcileClass: self.wake_class}[type(cmd)]
            outcome = handler(cmd, message_id)
        if outcome is not None:  # ticks have no sender waiting
            self.publish_outcome(cmd.type, getattr(cmd, "lab", None), message_id, request_id, *outcome,
                                 **{"class": getattr(cmd, "class_", None)})

    def publish_outcome(self, command: str | None, lab: str | None, message_id: str, request_id: str, outcome: str,
                        reason: str, **extra) -> None:
        """The `command-outcome` status event: what became of the command with this message id, and why."""
        event = {"event": "command-outcome", "command": command, "lab": lab, "outcome": outcome, "reason": reason,
                 "message_id": message_id, "request_id": request_id or None, "time": self.clock(), **extra}
        self.events.publish({k: v for k, v in event.items() if v is not None})

    def _stopped(self, name: str, now: float) -> float | None:
        return self.tombstones.fetch_stopped(name, now) if self.tombstones is not None else None

    def start_lab(self, cmd: StartLab, mid: str, published: float | None = None) -> tuple[str, str]:
        return self._start(build_spec(cmd, self.config), mid, published)

    def _start(self, spec, mid: str, published: float | None) -> tuple[str, str]:
        """Create the lab of this spec unless it exists or a later stop-lab says otherwise (start-lab and classes)."""
        now = self.clock()
        timed, published = published is not None, now if published is None else published
        stopped = self._stopped(spec.name, now)
        existing = self.backend.fetch_lab(spec.name)
        late, why = plan_superseded(published, stopped)
        if late:  # a redelivered (or overtaken) start-lab: the lab's later stop-lab wins
            logs.emit("INFO", lab=spec.name, action="start-lab", reason=why, message_id=mid)
            if existing is not None and existing.state.phase != TEARING_DOWN and \
                    existing.state.start_published < stopped:  # created by a start-lab that raced the stop-lab
                self._begin_teardown(existing, why, mid)
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
                late, why = plan_superseded(published, self._stopped(spec.name, now))
                if late and (created := self.backend.fetch_lab(spec.name)) is not None:
                    self._begin_teardown(created, why, mid)
                    return NOTHING_TO_DO, why
                notes = "".join(f"; note: {note}" for note in spec.notes)
                return ACCEPTED, f"{reason}: provisioning {spec.initial_workers} worker(s), min {spec.min_workers}, " \
                                 f"max {spec.max_workers}; lab-ready follows{notes}"
        logs.emit("INFO", lab=spec.name, action="start-lab", reason=reason, message_id=mid)
        return NOTHING_TO_DO, reason

    def update_lab(self, cmd: UpdateLab, mid: str) -> tuple[str, str]:
        """Record the new values as the next revision (after their environment is ready), then converge: the
        backend replaces what they change, step by step, on this and the following reconcile passes."""
        lab = self.backend.fetch_lab(cmd.lab)
        if lab is None:
            raise PermanentError(f"no lab named {cmd.lab}: start it with start-lab")
        if mid and mid in lab.state.update_ids:
            logs.emit("INFO", lab=lab.name, action="update-lab", reason="message already applied: a redelivery",
                      message_id=mid)
            return NOTHING_TO_DO, "message already applied: a redelivery"
        if lab.state.phase in (TEARING_DOWN, FAILED):
            raise PermanentError(f"lab {lab.name} is {lab.state.phase}: nothing to update")
        new = build_update(cmd, lab.spec)
        verdict, reason = plan_update(lab.spec, new, cmd.restart)
        if verdict == "refuse":
            raise ValidationError("restart", reason)
        if verdict == "duplicate":
            logs.emit("INFO", lab=lab.name, action="update-lab", reason=reason, message_id=mid)
            return NOTHING_TO_DO, reason
        jupyter = plan_jupyter_restart(lab.spec, new)  # said again in lab-updated: the kernels' state goes
        if jupyter:
            new = replace(new, notes=new.notes + (f"revision {lab.spec.revision + 1}: {jupyter}",))
        self.backend.apply_environment(new)
        before = lab.spec.revision
        ids = (lab.state.update_ids + ((mid,) if mid else ()))[-20:]
        lab = self.backend.apply_record(replace(lab, spec=replace(new, revision=before + 1)).with_state(
            revision_workers=lab.state.target_workers, update_ids=ids))
        logs.decision(lab.name, "update", before, lab.spec.revision, reason, mid, notes=list(new.notes) or None)
        if lab.state.phase == READY:
            self.reconcile_lab(lab, "reconcile", mid)
        return ACCEPTED, f"revision {lab.spec.revision} recorded ({reason}); lab-updated follows"

    def stop_lab(self, cmd: StopLab, mid: str, published: float | None = None,
                 reason: str = "stop-lab requested") -> tuple[str, str]:
        """Tear the lab down; `reason` is recorded on it (its lab-deleted and class report say it)."""
        if self.tombstones is not None:  # first, so an older start-lab (redelivered, or overtaken) never recreates
            now = self.clock()
            try:
                self.tombstones.apply_stopped(cmd.lab, now if published is None else published, now)
            except PermanentError as e:  # a store refusing for good (no database, no permission): still stop
                logs.emit("ERROR", lab=cmd.lab, action="tombstone", reason=f"not kept: {e}", message_id=mid)
        lab = self._lab_or_none(cmd.lab, "stop-lab", mid)
        if lab is None:
            return NOTHING_TO_DO, f"no lab named {cmd.lab}"
        outdated, why = plan_stop_outdated(self.clock() if published is None else published,
                                           lab.state.start_published)
        if outdated:
            logs.emit("INFO", lab=lab.name, action="stop-lab", reason=why, message_id=mid)
            return NOTHING_TO_DO, why
        already = lab.state.phase == TEARING_DOWN
        self._begin_teardown(lab, reason, mid)  # already tearing down: the next step, as a tick would
        if already:
            return NOTHING_TO_DO, "already being torn down"
        return ACCEPTED, f"teardown started ({lab.state.phase} → {TEARING_DOWN}); lab-deleted follows"

    def keep_alive(self, cmd: KeepAlive, mid: str) -> tuple[str, str]:
        now = self.clock()
        until = cmd.deadline(now)
        if until <= now:
            raise ValidationError("until", "must be in the future")
        if cmd.class_ is not None:
            return self.keep_class_alive(cmd, until, mid)
        lab = self._lab_or_none(cmd.lab, "keep-alive", mid)
        if lab is None:
            return NOTHING_TO_DO, f"no lab named {cmd.lab}"
        if lab.spec.keep_alive_until is not None and lab.spec.keep_alive_until >= until:
            logs.emit("INFO", lab=lab.name, action="keep-alive", reason="already kept alive that long",
                      message_id=mid)
            return NOTHING_TO_DO, f"already kept alive until {_iso(lab.spec.keep_alive_until)}"
        self.backend.apply_record(lab.with_spec(keep_alive_until=until))
        logs.decision(lab.name, "keep-alive", lab.spec.keep_alive_until, until, "keep-alive requested", mid)
        cap = lab.state.created_at + lab.spec.max_lifetime_s
        capped = f"; its maximum lifetime still ends it at {_iso(cap)}" if cap < until else ""
        return DONE, f"kept alive until {_iso(until)}{capped}"

    def scale(self, cmd: Scale, mid: str) -> tuple[str, str]:
        check_caps(cmd, self.config)
        lab = self._lab_or_none(cmd.lab, "scale", mid)
        if lab is None:
            return NOTHING_TO_DO, f"no lab named {cmd.lab}"
        spec = lab.spec
        new = replace(spec, min_workers=spec.min_workers if cmd.min is None else cmd.min,
                      max_workers=spec.max_workers if cmd.max is None else cmd.max,
                      pinned_workers=None if cmd.unpin else (spec.pinned_workers if cmd.pin is None else cmd.pin))
        if new.min_workers > new.max_workers:
            raise ValidationError("min", f"min ({new.min_workers}) must be ≤ max ({new.max_workers})")
        if new.pinned_workers is not None and not new.min_workers <= new.pinned_workers <= new.max_workers:
            raise ValidationError("pin", f"{new.pinned_workers} must be between min ({new.min_workers}) "
                                         f"and max ({new.max_workers})")
        if new.nodes_for(new.max_workers) > self.config.max_nodes:
            raise ValidationError("max", f"{new.max_workers} workers need {new.nodes_for(new.max_workers)} nodes, "
                                         f"above the controller cap max_nodes={self.config.max_nodes}")
        if new == spec:
            logs.emit("INFO", lab=lab.name, action="scale", reason="limits unchanged", message_id=mid)
            return NOTHING_TO_DO, "limits unchanged"
        lab = self.backend.apply_record(replace(lab, spec=new))
        logs.decision(lab.name, "limits", [spec.min_workers, spec.max_workers, spec.pinned_workers],
                      [new.min_workers, new.max_workers, new.pinned_workers], "scale requested", mid)
        if lab.state.phase == READY:
            self.reconcile_lab(lab, "reconcile", mid)
        pin = "" if new.pinned_workers is None else f", pinned at {new.pinned_workers}"
        return DONE, f"limits now min {new.min_workers}, max {new.max_workers}{pin}; workers follow"

    # --- ticks ---

    def tick(self, cmd: Reconcile | TeardownIdle | NightlyTeardown, mid: str) -> None:
        """One timer tick over every managed lab. A reconcile tick keeps polling for its budget; the next pass
        retries what failed. A teardown tick has one pass: if a lab failed or was not reached before the
        invocation's deadline, the tick raises to be redelivered."""
        start = self.clock()
        budget = (cmd.budget_seconds if isinstance(cmd, Reconcile) and cmd.budget_seconds is not None
                  else self.config.tick_budget_s if isinstance(cmd, Reconcile) else 0.0)
        deadline = start + budget
        # Once per tick (a minute: Cloud Scheduler's period) each lab that could be idle is asked since when it is,
        # on the first pass past a point of the tick's first half fixed by its name: spread over the passes,
        # never on every poll. `asked` only saves calls within this invocation; losing it costs one more call.
        asked: set[str] = set()
        spread = budget / 2

        def idle(name: str) -> bool:
            if name in asked or self.clock() - start < spread * (zlib.crc32(name.encode()) % 1000) / 1000:
                return False
            asked.add(name)
            return True

        while True:
            left = self.reconcile_all(cmd.type, mid, deadline=max(deadline, start + self.config.pass_budget_s),
                                      idle=idle if isinstance(cmd, Reconcile) else None)
            if isinstance(cmd, Reconcile):
                left += self.reconcile_classes(mid)
            if left and not isinstance(cmd, Reconcile):
                raise TransientError(f"{cmd.type}: retry for {', '.join(left)}")
            if self.clock() + self.config.poll_s >= deadline:
                return
            self.sleep(self.config.poll_s)

    def reconcile_all(self, tick: str, mid: str = "", workers: int = 64, deadline: float | None = None,
                      idle: bool | Callable[[str], bool] | None = None) -> list[str]:
        """One pass over all labs, `workers` at a time, so no lab waits on another's slow call. A lab not yet
        started when `deadline` passes is left for the next pass. The pass starts at a point of the ring of labs
        that moves by the golden ratio of the ring every minute, so successive starts spread evenly: a fleet of
        which a pass reaches a fraction f has every lab reached within about 1.5/f minutes, with no state kept.
        With `idle` (default: on teardown ticks; or a predicate of the lab's name) labs without work are asked since
        when they are idle.
        Returns the labs failed or left over."""
        labs = self.backend.fetch_labs()
        missing = [f"zone {z}" for z in getattr(self.backend, "missing_zones", ())]
        if missing:  # the listing left labs out: they are neither dropped nor reported done
            logs.emit("WARNING", action=tick, reason=f"pass incomplete: {', '.join(missing)} did not answer",
                      message_id=mid)
        if labs:
            turn = int((self.clock() // 60 * GOLDEN) % 1 * len(labs))
            labs = labs[turn:] + labs[:turn]

        def one(lab: Lab) -> bool:
            if deadline is not None and self.clock() >= deadline:
                return False  # not started: the next pass or tick takes it
            if self.clock() < self._backoff.get(lab.name, (0.0, 0))[0]:
                return False  # rate limited a moment ago: this pass leaves it alone
            return self._reconcile_safely(lab, tick, mid, idle(lab.name) if callable(idle) else idle)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(labs)))) as pool:
            results = list(pool.map(one, labs))
        return [lab.name for lab, ok in zip(labs, results) if not ok] + missing

    def _reconcile_safely(self, lab: Lab, tick: str, mid: str, idle: bool | None = None) -> bool:
        try:
            self.reconcile_lab(lab, tick, mid, idle)
            self._backoff.pop(lab.name, None)
            return True
        except RateLimited as e:  # backoff: 1, 2, 4 … times the service's hint, at most 5 minutes
            count = self._backoff.get(lab.name, (0.0, 0))[1]
            wait = min(300.0, e.retry_after_s * 2 ** count)
            self._backoff[lab.name] = (self.clock() + wait, count + 1)
            logs.emit("WARNING", lab=lab.name, action=tick, reason=f"rate limited, next try in {wait:g}s: {e}",
                      message_id=mid)
            return False
        except TransientError as e:  # other labs go on; this one is retried
            logs.emit("WARNING", lab=lab.name, action=tick, reason=f"retry later: {e}", message_id=mid)
            return False
        except StepRefused as e:  # one step refused, not the lab: it holds, says why, the step is tried again
            logs.emit("WARNING", lab=lab.name, action="step-refused", reason=str(e), message_id=mid)
            return True
        except PermanentError as e:  # refused for good (a permission, a quota): the lab fails, teardown follows
            self._fail(lab, str(e), mid)
            return True

    def _fail(self, lab: Lab, reason: str, mid: str) -> None:
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
            self.backend.apply_record(self._accounted(lab, now).with_state(phase=FAILED, reason=reason))
        except TransientError as e:  # the next pass meets the refusal again and records it then
            logs.emit("WARNING", lab=lab.name, action="mark-failed", reason=f"retry later: {e}", message_id=mid)
            return
        logs.emit("ERROR", lab=lab.name, action="mark-failed", **{"from": lab.state.phase, "to": FAILED},
                  reason=reason, message_id=mid)

    def reconcile_lab(self, lab: Lab, tick: str, mid: str = "", idle: bool | None = None) -> None:
        """Move one lab one step: teardown if a tick says so, else autoscale a ready lab or advance its phase.
        With `idle` (default: on a teardown-idle tick) a lab without work is asked since when it is idle, and
        Jupyter is read once the scheduler alone would let the lab go."""
        now = self.clock()
        phase = lab.state.phase
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
                self._begin_teardown(lab, verdict.reason, mid)
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
        if step.action == "provision":
            self.backend.apply_provision(lab)
        elif step.action == "install":
            self.backend.apply_install(lab)
        elif step.action == "delete":
            self._publish_deleted(lab, now)  # events are at least once: published before the act they report
            self.backend.apply_delete(lab)
        elif step.action == "forget":
            if self.backend.apply_forget(lab):  # False: another invocation forgot it (and said so) first
                logs.decision(lab.name, "forget", lab.state.phase, "gone", step.reason, mid)
            return
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
        lab = self.backend.apply_record(self._accounted(lab, now).with_state(**changes))
        logs.decision(lab.name, step.action, before, step.phase, step.reason, mid)

    def _roll_out(self, lab: Lab, load, mid: str) -> None:
        """One step of an update; once the backend runs the new revision everywhere, say so and record it. Until
        then the workers' health is read on every pass: a replacement that cannot start (its packages fail to
        install, its image cannot be pulled, no node for it) holds the rollout, and the lab says why."""
        if not self.backend.apply_update(lab):
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
            lab = self.backend.apply_record(self._accounted(lab, now).with_state(**changes))
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
        lab = self.backend.apply_record(self._accounted(lab, now).with_state(
            degraded=verdict.causes, degraded_reason=verdict.reason if verdict.causes else ""))
        logs.decision(lab.name, verdict.action, state.degraded or "healthy", verdict.causes or "healthy",
                      verdict.reason, mid)
        return lab

    def _converge(self, lab: Lab, load, requested: int, mid: str) -> None:
        """Move the backend toward the recorded target: start missing workers, retire extra ones, else settle."""
        target = lab.state.target_workers
        if requested < target:
            self.backend.apply_workers(lab, target)
        elif load.workers > target and load.workers >= requested:
            workers = self.backend.dashboard(lab).fetch_workers()
            chosen = plan_retirement(workers, len(workers) - target)
            if chosen:
                self.backend.apply_scale_down(lab, chosen, target)
                logs.emit("INFO", lab=lab.name, action="retire", reason=f"{len(workers)} → {target} workers",
                          workers=chosen, message_id=mid)
        else:
            self.backend.apply_settle(lab)

    # --- classes ---

    def _class_store(self) -> Classes:
        if self.classes is None:
            raise PermanentError("this controller has no class store: classes are not available")
        return self.classes

    def _class_labs(self, name: str, labs: list[Lab] | None = None) -> dict[str, Lab]:
        """The class's labs that exist, by student."""
        labs = self.backend.fetch_labs() if labs is None else labs
        return {lab.spec.student: lab for lab in labs if lab.spec.class_name == name}

    def _lead(self, record: ClassRecord) -> tuple[float, str]:
        return plan_lead_time(record.lead_samples, DEFAULT_LEAD_S.get(self.config.backend, DEFAULT_LEAD_S["gke"]))

    def _student_spec(self, record: ClassRecord, student: str):
        """A student's lab: the start-lab the class's template gives, built and capped as any start-lab's."""
        cmd = parse_command(record.template).student_lab(student)
        spec = build_spec(cmd, self.config)
        lifetime, note = plan_class_lifetime(cmd.max_lifetime, self.config.default_lifetime_s,
                                             self.config.max_lifetime_s, record.duration_s,
                                             self._lead(record)[0] if record.at is not None else 0.0)
        placement = record.placement or DEFAULT_PLACEMENT
        return replace(spec, class_name=record.name, student=student, placement=placement,
                       class_size=len(record.roster), system_usd_h=build_system_usd_h(
                           self.config, len(record.roster), placement == SHARED),
                       budget_usd=record.budget_student_usd, keep_alive_until=record.keep_alive_until,
                       max_lifetime_s=lifetime, notes=spec.notes + ((note,) if note else ()))

    def start_class(self, cmd: StartClass, mid: str, published: float | None = None) -> tuple[str, str]:
        """Record the class (roster, template, at, duration, budgets), then one class step: the labs missing are
        created (now, or a lead time before `at`), those of students no longer listed stopped gracefully."""
        import msgspec
        store, now = self._class_store(), self.clock()
        published = now if published is None else published
        if cmd.duration is not None and cmd.duration > self.config.max_lifetime_s:
            raise ValidationError("duration", f"{cmd.duration}s is above the controller cap max_lifetime="
                                              f"{self.config.max_lifetime_s}s: no lab may run that long")
        probe = ClassRecord(cmd.class_, template=msgspec.to_builtins(cmd), placement=cmd.placement,
                            duration_s=cmd.duration, at=cmd.at.timestamp() if cmd.at else None)
        existing = {lab.name: lab for lab in self.backend.fetch_labs()}
        for i, student in enumerate(cmd.roster):  # every lab validated as a start-lab before anything is written
            spec = self._student_spec(probe, student)
            lifetime_notes = [n for n in spec.notes if note_field(n) in ("duration", "max_lifetime")]
            other = existing.get(spec.name)
            if other is not None and (other.spec.class_name, other.spec.owner) != (cmd.class_, cmd.owner):
                raise ValidationError(f"roster[{i}]", f"lab {spec.name} exists and is not a lab of class "
                                                      f"{cmd.class_} (owner {other.spec.owner}): rename the student")
        record = store.fetch_class(cmd.class_)
        if record is not None and record.stopped is not None and published < record.stopped:
            why = (f"start-class published at {_iso(published)}, before the class's stop at {_iso(record.stopped)}: "
                   "the stop wins; send a new start-class to start the class again")
            logs.emit("INFO", action="start-class", reason=why, message_id=mid, **{"class": cmd.class_})
            return NOTHING_TO_DO, why
        if record is not None and published < record.published:
            why = (f"start-class published at {_iso(published)}, before the one the class stands for "
                   f"({_iso(record.published)}): the newer one stays")
            logs.emit("INFO", action="start-class", reason=why, message_id=mid, **{"class": cmd.class_})
            return NOTHING_TO_DO, why
        if record is not None and not record.is_stopped and record.owner != cmd.owner:
            raise ValidationError("owner", f"class {cmd.class_} exists and belongs to {record.owner}")
        fresh = record is None or record.is_stopped
        base = record if not fresh else ClassRecord(
            cmd.class_, created_at=now, stopped=record and record.stopped, version=record.version if record else "",
            lead_samples=record.lead_samples if record else ())
        new = replace(base, owner=cmd.owner, roster=tuple(cmd.roster), template=probe.template,
                      at=cmd.at.timestamp() if cmd.at else None, duration_s=cmd.duration,
                      budget_student_usd=cmd.budget.student, budget_class_usd=cmd.budget.class_,
                      placement=cmd.placement, published=published)
        if not fresh and replace(new, published=record.published) == record:
            if published > record.published:
                store.apply_class(new)
            logs.emit("INFO", action="start-class", reason="class unchanged", message_id=mid, **{"class": new.name})
            self.reconcile_class(store.fetch_class(new.name) or new, mid)
            return NOTHING_TO_DO, f"class {new.name} unchanged: its {len(new.roster)} lab(s) are as asked"
        new = store.apply_class(new)
        before = set() if fresh else set(record.roster)
        added, removed = [s for s in new.roster if s not in before], sorted(before - set(new.roster))
        logs.decision(new.name, "start-class", sorted(before), list(new.roster), "start-class", mid,
                      **{"class": new.name})
        lead, lead_why = self._lead(new)
        if self.wakeups is not None:  # set, moved, or dropped when the new start-class has no such time
            starts = new.at - lead if new.at is not None and new.at - lead > now else None
            for key, when in ((f"{new.name}-start", starts), (f"{new.name}-end", new.end)):
                if when is not None:
                    self.wakeups.apply_wakeup(key, when, wakeup_message(new.name))
                elif record is not None:
                    self.wakeups.apply_cancel(key)
        self.reconcile_class(new, mid)
        parts = [f"class {new.name}: {len(new.roster)} student(s)"]
        if added:
            when = f"provisioning starts at {_iso(new.at - lead)} ({lead_why}) to be ready at {_iso(new.at)}" \
                if new.at is not None and new.at - lead > now else "provisioning"
            parts.append(f"{len(added)} lab(s) added ({', '.join(added)}): {when}")
        if removed:
            parts.append(f"{len(removed)} lab(s) removed gracefully ({', '.join(removed)})")
        if new.end is not None:
            parts.append(f"the labs end at {_iso(new.end)}")
        parts += lifetime_notes  # the same for every student: said once
        return ACCEPTED, "; ".join(parts) + "; class-ready follows"

    def stop_class(self, cmd: StopClass, mid: str, published: float | None = None) -> tuple[str, str]:
        """Every lab of the class stopped gracefully; the stop is kept, so an older start-class never restarts it."""
        store, now = self._class_store(), self.clock()
        published = now if published is None else published
        record = store.fetch_class(cmd.class_)
        if record is None:  # kept as a tombstone: a start-class published before it must not start the class
            store.apply_class(ClassRecord(cmd.class_, created_at=now, stopped=published, deleted_at=now,
                                          stop_reason="stop-class requested"))
            return NOTHING_TO_DO, f"no class named {cmd.class_}"
        if published < record.published:
            why = (f"stop-class published at {_iso(published)}, before the start-class the class stands for "
                   f"({_iso(record.published)}): the class stays")
            logs.emit("INFO", action="stop-class", reason=why, message_id=mid, **{"class": record.name})
            return NOTHING_TO_DO, why
        already = record.is_stopped
        if record.stopped is None or record.stopped < published:
            record = store.apply_class(replace(record, stopped=published, stop_reason=record.stop_reason if already
                                               else "stop-class requested"))
        if self.wakeups is not None:
            for key in (f"{record.name}-start", f"{record.name}-end"):
                self.wakeups.apply_cancel(key)
        labs = self._class_labs(record.name)
        self.reconcile_class(record, mid)
        if already:
            return NOTHING_TO_DO, f"class {record.name} already stopped ({record.stop_reason})"
        logs.decision(record.name, "stop-class", list(record.roster), [], "stop-class requested", mid,
                      **{"class": record.name})
        return ACCEPTED, f"class {record.name}: teardown of {len(labs)} lab(s) started; class-deleted follows"

    def keep_class_alive(self, cmd: KeepAlive, until: float, mid: str) -> tuple[str, str]:
        """keep-alive for every lab of the class, and for the labs it creates later."""
        store = self._class_store()
        record = store.fetch_class(cmd.class_)
        if record is None or record.is_stopped:
            return NOTHING_TO_DO, f"no class named {cmd.class_}"
        if (record.keep_alive_until or 0) < until:
            record = store.apply_class(replace(record, keep_alive_until=until))
        labs = [lab for lab in self._class_labs(record.name).values() if lab.state.phase != TEARING_DOWN]
        for lab in labs:
            self.keep_alive(KeepAlive(lab=lab.name, until=datetime.fromtimestamp(until, timezone.utc)), mid)
        return DONE, f"class {record.name}: {len(labs)} lab(s) kept alive until {_iso(until)}, and any started later"

    def wake_class(self, cmd: ReconcileClass, mid: str) -> None:
        """A class's wake-up (a lead time before `at`, its end): one step of that class now."""
        record = self._class_store().fetch_class(cmd.class_)
        if record is not None:
            self.reconcile_class(record, mid)
        if self.wakeups is not None:
            # A Cloud Scheduler job's cron (`M H D Mon *`) fires every year, so a handled wake-up is deleted here,
            # after the step (if the step raises, the message is retried and the jobs stay). Every wake-up of a
            # class sends this same message and the step is level-based on the time, so each wake-up of the class
            # whose time has passed is done with, whichever fired. Here, not on the minute tick: two calls per
            # wake-up, none per tick. One whose message was lost fires a year on and is deleted then.
            for key in (f"{cmd.class_}-start", f"{cmd.class_}-end"):
                self.wakeups.apply_expire(key, self.clock())

    def reconcile_classes(self, mid: str = "") -> list[str]:
        """One step of every class (after a pass over the labs); returns the classes to retry."""
        if self.classes is None:
            return []
        records = self.classes.fetch_classes()
        labs = self.backend.fetch_labs() if records else []
        left = []
        for record in records:
            try:
                if not self.reconcile_class(record, mid, labs):
                    left.append(f"class {record.name}")
            except TransientError as e:
                logs.emit("WARNING", action="reconcile-class", reason=f"retry later: {e}", message_id=mid,
                          **{"class": record.name})
                left.append(f"class {record.name}")
        return left

    def reconcile_class(self, record: ClassRecord, mid: str = "", labs: list[Lab] | None = None) -> bool:
        """Observe the class's labs, plan (plan_class, plan_budget), act: each lab one step. False if a lab's step
        is to be retried."""
        store, now = self._class_store(), self.clock()
        if record.deleted_at is not None and now - record.deleted_at > CLASS_KEPT_S:
            store.apply_forget_class(record)
            return True
        mine = self._class_labs(record.name, labs)
        gaps = self._unlisted(record)
        if gaps:  # a lab left out of the listing is not ended: nothing is decided from its absence
            logs.emit("WARNING", action="reconcile-class", reason=f"class step later: {', '.join(gaps)} did not "
                      "answer, so the class's labs are not all known", message_id=mid, **{"class": record.name})
            return False
        record = self._enforce_class_budget(record, mine, now, mid)
        lead, _ = self._lead(record)
        plan = plan_class(record, mine, now, lead)
        if plan.ended:
            record = store.apply_class(replace(record, stopped=now, stop_reason=plan.ended))
            logs.decision(record.name, "class-end", list(record.roster), [], plan.ended, mid, **{"class": record.name})
        ok, added, dropped = True, {}, set()
        for student, why in plan.stop:
            if student not in record.roster:  # removed: once added again, a new lab is created
                dropped.add(student)
            ok = self._class_step(record, student, mid, lambda: self._stop_student(mine[student], why, record,
                                                                                   now, mid)) and ok
        for student in plan.start:
            if self._class_step(record, student, mid,
                                lambda: self._start(self._student_spec(record, student), mid, record.published)):
                added[student] = now
            else:
                ok = False
        changes = {}
        if plan.ready:
            changes.update(self._class_ready(record, mine, lead, now))
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

    def _unlisted(self, record: ClassRecord) -> list[str]:
        """What the backend's last listing could not see of this class: unreachable zones, or its labs' (or shared
        cluster's) records unreadable."""
        students = set(record.roster) | set(record.started)
        mine = {("class", record.name)} | {("lab", record.lab_name(s)) for s in students}
        return [f"zone {z}" for z in getattr(self.backend, "missing_zones", ())] + [
            f"{kind} {name}" for kind, name in getattr(self.backend, "unreadable", ()) if (kind, name) in mine]

    def _class_step(self, record: ClassRecord, student: str, mid: str, step) -> bool:
        """One student's step: a transient failure is retried on the next pass, a refusal is said (the lab's own
        events say the rest) and not retried."""
        try:
            step()
            return True
        except TransientError as e:
            logs.emit("WARNING", action="reconcile-class", lab=record.lab_name(student), reason=f"retry later: {e}",
                      message_id=mid, **{"class": record.name})
            return False
        except PermanentError as e:
            logs.emit("ERROR", action="reconcile-class", lab=record.lab_name(student), reason=str(e), message_id=mid,
                      **{"class": record.name})
            return True

    def _stop_student(self, lab: Lab, reason: str, record: ClassRecord, now: float, mid: str) -> None:
        """A normal stop-lab (its tombstone at the class's message time) with the class's reason: graceful, reported
        by lab-deleted."""
        published = record.stopped if record.is_stopped else record.published if lab.spec.student not in \
            record.roster else now
        logs.emit("INFO", action="class-stop-lab", lab=lab.name, reason=reason, message_id=mid,
                  **{"class": record.name})
        self.stop_lab(StopLab(lab=lab.name), mid, max(published, lab.state.start_published), reason)

    def _class_ready(self, record: ClassRecord, mine: dict[str, Lab], lead: float, now: float) -> dict:
        """Publish class-ready with who connects how (no secret: tokens stay with the backend); returns the record's
        changes (the roster announced, the creation times observed for the lead time)."""
        table = []
        for student in record.roster:
            lab = mine.get(student)
            row = {"student": student, "lab": record.lab_name(student)}
            if lab is not None and lab.state.phase == READY:
                row.update(phase=READY, connection=self.backend.connection_info(lab))
            else:
                row.update(phase="gone", reason=record.usage.get(student, {}).get("reason", "ended"))
            table.append(row)
        placement = record.placement or DEFAULT_PLACEMENT
        self.events.publish({"event": "class-ready", "class": record.name, "owner": record.owner, "time": now,
                             "placement": placement + ("" if record.placement else " (the default)"),
                             "at": record.at and _iso(record.at), "ends_at": record.end and _iso(record.end),
                             "lead_time_s": round(lead), "labs": table,
                             "connect": f"dasklab connect --class {record.name}  # the instructor: tokens included"})
        logs.decision(record.name, "class-ready", list(record.ready_roster), list(record.roster),
                      f"{len(table)} lab(s) of class {record.name} ready", **{"class": record.name})
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

    # --- budgets ---

    def _publish_budget(self, decision: BudgetDecision, cost: float, budget: float, **who) -> None:
        """The budget step's event, after the warning it went past (if it did: each owner is warned first)."""
        steps = ([("warn", decision.passed_warning)] if decision.passed_warning else []) + \
            [(decision.action, decision.reason)]
        for action, reason in steps:
            self.events.publish({"event": BUDGET_EVENTS[action], **who, "time": self.clock(),
                                 "estimated_cost_usd": cost, "budget_usd": budget, "reason": reason})

    def _to_minimum(self, lab: Lab, stage: str, reason: str, mid: str) -> Lab:
        """The lab's workers down to its minimum (gracefully, by the autoscaler), and kept there."""
        spec = lab.spec
        lab = self.backend.apply_record(replace(lab, spec=replace(spec, max_workers=spec.min_workers,
                                                                  pinned_workers=None)).with_state(budget_stage=stage))
        logs.decision(lab.name, "budget-minimum", spec.max_workers, spec.min_workers, reason, mid)
        return lab

    def _enforce_lab_budget(self, lab: Lab, now: float, mid: str) -> Lab | None:
        """A student's budget: warned, then down to its minimum, then torn down (None: teardown begun)."""
        cost = estimate_cost(lab.spec, now - lab.state.created_at, node_seconds_at(lab, now))
        decision = plan_budget(cost, lab.spec.budget_usd, lab.state.budget_stage, "lab")
        if decision.action == "none":
            return lab
        who = {"lab": lab.name, "owner": lab.spec.owner, "class": lab.spec.class_name or None,
               "student": lab.spec.student or None}
        self._publish_budget(decision, cost, lab.spec.budget_usd,
                             **{k: v for k, v in who.items() if v})
        if decision.action == "teardown":
            self._begin_teardown(lab, decision.reason, mid)
            return None
        if decision.action == "minimum":
            return self._to_minimum(lab, decision.stage, decision.reason, mid)
        logs.decision(lab.name, "budget-warning", lab.state.budget_stage, decision.stage, decision.reason, mid)
        return self.backend.apply_record(lab.with_state(budget_stage=decision.stage))

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
        self._publish_budget(decision, cost, record.budget_class_usd,
                             **{"class": record.name, "owner": record.owner})
        logs.decision(record.name, f"class-budget-{decision.action}", record.budget_stage, decision.stage,
                      decision.reason, mid, **{"class": record.name})
        if decision.action == "teardown":
            return self._class_store().apply_class(replace(record, stopped=now, stop_reason=decision.reason))
        if decision.action == "minimum":
            for lab in mine.values():
                if lab.state.phase != TEARING_DOWN and lab.spec.max_workers > lab.spec.min_workers:
                    self._to_minimum(lab, lab.state.budget_stage, decision.reason, mid)
        return self._class_store().apply_class(replace(record, budget_stage=decision.stage))

    # --- helpers ---

    def _environment(self, lab: Lab) -> dict:
        """The lab's environment for its events; on GKE with the chart version that names the default images."""
        gke = self.config.backend == "gke"
        return environment_record(lab.spec.values, self.config.chart_version if gke else "",
                                  (lab.spec.dask_version or self.config.dask_version) if gke else "")

    def _lab_or_none(self, name: str, action: str, mid: str) -> Lab | None:
        lab = self.backend.fetch_lab(name)
        if lab is None:
            logs.emit("INFO", lab=name, action=action, reason="no such lab: nothing to do", message_id=mid)
        return lab

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

    def _begin_teardown(self, lab: Lab, reason: str, mid: str) -> None:
        now = self.clock()
        if lab.state.phase != TEARING_DOWN:
            before = lab.state.phase
            lab = self.backend.apply_record(self._accounted(lab, now).with_state(phase=TEARING_DOWN, reason=reason))
            logs.decision(lab.name, "teardown", before, TEARING_DOWN, reason, mid)
        self.reconcile_lab(lab, "reconcile", mid)

    def _accounted(self, lab: Lab, now: float) -> Lab:
        """Add the node time since the last recorded decision (nodes follow the recorded target)."""
        return lab.with_state(node_seconds=node_seconds_at(lab, now), last_accounted=now)

    def _publish_deleted(self, lab: Lab, now: float) -> None:
        lab = self._accounted(lab, now)
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


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
