"""Pure policy: given the lab's spec, remembered state, observed load and `now`, decide one step and say why."""

import math
from dataclasses import dataclass, field
from typing import Iterable

from dasklab.core.model import (FAILED, INSTALLING, PROVISIONING, READY, REQUESTED, TEARING_DOWN, DaskLoad, LabSpec, LabState,
                    WorkerInfo)

HOLD, UP, DOWN = "hold", "up", "down"


@dataclass(frozen=True)
class ScaleParams:
    confirm_s: float = 20.0  # a lower target must hold this long before workers go
    cooldown_s: float = 15.0  # after a scale-down, no further scale-down for this long
    down_fraction: float = 0.5  # at most this share of the workers goes in one step (at least one)


@dataclass(frozen=True)
class ScaleDecision:
    action: str  # hold, up or down
    target: int
    reason: str
    remember: dict = field(default_factory=dict)  # LabState fields to store with the decision


def desired_workers(spec: LabSpec, load: DaskLoad) -> tuple[int, str]:
    """What the lab should have now: the pinned count, else the scheduler's adaptive target, within min..max."""
    if spec.pinned_workers is not None:
        want, why = spec.pinned_workers, f"pinned at {spec.pinned_workers}"
    else:
        want, why = load.adaptive_target, (f"adaptive_target={load.adaptive_target} "
                                           f"(processing={load.processing}, queued={load.queued})")
    clamped = min(max(want, spec.min_workers), spec.max_workers)
    if clamped != want:
        why += f", clamped to [{spec.min_workers}, {spec.max_workers}]"
    return clamped, why


def _window(steps: tuple, want: int, now: float) -> tuple[tuple[int, float], ...]:
    """The confirmation window after `want` is seen at `now`: steps (level, since), each meaning "nothing above
    `level` was wanted since `since`", levels falling as times rise. Seeing `want` breaks the steps below it."""
    kept = tuple((level, since) for level, since in steps if level >= want)
    return kept if kept and kept[-1][0] == want else kept + ((want, now),)


def plan_scale(spec: LabSpec, state: LabState, load: DaskLoad, requested: int, now: float,
               params: ScaleParams = ScaleParams()) -> ScaleDecision:
    """Decide the worker target: up at once; down only after confirmation, bounded, with a cooldown.

    Down goes no lower than the highest target wanted over the last `confirm_s` (a sliding window, kept as
    steps on the lab), so a target that keeps falling is reached one window after it was first wanted.
    `requested` is how many workers the backend was asked for; `load.workers` how many have joined.
    """
    current = state.target_workers
    want, why = desired_workers(spec, load)
    reset = {"down_window": ()}
    if want > current:
        return ScaleDecision(UP, want, f"{why} > target {current}", reset)
    if want == current:
        return ScaleDecision(HOLD, current, f"{why} = target", reset if state.down_window else {})
    # want < current from here
    if current > spec.max_workers or (spec.pinned_workers is not None and load.workers >= requested):
        # limits lowered or a pin set by the owner: follow at once (still gracefully, by retirement)
        return ScaleDecision(DOWN, want, f"{why}: owner's limits", {**reset, "cooldown_until": now + params.cooldown_s})
    if load.workers < requested:  # the window starts once they have arrived
        return ScaleDecision(HOLD, current, f"{why}, but {requested - load.workers} requested worker(s) "
                                            f"have not joined yet: retire nothing before they arrive",
                             reset if state.down_window else {})
    window = tuple(s for s in _window(state.down_window, want, now) if s[0] < current)
    seen = {"down_window": window} if window != state.down_window else {}
    confirmed = [level for level, since in window if now - since >= params.confirm_s]
    if not confirmed:
        return ScaleDecision(HOLD, current, f"{why} < target {current}: confirming "
                                            f"({now - window[0][1]:.1f}/{params.confirm_s:g}s)", seen)
    if now < state.cooldown_until:
        return ScaleDecision(HOLD, current, f"cooling down for {state.cooldown_until - now:.1f}s more", seen)
    floor = confirmed[-1]  # the highest target wanted over the last confirm_s
    step = max(1, math.floor(current * params.down_fraction))
    target = max(floor, current - step, spec.min_workers)
    return ScaleDecision(DOWN, target, f"{why}: at most {floor} wanted over the last {params.confirm_s:g}s; "
                                       f"at most {step} per step",
                         {"down_window": tuple(s for s in window if s[0] < target),
                          "cooldown_until": now + params.cooldown_s})


def plan_retirement(workers: tuple[WorkerInfo, ...] | list[WorkerInfo], count: int) -> list[str]:
    """Choose `count` workers to retire so the survivors pack onto the fewest nodes.

    Nodes with the fewest workers, then the least load, are emptied first; within a node the
    least-loaded workers go first. Returns worker addresses.
    """
    by_node: dict[str, list[WorkerInfo]] = {}
    for w in workers:
        by_node.setdefault(w.node, []).append(w)
    nodes = sorted(by_node.values(), key=lambda ws: (len(ws), sum(w.load for w in ws), ws[0].node))
    chosen: list[str] = []
    for ws in nodes:
        for w in sorted(ws, key=lambda w: (w.load, w.name)):
            if len(chosen) == count:
                return chosen
            chosen.append(w.address)
    return chosen


@dataclass(frozen=True)
class Infra:
    """What the backend reports about a lab's infrastructure (cluster and Dask release)."""

    cluster: str  # absent, creating, running, deleting, error
    release: str = "absent"  # absent, installing, deployed, failed
    detail: str = ""


@dataclass(frozen=True)
class Step:
    action: str  # provision, wait, install, mark-ready, mark-failed, delete, forget, none
    phase: str  # the phase after the step
    reason: str


def plan_provision_step(phase: str, infra: Infra) -> Step:
    """The next step of the lab's lifecycle state machine: requested → provisioning → installing → ready,
    and tearing-down → gone. Each invocation takes at most one step."""
    if phase == TEARING_DOWN:
        if infra.cluster == "absent":
            return Step("forget", "gone", "infrastructure deleted")
        if infra.cluster == "creating":
            return Step("wait", phase, "cluster still being created; it cannot be deleted before that ends")
        if infra.cluster == "deleting":
            return Step("wait", phase, "deletion in progress")
        return Step("delete", phase, f"cluster {infra.cluster}: deleting it")
    if phase in (READY, FAILED):
        if infra.cluster in ("absent", "error") or infra.release == "failed":
            if phase == FAILED:
                return Step("none", phase, infra.detail or "lab failed")
            return Step("mark-failed", FAILED, infra.detail or f"cluster {infra.cluster}, release {infra.release}")
        return Step("none", phase, "ready")
    # requested, provisioning, installing
    if infra.cluster == "error":
        return Step("mark-failed", FAILED, f"cluster creation failed: {infra.detail}")
    if infra.cluster == "absent":
        return Step("provision", PROVISIONING, "no cluster yet: creating it")
    if infra.cluster == "creating":
        return Step("wait", PROVISIONING, infra.detail or "cluster being created")
    if infra.cluster == "deleting":
        return Step("mark-failed", FAILED, "cluster is being deleted by someone else")
    if infra.release == "absent":
        return Step("install", INSTALLING, "cluster running: installing the Dask release")
    if infra.release == "installing":
        return Step("wait", INSTALLING, infra.detail or "Dask release installing")
    if infra.release == "failed":
        return Step("mark-failed", FAILED, f"Dask release failed: {infra.detail}")
    return Step("mark-ready", READY, "Dask release deployed and scheduler answering")


@dataclass(frozen=True)
class TeardownDecision:
    delete: bool
    reason: str


def plan_teardown(tick: str, spec: LabSpec, state: LabState, load: DaskLoad | None, now: float) -> TeardownDecision:
    """Whether a tick (reconcile, teardown-idle, nightly-teardown) deletes the lab, and why."""
    age = now - state.created_at
    if age >= spec.max_lifetime_s:
        return TeardownDecision(True, f"maximum lifetime {spec.max_lifetime_s}s reached (age {age:.0f}s)")
    kept = spec.keep_alive_until is not None and now < spec.keep_alive_until
    if state.phase == TEARING_DOWN or tick == "reconcile":
        return TeardownDecision(False, "within lifetime")
    if kept:
        return TeardownDecision(False, f"kept alive for {spec.keep_alive_until - now:.0f}s more")
    if tick == "nightly-teardown":
        return TeardownDecision(True, "nightly teardown (not kept alive)")
    # teardown-idle
    if state.phase == FAILED:
        return TeardownDecision(True, f"lab failed: {state.reason}")
    if state.phase != READY:
        return TeardownDecision(False, f"lab is {state.phase}")
    if load is None:
        return TeardownDecision(False, "scheduler unreachable: idleness unknown")
    if load.busy:
        return TeardownDecision(False, f"busy: {load.processing} processing, {load.queued} queued")
    if load.clients > 0:
        return TeardownDecision(False, f"{load.clients} client(s) connected")
    if load.idle_since is None:
        return TeardownDecision(False, "scheduler does not report idleness yet")
    idle = now - max(load.idle_since, state.ready_at or 0.0)
    if idle < spec.idle_timeout_s:
        return TeardownDecision(False, f"idle for {idle:.0f}s < idle timeout {spec.idle_timeout_s}s")
    return TeardownDecision(True, f"idle for {idle:.0f}s ≥ idle timeout {spec.idle_timeout_s}s, no client")


def plan_next_teardown(spec: LabSpec, state: LabState, load: DaskLoad | None,
                       ticks: Iterable[tuple[float, str]]) -> tuple[float, str, str] | None:
    """The first of the coming timer ticks ((time, tick), in time order) whose plan_teardown deletes the lab if it
    stays as observed now, load included: (time, tick, reason); None if none of them does."""
    for at, tick in ticks:
        verdict = plan_teardown(tick, spec, state, load, at)
        if verdict.delete:
            return at, tick, verdict.reason
    return None


def plan_start(existing_spec: LabSpec | None, new_spec: LabSpec) -> tuple[str, str]:
    """What a start-lab does given what exists: create, duplicate (nothing to do) or conflict (refuse)."""
    if existing_spec is None:
        return "create", "new lab requested"
    if existing_spec.owner != new_spec.owner:
        return "conflict", f"lab {new_spec.name} exists and belongs to {existing_spec.owner}"
    return "duplicate", "lab exists already: start-lab is idempotent (use scale to change its limits, update-lab " \
                        "its values)"


# Keys of values.scheduler the controller enforces or that leave the scheduler's pod alone.
_SCHEDULER_KEPT = ("serviceType", "loadBalancerIP", "servicePort", "serviceAnnotations")


def _changed_keys(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    old, new = old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


def plan_update(current: LabSpec, new: LabSpec, restart: bool) -> tuple[str, str]:
    """What an update-lab does: duplicate (same values: nothing to do), refuse (it would restart the scheduler and
    the message does not say restart: true), or update, with what changes."""
    if (new.values, new.worker_cpu, new.worker_memory, new.mixed_environment, new.dask_version) == (
            current.values, current.worker_cpu, current.worker_memory, current.mixed_environment,
            current.dask_version):
        return "duplicate", f"values unchanged: revision {current.revision} already has them"
    values_old, values_new = current.values or {}, new.values or {}
    scheduler = _changed_keys(values_old.get("scheduler"), values_new.get("scheduler"), _SCHEDULER_KEPT)
    if new.dask_version != current.dask_version and "image" not in scheduler:
        scheduler.append("image")  # every component runs the lab's Dask version: a new one is a new scheduler image
    if scheduler and not restart:
        fields = ", ".join(f"values.scheduler.{k}" for k in scheduler)
        return "refuse", (f"{fields} change(s) the scheduler: it restarts, and every result held in memory is lost "
                          f"(futures, persisted collections); send restart: true to accept that")
    parts = []
    worker = _changed_keys(values_old.get("worker"), values_new.get("worker"), ("replicas",))
    if worker or (new.worker_cpu, new.worker_memory) != (current.worker_cpu, current.worker_memory):
        parts.append("workers replaced gracefully (new ones join before the old retire)")
    if scheduler:
        parts.append(f"scheduler restarted ({', '.join(scheduler)}; restart: true)")
    if _changed_keys(values_old.get("jupyter"), values_new.get("jupyter")):
        parts.append("Jupyter restarted with them (a new pod on GKE)")
    return "update", f"revision {current.revision + 1}: " + ("; ".join(parts) or "chart values changed")


@dataclass(frozen=True)
class RolloutStep:
    action: str  # done, start, wait, retire
    count: int
    reason: str


def plan_rollout(stale: int, fresh: int, joined: int, want: int) -> RolloutStep:
    """One step of replacing workers of an old revision (`stale`) by workers of the new one: start `want`
    replacements, wait until they have joined the scheduler, then retire the old (their results move to the
    new ones first). `fresh` replacements run, `joined` of them are connected."""
    if stale == 0:
        return RolloutStep("done", 0, "every worker runs the new revision")
    want = max(want, 1)  # somewhere for the old workers' results to go
    if fresh < want:
        return RolloutStep("start", want - fresh, f"{stale} worker(s) of the old revision: starting "
                                                  f"{want - fresh} replacement(s)")
    if joined < fresh:
        return RolloutStep("wait", 0, f"{fresh - joined} of {fresh} replacement(s) not joined yet: retire nothing "
                                      f"before they arrive")
    return RolloutStep("retire", stale, f"{joined} replacement(s) joined: retiring the {stale} old worker(s), "
                                        f"their results moving first")


REQUESTED_PHASES = (REQUESTED, PROVISIONING, INSTALLING)
