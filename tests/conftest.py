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


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"
