"""What `dasklab connect --lab LAB` runs on the student's machine, with the student's own Google identity (no lab
record: a student may read none):

    fetch_lab_cluster (GKE listing: the clusters' labels) → the lab's token (its Secret) and the pods behind its
    Jupyter and dashboard Services (adapters.kube) → a local port forwarded to each (adapters.portforward)

A student needs only roles/container.clusterViewer in the project (list clusters, read their endpoint) and the
`dasklab-connect` Role in the lab's namespace (adapters.release.build_student_access).
"""

import os
import re
from dataclasses import dataclass, replace
from typing import Callable

from google.api_core import exceptions as gexc
from google.cloud import container_v1 as gke
from kubernetes.client import ApiClient

from dasklab.adapters.gke.base import CLOUD_PLATFORM, UP, Place, place_of
from dasklab.adapters.googleapi import translate
from dasklab.adapters.kube import Kube
from dasklab.adapters.portforward import Forward, open_stream
from dasklab.adapters.release import TOKEN_KEY, TOKEN_SECRET
from dasklab.core.errors import Gone, NotAllowed, PermanentError, TransientError
from dasklab.core.model import MANAGED_BY, SHARED

JUPYTER_PORT, DASHBOARD_PORT = 8080, 8787  # 8080: Cloud Shell's default web-preview port
SERVICE_PORT = 80  # the chart's Jupyter (→ 8888) and scheduler dashboard (→ 8787) Service port
_USER = re.compile(r'User "([^"]+)"')


def default_clients() -> tuple[gke.ClusterManagerClient, Callable[[gke.Cluster], ApiClient]]:
    """The caller's own Google identity (google.auth.default: gcloud's application-default login, Cloud Shell's
    account): a GKE client, and cluster → Kubernetes ApiClient (adapters.gke.build_kube_for)."""
    import google.auth
    from dasklab.adapters.gke import build_kube_for
    credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
    return gke.ClusterManagerClient(credentials=credentials), build_kube_for(credentials)


def fetch_lab_cluster(clusters: gke.ClusterManagerClient, project: str, lab: str) -> tuple[gke.Cluster, Place]:
    """The lab's cluster and place from one ListClusters over every location: a cluster of its own (labels
    managed-by and lab), else its class's shared cluster (placement shared, class = the longest class name the lab's
    name starts with, as `<class>-<student>`)."""
    try:
        listing = clusters.list_clusters(parent=f"projects/{project}/locations/-")
    except (gexc.GoogleAPICallError, gexc.RetryError) as e:
        raise translate(e, f"list the clusters of project {project}") from e
    managed = [c for c in listing.clusters if c.resource_labels.get("managed-by") == MANAGED_BY]
    place = place_of(lab)
    own = [c for c in managed if c.resource_labels.get("lab") == lab and c.resource_labels.get("placement") != SHARED]
    if own:
        return own[0], replace(place, cluster=own[0].name)
    shared = sorted((c for c in managed if c.resource_labels.get("placement") == SHARED
                     and lab.startswith(f"{c.resource_labels.get('class', '')}-")),
                    key=lambda c: len(c.resource_labels["class"]), reverse=True)
    if shared:
        return shared[0], replace(place, cluster=shared[0].name, class_name=shared[0].resource_labels["class"])
    missing = f" (zones {', '.join(listing.missing_zones)} did not answer)" if listing.missing_zones else ""
    raise PermanentError(f"no lab named {lab!r} among the clusters of project {project}{missing}: check its name "
                         "with your instructor")


def refusal(error: PermanentError, lab: str, namespace: str) -> PermanentError:
    """A 403 from the lab's namespace, said as the rule: only the lab's student and its owner are bound there."""
    if "403" not in str(error):
        return error
    who = _USER.search(str(error))
    return NotAllowed("lab", "only the lab's student and its owner can", f"lab {lab}: "
                      f"{who.group(1) if who else 'you'} may not port-forward in {namespace}")


@dataclass
class Connection:
    """The forwards of one lab: Jupyter's and the dashboard's local ports, and the URL to open."""

    lab: str
    place: Place
    token: str
    jupyter: Forward
    dashboard: Forward

    @property
    def jupyter_url(self) -> str:
        return f"http://127.0.0.1:{self.jupyter.port}/lab?token={self.token}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard.port}/status"

    def close(self) -> None:
        self.jupyter.close()
        self.dashboard.close()


def _opener(api_for: Callable[[], ApiClient], lab: str, namespace: str, service: str) -> Callable:
    """Opens a stream to a Ready pod behind the Service (found again when its pod went, e.g. restarted)."""
    found: dict[str, tuple[str, int]] = {}

    def open_() -> object:
        for _ in range(2):
            api = api_for()
            if "pod" not in found:
                try:
                    pod = Kube(api).fetch_service_pod(namespace, service, SERVICE_PORT)
                except PermanentError as e:
                    raise refusal(e, lab, namespace) from e
                if pod is None:
                    raise TransientError(f"lab {lab}: no Ready pod behind {service} yet")
                found["pod"] = pod
            try:
                return open_stream(api, namespace, *found["pod"])
            except Gone:
                found.clear()  # the pod went: find its successor once
            except PermanentError as e:
                raise refusal(e, lab, namespace) from e
        raise TransientError(f"lab {lab}: the pod behind {service} keeps going away")
    return open_


def open_connection(lab: str, project: str, clusters: gke.ClusterManagerClient,
                    kube_for: Callable[[gke.Cluster], ApiClient], *, jupyter_port: int = JUPYTER_PORT,
                    dashboard_port: int = DASHBOARD_PORT,
                    on_error: Callable[[str], None] = lambda error: None) -> Connection:
    """Find the lab, read its token, check a Jupyter pod is Ready, then listen on the two local ports (refusals are
    raised before anything listens). `kube_for(cluster)` gives an ApiClient with the caller's own identity (a fresh
    token whenever it is called). `on_error` hears what a connection's stream could not do, as it happens."""
    cluster, place = fetch_lab_cluster(clusters, project, lab)
    if cluster.status not in UP:
        raise TransientError(f"lab {lab}: its cluster {cluster.name} is {cluster.status.name}: try again shortly")
    ns, full = place.namespace, place.fullname
    try:
        token = Kube(kube_for(cluster)).read_secret(ns, TOKEN_SECRET, TOKEN_KEY)
    except PermanentError as e:
        raise refusal(e, lab, ns) from e
    if token is None:
        raise TransientError(f"lab {lab}: its Jupyter token is not there yet (the lab is still being installed)")
    jupyter = _opener(lambda: kube_for(cluster), lab, ns, f"{full}-jupyter")
    dashboard = _opener(lambda: kube_for(cluster), lab, ns, f"{full}-scheduler")
    jupyter().close(timeout=1)  # one stream now: a refusal or a missing pod is said here, not in the browser
    forwards: list[Forward] = []
    try:
        for opener, port in ((jupyter, jupyter_port), (dashboard, dashboard_port)):
            forwards.append(Forward(opener, port, on_error=on_error))
    except OSError:
        for forward in forwards:
            forward.close()
        raise
    return Connection(lab, place, token, *forwards)


def describe(conn: Connection, environ=os.environ) -> list[str]:
    """What to open, for a person: the URLs, and in Cloud Shell (CLOUD_SHELL=true) its web preview's port."""
    lines = [f"lab {conn.lab}: forwarding through the API server of cluster {conn.place.cluster} "
             f"(namespace {conn.place.namespace}), as you"]
    for name, forward in (("Jupyter", conn.jupyter), ("dashboard", conn.dashboard)):
        if forward.moved:
            lines.append(f"port {forward.wanted} is taken here: {name} is on port {forward.port} instead")
    lines += [f"Jupyter:   {conn.jupyter_url}", f"dashboard: {conn.dashboard_url}"]
    if environ.get("CLOUD_SHELL") == "true":
        change = "" if conn.jupyter.port == JUPYTER_PORT else " (Change port first)"
        lines.append(f"Cloud Shell: Web preview → Preview on port {conn.jupyter.port}{change}, then add "
                     f"/lab?token={conn.token} to the address it opens")
    lines.append("Ctrl-C stops the forwarding (your notebooks keep running in the lab)")
    return lines
