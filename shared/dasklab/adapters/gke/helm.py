"""GKE backend, the Dask release: the Helm Job that installs or upgrades it, its rollout, and what its pods say
(health, the scheduler's API, Jupyter)."""

import secrets
from dataclasses import replace

from google.cloud import container_v1 as gke

from dasklab.core import logs
from dasklab.core.errors import JupyterUnreachable, SchedulerUnreachable, TransientError
from dasklab.core.model import NO_JUPYTER, JupyterActivity, Lab, WorkerProblem, parse_memory
from dasklab.core.policy import plan_rollout
from dasklab.adapters.release import TOKEN_KEY, TOKEN_SECRET, build_limit_range, build_namespace, \
    build_network_policies, build_quota, build_release, build_student_access, build_token_secret
from dasklab.adapters.dashboard import Dashboard
from dasklab.adapters.jupyter import JupyterApi
from dasklab.adapters.kube import Kube
from dasklab.adapters.gke.base import GkeBase, HOLD_S, place_of


def build_install_failure(log_head: str) -> str:
    """pip's error lines from the head of a container's log, when its EXTRA_PIP_PACKAGES install failed ("" else)."""
    if PIP_STARTED not in log_head:
        return ""
    return "\n".join(line for line in log_head.splitlines() if line.startswith("ERROR: "))


def _epoch(when) -> float:
    return when.timestamp() if hasattr(when, "timestamp") else 0.0


def pod_problems(pod, memory_limit: int) -> list[WorkerProblem]:
    """What a worker pod's status says (core/v1 PodStatus): the PodScheduled condition False/Unschedulable with
    the scheduler's message; per container, state.waiting (CrashLoopBackOff, ErrImagePull, ImagePullBackOff) and
    lastState.terminated (reason OOMKilled, exit code 137) with restartCount. The crash log is added by the caller."""
    name, status, found = pod.metadata.name, pod.status, []
    for cond in status.conditions or ():
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            found.append(WorkerProblem("pending", name, cond.message or "Unschedulable"))
    limits = {c.name: ((c.resources and c.resources.limits) or {}).get("memory") for c in pod.spec.containers or ()}
    for c in status.container_statuses or ():
        waiting = c.state and c.state.waiting
        last = c.last_state and c.last_state.terminated
        limit = parse_memory(limits[c.name]) if limits.get(c.name) else memory_limit
        if waiting and waiting.reason in PULL_FAILURES:
            found.append(WorkerProblem("image-pull", name, f"{waiting.reason}: {waiting.message or ''}".strip(": ")))
            continue
        if not last:
            continue
        ended = f"{last.reason or 'terminated'}, exit code {last.exit_code}"
        if waiting and waiting.reason:
            ended = f"{waiting.reason}; last run {ended}"
        if last.reason == "OOMKilled":
            kind = "oom-killed"
        else:
            kind = "crash-looping" if waiting and waiting.reason == "CrashLoopBackOff" else "restarting"
        found.append(WorkerProblem(kind, name, ended, at=_epoch(last.finished_at), restarts=c.restart_count or 0,
                                   memory_limit=limit if kind == "oom-killed" else 0))
    return found


PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
PIP_FAILURE = ("EXTRA_PIP_PACKAGES", "pip install", "No matching distribution", "Could not find a version")
PIP_STARTED = "EXTRA_PIP_PACKAGES environment variable found"


class Helm(GkeBase):
    """The lab's Dask release."""

    def _release(self, lab: Lab):
        cfg, place = self.config, place_of(lab)
        return build_release(lab.spec, release=place.release, namespace=place.namespace, chart_repo=cfg.chart_repo,
                             chart_version=cfg.chart_version, helm_image=cfg.helm_image,
                             system_pool=cfg.system_pool, worker_pool=cfg.worker_pool,
                             system_machine=cfg.system_machine_type,
                             replicas=lab.state.revision_workers if lab.spec.revision > 1 else None)

    def release_job(self, lab: Lab) -> str:
        """The name of the Helm Job of the lab's recorded revision (a hash of what it installs)."""
        return self._release(lab).job_name

    def _release_state(self, lab: Lab, cluster: gke.Cluster) -> tuple[str, str]:
        """Follow the install Job: absent, installing, failed (with the tail of its log) or deployed (Job done
        and the scheduler answering through the API server's proxy)."""
        place, release = place_of(lab), self._release(lab)
        kube = self._kube(place, cluster)
        job = kube.read_job(place.namespace, release.job_name)
        if job is None:
            return "absent", ""
        conditions = {c.type: c.status for c in (job.status.conditions or [])}
        if conditions.get("Failed") == "True":
            tail = kube.job_log_tail(place.namespace, release.job_name).strip()[-800:]
            return "failed", f"helm job {release.job_name} failed: {tail}"
        if conditions.get("Complete") != "True":
            return "installing", f"helm job {release.job_name} running"
        try:
            self.dashboard(lab).transport.get("/health")
        except SchedulerUnreachable as e:
            refused = self._refused_pods(kube, place)
            if refused:
                return "failed", refused
            return "installing", f"release installed; scheduler not answering yet ({e})"
        return "deployed", ""

    @staticmethod
    def _refused_pods(kube: Kube, place) -> str:
        """Why the API server refuses the scheduler's or Jupyter's pods, if it does: their Deployment's condition
        ReplicaFailure (reason FailedCreate, the admission's message: Pod Security, LimitRange, quota) — kept on
        the Deployment while the refusal lasts (apps/v1 DeploymentConditionType)."""
        for component in ("scheduler", "jupyter"):
            deployment = kube.deployment(place.namespace, f"{place.fullname}-{component}")
            for cond in (deployment and deployment.status and deployment.status.conditions) or ():
                if cond.type == "ReplicaFailure" and cond.status == "True":
                    return f"the {component}'s pods are refused by the API server: {cond.message}"
        return ""

    def apply_install(self, lab: Lab) -> None:
        """Namespace, Jupyter's token Secret, installer RBAC, values ConfigMap and the Helm Job (each created
        if absent: a repeated install is harmless; a later invocation follows the Job). The namespace gets its
        LimitRange and NetworkPolicies (and in a shared cluster its ResourceQuota) first, so no pod of the release runs
        without them."""
        place = place_of(lab)
        kube = self._kube(place, self._running(place))
        release = self._release(lab)
        kube.create(build_namespace(place.namespace, lab.name, place.class_name))
        kube.create(build_token_secret(place.namespace, lab.name, secrets.token_urlsafe(32)))
        for manifest in build_student_access(place.namespace, lab.name, place.release, lab.spec.access) \
                if lab.spec.access else ():  # a student with a Google account connects to this lab, and only to it
            kube.create(manifest)
        kube.create(build_limit_range(lab.spec, release.values, place.namespace))  # before any pod, every placement
        if place.shared:
            self._grow_system_pool(lab, place, kube)
            kube.create(build_quota(lab.spec, release.values, place.namespace))
        for manifest in build_network_policies(lab.spec, place.release, place.namespace):  # in every placement
            kube.create(manifest)
        for manifest in release.manifests[1:]:
            kube.create(manifest)

    def apply_access(self, lab: Lab) -> bool:
        """The lab's people (`spec.access`: its student's and its class owner's Google accounts) are the subjects of
        its `dasklab-connect` RoleBinding, compared with the cluster's and written when they differ; True if changed.
        Nothing to do where the lab's namespace does not exist yet: its install creates the binding from the
        record."""
        place = place_of(lab)
        kube = self._kube(place, self._running(place))
        if kube.namespace_phase(place.namespace) != "Active":
            return False
        return kube.ensure_subjects(*build_student_access(place.namespace, lab.name, place.release, lab.spec.access))

    def apply_environment(self, spec) -> None:
        """Nothing: the chart's images install EXTRA_PIP_PACKAGES at container start."""

    def apply_update(self, lab: Lab) -> bool:
        """One step of running the recorded revision, re-derived from the cluster at each call:
        1. no Job of this revision yet: hold the worker rollout, then create the revision's values ConfigMap and
           hash-named Job running `helm upgrade` (created if absent, so a repeat is the same Job). The hold is the
           worker Deployment's minReadySeconds at HOLD_S: with the release's RollingUpdate maxSurge 100 % /
           maxUnavailable 0, Kubernetes starts every new worker pod at once and keeps each old one until new ones
           are available, which they are not while held; helm's three-way merge keeps it (the chart renders no
           minReadySeconds);
        2. the Job runs: wait (a failed Job is reported by fetch_infra: the lab fails with the Job's log tail);
        3. the Job completed: `_roll_workers`. True once no worker pod of an older template is left."""
        place = place_of(lab)
        cluster = self._running(place)
        kube = self._kube(place, cluster)
        release = self._release(lab)
        job = kube.read_job(place.namespace, release.job_name)
        if job is None:
            kube.set_min_ready(place.namespace, place.workers, HOLD_S)  # before the Job: a crash between repeats it
            # a lab an earlier version installed gets the boundaries it lacks: its Pod Security labels, NetworkPolicies
            kube.ensure_labels(build_namespace(place.namespace, lab.name, place.class_name))
            for manifest in build_network_policies(lab.spec, place.release, place.namespace):
                kube.create(manifest)
            kube.ensure_spec(build_limit_range(lab.spec, release.values, place.namespace))  # the new sizes' bounds
            kube.ensure_subjects(*build_student_access(place.namespace, lab.name, place.release, lab.spec.access))
            if place.shared:
                kube.ensure_spec(build_quota(lab.spec, release.values, place.namespace))
            for manifest in release.manifests[1:]:  # the namespace exists; RBAC is created if absent
                kube.create(manifest)
            logs.emit("INFO", lab=lab.name, action="helm-upgrade", job=release.job_name,
                      reason=f"revision {lab.spec.revision}: helm upgrade by Job {release.job_name}, the old "
                             f"workers held until their replacements joined")
            return False
        conditions = {c.type: c.status for c in (job.status.conditions or [])}
        if conditions.get("Complete") != "True":
            return False
        return self._roll_workers(lab, cluster, kube)

    def _roll_workers(self, lab: Lab, cluster: gke.Cluster, kube: Kube) -> bool:
        """One step of replacing the worker pods of an older template (plan_rollout, as the local backend): room
        in the pool for old + new pods, then wait until every new pod's worker joined the scheduler, then retire
        the old workers through it (their results move to the new ones) and lift the hold, so Kubernetes deletes
        the old pods. The old/new split is each pod's pod-template-hash against the newest ReplicaSet's."""
        place = place_of(lab)
        deployment = kube.deployment(place.namespace, place.workers)
        if deployment is None:
            raise TransientError(f"lab {lab.name}: no worker Deployment")
        if (deployment.status.observed_generation or 0) < (deployment.metadata.generation or 0):
            return False  # the Deployment controller has not acted on the new template yet
        current = kube.current_template_hash(place.namespace, deployment)
        pods = kube.pods_of(place.namespace, place.workers)
        stale = {p.metadata.name for p in pods if (p.metadata.labels or {}).get("pod-template-hash") != current}
        fresh = {p.metadata.name for p in pods} - stale
        want = deployment.spec.replicas or 0
        if not stale:
            if deployment.spec.min_ready_seconds:
                kube.set_min_ready(place.namespace, place.workers, 0)
            return True
        self._ensure_nodes(lab, cluster, len(stale) + want,
                           f"{len(stale)} old and {want} new workers run side by side while they are replaced")
        dashboard = self.dashboard(lab)
        workers = dashboard.fetch_workers()
        step = plan_rollout(len(stale), len(fresh), len({w.name for w in workers} & fresh), want)
        if step.action != "retire":
            return False  # Kubernetes starts the new pods; their workers join
        addresses = [w.address for w in workers if w.name in stale]
        logs.emit("INFO", lab=lab.name, action="rollout-retire", revision=lab.spec.revision, reason=step.reason,
                  workers=sorted(w.name for w in workers if w.name in stale))
        if set(dashboard.apply_retire(addresses)) != set(addresses):
            return False  # one still holds results: the hold stays, a later pass retires it
        kube.set_min_ready(place.namespace, place.workers, 0)  # the new pods are available: the old ones go
        return False

    def fetch_worker_health(self, lab: Lab) -> tuple[WorkerProblem, ...]:
        """From the worker pods' status, with the previous container's log tail for a crash, and for a running
        worker the head of its log: a failed EXTRA_PIP_PACKAGES install at container start shows there."""
        place = place_of(lab)
        kube, found = self._kube(place), []
        for pod in kube.pods_of(place.namespace, place.workers):
            problems = pod_problems(pod, lab.spec.worker_memory)
            for problem in problems:
                if problem.kind in ("crash-looping", "restarting"):
                    tail = kube.pod_log_tail(place.namespace, pod.metadata.name, previous=True)
                    kind = "install-failed" if any(word in tail for word in PIP_FAILURE) else problem.kind
                    problem = replace(problem, kind=kind, log_tail=tail)
                found.append(problem)
            running = [c for c in pod.status.container_statuses or () if c.state and c.state.running]
            if running and not problems:  # a worker that started: did its packages install?
                errors = build_install_failure(kube.pod_log_head(place.namespace, pod.metadata.name))
                if errors:
                    found.append(WorkerProblem("install-failed", pod.metadata.name,
                                               "the worker runs without them: the image starts it after a failed "
                                               "pip install", log_tail=errors))
        return tuple(found)

    def dashboard(self, lab: Lab) -> Dashboard:
        place = place_of(lab)
        kube = self._kube(place)
        nodes: dict[str, str] = {}

        def node_of(worker: str) -> str:  # worker name = pod name
            if worker not in nodes:
                nodes.update({p.metadata.name: p.spec.node_name or f"unscheduled:{p.metadata.name}"
                              for p in kube.pods_of(place.namespace, place.workers)})
            return nodes.get(worker, worker)

        return Dashboard(kube.proxy(place.namespace, f"{place.fullname}-scheduler", f"{place.fullname}-webui"),
                         node_of=node_of)

    def fetch_jupyter(self, lab: Lab) -> JupyterActivity:
        """The chart's Jupyter through the API server's service proxy (`<fullname>-jupyter` port 80), logging in
        with the token of the Secret the controller made; NO_JUPYTER if the values disable it or no pod serves."""
        if ((lab.spec.values or {}).get("jupyter") or {}).get("enabled", True) is False:
            return NO_JUPYTER
        place = place_of(lab)
        kube = self._kube(place)
        token = kube.read_secret(place.namespace, TOKEN_SECRET, TOKEN_KEY)
        if token is None:
            raise JupyterUnreachable(f"lab {lab.name}: no Secret {TOKEN_SECRET}")
        return JupyterApi(kube.proxy(place.namespace, f"{place.fullname}-jupyter", "80"), token).fetch_activity()
