"""The lab's data: desired spec, remembered state, observed load. Plain values shared by every layer."""

import math
import re
from dataclasses import asdict, dataclass, field, replace

from dasklab.core.errors import RecordUnreadable

MANAGED_BY = "dasklab"  # value of the managed-by marker on every resource the controller creates
# The lab record's schema: 1 = records written before it carried one. Any field added or removed bumps it.
RECORD_SCHEMA = 2

# vCPUs and memory (GiB) of the machine types a start-lab may ask for; "local" is a group of local workers. A family
# added here needs its prices in MACHINE_FAMILY_USD_H (tests/test_prices.py checks).
MACHINE_TYPES: dict[str, tuple[float, float]] = {
    "local": (2, 8),
    **{f"e2-standard-{n}": (n, 4 * n) for n in (2, 4, 8, 16, 32)},
    **{f"e2-highmem-{n}": (n, 8 * n) for n in (2, 4, 8, 16)},
    **{f"e2-highcpu-{n}": (n, n) for n in (2, 4, 8, 16, 32)},
    **{f"n2-standard-{n}": (n, 4 * n) for n in (2, 4, 8, 16, 32, 48, 64)},
    **{f"n2-highmem-{n}": (n, 8 * n) for n in (2, 4, 8, 16, 32)},
    **{f"c3-standard-{n}": (n, 4 * n) for n in (4, 8, 22, 44)},
}
# What a node keeps for the kubelet and system pods (GKE's allocatable is about this much less).
NODE_RESERVED_CPU = 0.25
NODE_RESERVED_MEMORY_GIB = 1.0
# Every node's boot disk type: every machine family above supports it (C3 has no pd-standard, GKE's default).
NODE_DISK_TYPE = "pd-balanced"

_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?$")
_MEMORY_UNITS = {None: 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                 "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m)?$")


def parse_memory(value) -> int:
    """Kubernetes memory quantity ('3G', '512Mi', 1073741824) → bytes; ValueError if malformed."""
    m = _MEMORY.match(str(value).strip())
    if not m:
        raise ValueError(f"{value!r} is not a memory quantity like 3G, 512Mi or a number of bytes")
    return int(float(m.group(1)) * _MEMORY_UNITS[m.group(2)])


def parse_cpu(value) -> float:
    """Kubernetes CPU quantity (1, 0.5, '500m') → cores; ValueError if malformed."""
    m = _CPU.match(str(value).strip())
    if not m or float(m.group(1)) == 0:
        raise ValueError(f"{value!r} is not a positive CPU quantity like 1, 0.5 or 500m")
    return float(m.group(1)) / (1000 if m.group(2) else 1)


@dataclass(frozen=True)
class LabSpec:
    """What the lab's owner asked for (start-lab, then scale and keep-alive change it)."""

    name: str
    owner: str
    min_workers: int
    max_workers: int
    initial_workers: int
    machine_type: str
    worker_cpu: float
    worker_memory: int  # bytes
    idle_timeout_s: int
    max_lifetime_s: int
    spot: bool = False
    values: dict = field(default_factory=dict)  # Dask Helm chart values as sent
    public_source_ranges: tuple[str, ...] = ()  # opt-in public Jupyter, restricted to these CIDRs
    pinned_workers: int | None = None
    keep_alive_until: float | None = None
    mixed_environment: bool = False  # the owner accepted different package pins or image tags per component
    revision: int = 1  # the revision of the values asked for: 1 at start-lab, +1 per update-lab that changes them
    dask_version: str = ""  # the Dask its images run (config dask_version, or the version its values' tags state)
    notes: tuple[str, ...] = ()  # each part of the request the controller replaced: "field: what was done; do …"
    class_name: str = ""  # the class this lab is a student's lab of ("" = a lab of its own)
    student: str = ""  # the student (a roster name) whose lab it is, within class_name
    student_identity: str = ""  # that student's Google identity (`ann=ann@example.edu`): may keep it alive, stop it
    # the Google accounts granted what connecting needs in the lab's namespace (the student's, the class owner's);
    # kept in the private lab record, never on a label
    access: tuple[str, ...] = ()
    placement: str = ""  # where a class's lab runs: "" / "own" = a cluster of its own; "shared" = the class's cluster
    class_size: int = 0  # students in its class when it was started: a shared lab's share of the class cluster
    budget_usd: float | None = None  # estimated cost at which the lab is warned (80 %), shrunk (90 %), torn down
    # what its cluster's system pool (scheduler, Jupyter) costs it an hour: its own pool, or its share of its
    # class's; 0 where there is none (the local backend)
    system_usd_h: float = 0.0

    @property
    def workers_per_node(self) -> int:
        cpu, mem_gib = MACHINE_TYPES[self.machine_type]
        by_cpu = (cpu - NODE_RESERVED_CPU) // self.worker_cpu
        by_mem = (mem_gib - NODE_RESERVED_MEMORY_GIB) * 2**30 // self.worker_memory
        return max(1, int(min(by_cpu, by_mem)))

    def nodes_for(self, workers: int) -> int:
        return math.ceil(workers / self.workers_per_node)

    def node_share(self, workers: int) -> float:
        """The worker nodes a lab's cost report counts: whole nodes of its own pool; in a class's shared pool, its
        workers' fraction of the nodes they pack into (3 students' single workers fill one node, not three)."""
        return workers / self.workers_per_node if self.placement == SHARED else self.nodes_for(workers)


# Phases of a lab, in order; "gone" is the absence of the resource.
REQUESTED, PROVISIONING, INSTALLING, READY, TEARING_DOWN, FAILED = (
    "requested", "provisioning", "installing", "ready", "tearing-down", "failed")


@dataclass(frozen=True)
class LabState:
    """What the controller remembers between invocations, stored on the lab resource."""

    phase: str = REQUESTED
    created_at: float = 0.0
    ready_at: float | None = None
    target_workers: int = 0  # workers requested from the backend
    # the confirmation window of a scale-down: (level, since) steps, "nothing above level wanted since since"
    down_window: tuple[tuple[int, float], ...] = ()
    cooldown_until: float = 0.0
    reason: str = ""  # why the lab is in its phase (failure, teardown cause)
    node_seconds: float = 0.0  # node-time used so far, for the cost report
    last_accounted: float = 0.0
    degraded: str = ""  # the causes last reported in a lab-degraded event ("" = healthy), e.g. "memory+pending"
    degraded_reason: str = ""  # that event's reason, for `dasklab status`
    revision: int = 1  # the revision the backend runs everywhere (spec.revision once an update has converged)
    revision_workers: int = 0  # the worker count when spec.revision was recorded (what its Helm revision sets)
    update_ids: tuple[str, ...] = ()  # message ids of the latest update-labs applied: a redelivery is a no-op
    start_published: float = 0.0  # publish time of the start-lab that created the lab (tombstones compare it)
    update_published: float = 0.0  # publish time of the latest update-lab applied: an older one changes nothing
    scale_published: dict = field(default_factory=dict)  # limit (min, max, pin) → publish time of the scale that
    # set it last: an older scale leaves it alone
    first_used_at: float | None = None  # when a client or a task was first seen: the warm-up ends there
    peak_workers: int = 0  # the highest worker target so far (the class report)
    busy_s: float = 0.0  # seconds with tasks running or queued, up to busy_since (the class report)
    busy_since: float | None = None  # when the current busy spell began (None: not busy when last observed)
    budget_stage: str = ""  # the budget's steps taken: "", "warned", "minimum"
    lease_holder: str = ""  # the invocation acting on the lab now ("" = none): one actor per lab at a time
    lease_until: float = 0.0  # when that lease expires (a holder that died is taken over then)
    backoff_until: float = 0.0  # after a rate limit, the lab is left alone until then
    backoff_count: int = 0  # rate limits in a row (the backoff doubles with each)


@dataclass(frozen=True)
class Lab:
    """A lab as read from its backend: spec and state plus the backend's concurrency token."""

    spec: LabSpec
    state: LabState
    version: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict:
        return {"schema": RECORD_SCHEMA, "spec": asdict(self.spec), "state": asdict(self.state)}

    @classmethod
    def from_dict(cls, data: dict, version: str = "") -> "Lab":
        """The lab a stored record holds. A record of an older schema is read (fields it holds that this version no
        longer has are dropped, missing ones take their defaults); one of a newer schema, one with a key its own
        schema does not have, or one that does not parse raises RecordUnreadable: that lab is left alone."""
        name = str((data.get("spec") or {}).get("name", "?")) if isinstance(data, dict) else "?"
        try:
            schema = int(data.get("schema", 1))
            if schema > RECORD_SCHEMA:
                raise RecordUnreadable(name, f"schema {schema} was written by a newer dasklab (this one reads up to "
                                             f"{RECORD_SCHEMA}): left alone until this function is upgraded")
            spec, state = dict(data["spec"]), dict(data["state"])
            for part, fields in ((spec, LabSpec.__dataclass_fields__), (state, LabState.__dataclass_fields__)):
                unknown = sorted(set(part) - set(fields))
                if unknown and schema == RECORD_SCHEMA:
                    raise RecordUnreadable(name, f"unknown key(s) {', '.join(unknown)} in a schema {schema} record")
                for key in unknown:  # an older record's fields this version no longer has
                    del part[key]
            spec.update(public_source_ranges=tuple(spec.get("public_source_ranges", ())),
                        notes=tuple(spec.get("notes", ())), access=tuple(spec.get("access", ())))
            state["update_ids"] = tuple(state.get("update_ids", ()))
            state["down_window"] = tuple((int(level), float(since)) for level, since in state.get("down_window", ()))
            return cls(LabSpec(**spec), LabState(**state), version)
        except RecordUnreadable:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise RecordUnreadable(name, f"{type(e).__name__}: {e}") from e

    def with_state(self, **changes) -> "Lab":
        return replace(self, state=replace(self.state, **changes))

    def with_spec(self, **changes) -> "Lab":
        return replace(self, spec=replace(self.spec, **changes))


@dataclass(frozen=True)
class WorkerInfo:
    """One Dask worker as the scheduler reports it, with the node it runs on."""

    address: str
    name: str
    node: str
    load: float = 0.0  # tasks on it plus bytes it holds, scaled: what retiring it would move


@dataclass(frozen=True)
class DaskLoad:
    """The scheduler's load, read from its dashboard HTTP API."""

    workers: int
    processing: int
    queued: int  # tasks not running nor done: waiting on dependencies, without a worker, queued
    clients: int  # user clients (the scheduler's own fire-and-forget entry excluded)
    adaptive_target: int
    idle_since: float | None
    worker_infos: tuple[WorkerInfo, ...] = ()
    memory_bytes: int = 0  # what the workers hold (counts.json `bytes`), spilled or not

    @property
    def busy(self) -> bool:
        return self.processing > 0 or self.queued > 0


@dataclass(frozen=True)
class JupyterActivity:
    """What the lab's Jupyter Server reports: when it last saw activity and how many of its kernels are busy."""

    last_activity: float | None  # epoch s: the latest of /api/status last_activity and the kernels' last_activity
    kernels: int = 0
    busy_kernels: int = 0  # execution_state "busy": a cell is running
    running: bool = True  # False: the lab runs no Jupyter (or none answers behind its Service): it adds no activity


NO_JUPYTER = JupyterActivity(last_activity=None, running=False)


@dataclass(frozen=True)
class WorkerProblem:
    """Something wrong with one worker as its backend reports it (pod status, process exit, nanny log)."""

    kind: str  # oom-killed, crash-looping, install-failed, image-pull, pending, restarting
    worker: str  # pod or process name
    detail: str  # what the backend says: the scheduler's message, the exit code, the waiting reason
    at: float = 0.0  # when it happened (or was first seen); 0 = ongoing
    restarts: int = 0
    memory_limit: int = 0  # bytes, for a worker killed for memory
    log_tail: str = ""


# Cost figures for budgets and reports, us-central1 (cloudbuild.yaml's region; other regions cost more or less).
CLUSTER_FEE_PER_HOUR = 0.10
# Compute Engine bills a VM by its vCPUs and its GiB of memory, at rates set per machine family, on-demand or Spot
# (cloud.google.com/compute/vm-instance-pricing). USD per vCPU-hour and per GiB-hour, us-central1, from the Cloud
# Billing Catalog's prices as of 2026-07-30 (Cyclenerd/google-cloud-pricing-cost-calculator pricing.yml, generated
# that day: every standard/highmem/highcpu shape of a family is exactly these two rates times its vCPUs and GiB).
# Spot rates are set per family, not one discount (here E2 Spot is 60 % of on-demand, N2 47 %, C3 25 %), and Google
# changes them over time: refresh them with the rest.
# family: (vCPU, GiB, Spot vCPU, Spot GiB); e2-standard-4 is $0.134/h, n2-highmem-4 $0.262/h, c3-standard-4 $0.202/h
MACHINE_FAMILY_USD_H: dict[str, tuple[float, float, float, float]] = {
    "e2": (0.02181159, 0.00292353, 0.01309, 0.001754),
    "n2": (0.031611, 0.004237, 0.01499, 0.00201),
    "c3": (0.03465, 0.003938, 0.00849, 0.000965),
}
LOCAL_PRICED_AS = "e2"  # a local lab is estimated as the E2 machine of its shape would cost


def node_seconds_at(lab: Lab, now: float) -> float:
    """Node-time used up to `now`: what is recorded, plus the recorded target's nodes since the last decision."""
    nodes = lab.spec.node_share(lab.state.target_workers) if lab.state.phase in (READY, TEARING_DOWN) else 0
    return lab.state.node_seconds + nodes * max(0.0, now - lab.state.last_accounted)


SHARED, OWN = "shared", "own"  # placements of a class's labs
DEFAULT_PLACEMENT = SHARED  # chosen from docs/deploy.md's "Placement of a class" table (`python -m dasklab.core.model`)
# What each lab asks of the system pool: the scheduler's and Jupyter's requests (release.CONTROLLER_DEFAULTS).
LAB_SYSTEM_CPU, LAB_SYSTEM_MEMORY_GIB = 1.0, 2 * 1e9 / 2**30


def machine_family(machine_type: str) -> str:
    return LOCAL_PRICED_AS if machine_type == "local" else machine_type.split("-")[0]


def node_hour_usd(machine_type: str, spot: bool = False) -> float:
    """USD an hour for one node of `machine_type` (its family's rates times its vCPUs and GiB); KeyError for a type
    the machine-type rule (MACHINE_TYPES) does not know, which every request and the configuration are checked
    against, so no machine is priced at a guess."""
    cpu, mem_gib = MACHINE_TYPES[machine_type]
    per_cpu, per_gib, spot_cpu, spot_gib = MACHINE_FAMILY_USD_H[machine_family(machine_type)]
    return cpu * spot_cpu + mem_gib * spot_gib if spot else cpu * per_cpu + mem_gib * per_gib


def labs_per_system_node(machine_type: str) -> int:
    """Labs whose scheduler and Jupyter (LAB_SYSTEM_*) one system node holds, against its allocatable."""
    cpu, mem_gib = MACHINE_TYPES[machine_type]
    return max(1, int(min((cpu - NODE_RESERVED_CPU) // LAB_SYSTEM_CPU,
                          (mem_gib - NODE_RESERVED_MEMORY_GIB) // LAB_SYSTEM_MEMORY_GIB)))


def system_nodes_for(labs: int, machine_type: str) -> int:
    """System nodes that hold `labs` schedulers and Jupyters (their requests against a node's allocatable)."""
    return max(1, math.ceil(labs / labs_per_system_node(machine_type)))


def system_slot(machine_type: str, shared: bool) -> tuple[float, int]:
    """(cores, bytes): the most the scheduler or Jupyter of one lab may request or be limited to on a system node.
    A lab's share of a node is its allocatable divided among the labs the pool packs on it (labs_per_system_node in
    a class's shared cluster, the lab alone in its own); each of its two components gets half. The limits of all the
    labs a node was sized for then add up to at most its allocatable, so no lab can take another's share."""
    cpu, mem_gib = MACHINE_TYPES[machine_type]
    labs = labs_per_system_node(machine_type) if shared else 1
    cores = (cpu - NODE_RESERVED_CPU) / labs / 2
    mib = (mem_gib - NODE_RESERVED_MEMORY_GIB) * 1024 / labs / 2
    return math.floor(cores * 1000) / 1000, int(mib) * 2**20


def build_system_resources(resources, default: dict, slot: tuple[float, int]) -> dict:
    """A system component's container resources (cores and bytes) from what its chart values ask (`resources`:
    requests and/or limits, as written), within `slot` (system_slot). A request missing takes its limit (as
    Kubernetes does), else `default`. Memory is limited to its request unless a limit is asked (never evicted for
    using more than it asked, nor using others' memory: Guaranteed for memory); CPU is limited to the slot unless
    a limit is asked: CPU is compressible, a container over its request only borrows idle CPU (its neighbours' CFS
    shares follow their requests) and the slot bounds the burst. Every quantity is capped at the slot, and a
    request at its limit."""
    resources = resources if isinstance(resources, dict) else {}
    asked = {kind: resources.get(kind) if isinstance(resources.get(kind), dict) else {}
             for kind in ("requests", "limits")}
    out = {}
    for key, parse, cap in (("cpu", parse_cpu, slot[0]), ("memory", parse_memory, slot[1])):
        given = {kind: parse(asked[kind][key]) for kind in asked if asked[kind].get(key) is not None}
        request = given.get("requests", given.get("limits", parse(default[key])))
        limit = min(cap, given.get("limits", cap if key == "cpu" else request))
        out[key] = (min(request, limit), limit)
    return {"requests": {k: v[0] for k, v in out.items()}, "limits": {k: v[1] for k, v in out.items()}}


def estimate_cost(spec: LabSpec, lifetime_s: float, node_seconds: float) -> float:
    """Estimated USD for a lab: for its lifetime, the cluster fee and the system pool (a shared lab: its share of
    the class cluster's), plus its worker nodes."""
    share = 1 / spec.class_size if spec.placement == SHARED and spec.class_size > 1 else 1
    return round((CLUSTER_FEE_PER_HOUR * share + spec.system_usd_h) * lifetime_s / 3600  # to the micro-dollar: a
                 + node_hour_usd(spec.machine_type, spec.spot) * node_seconds / 3600, 6)  # minute's fee is $0.00002


def nodes_per_zone(nodes: int, zones: int) -> int:
    """Node pool sizes are per zone: enough in each zone for `nodes` in all."""
    return math.ceil(nodes / max(1, zones))


def build_system_pool_size(students: int, shared: bool, machine_type: str, per_zone: int, zones: int) -> int:
    """The system pool's nodes per zone: `per_zone` for a lab of its own; a class's shared cluster, enough for
    every student's scheduler and Jupyter (at least that)."""
    if not shared:
        return per_zone
    return max(per_zone, nodes_per_zone(system_nodes_for(students, machine_type), zones))


def system_pool_usd_h(students: int, shared: bool, machine_type: str, nodes_per_zone: int, zones: int) -> float:
    """A lab's hourly share of its cluster's system pool, sized as the GKE adapter creates it: a lab of its own
    pays its pool; a shared lab, 1/students of the class's pool."""
    nodes = build_system_pool_size(students, shared, machine_type, nodes_per_zone, zones) * zones
    return round(nodes * node_hour_usd(machine_type) / (max(1, students) if shared else 1), 6)


def placement_cost(placement: str, students: int, hours: float, workers: int, spec_machine: str = "e2-standard-4",
               system_machine: str = "e2-standard-4", workers_per_node: int = 3,
               system_nodes_per_cluster: int = 1) -> dict:
    """What a class costs in each placement, by part: control-plane fees, system nodes, worker nodes (USD).
    Own: a cluster per student, each with its system node(s) and its workers' nodes. Shared: one cluster, its
    system pool sized for every student's scheduler and Jupyter, the worker pool for the sum of their workers."""
    node = node_hour_usd(spec_machine)
    if placement == OWN:
        clusters, system = students, students * system_nodes_per_cluster
        worker_nodes = students * math.ceil(workers / workers_per_node)
    else:
        clusters, system = 1, max(system_nodes_per_cluster, system_nodes_for(students, system_machine))
        worker_nodes = math.ceil(students * workers / workers_per_node)
    parts = {"clusters": clusters, "system_nodes": system, "worker_nodes": worker_nodes,
             "control_plane_usd": round(clusters * CLUSTER_FEE_PER_HOUR * hours, 2),
             "system_nodes_usd": round(system * node_hour_usd(system_machine) * hours, 2),
             "worker_nodes_usd": round(worker_nodes * node * hours, 2)}
    parts["total_usd"] = round(parts["control_plane_usd"] + parts["system_nodes_usd"] + parts["worker_nodes_usd"], 2)
    return parts


if __name__ == "__main__":  # docs/deploy.md's "Placement of a class" table: 30 students × 3 h, 6 workers each
    for where in (OWN, SHARED):
        print(where, placement_cost(where, students=30, hours=3, workers=6))
