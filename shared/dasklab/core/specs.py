"""Builders: a validated command → the lab's spec (worker counts, sizes, caps, the Dask version), pure."""

from dataclasses import replace

from dasklab.core.config import Config, check_dask_version
from dasklab.core.environment import check_environment
from dasklab.core.errors import ValidationError
from dasklab.core.messages import DEFAULT_MAX_WORKERS, ChartValues, Scale, StartLab, UpdateLab, WorkerCounts
from dasklab.core.model import MACHINE_TYPES, LabSpec, parse_memory, system_pool_usd_h


def check_caps(cmd: StartLab | Scale, config: Config, spec: LabSpec | None = None) -> None:
    """Refuse requests above the controller's caps (never truncate them)."""
    max_workers = cmd.workers.max if isinstance(cmd, StartLab) else cmd.max
    field = "workers.max" if isinstance(cmd, StartLab) else "max"
    if isinstance(cmd, StartLab) and spec is not None:
        max_workers = spec.max_workers
        if cmd.workers.max is None and _replicas(cmd) is not None:
            field = "values.worker.replicas"  # it set the maximum
    if max_workers is not None and max_workers > config.max_workers:
        raise ValidationError(field, f"{max_workers} is above the controller cap max_workers={config.max_workers}")
    if isinstance(cmd, StartLab) and (cmd.max_lifetime or 0) > config.max_lifetime_s:
        raise ValidationError("max_lifetime", f"{cmd.max_lifetime}s is above the controller cap "
                                              f"max_lifetime={config.max_lifetime_s}s")
    if isinstance(cmd, Scale) and cmd.pin is not None and cmd.pin > config.max_workers:
        raise ValidationError("pin", f"{cmd.pin} is above the controller cap max_workers={config.max_workers}")
    if spec is not None and max_workers is not None and spec.nodes_for(max_workers) > config.max_nodes:
        raise ValidationError(field, f"{max_workers} workers need {spec.nodes_for(max_workers)} {spec.machine_type} "
                              f"nodes, above the controller cap max_nodes={config.max_nodes}")


def _worker_limits(chart: ChartValues):
    worker = chart.worker
    return worker.resources.limits if worker and worker.resources and worker.resources.limits else None


def _check_fits(spec: LabSpec, field: str = "worker_resources") -> None:
    cpu_node, mem_node = MACHINE_TYPES[spec.machine_type]
    if spec.worker_cpu > cpu_node or spec.worker_memory > mem_node * 2**30:
        raise ValidationError(field, f"a worker of {spec.worker_cpu} CPU / {spec.worker_memory / 1e9:.1f} GB does "
                                     f"not fit on one {spec.machine_type} ({cpu_node} CPU / {mem_node} GiB)")


def build_update(cmd: UpdateLab, spec: LabSpec, config: Config | None = None) -> LabSpec:
    """The spec an update-lab asks for: the new values in place of the old (as `helm upgrade -f` does), the
    worker size from their `worker.resources.limits` (else the lab's), the same environment rule as start-lab.
    The Dask version is the one the new tags state, else the lab's. A changed `values.worker.replicas` is the lab's
    new maximum, as at start-lab (the replicas rule), under the caps of `config`. The revision is not counted here:
    the controller does, when the values differ."""
    limits = _worker_limits(cmd.chart)
    version = _dask_version(cmd, replace(Config(), dask_version=spec.dask_version))
    notes = check_environment(cmd.values, cmd.mixed_environment, cmd.lab)
    new = replace(spec, values=cmd.values, mixed_environment=cmd.mixed_environment, notes=notes,
                  worker_cpu=(limits and limits.cpu) or spec.worker_cpu,
                  worker_memory=(limits and limits.memory) or spec.worker_memory, dask_version=version)
    _check_fits(new, "values.worker.resources.limits")
    if config is not None:  # what the controller replaces in the new values, said as at start-lab
        from dasklab.core.overrides import build_overrides, build_share_notes
        shares = build_share_notes(new.values, new, config.system_machine_type) if config.backend == "gke" else []
        new = replace(new, notes=build_overrides(cmd, new, config.backend) + tuple(shares) + new.notes)
    return _update_maximum(new, spec, _replicas(cmd), config)


def _update_maximum(new: LabSpec, spec: LabSpec, replicas: int | None, config: Config | None) -> LabSpec:
    """The replicas rule of an update: `values.worker.replicas`, when it differs from the lab's, becomes the maximum
    (the seed's `helm upgrade` with `replicas: 15`); refused below the lab's min or pin, or above the caps."""
    was = ((spec.values or {}).get("worker") or {}).get("replicas") if isinstance(spec.values, dict) else None
    if replicas is None or replicas == was or replicas == spec.max_workers:
        return new
    field, hi = "values.worker.replicas", max(replicas, 1)
    floor = max(spec.min_workers, spec.pinned_workers or 0)
    if replicas < floor:
        raise ValidationError(field, f"{replicas} is below the lab's min or pin ({floor}): lower them with "
                                     "`dasklab scale` first, or raise values.worker.replicas")
    if config is not None and hi > config.max_workers:
        raise ValidationError(field, f"{replicas} is above the controller cap max_workers={config.max_workers}")
    if config is not None and new.nodes_for(hi) > config.max_nodes:
        raise ValidationError(field, f"{replicas} workers need {new.nodes_for(hi)} {new.machine_type} nodes, above "
                                     f"the controller cap max_nodes={config.max_nodes}")
    note = (f"values.worker.replicas: {replicas} is the lab's maximum now (was {spec.max_workers}); the controller "
            f"scales between workers.min ({spec.min_workers}) and {hi} from the scheduler's load; `dasklab scale "
            f"--pin {replicas}` holds it")
    return replace(new, max_workers=hi, notes=(note,) + new.notes)


def _replicas(cmd: StartLab) -> int | None:
    worker = cmd.chart.worker
    return worker.replicas if worker else None


def build_worker_counts(workers: WorkerCounts, replicas: int | None) -> tuple[int, int, int]:
    """(min, initial, max) from `workers` and the chart's `values.worker.replicas`, the user's intent: it gives
    the initial workers unless workers.initial does, and the maximum unless workers.max does; a workers.max
    below it is refused with both fields named (never truncated)."""
    lo, given_max = workers.min, workers.max
    if replicas is not None and given_max is not None and replicas > given_max:
        raise ValidationError("values.worker.replicas", f"{replicas} is above workers.max ({given_max}): raise "
                                                        f"workers.max to at least {replicas} or lower "
                                                        "values.worker.replicas")
    hi = given_max if given_max is not None else max(replicas, lo, 1) if replicas is not None \
        else max(DEFAULT_MAX_WORKERS, lo)
    if replicas is not None and workers.initial is None and replicas < lo:
        raise ValidationError("values.worker.replicas", f"{replicas} is below workers.min ({lo}): lower "
                                                        f"workers.min or raise values.worker.replicas")
    initial = workers.initial if workers.initial is not None else replicas if replicas is not None else lo
    if lo > hi:
        raise ValidationError("workers", f"min ({lo}) must be ≤ max ({hi})")
    if not lo <= initial <= hi:
        raise ValidationError("workers", f"initial ({initial}) must be between min ({lo}) and max ({hi})")
    return lo, initial, hi


def _dask_version(cmd: StartLab | UpdateLab, config: Config) -> str:
    """The Dask version the lab runs: the one its values' image tags state (all alike), else the config's."""
    stated = {}
    for name in ("scheduler", "worker", "jupyter"):
        component = getattr(cmd.chart, name)
        if component and component.image and component.image.tag is not None:
            stated[f"values.{name}.image.tag"] = check_dask_version("", str(component.image.tag))
    if len(set(stated.values())) > 1:
        field = sorted(stated)[-1]
        raise ValidationError(field, "every component must run the same Dask version; the tags state "
                                     + ", ".join(f"{f}={v}" for f, v in sorted(stated.items())))
    return next(iter(stated.values()), config.dask_version)


def build_system_usd_h(config: Config, students: int, shared: bool) -> float:
    """What a lab's system pool costs it an hour on GKE (0 on the local backend, which has none)."""
    return system_pool_usd_h(students, shared, config.system_machine_type, config.system_nodes,
                             config.zone_count) if config.backend == "gke" else 0.0


def build_spec(cmd: StartLab, config: Config, placement: str = "") -> LabSpec:
    """The lab's desired spec from a start-lab (a class's lab: in its `placement`): fill defaults from the config
    and the chart values; the notes say every part of the request the controller replaces."""
    from dasklab.core.overrides import build_overrides, build_share_notes

    limits = _worker_limits(cmd.chart)
    if cmd.worker_resources:
        cpu, memory = cmd.worker_resources.cpu, cmd.worker_resources.memory
    else:
        cpu = (limits and limits.cpu) or config.default_worker_cpu
        memory = (limits and limits.memory) or parse_memory(config.default_worker_memory)
    lo, initial, hi = build_worker_counts(cmd.workers, _replicas(cmd))
    spec = LabSpec(
        name=cmd.lab, owner=cmd.owner, min_workers=lo, max_workers=hi,
        initial_workers=initial, machine_type=cmd.machine_type or config.default_machine_type,
        worker_cpu=cpu, worker_memory=memory,
        idle_timeout_s=cmd.idle_timeout or config.default_idle_timeout_s,
        max_lifetime_s=cmd.max_lifetime or min(config.default_lifetime_s, config.max_lifetime_s),
        spot=cmd.spot, values=cmd.values,
        public_source_ranges=tuple(cmd.expose.source_ranges) if cmd.expose else (),
        dask_version=_dask_version(cmd, config),  # first: different Dask versions are refused, mixed or not
        mixed_environment=cmd.mixed_environment, notes=check_environment(cmd.values, cmd.mixed_environment, cmd.lab),
        system_usd_h=build_system_usd_h(config, students=1, shared=False), placement=placement,
    )
    _check_fits(spec)
    check_caps(cmd, config, spec)
    shares = tuple(build_share_notes(spec.values, spec, config.system_machine_type)) if config.backend == "gke" else ()
    return replace(spec, notes=build_overrides(cmd, spec, config.backend) + shares + spec.notes)  # overrides, env
