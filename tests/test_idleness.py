"""Idleness through the core (in-memory backend): judged within a minute on reconcile ticks, with one extra dashboard
call per idle lab per tick (not per poll), and Jupyter read only when the scheduler alone would let the lab go."""

import json

from dasklab.adapters.dashboard import Dashboard
from dasklab.core.config import Config
from dasklab.core.messages import parse_command
from dasklab.core.model import READY, JupyterActivity
from dasklab.core.reconcile import Controller
from tests.fakes import FakeBackend, FakeTransport, ListEvents


class Counting(FakeBackend):
    """Counts the dashboard paths asked and the Jupyter reads."""

    def __init__(self):
        super().__init__()
        self.paths: list[str] = []
        self.jupyter_reads = 0

    def dashboard(self, lab):
        backend, transport = self, FakeTransport(self._get(lab))

        class Recorded:
            def get(self, path):
                backend.paths.append(path)
                return transport.get(path)

            def post(self, path, body):
                return transport.post(path, body)

        return Dashboard(Recorded(), node_of=lambda name: name.split("-")[0])

    def fetch_jupyter(self, lab):
        self.jupyter_reads += 1
        return super().fetch_jupyter(lab)


def msg(**kw):
    return parse_command(json.dumps({"v": 1, **kw}))


def ready_lab(idle_timeout=60, polls=5):
    backend, clock = Counting(), [1_000_000.0]
    config = Config(poll_s=10, confirm_s=2, cooldown_s=1, tick_budget_s=polls * 10 - 1, warmup_s=0)
    ctl = Controller(backend, ListEvents(), config, clock=lambda: clock[0],
                     sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    ctl.handle(msg(type="start-lab", lab="a", owner="o", workers={"initial": 1, "max": 3}, idle_timeout=idle_timeout),
               "m1")
    for _ in range(6):
        ctl.reconcile_all("reconcile")
    assert backend.labs["a"].record["state"]["phase"] == READY
    backend.paths.clear()
    return ctl, backend, clock


def test_a_reconcile_tick_asks_idleness_once_not_at_every_poll():
    ctl, backend, clock = ready_lab()
    backend.labs["a"].load.idle_since = None  # not idle: the scheduler has tasks
    backend.labs["a"].load.processing = 3
    ctl.handle(msg(type="reconcile"), "t1")  # 5 polls, 10 s apart
    assert backend.paths.count("/json/counts.json") == 5
    assert "/api/v1/check_idle" not in backend.paths  # work: no need to ask
    backend.labs["a"].load.processing = 0
    backend.labs["a"].load.clients = 1  # a client alone keeps nothing: asked all the same
    backend.paths.clear()
    clock[0] += 120  # ready for longer than the idle timeout
    ctl.handle(msg(type="reconcile"), "t2")
    assert backend.paths.count("/json/counts.json") == 5 and backend.paths.count("/api/v1/check_idle") == 1


def test_an_idle_lab_goes_at_the_first_reconcile_tick_past_its_timeout_not_the_15_minute_one():
    ctl, backend, clock = ready_lab(idle_timeout=60)
    fake = backend.labs["a"]
    clock[0] += 60  # ready for a minute: it could be idle that long
    fake.load.idle_since = start = clock[0]  # the last task ended now
    fake.jupyter = JupyterActivity(last_activity=clock[0] - 5, kernels=1)
    ctl.handle(msg(type="reconcile"), "t1")  # polls over 40 s: the lab is asked once, idle for at most ~25 s
    assert backend.labs["a"].record["state"]["phase"] == READY and backend.jupyter_reads == 0
    assert backend.paths.count("/api/v1/check_idle") == 1
    clock[0] = start + 60  # the next minute's tick: asked at the same point of it, idle ≥ 60 s
    ctl.handle(msg(type="reconcile"), "t2")
    assert backend.jupyter_reads == 1
    assert "a" not in backend.labs or backend.labs["a"].record["state"]["phase"] == "tearing-down"
    deleted = [e for e in ctl.events.events if e["event"] == "lab-deleted"]
    assert deleted and "idle for" in deleted[0]["reason"] and "no Jupyter kernel busy" in deleted[0]["reason"]


def test_a_busy_kernel_holds_an_idle_scheduler_on_every_tick():
    ctl, backend, clock = ready_lab(idle_timeout=60)
    fake = backend.labs["a"]
    fake.load.idle_since, fake.load.clients = clock[0] - 600, 1
    fake.jupyter = JupyterActivity(last_activity=clock[0] - 600, kernels=2, busy_kernels=1)
    for tick in ("reconcile", "teardown-idle", "reconcile"):
        clock[0] += 60
        ctl.handle(msg(type=tick), "t")
        assert backend.labs["a"].record["state"]["phase"] == READY
    assert backend.jupyter_reads == 3
