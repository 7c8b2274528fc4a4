"""Chart-values allowlist (pure, called by messages while validating a request's `values`): every Dask Helm chart key
a request may set, what dasklab does with it and why; any other key is refused, naming it."""

from dataclasses import dataclass

from dasklab.core.config import DASK_WINDOW_TEXT
from dasklab.core.errors import ValidationError
from dasklab.core.overrides import ENFORCED_ENV

# chart values once parsed: as compact JSON at most this many bytes, nested at most this deep (YAML anchors and
# aliases are refused, so a message's values cannot expand past its own size; this bounds what is stored)
MAX_VALUES_BYTES = 32 * 1024
MAX_VALUES_DEPTH = 16
DOCS_PAGE, DOCS_SECTION = "docs/security.md", "Accepted chart values"  # where the table below is documented
NOT_ACCEPTED = f"is not an accepted chart value (see {DOCS_PAGE}: {DOCS_SECTION})"
COMPONENTS = ("scheduler", "worker", "jupyter")
LIST = "[]"  # in a key path: each item of a list ("worker.env[].name")


@dataclass(frozen=True)
class Accepted:
    """One accepted key: what dasklab does with its value and why it is accepted."""

    does: str
    why: str
    # "scalar": one value (text, number, true/false); "labels": a mapping of names to text; "strings": a list of text;
    # "any": anything, as the controller replaces it whole (it never reaches the chart)
    shape: str = "scalar"
    only: tuple = ()  # when not empty: the values accepted
    never: tuple = ()  # values refused, because of never_why
    never_why: str = ""


# Variables that change how the notebook image starts Jupyter or how it logs in: the image's start-notebook reads
# NOTEBOOK_ARGS (extra server arguments), DOCKER_STACKS_JUPYTER_CMD (the subcommand) and JUPYTERHUB_API_TOKEN (hands
# over to a JupyterHub single-user server) (github.com/jupyter/docker-stacks images/base-notebook/start-notebook.py);
# jupyter_core reads JUPYTER_CONFIG_DIR / JUPYTER_CONFIG_PATH for where config lives
# (docs.jupyter.org/en/latest/use/jupyter-directories.html). Any of them could turn the token off.
JUPYTER_START_ENV = ("NOTEBOOK_ARGS", "DOCKER_STACKS_JUPYTER_CMD", "JUPYTERHUB_API_TOKEN", "JUPYTER_CONFIG_DIR",
                     "JUPYTER_CONFIG_PATH")
_START_WHY = "changes how Jupyter starts or where it reads its config, so it could turn the token off"
_POOL = {"scheduler": "the system pool", "worker": "the worker pool", "jupyter": "the system pool"}
_QUANTITY = {"cpu": "CPU (1, 0.5, 500m)", "memory": "memory (3G, 512Mi)"}


def _component(c: str) -> dict[str, Accepted]:
    """The keys every component (scheduler, worker, jupyter) accepts."""
    keys = {}
    if c == "worker":
        keys["worker.replicas"] = Accepted(
            "the initial worker count and, without workers.max, the maximum (the replicas rule); the controller then "
            "scales between workers.min and workers.max", "the seed's config.yaml sets it: the user's intent")
    else:
        keys[f"{c}.replicas"] = Accepted(
            "passed to the chart", f"one {c} a lab: the controller reaches and guards that one", only=(1,))
    for kind in ("limits", "requests"):
        for q in ("cpu", "memory"):
            keys[f"{c}.resources.{kind}.{q}"] = Accepted(
                "replaced by the worker size (worker_resources, else resources.limits), a note if it differs"
                if c == "worker" else (f"passed to the chart: the pod's {kind} of {_QUANTITY[q]}, capped at the "
                                       f"{c}'s slot of a system node (a note; memory limited to its request)"),
                "the seed's config.yaml sizes every component; only CPU and memory, which every node has"
                + ("; a worker is sized to fit its node" if c == "worker" else ""))
    start = c == "jupyter"  # its variables that change how Jupyter starts are refused
    keys[f"{c}.env[].name"] = Accepted(
        f"passed to the chart; {ENFORCED_ENV[c]} is the controller's (yours is replaced, a note)"
        + (f"; {', '.join(JUPYTER_START_ENV)} are refused: each {_START_WHY}" if start else ""),
        "the seed's config.yaml sets EXTRA_PIP_PACKAGES (package specs only, no shell characters)",
        never=JUPYTER_START_ENV if start else (), never_why=f"it {_START_WHY}" if start else "")
    keys[f"{c}.env[].value"] = Accepted(
        "passed to the chart (text)", "a variable's literal value; valueFrom is refused: it reads Secrets, "
                                      "ConfigMaps and pod fields the lab does not own")
    keys[f"{c}.image.repository"] = Accepted("passed to the chart", "any image whose tag states the Dask version")
    keys[f"{c}.image.tag"] = Accepted(
        f"passed to the chart; it must state a Dask version ({DASK_WINDOW_TEXT}, e.g. 2026.3.0-py3.12), the same for "
        "every component", "the lab's Dask version: every component runs it")
    keys[f"{c}.image.pullPolicy"] = Accepted(
        "passed to the chart", "how the kubelet pulls the image", only=("Always", "IfNotPresent", "Never"))
    keys[f"{c}.nodeSelector"] = Accepted(
        f"kept, and pinned to {_POOL[c]} as well (a note)", "the controller places every component; your labels "
                                                            "can only narrow that", shape="labels")
    keys[f"{c}.serviceAccountName"] = Accepted(
        "replaced by the lab's own service account, which has no Kubernetes rights and mounts no token (a note)",
        "a named account would lend its rights (the install Job's may write the lab's Secrets and record)")
    return keys


_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
# The keys of one component only (with the chart's top-level keys about it), by component.
_OWN = {
    "scheduler": {
        "scheduler.serviceType": Accepted(
            "replaced by ClusterIP (a note); `dasklab connect` reaches it privately",
            "the seed's config.yaml sets LoadBalancer; the scheduler's port and HTTP API have no authentication",
            only=_SERVICE_TYPES),
        "scheduler.loadBalancerIP": Accepted("removed (a note)", "the scheduler is never public"),
        "webUI.ingress.enabled": Accepted("turned off (a note): no Ingress is made",
                                          "the dashboard is reached privately, with `dasklab connect`"),
    },
    "worker": {
        "worker.extraArgs": Accepted(
            "passed to dask-worker; --name and its value are removed (a note)",
            "worker options (--lifetime, --resources) are the user's; the controller names workers after their pods "
            "to retire exactly those it chose", shape="strings"),
        "worker.strategy": Accepted(
            "replaced by RollingUpdate maxSurge 100% / maxUnavailable 0 (a note)",
            "new workers join before the old retire, so their results move first", shape="any"),
        "worker.threads_per_worker": Accepted("replaced by one thread per worker CPU (a note)",
                                              "sized by worker_resources"),
        "additional_worker_groups": Accepted("dropped (a note)", "one worker group, scaled by the controller",
                                             shape="any"),
    },
    "jupyter": {
        "jupyter.enabled": Accepted("passed: false runs the lab without Jupyter",
                                    "a lab driven from the user's own Dask client needs none"),
        "jupyter.serviceType": Accepted(
            "replaced by ClusterIP (a note); a public Jupyter is the controller's own load balancer, open to "
            "expose.source_ranges only", "the seed's config.yaml sets LoadBalancer", only=_SERVICE_TYPES),
        "jupyter.password": Accepted("removed (a note): Jupyter logs in with the lab's random token",
                                     "the chart's default password is public"),
        "jupyter.rbac": Accepted("turned off (a note): Jupyter gets no Kubernetes rights",
                                 "the controller scales the workers (`dasklab scale`)"),
        "jupyter.ingress.enabled": Accepted("turned off (a note): no Ingress is made",
                                            "a public Jupyter goes through expose.source_ranges"),
    },
}

# THE table: validation (check_chart_values) and the docs' section (build_docs_table) both come from it.
ACCEPTED: dict[str, Accepted] = {key: entry for c in COMPONENTS for key, entry in {**_component(c), **_OWN[c]}.items()}


def _parts(path: str) -> tuple[str, ...]:
    return tuple(path.replace(LIST, "." + LIST).split("."))  # "worker.env[].name" → (worker, env, [], name)


_ENTRIES = {_parts(path): entry for path, entry in ACCEPTED.items()}
_INNER = {parts[:i] for parts in _ENTRIES for i in range(1, len(parts))}  # mappings (or lists) holding entries


def _leaf(entry: Accepted, value, field: str) -> None:
    if value is None or entry.shape == "any":
        return
    if entry.shape == "labels":
        if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise ValidationError(field, "must be a mapping of node label names to text values")
    elif entry.shape == "strings":
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValidationError(field, "must be a list of text arguments")
    elif isinstance(value, (dict, list)):
        raise ValidationError(field, "must be a single value (text, a number or true/false)")
    if entry.only and (isinstance(value, bool) or value not in entry.only):
        raise ValidationError(field, f"must be {entry.only[0]} ({entry.why})" if len(entry.only) == 1 else
                              f"must be one of {', '.join(map(str, entry.only))}")
    if value in entry.never:
        raise ValidationError(field, f"{value} is refused: {entry.never_why}")


def _check(value, parts: tuple, field: str) -> None:
    if parts in _ENTRIES:
        return _leaf(_ENTRIES[parts], value, field)
    if value is None:
        return
    if parts + (LIST,) in _INNER:
        if not isinstance(value, list):
            raise ValidationError(field, "must be a list")
        for i, item in enumerate(value):
            _check(item, parts + (LIST,), f"{field}.{i}")
        return
    if not isinstance(value, dict):
        raise ValidationError(field, "must be a mapping")
    for key, item in value.items():
        inner, where = parts + (key,), f"{field}.{key}" if field else str(key)
        if inner not in _ENTRIES and inner not in _INNER:
            raise ValidationError(where, NOT_ACCEPTED)
        _check(item, inner, where)


def check_chart_values(values: dict) -> None:
    """Refuse (ValidationError naming the key's full path, e.g. `worker.mounts`) any key of `values` that ACCEPTED
    does not list, and a value of the wrong shape or outside an entry's `only` / in its `never`."""
    _check(values, (), "")


def build_docs_table() -> str:
    """The docs' table of accepted keys (docs/security.md, `Accepted chart values`), one row per ACCEPTED entry."""
    rows = ["| key | what dasklab does | why |", "|---|---|---|"]
    for path, entry in ACCEPTED.items():
        only = f"; accepted: {', '.join(map(str, entry.only))}" if entry.only else ""
        rows.append(f"| `{path}` | {entry.does}{only} | {entry.why} |")
    return "\n".join(rows)



def _yaml_without_aliases(text: str):
    """YAML text → data, refusing aliases (`*name`, hence `<<: *name` merges): an alias repeats a whole subtree,
    so a few hundred bytes of nested aliases expand to gigabytes."""
    import yaml  # only messages that carry YAML pay for it

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ValueError(f"uses the YAML alias *{event.anchor} (line {event.start_mark.line + 1}): anchors "
                                 "and aliases are not accepted, as they can expand a small message into a huge "
                                 "one; write the values out")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(f"is not valid YAML: {e}") from None
    except RecursionError:
        raise ValueError(f"is nested too deeply: at most {MAX_VALUES_DEPTH} levels") from None


def _depth(v) -> int:
    """How deeply mappings and lists nest (a scalar is 0), without recursion."""
    deepest, todo = 0, [(v, 1)]
    while todo:
        item, level = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            if level <= MAX_VALUES_DEPTH:
                todo.extend((child, level + 1) for child in children)
    return deepest


def check_values_bound(v: dict) -> None:
    """Refuse chart values nested deeper than MAX_VALUES_DEPTH or larger than MAX_VALUES_BYTES as JSON."""
    import json
    if _depth(v) > MAX_VALUES_DEPTH:
        raise ValueError(f"is nested deeper than {MAX_VALUES_DEPTH} levels")
    size = len(json.dumps(v, separators=(",", ":"), default=str))
    if size > MAX_VALUES_BYTES:
        raise ValueError(f"is {size} bytes once parsed (as JSON); at most {MAX_VALUES_BYTES} bytes allowed")

if __name__ == "__main__":
    print(build_docs_table())
