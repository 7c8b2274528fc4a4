"""A class of 100 students on the GKE path (issue 14, "Scale"): the GKE, Kubernetes and instance-group stand-ins
through the real clients, class records in the Firestore emulator; one start-class → 100 ready labs, bounded class
passes, idle students' labs torn down while the busy ones stay, then the class budget's steps.

100 Dask schedulers would be 100 processes of ~80 MB, each using ~1.5 % of a core at rest: more than this 2-core
machine can share. So two labs run real Dask (scheduler, and a worker under its nanny once their pod runs: one
busy with a long task, one idle), and the other 98 are answered by tests/standins/dashboard.py behind the same
service proxy, their workers being their Running worker pods. Labs start with 0 workers (min 0): a worker pod, and
its node, only for a busy lab, as the autoscaler asks."""

import json
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml
from dasklab.adapters.gke import place_of
from dasklab.adapters.procs import pid_alive
from dasklab.adapters.release import chart_fullname
from dasklab.core.messages import parse_command
from dasklab.core.model import READY
from dasklab.core.reconcile import Controller
from distributed import Client

from tests.dask_checks import alive, process_tree
from tests.gke_world import CONFIG, World
from tests.standins.dashboard import DashboardStandin
from tests.test_gke import SEED_VALUES, Events

pytestmark = pytest.mark.slow  # the slow tier: `pytest -m slow` (.ci/run runs both tiers)

N = int(__import__("os").environ.get("SCALE_N", "100"))
STUDENTS = [f"s{i:03d}" for i in range(N)]
BUSY = {s for i, s in enumerate(STUDENTS) if i % 3 == 0}  # 34 students at work, 66 idle
REAL = ("s000", "s001")  # real Dask: s000 busy, s001 idle
IDLE_S = 600  # the class's idle timeout
# The class's budget, sized so the idle labs go below 80 % (on a machine up to ~2× slower than this one) and each
# step of the budget loop moves ~5 %. Until the loop the controller's clock is the wall clock (plus the idle jump),
# so what the class spends by then grows with the wall time; own at 100 pays ~$0.0065 a second for its 100 fees and
# system nodes: ~$7 at this machine's ~300 s when the idle labs go, then ~$12.5/h (34 labs, a worker node each).
# Shared at 100: ~$1.5 by then (one fee, 34 system nodes), then ~$6/h (a third of a node a worker).
BUDGETS = {"own": 11.0 * N / 100, "shared": 3.0 * N / 100}
STEP_S = {"own": 180, "shared": 120}  # the budget loop's step of the controller's clock
PLACEMENTS = __import__("os").environ.get("SCALE_P", "own").split(",")  # SCALE_P=shared runs the shared placement (not in the default run: ~10 min)


class ClassWorld(World):
    """tests.gke_world.World whose helm gives the labs in `real` a real scheduler (as World does) and every other
    lab the dashboard stand-in as its scheduler Service's backend, after rendering the same chart objects."""

    def __init__(self, tmp, real: set[str], **kw):
        super().__init__(tmp, **kw)
        self.real, self.standin = real, set()
        self.dashboards = DashboardStandin(self.kube).start()

    def _helm(self, job: dict) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        if ns in self.real:
            return super()._helm(job)
        pod = job["spec"]["template"]["spec"]
        release = pod["containers"][0]["args"][2]
        values = yaml.safe_load(self.kube.get("configmaps", ns, pod["volumes"][0]["configMap"]["name"])["data"]
                                ["values.yaml"])
        full = chart_fullname(release)
        self.helm_runs.append({"namespace": ns, "job": name, "values": values})
        if ns not in self.standin:
            self._render(ns, release, full, values)
            self.kube.register_service_backend(ns, f"{full}-scheduler", 80, self.dashboards.add(ns))
            self.standin.add(ns)
        self.kube.complete_job(ns, name, log=f'Release "{release}" has been upgraded.\nSTATUS: deployed\n')

    def sync(self) -> None:
        super().sync()
        for ns in [ns for ns in list(self.standin) if not self.lab_stands(ns)]:  # helm Jobs add to it meanwhile
            self.standin.discard(ns)
            self.dashboards.forget(ns)
            if self.kube.get("namespaces", None, ns):
                self.admin.delete_namespace(ns)

    def close(self) -> list[int]:
        self.dashboards.stop()
        return super().close()


class Counted:
    """The class store, its calls counted by name."""

    def __init__(self, store):
        self.store, self.calls = store, Counter()

    def __getattr__(self, name):
        fn = getattr(self.store, name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return counted


def ns_of(student: str) -> str:
    return place_of(f"intro-{student}").namespace


def start_class(placement: str):
    return parse_command(json.dumps({
        "v": 1, "type": "start-class", "class": "intro", "owner": "prof", "roster": STUDENTS,
        "workers": {"initial": 0, "min": 0, "max": 3}, "machine_type": "e2-standard-4",
        "worker_resources": {"cpu": 1, "memory": "3G"}, "idle_timeout": f"{IDLE_S}s", "max_lifetime": "4h",
        "values": SEED_VALUES, "placement": placement, "budget": {"class": BUDGETS[placement]}}))


def calls(world) -> tuple[Counter, list[tuple[str, str]]]:
    return Counter(world.gke.calls), list(world.kube.requests)


def diff(before, after) -> tuple[Counter, list]:
    return after[0] - before[0], after[1][len(before[1]):]


@pytest.fixture
def world(tmp_path, firestore_env):
    w = ClassWorld(tmp_path, real={ns_of(s) for s in REAL})
    yield w
    tree = process_tree(w.pids())
    pids = w.close()
    assert not [p for p in pids if pid_alive(p)], "a Dask process survived"
    assert not alive(tree), "a nanny or worker process survived"


def sleep_long(s):
    time.sleep(s)
    return s


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_class_of_100_on_gke(world, firestore_tombstones, monkeypatch, placement):
    from dasklab import report
    from dasklab.adapters.firestore import FirestoreClasses
    BUDGET = BUDGETS[placement]
    offset = [0.0]  # the controller's clock runs ahead of the wall clock by this much
    frozen = [None]  # or, once set, of this wall time: the budget's steps then move by the offset alone
    store = Counted(FirestoreClasses(firestore_tombstones.project))
    events = Events()
    ctl = Controller(world.backend(), events, CONFIG, clock=lambda: (frozen[0] or time.time()) + offset[0],
                     classes=store)
    published = lambda kind: [e for e in events.published if e["event"] == kind]  # noqa: E731

    def tick():
        world.sync()
        ctl.handle(parse_command('{"v": 1, "type": "reconcile"}'), "tick")
        world.sync()

    def ticks_until(done, timeout: float, what: str) -> int:
        deadline, n = time.monotonic() + timeout, 0
        while not done():
            assert time.monotonic() < deadline, f"{what}: not reached in {timeout:.0f}s"
            tick()
            n += 1
        return n

    # one start-class → 100 labs being created, then reconcile ticks until the class is ready
    t0 = time.monotonic()
    ctl.handle(start_class(placement), "m1", published=time.time())
    handled_s = time.monotonic() - t0  # the class step creates its labs one after the other
    assert published("command-outcome")[-1]["outcome"] == "accepted"
    assert len(world.gke.clusters) == (N if placement == "own" else 1)
    ticks = ticks_until(lambda: published("class-ready"), 540, "class-ready")
    wall = time.monotonic() - t0
    ready = published("lab-ready")
    assert sorted(e["lab"] for e in ready) == [f"intro-{s}" for s in STUDENTS]  # each once
    [announced] = published("class-ready")
    assert [(r["student"], r["phase"]) for r in announced["labs"]] == [(s, READY) for s in STUDENTS]
    assert all(r["connection"]["dashboard"] for r in announced["labs"])
    assert len(ctl.backend.fetch_labs()) == N
    print(f"\n{N} labs ready: {ticks} reconcile ticks, {wall:.1f}s wall (GKE operations {world.gke.operation_s}s); "
          f"the start-class itself {handled_s:.1f}s")

    # a duplicate start-class (redelivered): nothing created, nothing announced again
    before, seen = calls(world), len(events.published)
    ctl.handle(start_class(placement), "m1", published=store.fetch_class("intro").published)
    gke_calls, _ = diff(before, calls(world))
    assert published("command-outcome")[-1]["outcome"] == "nothing-to-do"
    assert "CreateCluster" not in gke_calls and [e["event"] for e in events.published[seen:]] == ["command-outcome"]
    assert len(world.gke.clusters) == (N if placement == "own" else 1)

    # a class pass at rest: the clusters listed once, the labs' records read in one query, no writes
    before, store.calls = calls(world), Counter()
    t = time.monotonic()
    assert ctl.reconcile_classes("pass") == []
    class_s = time.monotonic() - t
    gke_calls, kube_calls = diff(before, calls(world))
    assert gke_calls == Counter({"ListClusters": 1}), gke_calls
    assert all(m == "GET" for m, _ in kube_calls) and len(kube_calls) <= N, Counter(m for m, _ in kube_calls)
    assert store.calls == Counter({"fetch_classes": 1}), store.calls
    print(f"class pass at rest: {class_s:.2f}s, GKE {dict(gke_calls)}, Kubernetes {len(kube_calls)} GETs, "
          f"class store {dict(store.calls)}")
    # a whole reconcile tick at rest (a pass over the labs, then the classes): GKE listings, no GKE call per lab
    before = calls(world)
    t = time.monotonic()
    tick()
    tick_s = time.monotonic() - t
    gke_calls, kube_calls = diff(before, calls(world))
    assert gke_calls == Counter({"ListClusters": 2}), gke_calls
    assert not [c for c in kube_calls if c[0] != "GET"], "a tick at rest wrote"
    print(f"reconcile tick at rest: {tick_s:.2f}s, GKE {dict(gke_calls)}, Kubernetes {len(kube_calls)} "
          f"({sum('/proxy/' in p for _, p in kube_calls)} through the service proxy)")

    # `status --class` shows the class's live estimated cost within its budget
    monkeypatch.setattr("dasklab.runtime.build_backend", lambda cfg: ctl.backend)
    monkeypatch.setattr("dasklab.runtime.build_classes", lambda cfg: store)
    status = lambda: report.fetch_class_status(  # noqa: E731  (as of the controller's time)
        CONFIG, [r for r in report.fetch_status(CONFIG, ctl.clock()) if r["class"] == "intro"], ctl.clock())
    [summary] = status()
    assert summary["labs"] == {READY: N} and summary["ready"] and summary["budget_usd"] == BUDGET
    assert 0 < summary["estimated_cost_usd"] <= 0.8 * BUDGET

    # a third of the students at work (s000 on real Dask), the others idle; the busy labs get a worker
    for s in BUSY - {"s000"}:
        world.dashboards.set_tasks(ns_of(s), 1)
    with Client(world.scheduler_address(ns_of("s000")), timeout=20) as client:
        task = client.submit(sleep_long, 3600, pure=False)
        busy_ready = lambda: all(ctl.backend.dashboard(lab).fetch_load(idle=False).workers == 1  # noqa: E731
                                 for lab in ctl.backend.fetch_labs() if lab.spec.student in BUSY)
        ticks_until(busy_ready, 240, "a worker for every busy lab")
        assert not published("budget-warning")

        # past the idle timeout: the idle students' labs go, the busy ones stay
        offset[0] = IDLE_S + 60
        ticks_until(lambda: {lab.spec.student for lab in ctl.backend.fetch_labs()} == BUSY, 240, "idle labs gone")
        deleted = {e["student"]: e for e in published("lab-deleted")}
        assert set(deleted) == set(STUDENTS) - BUSY
        assert all("idle" in e["reason"] for e in deleted.values()), {e["reason"] for e in deleted.values()}
        assert all(lab.state.phase == READY for lab in ctl.backend.fetch_labs())
        assert task.status == "pending"  # s000's computation still runs
        if placement == "own":
            assert {c.rsplit("/", 1)[1] for c in world.gke.clusters} == {f"intro-{s}" for s in BUSY}
        record = store.fetch_class("intro")
        assert set(record.usage) == set(STUDENTS) - BUSY  # the report keeps the labs gone
        [summary] = status()
        print(f"idle labs gone: the class has cost ${summary['estimated_cost_usd']:.2f} of ${BUDGET:.2f}")
        assert summary["labs"] == {READY: len(BUSY)} and summary["estimated_cost_usd"] < 0.8 * BUDGET
        assert not published("lab-ready")[N:] and len(published("class-ready")) == 1  # nobody recreated

        # the class's time runs on: warned, its labs to their minimum (0 workers), then torn down at the budget.
        # From here the controller's time is the offset's alone, so a slow machine cannot stretch a step.
        frozen[0], stop_s = time.time(), []
        for _ in range(60):
            if published("class-deleted"):
                break
            offset[0] += STEP_S[placement]
            for _ in range(2):
                t, reached = time.monotonic(), bool(published("budget-reached"))
                tick()
                if published("budget-reached") and not reached:  # this tick stopped the class's labs, one by one
                    stop_s.append(time.monotonic() - t)
        else:
            raise AssertionError(f"the class budget never ended it: {[e['event'] for e in events.published[-5:]]}")
    steps = [e for e in events.published if e["event"].startswith("budget-")]
    assert [e["event"] for e in steps] == ["budget-warning", "budget-minimum", "budget-reached"]
    assert all(e["class"] == "intro" and "lab" not in e for e in steps)
    shares = [e["estimated_cost_usd"] / e["budget_usd"] for e in steps]
    print(f"class budget steps at {', '.join(f'{x:.1%}' for x in shares)} of ${BUDGET:.2f}; the tick that stopped "
          f"its {len(BUSY)} labs {stop_s[0]:.1f}s")
    assert 0.8 <= shares[0] < 0.9 <= shares[1] < 1.0 <= shares[2] < 1.1, shares
    [gone] = published("class-deleted")
    assert gone["reason"].startswith("estimated cost") and gone["students"] == N
    assert gone["estimated_cost_usd"] < 1.1 * BUDGET
    assert world.gke.clusters == {} and ctl.backend.fetch_labs() == []
