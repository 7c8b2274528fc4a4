"""The timers' definitions: infra/dasklab.yaml read and validated, the one source of truth for schedules (the local
timer and Cloud Scheduler both fire them)."""

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter

from dasklab.core.errors import ValidationError
from dasklab.core.messages import TICK_TYPES, parse_command
from dasklab.inputs import input_path


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
    return Path(os.environ.get("DASKLAB_INFRA") or input_path("infra/dasklab.yaml"))


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


def dead_letter_subscription(topics: dict) -> str:
    """The pull subscription that keeps the dead letters (infra creates it; the controller reads it)."""
    return f"{topics['dead_letter']}-sub"
