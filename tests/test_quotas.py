"""Quotas before a lab, a class or a scale: the need (core/quotas.py, pure) against the project's quotas as the Compute
stand-in serves them (regions.get, usage from the VMs it holds), through the controller and the `dasklab quota`
preflight."""

from collections import Counter
from dataclasses import replace

import pytest
from dasklab.core.config import Config
from dasklab.core.model import READY, PROVISIONING
from dasklab.core.quotas import CLUSTERS, FIT, REFUSE, WARN, Quota, build_need, build_reserved, build_scale_need, \
    plan_quota

from tests.conftest import make_spec, make_state
from dasklab.core.model import Lab

GKE = Config(backend="gke", location="us-central1-a")
ROOMY = {"CPUS": Quota(1000, 0), "IN_USE_ADDRESSES": Quota(1000, 0), "SSD_TOTAL_GB": Quota(100000, 0),
         CLUSTERS: Quota(100, 0)}


def students(n, placement, **kw):
    spec = make_spec(max_workers=6, machine_type="e2-standard-4", placement=placement, class_size=n, **kw)
    return [replace(spec, name=f"intro-s{i}") for i in range(n)]


def test_the_readme_class_needs_280_vcpus_shared_and_360_own():
    # the README's placement table: 30 students × 6 workers, 3 workers per e2-standard-4 node
    shared = build_need(students(30, "shared"), GKE)
    own = build_need(students(30, "own"), GKE)
    assert shared == Counter({"CPUS": 280, "IN_USE_ADDRESSES": 70, "SSD_TOTAL_GB": 7000, CLUSTERS: 1})
    assert own == Counter({"CPUS": 360, "IN_USE_ADDRESSES": 90, "SSD_TOTAL_GB": 9000, CLUSTERS: 30})
    # a class cluster that exists already: only the new students' share of the worker pool
    assert build_need(students(3, "shared"), GKE, new_cluster=False) == Counter(
        {"CPUS": 24, "IN_USE_ADDRESSES": 6, "SSD_TOTAL_GB": 600})
    # a regional location triples every per-zone pool; an N2 machine counts against N2_CPUS, its disk likewise
    regional = replace(GKE, location="us-central1")
    assert build_need([make_spec(max_workers=3, machine_type="n2-standard-4")], regional) == Counter(
        {"CPUS": 12, "N2_CPUS": 12, "IN_USE_ADDRESSES": 6, "SSD_TOTAL_GB": 600, CLUSTERS: 1})
    assert build_need([make_spec(max_workers=3)], replace(GKE, node_disk_gb=50))["SSD_TOTAL_GB"] == 100


@pytest.mark.parametrize("quotas, reserved, action, said", [
    (ROOMY, {}, FIT, "every need fits"),
    ({**ROOMY, "CPUS": Quota(24, 4)}, {}, REFUSE, "CPUS in us-central1: limit 24, usage 4, this needs 280 (free 20)"),
    ({**ROOMY, "IN_USE_ADDRESSES": Quota(8, 0)}, {}, REFUSE, "IN_USE_ADDRESSES in us-central1: limit 8, usage 0, "
                                                              "this needs 70"),
    ({**ROOMY, "CPUS": Quota(300, 10)}, {"CPUS": 12}, WARN, "CPUS in us-central1 fits only at the current usage "
                                                            "(limit 300, usage 10, this needs 280, the running labs "
                                                            "may still take 12)"),
    ({**ROOMY, "CPUS": Quota(300, 10)}, {"CPUS": 10}, FIT, "every need fits"),
    ({k: v for k, v in ROOMY.items() if k != "SSD_TOTAL_GB"}, {}, WARN, "SSD_TOTAL_GB not reported, not checked"),
    ({}, {}, WARN, "not checked, the region in us-central1 reported no quotas"),
])
def test_plan_quota(quotas, reserved, action, said):
    decision = plan_quota(build_need(students(30, "shared"), GKE), quotas, reserved, "us-central1")
    assert decision.action == action and said in decision.reason


def test_what_running_labs_may_still_take_and_what_a_scale_adds():
    ready = Lab(make_spec(name="a", max_workers=6), make_state(phase=READY, target_workers=3))  # 1 node → 2 nodes
    creating = Lab(make_spec(name="b", max_workers=3), make_state(phase=PROVISIONING, target_workers=1))
    gone = Lab(make_spec(name="c", max_workers=6), make_state(phase="tearing-down", target_workers=0))
    assert build_reserved([ready, creating, gone], GKE) == Counter(
        {"CPUS": 4 + 8, "IN_USE_ADDRESSES": 1 + 2, "SSD_TOTAL_GB": 100 + 200})
    old = make_spec(max_workers=3)
    assert build_scale_need(old, replace(old, max_workers=9), GKE) == Counter(
        {"CPUS": 8, "IN_USE_ADDRESSES": 2, "SSD_TOTAL_GB": 200})
    assert build_scale_need(old, replace(old, max_workers=2), GKE) == Counter()


# --- through the controller: the GKE backend on the GKE and Compute stand-ins ---

@pytest.fixture
def cloud(tmp_path):
    """A controller on the GKE backend over the GKE and Compute stand-ins (lab records and classes in files), its
    events, and the stand-ins."""
    from dasklab.adapters.compute import Migs, Regions
    from dasklab.adapters.files import FileClasses
    from dasklab.adapters.gke import GkeBackend
    from dasklab.core.reconcile import Controller
    from tests.fakes import FileLabRecords, ListEvents
    from tests.standins.compute import MigStandin
    from tests.standins.gke import GkeStandin

    cfg = Config(backend="gke", project="quota-proj", location="us-central1-a", tick_budget_s=0,
                 node_service_account="dasklab-nodes@quota-proj.iam.gserviceaccount.com")
    with GkeStandin(operation_s=3600) as g, MigStandin(g) as m:  # clusters stay PROVISIONING: nothing connects
        backend = GkeBackend(cfg, g.client(), lambda cluster: None, Migs(m.client), FileLabRecords(tmp_path / "labs"),
                             regions=Regions(m.regions_client))
        events = ListEvents()
        yield Controller(backend, events, cfg, classes=FileClasses(tmp_path)), events, g, m


def start_class(roster, placement="own", max_workers=3):
    return cmd(type="start-class", **{"class": "intro"}, owner="prof", roster=roster, placement=placement,
               workers={"initial": 1, "max": max_workers})


def cmd(**kw):
    from tests.conftest import cmd as build
    return build(**kw)


def test_a_class_that_does_not_fit_is_refused_before_anything_is_created(cloud):
    from dasklab.core.errors import ValidationError
    ctl, events, g, m = cloud
    m.limits.update(CPUS=24, IN_USE_ADDRESSES=8)  # a new project's
    with pytest.raises(ValidationError) as refused:
        ctl.handle(start_class(["ann", "ben", "cy", "dee", "eve"], max_workers=6), "m1")
    # 5 own clusters: each a system node and 2 worker nodes of 4 vCPUs
    assert "quota: CPUS in us-central1: limit 24, usage 0, this needs 60 (free 24)" in str(refused.value)
    assert "IN_USE_ADDRESSES in us-central1: limit 8, usage 0, this needs 15 (free 8)" in str(refused.value)
    assert g.clusters == {} and ctl.classes.fetch_class("intro") is None and ctl.backend.fetch_labs() == []
    # a start-lab likewise; the same class, shared, fits
    with pytest.raises(ValidationError, match="CPUS in us-central1: limit 24, usage 0, this needs 28"):
        ctl.handle(cmd(type="start-lab", lab="solo", owner="alice", workers={"max": 16}), "m2")
    assert g.clusters == {} and ctl.backend.fetch_labs() == []
    m.limits.update(CPUS=100, IN_USE_ADDRESSES=100)
    ctl.handle(start_class(["ann", "ben", "cy", "dee", "eve"], placement="shared", max_workers=6), "m3")
    outcome = events.events[-1]
    assert outcome["outcome"] == "accepted" and "quota" not in outcome["reason"], outcome
    assert list(g.clusters) == ["projects/quota-proj/locations/us-central1-a/clusters/intro--shared"]


def test_a_class_that_fits_only_at_the_current_usage_is_accepted_with_a_warning(cloud):
    ctl, events, g, m = cloud
    # a lab that runs 1 of its 6 workers (1 node of 2): it may still take another node's 4 vCPUs
    ctl.backend.records.apply_create(Lab(make_spec(name="busy", max_workers=6),
                                         make_state(phase="installing", target_workers=1)))
    m.other_usage = {"CPUS": 4}  # what is running now (outside the stand-in's node pools)
    m.limits.update(CPUS=22)  # free 18: the class's 16 fit now, not beside the running lab's growth
    ctl.handle(start_class(["ann", "ben"]), "m1")
    outcome = events.events[-1]
    warning = ("quota: CPUS in us-central1 fits only at the current usage (limit 22, usage 4, this needs 16, the "
               "running labs may still take 4)")
    assert outcome["outcome"] == "accepted" and warning in outcome["reason"], outcome
    assert ctl.classes.fetch_class("intro").notes == (warning,)
    labs = {lab.name: lab for lab in ctl.backend.fetch_labs()}
    assert warning in labs["intro-ann"].spec.notes and len(g.clusters) == 2
    g.advance_all()  # the class's clusters run: their nodes count now (a system node and a worker node each)
    # a scale that raises a maximum past what is free is refused, the lab as it was
    from dasklab.core.errors import ValidationError
    with pytest.raises(ValidationError, match=r"quota: CPUS in us-central1: limit 22, usage 20, this needs 8 \(free 2\)"):
        ctl.handle(cmd(type="scale", lab="busy", max=12), "m2")
    assert ctl.backend.fetch_lab("busy").spec.max_workers == 6
    ctl.handle(cmd(type="scale", lab="busy", max=3), "m3")  # lowering it is never refused
    assert ctl.backend.fetch_lab("busy").spec.max_workers == 3


def test_the_quota_preflight_prints_the_controllers_table_and_starts_nothing(cloud, tmp_path, monkeypatch, capsys):
    from dasklab import runtime
    from tests.test_cli import main
    ctl, events, g, m = cloud
    for name in ("DASKLAB_PROJECT", "DASKLAB_REGION", "DASKLAB_LOCATION", "DASKLAB_BACKEND"):  # undone after
        monkeypatch.setenv(name, "recorded")
        monkeypatch.delenv(name)
    monkeypatch.setenv("DASKLAB_LOCATION", "us-central1-a")
    monkeypatch.setenv("DASKLAB_NODE_SERVICE_ACCOUNT", "dasklab-nodes@quota-proj.iam.gserviceaccount.com")
    monkeypatch.setattr(runtime, "build_backend", lambda cfg: ctl.backend)
    (tmp_path / "students.txt").write_text("ann\nben  # the second\n\ncy\n")
    (tmp_path / "config.yaml").write_text("worker:\n  replicas: 2\n")
    m.limits.update(CPUS=28)
    args = ("quota", "--class", "intro", "--roster", str(tmp_path / "students.txt"), "--values",
            str(tmp_path / "config.yaml"), "--max", "6", "--project", "quota-proj")
    assert main(*args, "--placement", "own") == 2  # 3 own clusters: a system node and 2 worker nodes each
    out = capsys.readouterr().out
    assert "CPUS" in out and "refuse" in out and "CPUS in us-central1: limit 28, usage 0, this needs 36" in out
    assert main(*args) == 0  # shared: 1 system node for 3 students, 18 workers on 6 nodes (3 a node): 7 × 4 vCPUs
    out = capsys.readouterr().out
    assert "quotas: every need fits (in us-central1)" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("CPUS"))
    assert row == ["CPUS", "28", "0", "0", "28", "fits"]
    assert g.clusters == {} and ctl.classes.fetch_class("intro") is None and events.events == []


def test_quotas_that_cannot_be_read_are_said_never_blocking(cloud):
    from dasklab.core.config import from_env
    from dasklab.core.errors import TransientError, ValidationError
    ctl, events, g, m = cloud
    m.fail_next("regions.get", "regions-permission")  # an IAM not redeployed: the lab starts, the reason said
    ctl.handle(cmd(type="start-lab", lab="solo", owner="alice"), "m1")
    assert events.events[-1]["outcome"] == "accepted" and "quota: not checked: read the quotas of region " \
        "us-central1" in events.events[-1]["reason"] and "Required 'compute.regions.get' permission for 'projects/" \
        "quota-proj/regions/us-central1'" in events.events[-1]["reason"]
    m.quotas_unavailable = True  # regions.get fails open: no quotas, said
    ctl.handle(cmd(type="start-lab", lab="duo", owner="alice"), "m2")
    assert "quota: not checked, the region in us-central1 reported no quotas" in events.events[-1]["reason"]
    m.quotas_unavailable = False
    m.fail_next("regions.get", "rate-limit")  # transient: the start-lab is retried, nothing created meanwhile
    with pytest.raises(TransientError):
        ctl.handle(cmd(type="start-lab", lab="trio", owner="alice"), "m3")
    assert ctl.backend.fetch_lab("trio") is None
    with pytest.raises(ValidationError, match="DASKLAB_NODE_DISK_GB"):
        from_env({"DASKLAB_NODE_DISK_GB": "8"})
