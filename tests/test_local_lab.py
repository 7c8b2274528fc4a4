"""The core on the local backend with real Dask processes: provision, autoscale, graceful scale-down, teardown."""

import json
import re
import socket
import time

import pytest
from distributed import Client

from dasklab.adapters import procs
from dasklab.adapters.dashboard import HttpTransport
from dasklab.adapters.jupyter import JupyterApi, stop_jupyter
from dasklab.core.errors import ConflictError, PermanentError

from tests.conftest import cmd, drive
from tests.dask_checks import LOG_LENGTH_ENV, alive, process_tree, recomputed


def start_msg(lab="lab1", **kw):
    base = {"type": "start-lab", "lab": lab, "owner": "alice", "workers": {"initial": 1, "min": 1, "max": 4},
            "idle_timeout": "1s", "max_lifetime": "1h",
            "values": {"jupyter": {"enabled": False}}}  # these are autoscaling stories; Jupyter: test_jupyter.py
    return cmd(**{**base, **kw})


def ready(ctl, name="lab1"):
    return drive(ctl, lambda: (lab := ctl.backend.fetch_lab(name)) and lab.state.phase == "ready" and lab)


def slow_inc(x):
    time.sleep(0.3)
    return x + 1


def test_lab_story_scales_up_and_down_without_losing_results(controller):
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(), "m1")
    assert backend.fetch_lab("lab1").state.phase == "provisioning"
    lab = ready(ctl)
    events = ctl.events.read()
    assert events[-1]["event"] == "lab-ready" and events[-1]["connection"]["dashboard"].startswith("http://127.0.0.1")
    address = backend.connection_info(lab)["scheduler"]
    with Client(address, timeout=20) as client:
        futures = client.map(slow_inc, range(60), pure=False)
        # load → scale up to max, and the workers really join
        drive(ctl, lambda: backend.dashboard(backend.fetch_lab("lab1")).fetch_load().workers == 4)
        assert backend.fetch_lab("lab1").state.target_workers == 4
        client.gather(futures)  # results now held in worker memory
        # graceful scale-down to min while the results are held
        drive(ctl, lambda: backend.dashboard(backend.fetch_lab("lab1")).fetch_load().workers == 1)
        assert backend.fetch_requested(backend.fetch_lab("lab1")) == 1
        assert sum(client.gather(futures)) == sum(range(1, 61))  # nothing lost
    # idle → teardown-idle deletes it
    time.sleep(1.2)
    drive(ctl, lambda: backend.fetch_lab("lab1") is None, tick="teardown-idle")
    deleted = ctl.events.read()[-1]
    assert deleted["event"] == "lab-deleted" and deleted["node_hours"] > 0 and deleted["estimated_cost_usd"] > 0


@pytest.mark.slow
def test_scale_down_during_running_computation_loses_nothing(controller, monkeypatch):
    """On nanny workers, as the chart runs them: 0 lost, 0 recomputed, and no retired worker comes back."""
    for name, value in LOG_LENGTH_ENV.items():
        monkeypatch.setenv(name, value)
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(workers={"initial": 4, "min": 1, "max": 4}), "m1")
    ready(ctl)
    drive(ctl, lambda: backend.dashboard(backend.fetch_lab("lab1")).fetch_load().workers == 4)
    lab = backend.fetch_lab("lab1")
    nannies = backend.pids(lab)[:-1]
    address = backend.connection_info(lab)["scheduler"]
    with Client(address, timeout=20) as client:
        assert all(w["nanny"] for w in client.scheduler_info()["workers"].values()), "each worker has its nanny"
        held = client.map(lambda x: x * 3, range(200), pure=False)  # results spread over the 4 workers
        client.gather(held)
        running = client.map(slow_inc, range(16), pure=False)  # still computing while we pin down to 1
        ctl.handle(cmd(type="scale", lab="lab1", pin=1), "m2")
        drive(ctl, lambda: backend.dashboard(backend.fetch_lab("lab1")).fetch_load().workers == 1)
        assert sum(client.gather(held)) == 3 * sum(range(200))  # 0 lost
        assert sum(client.gather(running)) == sum(range(1, 17))
        assert recomputed(client) == 0
        survivor = set(backend.pids(backend.fetch_lab("lab1"))[:-1])
        retired = process_tree(set(nannies) - survivor)
        procs.wait_until(lambda: not alive(retired), 20, what="retired nannies and workers exiting")
        for _ in range(10):  # their nannies closed with them: none restarts and rejoins
            assert len(client.scheduler_info()["workers"]) == 1
            time.sleep(0.2)


def test_duplicate_commands_leave_the_same_state(controller):
    ctl, backend = controller, controller.backend
    for _ in range(3):
        ctl.handle(start_msg(), "dup")
    assert [lab.name for lab in backend.fetch_labs()] == ["lab1"]
    ready(ctl)
    for _ in range(2):
        ctl.handle(cmd(type="keep-alive", lab="lab1", until="2099-01-01T00:00:00Z"), "ka")
        ctl.handle(cmd(type="scale", lab="lab1", min=2, max=3), "sc")
    lab = backend.fetch_lab("lab1")
    assert lab.spec.keep_alive_until == 4070908800.0 and (lab.spec.min_workers, lab.spec.max_workers) == (2, 3)
    for _ in range(3):
        ctl.handle(cmd(type="stop-lab", lab="lab1"), "stop")
    assert backend.fetch_lab("lab1") is None


def test_conflicting_writes_are_refused(controller):
    backend = controller.backend
    controller.handle(start_msg(), "m1")
    lab = backend.fetch_lab("lab1")
    backend.apply_record(lab.with_state(target_workers=3))
    with pytest.raises(ConflictError):
        backend.apply_record(lab.with_state(target_workers=2))  # stale version
    assert backend.fetch_lab("lab1").state.target_workers == 3


def test_start_lab_of_another_owner_is_refused(controller):
    controller.handle(start_msg(), "m1")
    with pytest.raises(PermanentError, match="belongs to alice"):
        controller.handle(start_msg(owner="bob"), "m2")


def test_unmanaged_lab_is_never_touched(controller, home):
    record = home / "labs" / "theirs.json"
    record.write_text(json.dumps({"spec": {"name": "theirs"}, "state": {}, "version": 1}))
    with pytest.raises(PermanentError, match="not managed by dasklab"):
        controller.handle(cmd(type="stop-lab", lab="theirs"), "m1")
    controller.handle(cmd(type="nightly-teardown"), "m2")
    assert json.loads(record.read_text())["spec"] == {"name": "theirs"}


@pytest.mark.slow
def test_load_counts_the_tasks_queued_on_the_scheduler(controller):
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 1}), "m1")
    lab = ready(ctl)
    with Client(backend.connection_info(lab)["scheduler"], timeout=20) as client:
        client.wait_for_workers(1, timeout=20)
        futures = client.map(slow_inc, range(30), pure=False)  # one thread: most wait in the scheduler's queue
        load = procs.wait_until(lambda: (got := backend.dashboard(lab).fetch_load()).processing and got, timeout=10)
        assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.queued)) > 0
        assert 20 <= load.queued <= 30 - load.processing and load.busy
        assert sum(client.gather(futures)) == sum(range(1, 31))
        assert backend.dashboard(lab).fetch_load().queued == 0


def test_the_dashboard_page_of_a_local_lab_renders(controller):
    """The URL `dasklab status` and `connect` print is the scheduler's bokeh dashboard, not distributed's
    "Dask needs bokeh" placeholder page."""
    import urllib.request

    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(), "m1")
    url = backend.connection_info(ready(ctl))["dashboard"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/status")
    with urllib.request.urlopen(url, timeout=20) as resp:
        page = resp.read().decode()
    assert "needs bokeh" not in page
    assert "<title>Dask Diagnostic UI</title>" in page and "Bokeh.embed" in page, page[:500]
    script = re.search(r'src="(static/js/bokeh\.min\.js[^"]*)"', page)
    assert script, page[:800]
    with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/" + script[1], timeout=20) as resp:
        assert resp.status == 200 and len(resp.read()) > 100_000  # bokeh's JavaScript, served by the scheduler


def test_a_lab_forgotten_by_two_invocations_is_logged_once(controller, caplog):
    """A stop-lab and a tick (two message ids) that both read the lab while its deletion finished: one line."""
    from dasklab.core.model import Lab
    from tests.conftest import make_spec, make_state

    caplog.set_level("INFO", logger="dasklab")
    backend = controller.backend
    backend.apply_create(Lab(make_spec(name="twice"), make_state(phase="tearing-down")))  # no process left: absent
    first, second = backend.fetch_lab("twice"), backend.fetch_lab("twice")
    controller.reconcile_lab(first, "reconcile", "m-stop")
    controller.reconcile_lab(second, "teardown-idle", "m-tick")
    forgets = [json.loads(r.message) for r in caplog.records if r.name == "dasklab" and '"forget"' in r.message]
    assert [(f["from"], f["to"], f["message_id"]) for f in forgets] == [("tearing-down", "gone", "m-stop")]
    assert backend.fetch_lab("twice") is None


def test_forgetting_a_record_changed_since_it_was_read_is_a_conflict(controller):
    from dasklab.core.model import Lab
    from tests.conftest import make_spec, make_state

    backend = controller.backend
    backend.apply_create(Lab(make_spec(name="moved"), make_state(phase="tearing-down")))
    stale = backend.fetch_lab("moved")
    backend.apply_record(stale.with_state(reason="changed meanwhile"))
    with pytest.raises(ConflictError):
        backend.apply_forget(stale)
    assert backend.fetch_lab("moved").state.reason == "changed meanwhile"


class PortThief:
    """Another process, fast: every port this process finds free (a socket bound to port 0, read, closed) is taken
    by a listening socket the moment it is released, and held (it answers nothing)."""

    def __init__(self, monkeypatch):
        self.held: list[socket.socket] = []
        real, held = socket.socket, self.held

        class Picked(real):
            def bind(self, address):
                super().bind(address)
                if self.family == socket.AF_INET and address[1] == 0:
                    self.picked = self.getsockname()[1]

            def close(self):
                super().close()
                if getattr(self, "picked", None):
                    thief = real()
                    thief.bind(("127.0.0.1", self.picked))
                    thief.listen()
                    held.append(thief)
        monkeypatch.setattr(socket, "socket", Picked)

    def take(self, port: int) -> None:
        """Hold `port` (one a process of ours left)."""
        taken = socket.create_server(("127.0.0.1", port))
        self.held.append(taken)

    def ports(self) -> set[int]:
        return {s.getsockname()[1] for s in self.held}

    def close(self) -> None:
        for s in self.held:
            s.close()


def settled(ctl, name="lab1"):
    return drive(ctl, lambda: (lab := ctl.backend.fetch_lab(name)) and lab.state.phase in ("ready", "failed") and lab)


@pytest.mark.slow
def test_ports_are_bound_by_the_lab_processes_and_read_back_never_picked(controller, monkeypatch):
    """A port found free and released can be taken before the process it was meant for binds it: the scheduler then
    fails, or its dashboard moves elsewhere with a mere warning while the controller polls whatever holds the port
    (another lab's dashboard, whose workers it may retire). Every port the controller's process releases is taken
    here: the scheduler, its dashboard and Jupyter bind ports the OS gives them, recorded from their own files, and
    the dashboard the controller reads is its scheduler's. A Jupyter restarted on its port, taken meanwhile, moves."""
    ctl, backend = controller, controller.backend
    thief = PortThief(monkeypatch)
    try:
        ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 1}, idle_timeout="1h", values={}), "m1")
        lab = settled(ctl)
        assert lab.state.phase == "ready", lab.state.reason
        assert not thief.held  # the controller found no port free for another process: it picked none
        local = backend._local(lab)
        sched, jupyter = local["scheduler"], local["jupyter"]
        info = backend.connection_info(lab)
        assert info["scheduler"] == f"tcp://127.0.0.1:{sched['port']}"
        assert info["dashboard"] == f"http://127.0.0.1:{sched['dashboard_port']}/status"
        assert info["jupyter"] == f"http://127.0.0.1:{jupyter['port']}/lab"
        with Client(info["scheduler"], timeout=20) as client:
            assert client.scheduler_info()["id"] == sched["id"]
            client.wait_for_workers(1, timeout=30)
        identity = json.loads(HttpTransport(info["dashboard"].removesuffix("/status")).get("/json/identity.json"))
        assert (identity["id"], identity["address"]) == (sched["id"], info["scheduler"])  # its own dashboard
        assert {w.name for w in backend.dashboard(lab).fetch_workers()} == set(local["workers"])
        assert backend.fetch_jupyter(lab).kernels == 0  # Jupyter answers there, with the lab's token

        # a restart on its port (into a new environment, say) while another process holds that port
        token = backend.jupyter_login_url(lab).rsplit("token=", 1)[1]
        stop_jupyter(jupyter["pid"])
        thief.take(jupyter["port"])
        moved = backend._start_jupyter(lab, sched, port=jupyter["port"])
        try:
            assert moved["port"] not in thief.ports() and procs.pid_alive(moved["pid"])
            api = JupyterApi(HttpTransport(f"http://127.0.0.1:{moved['port']}"), token)  # the same token
            assert procs.wait_until(lambda: api.fetch_activity(), 30, what="the moved Jupyter").kernels == 0
        finally:
            stop_jupyter(moved["pid"])
    finally:
        thief.close()


@pytest.mark.slow
def test_a_scheduler_restarted_while_its_ports_are_taken_moves_and_its_workers_follow(controller, monkeypatch):
    """update-lab with restart: true restarts the scheduler on its recorded ports (its addresses stay); when another
    process took them meanwhile it starts on ports the OS gives it, and the record, the workers, Jupyter (whose
    kernels' DASK_SCHEDULER_ADDRESS names it) and the controller's reads follow."""
    ctl, backend = controller, controller.backend
    ctl.handle(start_msg(workers={"initial": 1, "min": 1, "max": 1}, idle_timeout="1h", values={}), "m1")
    old = backend._local(ready(ctl))["scheduler"]
    thief = PortThief(monkeypatch)
    start = backend._start_scheduler

    def taken_meanwhile(lab, local, port=0, dash=0):
        assert (port, dash) == (old["port"], old["dashboard_port"])  # a restart asks for its ports again
        thief.take(port)
        thief.take(dash)
        return start(lab, local, port, dash)
    monkeypatch.setattr(backend, "_start_scheduler", taken_meanwhile)
    try:
        values = {"scheduler": {"env": [{"name": "DASK_LAB_MARK", "value": "2"}]}}
        ctl.handle(cmd(type="update-lab", lab="lab1", values=values, restart=True), "u1")
        drive(ctl, lambda: backend.fetch_lab("lab1").state.revision == 2)
        lab = backend.fetch_lab("lab1")
        drive(ctl, lambda: backend.dashboard(lab).fetch_load().workers == 1)
        new = backend._local(lab)["scheduler"]
        assert new["pid"] != old["pid"] and not {new["port"], new["dashboard_port"]} & thief.ports()
        address = backend.connection_info(lab)["scheduler"]
        with Client(address, timeout=20) as client:
            assert client.scheduler_info()["id"] == new["id"] != old["id"]
        jupyter = backend._local(lab)["jupyter"]
        assert jupyter["scheduler"] == new["port"] and backend.fetch_jupyter(lab).kernels == 0
        assert f"DASK_SCHEDULER_ADDRESS={address}".encode() in open(f"/proc/{jupyter['pid']}/environ", "rb").read()
    finally:
        thief.close()
