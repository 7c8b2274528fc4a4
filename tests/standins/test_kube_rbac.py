"""Tests of the Kubernetes stand-in's per-identity authorization: tokens map to users, RBAC decides each request as
the API server does (kubernetes.io/docs/reference/access-authn-authz/rbac/), through the real `kubernetes` client."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from tests.standins import rbac
from tests.standins.kube import KubeStandin

ADMIN, ANN, BOB, CAROL = "admin-token", "ann-token", "bob-token", "carol-token"
RBAC = "rbac.authorization.k8s.io"


@pytest.fixture
def kube():
    with KubeStandin(ADMIN, nodes=("node-a",)) as standin:
        standin.add_user(ANN, "ann@example.edu")
        standin.add_user(BOB, "bob@example.edu")
        standin.add_user(CAROL, "carol@example.edu", groups=("teachers@example.edu",))
        core = client.CoreV1Api(standin.api_client())
        for ns in ("lab-ann", "lab-bob"):
            core.create_namespace({"metadata": {"name": ns}})
            core.create_namespaced_secret(ns, {"metadata": {"name": "token"}, "stringData": {"token": ns}})
            core.create_namespaced_secret(ns, {"metadata": {"name": "other"}, "stringData": {"x": "y"}})
            core.create_namespaced_pod(ns, {"metadata": {"name": "jupyter"},
                                            "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
        yield standin


def as_user(kube, token):
    return client.CoreV1Api(kube.api_client(token))


def admin_rbac(kube):
    return client.RbacAuthorizationV1Api(kube.api_client())


def role(name, *rules):
    return {"metadata": {"name": name}, "rules": list(rules)}


def binding(name, role_name, *subjects, kind="Role"):
    return {"metadata": {"name": name}, "roleRef": {"apiGroup": RBAC, "kind": kind, "name": role_name},
            "subjects": [{"kind": k, "name": n, **({"apiGroup": RBAC} if k != "ServiceAccount" else {})}
                         for k, n in subjects]}


def refused(call, *args, **kwargs):
    with pytest.raises(ApiException) as info:
        call(*args, **kwargs)
    return info.value.status, json.loads(info.value.body) if info.value.body.startswith("{") else info.value.body


def grant_ann(kube):
    admin_rbac(kube).create_namespaced_role("lab-ann", role(
        "connect",
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["token"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]}))
    admin_rbac(kube).create_namespaced_role_binding("lab-ann", binding("connect", "connect", ("User",
                                                                                             "ann@example.edu")))


def test_every_request_is_denied_without_a_rule_with_the_api_servers_message(kube):
    ann = as_user(kube, ANN)
    status, body = refused(ann.read_namespaced_secret, "token", "lab-ann")
    assert status == 403 and body["reason"] == "Forbidden"
    assert body["message"] == ('secrets "token" is forbidden: User "ann@example.edu" cannot get resource "secrets" in '
                               'API group "" in the namespace "lab-ann"')
    assert body["details"] == {"name": "token", "kind": "secrets"}
    status, body = refused(ann.list_namespace)
    assert (status, body["message"]) == (403, 'namespaces is forbidden: User "ann@example.edu" cannot list resource '
                                              '"namespaces" in API group "" at the cluster scope')
    status, body = refused(client.AppsV1Api(kube.api_client(ANN)).list_namespaced_deployment, "lab-bob")
    assert body["message"] == ('deployments.apps is forbidden: User "ann@example.edu" cannot list resource '
                               '"deployments" in API group "apps" in the namespace "lab-bob"')
    # authorization comes before lookup: a missing object is 403 too, so a refused user learns nothing
    assert refused(ann.read_namespaced_secret, "nothing-here", "lab-bob")[0] == 403
    assert refused(as_user(kube, "no-such-token").list_namespace)[0] == 401
    # the controller's token keeps every right (system:masters → cluster-admin)
    assert len(as_user(kube, ADMIN).list_namespaced_secret("lab-bob").items) == 2


def test_a_role_grants_in_its_namespace_only_what_its_rules_name(kube):
    grant_ann(kube)
    ann = as_user(kube, ANN)
    assert ann.read_namespaced_secret("token", "lab-ann").data["token"]
    # resourceNames: that Secret only, and no list (a list has no name, so a named rule never matches it)
    status, body = refused(ann.read_namespaced_secret, "other", "lab-ann")
    assert status == 403 and 'secrets "other" is forbidden' in body["message"]
    assert refused(ann.list_namespaced_secret, "lab-ann")[0] == 403
    assert [p.metadata.name for p in ann.list_namespaced_pod("lab-ann").items] == ["jupyter"]
    # a Role is its namespace's: nothing in bob's
    assert refused(ann.read_namespaced_secret, "token", "lab-bob")[0] == 403
    assert refused(ann.list_namespaced_pod, "lab-bob")[0] == 403
    # pods does not cover pods/exec, nor the create of pods; pods/portforward is its own resource
    status, body = refused(ann.connect_post_namespaced_pod_exec, "jupyter", "lab-ann", command=["sh"])
    assert body["message"] == ('pods "jupyter" is forbidden: User "ann@example.edu" cannot create resource '
                               '"pods/exec" in API group "" in the namespace "lab-ann"')
    assert refused(ann.create_namespaced_pod, "lab-ann", {"metadata": {"name": "x"}, "spec": {
        "containers": [{"name": "c", "image": "busybox"}]}})[0] == 403
    # authorized to port-forward: the stand-in then wants an upgraded connection, as the API server does
    assert refused(ann.connect_post_namespaced_pod_portforward, "jupyter", "lab-ann", ports="8888") == \
        (400, "Upgrade request required")
    assert refused(ann.connect_post_namespaced_pod_portforward, "jupyter", "lab-bob", ports="8888")[0] == 403
    # bob is bound to nothing
    assert refused(as_user(kube, BOB).read_namespaced_secret, "token", "lab-ann")[0] == 403


def test_cluster_roles_apply_everywhere_through_cluster_bindings_and_in_one_namespace_through_role_bindings(kube):
    rb = admin_rbac(kube)
    rb.create_cluster_role(role("read-secrets", {"apiGroups": [""], "resources": ["secrets", "namespaces"],
                                                 "verbs": ["get", "list"]}))
    rb.create_namespaced_role_binding("lab-bob", binding("bob-reads", "read-secrets", ("User", "bob@example.edu"),
                                                         kind="ClusterRole"))
    bob = as_user(kube, BOB)
    assert len(bob.list_namespaced_secret("lab-bob").items) == 2
    assert refused(bob.list_namespaced_secret, "lab-ann")[0] == 403
    assert refused(bob.list_namespace)[0] == 403  # cluster-scoped: a RoleBinding never grants it
    assert bob.read_namespace("lab-bob").metadata.name == "lab-bob"  # a namespace is in its own namespace
    # a Group subject, through a ClusterRoleBinding: everywhere, cluster scope included
    rb.create_cluster_role_binding(binding("teachers", "read-secrets", ("Group", "teachers@example.edu"),
                                           kind="ClusterRole"))
    carol = as_user(kube, CAROL)
    assert {n.metadata.name for n in carol.list_namespace().items} >= {"lab-ann", "lab-bob"}
    assert len(carol.list_namespaced_secret("lab-ann").items) == 2
    assert refused(carol.delete_namespaced_secret, "token", "lab-ann")[0] == 403  # verbs are what is listed
    # a binding whose role does not exist (in its own namespace) grants nothing
    rb.create_namespaced_role_binding("lab-ann", binding("dangling", "connect", ("User", "bob@example.edu")))
    assert refused(bob.read_namespaced_secret, "token", "lab-ann")[0] == 403


def test_wildcards_and_subresources(kube):
    rb = admin_rbac(kube)
    rb.create_namespaced_role("lab-ann", role("all-pods", {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]},
                                              {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]}))
    rb.create_namespaced_role_binding("lab-ann", binding("ann", "all-pods", ("User", "ann@example.edu")))
    ann = as_user(kube, ANN)
    assert ann.read_namespaced_pod_status("jupyter", "lab-ann").metadata.name == "jupyter"
    assert refused(ann.read_namespaced_pod_log, "jupyter", "lab-ann")[0] == 403  # pods/log is not pods
    ann.delete_namespaced_pod("jupyter", "lab-ann")
    assert refused(ann.read_namespaced_secret, "token", "lab-ann")[0] == 403
    rb.create_namespaced_role("lab-bob", role("admin", {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}))
    rb.create_namespaced_role_binding("lab-bob", binding("ann", "admin", ("User", "ann@example.edu")))
    # `*` covers every subresource: authorized, then the upgrade is asked for
    assert refused(ann.connect_post_namespaced_pod_exec, "jupyter", "lab-bob", command=["sh"])[0] == 400
    assert refused(ann.list_namespace)[0] == 403


def test_service_proxy_is_authorized_by_method_as_services_proxy(kube):
    class Echo(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(self.path.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        admin = as_user(kube, ADMIN)
        for ns in ("lab-ann", "lab-bob"):
            admin.create_namespaced_service(ns, {"metadata": {"name": "jupyter"}, "spec": {
                "selector": {"app": "j"}, "ports": [{"port": 80}]}})
            kube.register_service_backend(ns, "jupyter", 80, f"http://127.0.0.1:{server.server_port}")
        admin_rbac(kube).create_namespaced_role("lab-ann", role("proxy", {"apiGroups": [""], "resources": [
            "services/proxy"], "verbs": ["get"]}))
        admin_rbac(kube).create_namespaced_role_binding("lab-ann", binding("p", "proxy", ("User", "ann@example.edu")))
        ann = as_user(kube, ANN)
        assert ann.connect_get_namespaced_service_proxy_with_path("jupyter:80", "lab-ann", "api/status") == \
            "/api/status"
        status, body = refused(ann.connect_post_namespaced_service_proxy_with_path, "jupyter:80", "lab-ann", "api")
        assert body["message"] == ('services "jupyter:80" is forbidden: User "ann@example.edu" cannot create '
                                   'resource "services/proxy" in API group "" in the namespace "lab-ann"')
        assert refused(ann.connect_get_namespaced_service_proxy_with_path, "jupyter:80", "lab-bob", "api")[0] == 403
        assert refused(ann.read_namespaced_service, "jupyter", "lab-ann")[0] == 403
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_self_subject_access_review_answers_for_the_caller(kube):
    grant_ann(kube)

    def can(token, verb, resource, ns, name="", sub=""):
        review = client.AuthorizationV1Api(kube.api_client(token)).create_self_subject_access_review(
            {"spec": {"resourceAttributes": {"verb": verb, "resource": resource, "namespace": ns, "name": name,
                                             "subresource": sub}}})
        return review.status.allowed

    assert can(ANN, "create", "pods", "lab-ann", "jupyter", "portforward")
    assert not can(BOB, "create", "pods", "lab-ann", "jupyter", "portforward")
    assert not can(ANN, "create", "pods", "lab-ann", "jupyter", "exec")
    assert can(ANN, "get", "secrets", "lab-ann", "token") and not can(ANN, "get", "secrets", "lab-ann", "other")


def test_request_attributes_follow_the_api_servers_request_info():
    a = rbac.request_attributes
    assert a("GET", "/api/v1/namespaces/n/pods", {}) == rbac.Attributes("list", "pods", "", "n")
    assert a("GET", "/api/v1/namespaces/n/pods", {"watch": "true"}).verb == "watch"
    assert a("DELETE", "/apis/apps/v1/namespaces/n/deployments", {}) == \
        rbac.Attributes("deletecollection", "deployments", "apps", "n")
    assert a("PATCH", "/apis/apps/v1/namespaces/n/deployments/d/scale", {}) == \
        rbac.Attributes("patch", "deployments", "apps", "n", "scale", "d")
    assert a("POST", "/api/v1/namespaces/n/services/s:80/proxy/api/kernels", {}) == \
        rbac.Attributes("create", "services", "", "n", "proxy", "s:80")
    assert a("GET", "/api/v1/namespaces/n", {}) == rbac.Attributes("get", "namespaces", "", "n", "", "n")
    assert a("PUT", "/api/v1/namespaces/n/finalize", {}) == rbac.Attributes("update", "namespaces", "", "n",
                                                                             "finalize", "n")
    assert a("GET", "/apis/apps/v1", {}) == rbac.Attributes("get", path="/apis/apps/v1")


def test_a_role_or_binding_grants_only_what_its_writer_holds_unless_escalate_or_bind(kube):
    """RBAC's privilege escalation prevention (the reference's "Privilege escalation prevention and bootstrapping"):
    ann, who may write Roles and RoleBindings in her namespace and read her token, cannot write a Role granting more
    than she holds (nor widen one by a patch), nor bind a Role granting more; holding its permissions she may; with
    `escalate` on roles she may write any Role, with `bind` on one Role she may bind that Role. The controller (system
    :masters here, as cluster-admin) writes the students' Roles and bindings as before."""
    admin = admin_rbac(kube)
    admin.create_namespaced_role("lab-ann", role(
        "writer", {"apiGroups": [RBAC], "resources": ["roles", "rolebindings"], "verbs": ["create", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["token"], "verbs": ["get"]}))
    admin.create_namespaced_role_binding("lab-ann", binding("writer", "writer", ("User", "ann@example.edu")))
    ann = client.RbacAuthorizationV1Api(kube.api_client(ANN))
    own = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["token"], "verbs": ["get"]}
    every_secret = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}

    ann.create_namespaced_role("lab-ann", role("mine", own))  # what she holds: allowed
    status, body = refused(ann.create_namespaced_role, "lab-ann", role("more", own, every_secret))
    assert status == 403 and body["message"].startswith(
        'roles.rbac.authorization.k8s.io "more" is forbidden: user "ann@example.edu" (groups=["system:authenticated"]) '
        "is attempting to grant RBAC permissions not currently held:")
    assert body["message"].endswith('\n{APIGroups:[""], Resources:["secrets"], Verbs:["get"]}')
    assert refused(ann.patch_namespaced_role, "mine", "lab-ann",
                   [{"op": "add", "path": "/rules/-", "value": every_secret}])[0] == 403  # widening it: the same
    assert refused(ann.create_namespaced_role, "lab-bob", role("mine", own))[0] == 403  # another namespace: none held

    ann.create_namespaced_role_binding("lab-ann", binding("to-bob", "mine", ("User", "bob@example.edu")))  # held
    admin.create_namespaced_role("lab-ann", role("reader", every_secret))
    status, body = refused(ann.create_namespaced_role_binding, "lab-ann",
                           binding("to-bob2", "reader", ("User", "bob@example.edu")))
    assert status == 403 and 'rolebindings.rbac.authorization.k8s.io "to-bob2" is forbidden' in body["message"]

    # explicit escalate on roles, bind on one role
    admin.create_namespaced_role("lab-ann", role("escalator",
                                                 {"apiGroups": [RBAC], "resources": ["roles"], "verbs": ["escalate"]},
                                                 {"apiGroups": [RBAC], "resources": ["roles"], "verbs": ["bind"],
                                                  "resourceNames": ["reader"]}))
    admin.create_namespaced_role_binding("lab-ann", binding("escalator", "escalator", ("User", "ann@example.edu")))
    ann.create_namespaced_role("lab-ann", role("more", own, every_secret))
    ann.create_namespaced_role_binding("lab-ann", binding("to-bob2", "reader", ("User", "bob@example.edu")))
    assert refused(ann.create_namespaced_role_binding, "lab-ann",
                   binding("to-bob3", "more", ("User", "bob@example.edu")))[0] == 403  # bind names "reader" alone
    assert refused(as_user(kube, BOB).list_namespaced_secret, "lab-ann")[0] == 403  # what was bound: get, not list
    assert as_user(kube, BOB).read_namespaced_secret("other", "lab-ann").metadata.name == "other"


def test_not_held_breaks_rules_into_single_permissions():
    held = [{"apiGroups": [""], "resources": ["pods", "secrets"], "resourceNames": ["a"], "verbs": ["get"]},
            {"apiGroups": ["*"], "resources": ["*/scale"], "verbs": ["*"]}, {"nonResourceURLs": ["/api/*"],
                                                                              "verbs": ["get"]}]
    assert rbac.not_held(held, [{"apiGroups": [""], "resources": ["pods"], "resourceNames": ["a"],
                                 "verbs": ["get"]}]) == []
    assert rbac.not_held(held, [{"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"]},
                                {"nonResourceURLs": ["/api/v1"], "verbs": ["get"]}]) == []
    assert rbac.not_held(held, [{"apiGroups": [""], "resources": ["pods"], "resourceNames": ["a", "b"],
                                 "verbs": ["get", "list"]}]) == [
        '{APIGroups:[""], Resources:["pods"], ResourceNames:["b"], Verbs:["get"]}',
        '{APIGroups:[""], Resources:["pods"], ResourceNames:["a"], Verbs:["list"]}',
        '{APIGroups:[""], Resources:["pods"], ResourceNames:["b"], Verbs:["list"]}']
    assert rbac.not_held(held, [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]) == [
        '{APIGroups:[""], Resources:["pods"], Verbs:["get"]}']  # every name: a rule naming some does not cover it
