"""The lab's environment (pure, called while validating start-lab and update-lab): the image tag and the
EXTRA_PIP_PACKAGES Jupyter, the scheduler and the workers run, what must agree among them, and the record of it."""

import re

from dasklab.core.errors import ValidationError

COMPONENTS = ("jupyter", "scheduler", "worker")
PIP_VARIABLE = "EXTRA_PIP_PACKAGES"
# a requirement as pip reads it: a project name, optional [extras], then what it pins (==1.2, >=2,<3, ~=1.4 …)
_REQUIREMENT = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[[^\]]*\])?\s*(.*)$")


def _block(values: dict, component: str) -> dict:
    block = (values or {}).get(component)
    return block if isinstance(block, dict) else {}


def _raw(values: dict, component: str) -> str | None:
    """The component's EXTRA_PIP_PACKAGES as written, or None when its values set none."""
    for var in _block(values, component).get("env") or ():
        if isinstance(var, dict) and var.get("name") == PIP_VARIABLE:
            return str(var.get("value") or "")
    return None


def component_packages(values: dict, component: str) -> tuple[str, ...] | None:
    """The component's EXTRA_PIP_PACKAGES as sorted specs, or None when its values set none."""
    raw = _raw(values, component)
    return None if raw is None else tuple(sorted({w for w in raw.split() if not w.startswith("-")}))  # not options


def requirement(spec: str) -> tuple[str, str]:
    """A requirement as written in EXTRA_PIP_PACKAGES → (its project name as pip compares names, what it pins).
    Names compare lowercased, runs of `-_.` as one `-` (packaging.python.org/en/latest/specifications/
    name-normalization); extras (`dask[dataframe]`) pin no version. A URL is its own name and pins nothing else."""
    m = None if "://" in spec else _REQUIREMENT.match(spec)
    if m is None:
        return spec.lower(), ""
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(2).replace(" ", "")


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
    installs them."""
    return component_packages(values, "jupyter") or ()


def _listed(values: dict, component: str) -> dict[str, str]:
    """The component's packages: project name → the requirement as written."""
    return {requirement(spec)[0]: spec for spec in component_packages(values, component) or ()}


def _pin_differences(sets: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """(field, rule) for each package listed by several components with different pins."""
    out = []
    for name in sorted({n for listed in sets.values() for n in listed}):
        pins = {c: requirement(listed[name])[1] for c, listed in sets.items() if name in listed}
        if len(set(pins.values())) > 1:
            said = ", ".join(f"{pin or 'unpinned (the newest)'} in {c}" for c, pin in pins.items())
            refused = next(c for c in pins if pins[c] != next(iter(pins.values())))
            out.append((f"values.{refused}.env.{PIP_VARIABLE}", f"{name} is pinned differently: {said}"))
    return out


def _tag_differences(values: dict) -> list[tuple[str, str]]:
    given = {c: t for c in COMPONENTS if (t := component_tag(values, c)) is not None}  # one given is the lab's
    if len(set(given.values())) <= 1:
        return []
    c, tag = next(iter(given.items()))
    others = ", ".join(f"{o} {t}" for o, t in given.items() if t != tag)
    return [(f"values.{c}.image.tag", f"{tag} in {c} but {others}: give every component the same tag")]


def _pip_value(values: dict, component: str, adding: list[str]) -> str:
    return " ".join(([_raw(values, component)] if _raw(values, component) else []) + adding)


def _gap_notes(values: dict, sets: dict[str, dict[str, str]], lab: str) -> list[str]:
    """What one component has and another lacks: accepted, with what fails and the update that adds it."""
    notes, update = [], f"`dasklab update-lab --lab {lab} --values FILE` with the same values but"
    jupyter, worker, scheduler = sets.get("jupyter"), sets["worker"], sets["scheduler"]
    if jupyter is not None and (only := [s for n, s in jupyter.items() if n not in worker]):
        it = "it" if len(only) == 1 else "them"
        notes.append(
            f"values.jupyter.env.{PIP_VARIABLE}: {' '.join(only)} in jupyter but not in worker: the notebook can use "
            f"{it} (plots of gathered results), but a task that imports {it} fails on the workers; to run such "
            f"tasks send {update} worker.env {PIP_VARIABLE}: \"{_pip_value(values, 'worker', only)}\" (the "
            "workers are replaced, their results kept)")
    if jupyter is not None and (only := [s for n, s in worker.items() if n not in jupyter]):
        it = "it" if len(only) == 1 else "them"
        notes.append(
            f"values.worker.env.{PIP_VARIABLE}: {' '.join(only)} in worker but not in jupyter: tasks may import {it}, "
            f"but the notebook can neither put objects of {it} in a graph nor read results holding them; for that "
            f"send {update} jupyter.env {PIP_VARIABLE}: \"{_pip_value(values, 'jupyter', only)}\" (Jupyter "
            "restarts)")
    if lacking := [s for n, s in worker.items() if n not in scheduler]:
        it = "it" if len(lacking) == 1 else "them"
        notes.append(
            f"values.scheduler.env: no {' '.join(lacking)} on the scheduler: it unpickles every task graph, so a "
            f"graph that names {it} (a function or object of {it}, or a notebook function using a module imported "
            "at the top) is refused at submission (\"Error during deserialization of the task graph\") and nothing "
            f"runs, while a task that imports {it} inside its function runs; to add {it} send {update} "
            f"scheduler.env {PIP_VARIABLE}: \"{_pip_value(values, 'scheduler', lacking)}\" and restart: true (the "
            "scheduler restarts: results held in memory are lost)")
    return notes


def check_environment(values: dict, mixed: bool = False, lab: str = "LAB") -> tuple[str, ...]:
    """Refuse what breaks a computation among Jupyter (the client: it builds and pickles the graphs), the scheduler
    (it unpickles every graph) and the workers (they run the tasks): the same package pinned differently, and
    different image tags (one tag given on some components only is every component's). `mixed`
    (mixed_environment: true) turns each refusal into a note. Returns the notes to keep on the lab.

    A package one component lists and another lacks is accepted with a note saying what fails and the update-lab
    that adds it (`lab` names the lab in it). Most are the normal case: the seed's Jupyter plots with matplotlib
    its workers lack, and the seed never gives its scheduler any package. A missing package fails loudly where it
    is needed, not in silence: on a worker, the task that imports it raises; on the scheduler (measured with
    distributed 2026.11: `Scheduler.update_graph` deserializes the whole graph, functions and arguments
    included), a graph that names it is refused at submission with distributed's "different environments" error
    before anything runs, while a task that imports it inside its function runs. A version difference instead
    can run and fail midway, or unpickle objects into another version's classes, so it is refused."""
    sets = {c: _listed(values, c) for c in COMPONENTS}
    if not jupyter_enabled(values):
        sets.pop("jupyter")
    refusals = _pin_differences(sets) + _tag_differences(values)
    if refusals and not mixed:
        field, rule = refusals[0]
        more = f" (and {len(refusals) - 1} more difference(s))" if len(refusals) > 1 else ""
        raise ValidationError(field, f"{rule}{more}: jupyter, the scheduler and the workers must run the same "
                                     "version of each package and the same image tag — give them the same, or set "
                                     "mixed_environment: true")
    notes = [f"{field}: {rule} (mixed_environment: true: a mixed environment, as asked)" for field, rule in refusals]
    return tuple(notes + _gap_notes(values, sets, lab))


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
