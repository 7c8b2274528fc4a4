"""The local lab's stores in files under DASKLAB_HOME, each behind the port the core drives: status events, what was
reported once, tombstones and class records (Firestore and Pub/Sub hold them on Google Cloud)."""

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from dasklab.core.classes import ClassRecord, merge_usage
from dasklab.core.errors import ConflictError
from dasklab.core.dead_letters import LAST_ERROR_TTL_S
from dasklab.core.tombstones import TOMBSTONE_TTL_S

@contextmanager
def flocked(path: Path):
    """An exclusive lock on a lock file, for the records that processes of the local lab share."""
    with open(path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

class FileEvents:
    """Status events as JSON lines in a local file (the local lab's status topic when no emulator runs)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def publish(self, event: dict) -> None:
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(event, default=str) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

class FileReports:
    """What the local lab reported once (core.backend.Reports): `<home>/reported/<key>`, its text the time."""

    def __init__(self, home: str | Path):
        self.root = Path(home) / "reported"
        self.root.mkdir(parents=True, exist_ok=True)

    def fetch_reported(self, key: str, now: float) -> bool:
        return (self.root / key).exists()

    def apply_reported(self, key: str, now: float) -> None:
        (self.root / key).write_text(str(now))

    def fetch_last_error(self, key: str, now: float) -> dict | None:
        try:
            kept = json.loads((self.root / f"{key}.json").read_text())
        except (FileNotFoundError, ValueError):  # none, or cut short by a crash: as if none
            return None
        return kept if kept.get("at", 0) + LAST_ERROR_TTL_S > now else None

    def apply_last_error(self, key: str, error: dict, now: float) -> None:
        path = self.root / f"{key}.json"
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({**error, "at": now}))
        partial.replace(path)  # whole or not at all

class FileDeadLetters:
    """The local lab's dead letters when commands go by direct push (no emulator; core.backend.DeadLetters): one file
    `<home>/dead-letters/<message id>.json` per message the push gave up on, carrying the attributes Pub/Sub adds
    when it forwards one; removed once handled, left in place (read again by the next tick) otherwise."""

    def __init__(self, home: str | Path):
        self.root = Path(home) / "dead-letters"
        self.root.mkdir(parents=True, exist_ok=True)

    def apply_dead_letter(self, message: dict, attempts: int, source: str) -> None:
        """The pusher's side: keep a push envelope's message (base64 data, attributes, id, publishTime)."""
        from dasklab.core.dead_letters import ATTEMPTS, SOURCE, SOURCE_PUBLISHED
        forwarded = {**message.get("attributes", {}), ATTEMPTS: str(attempts), SOURCE: source,
                     SOURCE_PUBLISHED: message.get("publishTime", "")}
        path = self.root / f"{message['messageId']}.json"
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"data": message.get("data", ""), "attributes": forwarded,
                                       "messageId": message["messageId"]}))
        partial.replace(path)

    def fetch_dead_letters(self) -> list:
        import base64
        from dasklab.core.dead_letters import DeadLetter
        letters = []
        for path in sorted(self.root.glob("*.json")):
            kept = json.loads(path.read_text())
            letters.append(DeadLetter(base64.b64decode(kept["data"]), kept["attributes"], kept["messageId"], path))
        return letters

    def apply_handled(self, letter) -> None:
        letter.handle.unlink(missing_ok=True)

    def apply_retry(self, letter) -> None:
        pass  # its file stays: the next tick reads it again


class FileTombstones:
    """The local lab's tombstones (core.tombstones.Tombstones): `<home>/tombstones/<lab>.json`, apart from the lab
    records so they outlive them; written under a lock, keeping the latest stop-lab; expired ones are pruned."""

    def __init__(self, home: str | Path):
        self.root = Path(home) / "tombstones"
        self.root.mkdir(parents=True, exist_ok=True)

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def fetch_stopped(self, lab: str, now: float) -> float | None:
        record = self._read(self.root / f"{lab}.json")
        return record["stopped_at"] if record and record["stopped_at"] + TOMBSTONE_TTL_S > now else None

    def apply_stopped(self, lab: str, published: float, now: float) -> None:
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for path in self.root.glob("*.json"):  # tombstones past the retry horizon
                record = self._read(path)
                if record and record["stopped_at"] + TOMBSTONE_TTL_S <= now:
                    path.unlink(missing_ok=True)
            path = self.root / f"{lab}.json"
            record = self._read(path)
            if record is None or record["stopped_at"] < published:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"lab": lab, "stopped_at": published}))
                os.replace(tmp, path)

class FileClasses:
    """The local backend's class records (core.classes.Classes): `<home>/classes/<class>.json`, written under a lock
    with a version counter for optimistic concurrency."""

    def __init__(self, home: str | Path):
        self.root = Path(home) / "classes"
        self.root.mkdir(parents=True, exist_ok=True)

    def _locked(self):
        return flocked(self.root / ".lock")

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads((self.root / f"{name}.json").read_text())
        except FileNotFoundError:
            return None

    def _write(self, name: str, data: dict) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.root / f"{name}.json")

    def fetch_classes(self) -> list:
        records = ((p.stem, self._read(p.stem)) for p in sorted(self.root.glob("*.json")))
        return [ClassRecord.from_dict(r["record"], str(r["version"])) for _, r in records if r]

    def fetch_class(self, name: str):
        data = self._read(name)
        return ClassRecord.from_dict(data["record"], str(data["version"])) if data else None

    def apply_class(self, record):
        with self._locked():
            data = self._read(record.name)
            current = str(data["version"]) if data else ""
            if current != record.version:
                raise ConflictError(f"class {record.name} changed since it was read (version {record.version})")
            version = int(current or 0) + 1
            self._write(record.name, {"version": version, "record": record.to_dict()})
        return replace(record, version=str(version))

    def apply_usage(self, name: str, student: str, usage: dict) -> None:
        with self._locked():
            data = self._read(name)
            if data is None:
                return
            kept = data["record"].setdefault("usage", {})
            kept[student] = merge_usage(kept.get(student), usage)
            data["version"] += 1
            self._write(name, data)

    def apply_forget_class(self, record) -> None:
        with self._locked():
            data = self._read(record.name)
            if data is not None and str(data["version"]) != record.version:
                raise ConflictError(f"class {record.name} changed since it was read (version {record.version})")
            (self.root / f"{record.name}.json").unlink(missing_ok=True)
