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


def plan_ordered(command: str, published: float | None, start_published: float,
                 applied: float) -> tuple[bool, str]:
    """Whether a command that changes a lab (update-lab, scale) is older than what the lab stands for: the start-lab
    that created it, or the latest command of the same kind applied (`applied`). An older one changes nothing: a
    redelivery that arrives after a newer command never rolls the lab back. Returns (older, reason)."""
    if published is None:  # not from Pub/Sub (a direct call): in the order it arrives
        return False, ""
    if published < start_published:
        return True, (f"{command} published at {_iso(published)}, before the start-lab that created this lab "
                      f"({_iso(start_published)}): it was meant for an earlier lab of that name")
    if published < applied:
        return True, (f"{command} published at {_iso(published)}, before the {command} the lab already applied "
                      f"({_iso(applied)}): the newer one stays")
    return False, ""


UNPIN = -1  # a scale's `unpin`, as the value it gives the pin


def plan_ordered_limits(published: float | None, start_published: float, stamps: dict,
                        asked: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """Which of the limits a scale asks for (`asked`, of min, max, pin) it may change: none if it is older than the
    lab's start-lab; else those no newer scale has set (`stamps`: limit → publish time of the scale that set it).
    Returns (the limits it changes, the reason for those it does not: "" if none is left out)."""
    older, why = plan_ordered("scale", published, start_published, 0.0)
    if older:
        return (), why
    if published is None:
        return asked, ""
    kept = tuple(k for k in asked if published >= stamps.get(k, 0.0))
    late = [k for k in asked if k not in kept]
    if not late:
        return kept, ""
    newest = max(stamps[k] for k in late)
    return kept, (f"scale published at {_iso(published)}: {', '.join(late)} left as the newer scale (published at "
                  f"{_iso(newest)}) set {'them' if len(late) > 1 else 'it'}: the newer one stays")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
