"""The sender's side of command outcomes (used by the CLI): listen for one command's `command-outcome` (or
`command-failed`) status event, from before the command is published until it arrives or the wait ends."""

import json
import time
import uuid
from pathlib import Path

OUTCOME_EVENT = "command-outcome"
FAILED_EVENT = "command-failed"  # the dead-letter pass: Pub/Sub gave the command up after its delivery attempts


def new_request_id() -> str:
    """A random id the sender puts in the command's `request_id` attribute; the controller echoes it."""
    return uuid.uuid4().hex


def is_reply(event: dict, request_id: str, message_id: str | None) -> bool:
    """The outcome of this command: its request id, or its message id (a sender that set no request id)."""
    return event.get("event") in (OUTCOME_EVENT, FAILED_EVENT) and (
        event.get("request_id") == request_id or (message_id is not None and event.get("message_id") == message_id))


class PubSubReplies:
    """A short-lived subscription on the status topic filtered on the request id (the filter works on Google
    Cloud; the emulator ignores it, so events are filtered here too), deleted on exit by an administrator; an
    operator's expires by itself (a day unused: REPLY_TTL_S)."""

    def __init__(self, project: str, topic: str, request_id: str, delete: bool = True):
        self.project, self.topic, self.request_id, self.delete = project, topic, request_id, delete
        self.name = f"dasklab-reply-{request_id}"

    def __enter__(self) -> "PubSubReplies":
        from dasklab.adapters import pubsub
        pubsub.open_reply_subscription(self.project, self.topic, self.name, self.request_id)
        return self

    def wait(self, message_id: str, timeout: float, clock=time.monotonic) -> dict | None:
        from dasklab.adapters import pubsub
        deadline = clock() + timeout
        while (left := deadline - clock()) > 0:
            for event in pubsub.pull(self.project, self.name, timeout=max(0.5, min(left, 5.0))):
                if is_reply(event, self.request_id, message_id):
                    return event
            time.sleep(min(0.2, max(0.0, deadline - clock())))
        return None

    def __exit__(self, *exc) -> None:
        from dasklab.adapters import pubsub
        if self.delete:
            pubsub.close_reply_subscription(self.project, self.name)


class FileReplies:
    """The local status file (`$DASKLAB_HOME/status.jsonl`, when no emulator runs), read from where it ended
    before the command was published."""

    def __init__(self, path: str | Path, request_id: str):
        self.path, self.request_id = Path(path), request_id
        self.offset = 0

    def __enter__(self) -> "FileReplies":
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        return self

    def wait(self, message_id: str, timeout: float, clock=time.monotonic) -> dict | None:
        deadline = clock() + timeout
        while True:
            if self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    for line in f.read().splitlines():
                        if line.strip() and is_reply(json.loads(line), self.request_id, message_id):
                            return json.loads(line)
            if clock() >= deadline:
                return None
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        pass


class NoReplies:
    """--no-wait: nothing listened for."""

    def __enter__(self) -> "NoReplies":
        return self

    def wait(self, message_id: str, timeout: float) -> None:
        return None

    def __exit__(self, *exc) -> None:
        pass
