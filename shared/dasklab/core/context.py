"""What the reconcilers share: the controller's ports (backend, events, stores, clock), read through it, and the
outcomes a command can have."""

from datetime import datetime, timezone

from dasklab.core.errors import RecordUnreadable

# What became of a command, published on the status topic for whoever sent it (`dasklab` waits for it).
ACCEPTED, DONE, REFUSED, NOTHING_TO_DO = "accepted", "done", "refused", "nothing-to-do"


class Part:
    """A reconciler of the controller `c`: its ports are the controller's (a test may replace one on it)."""

    def __init__(self, c):
        self.c = c

    backend = property(lambda self: self.c.backend)
    events = property(lambda self: self.c.events)
    config = property(lambda self: self.c.config)
    clock = property(lambda self: self.c.clock)
    sleep = property(lambda self: self.c.sleep)
    tombstones = property(lambda self: self.c.tombstones)
    classes = property(lambda self: self.c.classes)  # the class store
    wakeups = property(lambda self: self.c.wakeups)
    reports = property(lambda self: self.c.reports)
    dead_letters = property(lambda self: self.c.dead_letters)
    params = property(lambda self: self.c.params)
    holder = property(lambda self: self.c.holder)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

def poisoned(backend) -> dict:
    """What the backend's last listing found but could not read for good ((kind, name) → RecordUnreadable): those
    labs are contained and reported; unreadable for a moment (a cluster that did not answer) is not in it."""
    unreadable = getattr(backend, "unreadable", {})
    return {key: error for key, error in (unreadable.items() if isinstance(unreadable, dict) else ())
            if isinstance(error, RecordUnreadable)}
