"""GKE backend, a class's shared cluster: pools sized for its labs together, and the cluster deleted only once
verifiably empty."""

from google.cloud import container_v1 as gke

from dasklab.core import logs
from dasklab.core.errors import TransientError
from dasklab.core.model import MANAGED_BY, TEARING_DOWN, Lab, nodes_per_zone, system_nodes_for
from dasklab.adapters.kube import Kube
from dasklab.adapters.gke.base import GkeBase, Place, Status, UP, place_of


class Tenancy(GkeBase):
    """A class's shared cluster."""

    def _class_targets(self, lab: Lab, target: int, kube: Kube) -> dict[str, int]:
        """Worker targets of the labs in the pool: this lab's `target`; in a shared cluster, the other labs' recorded
        targets too."""
        place = place_of(lab)
        if not place.shared:
            return {lab.name: target}
        labs, _ = self.records.fetch_records(place.class_name)
        return {**{other.name: other.state.target_workers for other in labs}, lab.name: target}

    def _grow_system_pool(self, lab: Lab, place: Place, kube: Kube) -> None:
        """A class cluster's system pool holds every lab's scheduler and Jupyter: raised when the class has grown
        past what it was created for (students added to the roster). Never lowered."""
        cluster = self._seen(place) or self._running(place)
        pool = next((p for p in cluster.node_pools if p.name == self.config.system_pool), None)
        if pool is None:
            return
        sizes = self.migs.target_sizes(list(pool.instance_group_urls))
        labs, unread = self.records.fetch_records(place.class_name)
        labs = len(labs) + len(unread)
        need = nodes_per_zone(system_nodes_for(labs, self.config.system_machine_type), len(sizes))
        if sizes and min(sizes.values()) < need:
            resize = gke.SetNodePoolSizeRequest(name=f"{self._path(place)}/nodePools/{pool.name}", node_count=need)
            self._gcall(f"resize pool {pool.name}", self.clusters.set_node_pool_size, request=resize)
            logs.emit("INFO", lab=lab.name, action="resize-pool", pool=pool.name, **{"from": sizes, "to": need},
                      reason=f"{labs} labs' schedulers and Jupyters need {need} system node(s) per zone")

    def _delete_from_class(self, lab: Lab, place: Place, cluster: gke.Cluster) -> bool:
        """A shared lab's teardown: its namespace goes (everything of its release in it); True if the class's
        cluster is then verifiably empty and goes too: no other lab of the class is recorded (but those tearing down
        whose namespace is no longer Active: two last labs deleted side by side, the second deletes the cluster), no
        other lab's namespace in it is Active, no record of the class is unreadable. A cluster that cannot be read
        (not running; its API not answering) is never deleted on the absence of evidence: TransientError, the
        teardown waits (GKE deletes an ERROR cluster itself)."""
        if cluster.status == Status.STOPPING:
            return False
        if cluster.status not in UP:
            raise TransientError(f"class cluster {place.cluster} is {cluster.status.name}: its labs cannot be read, "
                                 f"so it is not deleted for lab {lab.name}; waiting")
        kube = self._kube(place, cluster)
        others = self._others_in_class(kube, place, lab)  # read before anything goes: a failed read deletes nothing
        if others:
            kube.delete_namespace(place.namespace)
            others = self._others_in_class(kube, place, lab)  # again: another last lab may have gone meanwhile
        if others:
            logs.emit("INFO", lab=lab.name, action="delete-namespace", namespace=place.namespace,
                      reason=f"class cluster {place.cluster} kept: {len(others)} other lab(s) in it")
            return False
        logs.emit("INFO", lab=lab.name, action="delete-class-cluster", cluster=place.cluster,
                  reason=f"the last lab of class {place.class_name} is gone: its cluster goes (its namespace with it)")
        return True

    def _others_in_class(self, kube: Kube, place: Place, lab: Lab) -> list[str]:
        """The other labs of a class's cluster: their records (an unreadable one counts) and their Active namespaces
        in it. Raises (TransientError) when either cannot be read."""
        labs, unread = self.records.fetch_records(place.class_name)
        recorded = {other.name for other in labs if other.name != lab.name and (
            other.state.phase != TEARING_DOWN or kube.namespace_phase(place_of(other).namespace) == "Active")}
        selector = f"managed-by={MANAGED_BY},class={place.class_name}"
        active = {ns for ns, phase in kube.namespaces(selector).items() if phase != "Terminating"} - {place.namespace}
        return sorted(recorded | {name for name in unread if name != lab.name} | active)
