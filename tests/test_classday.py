"""The class-day simulator (benchmarks/classday.py): deterministic for a seed, and driven by the real policy."""

import importlib.util
import json
from pathlib import Path

import pytest

from dasklab.core import policy

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "classday.py"


@pytest.fixture(scope="module")
def classday():
    spec = importlib.util.spec_from_file_location("classday", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small(classday, seed):
    """A short class: 6 students, 40 minutes."""
    return classday.build_trace(seed, students=6, hours=40 / 60, lead_s=600)


def test_a_seed_gives_the_same_trace_and_the_same_figures(classday):
    assert small(classday, 3) == small(classday, 3)
    assert small(classday, 3) != small(classday, 4)
    trace = small(classday, 3)
    for kind in ("adaptive+CA", "dasklab shared"):
        first, again = (classday.summarise(classday.simulate(trace, kind)) for _ in range(2))
        assert first == again
        assert first["jobs"] == sum(len(s["jobs"]) for s in trace["students"]) > 0


def test_dasklab_configurations_run_the_controllers_plan_scale_and_plan_retirement(classday, monkeypatch):
    calls = {"scale": 0, "retire": 0}
    real_scale, real_retire = policy.plan_scale, policy.plan_retirement

    def counted_scale(*a, **kw):
        calls["scale"] += 1
        return real_scale(*a, **kw)

    def counted_retire(*a, **kw):
        calls["retire"] += 1
        return real_retire(*a, **kw)

    trace = small(classday, 1)
    before = classday.summarise(classday.simulate(trace, "dasklab shared"))
    monkeypatch.setattr(policy, "plan_scale", counted_scale)
    monkeypatch.setattr(policy, "plan_retirement", counted_retire)
    assert classday.summarise(classday.simulate(trace, "dasklab shared")) == before
    assert calls["scale"] > 100 and calls["retire"] > 0

    # a policy that never moves from the initial worker gives other figures: the simulator follows what it decides
    monkeypatch.setattr(policy, "plan_scale", lambda spec, state, *a, **kw: policy.ScaleDecision(
        policy.HOLD, state.target_workers, "held"))
    held = classday.summarise(classday.simulate(trace, "dasklab shared"))
    assert held["wait_p95_s"] > before["wait_p95_s"]


def test_the_adaptive_configuration_runs_distributeds_own_recommendations(classday, monkeypatch):
    from distributed.deploy.adaptive_core import AdaptiveCore
    seen = []
    real = AdaptiveCore.recommendations

    async def counted(self, target):
        out = await real(self, target)
        seen.append(out["status"])
        return out

    monkeypatch.setattr(AdaptiveCore, "recommendations", counted)
    classday.simulate(small(classday, 2), "adaptive+CA")
    assert {"up", "down", "same"} <= set(seen)


def test_a_trace_file_gives_the_same_table_as_its_seed(classday, tmp_path, capsys):
    trace = small(classday, 5)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    out = tmp_path / "rows.json"
    assert classday.main(["--trace", str(path), "--plot", "", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == list(classday.KINDS)
    assert rows[-1] == classday.summarise(classday.simulate(trace, "dasklab shared"))
    assert "ratios (×) against the cheapest peer" in capsys.readouterr().out
