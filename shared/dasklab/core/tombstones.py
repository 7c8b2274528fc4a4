"""Tombstones: a stop-lab remembered past its lab (a port the reconcile drives, and the pure rule it applies), so a
start-lab published before the lab's latest stop-lab never recreates it."""

from datetime import datetime, timezone
from typing import Protocol

# Pub/Sub redelivers a failing message for up to 24 h (the function's --retry): an older start-lab can only
# arrive within 24 h of its publication, which is before the stop-lab's, so a tombstone is kept that long.
TOMBSTONE_TTL_S = 24 * 3600


class Tombstones(Protocol):
    """Where each lab's latest stop-lab is kept, in a store that outlives the lab's resources."""

    def fetch_stopped(self, lab: str, now: float) -> float | None:
        """The publish time of the lab's latest stop-lab, unless older than TOMBSTONE_TTL_S (then None)."""

    def apply_stopped(self, lab: str, published: float, now: float) -> None:
        """Remember a stop-lab published at `published` (a later one already kept stays); idempotent."""


def plan_superseded(published: float, stopped: float | None) -> tuple[bool, str]:
    """Whether a start-lab published at `published` comes too late: a stop-lab of that lab was published after
    it. Returns (superseded, reason)."""
    if stopped is not None and published < stopped:
        return True, (f"start-lab published at {_iso(published)}, before the lab's stop-lab published at "
                      f"{_iso(stopped)}: the stop wins; send a new start-lab to start the lab again")
    return False, ""


def plan_stop_outdated(published: float, start_published: float) -> tuple[bool, str]:
    """Whether a stop-lab published at `published` is older than the start-lab that created the lab as it is
    now (delivered out of order): then it leaves the lab alone. Returns (outdated, reason)."""
    if published < start_published:
        return True, (f"stop-lab published at {_iso(published)}, before the start-lab that created this lab "
                      f"({_iso(start_published)}): the lab stays")
    return False, ""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
