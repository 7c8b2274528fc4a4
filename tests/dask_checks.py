"""Test helpers that ask a real Dask scheduler what happened: tasks computed more than once, processes left."""

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import psutil

# enough room in the scheduler's transition log for every transition of a test's tasks (default 1000)
LOG_LENGTH_ENV = {"DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH": "100000"}


def _memory_transitions(dask_scheduler) -> tuple[dict, bool]:
    """Per key, how often it reached memory (its transition log); and whether the log overflowed."""
    log = dask_scheduler.transition_log
    counts: dict[str, int] = {}
    for key, _start, finish, *_ in log:
        if finish == "memory":
            counts[str(key)] = counts.get(str(key), 0) + 1
    return counts, log.maxlen is not None and len(log) >= log.maxlen


def recomputed(client) -> int:
    """Tasks that reached memory more than once: computed again (a copy moved to a survivor is no transition)."""
    counts, overflowed = client.run_on_scheduler(_memory_transitions)
    assert not overflowed, "the scheduler's transition log overflowed: set LOG_LENGTH_ENV on it"
    return sum(n - 1 for n in counts.values())


def cache_root() -> Path:
    """Where test environments are kept between runs: $DASKLAB_TEST_CACHE, else $XDG_CACHE_HOME/dasklab."""
    if os.environ.get("DASKLAB_TEST_CACHE"):
        return Path(os.environ["DASKLAB_TEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dasklab"


def dask_env(version: str) -> tuple[Path, float]:
    """A venv with distributed==`version` from the package index, created once and reused (its bin directory,
    and the seconds it took to create now: 0 when reused). A half-made one (no marker) is made again."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv, marker = root / f"dask-{version}", root / f"dask-{version}" / ".complete"
    with open(root / f".dask-{version}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once make it once
        if marker.exists():
            return venv / "bin", 0.0
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        for argv in ([sys.executable, "-m", "venv", str(venv)],
                     [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"distributed=={version}",
                      f"dask=={version}"]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
            if done.returncode:
                raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        marker.write_text(version)
        return venv / "bin", time.monotonic() - started


def process_tree(pids) -> list[psutil.Process]:
    """The processes `pids` and everything they started (a nanny's worker), to check none is left."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def alive(processes) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the scheduler cannot import tests/
