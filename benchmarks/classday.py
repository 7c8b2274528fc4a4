"""Benchmark: a class day at node level, on a simulated clock, driving the controller's real policy code against
a modelled GKE (node pools, the cluster autoscaler) and distributed's own Adaptive logic; priced with core/model.py.

Run: python benchmarks/classday.py [--seed N] [--trace FILE] [--write-trace FILE] [--plot FILE] [--json FILE]
     [--budget-usd X] [--most-allocated]

Configurations, each on the same trace (one lab per student, every worker 1 core / 3 GB on e2-standard-4):
- static: the seed's cluster (/work/shared/seeds: `gcloud container clusters create --machine-type e2-standard-4
  --num-nodes 2`, Helm chart `worker.replicas: 4`), one per student, for the whole class (its workers taken as
  1 thread each: assumption, the seed sets no worker resources).
- adaptive+CA: one class cluster; per student, distributed's AdaptiveCore (its own `recommendations`, wait_count
  3, interval 1 s) against a simulated cluster object; the worker pool sized by the cluster autoscaler.
- operator+CA: one class cluster; per student, the dask-kubernetes operator's autoscaler (5 s poll, ≤ 25 % down
  per step, 15 s between steps); the worker pool sized by the cluster autoscaler.
- dasklab own / dasklab shared (workers {initial: 1, max: 8}, as every autoscaled configuration): plan_scale, plan_retirement, plan_teardown (idle), plan_budget and the node sizing
  of core/model.py (workers_per_node, nodes_for, build_system_pool_size), as the lab reconciler calls them.
Only the cloud and the Dask scheduler are modelled here (every timing in CLOUD, with its source or "assumption").
"""

import argparse
import json
import math
import random
import sys
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "shared"), str(ROOT)]

from distributed.deploy.adaptive_core import AdaptiveCore  # noqa: E402

from dasklab.core import policy  # noqa: E402
from dasklab.core.classes import plan_budget  # noqa: E402
from dasklab.core.config import Config  # noqa: E402
from dasklab.core.model import (CLUSTER_FEE_PER_HOUR, OWN, READY, SHARED, DaskLoad, JupyterActivity,  # noqa: E402
                                LabSpec, LabState, WorkerInfo, build_system_pool_size, estimate_cost,
                                node_hour_usd, system_pool_usd_h)

# ------------------------------------------------------------------------------------------------ the cloud model
CLOUD = {  # seconds unless said; (value, source)
    "node_boot_s": (75.0, "assumption: a GKE node from the pool's resize to Ready (not documented; ~1-2 min seen)"),
    "image_pull_s": (45.0, "assumption: the Dask image (~1 GB) pulled by the first pod on a fresh node"),
    "pod_start_s": (5.0, "assumption: container start on a node that has the image"),
    "worker_join_s": (3.0, "assumption: a worker process connecting to its scheduler"),
    "cluster_create_s": (330.0, "assumption: a zonal GKE Standard cluster with its first pool (~5-6 min)"),
    "ca_scan_s": (10.0, "cluster autoscaler FAQ: --scan-interval 10s (GUIDE.md, Cluster autoscaler defaults)"),
    "ca_unneeded_s": (600.0, "cluster autoscaler FAQ: --scale-down-unneeded-time 10m"),
    "ca_delay_after_add_s": (600.0, "cluster autoscaler FAQ: --scale-down-delay-after-add 10m"),
    "ca_util_threshold": (0.5, "cluster autoscaler FAQ: --scale-down-utilization-threshold 0.5"),
    "ca_moves_worker_pods": (False, "github.com/kubernetes/autoscaler/blob/master/cluster-autoscaler/FAQ.md: "
                                    "--skip-nodes-with-custom-controller-pods=true, so pods of a custom controller "
                                    "(a DaskWorkerGroup) block a node's removal: only empty worker nodes go"),
    "most_allocated": (False, "kubernetes.io/docs/concepts/scheduling-eviction/resource-bin-packing: the default "
                              "scoring is LeastAllocated (spreads pods); True = MostAllocated, which GKE's "
                              "optimize-utilization autoscaling profile asks for"),
    "adaptive_interval_s": (1.0, "distributed Adaptive: interval 1s, wait_count 3 (GUIDE.md, Autoscaling anchors)"),
    "operator_poll_s": (5.0, "dask-kubernetes autoscaler: 5 s poll (GUIDE.md)"),
    "operator_down_fraction": (0.25, "dask-kubernetes autoscaler: at most 25 % per step (GUIDE.md)"),
    "operator_wait_s": (15.0, "dask-kubernetes autoscaler: 15 s between scale-downs (GUIDE.md)"),
    "target_duration_s": (5.0, "distributed.adaptive.target-duration default 5s (Scheduler.adaptive_target)"),
    "reconcile_tick_s": (60.0, "dasklab: Cloud Scheduler fires at most once a minute (core/config.py)"),
}
C = {k: v for k, (v, _) in CLOUD.items()}
MACHINE = "e2-standard-4"
CONFIG = Config(backend="gke")
STATIC_NODES, STATIC_WORKERS = 2, 4  # the seed: --num-nodes 2, worker.replicas: 4
MIN_W, INITIAL_W, MAX_W = 0, 1, 8  # per student, for every autoscaled configuration
RECORD_S = 60  # the plot's sampling


# ------------------------------------------------------------------------------------------------ the workload
def build_trace(seed: int, students: int = 30, hours: float = 3.0, lead_s: float = 600.0) -> dict:
    """A class day: per student an arrival, a departure and jobs (bursts of tasks) separated by think time. The
    labs are asked for at t = 0, `lead_s` before the class starts (as an instructor or dasklab's lead time would)."""
    rng = random.Random(seed)
    end = lead_s + hours * 3600
    out = []
    for i in range(students):
        arrive = lead_s + (rng.uniform(600, 2700) if rng.random() < 0.2 else rng.uniform(0, 300))  # late ones
        leave = lead_s + rng.uniform(3600, 9000) if rng.random() < 0.15 else end  # early leavers
        idle = rng.random() < 0.1  # opens the notebook, runs nothing
        jobs, t = [], arrive + rng.uniform(60, 300)
        while not idle and t < leave:
            if rng.random() < 0.05:  # a long job
                jobs.append({"t": round(t, 1), "tasks": rng.randint(100, 300), "task_s": round(rng.uniform(5, 15), 2)})
            else:
                jobs.append({"t": round(t, 1), "tasks": int(rng.choice([1, 2, 4, 8, 16, 32, 64]) * rng.uniform(1, 2)),
                             "task_s": round(rng.lognormvariate(0, 0.8), 2)})
            t += rng.expovariate(1 / 420)  # think time, mean 7 min
        out.append({"name": f"s{i:02d}", "arrive": round(arrive, 1), "leave": round(leave, 1), "jobs": jobs})
    return {"seed": seed, "start_s": lead_s, "duration_s": end, "students": out}


# ------------------------------------------------------------------------------------------------ the simulated world
class Worker:
    __slots__ = ("name", "lab", "node", "ready_at", "free_at", "holds", "state", "running")

    def __init__(self, name, lab):
        self.name, self.lab, self.node = name, lab, None
        self.ready_at = self.free_at = math.inf
        self.holds, self.state, self.running = False, "pending", 0  # pending → starting → up


class Node:
    __slots__ = ("name", "ready_at", "pulled_at", "workers", "unneeded_since")

    def __init__(self, name, ready_at):
        self.name, self.ready_at, self.pulled_at, self.workers, self.unneeded_since = name, ready_at, None, set(), None


class Pool:
    """A worker node pool: the nodes it has (booting ones are billed too) and the pods waiting for a node."""

    def __init__(self, name, slots):
        self.name, self.slots, self.nodes, self.pending, self.count = name, slots, [], [], 0
        self.last_add = -math.inf

    def add(self, n, now):
        for _ in range(n):
            self.count += 1
            self.nodes.append(Node(f"{self.name}-n{self.count}", now + C["node_boot_s"]))
        if n > 0:
            self.last_add = now

    def bind(self, now):
        """kube-scheduler: each pending pod onto the ready node with the most room (LeastAllocated, its default), or
        with the least (MostAllocated: most_allocated)."""
        while self.pending:
            room = [n for n in self.nodes if n.ready_at <= now and len(n.workers) < self.slots]
            if not room:
                return
            sign = -1 if C["most_allocated"] else 1
            node = min(room, key=lambda n: (sign * len(n.workers), n.name))
            w = self.pending.pop(0)
            w.node, w.state = node, "starting"
            if node.pulled_at is None:  # the first pod on a fresh node pulls the image; the others wait for it
                node.pulled_at = now + C["image_pull_s"]
            w.ready_at = max(now, node.pulled_at) + C["pod_start_s"] + C["worker_join_s"]
            node.workers.add(w)


class Lab:
    """One student's Dask cluster: its scheduler's queue, its workers, its jobs."""

    def __init__(self, student, pool, world):
        self.student, self.pool, self.world = student, pool, world
        self.queue = deque()  # [job index, tasks left to start, task_s]
        self.workers, self.count, self.alive, self.ready_at = {}, 0, False, math.inf
        self.jobs = {}  # job index → [tasks unfinished, ideal end]
        self.idle_since, self.last_activity = 0.0, 0.0

    def start(self, n, now):
        for _ in range(n):
            self.count += 1
            w = Worker(f"{self.student}-w{self.count}", self)
            self.workers[w.name] = w
            self.pool.pending.append(w)

    def remove(self, names, graceful=True):
        for name in names:
            w = self.workers.pop(name)
            if w.holds and not graceful:
                self.world.lost += 1
            if w in self.pool.pending:
                self.pool.pending.remove(w)
            if w.node is not None:
                w.node.workers.discard(w)

    def up(self):
        return [w for w in self.workers.values() if w.state == "up"]

    def run(self, now, dt):
        """Every joined worker takes queued tasks (one thread each) until the end of this step."""
        for w in self.workers.values():
            if w.state == "starting" and w.ready_at <= now:
                w.state, w.free_at = "up", now
            if w.state != "up":
                continue
            while self.queue and w.free_at < now + dt:
                job = self.queue[0]
                start = max(w.free_at, now)
                w.free_at = start + job[2]
                w.holds = True
                job[1] -= 1
                done = self.jobs[job[0]]
                done[0] -= 1
                if done[0] == 0:
                    self.world.waits.append(max(0.0, w.free_at - done[1]))
                    self.last_activity = w.free_at
                if job[1] == 0:
                    self.queue.popleft()
        busy = self.queue or any(w.free_at > now for w in self.workers.values() if w.state == "up")
        if busy:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now

    def processing(self, now):
        return sum(1 for w in self.workers.values() if w.state == "up" and w.free_at > now)

    def adaptive_target(self, now):
        """distributed's Scheduler.adaptive_target: queued and running work over target-duration, at most the tasks
        ready; below the worker count, the workers minus the idle ones it would close."""
        up = self.up()
        left = sum(max(0.0, w.free_at - now) for w in up)
        queued = sum(j[1] * j[2] for j in self.queue)
        tasks = sum(j[1] for j in self.queue) + self.processing(now)
        cpu = min(math.ceil((left + queued) / C["target_duration_s"]), tasks)
        if self.queue and not up:
            cpu = max(1, cpu)
        if cpu >= len(up):
            return cpu
        return len(up) - sum(1 for w in up if w.free_at <= now)


class World:
    """One configuration's cluster(s) over the day: pools, system nodes, fees; what it costs and what students wait."""

    def __init__(self, trace, name):
        self.trace, self.name = trace, name
        self.lost, self.waits, self.series, self.load = 0, [], [], []
        self.node_s = self.system_node_s = self.fee_s = 0.0
        self.pools, self.labs, self.class_ready = [], {}, None

    def submit(self, lab, job_id, job, now):
        lab.queue.append([job_id, job["tasks"], job["task_s"]])
        lab.jobs[job_id] = [job["tasks"], job["t"] + job["task_s"]]  # an always-warm, unlimited cluster
        lab.last_activity = now


# ------------------------------------------------------------------------------------------------ controllers
class SimAdaptive(AdaptiveCore):
    """distributed's AdaptiveCore against a simulated cluster object: plan/requested/observed are its workers."""

    def __init__(self, lab, now_ref):
        super().__init__(minimum=MIN_W, maximum=MAX_W, wait_count=3)
        self.lab, self.now_ref = lab, now_ref

    @property
    def plan(self):
        return set(self.lab.workers)

    @property
    def requested(self):
        return set(self.lab.workers)

    @property
    def observed(self):
        return {w.name for w in self.lab.up()}

    async def target(self):
        return self.lab.adaptive_target(self.now_ref[0])

    async def workers_to_close(self, target):
        idle = sorted((w for w in self.lab.up() if w.free_at <= self.now_ref[0]), key=lambda w: w.name)
        return [w.name for w in idle][:max(0, len(self.lab.up()) - target)]

    async def scale_up(self, n):
        self.lab.start(n - len(self.lab.workers), self.now_ref[0])

    async def scale_down(self, workers):
        self.lab.remove(workers, graceful=True)  # Adaptive retires (retire_workers) before closing


def step_adaptive(core):
    coro = core.adapt()
    try:
        coro.send(None)  # nothing it awaits suspends: one send runs it to the end
    except StopIteration:
        pass
    else:
        raise RuntimeError("AdaptiveCore.adapt suspended")


def operator_step(lab, state, now):
    """dask-kubernetes' autoscaler: replicas to adaptive_target at once up; down ≤ 25 % a step, 15 s apart."""
    have = len(lab.workers)
    want = min(max(lab.adaptive_target(now), MIN_W), MAX_W)
    if want > have:
        lab.start(want - have, now)
    elif want < have and now >= state.get("next_down", 0):
        target = max(want, have - max(1, math.floor(have * C["operator_down_fraction"])))
        idle = sorted(lab.workers.values(), key=lambda w: (w.state == "up" and w.free_at > now, w.name))
        lab.remove([w.name for w in idle[:have - target]], graceful=True)  # retire_workers (assumed to succeed)
        state["next_down"] = now + C["operator_wait_s"]


def ca_step(pool, now):
    """The cluster autoscaler on a pool: nodes for the pods waiting; empty ones (nothing movable) go after being
    unneeded for ca_unneeded_s, and not within ca_delay_after_add_s of an addition."""
    pool.bind(now)  # only pods the kube-scheduler could not place count as unschedulable
    booting = sum(pool.slots for n in pool.nodes if n.ready_at > now)
    short = len(pool.pending) - booting
    if short > 0:
        pool.add(math.ceil(short / pool.slots), now)
    gone = []
    for n in pool.nodes:
        if n.ready_at > now:
            continue
        util = len(n.workers) / pool.slots
        movable = C["ca_moves_worker_pods"] and util < C["ca_util_threshold"]
        if n.workers and not movable:
            n.unneeded_since = None
            continue
        n.unneeded_since = now if n.unneeded_since is None else n.unneeded_since
        if now - n.unneeded_since >= C["ca_unneeded_s"] and now - pool.last_add >= C["ca_delay_after_add_s"]:
            gone.append(n)
    for n in gone:
        for w in list(n.workers):  # moved pods are restarted: their data is lost
            w.lab.remove([w.name], graceful=False)
        pool.nodes.remove(n)


def student_spec(name, placement, students):
    return LabSpec(name=name, owner=name, min_workers=MIN_W, max_workers=MAX_W, initial_workers=INITIAL_W,
                   machine_type=MACHINE, worker_cpu=1.0, worker_memory=3 * 10**9,
                   idle_timeout_s=CONFIG.default_idle_timeout_s, max_lifetime_s=CONFIG.default_lifetime_s,
                   placement=placement, class_size=students,
                   system_usd_h=system_pool_usd_h(students, placement == SHARED, CONFIG.system_machine_type,
                                                  CONFIG.system_nodes, 1))


class Dasklab:
    """The lab reconciler's autoscaling pass for one lab, with its pool sized as the GKE adapter sizes it."""

    def __init__(self, lab, spec, now, budget):
        self.lab, self.spec, self.budget = lab, spec, budget
        self.state = LabState(phase=READY, created_at=now, ready_at=now, last_accounted=now,
                              target_workers=spec.initial_workers)  # as start-lab records it
        self.params = policy.ScaleParams(CONFIG.confirm_s, CONFIG.cooldown_s, CONFIG.down_fraction, CONFIG.warmup_s)

    def load(self, now):
        lab = self.lab
        up = lab.up()
        infos = tuple(WorkerInfo(w.name, w.name, w.node.name if w.node else "", float(w.free_at > now))
                      for w in up)
        return DaskLoad(workers=len(up), processing=lab.processing(now), queued=sum(j[1] for j in lab.queue),
                        clients=int(bool(lab.jobs)), adaptive_target=lab.adaptive_target(now), idle_since=lab.idle_since,
                        worker_infos=infos)

    def scale(self, now):
        load = self.load(now)
        decision = policy.plan_scale(self.spec, self.state, load, len(self.lab.workers), now, self.params)
        self.state = replace(self.state, target_workers=decision.target, **decision.remember)
        target, lab = decision.target, self.lab
        if len(lab.workers) < target:
            lab.start(target - len(lab.workers), now)
        elif load.workers > target and load.workers >= len(lab.workers):
            lab.remove(policy.plan_retirement(load.worker_infos, load.workers - target), graceful=True)

    def tick(self, now, cost):
        """The once-a-minute reconcile tick: the budget, then idleness (Jupyter's activity is the student's)."""
        verdict = plan_budget(cost, self.budget, self.state.budget_stage)
        self.state = replace(self.state, budget_stage=verdict.stage)
        if verdict.action == "minimum":
            self.spec = replace(self.spec, max_workers=self.spec.min_workers)
        if verdict.action == "teardown":
            return True
        jupyter = JupyterActivity(last_activity=self.lab.last_activity)
        return policy.plan_teardown("teardown-idle", self.spec, self.state, self.load(now), now, jupyter).delete


# ------------------------------------------------------------------------------------------------ one configuration
KINDS = ("static", "adaptive+CA", "operator+CA", "dasklab own", "dasklab shared")


def simulate(trace: dict, kind: str, budget_usd: float | None = None) -> World:
    """Run the day for one configuration; t = 0 is when the class's labs are asked for (the class starts)."""
    world = World(trace, kind)
    students = trace["students"]
    n = len(students)
    own = kind in ("static", "dasklab own")
    slots = STATIC_NODES * 3 if kind == "static" else student_spec("x", OWN, n).workers_per_node
    system_nodes = 0 if kind == "static" else build_system_pool_size(n, not own, CONFIG.system_machine_type,
                                                                     CONFIG.system_nodes, 1)
    ready_after = C["cluster_create_s"] + C["image_pull_s"] + C["pod_start_s"]  # scheduler and Jupyter answer
    shared_pool = None if own else Pool("class", slots)
    if shared_pool:
        world.pools.append(shared_pool)
    now = [0.0]
    ctl, initial = {}, {}

    def open_lab(s, t, first):
        if own:
            pool = Pool(s["name"], slots)
            world.pools.append(pool)
        else:
            pool = shared_pool
        lab = Lab(s["name"], pool, world)
        lab.alive, lab.ready_at = True, t + (ready_after if own or first else C["pod_start_s"] + C["worker_join_s"])
        world.labs[s["name"]] = lab
        if kind == "static":
            pool.add(STATIC_NODES, t + C["cluster_create_s"] - C["node_boot_s"])  # its nodes come with it
            initial[s["name"]] = STATIC_WORKERS
        elif kind.startswith("dasklab"):
            spec = student_spec(s["name"], OWN if own else SHARED, n)
            ctl[s["name"]] = Dasklab(lab, spec, lab.ready_at, budget_usd)
            initial[s["name"]] = INITIAL_W
            if own:  # the cluster is created with nodes_for(initial) worker nodes (adapters/gke/clusters.py)
                pool.add(spec.nodes_for(INITIAL_W), t + C["cluster_create_s"] - C["node_boot_s"])
            elif first and s is students[0]:
                pool.add(spec.nodes_for(INITIAL_W * n), t + C["cluster_create_s"] - C["node_boot_s"])
        elif kind == "adaptive+CA":
            ctl[s["name"]] = SimAdaptive(lab, now)
            initial[s["name"]] = MIN_W
        else:
            ctl[s["name"]], initial[s["name"]] = {}, MIN_W
        lab.started = False
        return lab

    def close_lab(lab):
        lab.remove(list(lab.workers), graceful=True)  # torn down on purpose: its results are not "lost to scaling"
        lab.alive = False
        if own:
            world.pools.remove(lab.pool)

    for s in students:
        open_lab(s, 0.0, True)
    jobs = sorted((j["t"], s["name"], i, j) for s in students for i, j in enumerate(s["jobs"]))
    nxt = 0
    by_name = {s["name"]: s for s in students}
    end = trace["duration_s"]
    dl_node_s = {name: 0.0 for name in by_name}
    t = 0.0
    while t < end:
        now[0] = t
        while nxt < len(jobs) and jobs[nxt][0] <= t:
            _, name, i, job = jobs[nxt]
            lab = world.labs[name]
            if not lab.alive:  # torn down while idle: the student's next job starts a new lab
                lab = open_lab(by_name[name], t, False)
            world.submit(lab, i, job, t)
            nxt += 1
        for lab in world.labs.values():
            if lab.alive and not lab.started and lab.ready_at <= t:
                lab.started = True
                lab.start(initial[lab.student], t)
        for pool in world.pools:
            if pool.pending:
                pool.bind(t)
        for lab in world.labs.values():
            if lab.alive and (lab.queue or lab.workers):
                lab.run(t, 1.0)
        tick = int(t)
        for name, c in ctl.items():
            lab = world.labs[name]
            if not lab.alive or not lab.started:
                continue
            if kind == "adaptive+CA":
                step_adaptive(c)
            elif kind == "operator+CA" and tick % C["operator_poll_s"] == 0:
                operator_step(lab, c, t)
            elif kind.startswith("dasklab"):
                if tick % CONFIG.poll_s == 0:
                    c.scale(t)
                if tick % C["reconcile_tick_s"] == 0:
                    cost = estimate_cost(c.spec, t - c.state.created_at, dl_node_s[name])
                    if c.tick(t, cost):
                        close_lab(lab)
        if kind.startswith("dasklab") and tick % CONFIG.poll_s == 0:
            size_dasklab_pools(world, ctl, own, t)
        elif kind != "static" and tick % C["ca_scan_s"] == 0:
            ca_step(shared_pool, t)
        # accounting, one second
        alive = [lab for lab in world.labs.values() if lab.alive]
        clusters = len(alive) if own else 1
        world.fee_s += clusters
        world.system_node_s += system_nodes * (clusters if own else 1)
        world.node_s += sum(len(p.nodes) for p in world.pools)
        if kind.startswith("dasklab"):
            for lab in alive:
                c = ctl[lab.student]
                dl_node_s[lab.student] += len(lab.pool.nodes) if own else c.spec.node_share(len(lab.workers))
        if world.class_ready is None and all(
                lab.ready_at <= t and sum(1 for w in lab.workers.values() if w.state == "up") >= initial[name]
                for name, lab in world.labs.items()):
            world.class_ready = t
        if tick % RECORD_S == 0:
            world.series.append((t, sum(len(p.nodes) for p in world.pools) + system_nodes * (clusters if own else 1)))
            world.load.append((t, sum(sum(j[1] for j in lab.queue) + lab.processing(t) for lab in alive)))
        t += 1.0
    unfinished = [d for lab in world.labs.values() for d in lab.jobs.values() if d[0] > 0]
    world.unfinished = len(unfinished)
    world.waits += [max(0.0, end - ideal) for _, ideal in unfinished]  # at least this late (censored at the end)
    return world


def size_dasklab_pools(world, ctl, own, now):
    """The GKE adapter's node sizing: the pool grows to nodes_for(target) (a class's pool: for the sum of its labs'
    targets); empty nodes beyond that go once every worker of the target runs (adapters/gke/nodes.py)."""
    groups = {}
    for name, c in ctl.items():
        if c.lab.alive:
            groups.setdefault(c.lab.pool, []).append(c)
    for pool, cs in groups.items():
        needed = cs[0].spec.nodes_for(sum(c.state.target_workers for c in cs))
        if len(pool.nodes) < needed:
            pool.add(needed - len(pool.nodes), now)
        elif len(pool.nodes) > needed and not pool.pending and all(
                len(c.lab.workers) == c.state.target_workers for c in cs):
            empty = [nd for nd in pool.nodes if not nd.workers and nd.ready_at <= now]
            for nd in empty[:len(pool.nodes) - needed]:
                pool.nodes.remove(nd)


# ------------------------------------------------------------------------------------------------ the report
def pct(values, q):
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(math.ceil(q * len(v))) - 1)]


def summarise(world: World) -> dict:
    node_h = (world.node_s + world.system_node_s) / 3600
    usd = world.fee_s / 3600 * CLUSTER_FEE_PER_HOUR + node_h * node_hour_usd(MACHINE)
    return {"config": world.name, "node_h": round(node_h, 2), "usd": round(usd, 2),
            "wait_p50_s": round(pct(world.waits, 0.5), 1), "wait_p95_s": round(pct(world.waits, 0.95), 1),
            "lost": world.lost, "class_ready_s": world.class_ready, "jobs": len(world.waits),
            "unfinished_jobs": world.unfinished}


def table(rows: list[dict]) -> str:
    peers = [r for r in rows if not r["config"].startswith("dasklab")]
    cheap = min(peers, key=lambda r: r["usd"])
    head = (f"{'configuration':<16}{'node-h':>8}{'USD':>8}{'×USD':>7}{'p50 s':>8}{'p95 s':>8}{'×p95':>7}"
            f"{'lost':>6}{'ready s':>9}{'unfin':>6}")
    lines = [head]
    for r in rows:
        ready = "-" if r["class_ready_s"] is None else f"{r['class_ready_s']:.0f}"
        lines.append(f"{r['config']:<16}{r['node_h']:>8.1f}{r['usd']:>8.2f}{r['usd'] / cheap['usd']:>7.2f}"
                     f"{r['wait_p50_s']:>8.1f}{r['wait_p95_s']:>8.1f}"
                     f"{r['wait_p95_s'] / max(cheap['wait_p95_s'], 0.1):>7.2f}{r['lost']:>6}{ready:>9}"
                     f"{r['unfinished_jobs']:>6}")
    best = min((r for r in rows if r["config"].startswith("dasklab")), key=lambda r: r["usd"])
    ok = best["usd"] <= 0.7 * cheap["usd"] and best["wait_p95_s"] <= cheap["wait_p95_s"] and best["lost"] == 0
    lines.append(f"ratios (×) against the cheapest peer: {cheap['config']}. Goal (≤ 0.7× its USD, p95 no worse, "
                 f"nothing lost) by {best['config']}: {'MET' if ok else 'NOT MET'}")
    return "\n".join(lines)


def plot(worlds: list[World], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    fig, ax = plt.subplots(figsize=(10, 5))
    for w in worlds:
        ax.step([t / 60 for t, _ in w.series], [n for _, n in w.series], where="post", label=w.name)
    ax.set_xlabel("minutes into the class")
    ax.set_ylabel("nodes (workers + system)")
    load = ax.twinx()
    base = worlds[-1].load
    load.fill_between([t / 60 for t, _ in base], [x for _, x in base], step="post", alpha=0.15, color="grey")
    load.set_ylabel(f"tasks queued or running, class total ({worlds[-1].name})")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot written: {path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace", help="a trace (JSON, as --write-trace writes it) instead of a generated one")
    ap.add_argument("--write-trace", help="write the trace used to this file")
    ap.add_argument("--budget-usd", type=float, default=None, help="each dasklab lab's budget (plan_budget)")
    ap.add_argument("--most-allocated", action="store_true",
                    help="kube-scheduler packs pods (MostAllocated, GKE's optimize-utilization profile)")
    ap.add_argument("--plot", default="classday.png", help="where the plot goes ('' for none)")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    C["most_allocated"] = args.most_allocated
    trace = json.loads(Path(args.trace).read_text()) if args.trace else build_trace(args.seed)
    if args.write_trace:
        Path(args.write_trace).write_text(json.dumps(trace, indent=1))
    worlds = [simulate(trace, kind, args.budget_usd) for kind in KINDS]
    rows = [summarise(w) for w in worlds]
    print(f"class day: {len(trace['students'])} students, {trace['duration_s'] / 3600:g} h, "
          f"{sum(len(s['jobs']) for s in trace['students'])} jobs, seed {trace.get('seed', '-')}")
    print(table(rows))
    print(plot(worlds, args.plot) if args.plot else "no plot asked")
    print("cloud model: " + "; ".join(f"{k}={v}" for k, (v, _) in CLOUD.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
