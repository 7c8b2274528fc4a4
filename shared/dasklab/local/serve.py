"""The local controller: Pub/Sub emulator (or direct push), a functions-framework server running the real
entry point, and the local timer firing the infra jobs. Used by `dasklab local serve`, the demo and tests."""

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from dasklab.adapters import procs
from dasklab.adapters.local import LocalBackend
from dasklab.adapters.files import FileDeadLetters, FileEvents
from dasklab.core.errors import PermanentError
from dasklab.core.messages import parse_command
from dasklab.core.timers import dead_letter_subscription, load_infra
from dasklab.inputs import input_path
from dasklab.local.timers import FileWakeups, LocalTimer

LOCAL_PROJECT = "dasklab-local"
STATUS_PULL_SUBSCRIPTION = "dasklab-status-local"


def push_envelope(payload: dict | bytes, message_id: str | None = None, attributes: dict | None = None) -> dict:
    """The body a Pub/Sub push subscription sends: what the functions-framework server accepts."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    published = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return {"message": {"data": base64.b64encode(data).decode(), "attributes": attributes or {},
                        "messageId": message_id or uuid.uuid4().hex, "publishTime": published},
            "subscription": f"projects/{LOCAL_PROJECT}/subscriptions/direct"}


class LocalController:
    """Starts and stops everything a local lab needs; `publish` sends a command the way the cloud would."""

    def __init__(self, home: str | Path, *, emulator: bool | None = None, settings: dict | None = None,
                 fire_timers: bool = True):
        self.home = Path(home)
        self.want_emulator = emulator
        self.settings = {"DASKLAB_TICK_BUDGET_S": "57", **{k: str(v) for k, v in (settings or {}).items()}}
        self.budget_s = float(self.settings["DASKLAB_TICK_BUDGET_S"])
        self.fire_timers = fire_timers
        self.emulator = self.server = self.ticks_server = self.timer = None
        self.infra = load_infra()
        self._events_read = 0  # status events of the file already returned by fetch_events (direct push)

    @property
    def bus(self) -> str:
        return "Pub/Sub emulator" if self.emulator else "direct push (no emulator)"

    @property
    def functions_log(self) -> Path:
        return self.home / "logs" / "functions.log"

    @property
    def ticks_log(self) -> Path:
        """The ticks entry point's log (a server of its own reads its port from its own log)."""
        return self.home / "logs" / "ticks.log"

    def start(self) -> "LocalController":
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        use = self.want_emulator if self.want_emulator is not None else procs.find_pubsub_emulator() is not None
        env = {"DASKLAB_BACKEND": "local", "DASKLAB_HOME": str(self.home), **self.settings}
        if use:
            self.emulator = procs.start_pubsub_emulator(self.home / "logs", LOCAL_PROJECT)
            os.environ.update(self.emulator.env)  # this process's clients talk to the emulator too
            env.update(self.emulator.env)
        source = input_path("functions/main.py")
        self.server = procs.start_functions_server("control", source, env=env, log_path=self.functions_log)
        self.ticks_server = procs.start_functions_server("ticks", source, env=env, log_path=self.ticks_log)
        topics = self.infra["topics"]
        if self.emulator:
            from dasklab.adapters import pubsub
            for topic in (topics["control"], topics["ticks"], topics["status"], topics["dead_letter"]):
                pubsub.ensure_topic(LOCAL_PROJECT, topic)
            for role, server in (("control", self.server), ("ticks", self.ticks_server)):
                pubsub.ensure_subscription(LOCAL_PROJECT, topics[role], f"{topics[role]}-push",
                                           push_endpoint=f"{server.url}projects/{LOCAL_PROJECT}/topics/{topics[role]}",
                                           dead_letter_topic=topics["dead_letter"])
            pubsub.ensure_subscription(LOCAL_PROJECT, topics["status"], STATUS_PULL_SUBSCRIPTION)
            # what the triggers give up on is kept here for the reconcile tick's dead-letter pass (as infra does)
            pubsub.ensure_subscription(LOCAL_PROJECT, topics["dead_letter"], dead_letter_subscription(topics))
        (self.home / "serve.json").write_text(json.dumps({
            "pid": os.getpid(), "bus": self.bus, "functions_url": self.server.url,
            "ticks_url": self.ticks_server.url,
            "emulator_host": self.emulator.host if self.emulator else None, "project": LOCAL_PROJECT,
            "control_topic": topics["control"], "tick_topic": topics["ticks"], "status_topic": topics["status"],
            "functions_log": str(self.functions_log), "ticks_log": str(self.ticks_log)}))
        if self.fire_timers:
            self.timer = LocalTimer(self.infra["jobs"], self._fire, fire_at_start=("dasklab-reconcile",),
                                    wakeups=FileWakeups(self.home),
                                    deliver=lambda message: publish_local(self.home, message,
                                                                          tick=message["type"])).start()

    def _fire(self, job, seconds_to_next: float) -> str:
        """Publish a job's tick. A reconcile tick polls until just before the next one: the emulator pushes at
        most two messages at a time per subscription, so overlapping polling ticks would hold back commands."""
        message = dict(job.message)
        if message["type"] == "reconcile":
            message.setdefault("budget_seconds", max(0.0, min(self.budget_s, seconds_to_next - 2)))
        return publish_local(self.home, message, tick=message["type"])

    def publish(self, payload: dict) -> str:
        return publish_local(self.home, payload)

    def fetch_events(self, timeout: float = 1.0) -> list[dict]:
        """The status events published since the last call: pulled (and acknowledged) from the emulator's status
        subscription, or read from the status file that direct push writes (runtime.build_events)."""
        if self.emulator:
            from dasklab.adapters import pubsub
            return pubsub.pull(LOCAL_PROJECT, STATUS_PULL_SUBSCRIPTION, timeout=timeout)
        events = FileEvents(self.home / "status.jsonl").read()
        new, self._events_read = events[self._events_read:], len(events)
        return new

    def run_job(self, name: str) -> str:
        """Fire a timer job now, like `gcloud scheduler jobs run`."""
        job = next(j for j in self.infra["jobs"] if j.name == name)
        return self._fire(job, seconds_to_next=0)

    def stop(self) -> None:
        """Stop the timer, every lab's processes, the functions server and the emulator."""
        if self.timer:
            self.timer.stop()
        for server in (self.ticks_server, self.server):  # first, so no invocation acts on the labs while stopped
            if server:
                server.stop(timeout=2)
        LocalBackend(self.home).stop_all()
        if self.emulator:
            self.emulator.stop()
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        (self.home / "serve.json").unlink(missing_ok=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_info(home: str | Path) -> dict:
    path = Path(home) / "serve.json"
    if not path.exists():
        raise PermanentError(f"no local controller is running for {home}: start one with `dasklab local serve`")
    return json.loads(path.read_text())


def publish_local(home: str | Path, payload: dict, tick: str | None = None, attributes: dict | None = None,
                  background: bool = True) -> str:
    """Validate a command, then send it to the running local controller over its bus (a `tick` on the timers' topic,
    to the ticks entry point; anything else on the control topic); returns the message id.
    By direct push the delivery runs in a thread, or, with `background=False`, before returning (a process about
    to exit, like the CLI, would otherwise drop it)."""
    parse_command(payload)  # refuse locally with the same error the function would log
    info = serve_info(home)
    attributes = {**(attributes or {}), **({"dasklab-tick": tick} if tick else {})}
    if info["emulator_host"]:
        os.environ.setdefault("PUBSUB_EMULATOR_HOST", info["emulator_host"])
        from dasklab.adapters import pubsub
        return pubsub.publish(info["project"], info["tick_topic" if tick else "control_topic"], payload, **attributes)
    envelope, url = push_envelope(payload, attributes=attributes), info["ticks_url" if tick else "functions_url"]
    if not background:
        _push(url, envelope, home=home)
        return envelope["message"]["messageId"]
    threading.Thread(target=_push, args=(url, envelope), kwargs={"home": home}, daemon=True).start()
    return envelope["message"]["messageId"]


def _push(url: str, envelope: dict, attempts: int = 5, home: str | Path | None = None, backoff: float = 1.0) -> None:
    """Deliver like a push subscription: retry a 5xx (a transient failure) with backoff; after the last attempt,
    keep the message as a dead letter in `home` (as a dead-letter policy would), for the next reconcile tick."""
    request = urllib.request.Request(url, data=json.dumps(envelope).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    for attempt in range(attempts):
        try:
            urllib.request.urlopen(request, timeout=600).read()
            return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return  # the request itself is at fault (4xx): retrying cannot help
            if attempt + 1 < attempts:
                time.sleep(backoff * 2**attempt)
        except OSError:
            return  # the server is gone (the local controller stopped): nothing left to deliver to
    if home is not None:
        FileDeadLetters(home).apply_dead_letter(envelope["message"], attempts, source="direct-push")


# The controller's decisions `dasklab local serve` shows as they happen (its JSON log has every line).
DECISIONS = ("create", "provision", "install", "mark-ready", "mark-failed", "limits", "keep-alive", "scale-up",
             "scale-down", "retire", "teardown", "forget", "refused", "update", "rollout-start", "rollout-retire",
             "jupyter-restart", "updated", "degraded", "recovered", "spare", "dead-letter")


def follow_log(path: Path, stop: threading.Event, show: Callable[[dict], None], interval: float = 0.2) -> None:
    """Tail the functions server's log until `stop` is set, calling `show` with each JSON line as it appears."""
    offset = 0
    while not stop.is_set():
        if path.exists():
            with open(path) as f:
                f.seek(offset)
                for line in f:
                    if not line.endswith("\n"):
                        break  # written in part: read it whole next time
                    offset += len(line.encode())
                    if line.startswith("{"):
                        try:
                            show(json.loads(line))
                        except ValueError:
                            pass  # a line that only looks like JSON (a library's output)
        stop.wait(interval)


def describe(entry: dict) -> str | None:
    """One readable line for a decision of the controller's log (None for what is not a decision shown)."""
    action = entry.get("action")
    if action not in DECISIONS:
        return None
    change = f" {_short(entry.get('from', '-'))} → {_short(entry['to'])}" if "to" in entry else ""
    if action == "limits":
        change = " min/max/pin" + change
    reason = entry.get("reason", "")
    if action == "retire":
        reason += f" (retired {', '.join(entry.get('workers', []))})" if entry.get("workers") else ""
    message = f"  (message {entry['message_id']})" if entry.get("message_id") else ""
    return f"{time.strftime('%H:%M:%S')}  {entry.get('lab') or '-':<12} {action}{change}  {reason}{message}"


def _short(value) -> str:
    """A decision's from/to for people: epoch seconds as a time, lists as a/b/c."""
    if isinstance(value, float) and value > 1e9:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, list):
        return "/".join("-" if v is None else str(v) for v in value)
    return str(value)
