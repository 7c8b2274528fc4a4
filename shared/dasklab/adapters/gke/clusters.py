"""GKE backend, cluster lifecycle: create (its record first), provision, observe (statuses as GKE documents them),
delete, and how a person connects."""

from google.api_core import exceptions as gexc
from google.cloud import container_v1 as gke

from dasklab.core.config import check_node_service_account, region_of
from dasklab.core.errors import Gone, PermanentError, TransientError
from dasklab.core.model import INSTALLING, PROVISIONING, REQUESTED, TEARING_DOWN, Lab, build_system_pool_size, \
    nodes_per_zone
from dasklab.core.policy import Infra
from dasklab.core.quotas import CLUSTERS, GKE_CLUSTER_LIMIT, Quota
from dasklab.adapters.release import build_namespace
from dasklab.adapters.googleapi import translate as _translate  # GKE's refusals → ours: the table shared with Compute
from dasklab.adapters.gke.base import CLOUD_PLATFORM, DISK_TYPE, GkeBase, Place, Status, UP, build_labels, \
    build_maintenance_policy, encode_description, place_of


class Clusters(GkeBase):
    """A lab's cluster, from creation to deletion."""

    def _zones(self) -> list[str]:
        return [z.strip() for z in self.config.node_zones.split(",") if z.strip()]

    def apply_create(self, lab: Lab) -> bool:
        """Record the lab (create = compare-and-swap: False if it exists), then create its cluster; a refused
        creation drops the record again (the refusal is reported by the caller, once). A shared lab: the first of
        its class creates the class's cluster; the others, once it runs, get their namespace and their record
        (TransientError until then: the class step retries them)."""
        place = place_of(lab)
        if place.shared:
            cluster = self._get(place)
            if cluster is not None:
                self._check_managed(cluster)
                if cluster.resource_labels.get("class") != place.class_name:
                    raise PermanentError(f"cluster {cluster.name} is not the shared cluster of class "
                                         f"{place.class_name}")
                if cluster.status not in UP:
                    raise TransientError(f"class cluster {cluster.name} is {cluster.status.name}: lab {lab.name} is "
                                         "created in it once it runs")
                self._kube(place, cluster).create(build_namespace(place.namespace, lab.name, place.class_name))
                return self.records.apply_create(lab) is not None
        recorded = self.records.apply_create(lab)
        if recorded is None:
            return False
        try:
            created = self._create_cluster(lab, place)
        except PermanentError:
            self.records.apply_forget(recorded)
            raise
        if not created and place.shared:  # created meanwhile by another lab of the class: this lab goes in once it runs
            self.records.apply_forget(recorded)
            raise TransientError(f"class cluster {place.cluster} created concurrently: retrying {lab.name}")
        return True

    def _create_cluster(self, lab: Lab, place: Place) -> bool:
        """Create the lab's (or its class's) cluster. No pod gets the nodes' credentials: the nodes run as their own
        account (check_node_service_account), never the Compute Engine default; Workload Identity is on and every
        pool runs the GKE metadata server, which serves pods no node credentials
        (cloud.google.com/kubernetes-engine/docs/how-to/workload-identity); Dataplane V2 enforces the labs'
        NetworkPolicies with no separate setting (cloud.google.com/kubernetes-engine/docs/concepts/dataplane-v2)."""
        cfg, spec = self.config, lab.spec
        account = check_node_service_account(cfg)
        zones = self._zones()
        zone_count = cfg.zone_count
        off = gke.NodePoolAutoscaling(enabled=False)  # the controller sizes the pools

        def node_config(machine_type: str, **more) -> gke.NodeConfig:  # with its own account, access is IAM's
            return gke.NodeConfig(machine_type=machine_type, disk_type=DISK_TYPE, disk_size_gb=cfg.node_disk_gb,
                                  service_account=account,
                                  oauth_scopes=[CLOUD_PLATFORM], workload_metadata_config=gke.WorkloadMetadataConfig(
                                      mode=gke.WorkloadMetadataConfig.Mode.GKE_METADATA), **more)

        # a class's cluster: system nodes for every student's scheduler and Jupyter, worker nodes for their initial
        # workers
        students = max(1, spec.class_size) if place.shared else 1
        system = build_system_pool_size(students, place.shared, cfg.system_machine_type, cfg.system_nodes, zone_count)
        cluster = gke.Cluster(
            name=place.cluster, description=encode_description(lab),
            network_config=gke.NetworkConfig(datapath_provider=gke.DatapathProvider.ADVANCED_DATAPATH),
            workload_identity_config=gke.WorkloadIdentityConfig(workload_pool=f"{cfg.project}.svc.id.goog"),
            resource_labels=build_labels(lab), locations=zones, maintenance_policy=build_maintenance_policy(lab),
            node_pools=[
                gke.NodePool(name=cfg.system_pool, initial_node_count=system, autoscaling=off,
                             config=node_config(cfg.system_machine_type)),
                gke.NodePool(name=cfg.worker_pool, autoscaling=off,
                             initial_node_count=nodes_per_zone(spec.nodes_for(lab.state.target_workers * students),
                                                               zone_count),
                             config=node_config(spec.machine_type, spot=spec.spot)),
            ])
        try:
            self.clusters.create_cluster(parent=self.parent, cluster=cluster)
        except gexc.AlreadyExists:
            return False
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"create cluster {cluster.name}") from e
        return True

    def fetch_quotas(self) -> dict[str, Quota] | None:
        """The quotas the labs count against: the region's (Compute regions.get) and GKE's cluster limit in the
        labs' location (every cluster there counts, dasklab's or not); None when no Compute client is set."""
        if self.regions is None:
            return None
        quotas = self.regions.fetch_quotas(self.config.project, region_of(self.config.location))
        listing = self._gcall("list clusters", self.clusters.list_clusters, parent=self.parent)
        quotas[CLUSTERS] = Quota(GKE_CLUSTER_LIMIT, len(listing.clusters))
        return quotas

    def apply_provision(self, lab: Lab) -> None:
        """(Re)create the lab's cluster (its record exists): a crash came between the two, or the class's cluster
        is gone."""
        self._create_cluster(lab, place_of(lab))

    def fetch_infra(self, lab: Lab) -> Infra:
        place = place_of(lab)
        cluster = self._get(place)
        if cluster is None:
            failed = lab.state.phase in (REQUESTED, PROVISIONING, INSTALLING) and \
                self._failed_creation(place, lab.state.created_at)
            return Infra("error", detail=f"{failed} (GKE removed the cluster)") if failed else Infra("absent")
        pending, error = self._operations(cluster)
        cluster = self._get(place)
        if cluster is None:
            return Infra("absent")
        if cluster.status == Status.PROVISIONING:
            return Infra("creating", detail="cluster being created" + (
                f" (operation {pending[0].name} {pending[0].status.name})" if pending else ""))
        if cluster.status == Status.STOPPING:
            return Infra("deleting")
        if cluster.status == Status.ERROR:
            return Infra("error", detail=cluster.status_message or error or f"cluster {cluster.status.name}")
        if cluster.status not in UP:
            return Infra("creating", detail=f"cluster {cluster.status.name}")
        if place.shared and lab.state.phase == TEARING_DOWN:  # the lab is its namespace: the cluster stays
            phase = self._kube(place, cluster).namespace_phase(place.namespace)
            if phase == "Terminating":
                return Infra("deleting", detail=f"namespace {place.namespace} being deleted")
            if phase is None:
                return Infra("absent")
        release, detail = self._release_state(lab, cluster)
        note = self._cluster_note(cluster)
        return Infra("running", release, "; ".join(d for d in (note, detail) if d))

    @staticmethod
    def _cluster_note(cluster: gke.Cluster | None) -> str:
        """What a running cluster that is not plainly RUNNING says (DEGRADED, RECONCILING: its status message)."""
        if cluster is None or cluster.status == Status.RUNNING or cluster.status not in UP:
            return ""
        return f"cluster {cluster.status.name}" + (f": {cluster.status_message}" if cluster.status_message else "")

    def apply_delete(self, lab: Lab) -> None:
        """Delete the cluster (NotFound = done; GKE refuses while another operation runs → TransientError).
        The public Jupyter load balancer goes first: its forwarding rule would outlive the cluster."""
        place = place_of(lab)
        cluster = self._get(place)
        if cluster is None:
            return
        self._check_managed(cluster)
        if lab.spec.public_source_ranges and cluster.status in UP:
            self._kube(place, cluster).delete_service(place.namespace, f"{place.fullname}-jupyter-public")
        try:
            if place.shared and not self._delete_from_class(lab, place, cluster):
                return
        except Gone:  # the class's cluster went meanwhile: done
            return
        try:
            self.clusters.delete_cluster(name=self._path(place))
        except gexc.NotFound:
            return
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"delete cluster {place.cluster}") from e

    def connection_info(self, lab: Lab) -> dict:
        """Commands to reach the lab from a workstation with kubectl; the token is read from its Secret, never
        carried here."""
        place, cfg = place_of(lab), self.config
        ns, full = place.namespace, place.fullname
        info = {
            "cluster": place.cluster, "namespace": ns, "dask_version": lab.spec.dask_version or cfg.dask_version,
            "credentials": f"gcloud container clusters get-credentials {place.cluster} --location {cfg.location} "
                           f"--project {cfg.project}",
            "dashboard": f"kubectl -n {ns} port-forward svc/{full}-scheduler 8787:80  # then http://localhost:8787",
            "jupyter": f"kubectl -n {ns} port-forward svc/{full}-jupyter 8888:80  # then http://localhost:8888",
            "jupyter_token": f"kubectl -n {ns} get secret dasklab-jupyter-token -o jsonpath='{{.data.token}}' "
                             "| base64 -d",
            "scheduler": f"kubectl -n {ns} port-forward svc/{full}-scheduler 8786:8786  # then tcp://localhost:8786",
        }
        note = self._cluster_note(self._seen(place))  # as last read (the listing): no call here
        if note:
            info["cluster_status"] = note
        if lab.spec.public_source_ranges:
            info["jupyter_public"] = (f"kubectl -n {ns} get svc {full}-jupyter-public  # its EXTERNAL-IP, open to "
                                      f"{', '.join(lab.spec.public_source_ranges)}")
        return info
