"""A small evaluator of NetworkPolicy (networking.k8s.io/v1) as Kubernetes defines it, for the isolation tests
(kubernetes.io/docs/concepts/services-networking/network-policies/):

- a policy applies to the pods its `podSelector` selects in its own namespace (an empty selector: every pod there);
- `policyTypes` defaults to ["Ingress"], plus "Egress" when the policy has egress rules;
- a pod selected by any policy with "Ingress" is isolated for ingress: a connection to it is allowed only if some
  rule of one of those policies allows it (policies are additive; there are no deny rules); likewise for egress at
  the source; a connection needs both directions allowed;
- a rule allows when one of its peers matches (no `from`/`to`, or an empty list: every source) and one of its ports
  matches (no `ports`: every port);
- a peer with only `podSelector` selects pods of the policy's namespace; only `namespaceSelector`: every pod of the
  namespaces it selects; both in one peer: pods selected by the podSelector in the namespaces selected (AND); an
  `ipBlock` matches addresses in its CIDR outside its `except`;
- a port entry matches protocol (default TCP) and port (a number, a named container port of the destination, or
  none: every port), up to `endPort` when given.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict = field(default_factory=dict)
    ip: str = "10.4.0.1"
    ports: dict = field(default_factory=dict)  # named container ports: name → number


def selects(selector: dict | None, labels: dict) -> bool:
    """metav1.LabelSelector: matchLabels AND matchExpressions (In, NotIn, Exists, DoesNotExist); {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _peer_matches(peer: dict, other: Pod, policy_ns: str, namespaces: dict[str, dict]) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(other.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(c) for c in block.get("except") or ())
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespaces.get(other.namespace, {})):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other.labels)


def _port_matches(entry: dict, target: Pod, port: int, protocol: str) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    if "port" not in entry:
        return True
    want = entry["port"]
    number = target.ports.get(want) if isinstance(want, str) else want
    if number is None:
        return False
    return number <= port <= entry["endPort"] if "endPort" in entry else port == number


def _allowed_by(policies: list[dict], pod: Pod, other: Pod, port_owner: Pod, port: int, protocol: str,
                direction: str, namespaces: dict[str, dict]) -> bool:
    """Is `pod` isolated in `direction`, and if so does a rule admit `other`?"""
    mine = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
            and selects(p["spec"].get("podSelector"), pod.labels) and direction in policy_types(p)]
    if not mine:
        return True  # not isolated
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in mine:
        for rule in policy["spec"].get(key) or ():
            if rule.get(peers) and not any(_peer_matches(peer, other, policy["metadata"]["namespace"], namespaces)
                                           for peer in rule[peers]):
                continue
            if rule.get("ports") and not any(_port_matches(e, port_owner, port, protocol) for e in rule["ports"]):
                continue
            return True
    return False


def allowed(policies: list[dict], namespaces: dict[str, dict], source: Pod, target: Pod, port: int,
            protocol: str = "TCP") -> bool:
    """Whether a connection from `source` to `target` on `port` is allowed: egress at the source and ingress at
    the target."""
    return _allowed_by(policies, source, target, target, port, protocol, "Egress", namespaces) and \
        _allowed_by(policies, target, source, target, port, protocol, "Ingress", namespaces)
