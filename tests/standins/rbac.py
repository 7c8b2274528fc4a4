"""Test stand-in for the Kubernetes API server, authorization: who each bearer token is, the attributes of a request,
and RBAC evaluated on them as the API server's RBAC authorizer does (used by tests/standins/kube.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

Obj = dict[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"
AUTHENTICATED = "system:authenticated"
MASTERS = "system:masters"
# The API server's default ClusterRoles and bindings (kubernetes.io/docs/reference/access-authn-authz/rbac/
# "Default roles and role bindings"): cluster-admin bound to the group system:masters ("super-user access"),
# system:discovery and system:public-info-viewer (read-only API discovery, /version, /healthz) and system:basic-user
# ("read-only access to basic information about themselves": SelfSubjectAccessReviews) bound to system:authenticated.
DEFAULT_CLUSTER_ROLES = (
    {"metadata": {"name": "cluster-admin"},
     "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, {"nonResourceURLs": ["*"], "verbs": ["*"]}]},
    {"metadata": {"name": "system:discovery"},
     "rules": [{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version",
                                    "/version/", "/healthz", "/livez", "/readyz"], "verbs": ["get"]}]},
    {"metadata": {"name": "system:basic-user"},
     "rules": [{"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews",
                                                                       "selfsubjectrulesreviews"],
                "verbs": ["create"]}]},
)
DEFAULT_CLUSTER_ROLE_BINDINGS = (
    {"metadata": {"name": "cluster-admin"}, "subjects": [{"kind": "Group", "name": MASTERS}],
     "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "cluster-admin"}},
    {"metadata": {"name": "system:discovery"}, "subjects": [{"kind": "Group", "name": AUTHENTICATED}],
     "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "system:discovery"}},
    {"metadata": {"name": "system:basic-user"}, "subjects": [{"kind": "Group", "name": AUTHENTICATED}],
     "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "system:basic-user"}},
)


@dataclass(frozen=True)
class User:
    """An authenticated user: on GKE a Google account's e-mail (an RBAC subject `kind: User, name: <email>`); every
    authenticated user is also in the group system:authenticated (kubernetes.io/docs/reference/access-authn-authz/
    authentication/ "Users in Kubernetes")."""

    name: str
    groups: tuple[str, ...] = ()

    @property
    def all_groups(self) -> tuple[str, ...]:
        return (*self.groups, AUTHENTICATED)


@dataclass(frozen=True)
class Attributes:
    """The request attributes authorization reviews (kubernetes.io/docs/reference/access-authn-authz/authorization/
    "Review your request attributes"): resource requests carry verb, API group, namespace, resource, subresource
    and name; the others a path and a verb."""

    verb: str
    resource: str = ""  # "" for a non-resource request
    api_group: str = ""
    namespace: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""


def request_attributes(method: str, path: str, query: Mapping[str, str]) -> Attributes:
    """The attributes of an HTTP request (kubernetes.io/docs/reference/access-authn-authz/authorization/
    "Determine the request verb"): POST → create; GET/HEAD → get for one object, list for a collection, watch with
    ?watch; PUT → update; PATCH → patch; DELETE → delete one, deletecollection a collection. Resource paths are
    /api/v1/… and /apis/GROUP/VERSION/…, optionally /namespaces/NS/, then RESOURCE[/NAME[/SUBRESOURCE[/…]]]; the
    namespace of /api/v1/namespaces/NAME is NAME itself (apiserver RequestInfoFactory). Other paths are non-resource."""
    parts = [p for p in path.split("/") if p]
    verb_of = {"POST": "create", "PUT": "update", "PATCH": "patch"}
    if len(parts) < 3 or not ((parts[0] == "api" and len(parts) >= 3) or (parts[0] == "apis" and len(parts) >= 4)):
        return Attributes(verb={"GET": "get", "HEAD": "get"}.get(method, verb_of.get(method, method.lower())),
                          path=path)
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 2:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in ("status", "finalize"):
            rest = rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if method in ("GET", "HEAD"):
        verb = "watch" if query.get("watch") in ("1", "true") else "get" if name else "list"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = verb_of.get(method, method.lower())
    return Attributes(verb=verb, resource=resource, api_group=group, namespace=namespace, subresource=subresource,
                      name=name)


def binds(binding: Obj, user: User, namespace: str = "") -> bool:
    """A binding's subjects name the user: `User` by name, `Group` by one of its groups, `ServiceAccount` as the
    user system:serviceaccount:NS:NAME (its namespace defaulting to the binding's)."""
    for subject in binding.get("subjects") or ():
        kind, name = subject.get("kind"), subject.get("name")
        if kind == "User" and name == user.name or kind == "Group" and name in user.all_groups:
            return True
        if kind == "ServiceAccount" and \
                user.name == f"system:serviceaccount:{subject.get('namespace') or namespace}:{name}":
            return True
    return False


def _verb(rule: Obj, verb: str) -> bool:
    return "*" in rule.get("verbs", ()) or verb in rule.get("verbs", ())


def rule_allows(rule: Obj, attrs: Attributes) -> bool:
    """One PolicyRule against the attributes (kubernetes.io/docs/reference/access-authn-authz/rbac/ "Referring to
    resources"; k8s.io/kubernetes/pkg/apis/rbac/v1/evaluation_helpers.go): the verb, the API group, the resource as
    `resource` or `resource/subresource` (a rule for `pods` does not cover `pods/exec`; `*` covers every resource
    and subresource, `*/scale` one subresource of any), and resourceNames when the rule has any (a request without
    a name — list, create, deletecollection — then never matches). Non-resource requests match nonResourceURLs
    exactly or by a trailing `*` prefix."""
    if not attrs.resource:
        return _verb(rule, attrs.verb) and any(
            url == "*" or url == attrs.path or url.endswith("*") and attrs.path.startswith(url[:-1])
            for url in rule.get("nonResourceURLs") or ())
    if not rule.get("resources") or not _verb(rule, attrs.verb):
        return False
    groups = rule.get("apiGroups") or ()
    if "*" not in groups and attrs.api_group not in groups:
        return False
    wanted = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    if not any(r == "*" or r == wanted or attrs.subresource and r == f"*/{attrs.subresource}"
               for r in rule["resources"]):
        return False
    names = rule.get("resourceNames") or ()
    return not names or attrs.name in names


def authorize(user: User, attrs: Attributes, cluster_bindings: Iterable[Obj], bindings: Iterable[Obj],
              role: Callable[[str, str], Obj | None]) -> bool:
    """RBAC (kubernetes.io/docs/reference/access-authn-authz/rbac/): permissions are purely additive, there are no
    deny rules, and what no rule allows is denied. A ClusterRoleBinding grants its ClusterRole's rules cluster-wide
    (every namespace and cluster-scoped resources); a RoleBinding grants its Role's (a Role of its own namespace),
    or a ClusterRole's, only in its own namespace. `bindings` are the RoleBindings of the request's namespace;
    `role(kind, name)` reads a ClusterRole or a Role of that namespace (a binding to a missing role grants nothing)."""
    for binding in cluster_bindings:
        if binds(binding, user) and _role_allows(role("ClusterRole", binding["roleRef"]["name"]), attrs):
            return True
    if not attrs.namespace:
        return False
    for binding in bindings:
        ref = binding.get("roleRef") or {}
        if binds(binding, user, attrs.namespace) and _role_allows(role(ref.get("kind", ""), ref.get("name", "")),
                                                                  attrs):
            return True
    return False


def _role_allows(role: Obj | None, attrs: Attributes) -> bool:
    return role is not None and any(rule_allows(rule, attrs) for rule in role.get("rules") or ())


def forbidden_message(user: User, attrs: Attributes) -> str:
    """The 403's message as the API server words it (apiserver endpoints/handlers/responsewriters/errors.go
    forbiddenMessage, then errors.NewForbidden): `secrets "x" is forbidden: User "u" cannot get resource "secrets"
    in API group "" in the namespace "ns"`; `at the cluster scope` without a namespace; `cannot get path "/p"` for a
    non-resource request."""
    if not attrs.resource:
        return f'forbidden: User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
    resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    where = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    subject = f'{qualified} "{attrs.name}"' if attrs.name else qualified
    return (f'{subject} is forbidden: User "{user.name}" cannot {attrs.verb} resource "{resource}" in API group '
            f'"{attrs.api_group}" {where}')


def review_attributes(spec: Obj) -> Attributes:
    """A SelfSubjectAccessReview's spec (authorization.k8s.io/v1: resourceAttributes or nonResourceAttributes) as
    request attributes."""
    if spec.get("nonResourceAttributes"):
        a = spec["nonResourceAttributes"]
        return Attributes(verb=a.get("verb", ""), path=a.get("path", ""))
    a = spec.get("resourceAttributes") or {}
    return Attributes(verb=a.get("verb", ""), resource=a.get("resource", ""), api_group=a.get("group", ""),
                      namespace=a.get("namespace", ""), subresource=a.get("subresource", ""), name=a.get("name", ""))


# --- privilege escalation prevention (kubernetes.io/docs/reference/access-authn-authz/rbac/ "Privilege escalation
# prevention and bootstrapping"): "You can only create/update a role if at least one of the following things is
# true: you already have all the permissions contained in the role, at the same scope as the object being modified
# (cluster-wide for a ClusterRole, within the same namespace or cluster-wide for a Role); you are granted explicit
# permission to perform the escalate verb on the roles or clusterroles resource"; "You can only create/update a role
# binding if you already have all the permissions contained in the referenced role (at the same scope as the role
# binding) or if you have been authorized to perform the bind verb on the referenced role."

def held_rules(user: User, namespace: str, cluster_bindings: Iterable[Obj], bindings: Iterable[Obj],
               role: Callable[[str, str], Obj | None]) -> list[Obj]:
    """Every rule the user holds at this scope: its ClusterRoleBindings' (cluster-wide), and, for a namespace, its
    RoleBindings' there."""
    held = []
    for binding in cluster_bindings:
        if binds(binding, user):
            held += (role("ClusterRole", binding["roleRef"]["name"]) or {}).get("rules") or []
    for binding in bindings if namespace else ():
        ref = binding.get("roleRef") or {}
        if binds(binding, user, namespace):
            held += (role(ref.get("kind", ""), ref.get("name", "")) or {}).get("rules") or []
    return held


def _covers(owner: Obj, verb: str, group: str, resource: str, name: str) -> bool:
    """One held rule covers one atomic permission (k8s.io/component-helpers/auth/rbac/validation ruleCovers): its
    verbs, groups and resources include it or `*`, and it names no resources or names this one (a permission on
    every name is covered only by a rule naming none)."""
    names = owner.get("resourceNames") or ()
    sub = resource.split("/", 1)[1] if "/" in resource else ""
    return (_verb(owner, verb) and any(g in ("*", group) for g in owner.get("apiGroups") or ())
            and any(r in ("*", resource) or sub and r == f"*/{sub}" for r in owner.get("resources") or ())
            and (not names or bool(name) and name in names))


def _q(text: str) -> str:
    return json.dumps(text)  # Go's %q, as the API server prints each permission


def not_held(held: list[Obj], rules: Iterable[Obj]) -> list[str]:
    """The permissions of `rules` no held rule covers, broken into one verb, group, resource and name each (as the
    API server compares them); non-resource URLs compared exactly or by a held `*` prefix."""
    missing = []
    for rule in rules:
        for verb in rule.get("verbs") or ():
            for url in rule.get("nonResourceURLs") or ():
                if not any(_verb(h, verb) and any(u == "*" or u == url or u.endswith("*") and url.startswith(u[:-1])
                                                  for u in h.get("nonResourceURLs") or ()) for h in held):
                    missing.append(f"{{NonResourceURLs:[{_q(url)}], Verbs:[{_q(verb)}]}}")
            for group in rule.get("apiGroups") or ():
                for resource in rule.get("resources") or ():
                    for name in rule.get("resourceNames") or ("",):
                        if not any(_covers(h, verb, group, resource, name) for h in held):
                            missing.append(f"{{APIGroups:[{_q(group)}], Resources:[{_q(resource)}]"
                                           + (f", ResourceNames:[{_q(name)}]" if name else "")
                                           + f", Verbs:[{_q(verb)}]}}")
    return missing
