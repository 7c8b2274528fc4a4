"""Message schema: valid commands parse, bad ones are refused with the field and the rule."""

import base64
import json
from pathlib import Path

import pytest
import yaml

from dasklab.core.config import Config
from dasklab.core.errors import ValidationError
from dasklab.core.messages import EXPOSE_RULE, MAX_MESSAGE_BYTES, StartLab, decode_pubsub, parse_command
from dasklab.core.specs import build_spec, check_caps

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NESTED_20: dict = {}
for _ in range(19):
    NESTED_20 = {"k": NESTED_20}
SEED = (EXAMPLES / "config.yaml").read_text()
CFG = Config()


def start(**kw) -> dict:
    return {"v": 1, "type": "start-lab", "lab": "intro", "owner": "alice", **kw}


def refused(payload) -> ValidationError:
    with pytest.raises(ValidationError) as e:
        cmd = parse_command(payload if isinstance(payload, (bytes, str)) else json.dumps(payload))
        if isinstance(cmd, StartLab):
            build_spec(cmd, CFG)
    return e.value


@pytest.mark.parametrize("as_text", [True, False])
def test_seed_config_yaml_is_accepted_verbatim(as_text):
    values = SEED if as_text else yaml.safe_load(SEED)
    cmd = parse_command(json.dumps(start(values=values)))
    spec = build_spec(cmd, CFG)
    assert spec.values == yaml.safe_load(SEED)  # kept as written, for Helm
    assert (spec.worker_cpu, spec.worker_memory) == (1.0, 3 * 10**9)  # from worker.resources.limits
    assert spec.initial_workers == 3  # from worker.replicas


@pytest.mark.smoke
def test_example_start_lab_and_defaults():
    spec = build_spec(parse_command((EXAMPLES / "start-lab.json").read_bytes()), CFG)
    assert (spec.min_workers, spec.initial_workers, spec.max_workers) == (1, 2, 8)
    assert spec.idle_timeout_s == 1800 and spec.max_lifetime_s == 8 * 3600 and spec.spot
    minimal = build_spec(parse_command(json.dumps({"type": "start-lab", "lab": "a1", "owner": "bob"})), CFG)
    assert minimal.machine_type == CFG.default_machine_type and minimal.idle_timeout_s == CFG.default_idle_timeout_s


@pytest.mark.parametrize("payload, field, rule", [
    (start(lab="Intro"), "lab", "lowercase letters"),
    (start(lab="a" * 41), "lab", "≤ 40 chars"),
    (start(lab="1abc"), "lab", "start with a letter"),
    (start(lab="abc-"), "lab", "end with a letter or digit"),
    (start(owner="Alice@x.org"), "owner", "GKE label value"),
    (start(owner="a" * 64), "owner", "1-63 chars"),
    (start(workers={"min": 5, "max": 2}), "workers", "min (5) must be ≤ max (2)"),
    (start(workers={"initial": 9, "max": 8}), "workers", "between min"),
    (start(workers={"max": 99}), "workers.max", "controller cap max_workers=16"),
    (start(max_lifetime="13h"), "max_lifetime", "controller cap"),
    (start(idle_timeout="soon"), "idle_timeout", "not a duration"),
    (start(machine_type="m9-huge"), "machine_type", "unknown machine type"),
    (start(worker_resources={"cpu": 0, "memory": "1G"}), "worker_resources.cpu", "positive CPU"),
    (start(worker_resources={"cpu": 1, "memory": "3X"}), "worker_resources.memory", "memory quantity"),
    (start(worker_resources={"cpu": 8, "memory": "3G"}), "worker_resources", "does not fit"),
    (start(values="worker: [unclosed"), "values", "not valid YAML"),
    (start(values="- a list"), "values", "must be a mapping"),
    (start(values="base: &a\n  replicas: 2\nworker:\n  <<: *a\n"), "values", "uses the YAML alias *a (line 4)"),
    (start(values={"worker": {"env": [{"name": "A", "value": "x" * 40000}]}}), "values",
     "once parsed (as JSON); at most 32768 bytes allowed"),
    (start(values={"x": NESTED_20}), "values", "nested deeper than 16 levels"),
    (start(values="a: " + "[" * 5000 + "]" * 5000), "values", "nested too deeply"),
    ('{"type": "start-lab", "lab": "a", "owner": "b", "values": {"x": ' + "[" * 5000 + "]" * 5000 + "}}", "data",
     "nested too deeply"),
    (start(values={"worker": {"resources": {"limits": {"memory": "lots"}}}}), "values.worker.resources.limits.memory",
     "memory quantity"),
    (start(values={"jupyter": {"serviceType": "Public"}}), "values.jupyter.serviceType", "ClusterIP"),
    (start(values={"worker": {"replicas": -1}}), "values.worker.replicas", ">= 0"),
    (start(values={"worker": {"env": [{"name": "EXTRA_PIP_PACKAGES", "value": "x; rm -rf /"}]}}),
     "values.worker.env.0", "no shell characters"),
    (start(expose={"source_ranges": ["0.0.0.0/0"]}), "expose.source_ranges", "whole internet"),
    (start(expose={"source_ranges": []}), "expose.source_ranges", "length >= 1"),
    (start(surprise=1), "surprise", "Extra inputs are not permitted"),
    (start(workers={"max": 16}), "workers.max", "max_nodes=8"),  # on e2-standard-2: 1 worker a node → 16 nodes
    ({"type": "keep-alive", "lab": "a"}, "message", "exactly one of 'until'"),
    ({"type": "keep-alive", "lab": "a", "until": "2026-11-27T02:00:00"}, "until", "time zone"),
    ({"type": "scale", "lab": "a"}, "message", "at least one of"),
    ({"type": "scale", "lab": "a", "pin": 2, "unpin": True}, "message", "pin or unpin"),
    ({"type": "reconcile", "budget_seconds": 9999}, "budget_seconds", "<= 530"),
    ({"type": "nope"}, "type", "must be one of start-lab"),
    ({"lab": "a"}, "type", "required"),
    ({"v": 2, "type": "reconcile"}, "v", "unsupported schema version"),
    ([1, 2], "data", "JSON object"),
    ("not json", "data", "JSON object"),
    (b"\xff\xfe", "data", "JSON object"),
    ("x" * (MAX_MESSAGE_BYTES + 1), "data", "at most 65536 bytes allowed"),
])
@pytest.mark.smoke
def test_refusals_name_field_and_rule(payload, field, rule):
    if field == "workers.max" and "max_nodes" in rule:
        payload = {**payload, "machine_type": "e2-standard-2"}
    e = refused(payload)
    assert e.field == field and rule in e.rule, f"{e.field}: {e.rule}"


@pytest.mark.parametrize("ranges, opened", [
    (["0.0.0.0/1", "128.0.0.0/1"], "opens 4,294,967,296 IPv4 addresses"),  # the whole internet in two halves
    (["10.0.0.0/8", "11.0.0.0/24"], "opens 16,777,472 IPv4 addresses"),
    (["1.0.0.0/9", "2.0.0.0/9", "3.0.0.0/9", "1.0.0.0/10"], "opens 25,165,824 IPv4 addresses"),  # overlap once
    (["2001:db8::/31"], "IPv6 addresses"),
    (["203.0.113.0/24", "2001:db8::/32", "2001:db9::/48"], "IPv6 addresses"),
])
def test_expose_is_bounded_by_the_addresses_it_opens(ranges, opened):
    e = refused(start(expose={"source_ranges": ranges}))
    assert e.field == "expose.source_ranges" and opened in e.rule and e.rule.endswith(EXPOSE_RULE), e.rule


@pytest.mark.parametrize("ranges", [
    ["10.0.0.0/8"], ["10.0.0.0/8", "10.0.0.0/9", "10.1.2.3/32"], ["203.0.113.0/24", "198.51.100.7"],
    ["10.0.0.0/8", "2001:db8::/32"],  # each family within its own bound
])
def test_expose_within_the_bound_is_accepted(ranges):
    assert build_spec(parse_command(json.dumps(start(expose={"source_ranges": ranges}))), CFG).public_source_ranges \
        == tuple(ranges)


def test_caps_on_scale():
    with pytest.raises(ValidationError, match="pin: 40 is above the controller cap"):
        check_caps(parse_command(json.dumps({"type": "scale", "lab": "a", "pin": 40})), CFG)


def test_ticks_and_keep_alive_parse():
    assert parse_command(b'{"type": "reconcile"}').budget_seconds is None
    ka = parse_command(json.dumps({"type": "keep-alive", "lab": "a", "for": "2h"}))
    assert ka.deadline(1000.0) == 1000.0 + 7200
    ka = parse_command(json.dumps({"type": "keep-alive", "lab": "a", "until": "1970-01-01T01:00:00+00:00"}))
    assert ka.deadline(0) == 3600


def test_decode_pubsub():
    data = {"message": {"data": base64.b64encode(b'{"type":"reconcile"}').decode(), "messageId": "42",
                        "attributes": {"a": "b"}}, "subscription": "projects/p/subscriptions/s"}
    assert decode_pubsub(data) == (b'{"type":"reconcile"}', {"a": "b"}, "42")
    for bad, field in [({}, "message"), ({"message": {"data": "!!!"}}, "message.data"),
                       ({"message": {"data": "", "attributes": [1]}}, "message.attributes"), ("text", "message")]:
        with pytest.raises(ValidationError) as e:
            decode_pubsub(bad)
        assert e.value.field == field


@pytest.mark.parametrize("text, seconds", [("60", 60), (" 90 ", 90), ("90s", 90), ("30m", 1800), (60, 60)])
def test_durations_accept_plain_seconds_as_text(text, seconds):
    """What a command line sends: `--idle-timeout 60`, `keep-alive --for 90` arrive as text."""
    assert parse_command(json.dumps(start(idle_timeout=text))).idle_timeout == seconds
    assert parse_command(json.dumps({"type": "keep-alive", "lab": "a", "for": text})).deadline(0) == seconds


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "60 s", "5w"])
def test_durations_still_refuse_what_is_not_seconds(text):
    e = refused(start(idle_timeout=text))
    assert e.field == "idle_timeout", e


def test_a_few_hundred_bytes_of_aliases_never_become_a_huge_lab():
    """The issue's case: each level repeats the one before nine times (9**8 leaves once expanded)."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = "\n".join(lines) + "\nworker:\n  replicas: 1\n"
    assert len(bomb) < 600
    e = refused(start(values=bomb))
    assert e.field == "values" and "anchors and aliases are not accepted" in e.rule
