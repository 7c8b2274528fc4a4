"""Overrides: every part of a start-lab the controller replaces for safety, said in words (pure, from build_spec).

Each note reads "<field>: <what was done>; <what to do instead>". They mirror what `build_helm_values`
(adapters/release.py) enforces on GKE and what the local backend does not run; tests/test_overrides.py checks
that every chart value the release builder changes is named by a note.
"""

from dasklab.core.model import SHARED, LabSpec, build_system_resources, labs_per_system_node, parse_cpu, \
    parse_memory, system_slot

CONNECT = "reach it privately with `dasklab connect`"
POOL_KEYS = ("scheduler", "jupyter")  # components the controller places on the system pool
# env variables the controller sets itself, per component
ENFORCED_ENV = {"scheduler": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES", "worker": "POD_NAME",
                "jupyter": "JUPYTER_TOKEN"}
# How the worker Deployment replaces its pods on GKE (the chart's worker.strategy): every new pod at once, no old one
# before new ones are available; GkeBackend.apply_update holds "available" off until the new workers have joined the
# scheduler and the old ones have retired through it, so their results move first.
WORKER_STRATEGY = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": 0}}


def _block(values: dict, key: str) -> dict:
    block = values.get(key)
    return block if isinstance(block, dict) else {}


def _same(parse, a, b) -> bool:
    try:
        return parse(a) == parse(b)
    except ValueError:
        return False


def _service_notes(values: dict, spec: LabSpec, backend: str) -> list[str]:
    notes = []
    for key in ("scheduler", "jupyter"):
        kind = _block(values, key).get("serviceType")
        if kind is not None and kind != "ClusterIP":
            if key == "scheduler":
                instead = f"the scheduler is never public (its HTTP API has no authentication); {CONNECT}"
            elif spec.public_source_ranges:
                instead = ("Jupyter is public through the controller's own load balancer, open to "
                           f"expose.source_ranges ({', '.join(spec.public_source_ranges)}) only")
            else:
                instead = ("nothing is public by default; for a public Jupyter send expose.source_ranges with the "
                           f"networks to allow, or {CONNECT}")
            done = "replaced by ClusterIP" if backend != "local" else "not used (the local lab listens on 127.0.0.1)"
            notes.append(f"values.{key}.serviceType: {kind} {done}; {instead}")
    if _block(values, "scheduler").get("loadBalancerIP") is not None:
        notes.append("values.scheduler.loadBalancerIP: removed; the scheduler is never public")
    for key in ("webUI", "jupyter"):
        ingress = _block(values, key).get("ingress")
        if isinstance(ingress, dict) and ingress.get("enabled") not in (None, False):
            notes.append(f"values.{key}.ingress.enabled: turned off (no Ingress is made); {CONNECT}"
                         + (", or send expose.source_ranges for a public Jupyter" if key == "jupyter" else ""))
    return notes


def _account_notes(values: dict) -> list[str]:
    """The chart's serviceAccountName of each component: the lab's pods run under the lab's own account."""
    return [f"values.{key}.serviceAccountName: replaced by the lab's own service account, which has no Kubernetes "
            "rights and mounts no token; the lab's pods need none" for key in ("scheduler", "worker", "jupyter")
            if _block(values, key).get("serviceAccountName") is not None]


def _jupyter_notes(values: dict) -> list[str]:
    if "jupyter" not in values:
        return []
    jupyter, notes = _block(values, "jupyter"), []
    if jupyter.get("rbac"):
        notes.append("values.jupyter.rbac: turned off; Jupyter gets no Kubernetes rights (the controller scales "
                     "the workers: use `dasklab scale`)")
    given = "your password" if jupyter.get("password") else "the chart's default password"
    notes.append(f"values.jupyter.password: {given} is removed; Jupyter logs in with the lab's random token "
                 "(`dasklab connect` prints how to read it)")
    return notes


def _worker_notes(cmd, values: dict, spec: LabSpec) -> list[str]:
    worker, notes = _block(values, "worker"), []
    # an update-lab has no `workers`: build_update says what a changed replicas does
    replicas = worker.get("replicas") if getattr(cmd, "workers", None) is not None else None
    if replicas is not None and cmd.workers.initial is not None and replicas != cmd.workers.initial:
        notes.append(f"values.worker.replicas: {replicas} replaced by workers.initial ({cmd.workers.initial}); "
                     "send one of them")
    elif replicas is not None and (spec.min_workers < replicas or spec.max_workers > replicas):
        notes.append(f"values.worker.replicas: {replicas} is the initial count; the controller then scales between "
                     f"workers.min ({spec.min_workers}) and workers.max ({spec.max_workers}) from the scheduler's "
                     f"load; `dasklab scale --pin {replicas}` holds it")
    resources = worker.get("resources") if isinstance(worker.get("resources"), dict) else {}
    size = f"{spec.worker_cpu:g} CPU / {spec.worker_memory / 1e9:g} GB"
    for kind in ("limits", "requests"):
        given = resources.get(kind) if isinstance(resources.get(kind), dict) else {}
        cpu, memory = given.get("cpu"), given.get("memory")
        if (cpu is not None and not _same(parse_cpu, cpu, spec.worker_cpu)) or \
                (memory is not None and not _same(parse_memory, memory, spec.worker_memory)):
            why = "worker_resources" if kind == "limits" else "the limits (a worker gets what it is sized for)"
            notes.append(f"values.worker.resources.{kind}: replaced by {size} from {why}; size workers with "
                         "worker_resources or values.worker.resources.limits")
    threads = worker.get("threads_per_worker")
    if threads is not None and threads != max(1, int(spec.worker_cpu)):
        notes.append(f"values.worker.threads_per_worker: {threads} replaced by {max(1, int(spec.worker_cpu))} (one "
                     "per CPU of worker_resources); change the worker CPU instead")
    if worker.get("strategy") not in (None, WORKER_STRATEGY):
        notes.append("values.worker.strategy: replaced by RollingUpdate maxSurge 100% / maxUnavailable 0; an update "
                     "starts the new workers, waits until they joined, then retires the old ones so their results "
                     "move first")
    args = worker.get("extraArgs")
    if isinstance(args, list) and "--name" in args:
        notes.append("values.worker.extraArgs: --name removed; workers are named after their pods, so the "
                     "controller retires exactly the workers it chose")
    if values.get("additional_worker_groups"):
        notes.append("values.additional_worker_groups: dropped; one worker group, scaled by the controller (use "
                     "worker_resources and workers)")
    return notes


def _placement_and_env_notes(values: dict) -> list[str]:
    notes = []
    for key in ("scheduler", "worker", "jupyter"):
        block = _block(values, key)
        if block.get("nodeSelector"):
            pool = "the system pool" if key in POOL_KEYS else "the worker pool"
            notes.append(f"values.{key}.nodeSelector: pinned to {pool} as well (the controller places every "
                         "component); your labels still apply and must match that pool's nodes")
        env = block.get("env") if isinstance(block.get("env"), list) else []
        if any(isinstance(e, dict) and e.get("name") == ENFORCED_ENV[key] for e in env):
            notes.append(f"values.{key}.env: {ENFORCED_ENV[key]} is set by the controller; yours is replaced")
    return notes


def _image_notes(values: dict, spec: LabSpec) -> list[str]:
    version = getattr(spec, "dask_version", "")  # the lab's pinned Dask version, where the controller sets one
    notes = []
    for key in ("scheduler", "worker", "jupyter"):
        image = _block(values, key).get("image")
        tag = image.get("tag") if isinstance(image, dict) else None
        if version and tag is not None and str(tag) != version:
            notes.append(f"values.{key}.image.tag: {tag} replaced by {version}, the lab's Dask version; ask for "
                         "another Dask version instead")
    return notes


def _local_notes(values: dict) -> list[str]:
    """What the local backend does not apply from the chart values (its parts are processes of this machine)."""
    notes = []
    unused = sorted(set(_block(values, "jupyter")) - {"enabled", "env", "serviceType", "image"})  # said elsewhere
    if unused:
        notes.append(f"values.jupyter: {', '.join(unused)} not applied by the local lab (its Jupyter is a process "
                     "of this machine, with the lab's packages); `dasklab connect` prints its URL")
    for key in ("scheduler",):  # the workers' are installed into the lab's own venv (adapters/envs.py)
        env = _block(values, key).get("env") if isinstance(_block(values, key).get("env"), list) else []
        if any(isinstance(e, dict) and e.get("name") == "EXTRA_PIP_PACKAGES" for e in env):
            notes.append(f"values.{key}.env: EXTRA_PIP_PACKAGES is not installed by the local lab (it runs this "
                         "machine's Python environment); install the packages there")
    return notes


# what a scheduler or Jupyter gets when its values ask nothing (the system pool is sized for these, model.LAB_SYSTEM_*)
SYSTEM_DEFAULT_REQUESTS = {"cpu": "500m", "memory": "1G"}


def build_share_notes(values: dict, spec: LabSpec, system_machine: str) -> list[str]:
    """GKE: the scheduler's and Jupyter's resources asked past their slot of a system node (model.system_slot,
    what build_helm_values caps them to), one note per component (more than one scheduler is refused: chart_values)."""
    shared = spec.placement == SHARED
    cpu, memory = system_slot(system_machine, shared)
    where = (f"one {system_machine} system node shared by {labs_per_system_node(system_machine)} labs" if shared
             else f"its own {system_machine} system node")
    notes = []
    for key in POOL_KEYS:
        asked = _block(values, key).get("resources")
        if not isinstance(asked, dict):
            continue
        got = build_system_resources(asked, SYSTEM_DEFAULT_REQUESTS, (cpu, memory))
        if any(isinstance(asked.get(kind), dict) and asked[kind].get(q) is not None and not _same(
                parse, asked[kind][q], got[kind][q]) for kind in got for q, parse in (("cpu", parse_cpu),
                                                                                     ("memory", parse_memory))):
            notes.append(f"values.{key}.resources: capped at {cpu:g} CPU / {memory / 2**30:g} GiB (requests and "
                         f"limits), half the lab's share of {where}, so no lab takes another's; run heavy work on "
                         "the workers (worker_resources)")
    return notes


def build_overrides(cmd, spec: LabSpec, backend: str = "gke") -> tuple[str, ...]:
    """The notes of a start-lab or update-lab (`cmd`: its workers and values) as built into `spec`, for `backend`."""
    values = spec.values if isinstance(spec.values, dict) else {}
    notes = (_service_notes(values, spec, backend)
             + (_local_notes(values) if backend == "local" else _jupyter_notes(values) + _account_notes(values))
             + _worker_notes(cmd, values, spec) + _placement_and_env_notes(values) + _image_notes(values, spec))
    return tuple(notes)


def note_field(note: str) -> str:
    """The field a note names (what comes before its first ': ')."""
    return note.split(": ", 1)[0]
