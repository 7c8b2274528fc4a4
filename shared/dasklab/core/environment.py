"""One environment per lab (pure, called while validating start-lab and update-lab): the image tag and the
EXTRA_PIP_PACKAGES Jupyter, the scheduler and the workers run, the rule that they agree, and the record of it."""

from dasklab.core.errors import ValidationError

COMPONENTS = ("jupyter", "scheduler", "worker")
PIP_VARIABLE = "EXTRA_PIP_PACKAGES"


def _block(values: dict, component: str) -> dict:
    block = (values or {}).get(component)
    return block if isinstance(block, dict) else {}


def component_packages(values: dict, component: str) -> tuple[str, ...] | None:
    """The component's EXTRA_PIP_PACKAGES as sorted specs, or None when its values set none."""
    for var in _block(values, component).get("env") or ():
        if isinstance(var, dict) and var.get("name") == PIP_VARIABLE:
            words = str(var.get("value") or "").split()  # pip options (--upgrade) are not packages
            return tuple(sorted({w for w in words if not w.startswith("-")}))
    return None


def component_tag(values: dict, component: str) -> str | None:
    image = _block(values, component).get("image")
    tag = image.get("tag") if isinstance(image, dict) else None
    return None if tag is None else str(tag)


def jupyter_enabled(values: dict) -> bool:
    return _block(values, "jupyter").get("enabled", True) is not False


def lab_packages(values: dict) -> tuple[str, ...]:
    """What the lab's workers run with: the workers' EXTRA_PIP_PACKAGES."""
    return component_packages(values, "worker") or ()


def jupyter_packages(values: dict) -> tuple[str, ...]:
    """What the lab's Jupyter (and its kernels) run with: its own EXTRA_PIP_PACKAGES, as the chart's Jupyter image
    installs them; with one environment per lab, the workers' set."""
    return component_packages(values, "jupyter") or ()


def check_environment(values: dict, mixed: bool = False) -> tuple[str, ...]:
    """Refuse values that give Jupyter, the scheduler and the workers different environments; returns the notes
    to keep on the lab (the warning of a mixed environment, what the scheduler runs without).

    Jupyter and the workers run the user's code (the notebook builds graphs, the workers run the tasks): their
    EXTRA_PIP_PACKAGES must be the same set. The scheduler either lists the same set or none at all (the seed's
    config.yaml gives it none): it then runs the image's packages, and a note says so, because it deserializes
    every task graph. Image tags set on components must be the same tag (one set on some only is the lab's: every
    component runs it). `mixed` (mixed_environment: true) turns each
    refusal into a note."""
    sets = {c: component_packages(values, c) for c in COMPONENTS}
    if not jupyter_enabled(values):
        sets.pop("jupyter")
    refusals: list[tuple[str, str]] = []
    notes: list[str] = []
    compared = [c for c in sets if c != "scheduler" or sets[c] is not None]  # a scheduler listing none is allowed
    for c in compared:
        for pkg in sets[c] or ():
            if any(pkg not in (sets[o] or ()) for o in compared if o != c):
                without = " or ".join(o for o in sets if o != c and pkg not in (sets[o] or ()))
                refusals.append((f"values.{c}.env.{PIP_VARIABLE}", f"{pkg} is in {c} but not in {without}"))
    tags = {c: component_tag(values, c) for c in COMPONENTS}
    given = {c: t for c, t in tags.items() if t is not None}  # a tag on one component is the lab's (build_images)
    if len(set(given.values())) > 1:
        c, tag = next(iter(given.items()))
        others = ", ".join(f"{o} {t}" for o, t in given.items() if t != tag)
        refusals.append((f"values.{c}.image.tag", f"{tag} in {c} but {others}: give every component the same tag"))
    if refusals and not mixed:
        field, rule = refusals[0]
        more = f" (and {len(refusals) - 1} more difference(s))" if len(refusals) > 1 else ""
        raise ValidationError(field, f"{rule}{more}: one environment per lab — give jupyter, scheduler and worker "
                                     f"the same EXTRA_PIP_PACKAGES and image tag, or set mixed_environment: true")
    notes += [f"{field}: {rule} (mixed_environment: true: a mixed environment, as asked)" for field, rule in refusals]
    lab = sets.get("worker") or ()
    if sets.get("scheduler") is None and lab:
        notes.append(f"values.scheduler.env: sets no {PIP_VARIABLE}, so the scheduler runs without {' '.join(lab)}: "
                     f"a task graph holding their objects cannot be deserialized there; adding them to the "
                     f"scheduler later restarts it")
    return tuple(notes)


def environment_record(values: dict, chart_version: str = "", tag: str = "") -> dict:
    """The lab's environment as events report it: image tag (the values', else `tag`, the lab's Dask version)
    and packages of each component: the record from which the lab can be reproduced, with the chart version."""
    given = [t for c in COMPONENTS if (t := component_tag(values, c)) is not None]
    tag = given[0] if given else tag  # one tag given is every component's
    record = {c: {"image_tag": component_tag(values, c) or tag or "chart default",
                  "extra_pip_packages": list(component_packages(values, c) or ())} for c in COMPONENTS}
    if not jupyter_enabled(values):
        record.pop("jupyter")
    return {"chart_version": chart_version, **record} if chart_version else record
