"""Why workers are missing, on the GKE path: the real clients read worker pod status from the Kubernetes stand-in
(OOMKilled, CrashLoopBackOff with the previous container's log, Unschedulable) and the lab says it."""

import pytest

from dasklab.adapters.gke import place_of
from dasklab.core.reconcile import Controller

from tests.gke_world import CONFIG
from tests.test_gke import Events, cmd, controller, drive, handle, lab_of, start_msg, workers, world  # noqa: F401

NS = place_of("lab1").namespace


def worker_pods(world):
    return sorted(p["metadata"]["name"] for p in world.kube.list("pods", NS, "component=worker"))


def degraded(ctl):
    return [e for e in ctl.events.published if e["event"] == "lab-degraded"]


def ready_with_one_worker(ctl, world):
    handle(ctl, start_msg())
    drive(ctl, world, lambda: lab_of(ctl) and lab_of(ctl).state.phase == "ready" and workers(ctl) == 1, timeout=90)


@pytest.mark.slow
def test_an_oom_killed_worker_pod_is_explained_with_its_limit(world, controller):
    ctl = controller
    ready_with_one_worker(ctl, world)
    (pod,) = worker_pods(world)
    world.kube.crash_container(NS, pod, reason="OOMKilled", exit_code=137)  # as the kubelet reports a cgroup kill
    drive(ctl, world, lambda: degraded(ctl))
    (event,) = degraded(ctl)
    assert event["causes"] == ["oom-killed"] and event["workers"]["joined"] == 0, event
    assert (f"OOM-killed: {pod} exceeded the worker memory limit of 3 GB (CrashLoopBackOff; last run OOMKilled, "
            f"exit code 137, restarted 1 time(s)): raise worker_resources.memory "
            f"(values.worker.resources.limits.memory)") in event["reason"]
    assert lab_of(ctl).state.degraded == "oom-killed"
    world.kube.restart_container(NS, pod)  # the back-off ends: the worker rejoins, the kill is still recent
    drive(ctl, world, lambda: workers(ctl) == 1)
    ctl.reconcile_all("reconcile")
    assert len(degraded(ctl)) == 1 and lab_of(ctl).state.degraded_reason == event["reason"]


def test_a_crash_loop_carries_the_failed_pip_install_log(world, controller):
    ctl = controller
    ready_with_one_worker(ctl, world)
    (pod,) = worker_pods(world)
    log = ("+ EXTRA_PIP_PACKAGES environment variable found.  Installing.\n"
           "ERROR: Could not find a version that satisfies the requirement pyarow (from versions: none)\n"
           "ERROR: No matching distribution found for pyarow\n")
    world.kube.crash_container(NS, pod, reason="Error", exit_code=1, log=log)
    drive(ctl, world, lambda: degraded(ctl))
    (event,) = degraded(ctl)
    assert event["causes"] == ["install-failed"], event
    assert "fix the package list in values.worker.env" in event["reason"]
    assert "No matching distribution found for pyarow" in event["reason"]


@pytest.mark.slow
def test_pending_worker_pods_say_the_schedulers_message(world, controller):
    ctl = controller
    ready_with_one_worker(ctl, world)
    world.worker_node_quota = 1  # the pool grows, but no instance past the first can be created
    handle(ctl, cmd(type="scale", lab="lab1", pin=5))
    drive(ctl, world, lambda: degraded(ctl), timeout=60)
    (event,) = degraded(ctl)
    assert event["causes"] == ["pending"], event
    # 3 workers fit the one worker node; the system node's selector does not match: 2 pods wait
    assert ("pending: 2 worker(s) cannot be scheduled (0/2 nodes are available: 1 Too many pods, 1 node(s) didn't "
            "match Pod's node affinity/selector.): the pool lacks nodes or quota") in event["reason"]
    world.worker_node_quota = None  # quota raised: the nodes come, the pods run, the lab recovers
    drive(ctl, world, lambda: lab_of(ctl).state.degraded == "" and workers(ctl) == 5, timeout=90)
    assert [e["event"] for e in ctl.events.published][-1] == "lab-recovered"


def test_status_events_are_not_repeated_by_a_second_controller(world):
    """Level-based: the reported causes live on the lab's record, so another invocation does not repeat them."""
    first = Controller(world.backend(), Events(), CONFIG)
    ready_with_one_worker(first, world)
    (pod,) = worker_pods(world)
    world.kube.crash_container(NS, pod)
    drive(first, world, lambda: degraded(first))
    second = Controller(world.backend(), Events(), CONFIG)
    drive(second, world, lambda: True)
    assert not degraded(second)
