"""update-lab on the local backend with real Dask: workers replaced in a new environment, results kept."""

import subprocess
import sys

import pytest
from distributed import Client

from dasklab.adapters import procs
from dasklab.cli import build_update_lab, main, parser
from dasklab.report import fetch_status
from dasklab.core.config import Config
from dasklab.core.errors import PermanentError, ValidationError
from tests.conftest import cmd, drive

# A small pure-Python package that is not in the base environment (checked below), installed from the registry.
EXTRA = "inflection"


def pip_env(packages: str) -> list[dict]:
    return [{"name": "EXTRA_PIP_PACKAGES", "value": packages}]


def start(ctl, **kw):
    ctl.handle(cmd(type="start-lab", lab="up1", owner="alice", idle_timeout="1h", max_lifetime="1h",
                   **{"workers": {"initial": 2, "min": 2, "max": 2}, **kw}), "s1")
    lab = drive(ctl, lambda: (lab := ctl.backend.fetch_lab("up1")) and lab.state.phase == "ready" and lab)
    drive(ctl, lambda: ctl.backend.dashboard(lab).fetch_load().workers == 2)
    return lab


def worker_names(ctl) -> set[str]:
    return {w.name for w in ctl.backend.dashboard(ctl.backend.fetch_lab("up1")).fetch_workers()}


def test_update_adds_a_package_replaces_the_workers_and_keeps_the_results(controller, home):
    ctl, backend = controller, controller.backend
    lab = start(ctl)
    before = worker_names(ctl)
    with Client(backend.connection_info(lab)["scheduler"], timeout=20) as client:
        held = client.map(lambda x: x * 7, range(100), pure=False)
        client.gather(held)
        with pytest.raises(ModuleNotFoundError):
            client.submit(lambda: __import__(EXTRA), pure=False).result()  # not in the base environment
        values = {"jupyter": {"env": pip_env(EXTRA)}, "worker": {"env": pip_env(EXTRA)}}
        ctl.handle(cmd(type="update-lab", lab="up1", values=values), "u1")
        assert backend.fetch_lab("up1").spec.revision == 2
        drive(ctl, lambda: backend.fetch_lab("up1").state.revision == 2)
        after = worker_names(ctl)
        assert len(after) == 2 and not after & before  # every worker replaced
        assert sum(client.gather(held)) == 7 * sum(range(100))  # the results moved to the new workers
        camel = client.submit(lambda: __import__(EXTRA).camelize("dask_lab"), pure=False).result()
        assert camel == "DaskLab"
    updated = [e for e in ctl.events.read() if e["event"] == "lab-updated"]
    assert len(updated) == 1 and (updated[0]["from_revision"], updated[0]["revision"]) == (1, 2)
    assert updated[0]["environment"]["worker"]["extra_pip_packages"] == [EXTRA]
    assert any(n.startswith("values.scheduler.env: no inflection on the scheduler") for n in updated[0]["notes"])
    # the venv is the lab's own, under $DASKLAB_HOME, and sees the base packages
    python = backend.python(backend.fetch_lab("up1").spec)
    assert python.startswith(str(home / "envs"))
    assert subprocess.run([python, "-c", f"import dasklab, distributed, {EXTRA}"]).returncode == 0
    assert subprocess.run([sys.executable, "-c", f"import {EXTRA}"], capture_output=True).returncode != 0
    # a redelivery (same message id) and the same values again (another id) change nothing
    ctl.handle(cmd(type="update-lab", lab="up1", values=values), "u1")
    ctl.handle(cmd(type="update-lab", lab="up1", values=values), "u2")
    lab = backend.fetch_lab("up1")
    assert (lab.spec.revision, lab.state.revision) == (2, 2) and worker_names(ctl) == after
    (row,) = fetch_status(Config(home=str(home)))  # what `dasklab status` shows
    assert row["revision"] == "2" and row["notes"] == list(lab.spec.notes)


def test_the_cli_sends_update_lab_and_refuses_different_versions_itself(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DASKLAB_HOME", str(tmp_path / "h"))
    config = tmp_path / "config.yaml"
    config.write_text("jupyter:\n  env:\n    - {name: EXTRA_PIP_PACKAGES, value: pyarrow gcsfs matplotlib}\n"
                      "worker:\n  env:\n    - {name: EXTRA_PIP_PACKAGES, value: pyarrow==18.0 gcsfs}\n")
    a = parser().parse_args(["update-lab", "--lab", "x", "--values", str(config), "--restart"])
    assert build_update_lab(a) == {"v": 1, "type": "update-lab", "lab": "x", "values": config.read_text(),
                                   "restart": True}
    assert main(["update-lab", "--lab", "x", "--values", str(config)]) == 2
    assert ("values.worker.env.EXTRA_PIP_PACKAGES: pyarrow is pinned differently: unpinned (the newest) in jupyter, "
            "==18.0 in worker" in capsys.readouterr().err)
    config.write_text(config.read_text().replace("pyarrow==18.0", "pyarrow"))  # the seed's third file: said
    main(["update-lab", "--lab", "x", "--values", str(config)])
    assert "note: values.jupyter.env.EXTRA_PIP_PACKAGES: matplotlib in jupyter but not in worker" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_a_scheduler_change_is_refused_unless_restart_is_said(controller):
    ctl, backend = controller, controller.backend
    lab = start(ctl)
    values = {"scheduler": {"env": [{"name": "DASK_LAB_MARK", "value": "2"}]}}
    with pytest.raises(ValidationError) as refused:
        ctl.handle(cmd(type="update-lab", lab="up1", values=values), "u1")
    assert refused.value.field == "restart" and "values.scheduler.env" in refused.value.rule
    assert "held in memory is lost" in refused.value.rule
    assert backend.fetch_lab("up1").spec.revision == 1
    old_scheduler = backend._local(lab)["scheduler"]["pid"]
    ctl.handle(cmd(type="update-lab", lab="up1", values=values, restart=True), "u2")
    drive(ctl, lambda: backend.fetch_lab("up1").state.revision == 2)
    drive(ctl, lambda: backend.dashboard(backend.fetch_lab("up1")).fetch_load().workers == 2)
    local = backend._local(backend.fetch_lab("up1"))
    assert local["scheduler"]["pid"] != old_scheduler and not procs.pid_alive(old_scheduler)
    assert open(f"/proc/{local['scheduler']['pid']}/environ", "rb").read().count(b"DASK_LAB_MARK=2") == 1


def test_a_package_pip_cannot_install_is_refused_with_pips_tail(controller):
    values = {"jupyter": {"env": pip_env(f"{EXTRA}==0.0.0.999")}, "worker": {"env": pip_env(f"{EXTRA}==0.0.0.999")}}
    with pytest.raises(PermanentError) as refused:
        controller.handle(cmd(type="start-lab", lab="up1", owner="alice", values=values), "s1")
    assert f"{EXTRA}==0.0.0.999 could not be installed" in str(refused.value)
    assert "No matching distribution" in str(refused.value)  # pip's own words
    assert controller.backend.fetch_lab("up1") is None  # nothing created


@pytest.mark.slow
def test_update_with_new_worker_resources_replaces_them_at_the_new_size(controller):
    """The seed's step 6 (bigger workers), with results held across it."""
    ctl, backend = controller, controller.backend
    lab = start(ctl)
    with Client(backend.connection_info(lab)["scheduler"], timeout=20) as client:
        held = client.map(lambda x: x + 0.5, range(50), pure=False)
        client.gather(held)
        values = {"worker": {"resources": {"limits": {"cpu": 2, "memory": "2G"}}}}
        ctl.handle(cmd(type="update-lab", lab="up1", values=values), "u1")
        drive(ctl, lambda: backend.fetch_lab("up1").state.revision == 2)
        infos = client.scheduler_info()["workers"].values()
        assert sorted((w["nthreads"], w["memory_limit"]) for w in infos) == [(2, 2 * 10**9)] * 2
        assert sum(client.gather(held)) == sum(range(50)) + 25
