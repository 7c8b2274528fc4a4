"""Kubernetes stand-in, Pod Security admission: the Pod Security Standards' checks of a pod against its namespace's
`pod-security.kubernetes.io/*` labels, with the admission plugin's wording (pure; used by tests/standins/kube.py).

Sources: kubernetes.io/docs/concepts/security/pod-security-admission/ (labels, modes, workload resources) and
kubernetes.io/docs/concepts/security/pod-security-standards/ (the controls of each level). The wording of each refusal
is that of the reference implementation, k8s.io/pod-security-admission/policy/check_*.go: a check's reason with its
detail in parentheses, the checks joined by ", " (AggregateCheckResult.ForbiddenDetail), baseline checks first, then
restricted ones; a restricted check replaces the baseline check it tightens. Every version is evaluated as `latest`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

Obj = dict[str, Any]
PREFIX = "pod-security.kubernetes.io/"
LEVELS = ("privileged", "baseline", "restricted")  # PSA labels: "LEVEL must be one of privileged, baseline, restricted"
MODES = ("enforce", "audit", "warn")
VERSION = re.compile(r"latest|v1\.(0|[1-9][0-9]*)")  # "VERSION must be a valid Kubernetes minor version, or latest"


def label_problems(labels: dict[str, str]) -> list[tuple[str, str, str]]:
    """(label, value, why) for each invalid pod-security label of a namespace: the admission plugin refuses a
    Namespace created with one (admission.go ValidateNamespace: "require valid labels on create")."""
    found = []
    for mode in MODES:
        level, version = labels.get(PREFIX + mode), labels.get(f"{PREFIX}{mode}-version")
        if level is not None and level not in LEVELS:
            found.append((PREFIX + mode, level, 'must be one of "privileged", "baseline", "restricted"'))
        if version is not None and not VERSION.fullmatch(version):
            found.append((f"{PREFIX}{mode}-version", version, 'must be "latest" or "v1.x"'))
    return found


def enforced(labels: dict[str, str]) -> tuple[str, str]:
    """(level, version) a namespace enforces: privileged when unlabelled (the API server's default configuration),
    `latest` when no version is pinned."""
    return labels.get(PREFIX + "enforce", "privileged"), labels.get(PREFIX + "enforce-version", "latest")


def _containers(spec: Obj) -> list[Obj]:  # visitContainers: containers, initContainers, ephemeralContainers
    return [c for key in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(key) or ()]


def _ctx(obj: Obj) -> Obj:
    return obj.get("securityContext") or {}


def _quote(names: Iterable[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _some(singular: str, plural: str, names: list[str]) -> str:
    return f"{singular if len(names) == 1 else plural} {_quote(names)}"


def _setters(pod_bad: bool, containers: list[str]) -> str:  # "pod and container "x"" as the checks say it
    return " and ".join((["pod"] if pod_bad else []) + ([_some("container", "containers", containers)]
                                                        if containers else []))


# --- baseline (pod-security-standards: "Baseline") -------------------------------------------------------------------

def app_armor(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # AppArmor: "On supported hosts, the RuntimeDefault AppArmor profile is applied by default. The baseline policy
    # should prevent overriding or disabling the default AppArmor profile"; allowed: RuntimeDefault, Localhost
    # (fields) and runtime/default, localhost/* (annotations)
    bad = sorted(f'{k}="{v}"' for k, v in (meta.get("annotations") or {}).items()
                 if k.startswith("container.apparmor.security.beta.kubernetes.io/")
                 and not (v in ("", "runtime/default") or v.startswith("localhost/")))
    bad += [f'{who} securityContext.appArmorProfile.type="Unconfined"'
            for who, ctx in [("pod", _ctx(spec))] + [(f'container "{c.get("name")}"', _ctx(c))
                                                     for c in _containers(spec)]
            if (ctx.get("appArmorProfile") or {}).get("type") == "Unconfined"]
    if bad:
        return ("forbidden AppArmor profile" if len(bad) == 1 else "forbidden AppArmor profiles"), ", ".join(bad)
    return None


BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def capabilities_baseline(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Capabilities: "Adding additional capabilities beyond those listed below must be disallowed" (the set above)
    bad, caps = [], set()
    for c in _containers(spec):
        extra = {x for x in (_ctx(c).get("capabilities") or {}).get("add") or () if x not in BASELINE_CAPABILITIES}
        if extra:
            bad.append(c.get("name"))
            caps |= extra
    if bad:
        return "non-default capabilities", (f"{_some('container', 'containers', bad)} must not include "
                                            f"{_quote(sorted(caps))} in securityContext.capabilities.add")
    return None


def host_namespaces(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Host Namespaces: "Sharing the host namespaces must be disallowed": spec.hostNetwork, hostPID, hostIPC
    bad = [f"{k}=true" for k in ("hostIPC", "hostNetwork", "hostPID") if spec.get(k)]
    return ("host namespaces", ", ".join(bad)) if bad else None


def host_path_volumes(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # HostPath Volumes: "HostPath volumes must be forbidden": spec.volumes[*].hostPath undefined/nil
    bad = [v.get("name") for v in spec.get("volumes") or () if v.get("hostPath") is not None]
    return ("hostPath volumes", _some("volume", "volumes", bad)) if bad else None


def host_ports(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Host Ports: "HostPorts should be disallowed entirely (recommended) or restricted to a known list": 0/undefined
    bad, ports = [], set()
    for c in _containers(spec):
        used = {str(p["hostPort"]) for p in c.get("ports") or () if p.get("hostPort")}
        if used:
            bad.append(c.get("name"))
            ports |= used
    if bad:
        return "hostPort", (f"{_some('container', 'containers', bad)} {'uses' if len(bad) == 1 else 'use'} "
                            f"{'hostPort' if len(ports) == 1 else 'hostPorts'} {', '.join(sorted(ports))}")
    return None


def privileged(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Privileged Containers: "Privileged Pods disable most security mechanisms and must be disallowed"
    bad = [c.get("name") for c in _containers(spec) if _ctx(c).get("privileged")]
    return ("privileged", f"{_some('container', 'containers', bad)} must not set securityContext.privileged=true") \
        if bad else None


def proc_mount(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # /proc Mount Type: "The default /proc masks are set up to reduce attack surface, and should be required";
    # allowed: undefined, Default (relaxed for pods in a user namespace, hostUsers: false)
    if spec.get("hostUsers") is False:
        return None
    bad = [c for c in _containers(spec) if _ctx(c).get("procMount") not in (None, "Default")]
    if bad:
        return "procMount", (f"{_some('container', 'containers', [c.get('name') for c in bad])} must not set "
                             f"securityContext.procMount to {_quote(sorted({_ctx(c)['procMount'] for c in bad}))}")
    return None


SELINUX_TYPES = ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t")


def se_linux(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # SELinux: "Setting the SELinux type is restricted, and setting a custom SELinux user or role option is
    # forbidden"; types allowed: undefined/"", container_t, container_init_t, container_kvm_t, container_engine_t
    types, user, role = set(), False, False

    def bad(ctx: Obj) -> bool:
        nonlocal user, role
        opts = ctx.get("seLinuxOptions")
        if opts is None:
            return False
        wrong = opts.get("type", "") not in SELINUX_TYPES
        if wrong:
            types.add(opts.get("type"))
        user, role = user or bool(opts.get("user")), role or bool(opts.get("role"))
        return wrong or bool(opts.get("user")) or bool(opts.get("role"))

    pod = bad(_ctx(spec))
    containers = [c.get("name") for c in _containers(spec) if bad(_ctx(c))]
    if pod or containers:
        what = ([f"{'type' if len(types) == 1 else 'types'} {_quote(sorted(types))}"] if types else []) + \
               (["user may not be set"] if user else []) + (["role may not be set"] if role else [])
        return "seLinuxOptions", (f"{_setters(pod, containers)} set forbidden securityContext.seLinuxOptions: "
                                  f"{'; '.join(what)}")
    return None


def _seccomp(meta: Obj, spec: Obj, required: bool) -> tuple[str, str] | None:
    valid = ("RuntimeDefault", "Localhost")
    pod_type = (_ctx(spec).get("seccompProfile") or {}).get("type")
    values = {pod_type} if pod_type is not None and pod_type not in valid else set()
    explicit, implicit = [], []
    for c in _containers(spec):
        kind = (_ctx(c).get("seccompProfile") or {}).get("type")
        if kind is not None and kind not in valid:
            explicit.append(c.get("name"))
            values.add(kind)
        elif kind is None and pod_type not in valid:
            implicit.append(c.get("name"))
    pod_bad = pod_type is not None and pod_type not in valid
    if pod_bad or explicit:
        return "seccompProfile", (f"{_setters(pod_bad, explicit)} must not set securityContext.seccompProfile.type "
                                  f"to {_quote(sorted(values))}")
    if required and implicit:
        return "seccompProfile", (f"pod or {_some('container', 'containers', implicit)} must set securityContext."
                                  f'seccompProfile.type to "RuntimeDefault" or "Localhost"')
    return None


def seccomp_baseline(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Seccomp: "Seccomp profile must not be explicitly set to Unconfined": RuntimeDefault, Localhost or undefined
    return _seccomp(meta, spec, required=False)


SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def sysctls(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Sysctls: "Sysctls can disable security mechanisms or affect all containers on a host, and should be disallowed
    # except for an allowed 'safe' subset" (the set above): spec.securityContext.sysctls[*].name
    bad = [s.get("name") for s in _ctx(spec).get("sysctls") or () if s.get("name") not in SAFE_SYSCTLS]
    return ("forbidden sysctls", ", ".join(bad)) if bad else None


# --- restricted (pod-security-standards: "Restricted": everything from baseline, and these) ---------------------------

def allow_privilege_escalation(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Privilege Escalation: spec.containers[*].securityContext.allowPrivilegeEscalation must be false
    bad = [c.get("name") for c in _containers(spec) if _ctx(c).get("allowPrivilegeEscalation") is not False]
    return ("allowPrivilegeEscalation != false", f"{_some('container', 'containers', bad)} must set "
                                                 "securityContext.allowPrivilegeEscalation=false") if bad else None


def capabilities_restricted(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Capabilities (restricted): "Containers must drop ALL capabilities, and are only permitted to add back the
    # NET_BIND_SERVICE capability"
    no_drop, adding, caps = [], [], set()
    for c in _containers(spec):
        capabilities = _ctx(c).get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or ()):
            no_drop.append(c.get("name"))
        extra = {x for x in capabilities.get("add") or () if x != "NET_BIND_SERVICE"}
        if extra:
            adding.append(c.get("name"))
            caps |= extra
    details = ([f'{_some("container", "containers", no_drop)} must set securityContext.capabilities.drop=["ALL"]']
               if no_drop else []) + \
              ([f"{_some('container', 'containers', adding)} must not include {_quote(sorted(caps))} in "
                "securityContext.capabilities.add"] if adding else [])
    return ("unrestricted capabilities", "; ".join(details)) if details else None


ALLOWED_VOLUMES = ("configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret")


def restricted_volumes(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Volume Types: "The Restricted policy only permits the following volume types": the set above
    bad = {v.get("name"): next((k for k in v if k != "name"), "") for v in spec.get("volumes") or ()
           if not any(k in ALLOWED_VOLUMES for k in v)}
    if bad:
        kinds = sorted(set(bad.values()))
        return "restricted volume types", (f"{_some('volume', 'volumes', sorted(bad))} "
                                           f"{'uses' if len(bad) == 1 else 'use'} restricted volume "
                                           f"{'type' if len(kinds) == 1 else 'types'} {_quote(kinds)}")
    return None


def run_as_non_root(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Running as Non-root: "Containers must be required to run as non-root users": runAsNonRoot true (pod level, or
    # each container's); relaxed for pods in a user namespace
    if spec.get("hostUsers") is False:
        return None
    pod = _ctx(spec).get("runAsNonRoot")
    explicit = [c.get("name") for c in _containers(spec) if _ctx(c).get("runAsNonRoot") is False]
    implicit = [c.get("name") for c in _containers(spec) if _ctx(c).get("runAsNonRoot") is None and pod is not True]
    if pod is False or explicit:
        return "runAsNonRoot != true", (f"{_setters(pod is False, explicit)} must not set "
                                        "securityContext.runAsNonRoot=false")
    if implicit:
        return "runAsNonRoot != true", (f"pod or {_some('container', 'containers', implicit)} must set "
                                        "securityContext.runAsNonRoot=true")
    return None


def run_as_user(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Running as Non-root user: "Containers must not set runAsUser to 0"
    if spec.get("hostUsers") is False:
        return None
    explicit = [c.get("name") for c in _containers(spec) if _ctx(c).get("runAsUser") == 0]
    pod = _ctx(spec).get("runAsUser") == 0
    return ("runAsUser=0", f"{_setters(pod, explicit)} must not set runAsUser=0") if pod or explicit else None


def seccomp_restricted(meta: Obj, spec: Obj) -> tuple[str, str] | None:
    # Seccomp (restricted): "Seccomp profile must be explicitly set to one of the allowed values"
    return _seccomp(meta, spec, required=True)


Check = Callable[[Obj, Obj], "tuple[str, str] | None"]
BASELINE: list[tuple[str, Check]] = [  # (check id, check) in the reference implementation's order
    ("appArmorProfile", app_armor), ("capabilities_baseline", capabilities_baseline),
    ("hostNamespaces", host_namespaces), ("hostPathVolumes", host_path_volumes), ("hostPorts", host_ports),
    ("privileged", privileged), ("procMount", proc_mount), ("seLinuxOptions", se_linux),
    ("seccompProfile_baseline", seccomp_baseline), ("sysctls", sysctls)]
RESTRICTED: list[tuple[str, Check, str]] = [  # (check id, check, the baseline check it replaces)
    ("allowPrivilegeEscalation", allow_privilege_escalation, ""),
    ("capabilities_restricted", capabilities_restricted, "capabilities_baseline"),
    ("restrictedVolumes", restricted_volumes, "hostPathVolumes"), ("runAsNonRoot", run_as_non_root, ""),
    ("runAsUser", run_as_user, ""), ("seccompProfile_restricted", seccomp_restricted, "seccompProfile_baseline")]


def violations(level: str, meta: Obj, spec: Obj) -> list[tuple[str, str]]:
    """(reason, detail) of each check of `level` the pod fails; none for privileged ("entirely unrestricted")."""
    if level == "privileged":
        return []
    replaced = {r for _, _, r in RESTRICTED} if level == "restricted" else set()
    checks = [check for cid, check in BASELINE if cid not in replaced]
    checks += [check for _, check, _ in RESTRICTED] if level == "restricted" else []
    return [found for check in checks if (found := check(meta, spec))]


def refusal(labels: dict[str, str], pod: Obj) -> str:
    """Why the namespace's enforce level refuses the pod ("" = admitted), as the plugin words it:
    'violates PodSecurity "baseline:latest": hostPath volumes (volume "root")'."""
    level, version = enforced(labels)
    found = violations(level, pod.get("metadata") or {}, pod.get("spec") or {})
    if not found:
        return ""
    return f'violates PodSecurity "{level}:{version}": ' + ", ".join(
        f"{reason} ({detail})" if detail else reason for reason, detail in found)
