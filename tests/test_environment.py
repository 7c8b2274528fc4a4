"""One environment per lab: the rule on jupyter / scheduler / worker packages and image tags, and its record."""

import json
from pathlib import Path

import pytest
import yaml

from dasklab.core.config import Config
from dasklab.core.environment import check_environment, environment_record
from dasklab.core.errors import ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.specs import build_spec, build_update
from dasklab.core.policy import JUPYTER_RESTARTS, plan_jupyter_restart, plan_rollout, plan_update
from tests.conftest import make_spec

# The seed lab's second and third config.yaml (its steps 4 and 6), without the LoadBalancers.
SEED_STEP4 = """
jupyter:
  env:
    - name: EXTRA_PIP_PACKAGES
      value: "pyarrow gcsfs"
worker:
  replicas: 4
  env:
    - name: EXTRA_PIP_PACKAGES
      value: "pyarrow gcsfs"
"""
SEED_STEP6 = """
jupyter:
  resources: {limits: {cpu: 1, memory: 3G}, requests: {cpu: 0.5, memory: 2G}}
  env:
    - name: EXTRA_PIP_PACKAGES
      value: "pyarrow gcsfs matplotlib"
scheduler:
  resources: {limits: {cpu: 1, memory: 3G}, requests: {cpu: 0.5, memory: 2G}}
worker:
  replicas: 15
  resources: {limits: {cpu: 1, memory: 3G}, requests: {cpu: 0.5, memory: 2.5G}}
  env:
    - name: EXTRA_PIP_PACKAGES
      value: "pyarrow gcsfs"
"""


def pip(value: str) -> dict:
    return {"env": [{"name": "EXTRA_PIP_PACKAGES", "value": value}]}


def test_seed_step4_is_one_environment_with_a_note_on_the_scheduler():
    notes = check_environment(yaml.safe_load(SEED_STEP4))
    assert notes == ("values.scheduler.env: sets no EXTRA_PIP_PACKAGES, so the scheduler runs without gcsfs pyarrow: "
                     "a task graph holding their objects cannot be deserialized there; adding them to the scheduler "
                     "later restarts it",)


def test_seed_step6_is_refused_naming_the_package_unless_mixed():
    with pytest.raises(ValidationError) as e:
        check_environment(yaml.safe_load(SEED_STEP6))
    assert e.value.field == "values.jupyter.env.EXTRA_PIP_PACKAGES"
    assert e.value.rule.startswith("matplotlib is in jupyter but not in scheduler or worker")
    assert "mixed_environment: true" in e.value.rule
    notes = check_environment(yaml.safe_load(SEED_STEP6), mixed=True)
    assert notes[0].startswith("values.jupyter.env.EXTRA_PIP_PACKAGES: matplotlib is in jupyter")
    assert notes[0].endswith("(mixed_environment: true: a mixed environment, as asked)")


@pytest.mark.parametrize("values, field, words", [
    ({"worker": pip("s3fs")}, "values.worker.env.EXTRA_PIP_PACKAGES", "s3fs is in worker but not in jupyter"),
    ({"jupyter": pip("a b"), "worker": pip("a b"), "scheduler": pip("a")}, "values.jupyter.env.EXTRA_PIP_PACKAGES",
     "b is in jupyter but not in scheduler"),
    ({c: {"image": {"tag": t}} for c, t in (("jupyter", "2026.3.0"), ("scheduler", "2026.3.0"),
                                            ("worker", "2026.3.0-py3.12"))},
     "values.jupyter.image.tag", "2026.3.0 in jupyter but worker 2026.3.0-py3.12"),
])
def test_differences_are_refused_with_the_field(values, field, words):
    with pytest.raises(ValidationError) as e:
        check_environment(values)
    assert e.value.field == field and words in e.value.rule


@pytest.mark.parametrize("values", [
    {}, {"jupyter": pip("a b"), "worker": pip("b  a --upgrade"), "scheduler": pip("a b")},
    {"jupyter": {"enabled": False}, "worker": pip("x")},
    {c: {"image": {"tag": "2026.3.0"}} for c in ("jupyter", "scheduler", "worker")},
    {"worker": {"image": {"tag": "2026.3.0"}}},  # one tag: every component runs it
])
def test_one_environment_passes(values):
    assert all("mixed" not in n for n in check_environment(values))


def test_start_lab_keeps_the_warning_and_lab_ready_records_the_environment():
    values = yaml.safe_load(SEED_STEP6)
    msg = {"v": 1, "type": "start-lab", "lab": "l", "owner": "o", "values": SEED_STEP6}
    with pytest.raises(ValidationError):
        build_spec(parse_command(json.dumps(msg)), Config())
    spec = build_spec(parse_command(json.dumps({**msg, "mixed_environment": True})), Config())
    assert spec.mixed_environment and any(n.endswith("a mixed environment, as asked)") for n in spec.notes)
    record = environment_record(values, "2024.1.1")
    assert record == {"chart_version": "2024.1.1",
                      "jupyter": {"image_tag": "chart default",
                                  "extra_pip_packages": ["gcsfs", "matplotlib", "pyarrow"]},
                      "scheduler": {"image_tag": "chart default", "extra_pip_packages": []},
                      "worker": {"image_tag": "chart default", "extra_pip_packages": ["gcsfs", "pyarrow"]}}


def update(values, spec=None, **kw):
    spec = spec or make_spec(values={"worker": {"replicas": 1}})
    return spec, build_update(parse_command(json.dumps({"v": 1, "type": "update-lab", "lab": "lab", "values": values,
                                                        **kw})), spec)


@pytest.mark.parametrize("values, restart, verdict, words", [
    ({"worker": {"replicas": 1}}, False, "duplicate", "values unchanged: revision 1"),
    (yaml.safe_load(SEED_STEP4), False, "update", "revision 2: workers replaced gracefully"),
    ({"worker": {"replicas": 1, "resources": {"limits": {"cpu": 2, "memory": "6G"}}}}, False, "update",
     "workers replaced"),
    ({"worker": {"replicas": 1}, "scheduler": {"resources": {"limits": {"memory": "3G"}}}}, False, "refuse",
     "values.scheduler.resources change(s) the scheduler: it restarts, and every result held in memory is lost"),
    ({"worker": {"replicas": 1}, "scheduler": {"resources": {"limits": {"memory": "3G"}}}}, True, "update",
     "scheduler restarted (resources; restart: true)"),
    ({"worker": {"replicas": 1}, "scheduler": {"serviceType": "LoadBalancer"}}, False, "update",
     "chart values changed"),  # the controller keeps the scheduler's Service ClusterIP: no restart
])
def test_plan_update(values, restart, verdict, words):
    spec, new = update(values)
    got, reason = plan_update(spec, new, restart)
    assert got == verdict and words in reason, reason


@pytest.mark.parametrize("values, kw, says", [
    (yaml.safe_load(SEED_STEP4), {}, JUPYTER_RESTARTS),  # a new environment: a new pod, a new local venv
    ({"worker": {"replicas": 1, "resources": {"limits": {"cpu": 2, "memory": "6G"}}}}, {}, ""),  # kernels kept
    ({"worker": {"replicas": 1}, "jupyter": {"resources": {"limits": {"memory": "3G"}}}}, {}, "on GKE: a new pod"),
    ({"worker": {"replicas": 1, "env": [{"name": "EXTRA_PIP_PACKAGES", "value": "x"}]}},
     {"mixed_environment": True}, ""),  # the workers' packages only: Jupyter keeps its own
    ({"worker": {"replicas": 1}, "jupyter": {"enabled": False}}, {}, "Jupyter stops"),
])
def test_an_update_says_when_jupyter_restarts_and_what_that_loses(values, kw, says):
    spec, new = update(values, **kw)
    said = plan_jupyter_restart(spec, new)
    assert (says in said) if says else said == "", said
    _, reason = plan_update(spec, new, False)
    assert (says in reason) if says else "Jupyter" not in reason, reason


def test_update_takes_the_worker_size_from_the_new_limits_else_keeps_it():
    _, new = update({"worker": {"resources": {"limits": {"cpu": 2, "memory": "6G"}}}})
    assert (new.worker_cpu, new.worker_memory) == (2.0, 6 * 10**9)
    spec, new = update({"jupyter": pip("x"), "worker": pip("x")})
    assert (new.worker_cpu, new.worker_memory) == (spec.worker_cpu, spec.worker_memory)
    with pytest.raises(ValidationError) as e:
        update({"worker": {"resources": {"limits": {"cpu": 64}}}})
    assert e.value.field == "values.worker.resources.limits"


@pytest.mark.parametrize("stale, fresh, joined, want, action, count", [
    (0, 2, 2, 2, "done", 0),
    (2, 0, 0, 2, "start", 2),
    (2, 1, 1, 2, "start", 1),
    (2, 2, 1, 2, "wait", 0),
    (2, 2, 2, 2, "retire", 2),
    (3, 0, 0, 0, "start", 1),  # a lab at zero target still gets somewhere for the old workers' results to go
    (1, 1, 1, 0, "retire", 1),
])
def test_plan_rollout(stale, fresh, joined, want, action, count):
    step = plan_rollout(stale, fresh, joined, want)
    assert (step.action, step.count) == (action, count), step.reason


def test_the_readmes_step6_file_is_one_environment_and_asks_for_restart_after_step4():
    """examples/seed-3-one-environment.yaml (the README's step 6): accepted without mixed_environment, and as an
    update of the step-4 lab refused until restart: true, because the seed gives the scheduler new resources."""
    values = yaml.safe_load((Path(__file__).parent.parent / "examples" / "seed-3-one-environment.yaml").read_text())
    check_environment(values)  # raises on a difference
    step4 = make_spec(values=yaml.safe_load(SEED_STEP4))
    spec, new = update(values, spec=step4)
    assert plan_update(spec, new, False)[0] == "refuse"
    verdict, reason = plan_update(spec, new, True)
    assert verdict == "update" and "scheduler restarted" in reason, reason
