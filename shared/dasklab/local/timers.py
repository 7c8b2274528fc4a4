"""Timer definitions (infra/dasklab.yaml, the one source of truth for schedules) and the local timer."""

import fcntl
import json
import os
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable


from dasklab.core.messages import parse_command
from dasklab.core.timers import Job



class LocalTimer:
    """Fires the infra jobs on their schedules in a background thread, like Cloud Scheduler would.

    `fire(job, seconds_to_next)` also gets the time until the job fires again, so a polling tick can end
    before the next one starts.
    """

    def __init__(self, jobs: list[Job], fire: Callable[[Job, float], None], fire_at_start: tuple[str, ...] = (),
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 wakeups: "FileWakeups | None" = None, deliver: Callable[[dict], None] | None = None):
        self.jobs, self.fire, self.clock = {j.name: j for j in jobs}, fire, clock
        self.fire_at_start = fire_at_start
        self.wakeups, self.deliver = wakeups, deliver  # one-off wake-ups: each due one's message is delivered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dasklab-timer", daemon=True)

    def start(self) -> "LocalTimer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def run_now(self, name: str) -> None:
        """Fire one job now (what `gcloud scheduler jobs run` does)."""
        self._fire(self.jobs[name])

    def _fire(self, job: Job) -> datetime:
        now = self.clock()
        due = job.next_after(now)
        self.fire(job, (due - now).total_seconds())
        return due

    def _run(self) -> None:
        for name in self.fire_at_start:
            self._fire(self.jobs[name])
        due = {name: job.next_after(self.clock()) for name, job in self.jobs.items()}
        while not self._stop.is_set():
            now = self.clock()
            for name, when in due.items():
                if when <= now:
                    due[name] = self._fire(self.jobs[name])
            wait = min(((w - now).total_seconds() for w in due.values()), default=3600.0)
            if self.wakeups is not None:
                self._wake(now.timestamp())
                wait = min(wait, 1.0)  # wake-ups are files the controller writes: looked at every second
            self._stop.wait(max(0.05, wait))

    def _wake(self, now: float) -> None:
        """Deliver each due wake-up, then drop it (one moved meanwhile, to a later time, is kept)."""
        for wakeup in self.wakeups.fetch_due(now):
            self.deliver(wakeup["message"])
            path = self.wakeups.root / f"{wakeup['key']}.json"
            with self.wakeups.locked():
                try:
                    if json.loads(path.read_text())["at"] <= now:
                        path.unlink()
                except (FileNotFoundError, ValueError):
                    pass


class FileWakeups:
    """The local backend's one-off timers (core.classes.Wakeups): `<home>/wakeups/<key>.json` written by the
    controller, fired by the local timer (LocalTimer with `wakeups`) once due, then dropped."""

    def __init__(self, home: str | Path):
        self.root = Path(home) / "wakeups"
        self.root.mkdir(parents=True, exist_ok=True)

    def apply_wakeup(self, key: str, at_epoch: float, message: dict) -> None:
        parse_command(message)  # a wake-up delivers a valid command or none
        with self.locked():
            tmp = self.root / f".{key}.tmp"
            tmp.write_text(json.dumps({"key": key, "at": at_epoch, "message": message}))
            os.replace(tmp, self.root / f"{key}.json")

    @contextmanager
    def locked(self):
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def apply_cancel(self, key: str) -> None:
        (self.root / f"{key}.json").unlink(missing_ok=True)

    def apply_expire(self, key: str, now: float) -> None:
        """The local timer drops what it delivered; this drops a due one it has not looked at yet."""
        if any(w["key"] == key for w in self.fetch_due(now)):
            self.apply_cancel(key)

    def fetch_due(self, now: float) -> list[dict]:
        """The wake-ups due at `now`, earliest first."""
        found = []
        for path in self.root.glob("*.json"):
            try:
                wakeup = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue  # cancelled meanwhile, or being replaced
            if wakeup["at"] <= now:
                found.append(wakeup)
        return sorted(found, key=lambda w: w["at"])

