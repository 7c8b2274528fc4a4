"""Timer definitions (infra/dasklab.yaml, the one source of truth for schedules) and the local timer."""

import fcntl
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter

from dasklab.core.errors import ValidationError
from dasklab.core.messages import TICK_TYPES, parse_command

INFRA_FILE = Path(__file__).resolve().parents[3] / "infra" / "dasklab.yaml"


@dataclass(frozen=True)
class Job:
    name: str
    schedule: str
    time_zone: str
    message: dict

    def next_after(self, moment: datetime) -> datetime:
        """The first firing strictly after `moment` (an aware datetime), in UTC."""
        local = moment.astimezone(ZoneInfo(self.time_zone))
        return croniter(self.schedule, local).get_next(datetime).astimezone(timezone.utc)


def upcoming_ticks(jobs: list[Job], start: float, until: float) -> list[tuple[float, str]]:
    """Every firing of the jobs after `start` up to `until` (epoch seconds), in time order: (time, tick type)."""
    ticks = []
    for job in jobs:
        firings = croniter(job.schedule, datetime.fromtimestamp(start, ZoneInfo(job.time_zone)))
        while (at := firings.get_next(float)) <= until:
            ticks.append((at, job.message["type"]))
    return sorted(ticks)


def infra_path() -> Path:
    return Path(os.environ.get("DASKLAB_INFRA", INFRA_FILE))


def load_infra(path: Path | None = None) -> dict:
    """The infra definition, with every job validated (schedule, time zone, message)."""
    data = yaml.safe_load(Path(path or infra_path()).read_text())
    jobs = []
    for i, raw in enumerate(data.get("jobs", [])):
        where = f"jobs[{i}]"
        if not croniter.is_valid(raw.get("schedule", "")) or len(raw["schedule"].split()) != 5:
            raise ValidationError(f"{where}.schedule", "must be a 5-field unix-cron expression")
        try:
            ZoneInfo(raw.get("time_zone", "Etc/UTC"))
        except (ZoneInfoNotFoundError, ValueError):
            raise ValidationError(f"{where}.time_zone", "must be an IANA time zone like Europe/Paris") from None
        if parse_command(raw["message"]).type not in TICK_TYPES:
            raise ValidationError(f"{where}.message", f"a timer sends a tick: {', '.join(TICK_TYPES)}")
        jobs.append(Job(raw["name"], raw["schedule"], raw.get("time_zone", "Etc/UTC"), raw["message"]))
    return {"topics": data["topics"], "jobs": jobs}


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

