"""The dead-letter pass, first step of every reconcile tick: each command Pub/Sub gave up on is said (an ERROR line
and a command-failed event for its sender, with its last error), and a stop among them is still carried out."""

import hashlib
import json
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping

from dasklab.core import logs
from dasklab.core.context import NOTHING_TO_DO, Part
from dasklab.core.errors import PermanentError, TransientError, ValidationError
from dasklab.core.messages import Command, StopClass, StopLab, decode_publish_time, parse_command, parse_request_id
from dasklab.core.trust import parse_sender

# What Pub/Sub adds to a message it forwards to a dead-letter topic (it wraps the original in a new message, with a
# new message id; the original's data and attributes are kept). Measured on the Cloud SDK's Pub/Sub emulator, which
# forwards after max_delivery_attempts as the service does (tests/test_dead_letters.py); the names are those of
# https://cloud.google.com/pubsub/docs/handling-failures ("wraps the original message in a new one and adds
# attributes that identify the source subscription").
DEAD_LETTER_PREFIX = "CloudPubSubDeadLetter"
ATTEMPTS = "CloudPubSubDeadLetterSourceDeliveryCount"
SOURCE = "CloudPubSubDeadLetterSourceSubscription"
SOURCE_PUBLISHED = "CloudPubSubDeadLetterSourceTopicPublishTime"  # the original publishTime (RFC 3339)

COMMAND_FAILED = "command-failed"
MAX_ERROR_CHARS = 1000  # a last error kept for the report, cut to this (an event stays small)
LAST_ERROR_TTL_S = 8 * 86400  # kept longer than a dead-letter subscription keeps a message (7 days by default)


@dataclass(frozen=True)
class DeadLetter:
    """One forwarded message as the dead-letter subscription gives it."""
    data: bytes
    attributes: Mapping[str, str]  # the original's, plus the CloudPubSubDeadLetter* ones
    message_id: str  # the forwarded message's own id (not the original's)
    handle: Any = field(default=None, compare=False)  # what the adapter acknowledges it by (its ack id)


def build_last_error(e: BaseException) -> str:
    """An attempt's error as kept for its dead letter: its type and message, cut to MAX_ERROR_CHARS and saying so."""
    text = f"{type(e).__name__}: {e}"
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return f"{text[:MAX_ERROR_CHARS]}… (cut at {MAX_ERROR_CHARS} of {len(text)} characters; the whole is in the function's log)"


def failure_key(data: bytes, attributes: Mapping[str, str]) -> str:
    """Where a failing message's last error is kept (the reports store) and found again once it is dead-lettered.

    Pub/Sub forwards a dead letter under a new message id and keeps no trace of the old one, so the key cannot be the
    message id: it is a digest of what both sides see unchanged, the data and the original attributes (those Pub/Sub
    adds left out). The publish time is left out too: the entry point reads it from the push envelope and the dead
    letter from an attribute, and the two need not be written alike. Two messages alike in data and attributes share
    a key (the CLI's request id makes each command differ): the error kept is the later one's, a failure of the same
    message all the same."""
    original = {k: v for k, v in attributes.items() if not k.startswith(DEAD_LETTER_PREFIX)}
    digest = hashlib.sha256(bytes(data) + b"\n" + json.dumps(original, sort_keys=True).encode()).hexdigest()
    return f"failure-{digest[:40]}"


@dataclass(frozen=True)
class DeadLetterPlan:
    """What a dead letter says and what is still done about it (pure: plan_dead_letter)."""
    command: Command | None  # None: the message itself cannot be read
    type: str | None
    lab: str | None
    class_: str | None
    request_id: str | None
    sender: str | None
    attempts: int | None
    source: str
    published: float | None  # the original publishTime (orders the stop against the lab's start)
    problem: str = ""  # why the message cannot be read (then nothing is carried out)

    @property
    def carry_out(self) -> bool:
        """A stop is never lost: a dead-lettered stop-lab or stop-class is still carried out; anything else is only
        reported (a start, an update or a scale the sender may send again, now that they know)."""
        return isinstance(self.command, (StopLab, StopClass))


def _lenient(parse, *args):
    try:
        return parse(*args)
    except ValidationError:
        return None


def plan_dead_letter(letter: DeadLetter) -> DeadLetterPlan:
    """Read a dead letter as far as it can be read: a malformed body or attribute is a problem to report, never a
    reason to stop (the body is the same one the entry point refused to act on, or failed on)."""
    attrs = dict(letter.attributes)
    command, problem = None, ""
    try:
        command = parse_command(bytes(letter.data))
    except ValidationError as e:
        problem = f"unreadable command: {e}"
    try:
        raw = json.loads(letter.data)
    except ValueError:
        raw = None
    raw = raw if isinstance(raw, dict) else {}
    what = {k: (v if isinstance(v, str) else None) for k, v in
            (("type", raw.get("type")), ("lab", raw.get("lab")), ("class", raw.get("class")))}
    attempts = attrs.get(ATTEMPTS, "")
    published = attrs.get(SOURCE_PUBLISHED)
    return DeadLetterPlan(
        command, getattr(command, "type", None) or what["type"], getattr(command, "lab", None) or what["lab"],
        getattr(command, "class_", None) or what["class"], _lenient(parse_request_id, attrs) or None,
        _lenient(parse_sender, attrs), int(attempts) if attempts.isdigit() else None, attrs.get(SOURCE, ""),
        _lenient(decode_publish_time, {"message": {"publishTime": published}}) if published else None, problem)


class DeadLetterPass(Part):
    """Reads the dead-letter subscription; a letter is acknowledged only once handled (at least once: a crash reads
    it again, and handling it twice is harmless: the stop is already under way, the event said twice)."""

    def drain(self, mid: str) -> int:
        """Handle what waits on the dead-letter subscription; returns how many were handled. Its trouble never
        stops the tick: the pass over the labs follows in any case."""
        if self.c.dead_letters is None:
            return 0
        try:
            letters = self.c.dead_letters.fetch_dead_letters()
        except TransientError as e:
            logs.emit("WARNING", action="dead-letters", reason=f"read later: {e}", message_id=mid)
            return 0
        except PermanentError as e:  # no subscription, no permission: said on every tick until fixed
            logs.emit("ERROR", action="dead-letters", reason=f"cannot read the dead letters: {e}", message_id=mid)
            return 0
        handled = 0
        for letter in letters:
            try:
                self.handle_dead_letter(letter, mid)
                self.c.dead_letters.apply_handled(letter)
                handled += 1
            except TransientError as e:  # not acknowledged: handed back for the next tick
                logs.emit("WARNING", action="dead-letter", reason=f"retry on a later tick: {e}",
                          message_id=letter.message_id)
                self._hand_back(letter)
            except Exception as e:  # noqa: BLE001 -- one poisoned dead letter must not stop the others
                logs.emit("ERROR", action="dead-letter", reason=f"{type(e).__name__}: {e}", message_id=letter.message_id,
                          traceback=traceback.format_exc())
                self._hand_back(letter)
        return handled

    def _hand_back(self, letter: DeadLetter) -> None:
        try:
            self.c.dead_letters.apply_retry(letter)
        except (TransientError, PermanentError) as e:  # its ack deadline hands it back all the same
            logs.emit("WARNING", action="dead-letter", reason=f"not handed back: {e}", message_id=letter.message_id)

    def handle_dead_letter(self, letter: DeadLetter, mid: str) -> None:
        plan = plan_dead_letter(letter)
        kept = self.reports.fetch_last_error(failure_key(letter.data, letter.attributes), self.clock()) \
            if self.reports is not None else None
        error = (kept or {}).get("error") or plan.problem or "unknown: no error was kept for this message"
        done = self._carry_out(plan, letter) if plan.carry_out else None
        attempts = f"after {plan.attempts} delivery attempts" if plan.attempts else "after its delivery attempts"
        reason = f"{plan.type or 'message'} failed {attempts}; last error: {error}"
        if done:
            reason += f"; {done}"
        original = (kept or {}).get("message_id") or None
        logs.emit("ERROR", action="dead-letter", lab=plan.lab, command=plan.type, reason=reason, attempts=plan.attempts,
                  source=plan.source or None, message_id=original, dead_letter_id=letter.message_id,
                  request_id=plan.request_id, tick=mid, **{"class": plan.class_})
        event = {"event": COMMAND_FAILED, "command": plan.type, "lab": plan.lab, "class": plan.class_,
                 "outcome": "failed", "reason": reason, "error": error, "attempts": plan.attempts,
                 "carried_out": done, "message_id": original, "dead_letter_id": letter.message_id,
                 "request_id": plan.request_id, "time": self.clock()}
        self.events.publish({k: v for k, v in event.items() if v is not None})

    def _carry_out(self, plan: DeadLetterPlan, letter: DeadLetter) -> str:
        """The stop, decided and recorded (the lab marked tearing down; the class marked stopped); the pass over
        the labs that follows in this tick takes the steps. A refusal is said in the report (no retry fixes it)."""
        cmd, mid = plan.command, letter.message_id
        reason = f"{plan.type} requested (carried out from the dead letters)"
        try:
            if plan.sender is not None:  # the trust rules again, on the records as they are now
                self.c.commands.authorize(cmd, plan.sender)
            if isinstance(cmd, StopLab):
                outcome = self.c.labs.apply_stop(cmd, mid, plan.published, reason=reason, step=False)
            else:
                outcome = self.c.commands.stop_class(cmd, mid, plan.published)
        except PermanentError as e:
            return f"the stop is not carried out: {e}"
        if outcome[0] == NOTHING_TO_DO:
            return f"the stop changes nothing: {outcome[1]}"
        return f"the stop is carried out all the same: {outcome[1]}"
