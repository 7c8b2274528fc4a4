"""Reconcile: per message or tick, observe the lab (adapters) → plan (policy) → act (adapters), one step."""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

from dasklab.core import logs
from dasklab.core.backend import Backend, Events
from dasklab.core.config import Config
from dasklab.core.errors import PermanentError, RateLimited, SchedulerUnreachable, TransientError, ValidationError
from dasklab.core.messages import Command, KeepAlive, NightlyTeardown, Reconcile, Scale, StartLab, StopLab, TeardownIdle, \
    build_spec, check_caps
from dasklab.core.model import FAILED, PROVISIONING, READY, TEARING_DOWN, Lab, LabState, estimate_cost
from dasklab.core.policy import HOLD, ScaleParams, plan_provision_step, plan_retirement, plan_scale, plan_start, \
    plan_teardown

GOLDEN = (5 ** 0.5 - 1) / 2  # the rotation of the pass's starting point per minute (see reconcile_all)


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

    def __post_init__(self):
        self.params = ScaleParams(self.config.confirm_s, self.config.cooldown_s, self.config.down_fraction)

    # --- commands ---

    def handle(self, cmd: Command, message_id: str = "") -> None:
        handler = {StartLab: self.start_lab, StopLab: self.stop_lab, KeepAlive: self.keep_alive, Scale: self.scale,
                   Reconcile: self.tick, TeardownIdle: self.tick, NightlyTeardown: self.tick}[type(cmd)]
        handler(cmd, message_id)

    def start_lab(self, cmd: StartLab, mid: str) -> None:
        spec = build_spec(cmd, self.config)
        existing = self.backend.fetch_lab(spec.name)
        verdict, reason = plan_start(existing and existing.spec, spec)
        if verdict == "conflict":
            raise PermanentError(reason)
        if verdict == "create":
            now = self.clock()
            lab = Lab(spec, LabState(phase=PROVISIONING, created_at=now, last_accounted=now,
                                     target_workers=spec.initial_workers))
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
                return
        logs.emit("INFO", lab=spec.name, action="start-lab", reason=reason, message_id=mid)

    def stop_lab(self, cmd: StopLab, mid: str) -> None:
        lab = self._lab_or_none(cmd.lab, "stop-lab", mid)
        if lab is not None:
            self._begin_teardown(lab, "stop-lab requested", mid)

    def keep_alive(self, cmd: KeepAlive, mid: str) -> None:
        now = self.clock()
        until = cmd.deadline(now)
        if until <= now:
            raise ValidationError("until", "must be in the future")
        lab = self._lab_or_none(cmd.lab, "keep-alive", mid)
        if lab is None:
            return
        if lab.spec.keep_alive_until is not None and lab.spec.keep_alive_until >= until:
            logs.emit("INFO", lab=lab.name, action="keep-alive", reason="already kept alive that long",
                      message_id=mid)
            return
        self.backend.apply_record(lab.with_spec(keep_alive_until=until))
        logs.decision(lab.name, "keep-alive", lab.spec.keep_alive_until, until, "keep-alive requested", mid)

    def scale(self, cmd: Scale, mid: str) -> None:
        check_caps(cmd, self.config)
        lab = self._lab_or_none(cmd.lab, "scale", mid)
        if lab is None:
            return
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
            return
        lab = self.backend.apply_record(replace(lab, spec=new))
        logs.decision(lab.name, "limits", [spec.min_workers, spec.max_workers, spec.pinned_workers],
                      [new.min_workers, new.max_workers, new.pinned_workers], "scale requested", mid)
        if lab.state.phase == READY:
            self.reconcile_lab(lab, "reconcile", mid)

    # --- ticks ---

    def tick(self, cmd: Reconcile | TeardownIdle | NightlyTeardown, mid: str) -> None:
        """One timer tick over every managed lab. A reconcile tick keeps polling for its budget; the next pass
        retries what failed. A teardown tick has one pass: if a lab failed or was not reached before the
        invocation's deadline, the tick raises to be redelivered."""
        start = self.clock()
        budget = (cmd.budget_seconds if isinstance(cmd, Reconcile) and cmd.budget_seconds is not None
                  else self.config.tick_budget_s if isinstance(cmd, Reconcile) else 0.0)
        deadline = start + budget
        while True:
            left = self.reconcile_all(cmd.type, mid, deadline=max(deadline, start + self.config.pass_budget_s))
            if left and not isinstance(cmd, Reconcile):
                raise TransientError(f"{cmd.type}: retry for {', '.join(left)}")
            if self.clock() + self.config.poll_s >= deadline:
                return
            self.sleep(self.config.poll_s)

    def reconcile_all(self, tick: str, mid: str = "", workers: int = 64, deadline: float | None = None) -> list[str]:
        """One pass over all labs, `workers` at a time, so no lab waits on another's slow call. A lab not yet
        started when `deadline` passes is left for the next pass. The pass starts at a point of the ring of labs
        that moves by the golden ratio of the ring every minute, so successive starts spread evenly: a fleet of
        which a pass reaches a fraction f has every lab reached within about 1.5/f minutes, with no state kept.
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
            return self._reconcile_safely(lab, tick, mid)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(labs)))) as pool:
            results = list(pool.map(one, labs))
        return [lab.name for lab, ok in zip(labs, results) if not ok] + missing

    def _reconcile_safely(self, lab: Lab, tick: str, mid: str) -> bool:
        try:
            self.reconcile_lab(lab, tick, mid)
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

    def reconcile_lab(self, lab: Lab, tick: str, mid: str = "") -> None:
        """Move one lab one step: teardown if a tick says so, else autoscale a ready lab or advance its phase."""
        now = self.clock()
        phase = lab.state.phase
        if phase != TEARING_DOWN:
            load = self._load_or_none(lab, idle=tick == "teardown-idle") if phase == READY else None
            verdict = plan_teardown(tick, lab.spec, lab.state, load, now)
            if verdict.delete:
                self._begin_teardown(lab, verdict.reason, mid)
                return
            if tick != "reconcile":
                logs.emit("INFO", lab=lab.name, action="keep", tick=tick, reason=verdict.reason, message_id=mid)
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
            self.backend.apply_forget(lab)
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
                                 "connection": self.backend.connection_info(lab)})
        elif step.phase == FAILED:
            self.events.publish({"event": "lab-failed", "lab": lab.name, "owner": lab.spec.owner, "time": now,
                                 "reason": step.reason})
        lab = self.backend.apply_record(self._accounted(lab, now).with_state(**changes))
        logs.decision(lab.name, step.action, before, step.phase, step.reason, mid)

    def _autoscale(self, lab: Lab, load, mid: str) -> None:
        now = self.clock()
        requested = self.backend.fetch_requested(lab)
        decision = plan_scale(lab.spec, lab.state, load, requested, now, self.params)
        if decision.target != lab.state.target_workers or decision.remember:
            before = lab.state.target_workers
            changes = dict(decision.remember, target_workers=decision.target)
            lab = self.backend.apply_record(self._accounted(lab, now).with_state(**changes))
            if decision.action != HOLD:
                logs.decision(lab.name, f"scale-{decision.action}", before, decision.target, decision.reason, mid,
                              nodes=[lab.spec.nodes_for(before), lab.spec.nodes_for(decision.target)])
        self._converge(lab, load, requested, mid)

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

    # --- helpers ---

    def _lab_or_none(self, name: str, action: str, mid: str) -> Lab | None:
        lab = self.backend.fetch_lab(name)
        if lab is None:
            logs.emit("INFO", lab=name, action=action, reason="no such lab: nothing to do", message_id=mid)
        return lab

    def _load_or_none(self, lab: Lab, idle: bool):
        """The scheduler's load (with when it became idle, if `idle`: only the idle teardown needs it)."""
        try:
            return self.backend.dashboard(lab).fetch_load(idle)
        except SchedulerUnreachable as e:
            logs.emit("WARNING", lab=lab.name, action="observe", reason=f"scheduler unreachable: {e}")
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
        nodes = lab.spec.nodes_for(lab.state.target_workers) if lab.state.phase in (READY, TEARING_DOWN) else 0
        return lab.with_state(node_seconds=lab.state.node_seconds + nodes * max(0.0, now - lab.state.last_accounted),
                              last_accounted=now)

    def _publish_deleted(self, lab: Lab, now: float) -> None:
        lab = self._accounted(lab, now)
        lifetime = now - lab.state.created_at
        self.events.publish({
            "event": "lab-deleted", "lab": lab.name, "owner": lab.spec.owner, "time": now,
            "reason": lab.state.reason, "lifetime_s": round(lifetime, 1),
            "node_hours": round(lab.state.node_seconds / 3600, 4),
            "estimated_cost_usd": estimate_cost(lab.spec, lifetime, lab.state.node_seconds)})

