"""`dasklab connect --lab LAB`: a student forwards local ports to their own lab's Jupyter and dashboard through the API
server (pods/portforward over WebSocket), with their own identity and no lab record; checked on the GKE test world
with a real Jupyter per lab: a kernel runs a cell through the forwarded port."""

import json
import os
import signal
import socket
import threading
import time
import urllib.request

import pytest
from google.cloud import container_v1 as gke

from dasklab.adapters.portforward import Forward, bind_local, open_stream
from dasklab.cli import main
from dasklab.cloud import connect
from dasklab.core.errors import NotAllowed, PermanentError, TransientError

from tests.gke_world import PROJECT, World
from tests.notebook import Notebook
from tests.test_student_access import STUDENTS, start_ready_class

pytestmark = pytest.mark.slow  # the slow tier: `pytest -m slow` (.ci/run runs both tiers)


def forwards(connections: bool = False) -> list[str]:
    """The forwards' listening threads alive (and their connections' threads, if asked)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("dasklab-forward")
            and (connections or not t.name.endswith("-conn"))]


def refused_to_connect(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_taken_port_moves_a_refused_stream_closes_its_connection_and_close_leaves_nothing_behind():
    held = bind_local(0)  # somebody else's listener, kept open

    def refused():
        raise TransientError("port-forward to ns/pod:8888: no answer")

    try:
        heard = []
        forward = Forward(refused, held.getsockname()[1], on_error=heard.append)
        assert forward.moved and forward.port != held.getsockname()[1]
        with socket.create_connection(("127.0.0.1", forward.port)) as client:
            client.settimeout(10)
            assert client.recv(1) == b""  # the stream could not open: the connection ends
        assert forward.errors == heard == ["port-forward to ns/pod:8888: no answer"]  # the command prints it
        forward.close()
        assert forwards(connections=True) == [] and refused_to_connect(forward.port)
    finally:
        held.close()


class Listing:
    """ClusterManagerClient.list_clusters only: what a student's roles/container.clusterViewer allows."""

    def __init__(self, *clusters, missing_zones=()):
        self.response = gke.ListClustersResponse(clusters=list(clusters), missing_zones=list(missing_zones))
        self.parents = []

    def list_clusters(self, parent):
        self.parents.append(parent)
        return self.response


def cluster(name, **labels):
    return gke.Cluster(name=name, resource_labels=labels, status=gke.Cluster.Status.RUNNING)


def test_the_lab_is_found_from_the_clusters_labels_alone():
    own = cluster("solo", **{"managed-by": "dasklab", "lab": "solo", "owner": "ann"})
    intro = cluster("intro--shared", **{"managed-by": "dasklab", "placement": "shared", "class": "intro"})
    intro_a = cluster("intro-a--shared", **{"managed-by": "dasklab", "placement": "shared", "class": "intro-a"})
    theirs = cluster("other", lab="other")  # not dasklab's
    listing = Listing(theirs, own, intro, intro_a)
    found, place = connect.fetch_lab_cluster(listing, "p", "solo")
    assert (found.name, place.cluster, place.namespace, place.fullname) == ("solo", "solo", "dasklab-solo",
                                                                            "solo-dask")
    assert listing.parents == ["projects/p/locations/-"]  # every location: a student need not know it
    found, place = connect.fetch_lab_cluster(listing, "p", "intro-ann")
    assert (found.name, place.namespace, place.class_name) == ("intro--shared", "dasklab-intro-ann", "intro")
    found, place = connect.fetch_lab_cluster(listing, "p", "intro-a-bob")  # the longest class name wins
    assert (found.name, place.namespace) == ("intro-a--shared", "dasklab-intro-a-bob")
    for lab in ("other", "nosuch"):
        with pytest.raises(PermanentError, match=f"no lab named '{lab}' among the clusters of project p: check"):
            connect.fetch_lab_cluster(listing, "p", lab)
    with pytest.raises(PermanentError, match="zones us-east1-b did not answer"):
        connect.fetch_lab_cluster(Listing(own, missing_zones=["us-east1-b"]), "p", "nosuch")


def test_three_students_each_connect_to_their_own_jupyter_and_to_no_other(tmp_path, firestore_env, monkeypatch,
                                                                          capsys):
    world, conns = World(tmp_path, jupyter=True), []
    try:
        start_ready_class(world, tmp_path)
        clusters = world.gke.client()  # a student lists clusters (roles/container.clusterViewer); no record is read

        def as_(who):
            return lambda cluster: world.kube.api_client(f"{who}-token")

        figures = []
        for student in STUDENTS:
            started = time.monotonic()
            conn = connect.open_connection(f"intro-{student}", PROJECT, clusters, as_(student), jupyter_port=0,
                                           dashboard_port=0)
            connected = time.monotonic() - started
            conns.append(conn)
            assert conn.token == world.token(f"dasklab-intro-{student}")
            assert conn.jupyter_url == f"http://127.0.0.1:{conn.jupyter.port}/lab?token={conn.token}"
            notebook = Notebook(f"http://127.0.0.1:{conn.jupyter.port}", conn.token)
            notebook.open()  # REST and the kernel's websocket channels, both through the forwarded port
            assert notebook.run("6*7") == "42"
            # her own lab's Jupyter: its kernels know her lab's scheduler
            assert notebook.run("import os; print(os.environ['DASK_SCHEDULER_ADDRESS'])") == \
                world.scheduler_address(f"dasklab-intro-{student}")
            forwarded = _round_trip(notebook)
            notebook.close()
            direct = Notebook(world.jupyter_url(f"dasklab-intro-{student}"), conn.token)
            direct.open()
            figures.append((student, connected, forwarded, _round_trip(direct)))
            direct.close()
            with urllib.request.urlopen(f"http://127.0.0.1:{conn.dashboard.port}/json/identity.json",
                                        timeout=30) as reply:  # the scheduler's dashboard, through its own forward
                assert json.loads(reply.read())["type"] == "Scheduler"
        with capsys.disabled():  # the figures, for the record (no bound is asserted)
            for student, connected, forwarded, direct in figures:
                print(f"{student}: connected in {connected:.2f} s; a cell's round trip {forwarded * 1000:.1f} ms "
                      f"through the forward, {direct * 1000:.1f} ms direct")

        # ann to bob's lab: refused before anything listens, with the rule
        with pytest.raises(NotAllowed) as info:
            connect.open_connection("intro-bob", PROJECT, clusters, as_("ann"), jupyter_port=0, dashboard_port=0)
        assert str(info.value) == ("lab intro-bob: ann@example.edu may not port-forward in dasklab-intro-bob: only "
                                   "the lab's student and its owner can")
        assert len(forwards()) == 2 * len(conns)  # the three students' listeners only
        # straight to bob's Jupyter pod with her own token: the API server refuses the upgrade
        bob_pod = world.kube.list("pods", "dasklab-intro-bob", "component=jupyter")[0]["metadata"]["name"]
        with pytest.raises(PermanentError, match='403.*User "ann@example.edu" cannot get resource "pods/portforward"'):
            open_stream(world.kube.api_client("ann-token"), "dasklab-intro-bob", bob_pod, 8888)
        # the owner helps: he connects to a student's lab
        prof = connect.open_connection("intro-cy", PROJECT, clusters, as_("prof"), jupyter_port=0, dashboard_port=0)
        conns.append(prof)
        helper = Notebook(f"http://127.0.0.1:{prof.jupyter.port}", prof.token)
        helper.open()
        assert helper.run("6*7") == "42"  # left open: its kernel's websocket is live when the forwards close
        assert connect.describe(prof, {"CLOUD_SHELL": "true"})[-2] == (
            f"Cloud Shell: Web preview → Preview on port {prof.jupyter.port} (Change port first), then add "
            f"/lab?token={prof.token} to the address it opens")

        # the command itself: refused with the rule (exit 2), then bob's forward until Ctrl-C
        monkeypatch.setattr(connect, "default_clients", lambda: (clusters, as_("ann")))
        for name in ("DASKLAB_PROJECT", "DASKLAB_REGION"):
            monkeypatch.setenv(name, "recorded")
            monkeypatch.delenv(name)
        assert main(["connect", "--lab", "intro-bob", "--project", PROJECT, "--port", "0"]) == 2
        assert "ann@example.edu may not port-forward in dasklab-intro-bob" in capsys.readouterr().err
        monkeypatch.setattr(connect, "default_clients", lambda: (clusters, as_("bob")))
        monkeypatch.setenv("CLOUD_SHELL", "true")
        opened = []
        real_open = connect.open_connection
        monkeypatch.setattr(connect, "open_connection", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[0])

        def student_at_the_browser():
            deadline = time.monotonic() + 60
            while not opened and time.monotonic() < deadline:
                time.sleep(0.05)
            notebook = Notebook(f"http://127.0.0.1:{opened[0].jupyter.port}", opened[0].token)
            notebook.open()
            opened.append(notebook.run("6*7"))
            notebook.close()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

        browser = threading.Thread(target=student_at_the_browser)
        browser.start()
        assert main(["connect", "--lab", "intro-bob", "--project", PROJECT, "--port", "0",
                     "--dashboard-port", "0"]) == 0
        browser.join()
        out = capsys.readouterr().out
        assert opened[1] == "42" and len(forwards()) == 2 * len(conns)  # bob's forwards closed on Ctrl-C
        assert f"Jupyter:   {opened[0].jupyter_url}" in out and "Web preview → Preview on port" in out
    finally:
        for conn in conns:
            conn.close()
        world.close()
    assert forwards(connections=True) == []


def _round_trip(notebook: Notebook) -> float:
    """The median of five cells' round trips (execute_request → reply and idle)."""
    times = []
    for _ in range(5):
        started = time.monotonic()
        notebook.run("1+1")
        times.append(time.monotonic() - started)
    return sorted(times)[2]
