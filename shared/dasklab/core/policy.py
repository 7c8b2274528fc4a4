"""Pure policy: given the lab's spec, remembered state, observed load and `now`, decide one step and say why."""

import math
from dataclasses import dataclass, field, replace
from typing import Iterable

from dasklab.core.context import iso
from dasklab.core.environment import jupyter_enabled, jupyter_packages
from dasklab.core.model import (FAILED, INSTALLING, NO_JUPYTER, PROVISIONING, READY, REQUESTED, TEARING_DOWN, DaskLoad,
                                JupyterActivity, LabSpec, LabState, WorkerInfo, WorkerProblem)

HOLD, UP, DOWN = "hold", "up", "down"


@dataclass(frozen=True)
class ScaleParams:
    confirm_s: float = 20.0  # a lower target must hold this long before workers go
    cooldown_s: float = 15.0  # after a scale-down, no further scale-down for this long
    down_fraction: float = 0.5  # at most this share of the workers goes in one step (at least one)
    warmup_s: float = 900.0  # a new lab keeps its initial workers until first used or this long (≤ its idle timeout)


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
                                           f"(processing={load.processing}, queued={load.queued}{_memory(spec, load)})")
    clamped = min(max(want, spec.min_workers), spec.max_workers)
    if clamped != want:
        why += f", clamped to [{spec.min_workers}, {spec.max_workers}]"
    return clamped, why


def warmup_left(spec: LabSpec, state: LabState, now: float, params: ScaleParams) -> float:
    """Seconds the lab still keeps its initial workers: from readiness until first used (a client or a task seen),
    for at most `warmup_s`, bounded by the lab's idle timeout. 0 once the warm-up is over."""
    if state.first_used_at is not None or spec.initial_workers <= spec.min_workers:
        return 0.0
    start = state.ready_at if state.ready_at is not None else state.created_at
    return max(0.0, start + min(params.warmup_s, spec.idle_timeout_s) - now)


def _memory(spec: LabSpec, load: DaskLoad) -> str:
    """The memory part of the adaptive target's reason, when it counts (above 60 % of the workers' limits)."""
    limit = load.workers * spec.worker_memory
    if not limit or load.memory_bytes <= MEMORY_HIGH * limit:
        return ""
    return (f", memory {size(load.memory_bytes)} = {load.memory_bytes / limit:.0%} of {load.workers} × "
            f"{size(spec.worker_memory)}")


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
    used = {"first_used_at": now} if state.first_used_at is None and (load.clients > 0 or load.busy) else {}
    warming = 0.0 if used or spec.pinned_workers is not None else warmup_left(spec, state, now, params)
    keep = min(spec.initial_workers, spec.max_workers)
    if warming and want < keep:
        want, why = keep, (f"{why}; warming up: keeping the {keep} initial workers until first used "
                           f"(a client or a task), {warming:.0f}s left")
    decision = _plan_scale(spec, state, load, requested, now, params, current, want, why, reset)
    return replace(decision, remember={**decision.remember, **used}) if used else decision


def _plan_scale(spec: LabSpec, state: LabState, load: DaskLoad, requested: int, now: float, params: ScaleParams,
                current: int, want: int, why: str, reset: dict) -> ScaleDecision:
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
    cause: str = ""  # what a deletion rests on: lifetime, nightly, failed or idle (Jupyter may still veto idle)


def plan_idle_check(spec: LabSpec, state: LabState, load: DaskLoad, now: float) -> bool:
    """Whether asking the scheduler since when it is idle (one more dashboard call) could end the lab now: it is
    ready, runs no task, is not kept alive, and has been ready for at least its idle timeout."""
    kept = spec.keep_alive_until is not None and now < spec.keep_alive_until
    ready_for = now - (state.ready_at if state.ready_at is not None else state.created_at)
    return state.phase == READY and not load.busy and not kept and ready_for >= spec.idle_timeout_s


def plan_teardown(tick: str, spec: LabSpec, state: LabState, load: DaskLoad | None, now: float,
                  jupyter: JupyterActivity | None = NO_JUPYTER) -> TeardownDecision:
    """Whether a tick (reconcile, teardown-idle, nightly-teardown) deletes the lab, and why.

    Idle means, for the whole idle timeout: the scheduler idle (no task), no Jupyter kernel busy and no Jupyter
    activity. A connected client alone keeps nothing. A reconcile tick judges idleness when it has read the
    scheduler's `idle_since`. `jupyter` is None when the lab's Jupyter did not answer (idleness unknown) and
    NO_JUPYTER when the lab runs none; a caller may read it only once the scheduler alone would let the lab go
    (cause "idle"), then ask again with it.
    """
    age = now - state.created_at
    if age >= spec.max_lifetime_s:
        return TeardownDecision(True, f"maximum lifetime {spec.max_lifetime_s}s reached (age {age:.0f}s)", "lifetime")
    kept = spec.keep_alive_until is not None and now < spec.keep_alive_until
    if state.phase == TEARING_DOWN or (tick == "reconcile" and (
            state.phase != READY or load is None or load.idle_since is None)):
        return TeardownDecision(False, "within lifetime")
    if kept:
        return TeardownDecision(False, f"kept alive for {spec.keep_alive_until - now:.0f}s more")
    if tick == "nightly-teardown":
        return TeardownDecision(True, "nightly teardown (not kept alive)", "nightly")
    # teardown-idle, or a reconcile tick that read the scheduler's idleness
    if state.phase == FAILED:
        return TeardownDecision(True, f"lab failed: {state.reason}", "failed")
    if state.phase != READY:
        return TeardownDecision(False, f"lab is {state.phase}")
    if load is None:
        return TeardownDecision(False, "scheduler unreachable: idleness unknown")
    if load.busy:
        return TeardownDecision(False, f"busy: {load.processing} processing, {load.queued} queued")
    if load.idle_since is None:
        return TeardownDecision(False, "scheduler does not report idleness yet")
    if jupyter is None:
        return TeardownDecision(False, "Jupyter unreachable: idleness unknown")
    if jupyter.busy_kernels:
        return TeardownDecision(False, f"{jupyter.busy_kernels} of {jupyter.kernels} Jupyter kernel(s) busy")
    since = max(load.idle_since, state.ready_at or 0.0)
    if jupyter.last_activity is not None and jupyter.last_activity > since:
        since, what = jupyter.last_activity, "Jupyter idle"
    else:
        what = "idle"
    idle = now - since
    if idle < spec.idle_timeout_s:
        return TeardownDecision(False, f"{what} for {idle:.0f}s < idle timeout {spec.idle_timeout_s}s")
    clients = f"; {load.clients} client(s) connected but unused" if load.clients else ""
    jupyter_note = ", no Jupyter kernel busy or activity" if jupyter.running else ""
    return TeardownDecision(True, f"idle for {idle:.0f}s ≥ idle timeout {spec.idle_timeout_s}s: no task"
                                  f"{jupyter_note}{clients}", "idle")


def plan_tick_reach(tick: str, published: float | None, created_at: float) -> tuple[bool, str]:
    """Whether a tick published at `published` (its Pub/Sub publishTime; None: not from Pub/Sub) acts on a lab created
    at `created_at`. A teardown tick acts only on labs that existed when it was published, so one redelivered hours
    later (Pub/Sub retries for up to 24 h) spares the labs started since; a reconcile tick reaches every lab (its
    steps are what each lab's own state asks for now). Returns (acts, reason)."""
    if tick == "reconcile" or published is None or created_at <= published:
        return True, ""
    return False, (f"{tick} published at {iso(published)}, before the lab was created ({iso(created_at)}): "
                   f"it acts only on labs that existed when it fired")


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


# Keys of values.scheduler the controller replaces whatever they say: they leave the scheduler's pod alone.
_SCHEDULER_KEPT = ("serviceType", "loadBalancerIP", "serviceAccountName")


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
    if new.max_workers != current.max_workers:
        parts.append(f"workers.max {current.max_workers} → {new.max_workers} (values.worker.replicas)")
    jupyter = plan_jupyter_restart(current, new)
    if jupyter:
        parts.append(jupyter)
    return "update", f"revision {current.revision + 1}: " + ("; ".join(parts) or "chart values changed")


JUPYTER_RESTARTS = "Jupyter restarts: kernel state is lost; results on the workers are kept"


def plan_jupyter_restart(current: LabSpec, new: LabSpec) -> str:
    """What an update does to the lab's Jupyter, said when it costs the kernels' state ("" = they are kept). On GKE
    any change to `values.jupyter` is a new pod; a local lab's Jupyter restarts when its EXTRA_PIP_PACKAGES (its
    venv) change, and stops when the values disable it."""
    if not jupyter_enabled(current.values):
        return ""  # none ran: nothing is lost (one starts if the values enable it)
    if not jupyter_enabled(new.values):
        return "Jupyter stops (values.jupyter.enabled: false): kernel state is lost; results on the workers are kept"
    if not _changed_keys((current.values or {}).get("jupyter"), (new.values or {}).get("jupyter")):
        return ""
    if jupyter_packages(current.values) != jupyter_packages(new.values):
        return JUPYTER_RESTARTS
    return f"{JUPYTER_RESTARTS} (on GKE: a new pod; a local lab's Jupyter runs on, its packages unchanged)"


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

DEGRADED, RECOVERED = "degraded", "recovered"
HEALTH_RECENT_S = 600.0  # a worker killed or restarted this recently still degrades the lab
# distributed's Scheduler.adaptive_target asks for twice the workers once they hold more than 60 % of their memory
# limits; a worker pauses at 80 % and its nanny (or the kubelet) kills it at 95 % (distributed.worker.memory.*).
MEMORY_HIGH, MEMORY_LOW = 0.6, 0.5  # degraded above HIGH at the lab's cap; recovered below LOW
_KINDS = ("oom-killed", "install-failed", "image-pull", "crash-looping", "pending", "restarting", "memory")
_RAISE_MEMORY = "raise worker_resources.memory (values.worker.resources.limits.memory)"


@dataclass(frozen=True)
class HealthDecision:
    action: str  # degraded, recovered or hold
    causes: str  # the kinds of problem, "+"-joined in _KINDS order; "" when healthy
    reason: str


def size(n: float) -> str:
    """Bytes as people read a memory limit: 500 MB, 3 GB."""
    return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def _names(problems: list[WorkerProblem]) -> str:
    names = sorted({p.worker for p in problems})
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _tail(problems: list[WorkerProblem]) -> str:
    tail = next((p.log_tail for p in sorted(problems, key=lambda p: -p.at) if p.log_tail.strip()), "")
    lines = tail.strip().splitlines()
    while len(lines) > 1 and len("\n".join(lines)) > 400:  # whole lines, the last ones
        lines.pop(0)
    return f"; log tail: {chr(10).join(lines)[-400:]}" if lines else ""


def _explain(kind: str, problems: list[WorkerProblem], spec: LabSpec) -> str:
    names, first, restarts = _names(problems), problems[0], max(p.restarts for p in problems)
    again = f", restarted {restarts} time(s)" if restarts else ""
    if kind == "oom-killed":
        limit = max(p.memory_limit for p in problems) or spec.worker_memory
        return (f"OOM-killed: {names} exceeded the worker memory limit of {size(limit)} ({first.detail}{again}): "
                f"{_RAISE_MEMORY}, or spread the data over more workers (workers.max)")
    if kind == "install-failed":
        return (f"EXTRA_PIP_PACKAGES install failed on {names} ({first.detail}{again}): fix the package list in "
                f"values.worker.env{_tail(problems)}")
    if kind == "image-pull":
        return f"image pull failed for {names} ({first.detail}): check values.worker.image (repository and tag)"
    if kind == "crash-looping":
        return f"crash-looping: {names} ({first.detail}{again}){_tail(problems)}"
    if kind == "pending":
        return (f"pending: {len({p.worker for p in problems})} worker(s) cannot be scheduled ({first.detail}): "
                f"the pool lacks nodes or quota")
    return f"restarting: {names} ({first.detail}{again}){_tail(problems)}"


def plan_health_probe(state: LabState, joined: int, requested: int, now: float, rolling: bool,
                      installs_at_start: bool) -> str:
    """Why the backend is asked what is wrong with the workers this pass ("" = not asked: nothing extra at rest):
    workers missing, being replaced, just started where packages install at container start (the lab's first
    HEALTH_RECENT_S: did they install?), or the lab already degraded (to see it recover)."""
    if min(joined, requested) < state.target_workers:
        return "workers missing"
    if rolling:
        return "workers being replaced"
    if installs_at_start and state.ready_at is not None and now - state.ready_at < HEALTH_RECENT_S:
        return "workers just started: their EXTRA_PIP_PACKAGES install"
    return "degraded" if state.degraded else ""


def plan_health(spec: LabSpec, state: LabState, load: DaskLoad, problems: tuple[WorkerProblem, ...] | list,
                now: float, recent_s: float = HEALTH_RECENT_S) -> HealthDecision:
    """Whether the lab's workers are degraded, and why: the backend's worker problems (those ongoing or within
    `recent_s`) plus memory pressure the lab cannot scale out of. A cause already reported (`state.degraded`) is
    not reported again; once none is left, the lab has recovered."""
    current = [p for p in problems if not p.at or now - p.at < recent_s]
    found: dict[str, list[WorkerProblem]] = {}
    for p in current:
        found.setdefault(p.kind if p.kind in _KINDS else "restarting", []).append(p)
    reasons = {kind: _explain(kind, ps, spec) for kind, ps in found.items()}
    cap = spec.pinned_workers if spec.pinned_workers is not None else spec.max_workers
    limit = load.workers * spec.worker_memory
    held = load.memory_bytes / limit if limit else 0.0
    pressed = "memory" in state.degraded.split("+")
    if load.workers and load.workers >= cap and held > (MEMORY_LOW if pressed else MEMORY_HIGH):
        how = "the pinned count" if spec.pinned_workers is not None else "its maximum"
        reasons["memory"] = (
            f"memory: the workers hold {size(load.memory_bytes)}, {held:.0%} of their {load.workers} × "
            f"{size(spec.worker_memory)} limit, and the lab is at {how} of {cap} worker(s) (adaptive_target="
            f"{load.adaptive_target}): a worker pauses at 80% of its limit and is killed at 95%. Raise workers.max "
            f"(dasklab scale --lab {spec.name} --max N) or {_RAISE_MEMORY.removeprefix('raise ')}")
    causes = "+".join(k for k in _KINDS if k in reasons)
    reason = "; ".join(reasons[k] for k in _KINDS if k in reasons)
    if causes == state.degraded:
        return HealthDecision(HOLD, causes, reason or "workers healthy")
    if causes:
        return HealthDecision(DEGRADED, causes, reason)
    return HealthDecision(RECOVERED, "", f"no cause left (was {state.degraded}): {load.workers} worker(s) joined")
