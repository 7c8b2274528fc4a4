"""Costs price each lab's machine and its system pool's machine at that machine family's rates (core.model), and
no machine type is priced without rates of its own."""

import pytest

from dasklab.core import config as config_mod
from dasklab.core.config import Config
from dasklab.core.errors import ValidationError
from dasklab.core.messages import parse_command
from dasklab.core.specs import build_system_usd_h
from dasklab.core.model import CLUSTER_FEE_PER_HOUR, MACHINE_TYPES, estimate_cost, node_hour_usd
from tests.conftest import make_spec

# Google's hourly prices of whole machines in us-central1 (the Cloud Billing Catalog's, 2026-07-30), written out
# here apart from the per-vCPU and per-GiB table they must come out of.
LIST_USD_H = {("e2-standard-4", False): 0.13402284, ("e2-standard-4", True): 0.080424,
              ("e2-highmem-4", False): 0.18079932, ("e2-highcpu-4", False): 0.09894048,
              ("n2-highmem-4", False): 0.262028, ("n2-highmem-4", True): 0.12428,
              ("n2-standard-4", False): 0.194236, ("c3-standard-4", False): 0.201608, ("c3-standard-4", True): 0.0494}


@pytest.mark.parametrize("machine, spot", list(LIST_USD_H))
def test_a_node_costs_its_familys_list_price(machine, spot):
    assert node_hour_usd(machine, spot) == pytest.approx(LIST_USD_H[machine, spot], abs=1e-8)


def test_an_n2_highmem_lab_costs_more_than_an_e2_one_by_the_price_ratio():
    hours, nodes = 3, 2
    e2, n2 = (make_spec(machine_type=m, worker_cpu=1.0, worker_memory=3 * 10**9)
              for m in ("e2-standard-4", "n2-highmem-4"))
    assert MACHINE_TYPES["e2-standard-4"][0] == MACHINE_TYPES["n2-highmem-4"][0] == 4  # the same vCPUs
    fee = CLUSTER_FEE_PER_HOUR * hours
    e2_cost, n2_cost = (estimate_cost(s, hours * 3600, nodes * hours * 3600) for s in (e2, n2))
    ratio = LIST_USD_H["n2-highmem-4", False] / LIST_USD_H["e2-standard-4", False]  # 1.955
    assert (n2_cost - fee) == pytest.approx(ratio * (e2_cost - fee), rel=1e-5)
    assert e2_cost == pytest.approx(fee + nodes * hours * 0.13402284, abs=1e-5)
    # Spot: each family's own Spot rates, not one discount for all
    e2_spot, n2_spot = (estimate_cost(make_spec(machine_type=m, spot=True), 0, 3600)
                        for m in ("e2-standard-4", "n2-highmem-4"))
    assert (e2_spot, n2_spot) == (pytest.approx(0.080424, abs=1e-6), pytest.approx(0.12428, abs=1e-6))


def test_the_system_pool_is_priced_at_its_own_machine_type():
    gke = dict(backend="gke", project="p", location="us-central1-a")
    for machine in ("e2-standard-4", "n2-standard-4", "c3-standard-4"):
        own = build_system_usd_h(Config(**gke, system_machine_type=machine), students=1, shared=False)
        assert own == pytest.approx(LIST_USD_H[machine, False], abs=1e-6)


def test_every_machine_type_the_rule_accepts_has_prices_and_an_unknown_family_is_refused():
    for machine in MACHINE_TYPES:
        assert 0 < node_hour_usd(machine, spot=True) < node_hour_usd(machine) < 4, machine
    with pytest.raises(ValidationError, match="unknown machine type"):  # N2D: no rates in the table
        parse_command({"v": 1, "type": "start-lab", "lab": "intro", "owner": "alice", "machine_type": "n2d-standard-4"})
    with pytest.raises(KeyError):
        node_hour_usd("n2d-standard-4")
    for name in ("SYSTEM_MACHINE_TYPE", "DEFAULT_MACHINE_TYPE"):  # the configuration's machines are checked too
        with pytest.raises(ValidationError, match=f"DASKLAB_{name}.*unknown machine type 'n2d-standard-4'"):
            config_mod.from_env({f"DASKLAB_{name}": "n2d-standard-4"})
