"""GKE backend, node surgery: the worker pool raised for the target, exactly the retired workers' pods and the nodes
they empty removed."""

from google.cloud import container_v1 as gke

from dasklab.core import logs
from dasklab.core.errors import PermanentError, StepRefused, TransientError
from dasklab.core.model import Lab, nodes_per_zone
from dasklab.adapters.release import POOL_LABEL, build_quota
from dasklab.adapters.compute import parse_mig
from dasklab.adapters.kube import DELETION_COST, Kube
from dasklab.adapters.gke.base import GkeBase, LOW_COST, Place, REMOVING_LABEL, Status, UP, ZONE_LABEL, place_of


class Nodes(GkeBase):
    """Workers and the nodes under them."""

    def fetch_requested(self, lab: Lab) -> int:
        place = place_of(lab)
        return self._kube(place).replicas(place.namespace, place.workers) or 0

    def _worker_pool(self, cluster: gke.Cluster):
        pool = next((p for p in cluster.node_pools if p.name == self.config.worker_pool), None)
        if pool is None:
            raise PermanentError(f"cluster {cluster.name} has no node pool {self.config.worker_pool}")
        return pool

    def _nodes_needed(self, lab: Lab, target: int, kube: Kube) -> int:
        """Worker nodes the pool needs for the workers of every lab in it, packed together."""
        return lab.spec.nodes_for(sum(self._class_targets(lab, target, kube).values()))

    def _ensure_nodes(self, lab: Lab, cluster: gke.Cluster, workers: int, why: str) -> None:
        """Room in the worker pool for `workers` pods of this lab (and, in a shared cluster, the other labs'
        targets): its size raised per zone, never lowering a zone (a lower count would let GKE remove nodes at
        random); TransientError while another operation runs on the cluster."""
        place = place_of(lab)
        pool = self._worker_pool(cluster)
        sizes = self.migs.target_sizes(list(pool.instance_group_urls))
        nodes = self._nodes_needed(lab, workers, self._kube(place, cluster))
        need = nodes_per_zone(nodes, len(sizes))
        if sizes and sum(sizes.values()) < nodes:  # zones may differ after chosen removals
            pending, _ = self._operations(cluster)
            if pending:
                raise TransientError(f"operation {pending[0].name} runs on cluster {cluster.name}: resize later")
            count = max(need, *sizes.values())
            resize = gke.SetNodePoolSizeRequest(name=f"{self._path(place)}/nodePools/{pool.name}", node_count=count)
            self._gcall(f"resize pool {pool.name}", self.clusters.set_node_pool_size, request=resize)
            logs.emit("INFO", lab=lab.name, action="resize-pool", **{"from": sizes, "to": count},
                      reason=f"{why}: {workers} workers need {need} node(s) per zone")

    def apply_workers(self, lab: Lab, target: int) -> None:
        """Nodes first (per zone, never lowering a zone), then the Deployment's replicas."""
        place = place_of(lab)
        cluster = self._running(place)
        self._ensure_nodes(lab, cluster, target, f"a target of {target}")
        kube = self._kube(place, cluster)
        replicas = kube.replicas(place.namespace, place.workers)
        if replicas is None:
            raise TransientError(f"lab {lab.name}: no worker Deployment yet")
        if replicas < target:
            if place.shared and kube.ensure_quota(build_quota(lab.spec, self._release(lab).values, place.namespace)):
                logs.emit("INFO", lab=lab.name, action="resize-quota", reason=f"quota for at most "
                          f"{lab.spec.max_workers} workers of {lab.spec.worker_cpu} CPU / {lab.spec.worker_memory} B")
            kube.scale(place.namespace, place.workers, target)

    def apply_scale_down(self, lab: Lab, addresses: list[str], target: int) -> None:
        place = place_of(lab)
        cluster = self._running(place)
        kube, dashboard = self._kube(place, cluster), self.dashboard(lab)
        names = {w.address: w.name for w in dashboard.fetch_workers()}
        retiring = {names[a] for a in addresses if a in names}
        pods = kube.pods_of(place.namespace, place.workers)
        for pod in pods:  # exactly the retired workers' pods are cheap to delete (stale marks are cleared)
            want = str(LOW_COST) if pod.metadata.name in retiring else None
            if (pod.metadata.annotations or {}).get(DELETION_COST) != want:
                kube.set_deletion_cost(place.namespace, pod.metadata.name, want and LOW_COST)
        # the scheduler moves their results to the survivors first; a worker it did not retire keeps its pod
        retired = {names[a] for a in dashboard.apply_retire(addresses) if a in names}
        for name in sorted(retiring - retired):
            kube.set_deletion_cost(place.namespace, name, None)
        target, retiring = target + len(retiring - retired), retired
        on_node: dict[str, set[str]] = {}
        for pod in pods:
            on_node.setdefault(pod.spec.node_name or "", set()).add(pod.metadata.name)
        emptied = sorted(n for n, held in on_node.items() if n and held <= retiring
                         and not (place.shared and self._others_on(kube, n, place)))
        for node in emptied:  # cordoned and marked before the pods go, so a crash cannot lose track of them
            kube.cordon(node, {REMOVING_LABEL: place.namespace})
        kube.scale(place.namespace, place.workers, target)
        survivors = {p.metadata.name for p in kube.pods_of(place.namespace, place.workers)}
        if survivors & retiring or len(survivors) != target:
            logs.emit("WARNING", lab=lab.name, action="retire", reason="the ReplicaSet kept pods of retired workers",
                      workers=sorted(survivors & retiring))
        self._remove_marked_nodes(lab, cluster, kube)

    def apply_settle(self, lab: Lab) -> None:
        """Between scaling decisions: follow a pool operation in flight, finish an interrupted node removal, and
        remove worker nodes left empty beyond what the target needs (an upgrade replaced a node marked for removal
        under a new name, or a regional pool has a node in every zone). Nothing is removed while an operation GKE
        or we started changes the pool. The cluster as listed in this pass will do (no GKE call at rest)."""
        place = place_of(lab)
        cluster = self._seen(place) or self._get(place)
        if cluster is None or cluster.status not in UP:
            return
        if cluster.status != Status.RUNNING or any(pool.status != gke.NodePool.Status.RUNNING
                                                   for pool in cluster.node_pools):
            if self._operations(cluster)[0]:
                return  # GKE replaces or resizes nodes now: their names are not settled yet
            cluster = self._get(place) or cluster
        kube = self._kube(place, cluster)
        nodes = kube.nodes(f"{POOL_LABEL}={self.config.worker_pool}")  # one call at rest
        if self._mark_excess_nodes(lab, cluster, kube, nodes):
            nodes = kube.nodes(f"{POOL_LABEL}={self.config.worker_pool}")
        self._remove_marked_nodes(lab, cluster, kube, nodes)

    def _mark_excess_nodes(self, lab: Lab, cluster: gke.Cluster, kube: Kube, nodes: list) -> bool:
        """Cordon and mark the empty worker nodes beyond `nodes_for(target)`, once every worker of the target runs.
        The pool's instance groups say how many nodes there are (Node objects lag behind an upgrade's changes), and
        only nodes of its current groups are candidates. True if it marked any."""
        place = place_of(lab)
        target = lab.state.target_workers
        unmarked = [n for n in nodes if REMOVING_LABEL not in (n.metadata.labels or {})]
        targets = self._class_targets(lab, target, kube)
        needed = lab.spec.nodes_for(sum(targets.values()))
        excess = len(unmarked) - needed
        if excess <= 0:
            return False
        if place.shared and (lab.name != min(targets) or any(not self._daemon(p) for p in kube.pods_on(""))):
            return False  # one lab of the class trims the shared pool, and not while any pod waits for a node
        pods = kube.pods_of(place.namespace, place.workers)
        if kube.replicas(place.namespace, place.workers) != target or len(pods) != target \
                or any(not p.spec.node_name for p in pods):
            return False  # workers still come or go: a node that looks empty may be about to get one
        urls = list(self._worker_pool(cluster).instance_group_urls)
        excess = min(excess, sum(self.migs.target_sizes(urls).values()) - needed)
        if excess <= 0:
            return False
        busy = {p.spec.node_name for p in pods}
        empty = sorted(n.metadata.name for n in unmarked if n.metadata.name not in busy
                       and any(n.metadata.name.startswith(parse_mig(u)[2].removesuffix("-grp") + "-") for u in urls)
                       and not any(not self._daemon(p) for p in kube.pods_on(n.metadata.name)))[:excess]
        for name in empty:
            kube.cordon(name, {REMOVING_LABEL: place.namespace})
            logs.emit("INFO", lab=lab.name, action="mark-node", node=name,
                      reason=f"empty, and {len(unmarked)} worker nodes are more than {target} workers need")
        return bool(empty)

    @staticmethod
    def _daemon(pod) -> bool:
        return any(ref.kind == "DaemonSet" for ref in pod.metadata.owner_references or ())

    def _others_on(self, kube: Kube, node: str, place: Place) -> list:
        """Pods on the node that are not DaemonSets' nor of this lab (in a shared pool: other students')."""
        return [p for p in kube.pods_on(node) if not self._daemon(p) and p.metadata.namespace != place.namespace]

    @staticmethod
    def _group_of(node: str, zone: str, urls: list[str]) -> str | None:
        """The instance group a node belongs to: one of its zone's (two per zone during a blue-green upgrade), whose
        name without -grp begins the node's name (GKE names instances <group base>-<suffix>)."""
        mine = [u for u in urls if parse_mig(u)[1] == zone]
        return next((u for u in mine if node.startswith(parse_mig(u)[2].removesuffix("-grp") + "-")),
                    mine[0] if len(mine) == 1 else None)

    def _remove_marked_nodes(self, lab: Lab, cluster: gke.Cluster, kube: Kube, nodes: list | None = None) -> None:
        """Delete the instances of the nodes this lab marked, once no worker of it runs there. A marked node no
        group holds any more (an upgrade replaced it) is forgotten: the settle pass trims its replacement."""
        place = place_of(lab)
        if nodes is None:
            marked = kube.nodes(f"{POOL_LABEL}={self.config.worker_pool},{REMOVING_LABEL}={place.namespace}")
        else:
            marked = [n for n in nodes if (n.metadata.labels or {}).get(REMOVING_LABEL) == place.namespace]
        if not marked:
            return
        pool = self._worker_pool(cluster)
        if pool.status != gke.NodePool.Status.RUNNING:
            return  # an operation changes the pool's groups: after it
        busy = {p.spec.node_name for p in kube.pods_of(place.namespace, place.workers)}
        urls = list(pool.instance_group_urls)
        by_group: dict[str, list[str]] = {}
        unplaced: list[str] = []
        for node in marked:
            name = node.metadata.name
            if name in busy or (place.shared and self._others_on(kube, name, place)):
                # a scale-down was interrupted and its workers came back, or another student's pod runs there
                # (a shared pool removes only nodes that are empty): keep the node
                kube.cordon(name, {REMOVING_LABEL: None}, unschedulable=False)
                continue
            for pod in kube.pods_on(name):  # DaemonSet pods go with the node; anything else moves first
                if not self._daemon(pod):
                    kube.evict(pod.metadata.namespace, pod.metadata.name)
            url = self._group_of(name, node.metadata.labels.get(ZONE_LABEL, ""), urls)
            if url is None:  # cannot be deleted by name: it stays cordoned, the others go, the lab says why
                unplaced.append(f"{name} (zone {node.metadata.labels.get(ZONE_LABEL, '')!r})")
                continue
            by_group.setdefault(url, []).append(name)
        for url, names in sorted(by_group.items()):
            self.migs.delete_instances(url, names)
            logs.emit("INFO", lab=lab.name, action="remove-nodes", nodes=names, zone=parse_mig(url)[1],
                      reason="emptied by retirement: their instances deleted from the node pool's group")
        if unplaced:
            raise StepRefused(f"node(s) {', '.join(unplaced)} in no instance group of pool {self.config.worker_pool}: "
                              "kept cordoned, not deleted; tried again on a later pass")
