"""Why workers are missing: plan_health tables (problems, memory, state, now) → degraded / recovered with a reason."""

import pytest

from dasklab.core.model import WorkerProblem
from dasklab.core.policy import DEGRADED, HOLD, RECOVERED, desired_workers, plan_health
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
     RECOVERED, "", "workers healthy again (2 joined; was oom-killed)"),
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


def test_scale_reason_names_memory_when_it_counts():
    spec = make_spec(worker_memory=500 * 10**6)
    _, why = desired_workers(spec, make_load(workers=1, adaptive_target=2, memory_bytes=410 * 10**6))
    assert why == "adaptive_target=2 (processing=0, queued=0, memory 410 MB = 82% of 1 × 500 MB)"
    _, why = desired_workers(spec, make_load(workers=1, adaptive_target=1, memory_bytes=100 * 10**6))
    assert why == "adaptive_target=1 (processing=0, queued=0)"
