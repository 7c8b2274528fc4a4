"""Property-based fuzzing of message bodies and attributes: never an unhandled exception, always a clear
error naming a field, the message acknowledged. `-m fuzz_large` runs ≥ 10,000 examples per property."""

import base64
import json
import logging

import pytest
from dasklab import entry
from dasklab.core.config import Config
from dasklab.core.errors import ValidationError
from dasklab.core.messages import COMMAND_TYPES, TICK_TYPES, Scale, StartLab, build_spec, check_caps, parse_command
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

    def handle(self, cmd, mid, request_id=""):
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
def test_parse_never_crashes(body):
    check_parse(body)


@SMALL
@given(bodies, attributes)
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
