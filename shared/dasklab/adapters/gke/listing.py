"""GKE backend, the lab records: the fleet's listing (Firestore records joined with ListClusters), one lab, its
compare-and-swap writes."""

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from google.cloud import container_v1 as gke

from dasklab.core import logs
from dasklab.core.errors import RecordUnreadable
from dasklab.core.model import MANAGED_BY, Lab
from dasklab.adapters.gke.base import GkeBase, Place, Status, place_of


class Listing(GkeBase):
    """The records of the labs."""

    def fetch_labs(self) -> list[Lab]:
        """Every lab record (one query) beside one ListClusters (the clusters' status; zones it could not reach are
        kept in `missing_zones`: the pass is incomplete). A record that cannot be read is left out and said in
        `unreadable` with its reason: the other labs go on. A record whose cluster is gone is still listed (a
        failed creation GKE removed: fetch_infra finds its operation's error)."""
        with ThreadPoolExecutor(max_workers=2) as calls:  # one listing of each, side by side
            clusters = calls.submit(self._gcall, "list clusters", self.clusters.list_clusters, parent=self.parent)
            records = calls.submit(self.records.fetch_records)
            listing, (labs, unread) = clusters.result(), records.result()
        self.missing_zones = tuple(listing.missing_zones)
        managed = {c.name: c for c in listing.clusters if c.resource_labels.get("managed-by") == MANAGED_BY}
        self._remember(*managed.values())  # others: never touched
        for name, reason in sorted(unread.items()):
            logs.emit("WARNING", lab=name, action="observe", reason=f"record unreadable, lab left alone: {reason}")
        self.unreadable = {("lab", name): RecordUnreadable(name, reason) for name, reason in unread.items()}
        known = {place_of(lab).cluster for lab in labs} | {place_of(name).cluster for name in unread}
        for name in sorted(n for n, c in managed.items() if n not in known and c.status != Status.STOPPING):
            if not self._is_class_cluster(managed[name]):  # (a class's cluster is kept for labs still to come)
                logs.emit("WARNING", lab=name, action="observe", reason=f"managed cluster {name} has no lab record "
                          "(created by a version that kept it on the cluster?): left alone; drain before upgrading")
        return [self._as_seen(lab, managed.get(place_of(lab).cluster)) for lab in labs]

    def fetch_lab(self, name: str) -> Lab | None:
        """Its record (RecordUnreadable if it cannot be read), None if it has none; PermanentError if a cluster of
        that name exists that dasklab does not manage."""
        lab = self.records.fetch_record(name)
        cluster = self._get(place_of(lab or name))
        if lab is None:
            if cluster is not None and not self._is_class_cluster(cluster):
                self._check_managed(cluster)
            return None
        return self._as_seen(lab, cluster)

    def apply_record(self, lab: Lab) -> Lab:
        return self.records.apply_record(lab)

    def apply_forget(self, lab: Lab) -> bool:
        """The record goes once the infrastructure is gone; False if another invocation forgot it first."""
        return self.records.apply_forget(lab)

    def _failed_creation(self, place: Place, since: float) -> str:
        """The error of the latest CREATE_CLUSTER operation of the cluster, if it failed after `since` (the lab's
        creation): GKE removes a cluster whose creation failed, and the operation is the evidence left."""
        ops = self._gcall("list operations", self.clusters.list_operations, parent=self.parent).operations
        mine = [o for o in ops if o.operation_type == gke.Operation.Type.CREATE_CLUSTER
                and o.target_link.endswith(f"/clusters/{place.cluster}") and o.start_time]
        if not mine:
            return ""
        op = max(mine, key=lambda o: o.start_time)
        started = datetime.fromisoformat(op.start_time.replace("Z", "+00:00")).timestamp()
        if op.status != gke.Operation.Status.DONE or not op.error.message or started < since - 300:
            return ""  # (300 s: GKE's clock and ours may differ a little)
        return f"operation {op.name}: {op.error.message}"
