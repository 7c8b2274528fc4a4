"""Jupyter in the local lab (a real JupyterLab): the seed's dask-array exercise run as a notebook cell on the lab's
workers, `dasklab connect`, and Jupyter-aware idleness (a busy kernel keeps the lab; a notebook left open does not)."""

import json
import logging
import time
import urllib.error
import urllib.parse

import pytest
from distributed import Client

from dasklab.adapters import procs
from dasklab.core.policy import JUPYTER_RESTARTS
from tests.conftest import cmd, drive
from tests.notebook import DASK_ARRAY_CELL, DASK_ARRAY_SUM, Notebook
from tests.test_cli import run
from tests.test_local_lab import start_msg
from tests.test_update import EXTRA, pip_env


def ready(ctl, name="lab1"):
    # JupyterLab takes 3-10 s to answer on a loaded 2-core machine: the lab is ready once it does
    return drive(ctl, lambda: (lab := ctl.backend.fetch_lab(name)) and lab.state.phase == "ready" and lab, timeout=120)


def login(backend, lab) -> tuple[str, str]:
    url = urllib.parse.urlsplit(backend.jupyter_login_url(lab))
    return f"{url.scheme}://{url.netloc}", urllib.parse.parse_qs(url.query)["token"][0]


@pytest.mark.slow
def test_the_dask_array_exercise_runs_as_a_notebook_cell_on_the_lab_workers(controller, home):
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(workers={"initial": 2, "min": 2, "max": 2}, idle_timeout="1h", values={}), "m1")
    lab = ready(ctl)
    base, token = login(backend, lab)
    info = backend.connection_info(lab)
    assert info["jupyter"] == f"{base}/lab" and base.startswith("http://127.0.0.1:")
    assert len(token) == 64  # 256 random bits
    # the token is in no event and no record, and Jupyter refuses a request without it
    assert token not in (home / "status.jsonl").read_text() and token not in (home / "labs" / "lab1.json").read_text()
    assert ctl.events.read()[-1]["connection"]["jupyter"] == f"{base}/lab"
    with pytest.raises(urllib.error.HTTPError, match="403"):
        Notebook(base, token).rest("GET", "/api/status", token=False)

    # `dasklab connect LAB` prints the URL to open, token included
    out = run(home, "connect", "lab1").stdout
    assert f"jupyter: {base}/lab?token={token}" in out, out

    nb = Notebook(base, token)
    nb.open()
    assert nb.run("import os; print(os.environ['DASK_SCHEDULER_ADDRESS'])") == info["scheduler"]
    scheduler, total = nb.run(DASK_ARRAY_CELL).splitlines()
    assert scheduler == info["scheduler"] and float(total) == DASK_ARRAY_SUM
    # the lab's two workers ran the tasks (not a cluster of the kernel's own)
    with Client(info["scheduler"], timeout=20) as client:
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert len(executed) == 2 and all(n > 0 for n in executed.values()), executed
    assert any(p.startswith("mean") for p in prefixes), prefixes
    nb.close()


@pytest.mark.slow
def test_a_busy_kernel_keeps_the_lab_and_a_notebook_left_open_does_not(controller, home, caplog):
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(idle_timeout="4s", values={}), "m1")
    lab = ready(ctl)
    base, token = login(backend, lab)
    nb = Notebook(base, token)
    nb.open()
    kernel_pid = int(nb.run("from distributed import Client; client = Client(); import os; print(os.getpid())"))
    jupyter_pid = backend._local(lab)["jupyter"]["pid"]

    def tick(kind="reconcile"):
        ctl.handle(cmd(type=kind, **({"budget_seconds": 0} if kind == "reconcile" else {})), "tick")
        return backend.fetch_lab("lab1")

    # a long cell that is not Dask: the scheduler is idle, a client is connected, the kernel is busy
    cell = nb.send("import time; time.sleep(25); print('done')")
    procs.wait_until(lambda: backend.fetch_jupyter(lab).busy_kernels == 1, timeout=20, what="kernel busy")
    time.sleep(5)  # longer than the idle timeout: only the busy kernel holds the lab now
    caplog.set_level(logging.INFO, logger="dasklab")
    kept_until = time.monotonic() + 8
    while time.monotonic() < kept_until:
        assert tick() is not None, "a lab whose kernel runs a cell was torn down"
        time.sleep(1)
    assert tick("teardown-idle") is not None
    keeps = [json.loads(r.getMessage()) for r in caplog.records if '"action": "keep"' in r.getMessage()]
    assert keeps and keeps[-1]["reason"] == "1 of 1 Jupyter kernel(s) busy", keeps
    assert nb.wait(cell, timeout=60) == "done"

    # the notebook stays open (kernel alive, its Client connected), nobody touches it: gone within the timeout
    nb.close()
    done = time.monotonic()
    drive(ctl, lambda: tick() is None, timeout=60)
    took = time.monotonic() - done
    assert 3 <= took <= 40, took  # the idle timeout (4 s) and a few ticks on a loaded machine, never at once
    deleted = ctl.events.read()[-1]
    assert deleted["event"] == "lab-deleted" and "1 client(s) connected but unused" in deleted["reason"], deleted
    assert "no Jupyter kernel busy or activity" in deleted["reason"]
    assert not procs.pid_alive(kernel_pid) and not procs.pid_alive(jupyter_pid)


def test_an_update_adding_a_package_restarts_jupyter_into_the_lab_environment(controller, home, monkeypatch):
    """The seed's step 4 at a notebook: after `update-lab` adds a package, a new kernel imports it, and so do the
    workers (one environment), at the URL `dasklab connect` printed before. A crash between stopping the old Jupyter
    and starting the new one is repaired by the next pass."""
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 1}, idle_timeout="1h", values={}), "m1")
    lab = ready(ctl)
    base, token = login(backend, lab)
    old = backend._local(lab)["jupyter"]
    nb = Notebook(base, token)
    nb.open()
    assert nb.run(f"import importlib.util; print(importlib.util.find_spec({EXTRA!r}))") == "None"  # not there yet
    with Client(backend.connection_info(lab)["scheduler"], timeout=20) as client:
        held = client.map(lambda x: x * 3, range(40), pure=False)
        client.gather(held)

        values = {c: {"env": pip_env(EXTRA)} for c in ("jupyter", "worker")}
        monkeypatch.setattr(backend, "apply_update", lambda lab: False)  # recorded; the backend not reached yet
        ctl.handle(cmd(type="update-lab", lab="lab1", values=values), "u1")
        outcome = ctl.events.read()[-1]
        assert outcome["outcome"] == "accepted" and JUPYTER_RESTARTS in outcome["reason"], outcome
        monkeypatch.undo()

        def crash(*args, **kw):  # the controller dies after stopping the old Jupyter, before starting the new one
            raise RuntimeError("controller killed")
        monkeypatch.setattr(backend, "_start_jupyter", crash)
        assert ctl.reconcile_all("reconcile") == ["lab1"]  # the crash is contained in its lab, retried next pass
        assert not procs.pid_alive(old["pid"]) and backend._local(lab)["jupyter"] == old  # stopped, not restarted
        monkeypatch.undo()
        drive(ctl, lambda: backend.fetch_lab("lab1").state.revision == 2, timeout=120)
        assert sum(client.gather(held)) == 3 * sum(range(40))  # the workers' results are kept
    lab = backend.fetch_lab("lab1")
    new = backend._local(lab)["jupyter"]
    assert new["pid"] != old["pid"] and new["python"] == backend.python(lab.spec) != old["python"]
    assert login(backend, lab) == (base, token)  # the same URL and token
    # done only once Jupyter answers in the new environment: a new kernel, at once, imports the package there
    nb.close()
    assert Notebook(base, token).rest("GET", "/api/kernels") == []  # the old kernel went with the old Jupyter
    nb = Notebook(base, token)
    nb.open()
    kernel, worker, run = nb.run(f"""
import {EXTRA}
from distributed import Client
client = Client()
print({EXTRA}.__file__)
print(client.submit(lambda: __import__({EXTRA!r}).__file__, pure=False).result())
print(set(client.run(lambda: __import__({EXTRA!r}).camelize("dask_lab")).values()))
""").splitlines()
    assert kernel == worker and kernel.startswith(str(home / "envs")), (kernel, worker)
    assert run == "{'DaskLab'}"
    nb.close()
    (updated,) = [e for e in ctl.events.read() if e["event"] == "lab-updated"]
    assert any(JUPYTER_RESTARTS in n for n in updated["notes"]), updated["notes"]  # what the restart cost


@pytest.mark.slow
def test_an_update_that_keeps_the_environment_keeps_the_kernels(controller):
    """Bigger workers (the seed's step 6) change no package: Jupyter runs on, and a kernel's variables survive."""
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 1}, idle_timeout="1h", values={}), "m1")
    lab = ready(ctl)
    jupyter = backend._local(lab)["jupyter"]
    nb = Notebook(*login(backend, lab))
    nb.open()
    kernel_pid = int(nb.run("answer = 41; import os; print(os.getpid())"))
    before = {w.name for w in backend.dashboard(lab).fetch_workers()}
    values = {"worker": {"resources": {"limits": {"memory": "1G"}}}}
    ctl.handle(cmd(type="update-lab", lab="lab1", values=values), "u1")
    outcome = ctl.events.read()[-1]
    assert outcome["outcome"] == "accepted" and "workers replaced gracefully" in outcome["reason"]
    assert "Jupyter" not in outcome["reason"], outcome
    drive(ctl, lambda: backend.fetch_lab("lab1").state.revision == 2, timeout=120)
    assert not before & {w.name for w in backend.dashboard(lab).fetch_workers()}  # the workers were replaced
    assert backend._local(lab)["jupyter"] == jupyter and procs.pid_alive(jupyter["pid"])
    assert nb.run("print(answer + 1)") == "42"  # the same kernel, its state kept
    nb.close()
    (updated,) = [e for e in ctl.events.read() if e["event"] == "lab-updated"]
    assert not any("Jupyter" in n for n in updated["notes"]), updated["notes"]
    # values that disable Jupyter stop it, kernels and all, and say so
    ctl.handle(cmd(type="update-lab", lab="lab1", values={**values, "jupyter": {"enabled": False}}), "u2")
    assert "Jupyter stops (values.jupyter.enabled: false): kernel state is lost" in ctl.events.read()[-1]["reason"]
    drive(ctl, lambda: backend.fetch_lab("lab1").state.revision == 3, timeout=60)
    assert backend._local(lab)["jupyter"] is None and backend.connection_info(lab).get("jupyter") is None
    assert not procs.pid_alive(jupyter["pid"]) and not procs.pid_alive(kernel_pid)
