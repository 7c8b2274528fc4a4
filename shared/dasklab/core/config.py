"""Controller configuration: caps, defaults and scaling parameters, read once from the environment."""

import os
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from dasklab.core.errors import ValidationError


@dataclass(frozen=True)
class Config:
    # where labs run: "local" (real processes on this machine) or "gke"
    backend: str = "local"
    project: str = ""
    location: str = "us-central1-a"  # where lab clusters run: a zone (one system node); a region triples the nodes
    region: str = ""  # where the functions and the Cloud Scheduler jobs run; empty: the region of `location`
    control_topic: str = "dasklab-control"
    status_topic: str = "dasklab-status"
    home: str = str(Path.home() / ".dasklab")
    # caps: a request above one is refused, never truncated
    max_workers: int = 16
    max_nodes: int = 8
    max_lifetime_s: int = 12 * 3600
    # defaults for a start-lab that leaves them out
    default_machine_type: str = "e2-standard-4"
    default_idle_timeout_s: int = 30 * 60
    default_lifetime_s: int = 8 * 3600
    default_worker_cpu: float = 1.0
    default_worker_memory: str = "3G"
    # autoscaling: how often load is polled, how long a lower target must hold, at most how much goes per step
    poll_s: float = 5.0
    confirm_s: float = 20.0
    cooldown_s: float = 15.0
    down_fraction: float = 0.5
    # a reconcile tick polls for this long (Cloud Scheduler fires at most once a minute)
    tick_budget_s: float = 50.0
    # a pass starts no lab after this long (a Cloud Function invocation ends at 540 s); the rest wait a pass
    pass_budget_s: float = 480.0
    # the nightly teardown timer: local time of day (HH:MM, 24 h) in an IANA time zone
    nightly_at: str = "02:00"
    nightly_time_zone: str = "Etc/UTC"
    # GKE backend: node pools of each lab's Standard cluster, and the Dask Helm release the in-cluster Job installs
    node_service_account: str = ""  # e-mail of the nodes' account (infra/iam.yaml: dasklab-nodes); "" = GKE's default
    node_zones: str = ""  # comma-separated zones for the node pools; "" = GKE's default (one zone is cheapest)
    system_pool: str = "system"
    system_machine_type: str = "e2-standard-4"  # scheduler, Jupyter and the Helm Job run here
    system_nodes: int = 1  # per zone
    worker_pool: str = "workers"  # cluster autoscaler off: the controller sizes it
    chart_repo: str = "https://helm.dask.org"
    chart_version: str = "2024.1.1"  # the official dask/dask chart, pinned
    helm_image: str = "alpine/helm:3.16.3"


def region_of(location: str) -> str:
    """us-central1-a → us-central1; a region is its own."""
    return re.sub(r"^([a-z]+-[a-z]+[0-9]+)-[a-z]$", r"\1", location)


def _convert(name: str, raw: str, kind: type):
    try:
        return kind(raw)
    except ValueError:
        raise ValidationError(f"DASKLAB_{name.upper()}", f"must be {kind.__name__}, got {raw!r}") from None


def from_env(env: dict | None = None) -> Config:
    """Build the configuration from DASKLAB_* variables; GKE is the backend when a project is configured."""
    env = os.environ if env is None else env
    values = {}
    for f in fields(Config):
        raw = env.get(f"DASKLAB_{f.name.upper()}")
        if raw is not None:
            values[f.name] = _convert(f.name, raw, type(Config.__dataclass_fields__[f.name].default))
    values.setdefault("project", env.get("GOOGLE_CLOUD_PROJECT", ""))
    values.setdefault("backend", "gke" if values["project"] else "local")
    values["region"] = values.get("region") or region_of(values.get("location") or Config.location)
    if values["backend"] not in ("local", "gke"):
        raise ValidationError("DASKLAB_BACKEND", "must be 'local' or 'gke'")
    return Config(**values)


@lru_cache(maxsize=1)
def current() -> Config:
    """The process's configuration, read on first use (not at import)."""
    return from_env()
