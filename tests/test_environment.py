"""The lab's environment: what must agree among jupyter / scheduler / worker (package versions, image tags), what
may differ with a note (a package one of them lacks), the seed's files accepted verbatim, and the record."""

import json
from pathlib import Path

import pytest
import yaml

from dasklab.core.config import Config
from dasklab.core.environment import check_environment, environment_record, requirement
from dasklab.core.errors import ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.specs import build_spec, build_update
from dasklab.core.policy import JUPYTER_RESTARTS, plan_jupyter_restart, plan_rollout, plan_update
from tests.conftest import make_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEED_STEP4 = (EXAMPLES / "seed-2.yaml").read_text()  # the seed's second and third config.yaml (its steps 4 and 6)
SEED_STEP6 = (EXAMPLES / "seed-3.yaml").read_text()
MIXED = "(mixed_environment: true: a mixed environment, as asked)"


def pip(value: str) -> dict:
    return {"env": [{"name": "EXTRA_PIP_PACKAGES", "value": value}]}


def test_seed_step4_is_accepted_with_a_note_on_what_the_scheduler_lacks():
    (note,) = check_environment(yaml.safe_load(SEED_STEP4), lab="x")
    assert note.startswith("values.scheduler.env: no gcsfs pyarrow on the scheduler: it unpickles every task graph")
    assert "Error during deserialization of the task graph" in note
    assert note.endswith('`dasklab update-lab --lab x --values FILE` with the same values but scheduler.env '
                         'EXTRA_PIP_PACKAGES: "gcsfs pyarrow" and restart: true (the scheduler restarts: results '
                         'held in memory are lost)')


def test_seed_step6_is_accepted_with_a_note_naming_the_package_and_the_update_that_adds_it():
    notes = check_environment(yaml.safe_load(SEED_STEP6), lab="x")
    jupyter = next(n for n in notes if n.startswith("values.jupyter.env.EXTRA_PIP_PACKAGES: "))
    assert jupyter.startswith("values.jupyter.env.EXTRA_PIP_PACKAGES: matplotlib in jupyter but not in worker: the "
                              "notebook can use it (plots of gathered results), but a task that imports it fails on "
                              "the workers; to run such tasks send `dasklab update-lab --lab x --values FILE` with "
                              'the same values but worker.env EXTRA_PIP_PACKAGES: "pyarrow gcsfs matplotlib"')
    assert not any(MIXED in n for n in notes)
    # the update the note says is accepted, and replaces the workers without restarting anything else
    fixed = SEED_STEP6.replace('"pyarrow gcsfs"', '"pyarrow gcsfs matplotlib"')
    spec, new = update(fixed, spec=make_spec(values=yaml.safe_load(SEED_STEP6)))
    assert not [n for n in new.notes if "in jupyter but not in worker" in n]
    assert plan_update(spec, new, False) == ("update", "revision 2: workers replaced gracefully (new ones join "
                                                       "before the old retire)")


@pytest.mark.parametrize("spec, name, pin", [
    ("pandas==2.2.3", "pandas", "==2.2.3"), ("Pandas >= 2, <3", "pandas", ">=2,<3"),
    ("dask[dataframe]==2026.3.0", "dask", "==2026.3.0"), ("Zope.Interface_x", "zope-interface-x", ""),
    ("git+https://example.org/a.git", "git+https://example.org/a.git", ""),
])
def test_requirement_names_compare_as_pip_compares_them(spec, name, pin):
    assert requirement(spec) == (name, pin)


@pytest.mark.parametrize("values, field, words", [
    ({"jupyter": pip("pandas==2.2.3"), "worker": pip("pandas==2.1.0")}, "values.worker.env.EXTRA_PIP_PACKAGES",
     "pandas is pinned differently: ==2.2.3 in jupyter, ==2.1.0 in worker"),
    ({"jupyter": pip("gcsfs pyarrow"), "worker": pip("gcsfs pyarrow==18.0"), "scheduler": pip("gcsfs pyarrow")},
     "values.worker.env.EXTRA_PIP_PACKAGES", "pyarrow is pinned differently: unpinned (the newest) in jupyter, "
                                             "unpinned (the newest) in scheduler, ==18.0 in worker"),
    ({"worker": pip("Scikit_Learn==1.5"), "scheduler": pip("scikit-learn==1.6")},
     "values.worker.env.EXTRA_PIP_PACKAGES", "scikit-learn is pinned differently"),
    ({c: {"image": {"tag": t}} for c, t in (("jupyter", "2026.3.0"), ("scheduler", "2026.3.0"),
                                            ("worker", "2026.3.0-py3.12"))},
     "values.jupyter.image.tag", "2026.3.0 in jupyter but worker 2026.3.0-py3.12"),
])
def test_differences_that_break_a_computation_are_refused_with_the_field_unless_mixed(values, field, words):
    with pytest.raises(ValidationError) as e:
        check_environment(values)
    assert e.value.field == field and words in e.value.rule, str(e.value)
    assert "mixed_environment: true" in e.value.rule
    notes = check_environment(values, mixed=True)
    assert any(n.startswith(f"{field}: ") and words in n and n.endswith(MIXED) for n in notes), notes


@pytest.mark.parametrize("values, notes", [
    ({}, []),
    ({"jupyter": pip("a b"), "worker": pip("b  a --upgrade"), "scheduler": pip("a b")}, []),
    ({"jupyter": pip("Pandas==2.2"), "worker": pip("pandas==2.2"), "scheduler": pip("pandas==2.2")}, []),
    ({"jupyter": {"enabled": False}, "worker": pip("x")}, ["values.scheduler.env: no x on the scheduler"]),
    ({c: {"image": {"tag": "2026.3.0"}} for c in ("jupyter", "scheduler", "worker")}, []),
    ({"worker": {"image": {"tag": "2026.3.0"}}}, []),  # one tag: every component runs it
    ({"worker": pip("s3fs"), "scheduler": pip("s3fs")},  # the old rule refused it; tasks may import it
     ['values.worker.env.EXTRA_PIP_PACKAGES: s3fs in worker but not in jupyter: tasks may import it, but the notebook '
      'can neither put objects of it in a graph nor read results holding them; for that send `dasklab update-lab '
      '--lab LAB --values FILE` with the same values but jupyter.env EXTRA_PIP_PACKAGES: "s3fs" (Jupyter restarts)']),
    ({"jupyter": pip("a b"), "worker": pip("a b"), "scheduler": pip("a")},  # the scheduler lacks one: said
     ["values.scheduler.env: no b on the scheduler"]),
])
def test_what_may_differ_is_accepted_with_a_note_per_gap(values, notes):
    got = check_environment(values)
    assert len(got) == len(notes) and all(g.startswith(n) for g, n in zip(got, notes)), got


def test_start_lab_keeps_the_notes_and_lab_ready_records_the_environment():
    values = yaml.safe_load(SEED_STEP6)
    msg = {"v": 1, "type": "start-lab", "lab": "l", "owner": "o", "values": SEED_STEP6}
    spec = build_spec(parse_command(json.dumps(msg)), Config())
    assert not spec.mixed_environment
    assert any(n.startswith("values.jupyter.env.EXTRA_PIP_PACKAGES: matplotlib in jupyter but not in worker") and
               "--lab l " in n for n in spec.notes)
    pinned = SEED_STEP6.replace('"pyarrow gcsfs"', '"pyarrow==18.0 gcsfs"')
    with pytest.raises(ValidationError) as e:
        build_spec(parse_command(json.dumps({**msg, "values": pinned})), Config())
    assert e.value.field == "values.worker.env.EXTRA_PIP_PACKAGES" and "pyarrow is pinned differently" in e.value.rule
    spec = build_spec(parse_command(json.dumps({**msg, "values": pinned, "mixed_environment": True})), Config())
    assert spec.mixed_environment and any(n.endswith(MIXED) for n in spec.notes)
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


def test_the_seeds_step6_file_as_an_update_of_step4_asks_for_restart():
    """seed-3.yaml verbatim as an update of the step-4 lab: refused until restart: true, because the seed gives the
    scheduler new resources (restarting it loses every result held in memory); then accepted with its notes."""
    step4 = make_spec(values=yaml.safe_load(SEED_STEP4))
    spec, new = update(yaml.safe_load(SEED_STEP6), spec=step4)
    assert plan_update(spec, new, False)[0] == "refuse"
    verdict, reason = plan_update(spec, new, True)
    assert verdict == "update" and "scheduler restarted" in reason and JUPYTER_RESTARTS in reason, reason
    assert any("matplotlib in jupyter but not in worker" in n for n in new.notes)


def test_a_changed_replicas_in_an_update_is_the_labs_new_maximum_under_the_caps():
    """The seed's step 6 as an update of step 4: `replicas: 15` (was 4) raises the lab's maximum to 15, said in a
    note and in the update's reason; the same replicas again, or none, leave the limits alone."""
    step4 = make_spec(values=yaml.safe_load(SEED_STEP4), min_workers=0, max_workers=4)
    new = build_update(parse_command(json.dumps({"v": 1, "type": "update-lab", "lab": "x", "values": SEED_STEP6,
                                                 "restart": True})), step4, Config())
    assert (new.min_workers, new.max_workers) == (0, 15)
    assert new.notes[0] == ("values.worker.replicas: 15 is the lab's maximum now (was 4); the controller scales "
                            "between workers.min (0) and 15 from the scheduler's load; `dasklab scale --pin 15` "
                            "holds it")
    assert "workers.max 4 → 15 (values.worker.replicas)" in plan_update(step4, new, True)[1]
    same = SEED_STEP6.replace("replicas: 15", "replicas: 4")
    _, kept = update(same, spec=step4)
    assert kept.max_workers == 4 and not any(n.startswith("values.worker.replicas") for n in kept.notes)
    scaled = make_spec(values=yaml.safe_load(SEED_STEP4), max_workers=8)  # `dasklab scale --max 8` since
    assert update(SEED_STEP4.replace("pyarrow gcsfs", "pyarrow gcsfs s3fs"), spec=scaled)[1].max_workers == 8
    for replicas, words in ((17, "17 is above the controller cap max_workers=16"),
                            (0, "0 is below the lab's min or pin (1)")):
        with pytest.raises(ValidationError) as e:
            build_update(parse_command(json.dumps({"v": 1, "type": "update-lab", "lab": "x", "restart": True,
                                                   "values": SEED_STEP6.replace("replicas: 15",
                                                                                f"replicas: {replicas}")})),
                         make_spec(values=yaml.safe_load(SEED_STEP4)), Config())
        assert e.value.field == "values.worker.replicas" and e.value.rule.startswith(words), e.value.rule
