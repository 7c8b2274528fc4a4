"""Test stand-in for the Kubernetes API server: kmock's scaffold made strict and served over HTTP to the real client.

What comes from kmock (nolar/kmock 0.8): the HTTP handler base (``KubernetesScaffold`` → ``RawHandler``), its API
discovery (``/api``, ``/apis``, ``/apis/G/V``, ``/version``), its request records and DSL views (``.handler``), its
versioned object store (``ObjectsArray``: every write is a new version, deletions are soft, so tests can assert on
``.objects[...].history``), ``KubernetesError`` for Status responses and its strict mode (unexpected server-side
exceptions are re-raised from ``stop()``).

What replaces kmock's ``KubernetesEmulator`` CRUD, and why it cannot be extended in place:
- it mutates the store in ``_handle`` *before* dispatch for every request with a resource, subresources included,
  so ``PATCH …/deployments/x/scale`` merges the Scale body into the Deployment; there is no hook to stop that;
- its path parser maps ``/api/v1/namespaces/X`` to "namespace X" and crashes on ``/api/v1/namespaces`` (→ 500),
  so ``__call__`` parses paths itself and builds ``kmock.Request`` records;
- PUT is not an action at all; merge-patch only; no resourceVersion/uid/timestamps; lists of unknown-but-empty
  resources are 404 and ignore selectors; no validation; no controllers.
Those are implemented here, on kmock's store, as a strict subset of the real API server (see ``KubeStandin``).
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import copy
import dataclasses
import functools
import itertools
import json
import random
import re
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import aiohttp
import aiohttp.web
import attrs
import jsonpatch
import kmock
import kubernetes.client
import kubernetes_validate
import yarl

from tests.standins import pod_security, rbac

_CALLER: contextvars.ContextVar = contextvars.ContextVar("caller")  # the authenticated user of the request at hand

Obj = dict[str, Any]
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"  # where ServiceAccount admission mounts the token
# the API server refuses to delete these (k8s.io/kubernetes plugin/pkg/admission/namespace/lifecycle)
PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")
STREAMS = ("portforward", "exec", "attach")  # the pod subresources that stream over an upgraded connection
# port-forward over WebSocket: the kubelet's portforward/websocket.go (k8s.io/kubernetes pkg/kubelet/cri/streaming/
# portforward) accepts no subprotocol, "v4.channel.k8s.io" (binary frames) or "v4.base64.channel.k8s.io" (text, base64;
# not served here); channel 2i carries port i's data both ways, 2i+1 its errors (server to client); the first frame
# on each channel is the port number, uint16 little-endian
PORTFORWARD_PROTOCOL = "v4.channel.k8s.io"


def _is_websocket(raw: aiohttp.web.BaseRequest) -> bool:
    """wsstream.IsWebSocketRequest (k8s.io/apiserver pkg/util/wsstream): `Connection: Upgrade`, `Upgrade: websocket`."""
    return "upgrade" in raw.headers.get("Connection", "").lower() and \
        raw.headers.get("Upgrade", "").lower() == "websocket"


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    name_rule: str  # "subdomain" | "label" | "dns1035" | "path"
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:  # as in messages: deployments.apps "x" not found
        return f"{self.plural}.{self.group}" if self.group else self.plural


NAMESPACES = Kind("", "v1", "namespaces", "Namespace", False, "label", ("status",))
NODES = Kind("", "v1", "nodes", "Node", False, "subdomain", ("status",))
CONFIGMAPS = Kind("", "v1", "configmaps", "ConfigMap", True, "subdomain")
SECRETS = Kind("", "v1", "secrets", "Secret", True, "subdomain")
SERVICEACCOUNTS = Kind("", "v1", "serviceaccounts", "ServiceAccount", True, "subdomain")
SERVICES = Kind("", "v1", "services", "Service", True, "dns1035", ("status", "proxy"))
PODS = Kind("", "v1", "pods", "Pod", True, "subdomain", ("status", "log", "eviction", "portforward", "exec", "attach"))
DEPLOYMENTS = Kind("apps", "v1", "deployments", "Deployment", True, "subdomain", ("status", "scale"))
REPLICASETS = Kind("apps", "v1", "replicasets", "ReplicaSet", True, "subdomain", ("status", "scale"))
JOBS = Kind("batch", "v1", "jobs", "Job", True, "subdomain", ("status",))
ROLES = Kind("rbac.authorization.k8s.io", "v1", "roles", "Role", True, "path")
ROLEBINDINGS = Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, "path")
CLUSTERROLES = Kind("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, "path")
CLUSTERROLEBINDINGS = Kind("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False,
                           "path")
RESOURCEQUOTAS = Kind("", "v1", "resourcequotas", "ResourceQuota", True, "subdomain", ("status",))
NETWORKPOLICIES = Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, "subdomain")
LIMITRANGES = Kind("", "v1", "limitranges", "LimitRange", True, "subdomain")
KINDS = {(k.group, k.version, k.plural): k for k in (
    NAMESPACES, NODES, CONFIGMAPS, SECRETS, SERVICEACCOUNTS, SERVICES, PODS, DEPLOYMENTS, REPLICASETS, JOBS, ROLES,
    ROLEBINDINGS, CLUSTERROLES, CLUSTERROLEBINDINGS, RESOURCEQUOTAS, NETWORKPOLICIES, LIMITRANGES)}
SELF_REVIEWS = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
STATUS_CODES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
                409: "Conflict", 415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests",
                500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


def kind_of(ref: Kind | str) -> Kind:
    """A Kind from itself, its plural ("pods") or a kmock-style reference ("apps/v1/deployments")."""
    if isinstance(ref, Kind):
        return ref
    for kind in KINDS.values():
        if ref == kind.plural:
            return kind
    res = kmock.resource(ref)
    return KINDS[(res.group, res.version, res.plural)]


# --- errors (rendered as v1 Status by _KubeApi._render_error) -------------------------------------------------------

def fail(code: int, message: str, reason: str | None = None, **details: Any) -> kmock.KubernetesError:
    details = {k: v for k, v in details.items() if v not in ("", None)}
    return kmock.KubernetesError(status=code, reason=reason or STATUS_CODES.get(code, "Unknown"), message=message,
                                 details=details or None)


def not_found(kind: Kind, name: str) -> kmock.KubernetesError:
    return fail(404, f'{kind.qualified} "{name}" not found', name=name, group=kind.group, kind=kind.plural)


def conflict(kind: Kind, name: str, why: str = "the object has been modified; please apply your changes to the "
                                               "latest version and try again") -> kmock.KubernetesError:
    return fail(409, f'Operation cannot be fulfilled on {kind.qualified} "{name}": {why}',
                name=name, group=kind.group, kind=kind.plural)


class Causes(list):
    """Field errors collected by validation; ``raise_for`` turns them into a 422 Invalid Status."""

    def add(self, field: str, reason: str, message: str) -> None:
        self.append({"reason": reason, "message": message, "field": field})

    def invalid(self, field: str, value: Any, why: str) -> None:
        self.add(field, "FieldValueInvalid", f"Invalid value: {json.dumps(value)}: {why}")

    def required(self, field: str, why: str = "") -> None:
        self.add(field, "FieldValueRequired", "Required value" + (f": {why}" if why else ""))

    def unsupported(self, field: str, value: Any, allowed: Iterable[str]) -> None:
        self.add(field, "FieldValueNotSupported", f"Unsupported value: {json.dumps(value)}: supported values: "
                 + ", ".join(json.dumps(a) for a in allowed))

    def forbidden(self, field: str, why: str) -> None:
        self.add(field, "FieldValueForbidden", f"Forbidden: {why}")

    def raise_for(self, kind: Kind | str, name: str, group: str = "") -> None:
        if self:
            msgs = [f"{c['field']}: {c['message']}" for c in self]
            kind_name = kind.kind if isinstance(kind, Kind) else kind
            text = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
            raise fail(422, f'{kind_name} "{name}" is invalid: {text}', name=name, kind=kind_name,
                       group=kind.group if isinstance(kind, Kind) else group, causes=list(self))


# --- the official OpenAPI schema ------------------------------------------------------------------------------------

# The Kubernetes version of the labs' clusters: GKE's REGULAR channel runs 1.35 (cloud.google.com/kubernetes-engine/
# docs/release-notes-regular), whose official schemas the kubernetes-validate package carries (strict: no unknown field)
SCHEMA_VERSION = "1.35.0"
# kubernetes_validate.validate reads and parses its schema files (_definitions.json: 1.5 MB) on every call: 69 ms
# per ConfigMap write here, 8 ms once parsed; a class of 100 labs turns that into minutes. The files are read-only
# package data, and jsonschema only reads the schemas, so each is parsed once.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)


def schema_problems(obj: Obj) -> list[tuple[str, str]]:
    """(field path, message) for each way `obj` breaks the official OpenAPI schema of its kind and apiVersion."""
    try:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [(".".join(str(p) for p in e.absolute_path) or "<root>", e.message)]
    return []


# --- names, labels, selectors ---------------------------------------------------------------------------------------

NAME_RULES = {  # rule → (regex, max length, message) as in k8s.io/apimachinery/pkg/util/validation
    "label": (re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"), 63,
              "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
              "and end with an alphanumeric character"),
    "dns1035": (re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?"), 63,
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                "alphabetic character, and end with an alphanumeric character"),
    "subdomain": (re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"), 253,
                  "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                  "and must start and end with an alphanumeric character"),
}
QUALIFIED = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def name_problems(rule: str, name: str) -> list[str]:
    if rule == "path":  # RBAC names: any path segment
        if name in (".", ".."):
            return [f"may not be '{name}'"]
        return [f"may not contain '{c}'" for c in "/%" if c in name]
    regex, limit, what = NAME_RULES[rule]
    problems = [f"must be no more than {limit} characters"] if len(name) > limit else []
    if not regex.fullmatch(name):
        problems.append(f"{what} (regex used for validation is '{regex.pattern}')")
    return problems


# label/annotation keys: [prefix/]name, name ≤ 63, prefix a DNS subdomain (apimachinery validation.IsQualifiedName)
def key_problems(key: str) -> list[str]:
    """Label/annotation keys: an optional DNS-subdomain prefix and '/', then a name of ≤ 63 characters."""
    prefix, slash, name = key.rpartition("/")
    problems = ["prefix part must be non-empty"] if slash and not prefix else [
        f"prefix part {p}" for p in (name_problems("subdomain", prefix) if prefix else [])]
    if not name:
        return problems + ["name part must be non-empty"]
    if len(name) > 63:
        problems.append("name part must be no more than 63 characters")
    if not QUALIFIED.fullmatch(name):
        problems.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                        f"with an alphanumeric character (regex used for validation is '{QUALIFIED.pattern}')")
    return problems


# label values ≤ 63, alphanumeric at both ends (apimachinery validation.IsValidLabelValue)
def value_problems(value: str) -> list[str]:
    problems = ["must be no more than 63 characters"] if len(value) > 63 else []
    if value and not QUALIFIED.fullmatch(value):
        problems.append("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
                        f"'.', and must start and end with an alphanumeric character (regex used for validation is "
                        f"'{QUALIFIED.pattern}')")
    return problems


def check_labels(labels: Mapping[str, str], field: str, causes: Causes) -> None:
    for key, value in labels.items():
        for problem in key_problems(key):
            causes.invalid(field, key, problem)
        for problem in value_problems(value):
            causes.invalid(field, value, problem)


Requirement = tuple[str, str, tuple[str, ...]]  # (key, op, values); op in = != in notin exists ! < >
REQUIREMENT = re.compile(r"""\s*(?:
    !\s*(?P<absent>[^\s,!=<>()]+)
  | (?P<key>[^\s,!=<>()]+)\s*(?:
        (?P<op>==|=|!=)\s*(?P<value>[^\s,!=<>()]*)
      | (?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
      | (?P<cmp>[<>])\s*(?P<number>-?[0-9]+)
    )?
)\s*(?:,|$)""", re.X)


# label selector syntax (k8s.io/apimachinery/pkg/labels/selector.go Parse)
def parse_selector(text: str) -> list[Requirement]:
    """Parse a label selector string (``a=b,c!=d,e,!f,g in (x,y),h notin (z)``); ValueError if malformed."""
    reqs: list[Requirement] = []
    text, pos = text.strip(), 0
    while pos < len(text):
        m = REQUIREMENT.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"unable to parse requirement: {text[pos:]!r}")
        pos = m.end()
        if m["absent"]:
            req = (m["absent"], "!", ())
        elif m["op"]:
            req = (m["key"], "!=" if m["op"] == "!=" else "=", (m["value"],))
        elif m["setop"]:
            values = tuple(v.strip() for v in m["values"].split(",") if v.strip())
            if not values:
                raise ValueError(f"for 'in', 'notin' operators, values set can't be empty: {m.group().strip()!r}")
            req = (m["key"], m["setop"], values)
        elif m["cmp"]:
            req = (m["key"], m["cmp"], (m["number"],))
        else:
            req = (m["key"], "exists", ())
        problems = key_problems(req[0]) + [p for v in req[2] if req[1] not in ("<", ">") for p in value_problems(v)]
        if problems:
            raise ValueError(f"unable to parse requirement: {m.group().strip()!r}: {'; '.join(problems)}")
        reqs.append(req)
    return reqs


def selects(reqs: Iterable[Requirement], labels: Mapping[str, str]) -> bool:
    for key, op, values in reqs:
        value = labels.get(key)
        if op in ("<", ">"):
            ok = value is not None and value.lstrip("-").isdigit() and (
                int(value) > int(values[0]) if op == ">" else int(value) < int(values[0]))
        else:
            ok = {"=": value in values, "in": value in values, "!=": value not in values,
                  "notin": value not in values, "exists": key in labels, "!": key not in labels}[op]
        if not ok:
            return False
    return True


def selector_requirements(selector: Mapping[str, Any]) -> list[Requirement]:
    """A metav1.LabelSelector (matchLabels / matchExpressions) as requirements; ValueError on a bad operator."""
    reqs: list[Requirement] = [(k, "=", (v,)) for k, v in (selector.get("matchLabels") or {}).items()]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.get("matchExpressions") or ():
        if expr.get("operator") not in ops:
            raise ValueError(f"{expr.get('operator')!r} is not a valid label selector operator")
        reqs.append((expr.get("key", ""), ops[expr["operator"]], tuple(expr.get("values") or ())))
    return reqs


def selector_string(selector: Mapping[str, Any]) -> str:
    """As metav1.LabelSelectorAsSelector(s).String(), e.g. for Scale.status.selector."""
    def text(key: str, op: str, values: tuple[str, ...]) -> str:
        return {"=": f"{key}={''.join(values)}", "exists": key, "!": f"!{key}"}.get(
            op, f"{key} {op} ({','.join(sorted(values))})")
    return ",".join(text(*r) for r in sorted(selector_requirements(selector)))


FIELDS: dict[str, Callable[[Obj], str]] = {
    "metadata.name": lambda o: o["metadata"]["name"],
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
}
KIND_FIELDS: dict[str, dict[str, Callable[[Obj], str]]] = {
    "pods": {"spec.nodeName": lambda o: o["spec"].get("nodeName", ""),
             "status.phase": lambda o: o.get("status", {}).get("phase", ""),
             "spec.restartPolicy": lambda o: o["spec"].get("restartPolicy", ""),
             "spec.serviceAccountName": lambda o: o["spec"].get("serviceAccountName", "")},
    "nodes": {"spec.unschedulable": lambda o: str(bool(o.get("spec", {}).get("unschedulable"))).lower()},
    "secrets": {"type": lambda o: o.get("type", "")},
}


def field_filter(kind: Kind, text: str) -> Callable[[Obj], bool]:
    terms = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*(.*)", part)
        if not m:
            raise fail(400, f"invalid selector: '{text}'; can't understand '{part}'")
        getter = {**FIELDS, **KIND_FIELDS.get(kind.plural, {})}.get(m[1])
        if getter is None:
            raise fail(400, f'field label not supported: {m[1]}')
        terms.append((getter, m[2] == "!=", m[3]))
    return lambda obj: all((getter(obj) == value) != negate for getter, negate, value in terms)


# --- patches -----------------------------------------------------------------------------------------------------

MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "imagePullSecrets": "name", "volumeMounts": "mountPath"}


# JSON merge patch (RFC 7386); strategic merge by list merge keys (apimachinery/pkg/util/strategicpatch)
def merge_patch(target: Any, patch: Any, strategic: bool = False) -> Any:
    """RFC 7386 JSON merge patch; with ``strategic``, common lists merge by their key (containers by name…)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue  # $setElementOrder, $retainKeys…: ordering/pruning directives, not modelled
        if value is None:
            result.pop(key, None)
        elif strategic and key in MERGE_KEYS and isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = merge_list(result[key], value, MERGE_KEYS[key])
        else:
            result[key] = merge_patch(result.get(key), value, strategic)
    return result


def merge_list(items: list[Any], patch: list[Any], merge_key: str) -> list[Any]:
    out = copy.deepcopy(items)
    for item in patch:
        at = next((i for i, x in enumerate(out) if isinstance(x, dict) and isinstance(item, dict)
                   and x.get(merge_key) == item.get(merge_key)), None)
        if isinstance(item, dict) and item.get("$patch") == "delete":
            if at is not None:
                del out[at]
        elif at is None:
            out.append(merge_patch({}, item, True))
        else:
            out[at] = merge_patch(out[at], item, True)
    return out


def apply_patch(current: Obj, body: bytes, content_type: str) -> Obj:
    media = content_type.split(";")[0].strip().lower()
    if media == "application/apply-patch+yaml":
        raise fail(415, "stand-in: server-side apply is not supported")
    if media not in ("application/json-patch+json", "application/merge-patch+json",
                     "application/strategic-merge-patch+json"):
        raise fail(415, "the body of the request was in an unknown format - accepted media types include: "
                        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml")
    try:
        patch = json.loads(body or b"null")
    except ValueError as e:
        raise fail(400, f"error decoding patch: {e}")
    if media == "application/json-patch+json":
        if not isinstance(patch, list):
            raise fail(400, "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        try:
            result = jsonpatch.apply_patch(current, patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, TypeError) as e:
            raise fail(422, f"the server rejected our request due to an error in our request: {e}")
    else:
        if not isinstance(patch, dict):
            raise fail(400, "error decoding patch: the patch is not a JSON object")
        result = merge_patch(current, patch, strategic=media.startswith("application/strategic"))
    if not isinstance(result, dict):
        raise fail(422, "the server rejected our request due to an error in our request")
    return result


# --- object helpers ------------------------------------------------------------------------------------------------

def quantity(resource: str, value: Any) -> float:
    """A quota's quantity as a number: cores for cpu, bytes for memory, a count otherwise."""
    from dasklab.core.model import parse_cpu, parse_memory
    if resource.endswith("cpu"):
        return parse_cpu(value)
    return float(parse_memory(value)) if resource.endswith("memory") else float(value)


def show_quantity(resource: str, value: float) -> str:
    if resource.endswith("cpu"):
        return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"
    return str(int(value))


def pod_requests(pod: Obj) -> Counter:
    """What a pod counts against a quota: `pods` 1, its containers' requests (limits where no request) and their
    limits (kubernetes.io/docs/concepts/policy/resource-quotas/: requests.cpu, requests.memory, limits.cpu,
    limits.memory are the sums across all pods in a non-terminal state)."""
    found: Counter = Counter({"pods": 1})
    for c in pod["spec"].get("containers") or ():
        resources = c.get("resources") or {}
        for kind, got in (("requests", {**(resources.get("limits") or {}), **(resources.get("requests") or {})}),
                          ("limits", resources.get("limits") or {})):
            for key in ("cpu", "memory"):
                if key in got:
                    found[f"{kind}.{key}"] += quantity(key, got[key])
    return found


def limit_range_defaults(item: Obj) -> None:
    """A LimitRange item of type Container as the API server stores it (SetDefaults_LimitRangeItem,
    k8s.io/kubernetes pkg/apis/core/v1/defaults.go): a `default` limit missing takes `max`; a `defaultRequest`
    missing takes `default`, else `min`."""
    if item.get("type") != "Container":
        return
    default, request = item.setdefault("default", {}), item.setdefault("defaultRequest", {})
    for key, value in (item.get("max") or {}).items():
        default.setdefault(key, value)
    for source in (default, item.get("min") or {}):
        for key, value in source.items():
            request.setdefault(key, value)


def limit_range_problems(limit_range: Obj, pod: Obj) -> list[str]:
    """The LimitRanger admission plugin on a pod's create (kubernetes.io/docs/concepts/policy/limit-range/;
    k8s.io/kubernetes plugin/pkg/admission/limitranger/admission.go): first each container without a limit or a
    request for a resource gets the item's `default` / `defaultRequest` (the pod is changed in place), then a
    container whose request or limit is under `min` or over `max` is refused, worded as minConstraint and
    maxConstraint word it. Only items of type Container are modelled."""
    found = []
    for item in (limit_range.get("spec") or {}).get("limits") or ():
        if item.get("type") != "Container":
            continue
        for c in pod["spec"].get("containers") or ():
            resources = c.setdefault("resources", {})
            for kind, field in (("limits", "default"), ("requests", "defaultRequest")):
                for key, value in (item.get(field) or {}).items():  # requests were copied from limits (apply_defaults)
                    resources.setdefault(kind, {}).setdefault(key, value)
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for key, least in (item.get("min") or {}).items():  # minConstraint: its first failed check
                below = [f"{kind} is {got[key]}" for kind, got in (("request", requests), ("limit", limits))
                         if key in got and quantity(key, got[key]) < quantity(key, least)]
                if key not in requests or below:
                    found.append(f"minimum {key} usage per Container is {least}" + (
                        f", but {below[0]}" if key in requests else ".  No request is specified"))
            for key, most in (item.get("max") or {}).items():  # maxConstraint: the limit checked before the request
                above = [f"{kind} is {got[key]}" for kind, got in (("limit", limits), ("request", requests))
                         if key in got and quantity(key, got[key]) > quantity(key, most)]
                if key not in limits or above:
                    found.append(f"maximum {key} usage per Container is {most}" + (
                        f", but {above[0]}" if key in limits else ".  No limit is specified"))
    return found


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner_ref(kind: Kind, owner: Obj) -> Obj:
    return {"apiVersion": kind.api_version, "kind": kind.kind, "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def owned_by(obj: Obj, owner: Obj) -> bool:
    return any(r.get("uid") == owner["metadata"]["uid"] for r in obj["metadata"].get("ownerReferences") or ())


def is_active(pod: Obj) -> bool:
    return pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")


def is_ready(pod: Obj) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions") or ())


def spec_part(obj: Obj) -> Obj:  # what bumps metadata.generation
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def without_rv(obj: Obj) -> Obj:
    return {**obj, "metadata": {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}}


def omit_zero(values: Mapping[str, Any]) -> Obj:  # Go's `omitempty` on the status counters
    return {k: v for k, v in values.items() if v not in (0, None, "", [], {})}


SAFE = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand alphabet


def template_hash(template: Obj) -> str:
    """pod-template-hash: FNV-32a of the template, encoded like rand.SafeEncodeString."""
    h = 0x811C9DC5
    for byte in json.dumps(template, sort_keys=True).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(SAFE[ord(c) % len(SAFE)] for c in str(h))


def int_or_percent(value: Any, total: int, round_up: bool = False) -> int:
    """An IntOrString against `total` (k8s.io/apimachinery intstr.GetScaledValueFromIntOrPercent)."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-total * int(value[:-1]) // 100) if round_up else total * int(value[:-1]) // 100
    return int(value or 0)


REVISION = "deployment.kubernetes.io/revision"


def rolling_fenceposts(deployment: Obj) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) of a RollingUpdate Deployment as pods: "maxSurge … absolute number is calculated
    from the percentage by rounding up", "maxUnavailable … by rounding down"; both 0 cannot make progress, so
    maxUnavailable becomes 1 (kubernetes.io/docs/concepts/workloads/controllers/deployment/#rolling-update-deployment;
    pkg/controller/deployment/util ResolveFenceposts)."""
    spec = deployment["spec"]
    rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    surge = int_or_percent(rolling.get("maxSurge", "25%"), spec["replicas"], round_up=True)
    unavailable = int_or_percent(rolling.get("maxUnavailable", "25%"), spec["replicas"])
    return surge, 1 if surge == 0 and unavailable == 0 else unavailable


# --- validation (422) and defaulting --------------------------------------------------------------------------------

def check_body(obj: Any, kind_name: str, api_version: str) -> Obj:
    # decoding: a body of the wrong kind/apiVersion or shape is 400 BadRequest (k8s.io/apimachinery runtime serializer)
    if not isinstance(obj, dict):
        raise fail(400, "the body of the request could not be decoded as a JSON object")
    if obj.get("kind") not in (None, "", kind_name) or obj.get("apiVersion") not in (None, "", api_version):
        raise fail(400, f'{obj.get("kind")} in version "{obj.get("apiVersion")}" cannot be handled as a {kind_name}')
    for key in ("metadata", "spec", "status", "data"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            raise fail(400, f"{kind_name}.{key}: expected a JSON object")
    meta = obj.get("metadata") or {}
    for key in ("labels", "annotations"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise fail(400, f"{kind_name}.metadata.{key}: expected a map of strings")
    return obj


def check_item_names(items: list[Obj], path: str, causes: Causes, required: bool) -> None:
    """The `name` of each item of a list (containers, ports): present if required, unique, a DNS label."""
    # container and port names: required, unique, DNS-1123 labels (k8s.io/kubernetes/pkg/apis/core/validation/validation.go validateContainers, validateServicePort)
    seen: set[str] = set()
    for i, item in enumerate(items):
        field, name = f"{path}[{i}].name", item.get("name") or ""
        if required and not name:
            causes.required(field)
        elif name in seen:
            causes.add(field, "FieldValueDuplicate", f"Duplicate value: {json.dumps(name)}")
        for problem in name_problems("label", name) if name else ():
            causes.invalid(field, name, problem)
        seen.add(name)


def check_pod_spec(spec: Obj, path: str, causes: Causes, policies: tuple[str, ...]) -> None:
    # containers required with an image; restartPolicy one of the allowed (k8s.io/kubernetes/pkg/apis/core/validation/validation.go ValidatePodSpec)
    containers = spec.get("containers") or []
    if not containers:
        causes.required(f"{path}.containers")
    check_item_names(containers, f"{path}.containers", causes, required=True)
    for i, container in enumerate(containers):
        if not container.get("image"):
            causes.required(f"{path}.containers[{i}].image")
    if spec.get("restartPolicy") not in policies:
        causes.unsupported(f"{path}.restartPolicy", spec.get("restartPolicy"), policies)


def check_pod(obj: Obj, old: Obj | None, causes: Causes) -> None:
    # pod-deletion-cost is an int32 (k8s.io/kubernetes/pkg/apis/core/validation ValidatePodDeletionCostAnnotation); pod updates change only images, deadline, tolerations (ValidatePodUpdate)
    check_pod_spec(obj["spec"], "spec", causes, ("Always", "OnFailure", "Never"))
    cost = (obj["metadata"].get("annotations") or {}).get(DELETION_COST)
    if cost is not None and not (cost.lstrip("-").isdigit() and -2**31 <= int(cost) < 2**31):
        causes.invalid(f"metadata.annotations[{DELETION_COST}]", cost, "must be a 32bit integer")

    def frozen(spec: Obj) -> Obj:
        spec = {k: v for k, v in spec.items() if k not in ("activeDeadlineSeconds", "tolerations")}
        for key in ("containers", "initContainers"):
            spec[key] = [{**c, "image": None} for c in spec.get(key) or ()]
        return spec
    if old is not None and frozen(obj["spec"]) != frozen(old["spec"]):
        causes.forbidden("spec", "pod updates may not change fields other than `spec.containers[*].image`, "
                                 "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations`")


def check_workload(obj: Obj, old: Obj | None, causes: Causes) -> None:  # Deployment, ReplicaSet
    # replicas ≥ 0, a non-empty selector matching the template's labels, immutable selector (k8s.io/kubernetes/pkg/apis/apps/validation/validation.go ValidateDeploymentSpec)
    spec = obj["spec"]
    replicas = spec.get("replicas")
    if not isinstance(replicas, int) or replicas < 0:
        causes.invalid("spec.replicas", replicas, "must be greater than or equal to 0")
    selector, template = spec.get("selector"), spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    check_labels(labels, "spec.template.metadata.labels", causes)
    if not selector:
        causes.required("spec.selector")
    else:
        try:
            reqs = selector_requirements(selector)
        except ValueError as e:
            causes.invalid("spec.selector", selector, str(e))
        else:
            if not reqs:
                causes.invalid("spec.selector", selector, "empty selector is invalid for deployment")
            elif not selects(reqs, labels):
                causes.invalid("spec.template.metadata.labels", labels, "`selector` does not match template `labels`")
    check_pod_spec(template.get("spec") or {}, "spec.template.spec", causes, ("Always",))
    rolling = (spec.get("strategy") or {}).get("rollingUpdate")
    if obj.get("kind") == "Deployment" and rolling and int_or_percent(rolling.get("maxSurge"), 100) == 0 \
            and int_or_percent(rolling.get("maxUnavailable"), 100) == 0:  # ValidateRollingUpdateDeployment
        causes.invalid("spec.strategy.rollingUpdate.maxUnavailable", rolling.get("maxUnavailable"),
                       "may not be 0 when `maxSurge` is 0")
    if old is not None and selector != old["spec"].get("selector"):
        causes.invalid("spec.selector", selector, "field is immutable")


def check_job(obj: Obj, old: Obj | None, causes: Causes) -> None:
    # generated selector, restartPolicy OnFailure/Never, counts ≥ 0, immutable template (k8s.io/kubernetes/pkg/apis/batch/validation/validation.go ValidateJobSpec)
    spec = obj["spec"]
    if old is None and spec.get("selector") and not spec.get("manualSelector"):
        causes.invalid("spec.selector", spec["selector"], "`selector` will be auto-generated")
    check_pod_spec((spec.get("template") or {}).get("spec") or {}, "spec.template.spec", causes, ("OnFailure", "Never"))
    for field in ("parallelism", "completions", "backoffLimit"):
        value = spec.get(field)
        if value is not None and (not isinstance(value, int) or value < 0):
            causes.invalid(f"spec.{field}", value, "must be greater than or equal to 0")
    for field in ("template", "selector") if old is not None else ():
        if spec.get(field) != old["spec"].get(field):
            causes.invalid(f"spec.{field}", spec.get(field), "field is immutable")


def check_service(obj: Obj, old: Obj | None, causes: Causes) -> None:
    # type, ports 1-65535, protocol, immutable clusterIP (k8s.io/kubernetes/pkg/apis/core/validation/validation.go ValidateService)
    spec = obj["spec"]
    types = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
    if spec.get("type") not in types:
        causes.unsupported("spec.type", spec.get("type"), types)
    ports = spec.get("ports") or []
    if not ports and spec.get("type") != "ExternalName" and spec.get("clusterIP") != "None":
        causes.required("spec.ports")
    check_item_names(ports, "spec.ports", causes, required=len(ports) > 1)
    for i, port in enumerate(ports):
        field = f"spec.ports[{i}]"
        for key in ("port", "targetPort"):
            value = port.get(key)
            if (key == "port" or isinstance(value, int)) and not (isinstance(value, int) and 1 <= value <= 65535):
                causes.invalid(f"{field}.{key}", value, "must be between 1 and 65535, inclusive")
        if port.get("protocol") not in ("TCP", "UDP", "SCTP"):
            causes.unsupported(f"{field}.protocol", port.get("protocol"), ("SCTP", "TCP", "UDP"))
    if old is not None and spec.get("clusterIP") != old["spec"].get("clusterIP"):
        causes.invalid("spec.clusterIP", spec.get("clusterIP"), "field is immutable")


def check_data(obj: Obj, old: Obj | None, causes: Causes) -> None:  # ConfigMap, Secret
    # config keys [-._a-zA-Z0-9]+ of at most 253, unique across data/binaryData; immutable when `immutable` (k8s.io/kubernetes/pkg/apis/core/validation ValidateConfigMap)
    seen: set[str] = set()
    for field in ("data", "binaryData"):
        for key in obj.get(field) or {}:
            if len(key) > 253 or not CONFIG_KEY.fullmatch(key):
                causes.invalid(f"{field}[{key}]", key, "a valid config key must consist of alphanumeric characters, "
                               f"'-', '_' or '.' (regex used for validation is '{CONFIG_KEY.pattern}')")
            if key in seen:
                causes.invalid(f"{field}[{key}]", key, "duplicate of key present in data")
            seen.add(key)
    if old is not None and old.get("immutable") and (
            spec_part(obj) != spec_part(old)):
        causes.forbidden("data", "field is immutable when `immutable` is set")


def check_role(obj: Obj, old: Obj | None, causes: Causes) -> None:
    # rules need verbs, apiGroups and resources; no nonResourceURLs in a Role (k8s.io/kubernetes/pkg/apis/rbac/validation/validation.go ValidatePolicyRule)
    for i, rule in enumerate(obj.get("rules") or ()):
        field = f"rules[{i}]"
        if not rule.get("verbs"):
            causes.required(f"{field}.verbs", "verbs must contain at least one value")
        if rule.get("nonResourceURLs"):
            if obj.get("kind") == "ClusterRole":  # a ClusterRole's rule is either non-resource or resource
                if rule.get("apiGroups") or rule.get("resources"):
                    causes.invalid(f"{field}.nonResourceURLs", rule["nonResourceURLs"],
                                   "rules cannot apply to both regular resources and non-resource URLs")
                continue
            causes.invalid(f"{field}.nonResourceURLs", rule["nonResourceURLs"],
                           "namespaced rules cannot apply to non-resource URLs")
        if not rule.get("apiGroups"):
            causes.required(f"{field}.apiGroups", "resource rules must supply at least one api group")
        if not rule.get("resources"):
            causes.required(f"{field}.resources", "resource rules must supply at least one resource")


def check_rolebinding(obj: Obj, old: Obj | None, causes: Causes) -> None:
    # roleRef Role/ClusterRole in rbac.authorization.k8s.io, immutable; subjects' kinds (k8s.io/kubernetes/pkg/apis/rbac/validation ValidateRoleBinding)
    ref = obj.get("roleRef") or {}
    if ref.get("apiGroup") != "rbac.authorization.k8s.io":
        causes.unsupported("roleRef.apiGroup", ref.get("apiGroup"), ("rbac.authorization.k8s.io",))
    kinds = ("ClusterRole",) if obj.get("kind") == "ClusterRoleBinding" else ("ClusterRole", "Role")
    if ref.get("kind") not in kinds:
        causes.unsupported("roleRef.kind", ref.get("kind"), kinds)
    if not ref.get("name"):
        causes.required("roleRef.name")
    for i, subject in enumerate(obj.get("subjects") or ()):
        if subject.get("kind") not in ("ServiceAccount", "User", "Group"):
            causes.unsupported(f"subjects[{i}].kind", subject.get("kind"), ("Group", "ServiceAccount", "User"))
        if not subject.get("name"):
            causes.required(f"subjects[{i}].name")
    if old is not None and ref != old.get("roleRef"):
        causes.invalid("roleRef", ref, "cannot change roleRef")


VALIDATORS = {"pods": check_pod, "deployments": check_workload, "replicasets": check_workload, "jobs": check_job,
              "services": check_service, "configmaps": check_data, "secrets": check_data, "roles": check_role,
              "rolebindings": check_rolebinding, "clusterroles": check_role, "clusterrolebindings": check_rolebinding}


def apply_defaults(kind: Kind, obj: Obj) -> None:
    """Defaulting, as the API server does on every write (only the fields our semantics read)."""
    # the defaults of each kind (k8s.io/kubernetes/pkg/apis/core/v1/defaults.go, k8s.io/kubernetes/pkg/apis/apps/v1/defaults.go, k8s.io/kubernetes/pkg/apis/batch/v1/defaults.go)
    meta = obj["metadata"]
    spec = obj.setdefault("spec", {}) if kind in (PODS, DEPLOYMENTS, REPLICASETS, JOBS, SERVICES, NODES,
                                                   NAMESPACES) else {}
    if kind is PODS:
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("schedulerName", "default-scheduler")
        for c in spec.get("containers") or ():  # a limit without a request: the request is the limit (SetDefaults_Pod)
            resources = c.get("resources") or {}
            if resources.get("limits"):
                resources["requests"] = {**resources["limits"], **(resources.get("requests") or {})}
    if kind is LIMITRANGES:
        for item in (obj.get("spec") or {}).get("limits") or ():
            limit_range_defaults(item)
    if kind in (DEPLOYMENTS, REPLICASETS, JOBS):
        template = spec.setdefault("template", {})
        template.setdefault("spec", {}).setdefault("restartPolicy", "Always")
    if kind in (DEPLOYMENTS, REPLICASETS):
        spec.setdefault("replicas", 1)
    if kind is DEPLOYMENTS:
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            rolling.setdefault("maxUnavailable", "25%")
            rolling.setdefault("maxSurge", "25%")
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
    if kind is JOBS:
        for key, value in (("parallelism", 1), ("completions", 1), ("backoffLimit", 6),
                           ("completionMode", "NonIndexed"), ("suspend", False)):
            spec.setdefault(key, value)
    if kind is SERVICES:
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or ():
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    if kind is SECRETS:
        obj.setdefault("type", "Opaque")
        data = {**(obj.get("data") or {}), **{k: base64.b64encode(str(v).encode()).decode()
                                                for k, v in (obj.pop("stringData", None) or {}).items()}}
        if data:
            obj["data"] = data
        for key, value in data.items():
            try:
                base64.b64decode(value, validate=True)
            except (ValueError, TypeError):
                raise fail(400, f"Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data in "
                                f"data[{key}]")
    if kind is NAMESPACES:
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta.get("name", "")
        spec.setdefault("finalizers", ["kubernetes"])
    if kind is NODES and not obj.get("status"):
        obj["status"] = node_status(110)


def node_status(pods: int, address: str = "10.128.0.1") -> Obj:
    capacity = {"cpu": "4", "memory": "16Gi", "pods": str(pods)}
    return {"capacity": capacity, "allocatable": dict(capacity),
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "addresses": [{"type": "InternalIP", "address": address}]}


# --- the handler ---------------------------------------------------------------------------------------------------

def parse_path(path: str) -> tuple[str | None, str | None, str | None, str | None, str | None, str | None]:
    """(group, version, namespace, plural, name, subresource) of an /api or /apis path; group None otherwise."""
    parts = path.split("/")
    if path.startswith("/api/"):
        group, rest = "", parts[2:]
    elif path.startswith("/apis/"):
        group, rest = parts[2], parts[3:]
    else:
        return None, None, None, None, None, None
    version, rest = (rest[0] or None, rest[1:]) if rest else (None, [])
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] or None if rest else None
    name = rest[1] or None if len(rest) > 1 else None
    return group, version, namespace, plural, name, "/".join(rest[2:]) or None


@attrs.define(kw_only=True)
class _KubeApi(kmock.KubernetesScaffold):
    """kmock's Kubernetes scaffold with strict CRUD, validation and controllers (runs on one event loop)."""

    token: str
    latency_s: float = 0.0
    users: dict[str, rbac.User] = attrs.field(factory=dict)  # bearer token → who it authenticates (besides `token`)
    seed: int = 0
    calls: list[tuple[str, str]] = attrs.field(factory=list)
    session: aiohttp.ClientSession | None = None
    objects: kmock.ObjectsArray = attrs.field(factory=kmock.ObjectsArray)
    failures: list[tuple[str, str, int]] = attrs.field(factory=list)
    job_callbacks: list[Callable[[Obj], Any]] = attrs.field(factory=list)
    backends: dict[tuple[str, str, str], str] = attrs.field(factory=dict)
    logs: dict[tuple[str, str], str] = attrs.field(factory=dict)
    previous_logs: dict[tuple[str, str], str] = attrs.field(factory=dict)  # (ns, pod) → the last terminated run's
    unpullable: dict[str, str] = attrs.field(factory=dict)  # image → the registry's refusal (pulls fail)
    _rv: int = 0
    _rng: random.Random = attrs.field(init=False)
    _seq: Iterable[int] = attrs.field(factory=itertools.count)
    _born: dict[str, int] = attrs.field(factory=dict)  # uid → creation order (precise; timestamps are seconds)
    _ready_at: dict[str, int] = attrs.field(factory=dict)  # uid → order of becoming Ready
    _ready_since: dict[str, float] = attrs.field(factory=dict)  # uid → clock() when it became Ready (minReadySeconds)
    clock: Callable[[], float] = time.monotonic
    _due: float | None = None  # when a Ready pod next becomes available (minReadySeconds): reconcile then
    _ips: Iterable[int] = attrs.field(factory=lambda: itertools.count(2))
    _index: dict[kmock.resource, dict[str | None, dict[str, None]]] = attrs.field(factory=dict)  # res → ns → names
    _refused: dict[str, str] = attrs.field(factory=dict)  # ReplicaSet uid → why its last pod creation was refused
    _deferred: bool = False  # creates leave the controllers to their caller (set_nodes runs them once)
    # A deleted namespace stays Terminating this long (its content goes at once), then goes: the namespace
    # controller empties it and removes its `kubernetes` finalizer, which takes a while on a real cluster. 0: at once.
    namespace_termination_s: float = 0.0
    # kube-scheduler's NodeResourcesFit filter: a pod fits a node only if its requests plus those of the pods bound
    # there stay within the node's status.allocatable cpu and memory ("Insufficient cpu"). Off by default: most tests
    # model a node by its pod count (set_nodes' capacities) and their nodes' cpu/memory are not the machine's.
    fit_resources: bool = False
    _terminating: dict[str, float] = attrs.field(factory=dict)  # namespace → clock() when it is finally removed
    streams: set[asyncio.Task] = attrs.field(factory=set)  # the port-forwards being served (ended on shutdown)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # kmock: discovery endpoints and the 404 fallback
        self._rng = random.Random(self.seed)
        for kind in KINDS.values():
            self.resources[kmock.resource(group=kind.group, version=kind.version, plural=kind.plural)] = \
                kmock.ResourceInfo(kind=kind.kind, namespaced=kind.namespaced, subresources=set(kind.subresources),
                                   verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update"})
        for name in PROTECTED_NAMESPACES:
            self.create(NAMESPACES, None, {"metadata": {"name": name}})
        # the controller's token: a member of system:masters (cluster-admin), as the GKE tests' controller has had
        self.users[self.token] = rbac.User("dasklab-controller", (rbac.MASTERS,))
        for role in rbac.DEFAULT_CLUSTER_ROLES:
            self.create(CLUSTERROLES, None, copy.deepcopy(role))
        for binding in rbac.DEFAULT_CLUSTER_ROLE_BINDINGS:
            self.create(CLUSTERROLEBINDINGS, None, copy.deepcopy(binding))

    # HTTP entry point: kmock's RawHandler.__call__, with our path parsing, auth, latency and injected failures.
    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw.read()
        path = raw.rel_url.path
        self.calls.append((raw.method, path))
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            header = raw.headers.get("Authorization", "")
            user = self.users.get(header[len("Bearer "):]) if header.startswith("Bearer ") else None
            if user is None:
# no or a wrong bearer token: 401 (kubernetes.io/docs/reference/access-authn-authz/authentication)
                raise fail(401, "Unauthorized")
            # authorization before any handler, so a refused request learns nothing of what exists (403 before 404)
            # (kubernetes.io/docs/reference/access-authn-authz/authorization/)
            attributes = rbac.request_attributes(raw.method, path, raw.query)
            _CALLER.set(user)  # this request's task alone: its RBAC writes are checked for escalation
            if not self.authorized(user, attributes):
                raise fail(403, rbac.forbidden_message(user, attributes), name=attributes.name,
                           group=attributes.api_group, kind=attributes.resource)
            if attributes.subresource in STREAMS and attributes.verb == "get" and _is_websocket(raw):
                # a WebSocket upgrade is a GET, authorized as `get`; since Kubernetes 1.35 it must also be allowed to
                # `create` the subresource (feature gate AuthorizePodWebsocketUpgradeCreatePermission, beta and on by
                # default; KEP-4006 "synthetic RBAC create authorization check", kubernetes/kubernetes#134577)
                creating = dataclasses.replace(attributes, verb="create")
                if not self.authorized(user, creating):
                    raise fail(403, rbac.forbidden_message(user, creating), name=attributes.name,
                               group=attributes.api_group, kind=attributes.resource)
            if raw.method == "POST" and path == SELF_REVIEWS:
                return self._json(self._self_review(user, body), 201)
            for failure in self.failures:
                if failure[0] == raw.method.upper() and failure[1] in path:
                    self.failures.remove(failure)
                    raise fail(failure[2], f"stand-in: injected failure for {raw.method} {path}")
            if self._due is not None and self.clock() >= self._due:
                self.reconcile()  # the Deployment controller requeues for minReadySeconds: a pod became available
            for ns in [ns for ns, at in self._terminating.items() if self.clock() >= at]:
                self._terminating.pop(ns)  # emptied and finalized: the namespace goes
                if (gone := self.find(NAMESPACES, None, ns)) is not None:
                    self._remove(NAMESPACES, gone)
            group, version, namespace, plural, name, sub = parse_path(path)
            try:
                data = json.loads(body) if body else None
            except ValueError:
                data = None
            url = raw.url if plural else raw.url.with_path(path.rstrip("/") or "/")  # kmock's discovery: no "/" end
            request = kmock.Request(
                id=len(self._requests), raw_request=raw, url=url, method=raw.method, params=dict(raw.query),
                headers=raw.headers, cookies=dict(raw.cookies), body=body, text=body.decode("utf-8", "replace"),
                data=data, namespace=namespace, name=name, subresource=sub,
                action=self._action(raw.method, group, name, raw.query),
                resource=None if group is None else kmock.resource(group=group, version=version, plural=plural))
            self._requests.append(request)
            return await self._handle(request)
        except kmock.KubernetesError as e:
            return await self._render_error(e)
        except Exception as e:  # a stand-in bug: answer 500 and re-raise from stop() (kmock's strict mode)
            self._errors[-1].append(e)
            return await self._render_error(e)

    def authorized(self, user: rbac.User, attributes: rbac.Attributes) -> bool:
        """RBAC on the stored ClusterRoleBindings and the RoleBindings of the request's namespace."""
        def role(kind: str, name: str) -> Obj | None:
            return self.find(CLUSTERROLES, None, name) if kind == "ClusterRole" else \
                self.find(ROLES, attributes.namespace, name) if kind == "Role" else None
        return rbac.authorize(user, attributes, self.stored(CLUSTERROLEBINDINGS),
                              self.stored(ROLEBINDINGS, attributes.namespace) if attributes.namespace else (), role)

    def _self_review(self, user: rbac.User, body: bytes) -> Obj:
        """SelfSubjectAccessReview (authorization.k8s.io/v1, what `kubectl auth can-i` sends): may I do this? The
        answer is status.allowed, evaluated as the request itself would be."""
        review = json.loads(body or b"{}")
        check_body(review, "SelfSubjectAccessReview", "authorization.k8s.io/v1")
        allowed = self.authorized(user, rbac.review_attributes(review.get("spec") or {}))
        return {**review, "kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                "status": {"allowed": allowed}}

    @staticmethod
    def _action(method: str, group: str | None, name: str | None, query: Mapping[str, str]) -> kmock.action | None:
        if group is None:
            return None
        if method == "GET":
            return kmock.action.WATCH if query.get("watch") in ("1", "true") else \
                kmock.action.FETCH if name else kmock.action.LIST
        return {"POST": None if name else kmock.action.CREATE, "PUT": kmock.action.UPDATE,
                "PATCH": kmock.action.UPDATE, "DELETE": kmock.action.DELETE}.get(method)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmock.KubernetesNotFoundError) and exc.reason != "NotFound":  # kmock's own 404 fallback
            exc = fail(404, "the server could not find the requested resource")
        if not isinstance(exc, kmock.KubernetesError):
            exc = fail(500, f"stand-in bug: {exc!r}")
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": exc.message,
                "reason": exc.reason, "code": exc.status}
        if exc.details:
            body["details"] = exc.details
        return aiohttp.web.json_response(body, status=exc.status)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or res.plural is None:
            return await super()._handle(request)  # kmock: discovery, or 404
        kind = KINDS.get((res.group, res.version, res.plural))
        ns, name, sub, method, params = request.namespace, request.name, request.subresource, request.method, \
            request.params
        if kind is None or (ns is not None and not kind.namespaced):
            raise fail(404, "the server could not find the requested resource")
        if params.get("watch") in ("1", "true") or "dryRun" in params:
            raise fail(400, "stand-in: watch and dryRun are not supported")
        if name is None:
            if sub is None and method == "GET":
                return self._json(self._list(kind, ns, params))
            if (kind.namespaced and ns is None) or sub is not None:
                raise fail(405, "the server does not allow this method on the requested resource")
            if method == "POST":
                return await self._create_request(kind, ns, request)
            if method == "DELETE" and kind is not NAMESPACES:
                return self._json(self._delete_collection(kind, ns, params))
        elif kind.namespaced and ns is None:
            raise fail(404, "the server could not find the requested resource")
        elif sub is None:
            if method == "GET":
                return self._json(self.read(kind, ns, name))
            if method in ("PUT", "PATCH"):
                current = self.read(kind, ns, name)
                new = request.data if method == "PUT" else apply_patch(
                    current, request.body, request.headers.get("Content-Type", ""))
                self._check_escalation(kind, ns, new)
                result = self._update(kind, current, new)
                self.reconcile(ns if kind.namespaced else None)
                return self._json(self.read(kind, ns, result["metadata"]["name"]))
            if method == "DELETE":
                return self._json(self._delete(kind, ns, name, params, request.data))
        elif sub.split("/")[0] not in kind.subresources:
            raise fail(404, "the server could not find the requested resource")
        elif sub == "proxy" or sub.startswith("proxy/"):
            return await self._proxy(ns, name, sub[len("proxy"):], request)
        elif sub in ("status", "scale") and method in ("GET", "PUT", "PATCH"):
            return self._json(self._subresource(kind, ns, name, sub, request))
        elif sub == "log" and method == "GET":
            return aiohttp.web.Response(text=self._log(ns, name, params), content_type="text/plain")
        elif sub in STREAMS:
            pod = self.read(kind, ns, name)
            if sub == "portforward" and method == "GET" and _is_websocket(request._raw_request):
                return await self._portforward(pod, request)
            # streams need an upgraded connection (SPDY or WebSocket); a plain request is refused 400
            # (k8s.io/apimachinery pkg/util/httpstream: "Upgrade request required"). Of the streams, the stand-in
            # serves port-forward over WebSocket only (no SPDY, no exec or attach).
            return aiohttp.web.Response(status=400, text="Upgrade request required")
        elif sub == "eviction" and method == "POST":
            self._remove(PODS, self.read(PODS, ns, name))
            self.reconcile()
            return self._json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                               "code": 201}, 201)
        raise fail(405, "the server does not allow this method on the requested resource")

    @staticmethod
    def _json(obj: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(obj, status=status)

    # --- store (kmock's ObjectsArray: one versioned history per (resource, namespace, name)) ---------------------

    def _key(self, kind: Kind, ns: str | None, name: str) -> tuple[kmock.resource, str | None, str]:
        res = kmock.resource(group=kind.group, version=kind.version, plural=kind.plural)
        return res, ns if kind.namespaced else None, name

    def find(self, kind: Kind, ns: str | None, name: str) -> Obj | None:
        key = self._key(kind, ns, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def read(self, kind: Kind, ns: str | None, name: str) -> Obj:
        obj = self.find(kind, ns, name)
        if obj is None:
            raise not_found(kind, name)
        return obj

    def stored(self, kind: Kind, ns: str | None = None) -> list[Obj]:
        res = self._key(kind, None, "")[0]
        spaces = self._index.get(res, {})
        names = [(ns, spaces.get(ns, ()))] if kind.namespaced and ns is not None else spaces.items()
        found = [copy.deepcopy(o.raw) for o_ns, in_ns in names for name in in_ns
                 if not (o := self.objects[res, o_ns, name]).deleted]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def _put(self, kind: Kind, obj: Obj) -> Obj:
        """Store ``obj`` as the next version with a new resourceVersion, unless nothing changed (a no-op write)."""
        meta = obj["metadata"]
        key = self._key(kind, meta.get("namespace"), meta["name"])
        stored = self.objects[key] if key in self.objects else None
        if stored is not None and not stored.deleted and without_rv(stored.raw) == without_rv(obj):
            return copy.deepcopy(stored.raw)
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        if stored is None:
            self.objects[key] = copy.deepcopy(obj)
            self._index.setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = None
        else:
            stored.history.append(copy.deepcopy(obj))
        return copy.deepcopy(obj)

    def _save(self, kind: Kind, obj: Obj) -> Obj:
        """Store a new version of an existing object, bumping metadata.generation when its spec changed."""
        live = self.find(kind, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if live is not None and spec_part(obj) != spec_part(live):
            obj["metadata"]["generation"] = live["metadata"].get("generation", 1) + 1
        return self._put(kind, obj)

    def _insert(self, kind: Kind, obj: Obj) -> Obj:
        meta = obj["metadata"]
        meta.setdefault("uid", self._uid())
        meta.update(creationTimestamp=now(), generation=1)
        self._born[meta["uid"]] = next(self._seq)
        return self._put(kind, obj)

    def _uid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def _generate_name(self, kind: Kind, ns: str | None, prefix: str) -> str:
        while True:
            name = prefix[:58] + "".join(self._rng.choice(SAFE) for _ in range(5))
            if self.find(kind, ns, name) is None:
                return name

    # --- API verbs -------------------------------------------------------------------------------------------------

    def _list(self, kind: Kind, ns: str | None, params: Mapping[str, str]) -> Obj:
        items = self._select(kind, ns, params)
        try:
            start = int(base64.urlsafe_b64decode(params["continue"]).decode()) if params.get("continue") else 0
            limit = int(params.get("limit") or 0)
        except ValueError:
            raise fail(400, "continue key is not valid")
        meta: Obj = {"resourceVersion": str(self._rv)}
        if limit and start + limit < len(items):
            meta.update(remainingItemCount=len(items) - start - limit,
                        **{"continue": base64.urlsafe_b64encode(str(start + limit).encode()).decode()})
        page = items[start:start + limit] if limit else items[start:]
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": meta, "items": page}

    def _select(self, kind: Kind, ns: str | None, params: Mapping[str, str]) -> list[Obj]:
        try:
            reqs = parse_selector(params.get("labelSelector", ""))
        except ValueError as e:
            raise fail(400, str(e))
        fields = field_filter(kind, params.get("fieldSelector", ""))
        return [o for o in self.stored(kind, ns) if selects(reqs, o["metadata"].get("labels") or {}) and fields(o)]

    def _check_escalation(self, kind: Kind, ns: str | None, obj: Any) -> None:
        """RBAC's privilege escalation prevention (rbac.py: the reference's rules) on a create or update of a Role,
        ClusterRole or binding by the request's caller: a role only with every permission it grants held at its scope,
        or `escalate` on roles/clusterroles; a binding only with every permission of the role it references held at
        the binding's scope, or `bind` on that role. 403 naming what is not held, as the API server does."""
        user = _CALLER.get(None)
        if user is None or kind not in (ROLES, CLUSTERROLES, ROLEBINDINGS, CLUSTERROLEBINDINGS) or \
                not isinstance(obj, dict):
            return
        scope = ns if kind.namespaced else ""

        def role(ref_kind: str, name: str) -> Obj | None:
            return self.find(CLUSTERROLES, None, name) if ref_kind == "ClusterRole" else \
                self.find(ROLES, scope, name) if ref_kind == "Role" and scope else None
        name = (obj.get("metadata") or {}).get("name", "")
        if kind in (ROLES, CLUSTERROLES):
            rules, verb, target = obj.get("rules") or [], "escalate", (kind.plural, name)
        else:
            ref = obj.get("roleRef") or {}
            rules = (role(ref.get("kind", ""), ref.get("name", "")) or {}).get("rules") or []
            verb = "bind"
            target = ("clusterroles" if ref.get("kind") == "ClusterRole" else "roles", ref.get("name", ""))
        if self.authorized(user, rbac.Attributes(verb=verb, resource=target[0], api_group=rbac.RBAC_GROUP,
                                                 namespace=scope, name=target[1])):
            return
        held = rbac.held_rules(user, scope, self.stored(CLUSTERROLEBINDINGS),
                               self.stored(ROLEBINDINGS, scope) if scope else (), role)
        missing = rbac.not_held(held, rules)
        if missing:
            raise fail(403, f'{kind.qualified} "{name}" is forbidden: user "{user.name}" (groups='
                            f'{json.dumps(list(user.all_groups))}) is attempting to grant RBAC permissions not currently held:\n'
                            + "\n".join(missing), name=name, group=kind.group, kind=kind.plural)

    async def _create_request(self, kind: Kind, ns: str | None, request: kmock.Request) -> aiohttp.web.Response:
        self._check_escalation(kind, ns, request.data)
        created = self.create(kind, ns, request.data)
        if kind is JOBS:
            for callback in self.job_callbacks:  # in a worker thread, so it may call this server with the real client
                try:
                    await asyncio.get_running_loop().run_in_executor(None, callback, copy.deepcopy(created))
                except Exception as e:
                    self._errors[-1].append(e)
        return self._json(created, 201)

    def create(self, kind: Kind, ns: str | None, body: Any) -> Obj:
        """POST semantics: namespace admission (404), validation (422), uniqueness (409); then controllers."""
        obj = copy.deepcopy(check_body(body, kind.kind, kind.api_version))
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise fail(400, "the namespace of the provided object does not match the namespace sent on the "
                                "request")
            meta["namespace"] = ns
            if self.find(NAMESPACES, None, ns) is None:
                raise not_found(NAMESPACES, ns)
            if ns in self._terminating:
                # the NamespaceLifecycle admission plugin refuses any create in a namespace being deleted, 403 with a
                # NamespaceTerminating cause (k8s.io/apiserver pkg/admission/plugin/namespace/lifecycle/admission.go)
                raise fail(403, f'{kind.qualified} "{meta.get("name") or ""}" is forbidden: unable to create new '
                                f"content in namespace {ns} because it is being terminated",
                           name=meta.get("name"), group=kind.group, kind=kind.plural,
                           causes=[{"reason": "NamespaceTerminating", "field": "metadata.namespace",
                                    "message": f"namespace {ns} is being terminated"}])
        else:
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise fail(500, "resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = self._generate_name(kind, ns, meta["generateName"])
        obj.update(apiVersion=kind.api_version, kind=kind.kind)
        if "status" in kind.subresources and kind is not NODES:
            obj.pop("status", None)
        apply_defaults(kind, obj)
        self._validate(kind, obj, None)
        if self.find(kind, ns, meta["name"]) is not None:
            raise fail(409, f'{kind.qualified} "{meta["name"]}" already exists', reason="AlreadyExists",
                       name=meta["name"], group=kind.group, kind=kind.plural)
        if kind is PODS and (refusal := self._pod_admission(obj)):
            raise fail(403, f'pods "{meta["name"]}" is forbidden: {refusal}', name=meta["name"], kind="pods")
        meta["uid"] = self._uid()
        self._admit(kind, obj)
        self._insert(kind, obj)
        if kind is NAMESPACES:  # the ServiceAccount controller gives every namespace its "default" account
            self._insert(SERVICEACCOUNTS, {"apiVersion": "v1", "kind": "ServiceAccount",
                                           "metadata": {"name": "default", "namespace": meta["name"]}})
        if not self._deferred:
            self.reconcile(ns if kind.namespaced else None)
        return self.read(kind, ns, meta["name"])

    def _admit(self, kind: Kind, obj: Obj) -> None:
        """Server-populated fields on create."""
        meta, spec = obj["metadata"], obj.get("spec", {})
        if kind is NAMESPACES:
            obj["status"] = {"phase": "Active"}
        if kind is PODS:
            obj["status"] = {"phase": "Pending"}
        if kind is SERVICES and spec.get("type") != "ExternalName" and not spec.get("clusterIP"):
            n = next(self._ips)
            spec["clusterIP"] = f"10.96.{n // 250}.{n % 250 + 1}"
            spec["clusterIPs"] = [spec["clusterIP"]]
        if kind is JOBS:
            uid, name = meta["uid"], meta["name"]
            labels = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                      "controller-uid": uid, "job-name": name}
            spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
            template_meta = spec["template"].setdefault("metadata", {})
            template_meta["labels"] = {**labels, **(template_meta.get("labels") or {})}

    def _validate(self, kind: Kind, obj: Obj, old: Obj | None) -> None:
        causes, meta = Causes(), obj["metadata"]
        name = meta.get("name") or ""
        if not name:
            causes.required("metadata.name", "name or generateName is required")
        for problem in name_problems(kind.name_rule, name) if name else ():
            causes.invalid("metadata.name", name, problem)
        check_labels(meta.get("labels") or {}, "metadata.labels", causes)
        for key in meta.get("annotations") or {}:
            for problem in key_problems(key):
                causes.invalid("metadata.annotations", key, problem)
        if len(json.dumps(meta.get("annotations") or {})) > 262144:
            causes.add("metadata.annotations", "FieldValueTooLong", "Too long: must have at most 262144 bytes")
        if kind.plural in VALIDATORS:
            VALIDATORS[kind.plural](obj, old, causes)
        if kind is NAMESPACES and old is None:  # PodSecurity admission: "require valid labels on create"
            for label, value, why in pod_security.label_problems(meta.get("labels") or {}):
                causes.invalid(f"metadata.labels[{label}]", value, why)
        for path, message in schema_problems(obj):  # every object written, against the official schema too
            causes.add(path, "FieldValueInvalid", f"does not match the OpenAPI schema: {message}")
        causes.raise_for(kind, name)

    def _update(self, kind: Kind, old: Obj, new: Any, status_only: bool = False) -> Obj:
        """PUT/PATCH semantics: identity checks (400), uid and resourceVersion preconditions (409), validation (422)."""
        new = copy.deepcopy(check_body(new, kind.kind, kind.api_version))
        om, nm = old["metadata"], new.setdefault("metadata", {})
        name = om["name"]
        if nm.get("name", name) != name:
            raise fail(400, f"the name of the object ({nm.get('name')}) does not match the name on the URL ({name})")
        if kind.namespaced and nm.get("namespace", om["namespace"]) != om["namespace"]:
            raise fail(400, "the namespace of the provided object does not match the namespace sent on the request")
        if nm.get("uid") and nm["uid"] != om["uid"]:
            raise conflict(kind, name, f"Precondition failed: UID in precondition: {om['uid']}, UID in object meta: "
                                       f"{nm['uid']}")
        if nm.get("resourceVersion") and nm["resourceVersion"] != om["resourceVersion"]:
            raise conflict(kind, name)
        if status_only:
            result = copy.deepcopy(old)
            result["status"] = new.get("status") or {}
            return self._put(kind, result)
        for key in ("uid", "creationTimestamp", "generation", "name", "namespace"):
            nm.pop(key, None)
            if key in om:
                nm[key] = om[key]
        new.update(apiVersion=kind.api_version, kind=kind.kind)
        if "status" in kind.subresources:  # the main resource ignores status changes
            new["status"] = copy.deepcopy(old.get("status") or {})
        if kind is SERVICES and not new.get("spec", {}).get("clusterIP"):
            new.setdefault("spec", {}).update({k: v for k, v in old["spec"].items() if k.startswith("clusterIP")})
        apply_defaults(kind, new)
        self._validate(kind, new, old)
        return self._save(kind, new)

    def _subresource(self, kind: Kind, ns: str, name: str, sub: str, request: kmock.Request) -> Obj:
        current = self.read(kind, ns, name)
        view = self._scale(current) if sub == "scale" else current
        if request.method == "GET":
            return view
        body = request.data if request.method == "PUT" else apply_patch(
            view, request.body, request.headers.get("Content-Type", ""))
        if sub == "status":
            self._update(kind, current, body, status_only=True)
        else:
            check_body(body, "Scale", "autoscaling/v1")
            meta = body.get("metadata") or {}
            if meta.get("name", name) != name:
                raise fail(400, f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                                f"({name})")
            if meta.get("resourceVersion") and meta["resourceVersion"] != current["metadata"]["resourceVersion"]:
                raise conflict(kind, name)
            replicas = (body.get("spec") or {}).get("replicas", 0)
            if not isinstance(replicas, int) or replicas < 0:
                causes = Causes()
                causes.invalid("spec.replicas", replicas, "must be greater than or equal to 0")
                causes.raise_for("Scale", name, "autoscaling")
            new = copy.deepcopy(current)
            new["spec"]["replicas"] = replicas
            self._update(kind, current, without_rv(new))
        self.reconcile()
        current = self.read(kind, ns, name)
        return self._scale(current) if sub == "scale" else current

    @staticmethod
    def _scale(obj: Obj) -> Obj:
        meta = obj["metadata"]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")},
                "spec": omit_zero({"replicas": obj["spec"].get("replicas", 0)}),
                "status": {"replicas": obj.get("status", {}).get("replicas", 0),
                           "selector": selector_string(obj["spec"]["selector"])}}

    def _delete(self, kind: Kind, ns: str | None, name: str, params: Mapping[str, str], body: Any) -> Obj:
        current = self.read(kind, ns, name)
        options = body if isinstance(body, dict) else {}
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != current["metadata"]["uid"]:
            raise conflict(kind, name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                                       f"{current['metadata']['uid']}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != current["metadata"]["resourceVersion"]:
            raise conflict(kind, name, f"Precondition failed: ResourceVersion in precondition: "
                                       f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                                       f"{current['metadata']['resourceVersion']}")
        if kind is NAMESPACES and name in PROTECTED_NAMESPACES:
            raise fail(403, f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                       name=name, kind="namespaces")
        if kind is NAMESPACES and self.namespace_termination_s > 0:  # Terminating a while, its content gone at once
            if name not in self._terminating:
                self._empty(name)
                current["status"] = {"phase": "Terminating"}
                current["metadata"]["deletionTimestamp"] = now()
                current = self._put(NAMESPACES, current)
                self._terminating[name] = self.clock() + self.namespace_termination_s
                self.reconcile()
            return current
        policy = params.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
        self._remove(kind, current, orphan=policy == "Orphan")
        self.reconcile()
        if kind is NAMESPACES:  # real: Terminating until its content is gone; here the content is gone at once
            current["status"] = {"phase": "Terminating"}
            current["metadata"]["deletionTimestamp"] = now()
        if kind in (PODS, SERVICES, SERVICEACCOUNTS, NAMESPACES):  # these answer with the object, others a Status
            return current
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {k: v for k, v in (("name", name), ("group", kind.group), ("kind", kind.plural),
                                              ("uid", current["metadata"]["uid"])) if v}}

    def _delete_collection(self, kind: Kind, ns: str | None, params: Mapping[str, str]) -> Obj:
        items = self._select(kind, ns, params)
        for item in items:
            self._remove(kind, item, orphan=params.get("propagationPolicy") == "Orphan")
        self.reconcile()
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _remove(self, kind: Kind, obj: Obj, orphan: bool = False) -> None:
        """Delete now, with garbage collection: namespace content, pods of a removed node, owned dependents."""
        meta = obj["metadata"]
        key = self._key(kind, meta.get("namespace"), meta["name"])
        if key not in self.objects or self.objects[key].deleted:
            return
        self.objects[key].delete()
        self._rv += 1
        self.logs.pop((meta.get("namespace"), meta["name"]), None)
        self.previous_logs.pop((meta.get("namespace"), meta["name"]), None)
        if kind is NAMESPACES:
            self._empty(meta["name"])
            return
        if kind is NODES:
            for pod in self.stored(PODS):
                if pod["spec"].get("nodeName") == meta["name"]:
                    self._remove(PODS, pod)
        for dependent_kind in KINDS.values():
            if dependent_kind.namespaced != kind.namespaced:
                continue
            for dependent in self.stored(dependent_kind, meta.get("namespace")):
                if not owned_by(dependent, obj):
                    continue
                if orphan:
                    dependent["metadata"]["ownerReferences"] = [
                        r for r in dependent["metadata"]["ownerReferences"] if r.get("uid") != meta["uid"]]
                    self._put(dependent_kind, dependent)
                else:
                    self._remove(dependent_kind, dependent)

    def _empty(self, ns: str) -> None:
        """The namespace controller's work: every object in the namespace deleted."""
        for dependent_kind in KINDS.values():
            for dependent in self.stored(dependent_kind, ns) if dependent_kind.namespaced else ():
                self._remove(dependent_kind, dependent)

    def _log(self, ns: str, name: str, params: Mapping[str, str]) -> str:
        pod = self.read(PODS, ns, name)
        containers = [c["name"] for c in pod["spec"].get("containers") or ()]
        container = params.get("container")
        if container is None and len(containers) > 1:
            raise fail(400, f"a container name must be specified for pod {name}, choose one of: "
                            f"[{' '.join(containers)}]")
        if container is not None and container not in containers:
            raise fail(400, f"container {container} is not valid for pod {name}")
        if params.get("previous") in ("true", "True", "1"):
            # previous=true: "Return previous terminated container logs" (PodLogOptions); none → 400 (kubelet's
            # "previous terminated container … not found")
            if (ns, name) not in self.previous_logs:
                raise fail(400, f'previous terminated container "{container or containers[0]}" in pod "{name}" '
                                f"not found")
            text = self.previous_logs[(ns, name)]
        elif pod.get("status", {}).get("phase") == "Pending":
            waiting = next((c["state"]["waiting"].get("reason") for c in pod["status"].get("containerStatuses") or ()
                            if "waiting" in c.get("state", {})), "ContainerCreating")
            raise fail(400, f'container "{container or containers[0]}" in pod "{name}" is waiting to start: '
                            f"{waiting}")
        else:
            text = self.logs.get((ns, name), "")
        if params.get("tailLines"):
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(params["tailLines"]):]) if int(params["tailLines"]) else ""
        if params.get("limitBytes"):  # PodLogOptions.limitBytes: "the number of bytes to read from the server
            # before terminating the log output" — from the log's start
            text = text.encode()[:int(params["limitBytes"])].decode(errors="ignore")
        return text

    async def _proxy(self, ns: str, ref: str, rest: str, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """/services/[scheme:]NAME[:PORT]/proxy/PATH → the backend registered for that service port."""
        parts = ref.split(":")
        name, port = (parts[-2], parts[-1]) if len(parts) > 1 else (parts[0], "")
        service = self.read(SERVICES, ns, name)
        ports = service["spec"].get("ports") or []
        if port.isdigit():
            spec = next((p for p in ports if p.get("port") == int(port)), None)
            if spec is None:
                raise fail(503, f'no service port {port} found for service "{name}"')
        else:
            spec = next((p for p in ports if (p.get("name") or "") == port), None)
        backend = spec and (self.backends.get((ns, name, str(spec["port"])))
                            or self.backends.get((ns, name, spec.get("name") or "")))
        if backend is None:
            raise fail(503, f'no endpoints available for service "{ref}"')
        raw: aiohttp.web.BaseRequest = request._raw_request
        url = backend.rstrip("/") + urllib.parse.quote(rest or "/", safe="/:@!$&'()*+,;=-._~")
        if raw.rel_url.raw_query_string:
            url += "?" + raw.rel_url.raw_query_string
        headers = {k: v for k, v in raw.headers.items() if k.lower() in ("content-type", "accept")}
        try:
            async with self.session.request(raw.method, yarl.URL(url, encoded=True), data=request.body,
                                            headers=headers, allow_redirects=False) as response:
                payload = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            # refused, reset or timed out alike: the apiserver's proxy transport (k8s.io/apimachinery
            # pkg/util/proxy/transport.go, RoundTrip) returns NewServiceUnavailable("error trying to reach service: …")
            raise fail(503, f"error trying to reach service: {e or 'timeout'}")
        content_type = response.headers.get("Content-Type")
        return aiohttp.web.Response(status=response.status, body=payload,
                                    headers={"Content-Type": content_type} if content_type else None)

    def _pod_backend(self, pod: Obj, port: int) -> tuple[str, int] | None:
        """What answers on the pod's `port`: the registered backend of a Service of its namespace that selects the pod
        and targets that port (a number, or the name of one of the pod's container ports). A stand-in has no pod
        network: a pod's port is what its Services' proxy reaches."""
        ns, labels = pod["metadata"]["namespace"], pod["metadata"].get("labels") or {}
        named = {p.get("name"): p.get("containerPort") for c in pod["spec"].get("containers") or ()
                 for p in c.get("ports") or () if p.get("name")}
        for service in self.stored(SERVICES, ns):
            selector = service["spec"].get("selector") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for spec in service["spec"].get("ports") or ():
                target = spec.get("targetPort", spec.get("port"))
                if (named.get(target) if isinstance(target, str) else target) != port:
                    continue
                name = service["metadata"]["name"]
                url = self.backends.get((ns, name, str(spec["port"]))) or self.backends.get((ns, name,
                                                                                           spec.get("name") or "-"))
                if url:
                    return yarl.URL(url).host, yarl.URL(url).port
        return None

    async def _portforward(self, pod: Obj, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """pods/NAME/portforward?ports=P[,Q] over WebSocket, as the API server relays it to the kubelet (k8s.io/kubernetes
        pkg/kubelet/cri/streaming/portforward/websocket.go, handleWebSocketStreams): the pod must be bound to a node
        (pkg/registry/core/pod/strategy.go streamLocation: "pod X does not have a host assigned", 400); each port must
        parse as 1..65535 (NewV4Options); a client offering subprotocols must offer one served (wsstream Conn.Open's
        handshake refuses the upgrade otherwise). Then, per port i, the port number (uint16 little-endian) is written
        first on channel 2i and 2i+1; the port's bytes are spliced both ways on 2i; an error forwarding it is written
        as text on 2i+1 ("error forwarding port P to pod NAME, uid UID: …"); the connection closes once every port's
        stream has ended (or when the client closes it)."""
        raw: aiohttp.web.BaseRequest = request._raw_request
        meta = pod["metadata"]
        if not pod["spec"].get("nodeName"):
            raise fail(400, f"pod {meta['name']} does not have a host assigned")
        texts = [p for text in raw.query.getall("ports", []) for p in text.split(",")]
        if not texts:
            raise fail(400, 'query parameter "port" is required')
        if not all(t.isdigit() and 0 < int(t) < 65536 for t in texts):
            raise fail(400, f"unable to parse {','.join(texts)!r} as a port")
        ports = [int(t) for t in texts]
        offered = [p.strip() for p in raw.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        if offered and PORTFORWARD_PROTOCOL not in offered:
            raise fail(400, f"unable to upgrade: requested protocol(s) are not supported: {offered}; supports "
                            f"{[PORTFORWARD_PROTOCOL]}")
        ws = aiohttp.web.WebSocketResponse(protocols=(PORTFORWARD_PROTOCOL,), autoping=True)
        await ws.prepare(raw)
        this = asyncio.current_task()
        self.streams.add(this)
        this.add_done_callback(self.streams.discard)
        sending = asyncio.Lock()

        async def send(channel: int, data: bytes) -> None:
            async with sending:
                await ws.send_bytes(bytes((channel,)) + data)

        for i, port in enumerate(ports):
            await send(2 * i, port.to_bytes(2, "little"))
            await send(2 * i + 1, port.to_bytes(2, "little"))
        writers: dict[int, asyncio.StreamWriter] = {}
        readers: dict[int, asyncio.StreamReader] = {}
        for i, port in enumerate(ports):
            backend = self._pod_backend(pod, port)
            try:
                if backend is None:
                    raise ConnectionRefusedError(f"dial tcp4 127.0.0.1:{port}: connect: connection refused")
                readers[i], writers[i] = await asyncio.open_connection(*backend)
            except OSError as e:
                await send(2 * i + 1, f"error forwarding port {port} to pod {meta['name']}, uid {meta.get('uid')}: "
                                      f"{e}".encode())

        async def from_pod(i: int) -> None:
            try:
                while data := await readers[i].read(65536):
                    await send(2 * i, data)
            except OSError as e:
                await send(2 * i + 1, f"error forwarding port {ports[i]} to pod {meta['name']}, uid {meta.get('uid')}: "
                                      f"{e}".encode())

        async def from_client() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                    continue
                channel, data = msg.data[0], msg.data[1:]
                if channel % 2 == 0 and channel // 2 in writers:
                    writers[channel // 2].write(data)
                    await writers[channel // 2].drain()

        pumps = asyncio.gather(*(from_pod(i) for i in readers))
        client = asyncio.ensure_future(from_client())
        try:
            await asyncio.wait({pumps, client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for writer in writers.values():
                writer.close()
            pumps.cancel(), client.cancel()
            await asyncio.gather(pumps, client, return_exceptions=True)
            await ws.close()
        return ws

    # --- controllers: run synchronously after every change, so a response already reflects their work ---------------

    def reconcile(self, ns: str | None = None) -> None:
        """The controllers' passes until nothing changes (a rollout takes several: a ReplicaSet scaled up, its pods
        started, then the old one scaled down), so a response reflects every step that needs no time to pass.
        With `ns` (a write to a namespaced object) over that namespace only: Deployments, ReplicaSets, Jobs and Pods
        own only objects of their namespace (ownerReferences are namespace-local), so nothing elsewhere has changed
        (a class of 100 labs would otherwise redo every namespace on every write). Node changes reconcile all."""
        for round_ in range(50):
            before = self._rv
            for deployment in self.stored(DEPLOYMENTS, ns):
                self._sync_deployment(deployment)
            for replicaset in self.stored(REPLICASETS, ns):
                self._sync_replicaset(replicaset)
            for job in self.stored(JOBS, ns):
                self._sync_job(job)
            self._schedule(ns, pull_again=round_ == 0)  # a failed pull is retried once per change, not per round
            for replicaset in self.stored(REPLICASETS, ns):
                self._replicaset_status(replicaset)
            for deployment in self.stored(DEPLOYMENTS, ns):
                self._deployment_status(deployment)
            for quota in self.stored(RESOURCEQUOTAS, ns):  # the quota controller: status.hard and status.used
                hard, used = quota["spec"].get("hard") or {}, self._quota_used(quota["metadata"]["namespace"])
                status = {"hard": dict(hard), "used": {k: show_quantity(k, used[k]) for k in hard}}
                if quota.get("status") != status:
                    quota["status"] = status
                    self._put(RESOURCEQUOTAS, quota)
            if self._rv == before:
                break
        held = [rs for rs in self.stored(REPLICASETS, ns) if rs["spec"].get("minReadySeconds")]
        due = min((since + rs["spec"]["minReadySeconds"] for rs in held for pod in self._owned(PODS, rs)
                   if (since := self._ready_since.get(pod["metadata"]["uid"])) is not None
                   and since + rs["spec"]["minReadySeconds"] > self.clock()), default=None)
        # scoped: another namespace's wake-up is kept (one past due only costs a reconcile that recomputes it)
        kept = [d for d in (due, self._due if ns is not None else None) if d is not None]
        self._due = min(kept, default=None)

    def _available(self, pod: Obj, min_ready_s: int) -> bool:
        """"A Pod is available when it is ready for at least minReadySeconds" (Deployment docs, Min Ready Seconds)."""
        since = self._ready_since.get(pod["metadata"]["uid"])
        return is_ready(pod) and since is not None and self.clock() - since >= min_ready_s

    def _owned(self, kind: Kind, owner: Obj, active_pods_only: bool = True) -> list[Obj]:
        found = [o for o in self.stored(kind, owner["metadata"]["namespace"]) if owned_by(o, owner)]
        return [p for p in found if is_active(p)] if kind is PODS and active_pods_only else found

    def _sync_deployment(self, deployment: Obj) -> None:
        """The Deployment controller (kubernetes.io/docs/concepts/workloads/controllers/deployment/, and
        pkg/controller/deployment sync.go / rolling.go / recreate.go for the arithmetic):
        - one ReplicaSet per pod template, `<name>-<pod-template-hash>`, the hash a label of the ReplicaSet, its
          selector and its pods ("Pod-template-hash label"); it carries `deployment.kubernetes.io/revision`, one
          above the highest of its siblings when it becomes the new one (a rollback re-uses the old ReplicaSet under
          a new revision), and the Deployment carries the new ReplicaSet's revision; `minReadySeconds` is copied;
        - RollingUpdate: the new ReplicaSet grows while all pods stay within replicas + maxSurge; then the old
          ones shrink so at least replicas − maxUnavailable pods stay *available* (unavailable old pods go first,
          then the oldest ReplicaSets), a scale-up pass ending the sync as it does in the controller;
        - Recreate: "All existing Pods are killed before new ones are created".
        Proportional scaling of a rollout whose replicas change midway is not modelled."""
        spec, meta = deployment["spec"], deployment["metadata"]
        template = copy.deepcopy(spec["template"])
        pth = template_hash(template)
        template.setdefault("metadata", {})["labels"] = {**(template["metadata"].get("labels") or {}),
                                                          "pod-template-hash": pth}
        rs_name = f"{meta['name']}-{pth}"
        owned = self._owned(REPLICASETS, deployment)
        new = next((rs for rs in owned if rs["metadata"]["name"] == rs_name), None)
        old = sorted((rs for rs in owned if rs["metadata"]["name"] != rs_name),
                     key=lambda rs: self._born.get(rs["metadata"]["uid"], 0))
        revision = lambda rs: int((rs["metadata"].get("annotations") or {}).get(REVISION, 0))  # noqa: E731
        top = max(map(revision, old), default=0)
        if new is None:
            selector = copy.deepcopy(spec["selector"])
            selector["matchLabels"] = {**(selector.get("matchLabels") or {}), "pod-template-hash": pth}
            first = 0 if old and (spec.get("strategy") or {}).get("type") == "Recreate" else \
                min(spec["replicas"], max(0, spec["replicas"] + rolling_fenceposts(deployment)[0]
                                          - sum(rs["spec"]["replicas"] for rs in old))) if old else spec["replicas"]
            new = self._insert(REPLICASETS, {
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": rs_name, "namespace": meta["namespace"],
                             "labels": dict(template["metadata"]["labels"]),
                             "annotations": {REVISION: str(top + 1)},
                             "ownerReferences": [owner_ref(DEPLOYMENTS, deployment)]},
                "spec": {"replicas": first, "minReadySeconds": spec.get("minReadySeconds", 0), "selector": selector,
                         "template": template}})
        changed = {}
        if revision(new) <= top:
            changed["revision"] = str(top + 1)
        if new["spec"].get("minReadySeconds", 0) != spec.get("minReadySeconds", 0):
            changed["minReadySeconds"] = spec.get("minReadySeconds", 0)
        if changed:
            if "revision" in changed:
                new["metadata"].setdefault("annotations", {})[REVISION] = changed["revision"]
            new["spec"]["minReadySeconds"] = spec.get("minReadySeconds", 0)
            new = self._save(REPLICASETS, new)
        if (meta.get("annotations") or {}).get(REVISION) != new["metadata"]["annotations"][REVISION]:
            meta.setdefault("annotations", {})[REVISION] = new["metadata"]["annotations"][REVISION]
            self._put(DEPLOYMENTS, deployment)  # an annotation: no new generation
        for rs in old:  # every ReplicaSet follows the Deployment's minReadySeconds
            if rs["spec"].get("minReadySeconds", 0) != spec.get("minReadySeconds", 0):
                rs["spec"]["minReadySeconds"] = spec.get("minReadySeconds", 0)
                self._save(REPLICASETS, rs)

        def scale(rs: Obj, replicas: int) -> None:
            if rs["spec"]["replicas"] != replicas:
                rs["spec"]["replicas"] = replicas
                self._save(REPLICASETS, rs)

        if (spec.get("strategy") or {}).get("type") == "Recreate":
            for rs in old:
                scale(rs, 0)
            if not any(self._owned(PODS, rs) for rs in old):  # new pods only once the old are gone
                scale(new, spec["replicas"])
            return
        surge, unavailable = rolling_fenceposts(deployment)
        want = spec["replicas"]
        if new["spec"]["replicas"] > want:
            scale(new, want)
        elif new["spec"]["replicas"] < want:
            current = sum(rs["spec"]["replicas"] for rs in [new, *old])
            if current < want + surge:
                scale(new, new["spec"]["replicas"] + min(want + surge - current, want - new["spec"]["replicas"]))
                return  # scaled up: the controller ends this sync here
        if not any(rs["spec"]["replicas"] for rs in old):
            return
        min_ready = spec.get("minReadySeconds", 0)
        available = {rs["metadata"]["name"]: sum(self._available(p, min_ready) for p in self._owned(PODS, rs))
                     for rs in [new, *old]}
        min_available = want - unavailable
        new_unavailable = new["spec"]["replicas"] - available[new["metadata"]["name"]]
        budget = sum(rs["spec"]["replicas"] for rs in [new, *old]) - min_available - new_unavailable
        for rs in old:  # cleanupUnhealthyReplicas: unavailable old pods first, within the budget
            if budget <= 0:
                break
            cut = min(budget, rs["spec"]["replicas"] - available[rs["metadata"]["name"]])
            if cut > 0:
                scale(rs, rs["spec"]["replicas"] - cut)
                budget -= cut
        spare = sum(available.values()) - min_available  # scaleDownOldReplicaSetsForRollingUpdate
        for rs in old:
            if spare <= 0:
                break
            cut = min(spare, rs["spec"]["replicas"])
            if cut > 0:
                scale(rs, rs["spec"]["replicas"] - cut)
                spare -= cut

    def _sync_replicaset(self, replicaset: Obj) -> None:
        pods = self._owned(PODS, replicaset)
        want = replicaset["spec"].get("replicas", 1)
        for _ in range(want - len(pods)):
            self._spawn_pod(REPLICASETS, replicaset, replicaset["spec"]["template"], replicaset["metadata"]["name"])
        if len(pods) > want:
            on_node = Counter(p["spec"].get("nodeName", "") for p in self._related_pods(replicaset))
            for pod in sorted(pods, key=lambda p: self._deletion_order(p, on_node))[:len(pods) - want]:
                self._remove(PODS, pod)

    def _related_pods(self, replicaset: Obj) -> list[Obj]:
        """Active pods of every ReplicaSet with the same owner (the Deployment), for the "doubled up" rank."""
        owners = {r.get("uid") for r in replicaset["metadata"].get("ownerReferences") or () if r.get("controller")}
        siblings = [rs for rs in self.stored(REPLICASETS, replicaset["metadata"]["namespace"])
                    if owners & {r.get("uid") for r in rs["metadata"].get("ownerReferences") or ()}] or [replicaset]
        return [pod for rs in siblings for pod in self._owned(PODS, rs)]

# the ReplicaSet's ranking of pods to delete: unscheduled, pending, not ready, lower pod-deletion-cost, more pods on the node, newer (pkg/controller/controller_utils.go ActivePodsWithRanks)
    def _deletion_order(self, pod: Obj, on_node: Counter) -> tuple:
        """Sort key, first deleted first: controller.ActivePodsWithRanks.Less of kubernetes/pkg/controller.

        1 unassigned < assigned; 2 Pending < Unknown < Running; 3 not ready < ready; 4 lower pod-deletion-cost;
        5 more colocated related pods on its node; 6 ready more recently; 7 more restarts; 8 created more recently.
        (6 and 8 compare exact order here: the real log2-bucketed times with UID tie-breaks are pseudo-random.)
        """
        node, uid, ready = pod["spec"].get("nodeName") or "", pod["metadata"]["uid"], is_ready(pod)
        restarts = max([c.get("restartCount", 0) for c in pod["status"].get("containerStatuses") or ()] or [0])
        cost = int((pod["metadata"].get("annotations") or {}).get(DELETION_COST, 0))
        return (bool(node), {"Pending": 0, "Unknown": 1, "Running": 2}.get(pod["status"].get("phase"), 0), ready,
                cost, -on_node[node], -self._ready_at.get(uid, 0) if ready else 0, -restarts, -self._born.get(uid, 0))

    def _pod_admission(self, pod: Obj) -> str:
        """The admission plugins a Pod create passes, in the API server's order ("" = admitted, else why it is
        forbidden): ServiceAccount and LimitRanger (mutating: the account's token volume; resource defaults), then
        LimitRanger (validating: min/max), PodSecurity and ResourceQuota (validating, quota last, so a quota on
        limits.* sees the defaulted limits). Several LimitRange problems are one aggregate error, listed in brackets
        (k8s.io/apimachinery pkg/util/errors NewAggregate: a single error is its own message)."""
        if refusal := self._service_account(pod):
            return refusal
        problems = [p for lr in self.stored(LIMITRANGES, pod["metadata"]["namespace"])
                    for p in limit_range_problems(lr, pod)]
        if problems:
            return problems[0] if len(problems) == 1 else f"[{', '.join(problems)}]"
        return pod_security.refusal(
            self.read(NAMESPACES, None, pod["metadata"]["namespace"])["metadata"].get("labels") or {}, pod) \
            or self._quota_refusal(pod)

    def _service_account(self, pod: Obj) -> str:
        """ServiceAccount admission (plugin/pkg/admission/serviceaccount, NewServiceAccount: "If the pod does not
        specify a ServiceAccount, it sets the pod's ServiceAccount to default; it ensures the ServiceAccount
        referenced by the pod exists"; then it adds the projected `kube-api-access-*` volume with the account's
        token, CA and namespace, mounted read-only at /var/run/secrets/kubernetes.io/serviceaccount in each
        container, unless the pod or else its ServiceAccount sets automountServiceAccountToken false:
        kubernetes.io/docs/tasks/configure-pod-container/configure-service-account/ "Opt out of API credential
        automounting … If both the ServiceAccount and the Pod's .spec specify a value for
        automountServiceAccountToken, the Pod spec takes precedence")."""
        spec, ns = pod["spec"], pod["metadata"]["namespace"]
        name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        spec["serviceAccountName"] = spec["serviceAccount"] = name
        account = self.find(SERVICEACCOUNTS, ns, name)
        if account is None:
            return f'error looking up service account {ns}/{name}: serviceaccount "{name}" not found'
        mount = spec.get("automountServiceAccountToken")
        if mount is None:
            mount = account.get("automountServiceAccountToken", True)
        if not mount:
            return ""
        volume = "kube-api-access-" + "".join(self._rng.choice(SAFE) for _ in range(5))
        spec.setdefault("volumes", []).append({"name": volume, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1",
                                                                          "fieldPath": "metadata.namespace"}}]}}]}})
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            mounts = container.setdefault("volumeMounts", [])
            if not any(m.get("mountPath") == TOKEN_PATH for m in mounts):
                mounts.append({"name": volume, "readOnly": True, "mountPath": TOKEN_PATH})
        return ""

    def _quota_refusal(self, pod: Obj) -> str:
        """ResourceQuota admission (kubernetes.io/docs/concepts/policy/resource-quotas/): with a quota on
        requests.cpu/requests.memory every container must request them (limits alone count, as defaulting copies
        them), with a quota on limits.cpu/limits.memory every container must state those limits (the same page;
        the missing ones sorted and joined as pkg/quota/v1/evaluator/core/pods.go does), and a pod that would take
        the namespace's use past a hard limit is refused with "exceeded quota" (the wording of k8s.io/apiserver …
        resourcequota/controller.go: "exceeded quota: %s, requested: %s, used: %s, limited: %s"). "" = admitted."""
        ns = pod["metadata"]["namespace"]
        for quota in self.stored(RESOURCEQUOTAS, ns):
            hard, name = quota["spec"].get("hard") or {}, quota["metadata"]["name"]

            def stated(c: Obj, kind: str) -> dict:
                resources = c.get("resources") or {}
                return {**(resources.get("limits") or {}), **(resources.get("requests") or {})} \
                    if kind == "requests" else resources.get("limits") or {}
            missing = sorted(k for k in ("requests.cpu", "requests.memory", "limits.cpu", "limits.memory")
                             if k in hard and not all(k.split(".")[1] in stated(c, k.split(".")[0])
                                                      for c in pod["spec"].get("containers") or ()))
            if missing:
                return f"failed quota: {name}: must specify {','.join(missing)}"
            used, want = self._quota_used(ns), pod_requests(pod)
            over = sorted(k for k in hard if k in want and used[k] + want[k] > quantity(k, hard[k]))
            if over:
                def show(values: Mapping[str, float]) -> str:
                    return ",".join(f"{k}={show_quantity(k, values[k])}" for k in over)
                return (f"exceeded quota: {name}, requested: {show(want)}, used: {show(used)}, limited: "
                        + ",".join(f"{k}={hard[k]}" for k in over))
        return ""

    def _quota_used(self, ns: str) -> Counter:
        used: Counter = Counter()
        for pod in self.stored(PODS, ns):
            if is_active(pod):
                used.update(pod_requests(pod))
        return used

    def _spawn_pod(self, owner_kind: Kind, owner: Obj, template: Obj, prefix: str) -> Obj | None:
        ns, template_meta = owner["metadata"]["namespace"], template.get("metadata") or {}
        meta = {"name": self._generate_name(PODS, ns, f"{prefix}-"), "generateName": f"{prefix}-", "namespace": ns,
                "labels": dict(template_meta.get("labels") or {}),
                "annotations": dict(template_meta.get("annotations") or {}),
                "ownerReferences": [owner_ref(owner_kind, owner)]}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {k: v for k, v in meta.items() if v},
               "spec": copy.deepcopy(template.get("spec") or {}), "status": {"phase": "Pending"}}
        apply_defaults(PODS, pod)
        refusal = self._pod_admission(pod)
        # PodSecurity's enforce mode is "not applied to workload resources, only to the resulting pod objects"
        # (pod-security-admission, Workload resources and Pod templates): the controller's own pod create is refused
        if refusal:  # the controller's create was refused (403): it records why and tries again later
            # named by its generateName: the name is generated after admission ('pods "w-5d8f9-" is forbidden')
            self._refused[owner["metadata"]["uid"]] = f'pods "{meta["generateName"]}" is forbidden: {refusal}'
            return None
        self._refused.pop(owner["metadata"]["uid"], None)
        return self._insert(PODS, pod)

# first fit over schedulable Nodes honouring cordon, nodeSelector and pod capacity; Pending when none fits (kube-scheduler NodeUnschedulable, NodeAffinity, NodeResourcesFit plugins)
    def _schedule(self, ns: str | None = None, pull_again: bool = True) -> None:
        """First-fit in node-name order onto Ready, schedulable nodes with room (status.allocatable.pods); with
        `ns` only that namespace's pods are placed (the nodes' load counts every pod)."""
        nodes = {n["metadata"]["name"]: n for n in self.stored(NODES)}
        pods = [p for p in self.stored(PODS, ns) if is_active(p)]
        load = self._node_load() if ns is not None else Counter(p["spec"].get("nodeName") for p in pods)
        if self.fit_resources:  # requests bound per node, over every namespace: (node, resource) → amount
            for pod in self.stored(PODS):
                if is_active(pod) and pod["spec"].get("nodeName"):
                    load.update({(pod["spec"]["nodeName"], k): v for k, v in pod_requests(pod).items()})
        usable = [n for n in nodes.values() if not n["spec"].get("unschedulable")
                  and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", ()))]
        for pod in sorted(pods, key=lambda p: self._born.get(p["metadata"]["uid"], 0)):
            if not pod["spec"].get("nodeName"):
                wanted = (pod["spec"].get("nodeSelector") or {}).items()
                want = pod_requests(pod) if self.fit_resources else Counter()
                node = next((n for n in usable if load[n["metadata"]["name"]]
                             < int(n["status"].get("allocatable", {}).get("pods", 110))
                             and wanted <= (n["metadata"].get("labels") or {}).items()
                             and not self._short(n, want, load)), None)
                if node is None:
                    self._unschedulable(pod, len(nodes), Counter(
                        self._misfit(n, wanted, load, self._short(n, want, load)) for n in nodes.values()))
                    continue
                pod["spec"]["nodeName"] = node["metadata"]["name"]
                load[node["metadata"]["name"]] += 1
                load.update({(node["metadata"]["name"], k): v for k, v in want.items()})
            if pod["status"].get("phase") == "Pending" and pod["spec"]["nodeName"] in nodes:
                self._start_pod(pod, nodes[pod["spec"]["nodeName"]], pull_again)

    def _node_load(self) -> Counter:
        """Active pods per node, over every namespace (read in place: nothing is changed)."""
        res = self._key(PODS, None, "")[0]
        return Counter(o.raw["spec"].get("nodeName") for o_ns, in_ns in self._index.get(res, {}).items()
                       for name in in_ns if not (o := self.objects[res, o_ns, name]).deleted and is_active(o.raw))

    @staticmethod
    def _short(node: Obj, want: Counter, load: Counter) -> str:
        """NodeResourcesFit: the first of cpu, memory the node lacks for `want` (pod_requests), "" if it fits."""
        allocatable, name = node["status"].get("allocatable") or {}, node["metadata"]["name"]
        return next((key for key in ("cpu", "memory") if want[f"requests.{key}"] and key in allocatable
                     and load[(name, f"requests.{key}")] + want[f"requests.{key}"] > quantity(key, allocatable[key])),
                    "")

    @staticmethod
    def _misfit(node: Obj, wanted, load: Counter, short: str = "") -> str:
        """Why one node does not fit a pod, worded as the scheduler's plugins word it (NodeUnschedulable,
        TaintToleration for the not-ready taint, NodeAffinity, NodeResourcesFit's "Too many pods" and
        "Insufficient cpu")."""
        if node["spec"].get("unschedulable"):
            return "node(s) were unschedulable"
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", ())):
            return "node(s) had untolerated taint {node.kubernetes.io/not-ready: }"
        if not wanted <= (node["metadata"].get("labels") or {}).items():
            return "node(s) didn't match Pod's node affinity/selector"
        return f"Insufficient {short}" if short else "Too many pods"

    def _unschedulable(self, pod: Obj, node_count: int, reasons: Counter | None = None) -> None:
        # the scheduler's FitError: "0/N nodes are available: " + sorted "<count> <reason>" joined by ", " + "."
        # (kubernetes pkg/scheduler/framework/types.go, FitError.Error; reasons as its plugins word them)
        # with no node at all: ErrNoNodesAvailable (pkg/scheduler/schedule_one.go)
        listed = ", ".join(sorted(f"{n} {why}" for why, n in (reasons or Counter()).items()))
        message = f"0/{node_count} nodes are available: {listed}." if node_count else \
            "no nodes available to schedule pods"
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        if pod["status"].get("conditions") != [condition]:
            pod["status"]["conditions"] = [condition]
            self._put(PODS, pod)

    def _start_pod(self, pod: Obj, node: Obj, pull_again: bool = True) -> None:
        """What the kubelet reports: Running and Ready at once, unless an image cannot be pulled."""
        if self._pull_fails(pod, pull_again):
            return
        at, n = now(), next(self._ips)
        host_ip = next((a["address"] for a in node["status"].get("addresses", ()) if a["type"] == "InternalIP"), "")
        pod["status"] = {
            "phase": "Running", "hostIP": host_ip, "podIP": f"10.4.{n // 250}.{n % 250 + 2}", "startTime": at,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": at} for t in (
                "PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")],
            "containerStatuses": [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True,
                                   "started": True, "restartCount": 0, "state": {"running": {"startedAt": at}}}
                                  for c in pod["spec"].get("containers") or ()]}
        self._ready_at[pod["metadata"]["uid"]] = next(self._seq)
        self._ready_since[pod["metadata"]["uid"]] = self.clock()
        self._put(PODS, pod)  # binding is not a spec update: the generation stays

    def _pull_fails(self, pod: Obj, pull_again: bool = True) -> bool:
        """A container whose image the registry refuses: the pod stays Pending, scheduled, its container waiting
        with ErrImagePull, then ImagePullBackOff on the next try (ContainerStateWaiting.reason, as kubectl shows)."""
        refused = [c for c in pod["spec"].get("containers") or () if c.get("image", "") in self.unpullable]
        if not refused:
            return False
        before = {c["name"]: c for c in pod["status"].get("containerStatuses") or ()}
        if before and not pull_again:
            return True
        statuses = []
        for c in pod["spec"].get("containers") or ():
            image = c.get("image", "")
            if image not in self.unpullable:
                statuses.append({"name": c["name"], "image": image, "imageID": "", "ready": False, "started": False,
                                 "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}})
                continue
            tried = "waiting" in before.get(c["name"], {}).get("state", {})
            reason = "ImagePullBackOff" if tried else "ErrImagePull"
            message = (f'Back-off pulling image "{image}"' if tried else
                       f'failed to pull and unpack image "{image}": {self.unpullable[image]}')
            statuses.append({"name": c["name"], "image": image, "imageID": "", "ready": False, "started": False,
                             "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}})
        if pod["status"].get("containerStatuses") != statuses:
            at = now()
            pod["status"] = {"phase": "Pending", "hostIP": "", "startTime": pod["status"].get("startTime") or at,
                             "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": at},
                                            *self._unready(pod, at)],
                             "containerStatuses": statuses}
            self._put(PODS, pod)
        return True

    @staticmethod
    def _unready(pod: Obj, at: str) -> list[Obj]:
        names = " ".join(c["name"] for c in pod["spec"].get("containers") or ())
        return [{"type": t, "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": at,
                 "message": f"containers with unready status: [{names}]"} for t in ("Ready", "ContainersReady")]

    def crash_container(self, ns: str, name: str, reason: str, exit_code: int, log: str, back_off: bool) -> None:
        """The pod's containers end (OOMKilled 137, Error 1, …): each status gets lastState.terminated and a higher
        restartCount; with `back_off` the kubelet waits (state.waiting CrashLoopBackOff, not ready), else it has
        restarted them (running). Fields as ContainerStatus documents them (core/v1 API reference)."""
        pod = self.read(PODS, ns, name)
        if pod["status"].get("phase") != "Running":
            raise fail(409, f"pod {name} is not running")
        at, uid = now(), pod["metadata"]["uid"]
        statuses = []
        for c in pod["status"]["containerStatuses"]:
            started = (c["state"].get("running") or {}).get("startedAt", at)
            state = ({"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off 10s restarting failed "
                                  f"container={c['name']} pod={name}_{ns}({uid})"}} if back_off
                     else {"running": {"startedAt": at}})
            statuses.append({**c, "ready": not back_off, "started": not back_off,
                             "restartCount": c.get("restartCount", 0) + 1, "state": state,
                             "lastState": {"terminated": {"exitCode": exit_code, "reason": reason,
                                                          "startedAt": started, "finishedAt": at}}})
        pod["status"]["containerStatuses"] = statuses
        others = [c for c in pod["status"]["conditions"] if c["type"] not in ("Ready", "ContainersReady")]
        ready = [{"type": t, "status": "True", "lastTransitionTime": at} for t in ("Ready", "ContainersReady")]
        pod["status"]["conditions"] = others + (self._unready(pod, at) if back_off else ready)
        if back_off:
            self._ready_at.pop(uid, None)
            self._ready_since.pop(uid, None)
        self.previous_logs[(ns, name)] = log
        self._put(PODS, pod)
        self.reconcile()

    def restart_container(self, ns: str, name: str) -> None:
        """The back-off is over: the kubelet starts the containers again (running, ready; lastState kept)."""
        pod = self.read(PODS, ns, name)
        at = now()
        pod["status"]["containerStatuses"] = [{**c, "ready": True, "started": True, "state": {"running": {
            "startedAt": at}}} for c in pod["status"]["containerStatuses"]]
        pod["status"]["conditions"] = [c for c in pod["status"]["conditions"]
                                       if c["type"] not in ("Ready", "ContainersReady")] + [
            {"type": t, "status": "True", "lastTransitionTime": at} for t in ("Ready", "ContainersReady")]
        self._ready_at[pod["metadata"]["uid"]] = next(self._seq)
        self._ready_since[pod["metadata"]["uid"]] = self.clock()
        self._put(PODS, pod)
        self.reconcile()

    def _replicaset_status(self, replicaset: Obj) -> None:
        pods = self._owned(PODS, replicaset)
        ready = sum(map(is_ready, pods))
        available = sum(self._available(p, replicaset["spec"].get("minReadySeconds", 0)) for p in pods)
        status = {"replicas": len(pods), **omit_zero({
            "fullyLabeledReplicas": len(pods), "readyReplicas": ready, "availableReplicas": available,
            "observedGeneration": replicaset["metadata"]["generation"]})}
        refused = self._refused.get(replicaset["metadata"]["uid"])
        if refused and len(pods) < replicaset["spec"].get("replicas", 1):  # pkg/controller/replicaset: FailedCreate
            status["conditions"] = [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                     "message": refused}]
        if replicaset.get("status") != status:
            replicaset["status"] = status
            self._put(REPLICASETS, replicaset)

    def _deployment_status(self, deployment: Obj) -> None:
        spec, meta = deployment["spec"], deployment["metadata"]
        replicasets = self._owned(REPLICASETS, deployment)
        pods = [pod for rs in replicasets for pod in self._owned(PODS, rs)]
        current = f"{meta['name']}-{template_hash(spec['template'])}"
        updated = [p for rs in replicasets if rs["metadata"]["name"] == current for p in self._owned(PODS, rs)]
        ready = sum(map(is_ready, pods))
        available = sum(self._available(p, spec.get("minReadySeconds", 0)) for p in pods)
        strategy = spec.get("strategy") or {}
        max_unavailable = rolling_fenceposts(deployment)[1] if strategy.get("type") == "RollingUpdate" else 0
        ok = available >= spec["replicas"] - max_unavailable
        previous = next((c for c in (deployment.get("status") or {}).get("conditions") or ()
                         if c["type"] == "Available"), None)
        condition = {"type": "Available", "status": str(ok), "lastUpdateTime": now(), "lastTransitionTime": now(),
                     "reason": "MinimumReplicasAvailable" if ok else "MinimumReplicasUnavailable",
                     "message": "Deployment has minimum availability." if ok
                     else "Deployment does not have minimum availability."}
        if previous and previous["status"] == condition["status"]:
            condition = previous
        # a ReplicaSet's ReplicaFailure is copied to its Deployment (pkg/controller/deployment/progress.go
        # getReplicaFailures: the new ReplicaSet's first, else an old one's)
        failures = [c for rs in sorted(replicasets, key=lambda rs: rs["metadata"]["name"] != current)
                    for c in (rs.get("status") or {}).get("conditions") or () if c["type"] == "ReplicaFailure"]
        status = {**omit_zero({
            "observedGeneration": meta["generation"], "replicas": len(pods), "updatedReplicas": len(updated),
            "readyReplicas": ready, "availableReplicas": available,
            "unavailableReplicas": max(spec["replicas"] - available, 0)}), "conditions": [condition, *failures[:1]]}
        if deployment.get("status") != status:
            deployment["status"] = status
            self._put(DEPLOYMENTS, deployment)

    def _sync_job(self, job: Obj) -> None:
        """Jobs stay active (one pod) until ``complete_job``; a deleted pod of an active Job is replaced."""
        status = job.get("status") or {}
        finished = any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                       for c in status.get("conditions") or ())
        active = self._owned(PODS, job)
        if not finished and not active and not job["spec"].get("suspend"):
            active = [p for p in [self._spawn_pod(JOBS, job, job["spec"]["template"], job["metadata"]["name"])] if p]
        new = {**status, "startTime": status.get("startTime") or now(), "ready": sum(map(is_ready, active)),
               "active": len(active)}
        if not new["active"]:
            del new["active"]
        if new != status:
            job["status"] = new
            self._put(JOBS, job)

    def complete_job(self, ns: str, name: str, succeeded: bool, log: str) -> None:
        job = self.read(JOBS, ns, name)
        pods = self._owned(PODS, job) or [self._spawn_pod(JOBS, job, job["spec"]["template"], name)]
        at = now()
        pod = self.read(PODS, ns, pods[0]["metadata"]["name"])
        pod["status"].update(
            phase="Succeeded" if succeeded else "Failed",
            conditions=[{"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": at}],
            containerStatuses=[{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                                "restartCount": 0, "state": {"terminated": {
                                    "exitCode": 0 if succeeded else 1, "finishedAt": at,
                                    "reason": "Completed" if succeeded else "Error"}}}
                               for c in pod["spec"].get("containers") or ()])
        self._put(PODS, pod)
        self.logs[(ns, pod["metadata"]["name"])] = log
        status = {k: v for k, v in (job.get("status") or {}).items() if k != "active"}
        condition = {"type": "Complete" if succeeded else "Failed", "status": "True", "lastProbeTime": at,
                     "lastTransitionTime": at}
        if succeeded:
            status.update(succeeded=1, completionTime=at, ready=0, conditions=[condition])
        else:
            condition.update(reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")
            status.update(failed=1, ready=0, conditions=[condition])
        job["status"] = status
        self._put(JOBS, job)
        self.reconcile()

    def clone_namespace(self, old: str, new: str, replace: Mapping[str, str]) -> int:
        """Copy namespace `old` and everything in it as `new`, every string also with ``replace``'s
        substitutions, each object with a new uid and resourceVersion; the copies are in the state the originals
        reached, so no controller has work to do. Service proxy backends and pod logs are copied too. Returns the
        number of objects. Benchmark seeding only."""
        replace = {old: new, **replace}
        if self.find(NAMESPACES, None, new) is not None:
            raise fail(409, f'namespaces "{new}" already exists', reason="AlreadyExists")
        found = [(NAMESPACES, self.read(NAMESPACES, None, old))] + [
            (kind, obj) for kind in KINDS.values() if kind.namespaced for obj in self.stored(kind, old)]
        uids = {obj["metadata"]["uid"]: self._uid() for _, obj in found}

        def sub(text: str) -> str:
            for a, b in {**replace, **uids}.items():
                text = text.replace(a, b)
            return text

        for kind, obj in found:
            uid = obj["metadata"]["uid"]
            self._born[uids[uid]] = next(self._seq)
            if uid in self._ready_at:
                self._ready_at[uids[uid]] = self._ready_at[uid]
            if uid in self._ready_since:
                self._ready_since[uids[uid]] = self._ready_since[uid]
            self._put(kind, json.loads(sub(json.dumps(obj))))
        for (ns, service, port), url in list(self.backends.items()):
            if ns == old:
                self.backends[(new, sub(service), port)] = sub(url)
        for (ns, pod), text in list(self.logs.items()):
            if ns == old:
                self.logs[(new, sub(pod))] = text
        return len(found)

    def set_nodes(self, capacities: Mapping[str, int], labels: Mapping[str, str],
                  node_labels: Mapping[str, Mapping[str, str]]) -> None:
        for node in self.stored(NODES):
            if node["metadata"]["name"] not in capacities:
                self._remove(NODES, node)
        for i, (name, pods) in enumerate(capacities.items()):
            status = node_status(pods, f"10.128.0.{i + 2}")
            node = self.find(NODES, None, name)
            own = {**labels, **node_labels.get(name, {})}
            if node is None:  # created as a POST would, the controllers run once below
                self._deferred = True
                try:
                    self.create(NODES, None, {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                                                       **own}}, "status": status})
                finally:
                    self._deferred = False
            else:
                node["status"] = status
                node["metadata"]["labels"] = {**(node["metadata"].get("labels") or {}), **own}
                self._put(NODES, node)
        self.reconcile()


class KubeStandin:
    """A strict Kubernetes API server on 127.0.0.1 (background thread, own event loop) for the real client.

    Semantics: bearer-token auth (401): the server's token is the controller's, in system:masters, and ``add_user``
    maps more tokens to users (Google accounts on GKE); per-request RBAC (403 with the API server's message; Roles,
    ClusterRoles and their bindings evaluated by tests/standins/rbac.py; SelfSubjectAccessReview answered; pods'
    portforward over WebSocket served (the kubelet's v4 channel protocol, spliced to what the pod's Services reach;
    the upgrade also needs `create`), a plain portforward/exec/attach request authorized, then 400 "Upgrade request
    required"); Namespaces (delete removes their content; with ``namespace_termination_s``
    the namespace stays Terminating that long, refusing creates in it 403 as NamespaceLifecycle does;
    default/kube-system/kube-public are protected, 403); CRUD with create 201, missing namespace 404, AlreadyExists 409, NotFound 404, replace/patch
    (JSON patch, merge patch, strategic merge with list merge keys) with uid/resourceVersion preconditions (409) and
    no-op writes keeping the resourceVersion; server-set uid, resourceVersion, creationTimestamp, generation;
    422 Invalid for names, labels, annotations and per-kind specs (Pod, Deployment, ReplicaSet, Job, Service,
    ConfigMap, Secret, Role, RoleBinding; immutable fields); label/field selectors, limit/continue and
    deletecollection; owner-reference garbage collection (Orphan honoured); /scale (autoscaling/v1 Scale), /status,
    pod /log and /eviction; the service proxy to registered backends (503 when none); controllers for
    Deployment → ReplicaSet → Pods (RollingUpdate and Recreate rollouts with revisions and minReadySeconds on
    ``clock``, see ``_sync_deployment``; real deletion ranking), a first-fit scheduler over Node objects (cordon
    and nodeSelector honoured, Pending when no room), and Jobs completed by the test; ResourceQuota admission (pods
    past a hard limit refused 403 "exceeded quota", a ReplicaSet's refused pods reported as ReplicaFailure) and
    status, on requests.* and limits.*; LimitRange admission (Container defaults applied to a pod's containers at
    creation, min/max refused 403); with ``fit_resources`` the scheduler also fits cpu/memory requests;
    NetworkPolicies stored and schema-checked (enforcement is evaluated by tests/netpol.py). Watch, dryRun,
    server-side apply and finalizers are not modelled and watch/dryRun/apply requests are refused loudly.
    """

    def __init__(self, token: str = "standin-token", *, nodes: Iterable[str] | Mapping[str, int] = ("node-1",),
                 pods_per_node: int = 110, latency_s: float = 0.0, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic, namespace_termination_s: float = 0.0):
        self.token = token
        self._clients: list[kubernetes.client.ApiClient] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-standin", daemon=True)
        self._thread.start()
        try:
            self._api, self._runner = asyncio.run_coroutine_threadsafe(
                self._start(token, latency_s, seed, clock), self._loop).result(timeout=10)
        except BaseException:
            self._stop_loop()
            raise
        self._api.namespace_termination_s = namespace_termination_s  # read by the loop's thread on each request
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        if nodes:
            self.set_nodes(nodes, pods_per_node=pods_per_node)

    @staticmethod
    async def _start(token: str, latency_s: float, seed: int,
                     clock: Callable[[], float]) -> tuple[_KubeApi, aiohttp.web.ServerRunner]:
        api = _KubeApi(token=token, latency_s=latency_s, seed=seed, clock=clock, strict=True)
        await api.__aenter__()
        api.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        runner = aiohttp.web.ServerRunner(aiohttp.web.Server(api))
        await runner.setup()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
        return api, runner

    def __enter__(self) -> KubeStandin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Close the clients, the server and the loop; re-raise server-side bugs (kmock strict mode)."""
        if self._loop.is_closed():
            return
        for client in self._clients:
            client.close()
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        except ExceptionGroup as group:  # said in one message, so a run's summary line shows every distinct bug
            raise AssertionError(f"the stand-in's handlers raised {len(group.exceptions)} time(s): "
                                 + "; ".join(f"{n} × {what}" for what, n in _bugs(group).most_common())) from group
        finally:
            self._stop_loop()

    async def _shutdown(self) -> None:
        for stream in list(self._api.streams):  # a port-forward still open ends with the server
            stream.cancel()
        await self._runner.cleanup()
        await self._api.session.close()
        await self._loop.shutdown_default_executor()
        await self._api.__aexit__(None, None, None)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run on the server's loop: all state is touched from that one thread."""
        if threading.current_thread() is self._thread:
            return fn(*args)

        async def call() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=30)

    # --- clients and hooks ---------------------------------------------------------------------------------------

    def add_user(self, token: str, name: str, groups: Iterable[str] = ()) -> None:
        """A bearer token that authenticates `name` (on GKE, a Google account's e-mail), in `groups` and
        system:authenticated; what it may do is what RBAC grants that user and those groups."""
        user = rbac.User(name, tuple(groups))
        self._run(lambda: self._api.users.__setitem__(token, user))

    def api_client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        """A real ApiClient for this server (closed by ``stop``); ``token`` defaults to the server's."""
        config = kubernetes.client.Configuration(host=self.url)
        config.api_key = {"authorization": f"Bearer {self.token if token is None else token}"}
        client = kubernetes.client.ApiClient(config)
        self._clients.append(client)
        return client

    @property
    def latency_s(self) -> float:
        return self._api.latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self._api.latency_s = value

    @property
    def fit_resources(self) -> bool:
        """The scheduler also fits pods' cpu/memory requests to nodes' allocatable (see _KubeApi.fit_resources)."""
        return self._api.fit_resources

    @fit_resources.setter
    def fit_resources(self, value: bool) -> None:
        def set_() -> None:
            self._api.fit_resources = value
        self._run(set_)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request received, as (method, path), including refused ones."""
        return list(self._api.calls)

    @property
    def handler(self) -> kmock.KubernetesScaffold:
        """The kmock handler: its request records and DSL views (e.g. ``handler[kmock.action.CREATE]``)."""
        return self._api

    @property
    def objects(self) -> kmock.ObjectsArray:
        """kmock's versioned store: ``objects['apps/v1/deployments', 'ns', 'name'].history`` (read after requests)."""
        return self._api.objects

    def fail_next(self, method: str, path_substring: str, status: int = 500) -> None:
        """Answer the next METHOD request whose path contains ``path_substring`` with a Status of ``status``."""
        self._run(self._api.failures.append, (method.upper(), path_substring, status))

    def set_nodes(self, nodes: Iterable[str] | Mapping[str, int], *, pods_per_node: int = 110,
                  labels: Mapping[str, str] | None = None,
                  node_labels: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """Make the cluster's Nodes exactly these (names, or name → pod capacity); pods of removed nodes go.
        ``labels`` go on every node, ``node_labels`` (name → labels) on the named ones, e.g. GKE's pool and zone."""
        capacities = dict(nodes) if isinstance(nodes, Mapping) else {name: pods_per_node for name in nodes}
        self._run(self._api.set_nodes, capacities, dict(labels or {}), dict(node_labels or {}))

    def complete_job(self, namespace: str, name: str, *, succeeded: bool = True, log: str = "") -> None:
        """Finish the Job: its pod Succeeded/Failed with ``log``; status.succeeded=1 or failed=1 with a condition."""
        self._run(self._api.complete_job, namespace, name, succeeded, log)

    def crash_container(self, namespace: str, pod: str, *, reason: str = "OOMKilled", exit_code: int = 137,
                        log: str = "", back_off: bool = True) -> None:
        """End the pod's containers as the kubelet reports it: ``OOMKilled``/137 for a memory-limit kill, ``Error``/1
        for a crash; ``log`` is what ``previous=true`` then returns; ``back_off`` leaves them in CrashLoopBackOff
        until ``restart_container``."""
        self._run(self._api.crash_container, namespace, pod, reason, exit_code, log, back_off)

    def restart_container(self, namespace: str, pod: str) -> None:
        self._run(self._api.restart_container, namespace, pod)

    def write_log(self, namespace: str, pod: str, text: str) -> None:
        """What the pod's running container has printed so far (its log, as /log returns it)."""
        self._run(self._api.logs.__setitem__, (namespace, pod), text)

    def refuse_image(self, image: str, why: str = "not found") -> None:
        """Pulls of ``image`` fail from now on: pods using it stay Pending with ErrImagePull / ImagePullBackOff."""
        def set_() -> None:
            self._api.unpullable[image] = why
            self._api.reconcile()
        self._run(set_)

    def on_job_created(self, callback: Callable[[Obj], Any]) -> None:
        """Call ``callback(job)`` after each Job is created, before the 201 is sent, in a worker thread."""
        self._api.job_callbacks.append(callback)

    def clone_namespace(self, old: str, new: str, replace: Mapping[str, str] | None = None) -> int:
        """Seed a copy of a namespace and its objects (see ``_KubeApi.clone_namespace``): benchmarks only."""
        return self._run(self._api.clone_namespace, old, new, dict(replace or {}))

    def register_service_backend(self, namespace: str, service: str, port: int | str, url: str) -> None:
        """Route the service proxy for (service, port number or port name) to ``url``, e.g. a Dask dashboard."""
        self._run(self._api.backends.__setitem__, (namespace, service, str(port)), url)

    def create(self, obj: Obj) -> Obj:
        """Create an object as a POST would (validation, server metadata, controllers), e.g. as Helm would."""
        kind = next((k for k in KINDS.values()
                     if (k.api_version, k.kind) == (obj.get("apiVersion"), obj.get("kind"))), None)
        if kind is None:
            raise ValueError(f"unsupported kind: {obj.get('apiVersion')}/{obj.get('kind')}")
        namespace = (obj.get("metadata") or {}).get("namespace") or "default" if kind.namespaced else None
        return self._run(self._api.create, kind, namespace, obj)

    def get(self, resource: Kind | str, namespace: str | None, name: str) -> Obj | None:
        """The stored object (a copy) or None; ``resource`` is a plural ("pods") or "apps/v1/deployments"."""
        return self._run(self._api.find, kind_of(resource), namespace, name)

    def list(self, resource: Kind | str, namespace: str | None = None, label_selector: str = "") -> list[Obj]:
        return self._run(self._api._select, kind_of(resource), namespace, {"labelSelector": label_selector})


def _bugs(group: BaseExceptionGroup) -> Counter:
    """Each distinct server-side error: its type, message and the stand-in line that raised it."""
    seen: Counter = Counter()
    for e in group.exceptions:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "standins" in f.filename] or \
            traceback.extract_tb(e.__traceback__)[-1:]
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        seen[f"{type(e).__name__}: {str(e)[:160]}{where}"] += 1
    return seen
