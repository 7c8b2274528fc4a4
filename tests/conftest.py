"""Shared fixtures: specs, loads, a clean local home and a local controller; every test leaves no process behind."""

import json
import os
import signal
import subprocess
import time

import pytest

from dasklab.adapters import procs
from dasklab.adapters.local import LocalBackend
from dasklab.adapters.files import FileEvents
from dasklab.core.config import Config
from dasklab.core.messages import parse_command
from dasklab.core.model import DaskLoad, LabSpec, LabState
from dasklab.core.reconcile import Controller
from tests.dask_checks import alive, process_tree

# the local lab's controller at test speed: polls every 0.2 s, confirms a scale-down over 1 s
FAST = Config(poll_s=0.2, confirm_s=1.0, cooldown_s=0.5, down_fraction=0.5, tick_budget_s=0)


def stop_group(proc: subprocess.Popen, first=signal.SIGTERM, grace: float = 60.0) -> None:
    """Stop a command started with start_new_session=True as a user would: `first` (it unwinds: stops its labs and
    their processes), then, if it has not ended within `grace` seconds, SIGKILL to its whole process group."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def run_to_end(argv: list[str], timeout: float, env: dict) -> subprocess.CompletedProcess:
    """subprocess.run for a command that starts processes of its own (the demos): on a timeout it is stopped with
    stop_group (SIGTERM, so it unwinds, and no process is left behind) before the timeout is raised."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{argv[2:]} did not end within {timeout:g} s; stopped. Its output's end:\n"
                             f"{out[-3000:]}\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def make_spec(**kw) -> LabSpec:
    base = dict(name="lab", owner="alice", min_workers=1, max_workers=8, initial_workers=1,
                machine_type="e2-standard-4", worker_cpu=1.0, worker_memory=3 * 10**9, idle_timeout_s=600,
                max_lifetime_s=8 * 3600)
    return LabSpec(**{**base, **kw})


def make_load(**kw) -> DaskLoad:
    base = dict(workers=2, processing=0, queued=0, clients=0, adaptive_target=2, idle_since=None)
    return DaskLoad(**{**base, **kw})


def make_state(**kw) -> LabState:
    base = dict(phase="ready", created_at=0.0, ready_at=10.0, target_workers=2)
    return LabState(**{**base, **kw})


@pytest.fixture(scope="session")
def firestore_emulator(tmp_path_factory):
    """The Google Cloud CLI's Firestore emulator on 127.0.0.1, started once for the session and stopped after."""
    from dasklab.adapters import procs
    if procs.find_firestore_emulator() is None:
        pytest.fail("the Firestore emulator (Google Cloud CLI component cloud-firestore-emulator, Java 17) is needed")
    with procs.start_firestore_emulator(tmp_path_factory.mktemp("firestore")) as emulator:
        yield emulator
    assert not procs.pid_alive(emulator.proc.pid)


@pytest.fixture
def firestore_tombstones(firestore_emulator, monkeypatch):
    """Tombstones in the emulator, in a project of their own (nothing shared between tests)."""
    import uuid
    from dasklab.adapters.firestore import FirestoreTombstones
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    return FirestoreTombstones(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def firestore_env(firestore_emulator, monkeypatch):
    """FIRESTORE_EMULATOR_HOST set to the session's emulator: the GKE test world keeps its lab records there."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def cmd(**kw):
    return parse_command(json.dumps({"v": 1, **kw}))


@pytest.fixture
def controller(home):
    """A controller of local labs (real Dask, Jupyter) in `home`; afterwards every lab process is gone, and so is
    every process they started (a nanny's worker, Jupyter's kernels). The GKE tests override it with their world's."""
    backend = LocalBackend(home)
    ctl = Controller(backend, FileEvents(home / "status.jsonl"), FAST)
    yield ctl
    pids = [p for lab in backend.fetch_labs() for p in backend.pids(lab)]
    tree = process_tree(pids)
    backend.stop_all()
    assert not [p for p in pids if procs.pid_alive(p)], "a lab process survived"
    assert not alive(tree), "a nanny, worker or kernel process survived the teardown"


def drive(ctl, until, timeout=60.0, tick="reconcile"):
    """Run reconcile passes (as the tick's polling loop does) until `until()` is truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ctl.reconcile_all(tick)
        result = until()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"not reached in {timeout}s")
