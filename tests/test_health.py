"""Why workers are missing: plan_health tables (problems, memory, state, now) → degraded / recovered with a reason."""

import pytest

from dasklab.core.model import WorkerProblem
from dasklab.core.policy import DEGRADED, HOLD, RECOVERED, desired_workers, plan_health, plan_health_probe
from tests.conftest import make_load, make_spec, make_state

GB = 10**9
OOM = WorkerProblem("oom-killed", "w-1", "OOMKilled, exit code 137", at=95.0, restarts=2, memory_limit=3 * GB)
PENDING = WorkerProblem("pending", "w-2", "0/3 nodes are available: 3 Insufficient memory.")
CRASH = WorkerProblem("crash-looping", "w-3", "CrashLoopBackOff, exit code 1", at=90.0, restarts=4,
                      log_tail="Traceback …\nModuleNotFoundError: No module named 'pyarrow'")
PIP = WorkerProblem("install-failed", "w-4", "CrashLoopBackOff, exit code 1", at=90.0, restarts=1,
                    log_tail="ERROR: No matching distribution found for pyarow")
PULL = WorkerProblem("image-pull", "w-5", 'ImagePullBackOff: Back-off pulling image "ghcr.io/dask/dask:nope"')


@pytest.mark.parametrize("spec, state, load, problems, action, causes, why", [
    # nothing wrong, nothing reported: hold
    ({}, {}, {}, [], HOLD, "", "workers healthy"),
    # an OOM kill: the limit, the exit code and what to raise
    ({}, {}, {}, [OOM], DEGRADED, "oom-killed",
     "w-1 exceeded the worker memory limit of 3 GB (OOMKilled, exit code 137, restarted 2 time(s)): raise "
     "worker_resources.memory (values.worker.resources.limits.memory)"),
    # the limit from the spec when the backend does not say
    ({"worker_memory": 500 * 10**6}, {}, {}, [WorkerProblem("oom-killed", "n0-w0", "nanny restart", at=99.0)],
     DEGRADED, "oom-killed", "limit of 500 MB"),
    # already reported: not again, even with other details
    ({}, {"degraded": "oom-killed"}, {}, [OOM, WorkerProblem("oom-killed", "w-9", "x", at=99.0)], HOLD,
     "oom-killed", "w-1, w-9"),
    # a new cause joins: reported again, every cause in order
    ({}, {"degraded": "oom-killed"}, {}, [PENDING, OOM], DEGRADED, "oom-killed+pending",
     "pending: 1 worker(s) cannot be scheduled (0/3 nodes are available: 3 Insufficient memory.): the pool lacks "
     "nodes or quota"),
    # a kill long ago no longer counts: recovered
    ({}, {"degraded": "oom-killed"}, {}, [WorkerProblem("oom-killed", "w-1", "OOMKilled", at=100.0 - 601)],
     RECOVERED, "", "no cause left (was oom-killed): 2 worker(s) joined"),
    # crash loops carry the log tail; a pip failure says which setting to fix
    ({}, {}, {}, [CRASH], DEGRADED, "crash-looping", "No module named 'pyarrow'"),
    ({}, {}, {}, [PIP], DEGRADED, "install-failed", "fix the package list in values.worker.env; log tail: ERROR: No "
     "matching distribution found for pyarow"),
    ({}, {}, {}, [PULL], DEGRADED, "image-pull", "check values.worker.image"),
    # an unknown kind is a restart
    ({}, {}, {}, [WorkerProblem("exited", "n0-w1", "exit code 3", at=99.0)], DEGRADED, "restarting",
     "restarting: n0-w1 (exit code 3)"),
    # memory: above 60 % of the workers' limits at max → degraded before anything dies
    ({"max_workers": 2}, {}, {"workers": 2, "memory_bytes": 4 * GB, "adaptive_target": 4}, [], DEGRADED, "memory",
     "the workers hold 4 GB, 67% of their 2 × 3 GB limit, and the lab is at its maximum of 2 worker(s) "
     "(adaptive_target=4)"),
    ({"max_workers": 2}, {}, {"workers": 2, "memory_bytes": 4 * GB}, [], DEGRADED, "memory", "--max N"),
    # below the cap the controller scales out instead: not degraded
    ({"max_workers": 3}, {}, {"workers": 2, "memory_bytes": 4 * GB}, [], HOLD, "", "healthy"),
    # pinned: the pin is the cap
    ({"pinned_workers": 2}, {}, {"workers": 2, "memory_bytes": 4 * GB}, [], DEGRADED, "memory", "the pinned count"),
    # hysteresis: once degraded for memory, it holds until below 50 %
    ({"max_workers": 2}, {"degraded": "memory"}, {"workers": 2, "memory_bytes": int(3.3 * GB)}, [], HOLD, "memory",
     "55%"),
    ({"max_workers": 2}, {"degraded": "memory"}, {"workers": 2, "memory_bytes": int(2.9 * GB)}, [], RECOVERED, "",
     "was memory"),
    ({"max_workers": 2}, {}, {"workers": 2, "memory_bytes": int(3.3 * GB)}, [], HOLD, "", "healthy"),
])
def test_plan_health(spec, state, load, problems, action, causes, why):
    d = plan_health(make_spec(**spec), make_state(**state), make_load(**load), problems, now=100.0)
    assert (d.action, d.causes) == (action, causes), d.reason
    assert why in d.reason


@pytest.mark.parametrize("state, joined, now, rolling, installs, why", [
    (dict(target_workers=2, ready_at=0.0), 2, 10_000, False, True, ""),  # at rest: nothing extra asked
    (dict(target_workers=2, ready_at=0.0), 1, 10_000, False, False, "workers missing"),
    (dict(target_workers=2, ready_at=0.0), 2, 10_000, True, False, "workers being replaced"),
    (dict(target_workers=2, ready_at=0.0), 2, 60, False, True, "workers just started"),  # GKE: did pip install?
    (dict(target_workers=2, ready_at=0.0), 2, 60, False, False, ""),  # local: installed before the lab ran
    (dict(target_workers=2, ready_at=0.0, degraded="oom-killed"), 2, 10_000, False, False, "degraded"),
])
def test_plan_health_probe(state, joined, now, rolling, installs, why):
    got = plan_health_probe(make_state(**state), joined, 2, now, rolling, installs)
    assert got.startswith(why) if why else got == "", got


def test_scale_reason_names_memory_when_it_counts():
    spec = make_spec(worker_memory=500 * 10**6)
    _, why = desired_workers(spec, make_load(workers=1, adaptive_target=2, memory_bytes=410 * 10**6))
    assert why == "adaptive_target=2 (processing=0, queued=0, memory 410 MB = 82% of 1 × 500 MB)"
    _, why = desired_workers(spec, make_load(workers=1, adaptive_target=1, memory_bytes=100 * 10**6))
    assert why == "adaptive_target=1 (processing=0, queued=0)"


# --- the local backend, real Dask: memory pressure, a killed worker, the nanny's memory restarts ---

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from distributed import Client, wait  # noqa: E402

from dasklab.adapters import procs  # noqa: E402
from dasklab.adapters.local import start_scheduler, worker_problems  # noqa: E402
from tests.test_cli import run  # noqa: E402
from tests.conftest import drive  # noqa: E402
from tests.test_local_lab import ready, start_msg  # noqa: E402

MB = 10**6


def block(i, mb=40):
    """A result of `mb` MB that stays in worker memory (the seed's taxi CSVs, made small)."""
    time.sleep(0.2)
    return i, b"x" * (mb * MB)  # every page written: resident, as loaded data is


def lab(ctl, name="lab1"):
    return ctl.backend.fetch_lab(name)


def load(ctl, name="lab1"):
    return ctl.backend.dashboard(lab(ctl, name)).fetch_load()


def decisions(caplog, action):
    import json
    return [e for e in (json.loads(r.getMessage()) for r in caplog.records if r.name == "dasklab")
            if e.get("action") == action]


@pytest.mark.slow
def test_memory_pressure_scales_the_lab_up(controller, caplog):
    """Persisting more than the minimum of one 400 MB worker holds: past 60 % of its limit the scheduler's adaptive
    target counts memory, the lab scales out with memory named in the reason, every result is kept, and nothing is
    reported degraded (the lab could scale)."""
    caplog.set_level(logging.INFO, logger="dasklab")
    ctl = controller
    ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 3}, worker_resources={"cpu": 1, "memory": "400M"}),
               "m1")
    address = ctl.backend.connection_info(ready(ctl))["scheduler"]
    with Client(address, timeout=20) as client:
        futures = []
        for i in range(10):  # 400 MB, more than the one worker holds, one block at a time: no CPU load to scale on
            futures.append(client.submit(block, i, pure=False))
            wait(futures[-1], timeout=60)
            ctl.reconcile_all("reconcile")
        drive(ctl, lambda: lab(ctl).state.target_workers >= 2, timeout=60)
        assert sum(f.result()[0] for f in futures) == sum(range(10))  # nothing lost
    ups = decisions(caplog, "scale-up")
    assert ups and "of 1 × 400 MB" in ups[0]["reason"] and "processing=" in ups[0]["reason"], ups
    assert not [e for e in ctl.events.read() if e["event"] == "lab-degraded"]


def test_memory_at_max_is_reported_before_the_workers_die(controller, home):
    """max = 1 and data beyond 60 % of the worker's limit: lab-degraded says memory, and what to raise, while the
    worker is still alive; a redelivered tick does not repeat it."""
    ctl = controller
    ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 1}, worker_resources={"cpu": 1, "memory": "400M"}),
               "m1")
    address = ctl.backend.connection_info(ready(ctl))["scheduler"]
    with Client(address, timeout=20) as client:
        futures = client.map(block, range(7), pure=False)  # 280 MB = 70 % of 400 MB
        wait(futures, timeout=60)
        degraded = drive(ctl, lambda: [e for e in ctl.events.read() if e["event"] == "lab-degraded"], timeout=30)
        pids = ctl.backend.pids(lab(ctl))
        assert load(ctl).workers == 1 and all(procs.pid_alive(p) for p in pids)  # nobody died
        (event,) = degraded
        assert event["causes"] == ["memory"], event
        assert "at its maximum of 1 worker(s)" in event["reason"] and "--max N" in event["reason"]
        assert "worker_resources.memory" in event["reason"]
        assert lab(ctl).state.degraded == "memory" and lab(ctl).state.degraded_reason == event["reason"]
        shown = run(home, "status").stdout  # what the user types, instead of kubectl describe
        assert "lab1 degraded: memory: the workers hold" in shown and "--max N" in shown, shown
        for _ in range(3):
            ctl.reconcile_all("reconcile")
        assert [e["event"] for e in ctl.events.read()].count("lab-degraded") == 1
        del futures
        drive(ctl, lambda: lab(ctl).state.degraded == "", timeout=30)  # the data released: recovered
    assert [e["event"] for e in ctl.events.read()][-1] == "lab-recovered"


def _worker_child(sh_pid: int) -> int:
    """The Dask worker under the recorded shell (spawn(note_exit=True))."""
    children = Path(f"/proc/{sh_pid}/task/{sh_pid}/children").read_text().split()
    return int(children[0])


def test_a_killed_worker_is_explained_with_its_exit_code_and_replaced(controller):
    ctl = controller
    ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 2}), "m1")
    ready(ctl)
    drive(ctl, lambda: load(ctl).workers == 1)
    (name, entry), = ctl.backend._local(lab(ctl))["workers"].items()
    os.kill(_worker_child(entry["pid"]), signal.SIGKILL)  # as the kernel's OOM killer does
    (event,) = drive(ctl, lambda: [e for e in ctl.events.read() if e["event"] == "lab-degraded"])
    assert event["causes"] == ["restarting"], event
    assert f"{name} (process exited with code 137 (SIGKILL: the kernel's OOM killer, or kill -9))" in event["reason"]
    drive(ctl, lambda: load(ctl).workers == 1 and name not in ctl.backend._local(lab(ctl))["workers"])  # replaced
    assert lab(ctl).state.degraded == "restarting"  # still said: the death is recent


def test_nanny_memory_restarts_are_read_from_a_real_nanny_log(tmp_path):
    """distributed's nanny restarting a worker above 95 % of its limit, as it logs it, is an OOM kill."""
    env = {**os.environ, "DASK_TEMPORARY_DIRECTORY": str(tmp_path / "scratch")}
    log = tmp_path / "n0-w0.log"
    scheduler, info = start_scheduler([], file=tmp_path / "scheduler.json", env=env,
                                      log_path=tmp_path / "scheduler.log")
    address = info["address"]
    worker = procs.spawn([sys.executable, "-m", "distributed.cli.dask_worker", address, "--name",
                          "n0-w0", "--nthreads", "1", "--memory-limit", "300MB", "--nanny", "--no-dashboard",
                          "--host", "127.0.0.1"], env=env, log_path=log, note_exit=True)
    try:
        with Client(address, timeout=20) as client:
            client.wait_for_workers(1, timeout=30)
            held = client.submit(block, 0, 400, pure=False)  # 400 MB in a 300 MB worker (kept, so it runs)
            procs.wait_until(lambda: worker_problems("n0-w0", log, 300 * MB, dead=False), 60, what="a nanny restart")
            found = worker_problems("n0-w0", log, 300 * MB, dead=False)  # before we stop it (that is a death too)
            del held
    finally:
        procs.stop_pid_group(worker)
        procs.stop_pid_group(scheduler)
    (problem, *_) = found
    assert problem.kind == "oom-killed" and problem.restarts >= 1 and problem.memory_limit == 300 * MB
    assert problem.detail == "restarted by its nanny above 95% of its memory limit"
    assert abs(problem.at - time.time()) < 120 and "exceeded 95% memory budget" in problem.log_tail
    assert not [p for p in found if p.kind != "oom-killed"]  # the memory kill's own SIGTERM is not another death


def hog(mb):
    """Holds `mb` MB while it runs: more than the worker may have."""
    held = b"x" * (mb * MB)
    time.sleep(30)
    return len(held)


def test_a_worker_over_its_memory_limit_is_restarted_by_its_nanny_and_explained(controller):
    """The local lab's nanny restarts a worker past 95 % of its limit (as the kubelet OOM-kills a pod): the lab
    says so, with the limit and what to raise."""
    ctl = controller
    ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 1}, worker_resources={"cpu": 1, "memory": "300M"}),
               "m1")
    address = ctl.backend.connection_info(ready(ctl))["scheduler"]
    with Client(address, timeout=20) as client:
        held = client.submit(hog, 400, pure=False)  # kept: a released future's task is cancelled
        drive(ctl, lambda: [e for e in ctl.events.read() if e["event"] == "lab-degraded"], timeout=60)
        del held
    (event,) = [e for e in ctl.events.read() if e["event"] == "lab-degraded"]
    assert event["causes"] == ["oom-killed"], event
    assert ("OOM-killed: n0-w0 exceeded the worker memory limit of 300 MB (restarted by its nanny above 95% of its "
            "memory limit") in event["reason"] and "raise worker_resources.memory" in event["reason"]
