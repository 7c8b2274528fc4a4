"""GKE backend adapter: one Standard cluster per lab (container v1), its Kubernetes API (adapters.kube), the node
pool's instance groups (adapters.compute) and the official Dask Helm release installed by an in-cluster Job.

A class's labs with placement "shared" share their class's cluster instead (`place_of`): each lab is a namespace
there (release, token, ResourceQuota, NetworkPolicies; its record names the class), the worker pool is sized for the
class's labs together, a node is removed only when no other lab's pod runs on it, and the last lab's teardown deletes
the cluster.

Where a lab's record lives: in Firestore (adapters.records, injected as `records`), one document per lab holding its
spec and state (the chart values, env and notes included); `Lab.version` is that document's update time, and every
write is a compare-and-swap on it. The record is written before the cluster is created and outlives it: a creation
whose ERROR cluster GKE removed is still a lab, failed once from its CREATE_CLUSTER operation's error. A cluster's
resource labels say only whose it is (`managed-by`, `lab`, `owner`, and `class`/`placement` for a class): GKE copies
them onto the node VMs and disks (SetLabelsRequest), where they reach billing exports, so nothing a user wrote goes
there, and the controller never needs a cluster operation (SetLabels) to record a decision. Labs created by a
version that kept the record on the labels or in a ConfigMap are not read by this one: drain them before upgrading.

Workers: the release names each Dask worker after its pod, so worker → pod → node is exact. Scale-up raises the
worker pool (per zone, never lowering a zone) and the Deployment's replicas. Scale-down gives exactly the retired
workers' pods a low pod-deletion-cost, retires them through the scheduler (reached through the API server's
service proxy), cordons and marks the nodes they empty, lowers the replicas (the ReplicaSet deletes exactly those
pods) and deletes exactly the marked nodes' instances from the pool's managed instance groups; GKE never picks.
An update whose worker pod template changes replaces the workers gracefully (apply_update): the new pods start
beside the old ones (the pool grown for both), join the scheduler, then the old workers retire through it, so their
results move to the new ones, before Kubernetes deletes the old pods.
"""

import base64
import tempfile

from google.cloud import container_v1 as gke

from dasklab.core.config import Config
from dasklab.adapters.compute import Migs, Regions
from dasklab.adapters.gke.base import CLOUD_PLATFORM, Place, build_labels, build_maintenance_policy, class_cluster, \
    class_labels, encode_description, place_of
from dasklab.adapters.gke.clusters import Clusters
from dasklab.adapters.gke.helm import Helm, build_install_failure, pod_problems
from dasklab.adapters.gke.listing import Listing
from dasklab.adapters.gke.nodes import Nodes
from dasklab.adapters.gke.tenancy import Tenancy

__all__ = ["GkeBackend", "Place", "build_install_failure", "build_kube_for", "build_labels", "build_maintenance_policy", "class_cluster",
           "class_labels", "encode_description", "place_of", "pod_problems"]


class GkeBackend(Listing, Clusters, Helm, Nodes, Tenancy):
    """The Backend protocol on GKE, one role per module (the records, the cluster, the release, the nodes, a class's
    shared cluster). Clients are injected (tests: the stand-ins); `from_config` builds real ones."""

    installs_at_start = True  # the chart's images pip-install EXTRA_PIP_PACKAGES in their entrypoint

    @classmethod
    def from_config(cls, config: Config) -> "GkeBackend":
        """Real clients with the function's identity (google.auth.default)."""
        import google.auth

        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])

        def compute():
            from google.cloud import compute_v1
            return compute_v1.InstanceGroupManagersClient(credentials=credentials)

        def regions():
            from google.cloud import compute_v1
            return compute_v1.RegionsClient(credentials=credentials)

        from dasklab.adapters.records import FirestoreLabRecords
        return cls(config, gke.ClusterManagerClient(credentials=credentials), build_kube_for(credentials),
                   Migs(compute), FirestoreLabRecords(config.project, config.firestore_database),
                   regions=Regions(regions))


def build_kube_for(credentials):
    """cluster → a Kubernetes ApiClient with `credentials`' identity, without gcloud or a kubeconfig: the cluster's
    endpoint and CA certificate, and an OAuth access token (what GKE's API server takes as a bearer token) refreshed
    whenever it is no longer valid. One client per cluster endpoint."""
    import kubernetes.client
    from google.auth.transport.requests import Request

    apis: dict[tuple[str, str], kubernetes.client.ApiClient] = {}

    def kube_for(cluster: gke.Cluster):
        key = (cluster.name, cluster.endpoint)
        if key not in apis:
            with tempfile.NamedTemporaryFile("wb", suffix=".crt", delete=False) as ca:
                ca.write(base64.b64decode(cluster.master_auth.cluster_ca_certificate))
            conf = kubernetes.client.Configuration(host=f"https://{cluster.endpoint}")
            conf.ssl_ca_cert = ca.name
            apis[key] = kubernetes.client.ApiClient(conf)
        if not credentials.valid:
            credentials.refresh(Request())
        apis[key].configuration.api_key = {"authorization": f"Bearer {credentials.token}"}
        return apis[key]
    return kube_for
