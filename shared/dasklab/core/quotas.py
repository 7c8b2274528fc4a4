"""Policy, pure: what a start-lab, a start-class or a scale will need of the project's quotas (node vCPUs, boot disks,
external addresses, clusters) → plan_quota: it fits, it fits only at the current usage (a warning), or it is refused
naming the quota, its limit, its usage and the need."""

import math
from collections import Counter
from dataclasses import dataclass, replace

from dasklab.core.config import Config
from dasklab.core.model import MACHINE_TYPES, NODE_DISK_TYPE, PROVISIONING, REQUESTED, SHARED, TEARING_DOWN, Lab, \
    LabSpec, build_system_pool_size, machine_family, nodes_per_zone

# The regional Compute Engine quota a machine family's vCPUs count against (cloud.google.com/compute/resource-usage,
# "CPU quota": E2 and N1 VMs count against CPUS; N2, C3 and the other newer families against their own, N2_CPUS,
# C3_CPUS …; metric names: the compute v1 `Quota.Metric` enum).
CPU_METRIC = {"e2": "CPUS", "n2": "N2_CPUS", "c3": "C3_CPUS"}
# Boot disks (same page, "Disk quota"): pd-standard counts against DISKS_TOTAL_GB, the SSD-backed pd-balanced and pd-ssd
# against SSD_TOTAL_GB.
DISK_METRIC = {"pd-standard": "DISKS_TOTAL_GB", "pd-balanced": "SSD_TOTAL_GB", "pd-ssd": "SSD_TOTAL_GB"}
# A node VM holds one external IPv4 address unless its cluster has private nodes (same page, "In-use IP addresses").
ADDRESSES = "IN_USE_ADDRESSES"
# Not a Compute quota: GKE's limit per project (cloud.google.com/kubernetes-engine/quotas, "Limits per project": 100
# zonal clusters per zone, plus 100 regional clusters per region; a system limit that cannot be raised).
CLUSTERS, GKE_CLUSTER_LIMIT = "GKE_CLUSTERS", 100
FIT, WARN, REFUSE = "fits", "warn", "refuse"


@dataclass(frozen=True)
class Quota:
    limit: float
    usage: float


@dataclass(frozen=True)
class QuotaRow:
    metric: str
    need: float
    limit: float | None  # None: the region did not report it (not checked)
    usage: float
    reserved: float  # what the labs already running may still take (up to their workers' maximum)
    verdict: str  # fits, warn, refuse

    @property
    def free(self) -> float:
        return (self.limit or 0.0) - self.usage


@dataclass(frozen=True)
class QuotaDecision:
    action: str  # fits, warn, refuse
    reason: str
    rows: tuple[QuotaRow, ...] = ()


def _nodes(machine_type: str, nodes: float, config: Config) -> Counter:
    """What `nodes` VMs of `machine_type` hold: vCPUs, a boot disk each (config.node_disk_gb), an address each."""
    cpu, _ = MACHINE_TYPES[machine_type]
    return Counter({CPU_METRIC[machine_family(machine_type)]: cpu * nodes, ADDRESSES: nodes,
                    DISK_METRIC[NODE_DISK_TYPE]: config.node_disk_gb * nodes})


def _worker_nodes(spec: LabSpec, workers: int, zones: int) -> float:
    """Worker nodes of `workers`: a pool of its own is sized per zone (every zone gets as many); in a class's shared
    pool, the lab's share of the nodes its class's workers pack into."""
    if spec.placement == SHARED:
        return workers / spec.workers_per_node
    return nodes_per_zone(spec.nodes_for(workers), zones) * zones


def build_need(specs: list[LabSpec], config: Config, new_cluster: bool = True) -> Counter:
    """What creating these labs (a start-lab's, or the labs a start-class adds) will hold at their workers' maximum:
    a lab of its own, a cluster with its system pool and its worker nodes; a class's shared labs, the class's cluster
    and system pool sized for its roster (`new_cluster`: it does not exist yet) and their share of its worker pool."""
    zones, need, shared = config.zone_count, Counter(), 0.0
    for spec in specs:
        if spec.placement == SHARED:
            shared += _worker_nodes(spec, spec.max_workers, zones)
            continue
        need[CLUSTERS] += 1
        need += _nodes(config.system_machine_type, config.system_nodes * zones, config)
        need += _nodes(spec.machine_type, _worker_nodes(spec, spec.max_workers, zones), config)
    if shared:
        spec = next(s for s in specs if s.placement == SHARED)
        need += _nodes(spec.machine_type, nodes_per_zone(math.ceil(shared), zones) * zones, config)
        if new_cluster:
            need[CLUSTERS] += 1
            need += _nodes(config.system_machine_type, build_system_pool_size(
                max(1, spec.class_size), True, config.system_machine_type, config.system_nodes, zones) * zones, config)
    return need


def build_scale_need(old: LabSpec, new: LabSpec, config: Config) -> Counter:
    """What raising a lab's maximum adds (the running labs' growth to their old maximum is in `reserved` already)."""
    extra = _worker_nodes(new, new.max_workers, config.zone_count) - _worker_nodes(old, old.max_workers,
                                                                                   config.zone_count)
    return _nodes(new.machine_type, math.ceil(extra), config) if extra > 0 else Counter()


def build_reserved(labs: list[Lab], config: Config) -> Counter:
    """What the labs that exist may still take beyond the current usage: their workers up to their maximum; a lab
    whose cluster is still being created, all its nodes (its VMs may not be counted yet)."""
    reserved = Counter()
    for lab in labs:
        if lab.state.phase == TEARING_DOWN:
            continue
        if lab.state.phase in (REQUESTED, PROVISIONING):  # (its cluster is listed from the start)
            reserved += build_need([lab.spec], config, new_cluster=False) - Counter({CLUSTERS: 1})
            continue
        grow = _worker_nodes(lab.spec, lab.spec.max_workers, config.zone_count) - _worker_nodes(
            lab.spec, lab.state.target_workers, config.zone_count)
        if grow > 0:
            reserved += _nodes(lab.spec.machine_type, grow, config)
    return reserved


def plan_quota(need: Counter | dict, quotas: dict[str, Quota], reserved: Counter | dict | None = None,
               where: str = "") -> QuotaDecision:
    """Each quota the need touches: refused if the need is above what is free now (limit − usage); a warning if it
    fits now but not beside what the running labs may still take (`reserved`: it fits only at the current usage);
    a quota the region does not report is not checked, and said. No quota reported at all (regions.get fails open
    when quota data is unavailable): a warning."""
    reserved = reserved or {}
    rows = []
    for metric in sorted(m for m, n in need.items() if n > 0):
        n, q, r = math.ceil(need[metric]), quotas.get(metric), math.ceil(reserved.get(metric, 0))
        if q is None:
            rows.append(QuotaRow(metric, n, None, 0.0, r, WARN))
            continue
        free = q.limit - q.usage
        verdict = REFUSE if n > free else WARN if n > free - r else FIT
        rows.append(QuotaRow(metric, n, q.limit, q.usage, r, verdict))
    at = f" in {where}" if where else ""
    short = [r for r in rows if r.verdict == REFUSE]
    if short:
        return QuotaDecision(REFUSE, "; ".join(
            f"{r.metric}{at}: limit {r.limit:g}, usage {r.usage:g}, this needs {r.need:g} (free {r.free:g})"
            for r in short) + ": raise the quota or ask for fewer workers, students or clusters", tuple(rows))
    if not set(quotas) - {CLUSTERS}:
        return QuotaDecision(WARN, f"quota: not checked, the region{at} reported no quotas", tuple(rows))
    tight = [r for r in rows if r.verdict == WARN]
    if tight:
        return QuotaDecision(WARN, "quota: " + "; ".join(
            f"{r.metric} not reported, not checked" if r.limit is None else
            f"{r.metric}{at} fits only at the current usage (limit {r.limit:g}, usage {r.usage:g}, this needs "
            f"{r.need:g}, the running labs may still take {r.reserved:g})" for r in tight), tuple(rows))
    return QuotaDecision(FIT, "quotas: every need fits" + (f" ({at.strip()})" if at else ""), tuple(rows))


def with_quota_note(spec: LabSpec, note: str) -> LabSpec:
    """The spec with its quota note (`quota: …`) replaced by `note` (none: left as it is)."""
    if not note:
        return spec
    return replace(spec, notes=tuple(n for n in spec.notes if not n.startswith("quota: ")) + (note,))


def build_quota_table(decision: QuotaDecision) -> str:
    """The decision as a table (the `dasklab quota` preflight)."""
    lines = [f"{'quota':<18}{'limit':>9}{'usage':>9}{'running may take':>18}{'this needs':>12}  verdict"]
    for r in decision.rows:
        limit = "?" if r.limit is None else f"{r.limit:g}"
        lines.append(f"{r.metric:<18}{limit:>9}{r.usage:>9g}{r.reserved:>18g}{r.need:>12g}  {r.verdict}")
    return "\n".join(lines + [decision.reason])
