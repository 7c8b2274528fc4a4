"""Trust policy (pure): who may send which command — the verified sender, the records it concerns → a decision."""

import re
from dataclasses import dataclass

from dasklab.core.classes import ClassRecord
from dasklab.core.errors import NotAllowed, ValidationError
from dasklab.core.messages import TICK_TYPES
from dasklab.core.model import Lab

SENDER = "sender"  # the message attribute the HTTPS entry point sets: the caller's verified Google identity
_EMAIL = re.compile(r"[a-z0-9._%+-]{1,64}@[a-z0-9.-]{1,190}\.[a-z]{2,63}")

# The rules, named in every refusal (README "Trust model").
ADMIN = "administrators may do everything"
OWN_START = "a start-lab or start-class is its sender's: only an administrator may name another owner"
OWNER = "only the lab's owner (or an administrator) may send this command for it"
STUDENT = "a student may keep alive and stop their own class lab; only its owner or an administrator may do more"
CLASS_OWNER = "only the class's owner (or an administrator) may send this command for it"
TICKS = "ticks come from the timers, never from a person"


@dataclass(frozen=True)
class Authorization:
    allowed: bool
    rule: str
    reason: str
    field: str = ""  # the message field the refusal concerns


def parse_admins(text: str) -> frozenset[str]:
    """DASKLAB_ADMINS: comma-separated Google identities (e-mail addresses), compared lowercase."""
    return frozenset(a.strip().lower() for a in text.split(",") if a.strip())


def parse_sender(attributes: dict) -> str | None:
    """The verified sender the HTTPS entry point set as a message attribute; None when the message has none."""
    value = attributes.get(SENDER)
    if value is None:
        return None
    if not (isinstance(value, str) and _EMAIL.fullmatch(value)):
        raise ValidationError(f"message.attributes.{SENDER}", "must be a lowercase e-mail address (a Google identity)")
    return value


def plan_authorize(sender: str, is_admin: bool, command: dict, lab: Lab | None,
                   klass: ClassRecord | None) -> Authorization:
    """May `sender` (a verified identity) send `command` (the message as a dict: its type, lab/class, owner)?
    `lab` and `klass` are the records it names (None: none exists: the command's handler says so)."""
    kind = command.get("type")
    if kind in TICK_TYPES:
        return Authorization(False, TICKS, f"{kind} is a timer's tick: {sender} may not send it", "type")
    if is_admin:
        return Authorization(True, ADMIN, f"{sender} is an administrator")
    if kind in ("start-lab", "start-class"):
        if command.get("owner", sender) != sender:
            return Authorization(False, OWN_START, f"{sender} may not start for {command.get('owner')}", "owner")
        if kind == "start-class" and klass is not None and not klass.is_stopped and klass.owner != sender:
            return Authorization(False, CLASS_OWNER, f"class {klass.name} belongs to {klass.owner}, not {sender}",
                                 "class")
        if kind == "start-lab" and lab is not None and lab.spec.owner != sender:
            return Authorization(False, OWNER, f"lab {lab.name} belongs to {lab.spec.owner}, not {sender}", "lab")
        return Authorization(True, OWN_START, f"{sender} starts it as its owner")
    if kind in ("stop-class",) or (kind == "keep-alive" and command.get("class") is not None):
        if klass is None or klass.owner == sender:
            return Authorization(True, CLASS_OWNER, f"{sender} owns class {command.get('class')}")
        return Authorization(False, CLASS_OWNER, f"class {klass.name} belongs to {klass.owner}, not {sender}",
                             "class")
    if lab is None or lab.spec.owner == sender:
        return Authorization(True, OWNER, f"{sender} owns lab {command.get('lab')}")
    if lab.spec.student_identity == sender:
        if kind in ("keep-alive", "stop-lab"):
            return Authorization(True, STUDENT, f"{sender} is the student of class lab {lab.name}")
        return Authorization(False, STUDENT, f"{sender} is the student of class lab {lab.name}: {kind} is its "
                                             f"owner's ({lab.spec.owner})", "lab")
    return Authorization(False, OWNER, f"lab {lab.name} belongs to {lab.spec.owner}, not {sender}", "lab")


def check_authorized(sender: str, is_admin: bool, command: dict, lab: Lab | None, klass: ClassRecord | None) -> None:
    """plan_authorize, a refusal raised as NotAllowed (told to its sender like every refusal)."""
    verdict = plan_authorize(sender, is_admin, command, lab, klass)
    if not verdict.allowed:
        raise NotAllowed(verdict.field, verdict.rule, verdict.reason)
