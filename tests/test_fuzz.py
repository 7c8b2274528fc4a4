"""Property-based fuzzing of message bodies and attributes: never an unhandled exception, always a clear
error naming a field, the message acknowledged. `-m fuzz_large` runs ≥ 10,000 examples per property."""

import base64
import json
import logging

import pytest
from dasklab import entry
from dasklab.core.config import Config
from dasklab.core.errors import ValidationError
from dasklab.core.messages import COMMAND_TYPES, TICK_TYPES, Scale, StartLab, parse_command
from dasklab.core.specs import build_spec, check_caps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIELDS = ["v", "type", "lab", "owner", "workers", "initial", "min", "max", "machine_type", "worker_resources",
          "cpu", "memory", "idle_timeout", "max_lifetime", "spot", "expose", "source_ranges", "values", "until",
          "for", "pin", "unpin", "budget_seconds", "jupyter", "scheduler", "worker", "replicas", "resources",
          "limits", "env", "name", "value", "serviceType"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=50), st.sampled_from(COMMAND_TYPES + TICK_TYPES),
                    st.sampled_from(["1", "3G", "500m", "30m", "lab-1", "e2-standard-4", "0.0.0.0/0",
                                     "2026-11-27T02:00:00Z", "LoadBalancer", "EXTRA_PIP_PACKAGES"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6)),
    max_leaves=25)
messages = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=10).map(
    lambda d: {**d, "type": d.get("type", "start-lab")} if isinstance(d.get("type"), str) or "type" not in d else d)
names = st.from_regex(r"[a-z][a-z0-9-]{0,45}", fullmatch=True)
counts = st.integers(-1, 20)
durations = st.one_of(st.integers(-5, 10**6), st.from_regex(r"[0-9]{1,4}[smhdx]", fullmatch=True))
plausible = st.one_of(
    st.fixed_dictionaries({"type": st.just("start-lab"), "lab": names, "owner": names},
                          optional={"workers": st.fixed_dictionaries({}, optional={"initial": counts, "min": counts,
                                                                                   "max": counts}),
                                    "machine_type": st.sampled_from(["e2-standard-4", "e2-standard-2", "n2-x"]),
                                    "idle_timeout": durations, "max_lifetime": durations, "spot": st.booleans(),
                                    "values": st.sampled_from(["worker:\n  replicas: 2\n", "{", "- 1",
                                                               {"worker": {"replicas": 2}}])}),
    st.fixed_dictionaries({"type": st.just("scale"), "lab": names},
                          optional={"min": counts, "max": counts, "pin": counts, "unpin": st.booleans()}),
    st.fixed_dictionaries({"type": st.just("keep-alive"), "lab": names},
                          optional={"for": durations, "until": st.sampled_from(["2030-01-01T00:00:00Z", "x"])}),
    st.fixed_dictionaries({"type": st.sampled_from(["stop-lab"] + list(TICK_TYPES)), "lab": names}),
    st.fixed_dictionaries({"type": st.sampled_from(TICK_TYPES)}))
bodies = st.one_of(messages.map(lambda d: json.dumps(d).encode()), plausible.map(lambda d: json.dumps(d).encode()),
                   st.binary(max_size=300), st.text(max_size=200).map(str.encode))
attributes = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4)

SMALL = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LARGE = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_parse(body: bytes) -> None:
    try:
        cmd = parse_command(body)
    except ValidationError as e:
        assert e.field and e.rule and str(e) == f"{e.field}: {e.rule}"
    else:
        assert cmd.type in COMMAND_TYPES + TICK_TYPES


class Recorder:
    """Stands in for the controller (the property is about decoding and validation): it applies the
    controller's own checks (defaults, caps) and records what passes."""

    def __init__(self):
        self.handled, self.refusals = [], []

    def handle(self, cmd, mid, published=None, request_id="", sender=None):
        if isinstance(cmd, StartLab):
            build_spec(cmd, Config())
        elif isinstance(cmd, Scale):
            check_caps(cmd, Config())
        self.handled.append(cmd)

    def publish_outcome(self, command, lab, mid, request_id, outcome, reason, **extra):
        self.refusals.append({"outcome": outcome, "message_id": mid, "reason": reason, **extra})


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines = []

    def emit(self, record):
        self.lines.append(json.loads(record.getMessage()))


def check_entry(body: bytes, attrs: dict) -> None:
    recorder, errors = Recorder(), Errors()
    data = {"message": {"data": base64.b64encode(body).decode(), "attributes": attrs, "messageId": "f-1"}}
    logger = logging.getLogger("dasklab")
    logger.addHandler(errors)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(entry, "controller", lambda: recorder)
            entry.handle_event(data, "evt")  # returns normally: acknowledged
    finally:
        logger.removeHandler(errors)
    assert len(errors.lines) + len(recorder.handled) == 1  # exactly one outcome
    for err in errors.lines:
        assert err["field"] and err["reason"].startswith(err["field"]) and err["message_id"] == "f-1"
    # a refusal also reaches the sender, once, with the field and the rule
    assert [(r["outcome"], r["field"], r["reason"]) for r in recorder.refusals] == [
        ("refused", err["field"], err["reason"]) for err in errors.lines]


@SMALL
@given(bodies)
@pytest.mark.slow
def test_parse_never_crashes(body):
    check_parse(body)


@SMALL
@given(bodies, attributes)
@pytest.mark.slow
def test_entry_point_always_acknowledges_with_one_outcome(body, attrs):
    check_entry(body, attrs)


@pytest.mark.fuzz_large
@LARGE
@given(bodies)
def test_parse_never_crashes_large(body):
    check_parse(body)


@pytest.mark.fuzz_large
@LARGE
@given(bodies, attributes)
def test_entry_point_large(body, attrs):
    check_entry(body, attrs)


# --- the classes of issue 11: alias expansion, values overriding what the controller enforces, out-of-order ---

anchors = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


@st.composite
def alias_bombs(draw) -> str:
    """YAML whose aliases repeat what came before: a nested 'billion laughs', a merge key, or an alias in a list."""
    name, width, depth = draw(anchors), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["laughs", "merge", "list"]))
    if kind == "laughs":
        lines = [f"l0: &{name}0 [{', '.join(['lol'] * width)}]"]
        lines += [f"l{i}: &{name}{i} [{', '.join([f'*{name}{i - 1}'] * width)}]" for i in range(1, depth + 1)]
        return "\n".join(lines) + f"\nworker:\n  env: *{name}{depth}\n"
    if kind == "merge":
        return f"base: &{name}\n  replicas: {width}\nworker:\n  <<: *{name}\n"
    return f"jupyter: &{name}\n  serviceType: ClusterIP\nscheduler: *{name}\n"


@SMALL
@given(alias_bombs(), st.booleans())
def test_aliases_never_expand_into_a_lab(values, through_entry):
    body = json.dumps({"type": "start-lab", "lab": "bomb", "owner": "eve", "values": values}).encode()
    if through_entry:
        check_entry(body, {})
    try:
        build_spec(parse_command(body), Config())
    except ValidationError as e:
        assert e.field == "values" and "alias" in e.rule, str(e)
    else:
        raise AssertionError("a start-lab with YAML aliases was accepted")


ENFORCED_VALUES = st.fixed_dictionaries({}, optional={
    "scheduler": st.fixed_dictionaries({}, optional={
        "serviceType": st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]),
        "loadBalancerIP": st.sampled_from(["", "203.0.113.7"]), "nodeSelector": st.dictionaries(anchors, anchors),
        "env": st.lists(st.fixed_dictionaries({"name": st.sampled_from(
            ["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES", "A"]), "value": st.text(max_size=5)}), max_size=2)}),
    "webUI": st.fixed_dictionaries({"ingress": st.fixed_dictionaries({"enabled": st.booleans()})}),
    "worker": st.fixed_dictionaries({}, optional={
        "replicas": st.integers(0, 8), "threads_per_worker": st.integers(1, 16),
        "extraArgs": st.lists(st.sampled_from(["--name", "w", "--lifetime", "1h"]), max_size=4),
        "resources": st.fixed_dictionaries({}, optional={
            "limits": st.fixed_dictionaries({}, optional={"cpu": st.sampled_from([1, 2, "500m"]),
                                                          "memory": st.sampled_from(["3G", "2Gi", "6G"])}),
            "requests": st.fixed_dictionaries({}, optional={"cpu": st.sampled_from([1, "100m"]),
                                                            "memory": st.sampled_from(["1G", "3G"])})}),
        "env": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["POD_NAME", "B"]),
                                               "value": st.text(max_size=5)}), max_size=2)}),
    "additional_worker_groups": st.lists(st.fixed_dictionaries({"name": anchors}), max_size=2),
    "jupyter": st.fixed_dictionaries({}, optional={
        "serviceType": st.sampled_from(["ClusterIP", "LoadBalancer"]), "rbac": st.booleans(),
        "serviceAccountName": st.sampled_from(["", "admin"]), "password": st.sampled_from(["", "sha1:x"]),
        "ingress": st.fixed_dictionaries({"enabled": st.booleans()}),
        "env": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["JUPYTER_TOKEN", "C"]),
                                               "value": st.text(max_size=5)}), max_size=2)}),
})


@SMALL
@given(ENFORCED_VALUES, st.sampled_from([{}, {"worker_resources": {"cpu": 1, "memory": "3G"}}]),
       st.sampled_from([{}, {"workers": {"max": 8}}, {"workers": {"initial": 1, "max": 8}}]))
def test_values_that_override_what_the_controller_enforces_are_replaced_and_said(values, resources, workers):
    from dasklab.adapters.release import build_helm_values
    from dasklab.core.overrides import note_field
    from tests.test_overrides import changed
    body = {"type": "start-lab", "lab": "x", "owner": "o", "values": values, **resources, **workers}
    try:
        spec = build_spec(parse_command(json.dumps(body)), Config(backend="gke", project="p"))
    except ValidationError as e:
        assert e.field.startswith(("values", "workers")), str(e)
        return
    final = build_helm_values(spec, system_pool="system", worker_pool="workers")
    assert final["scheduler"]["serviceType"] == final["jupyter"]["serviceType"] == "ClusterIP"
    assert final["jupyter"]["rbac"] is False and final["jupyter"]["password"] == ""
    assert final["worker"]["extraArgs"][-2:] == ["--name", "$(POD_NAME)"] and final["worker"]["extraArgs"].count(
        "--name") == 1
    fields = [note_field(n) for n in spec.notes]
    missing = [p for p in changed(values, final) if not any(p == f or p.startswith(f + ".") for f in fields)]
    assert not missing, (missing, spec.notes)


@st.composite
def start_stop_histories(draw):
    """One lab's start-labs and stop-labs as published (distinct times), then delivered shuffled with copies."""
    kinds = draw(st.lists(st.sampled_from(["start-lab", "stop-lab"]), min_size=1, max_size=6))
    deliveries = [i for i in range(len(kinds)) for _ in range(draw(st.integers(1, 3)))]
    order = draw(st.permutations(deliveries))
    passes = draw(st.lists(st.integers(0, 3), min_size=len(order), max_size=len(order)))
    return kinds, order, passes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start_stop_histories())
@pytest.mark.slow
def test_out_of_order_start_and_stop_end_as_the_last_published(history):
    import tempfile
    from dasklab.adapters.files import FileTombstones
    from dasklab.core.errors import PermanentError, TransientError
    from dasklab.core.reconcile import Controller
    from tests.fakes import FakeBackend, ListEvents
    kinds, order, passes = history
    t0, now = 1_800_000_000.0, [1_800_000_100.0]
    with tempfile.TemporaryDirectory() as home:
        ctl = Controller(FakeBackend(), ListEvents(), Config(poll_s=0, confirm_s=2, cooldown_s=1, tick_budget_s=0),
                         clock=lambda: now[0], sleep=lambda s: None, tombstones=FileTombstones(home))
        queue = list(zip(order, passes))
        while queue:
            i, n = queue.pop(0)
            body = {"type": kinds[i], "lab": "x", **({"owner": "o"} if kinds[i] == "start-lab" else {})}
            try:
                ctl.handle(parse_command(json.dumps(body)), f"m{i}", published=t0 + i)
            except TransientError:
                queue.append((i, n))  # redelivered later
            except PermanentError:
                pass
            for _ in range(n + (1 if not queue or queue[0][0] == i else 0)):
                now[0] += 1
                ctl.reconcile_all("reconcile")
        for _ in range(30):
            now[0] += 1
            ctl.reconcile_all("reconcile")
    assert ("x" in ctl.backend.labs) == (kinds[-1] == "start-lab"), (kinds, order)
