"""Shared fixtures: specs, loads and a clean local home; every test leaves no process behind."""

import pytest

from dasklab.core.model import DaskLoad, LabSpec, LabState


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
def home(tmp_path):
    return tmp_path / "home"
