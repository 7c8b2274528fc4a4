"""Policy tables: (spec, state, load, now) → decision and its reason."""

from dataclasses import replace

import pytest

from dasklab.core.model import NO_JUPYTER, JupyterActivity, WorkerInfo
from dasklab.core.policy import (plan_tick_reach, DOWN, HOLD, UP, Infra, ScaleParams, plan_idle_check, plan_next_teardown,
                                 plan_provision_step, plan_retirement, plan_scale, plan_start, plan_teardown)
from tests.conftest import make_load, make_spec, make_state

P = ScaleParams(confirm_s=20, cooldown_s=15, down_fraction=0.5)


@pytest.mark.parametrize("spec, state, load, requested, now, action, target, why", [
    # scale up at once, clamped to max
    ({}, {"target_workers": 2}, {"adaptive_target": 5}, 2, 100, UP, 5, "adaptive_target=5"),
    ({}, {"target_workers": 2}, {"adaptive_target": 50}, 2, 100, UP, 8, "clamped to [1, 8]"),
    # min raised above the target: up
    ({"min_workers": 4}, {"target_workers": 2}, {"adaptive_target": 0}, 2, 100, UP, 4, "clamped"),
    # equal: hold
    ({}, {"target_workers": 3}, {"adaptive_target": 3, "workers": 3}, 3, 100, HOLD, 3, "= target"),
    # lower target first seen: start confirming, remember when
    ({}, {"target_workers": 6}, {"adaptive_target": 1, "workers": 6}, 6, 100, HOLD, 6, "confirming (0.0/20s)"),
    # still inside the window
    ({}, {"target_workers": 6, "down_window": ((1, 90.0),)}, {"adaptive_target": 1, "workers": 6}, 6, 100,
     HOLD, 6, "confirming (10.0/20s)"),
    # window passed: bounded step (half of 6 = 3)
    ({}, {"target_workers": 6, "down_window": ((1, 70.0),)}, {"adaptive_target": 1, "workers": 6}, 6, 100,
     DOWN, 3, "at most 3 per step"),
    # the highest target wanted over the last 20 s bounds the step: 5 until 85, 1 since
    ({}, {"target_workers": 6, "down_window": ((5, 70.0), (1, 85.0))}, {"adaptive_target": 1, "workers": 6}, 6, 100,
     DOWN, 5, "at most 5 wanted over the last 20s"),
    # 4 → 3 → 1 with no staircase: only 1 was wanted over the last 20 s (the step still goes at most half)
    ({}, {"target_workers": 4, "down_window": ((3, 70.0), (1, 80.0))}, {"adaptive_target": 1, "workers": 4}, 4, 100,
     DOWN, 2, "at most 1 wanted"),
    # a rise inside the window breaks the lower steps: 3 wanted now, so 4 (wanted until 100) is the floor
    ({}, {"target_workers": 6, "down_window": ((4, 70.0), (1, 85.0))}, {"adaptive_target": 3, "workers": 6}, 6, 100,
     DOWN, 4, "at most 4 wanted"),
    # never below min
    ({"min_workers": 2}, {"target_workers": 3, "down_window": ((2, 0.0),)},
     {"adaptive_target": 0, "workers": 3}, 3, 100, DOWN, 2, "clamped"),
    # cooldown after a previous step
    ({}, {"target_workers": 4, "down_window": ((1, 70.0),), "cooldown_until": 105.0},
     {"adaptive_target": 1, "workers": 4}, 4, 100, HOLD, 4, "cooling down"),
    # requested workers have not all joined: never retire
    ({}, {"target_workers": 6, "down_window": ((1, 0.0),)}, {"adaptive_target": 1, "workers": 4}, 6, 100, HOLD, 6,
     "have not joined yet"),
    # the owner lowered max: follow at once
    ({"max_workers": 3}, {"target_workers": 6}, {"adaptive_target": 6, "workers": 6}, 6, 100, DOWN, 3,
     "owner's limits"),
    # pinned count wins over load
    ({"pinned_workers": 4}, {"target_workers": 2}, {"adaptive_target": 0}, 2, 100, UP, 4, "pinned at 4"),
    ({"pinned_workers": 2}, {"target_workers": 6}, {"adaptive_target": 6, "workers": 6}, 6, 100, DOWN, 2,
     "pinned at 2"),
])
@pytest.mark.smoke
def test_plan_scale(spec, state, load, requested, now, action, target, why):
    d = plan_scale(make_spec(**spec), make_state(**state), make_load(**load), requested, now, P)
    assert (d.action, d.target) == (action, target), d.reason
    assert why in d.reason


def test_confirmation_window_remembers_the_highest_target_over_the_window():
    spec = make_spec()

    def seen(window, want, now):
        return plan_scale(spec, make_state(target_workers=6, down_window=window),
                          make_load(adaptive_target=want, workers=6), 6, now, P)

    d = seen((), 2, 100)
    assert d.action == HOLD and d.remember == {"down_window": ((2, 100),)}
    # lower: a new step, the older one still holds
    assert seen(((2, 100.0),), 1, 105).remember == {"down_window": ((2, 100.0), (1, 105))}
    # the same value again: nothing new to remember
    assert seen(((2, 100.0), (1, 105.0)), 1, 106).remember == {}
    # higher than the last step: the steps below it are broken, the ones above still hold
    assert seen(((4, 100.0), (1, 105.0)), 2, 110).remember == {"down_window": ((4, 100.0), (2, 110))}
    assert seen(((2, 100.0), (1, 105.0)), 4, 110).remember == {"down_window": ((4, 110),)}
    # requested workers still joining: the window starts again once they have arrived
    d = plan_scale(spec, make_state(target_workers=6, down_window=((1, 90.0),)),
                   make_load(adaptive_target=1, workers=4), 6, 112, P)
    assert d.action == HOLD and d.remember == {"down_window": ()}
    # a load spike back to the target cancels the window
    d = plan_scale(spec, make_state(target_workers=6, down_window=((4, 100.0),)),
                   make_load(adaptive_target=6, workers=6), 6, 112, P)
    assert d.action == HOLD and d.remember == {"down_window": ()}


def test_a_falling_target_is_reached_one_window_after_it_was_first_wanted():
    # wanted 6 → 3 (t=100) → 1 (t=105): down to 3 at 120, to 1 at 125, not a whole new window after 120
    spec, params = make_spec(), ScaleParams(confirm_s=20, cooldown_s=0, down_fraction=1)
    state, steps = make_state(target_workers=6), []
    for now in range(100, 131):
        want = 3 if now < 105 else 1
        d = plan_scale(spec, state, make_load(adaptive_target=want, workers=state.target_workers),
                       state.target_workers, now, params)
        state = replace(state, target_workers=d.target, **d.remember)
        if d.action == DOWN:
            steps.append((now, d.target))
    assert steps == [(120, 3), (125, 1)]


def test_step_sets_cooldown():
    d = plan_scale(make_spec(), make_state(target_workers=8, down_window=((1, 0.0),)),
                   make_load(adaptive_target=1, workers=8), 8, 100, P)
    assert d.action == DOWN and d.target == 4 and d.remember == {"down_window": ((1, 0.0),), "cooldown_until": 115}


def _w(addr, node, load=0.0):
    return WorkerInfo(address=addr, name=addr, node=node, load=load)


@pytest.mark.parametrize("workers, count, expected", [
    # empty the node with fewest workers first
    ([_w("a", "n0"), _w("b", "n0"), _w("c", "n0"), _w("d", "n1")], 1, ["d"]),
    # then the least loaded node, all of it
    ([_w("a", "n0", 5), _w("b", "n0", 5), _w("c", "n1", 1), _w("d", "n1", 0)], 2, ["d", "c"]),
    # partial: least loaded workers of the next node
    ([_w("a", "n0", 5), _w("b", "n0", 1), _w("c", "n1", 9), _w("d", "n1", 9), _w("e", "n2", 0)], 2, ["e", "b"]),
    ([_w("a", "n0")], 0, []),
])
def test_plan_retirement_packs_survivors(workers, count, expected):
    assert plan_retirement(workers, count) == expected


@pytest.mark.parametrize("phase, infra, action, to", [
    ("provisioning", Infra("absent"), "provision", "provisioning"),
    ("provisioning", Infra("creating"), "wait", "provisioning"),
    ("provisioning", Infra("error", detail="quota"), "mark-failed", "failed"),
    ("provisioning", Infra("running"), "install", "installing"),
    ("installing", Infra("running", "installing"), "wait", "installing"),
    ("installing", Infra("running", "failed", "ImagePullBackOff"), "mark-failed", "failed"),
    ("installing", Infra("running", "deployed"), "mark-ready", "ready"),
    ("ready", Infra("running", "deployed"), "none", "ready"),
    ("ready", Infra("error", detail="scheduler exited"), "mark-failed", "failed"),
    ("tearing-down", Infra("creating"), "wait", "tearing-down"),
    ("tearing-down", Infra("running", "deployed"), "delete", "tearing-down"),
    ("tearing-down", Infra("deleting"), "wait", "tearing-down"),
    ("tearing-down", Infra("absent"), "forget", "gone"),
])
@pytest.mark.smoke
def test_plan_provision_step(phase, infra, action, to):
    step = plan_provision_step(phase, infra)
    assert (step.action, step.phase) == (action, to), step.reason


IDLE = dict(processing=0, queued=0, clients=0, idle_since=1000.0)


@pytest.mark.parametrize("tick, spec, state, load, now, delete, why", [
    ("teardown-idle", {}, {}, IDLE, 1700, True, "idle for 700s"),
    ("teardown-idle", {}, {}, IDLE, 1500, False, "idle for 500s < idle timeout 600s"),
    ("teardown-idle", {}, {}, {**IDLE, "processing": 3}, 9000, False, "busy"),
    ("teardown-idle", {}, {}, {**IDLE, "queued": 3}, 9000, False, "busy"),
    # a connected client alone keeps nothing (a notebook left open with a Client)
    ("teardown-idle", {}, {}, {**IDLE, "clients": 1}, 9000, True, "1 client(s) connected but unused"),
    ("teardown-idle", {}, {}, {**IDLE, "idle_since": None}, 9000, False, "does not report idleness"),
    ("teardown-idle", {}, {}, None, 9000, False, "unreachable"),
    ("teardown-idle", {"keep_alive_until": 10000.0}, {}, IDLE, 9000, False, "kept alive"),
    ("teardown-idle", {}, {"phase": "failed", "reason": "boom"}, None, 100, True, "lab failed: boom"),
    ("teardown-idle", {}, {"phase": "provisioning"}, None, 9000, False, "lab is provisioning"),
    # idle counted from readiness at the earliest
    ("teardown-idle", {}, {"ready_at": 1500.0}, IDLE, 1700, False, "idle for 200s"),
    ("nightly-teardown", {}, {}, {**IDLE, "processing": 5}, 100, True, "nightly"),
    ("nightly-teardown", {"keep_alive_until": 200.0}, {}, IDLE, 100, False, "kept alive"),
    ("nightly-teardown", {"keep_alive_until": 200.0}, {}, IDLE, 300, True, "nightly"),
    # lifetime caps everything, even keep-alive, on every tick
    ("reconcile", {"keep_alive_until": 1e9}, {}, IDLE, 8 * 3600, True, "maximum lifetime"),
    ("reconcile", {}, {}, {**IDLE, "idle_since": None}, 9000, False, "within lifetime"),
    # a reconcile tick that read the scheduler's idleness tears an idle lab down (within a minute, not at 15)
    ("reconcile", {}, {}, IDLE, 1700, True, "idle for 700s ≥ idle timeout 600s"),
    ("reconcile", {}, {}, IDLE, 1500, False, "idle for 500s < idle timeout 600s"),
    ("reconcile", {"keep_alive_until": 10000.0}, {}, IDLE, 9000, False, "kept alive"),
    ("reconcile", {}, {"phase": "failed"}, IDLE, 9000, False, "within lifetime"),  # failed: the 15-minute tick
])
@pytest.mark.smoke
def test_plan_teardown(tick, spec, state, load, now, delete, why):
    d = plan_teardown(tick, make_spec(**spec), make_state(**state), load and make_load(**load), now)
    assert d.delete is delete and why in d.reason, d.reason


def jup(last_activity=1000.0, kernels=1, busy=0):
    return JupyterActivity(last_activity=last_activity, kernels=kernels, busy_kernels=busy)


@pytest.mark.parametrize("load, jupyter, now, delete, why", [
    # idle means all three for the idle timeout: the scheduler, every kernel, Jupyter's own activity
    (IDLE, jup(), 1700, True, "no task, no Jupyter kernel busy or activity"),
    (IDLE, NO_JUPYTER, 1700, True, "no task"),
    # a kernel running a long cell that is not Dask: the scheduler is idle, the lab is not
    (IDLE, jup(busy=1, kernels=2), 9000, False, "1 of 2 Jupyter kernel(s) busy"),
    # somebody used Jupyter (opened a notebook, saved, ran a cell) after the scheduler went idle
    (IDLE, jup(last_activity=1500.0), 1700, False, "Jupyter idle for 200s < idle timeout 600s"),
    (IDLE, jup(last_activity=1500.0), 2100, True, "idle for 600s"),
    # Jupyter active long ago counts for nothing: the scheduler went idle later
    (IDLE, jup(last_activity=10.0), 1500, False, "idle for 500s"),
    # a Jupyter that does not answer: idleness unknown, the lifetime cap still holds
    (IDLE, None, 9000, False, "Jupyter unreachable"),
    (IDLE, None, 8 * 3600, True, "maximum lifetime"),
    # busy scheduler: Jupyter is not even needed to keep it
    ({**IDLE, "processing": 1}, jup(), 9000, False, "busy"),
])
def test_plan_teardown_is_jupyter_aware(load, jupyter, now, delete, why):
    for tick in ("teardown-idle", "reconcile"):
        d = plan_teardown(tick, make_spec(), make_state(), make_load(**load), now, jupyter)
        assert d.delete is delete and why in d.reason, (tick, d.reason)
    # the scheduler alone would let it go: the caller must read Jupyter before acting
    if delete and jupyter is not None and "lifetime" not in why:
        assert plan_teardown("teardown-idle", make_spec(), make_state(), make_load(**load), now).cause == "idle"


@pytest.mark.parametrize("spec, state, load, now, ask", [
    ({}, {}, {}, 1000, True),
    ({}, {}, {"processing": 2}, 1000, False),  # work: not idle, no need to ask
    ({}, {}, {"queued": 2}, 1000, False),
    ({}, {"ready_at": 900.0}, {}, 1000, False),  # ready for less than the idle timeout: cannot be idle long enough
    ({"keep_alive_until": 2000.0}, {}, {}, 1000, False),
    ({}, {"phase": "installing"}, {}, 1000, False),
    ({}, {}, {"clients": 3}, 1000, True),  # a client alone keeps nothing: ask
])
def test_plan_idle_check_asks_only_labs_that_could_be_idle(spec, state, load, now, ask):
    assert plan_idle_check(make_spec(**spec), make_state(**state), make_load(**load), now) is ask


W = ScaleParams(confirm_s=20, cooldown_s=15, down_fraction=0.5, warmup_s=900)


@pytest.mark.parametrize("spec, state, load, now, action, target, why, remember", [
    # a new lab keeps its 4 initial workers while nobody has used it, though the target says 0
    ({"initial_workers": 4, "min_workers": 0}, {"target_workers": 4, "ready_at": 100.0},
     {"adaptive_target": 0, "workers": 4}, 160, HOLD, 4, "warming up: keeping the 4 initial workers", {}),
    ({"initial_workers": 4, "min_workers": 0, "idle_timeout_s": 3600}, {"target_workers": 4, "ready_at": 100.0},
     {"adaptive_target": 0, "workers": 4}, 160, HOLD, 4, "840s left", {}),
    ({"initial_workers": 4, "min_workers": 0}, {"target_workers": 4, "ready_at": 100.0},  # idle timeout 600 s bounds it
     {"adaptive_target": 0, "workers": 4}, 160, HOLD, 4, "540s left", {}),
    # first use (a client connects): remembered; the warm-up is over, the confirmation window starts
    ({"initial_workers": 4, "min_workers": 0}, {"target_workers": 4, "ready_at": 100.0},
     {"adaptive_target": 0, "workers": 4, "clients": 1}, 160, HOLD, 4, "confirming",
     {"first_used_at": 160, "down_window": ((0, 160),)}),
    # a task ran: used too
    ({"initial_workers": 4, "min_workers": 0}, {"target_workers": 4, "ready_at": 100.0},
     {"adaptive_target": 4, "workers": 4, "processing": 3}, 160, HOLD, 4, "= target", {"first_used_at": 160}),
    # used earlier: scales down as usual
    ({"initial_workers": 4, "min_workers": 0},
     {"target_workers": 4, "ready_at": 100.0, "first_used_at": 150.0, "down_window": ((0, 130.0),)},
     {"adaptive_target": 0, "workers": 4}, 160, DOWN, 2, "at most 2 per step", None),
    # never used, the warm-up period passed: scales down
    ({"initial_workers": 4, "min_workers": 0}, {"target_workers": 4, "ready_at": 100.0, "down_window": ((0, 990.0),)},
     {"adaptive_target": 0, "workers": 4}, 1010, DOWN, 2, "at most 0 wanted", None),
    # the warm-up is bounded by the idle timeout (here 60 s < warmup_s)
    ({"initial_workers": 4, "min_workers": 0, "idle_timeout_s": 60}, {"target_workers": 4, "ready_at": 100.0},
     {"adaptive_target": 0, "workers": 4}, 161, HOLD, 4, "confirming", None),
    ({"initial_workers": 4, "min_workers": 0, "idle_timeout_s": 60}, {"target_workers": 4, "ready_at": 100.0},
     {"adaptive_target": 0, "workers": 4}, 159, HOLD, 4, "1s left", None),
    # load above the initial count still scales up at once
    ({"initial_workers": 2, "min_workers": 0}, {"target_workers": 2, "ready_at": 100.0},
     {"adaptive_target": 6, "workers": 2}, 110, UP, 6, "adaptive_target=6", None),
    # the owner's pin wins over the warm-up
    ({"initial_workers": 4, "min_workers": 0, "pinned_workers": 1}, {"target_workers": 4, "ready_at": 100.0},
     {"adaptive_target": 0, "workers": 4}, 110, DOWN, 1, "pinned at 1", None),
    # max lowered below the initial count: the warm-up keeps no more than max
    ({"initial_workers": 4, "min_workers": 0, "max_workers": 3}, {"target_workers": 4, "ready_at": 100.0},
     {"adaptive_target": 0, "workers": 4}, 110, DOWN, 3, "keeping the 3 initial workers", None),
])
def test_warm_up_keeps_the_initial_workers_until_first_use(spec, state, load, now, action, target, why, remember):
    d = plan_scale(make_spec(**spec), make_state(**state), make_load(**load), load["workers"], now, W)
    assert (d.action, d.target) == (action, target), d.reason
    assert why in d.reason, d.reason
    if remember is not None:
        assert d.remember == remember


def test_plan_start():
    spec = make_spec()
    assert plan_start(None, spec)[0] == "create"
    assert plan_start(spec, spec)[0] == "duplicate"
    assert plan_start(make_spec(owner="bob"), spec)[0] == "conflict"


@pytest.mark.parametrize("machine, cpu, mem, per_node", [
    ("e2-standard-4", 1, 3 * 10**9, 3), ("e2-standard-4", 2, 3 * 10**9, 1), ("e2-standard-8", 1, 3 * 10**9, 7),
    ("e2-highcpu-8", 1, 3 * 10**9, 2), ("e2-standard-2", 4, 3 * 10**9, 1),
])
def test_workers_per_node(machine, cpu, mem, per_node):
    spec = make_spec(machine_type=machine, worker_cpu=cpu, worker_memory=mem)
    assert spec.workers_per_node == per_node
    assert spec.nodes_for(per_node * 2 + 1) == 3


def test_a_stale_floor_never_scales_down_upwards():
    # found by the property test: a floor remembered before max was lowered must not raise the target
    d = plan_scale(make_spec(min_workers=0, max_workers=1),
                   make_state(target_workers=1, down_window=((2, 0.0),), first_used_at=0.0),
                   make_load(adaptive_target=0, workers=1), 1, 20, P)
    assert d.action == HOLD and d.target == 1 and d.remember == {"down_window": ((0, 20),)}


def ticks(start: float, nightly_at: float = 86400 + 7200) -> list[tuple[float, str]]:
    """A day of the timers after `start`: reconcile each minute, teardown-idle each 15 minutes, one nightly."""
    every = [(t, "reconcile") for t in range(60, 2 * 86400, 60)] + [(t, "teardown-idle") for t in
                                                                     range(900, 2 * 86400, 900)]
    return sorted(tick for tick in every + [(nightly_at, "nightly-teardown")] if tick[0] > start)


@pytest.mark.parametrize("spec, load, now, nightly_at, expected", [
    # idle since 100 with a 600 s timeout: the first reconcile tick after 700 (within a minute, not at 900)
    ({}, {"idle_since": 100.0}, 200, 86400, (720, "reconcile", "idle for 620s ≥ idle timeout 600s")),
    # kept alive until 5000: the first reconcile tick after that
    ({"keep_alive_until": 5000.0}, {"idle_since": 100.0}, 200, 86400, (5040, "reconcile", "idle for 4940s")),
    # busy: no idle teardown; the nightly one comes first
    ({}, {"processing": 3}, 200, 7200, (7200, "nightly-teardown", "nightly teardown (not kept alive)")),
    # busy and kept alive past the night: the lifetime cap (8 h), at the first tick that sees it
    ({"keep_alive_until": 90000.0}, {"processing": 3}, 200, 7200, (28800, "reconcile", "maximum lifetime 28800s")),
    # the scheduler does not answer (no load): idleness unknown, the nightly teardown still comes
    ({}, None, 200, 7200, (7200, "nightly-teardown", "nightly teardown")),
])
def test_next_teardown_is_the_first_tick_the_policy_deletes_at(spec, load, now, nightly_at, expected):
    found = plan_next_teardown(make_spec(**spec), make_state(), None if load is None else make_load(**load),
                               ticks(now, nightly_at))
    assert found is not None and found[:2] == expected[:2] and expected[2] in found[2], found


def test_no_tick_no_teardown():
    assert plan_next_teardown(make_spec(), make_state(), make_load(idle_since=0.0), []) is None


@pytest.mark.parametrize("tick, published, created_at, acts", [
    ("nightly-teardown", 1000.0, 999.0, True),  # existed when the tick fired
    ("nightly-teardown", 1000.0, 1000.0, True),
    ("nightly-teardown", 1000.0, 1000.5, False),  # created after: a redelivery spares it
    ("teardown-idle", 1000.0, 1600.0, False),
    ("reconcile", 1000.0, 1600.0, True),  # a reconcile tick's steps are what the lab's own state asks for
    ("nightly-teardown", None, 1600.0, True),  # not from Pub/Sub (a direct call): no publish time to go by
])
def test_a_teardown_tick_acts_only_on_labs_that_existed_when_it_was_published(tick, published, created_at, acts):
    verdict, reason = plan_tick_reach(tick, published, created_at)
    assert verdict is acts
    assert (reason == "") is acts and (acts or "before the lab was created" in reason)
