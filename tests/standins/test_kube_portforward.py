"""Tests of the Kubernetes stand-in's pods/portforward over WebSocket, through the real client's
kubernetes.stream.portforward: the kubelet's v4 channel protocol, spliced to what the pod's Services reach, and RBAC
checked before the upgrade (get, and create since Kubernetes 1.35)."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client
from kubernetes.client import ApiException
from kubernetes.stream import portforward

from tests.standins.kube import KubeStandin
from tests.standins.test_kube_rbac import ADMIN, ANN, BOB, admin_rbac, as_user, binding, role

LABELS = {"app": "dask", "component": "jupyter"}


class Echo(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + 5))
        self.end_headers()
        self.wfile.write(b"echo:" + body)

    def log_message(self, *args):
        pass


@pytest.fixture
def kube():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with KubeStandin(ADMIN, nodes=("node-a",)) as standin:
            standin.add_user(ANN, "ann@example.edu")
            standin.add_user(BOB, "bob@example.edu")
            core = client.CoreV1Api(standin.api_client())
            core.create_namespace({"metadata": {"name": "lab-ann"}})
            core.create_namespaced_pod("lab-ann", {"metadata": {"name": "jupyter", "labels": LABELS}, "spec": {
                "containers": [{"name": "c", "image": "busybox", "ports": [{"name": "http", "containerPort": 8888}]}]}})
            core.create_namespaced_service("lab-ann", {"metadata": {"name": "jupyter"}, "spec": {
                "selector": LABELS, "ports": [{"port": 80, "targetPort": "http"}]}})
            standin.register_service_backend("lab-ann", "jupyter", 80, f"http://127.0.0.1:{server.server_port}")
            admin_rbac(standin).create_namespaced_role("lab-ann", role("connect", {
                "apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]}))
            admin_rbac(standin).create_namespaced_role_binding("lab-ann", binding("connect", "connect",
                                                                                  ("User", "ann@example.edu")))
            yield standin
    finally:
        server.shutdown()
        server.server_close()


def exchange(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_a_port_is_forwarded_over_websocket_to_what_the_pods_service_reaches(kube):
    ann = as_user(kube, ANN)
    forward = portforward(ann.connect_get_namespaced_pod_portforward, "jupyter", "lab-ann", ports="8888")
    # the client offers v5 and v4 of the channel protocol: the kubelet's port-forward serves v4
    assert forward.websocket.getheaders()["sec-websocket-protocol"] == "v4.channel.k8s.io"
    big = bytes(range(256)) * 1024  # more than one frame each way
    reply = exchange(forward.socket(8888), big)
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"echo:" + big)
    forward.close()
    assert forward.error(8888) is None


def test_a_port_nothing_listens_on_answers_on_its_error_channel(kube):
    forward = portforward(as_user(kube, ANN).connect_get_namespaced_pod_portforward, "jupyter", "lab-ann",
                          ports="9999")
    sock = forward.socket(9999)
    sock.settimeout(10)
    assert sock.recv(10) == b""  # the stream ends: the error channel closed it
    assert forward.error(9999).startswith("error forwarding port 9999 to pod jupyter, uid ")
    forward.close()


def test_the_upgrade_is_authorized_first_and_needs_create_as_well_as_get(kube):
    with pytest.raises(ApiException, match="403 Forbidden"):  # no rule at all
        portforward(as_user(kube, BOB).connect_get_namespaced_pod_portforward, "jupyter", "lab-ann", ports="8888")
    admin_rbac(kube).create_namespaced_role("lab-ann", role("get-only", {
        "apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get"]}))
    admin_rbac(kube).create_namespaced_role_binding("lab-ann", binding("get-only", "get-only",
                                                                       ("User", "bob@example.edu")))
    with pytest.raises(ApiException) as info:  # get alone: refused, with create named (Kubernetes 1.35)
        portforward(as_user(kube, BOB).connect_get_namespaced_pod_portforward, "jupyter", "lab-ann", ports="8888")
    assert 'cannot create resource \\"pods/portforward\\"' in str(info.value) or \
        'cannot create resource "pods/portforward"' in str(info.value)
    # a plain request, authorized, still asks for the upgrade
    with pytest.raises(ApiException) as info:
        as_user(kube, ANN).connect_post_namespaced_pod_portforward("jupyter", "lab-ann", ports="8888")
    assert info.value.status == 400 and info.value.body == "Upgrade request required"


def test_a_pod_without_a_node_cannot_be_forwarded_to(kube):
    kube.set_nodes(())
    client.CoreV1Api(kube.api_client()).create_namespaced_pod("lab-ann", {
        "metadata": {"name": "pending", "labels": LABELS}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    with pytest.raises(ApiException, match="pod pending does not have a host assigned"):
        portforward(as_user(kube, ANN).connect_get_namespaced_pod_portforward, "pending", "lab-ann", ports="8888")
