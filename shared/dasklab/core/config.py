"""Controller configuration: caps, defaults and scaling parameters, read once from the environment."""

import os
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from dasklab.core.errors import ValidationError
from dasklab.core.model import MACHINE_TYPES

# The Dask versions a lab may run under the chart: distributed 2025.9.0 fixed the 500 from retire_workers and
# 2024.2.1 the nanny reviving a retired worker; 2026.6.0 removed the `dask-scheduler`/`dask-worker` commands the
# chart 2024.1.1 runs. The default, 2026.3.0, is the newest release inside (docs/how-it-works.md, "The labs' Dask
# version").
DASK_WINDOW = ((2025, 9, 0), (2026, 3))  # from 2025.9.0 up to any 2026.3.x
DASK_WINDOW_TEXT = "2025.9.0 ≤ Dask ≤ 2026.3.x"
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")  # us-central1-a; a region has no zone letter
_VERSION = re.compile(r"^v?(\d{4})\.(\d{1,2})\.(\d{1,3})(?![\d.])")


def dask_version_of(tag: str) -> str | None:
    """The Dask version an image tag states ('2026.3.0', '2026.3.0-py3.12' → '2026.3.0'), None if none."""
    m = _VERSION.match(str(tag))
    return ".".join(str(int(g)) for g in m.groups()) if m else None


def check_dask_version(field: str, tag: str) -> str:
    """The version `tag` states, if inside the window; ValidationError(field, …) otherwise."""
    version = dask_version_of(tag)
    if version is None:
        raise ValidationError(field, f"{tag!r} states no Dask version; labs run {DASK_WINDOW_TEXT} "
                                     "(a tag like 2026.3.0 or 2026.3.0-py3.12)")
    parts = tuple(int(p) for p in version.split("."))
    if not DASK_WINDOW[0] <= parts or parts[:2] > DASK_WINDOW[1]:
        raise ValidationError(field, f"Dask {version} is outside {DASK_WINDOW_TEXT}: the chart runs dask-scheduler/"
                                     "dask-worker (removed in 2026.6.0), and retiring workers needs 2025.9.0")
    return version


@dataclass(frozen=True)
class Config:
    # where labs run: "local" (real processes on this machine) or "gke"
    backend: str = "local"
    project: str = ""
    location: str = "us-central1-a"  # where lab clusters run: a zone (one system node); a region triples the nodes
    region: str = ""  # where the functions and the Cloud Scheduler jobs run; empty: the region of `location`
    control_topic: str = "dasklab-control"
    tick_topic: str = "dasklab-ticks"  # the timers' topic: a class's one-off wake-ups publish there
    status_topic: str = "dasklab-status"
    # the pull subscription keeping what the triggers gave up on (infra: the dead-letter topic's name + "-sub")
    dead_letter_subscription: str = "dasklab-dead-letter-sub"
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
    # a new lab keeps its initial workers until first used (a client or a task), at most this long (≤ idle timeout)
    warmup_s: float = 900.0
    # a reconcile tick polls for this long (Cloud Scheduler fires at most once a minute)
    tick_budget_s: float = 50.0
    # a pass starts no lab after this long (a Cloud Function invocation ends at 540 s); the rest wait a pass
    pass_budget_s: float = 480.0
    # how long an invocation acting on a lab holds its lease (a step's act: a retirement, an install, a delete); a
    # holder that died is taken over once it expires
    lease_s: float = 120.0
    # the nightly teardown timer: local time of day (HH:MM, 24 h) in an IANA time zone
    nightly_at: str = "02:00"
    nightly_time_zone: str = "Etc/UTC"
    # GKE backend: node pools of each lab's Standard cluster, and the Dask Helm release the in-cluster Job installs
    # e-mail of the nodes' own account (infra/iam.yaml: dasklab-nodes); required to create clusters, never the Compute
    # Engine default (check_node_service_account)
    node_service_account: str = ""
    node_zones: str = ""  # comma-separated zones for the node pools; "" = GKE's default (one zone is cheapest)
    system_pool: str = "system"
    system_machine_type: str = "e2-standard-4"  # scheduler, Jupyter and the Helm Job run here
    system_nodes: int = 1  # per zone
    node_disk_gb: int = 100  # every node's boot disk (GB; GKE's default): quotas SSD_TOTAL_GB/DISKS_TOTAL_GB count it
    worker_pool: str = "workers"  # cluster autoscaler off: the controller sizes it
    chart_repo: str = "https://helm.dask.org"
    chart_version: str = "2024.1.1"  # the official dask/dask chart, pinned
    helm_image: str = "alpine/helm:3.16.3"
    # the Dask version of every lab's images (scheduler, workers, Jupyter): inside DASK_WINDOW
    dask_version: str = "2026.3.0"
    # Google identities (comma-separated e-mails) that may send any command, for anyone (core/trust.py)
    admins: str = ""
    # the HTTPS command entry point's URL: the CLI calls it, and it is the audience its callers' ID tokens name
    command_url: str = ""
    # more audiences its callers' tokens may name (comma-separated; e.g. gcloud's own client id, which a person's
    # `gcloud auth print-identity-token` names and Cloud Run accepts), and where Google's signing certificates are
    token_audiences: str = ""
    id_token_certs_url: str = "https://www.googleapis.com/oauth2/v1/certs"
    firestore_database: str = "(default)"  # GKE backend: the Firestore (Native mode) database of the tombstones

    @property
    def zone_count(self) -> int:
        """Zones a lab's node pools span: those listed, else one for a zonal location, GKE's regional default 3."""
        return len([z for z in self.node_zones.split(",") if z.strip()]) or (1 if _ZONE.fullmatch(self.location) else 3)


# The Compute Engine default service account, <project number>-compute@developer.gserviceaccount.com: what a node
# runs as when NodeConfig.service_account is unset ("default"); it has Editor on the project unless that grant was
# removed (cloud.google.com/compute/docs/access/service-accounts#default_service_account)
_COMPUTE_DEFAULT = re.compile(r"[0-9]+-compute@developer\.gserviceaccount\.com")


def check_node_service_account(config: Config) -> str:
    """The nodes' dedicated account: ValidationError(DASKLAB_NODE_SERVICE_ACCOUNT) if unset, "default" or the Compute
    Engine default account, whose credentials every pod of a node could otherwise take to Google's APIs."""
    account = config.node_service_account.strip()
    if not account or account == "default" or _COMPUTE_DEFAULT.fullmatch(account):
        said = f"{account!r} is the Compute Engine default account" if account else "unset"
        raise ValidationError("DASKLAB_NODE_SERVICE_ACCOUNT",
                              f"{said}: lab nodes need their own service account (infra/iam.yaml: dasklab-nodes, "
                              "set by `dasklab deploy`), never the Compute Engine default")
    return account


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
    for name in ("default_machine_type", "system_machine_type"):  # what budgets price, and GKE is asked for
        if name in values and values[name] not in MACHINE_TYPES:
            raise ValidationError(f"DASKLAB_{name.upper()}", f"unknown machine type {values[name]!r}; "
                                                             f"known: {', '.join(sorted(MACHINE_TYPES))}")
    if values.get("node_disk_gb", 10) < 10:  # NodeConfig.disk_size_gb docstring: "The smallest allowed … is 10GB"
        raise ValidationError("DASKLAB_NODE_DISK_GB", f"{values['node_disk_gb']} GB: a node's boot disk is 10 GB at least")
    if "dask_version" in values:
        values["dask_version"] = check_dask_version("DASKLAB_DASK_VERSION", values["dask_version"])
    return Config(**values)


@lru_cache(maxsize=1)
def current() -> Config:
    """The process's configuration, read on first use (not at import)."""
    return from_env()
