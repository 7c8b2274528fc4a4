"""Message schema: decode and validate control-topic commands and timer ticks (pure, no cloud SDK)."""

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Any, Union

import msgspec

from dasklab.core.chart_values import _yaml_without_aliases, check_chart_values, check_values_bound
from dasklab.core.config import check_dask_version
from dasklab.core.errors import ValidationError
from dasklab.core.model import MACHINE_TYPES, parse_cpu, parse_memory

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_MAX_WORKERS = 4  # workers.max when neither it nor values.worker.replicas is given
LAB_NAME = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"  # a GKE cluster name: ≤ 40 chars
LABEL_VALUE = r"^[a-z0-9_-]{1,63}$"
_DURATION = re.compile(r"^(\d+)([smhd]?)$")  # no unit: seconds ("60" from a command line)
_UNSAFE_PIP = re.compile(r"[;&|`$<>\\\n\r]")


def _whole(pattern: str) -> str:
    """msgspec searches with Python's re, where a final '$' also matches before a trailing newline."""
    return pattern.removesuffix("$") + r"\Z"


_Lab = Annotated[str, msgspec.Meta(pattern=_whole(LAB_NAME))]
# a name (GKE label value) or a Google identity: the verified sender the HTTPS entry point sets
OWNER = r"^([a-z0-9_-]{1,63}|[a-z0-9._%+-]{1,64}@[a-z0-9.-]{1,190}\.[a-z]{2,63})$"
_Owner = Annotated[str, msgspec.Meta(pattern=_whole(OWNER))]
_Count = Annotated[int, msgspec.Meta(ge=0)]
_AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
_Quantity = Union[int, float, str]  # a Kubernetes quantity, converted by parse_cpu / parse_memory
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_PATTERN_WORDS = {
    repr(_whole(LAB_NAME)): "must be ≤ 40 chars of lowercase letters, digits and hyphens, start with a letter "
                            "and end with a letter or digit (GKE cluster name rules)",
    repr(_whole(LABEL_VALUE)): "must be 1-63 chars of lowercase letters, digits, '_' and '-' (GKE label value)",
    repr(_whole(OWNER)): "must be 1-63 chars of lowercase letters, digits, '_' and '-' (GKE label value), "
                        "or a lowercase e-mail address",
    repr(_whole(_ENV_NAME)): "must be letters, digits and '_', not starting with a digit (an environment variable)",
}


def _seconds(value) -> int:
    """A duration as seconds: an integer, plain seconds as text ('60'), or '90s', '30m', '8h', '1d'."""
    if isinstance(value, int):
        seconds = value
    else:
        m = _DURATION.match(value.strip())
        if not m:
            raise ValueError(f"{value!r} is not a duration like 90s, 30m, 8h, 1d or a number of seconds")
        seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


class _Refusal(ValueError):
    """A broken rule about one field, raised in __post_init__; msgspec chains it as its error's cause."""
    def __init__(self, field: str, rule: str):
        super().__init__(rule)
        self.field, self.rule = field, rule


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p).replace(".[", "[")


_AT = re.compile(r" - at `(key` in `)?\$([^`]*)`$")  # msgspec's "<rule> - at `$.worker.env[0]`"
_FIELD = re.compile(r"Object (missing required|contains unknown) field `(.*)`$")


def _where(err: msgspec.ValidationError, prefix: str = "") -> tuple[str, str]:
    """A msgspec error → (dotted field path, '' for the whole object; the rule in words)."""
    text = str(err)
    at = _AT.search(text)
    rule = text[:at.start()] + " (a mapping key)" * bool(at[1]) if at else text
    path = _join(prefix, re.sub(r"\[(\d+)\]", r".\1", at[2]).lstrip(".") if at else "")
    if isinstance(err.__cause__, _Refusal):
        return _join(path, err.__cause__.field), err.__cause__.rule
    if m := _FIELD.match(rule):
        return _join(path, m[2]), "Field required" if m[1].startswith("missing") else "Extra inputs are not permitted"
    return path, next((words for pattern, words in _PATTERN_WORDS.items() if pattern in rule), rule)


def _set(obj: msgspec.Struct, name: str, convert, field: str = "") -> None:
    """In __post_init__: replace field `name` (unless None) by convert(value); a refusal names the field."""
    field, value = field or name, getattr(obj, name)
    if value is not None:
        try:
            msgspec.structs.force_setattr(obj, name, convert(value))
        except _Refusal as e:
            raise _Refusal(_join(field, e.field), e.rule) from None
        except msgspec.ValidationError as e:
            raise _Refusal(*_where(e, field)) from None
        except ValueError as e:
            raise _Refusal(field, str(e)) from None


class _Strict(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    pass


# --- Dask Helm chart values: chart_values.ACCEPTED says which keys a request may set (any other is refused first);
# these structs read and check the parts the controller uses. ---

class _Open(msgspec.Struct, kw_only=True):
    """Keys not read here are left to check_chart_values (the command keeps the raw values)."""


class _Resources(_Open):
    cpu: _Quantity | None = None  # cores once parsed
    memory: _Quantity | None = None  # bytes once parsed

    def __post_init__(self):
        _set(self, "cpu", parse_cpu)
        _set(self, "memory", parse_memory)


class _ResourceBlock(_Open):
    limits: _Resources | None = None
    requests: _Resources | None = None


class _EnvVar(_Open):
    name: Annotated[str, msgspec.Meta(pattern=_whole(_ENV_NAME))]
    value: str = ""

    def __post_init__(self):
        if self.name == "EXTRA_PIP_PACKAGES" and _UNSAFE_PIP.search(self.value):
            raise ValueError("EXTRA_PIP_PACKAGES may hold package specs only, no shell characters ; & | ` $ < > \\")


class _Image(_Open):
    repository: str | None = None  # any repository, as long as the tag states the Dask version
    tag: str | int | float | None = None

    def __post_init__(self):
        if self.tag is not None:
            try:
                check_dask_version("", str(self.tag))
            except ValidationError as e:
                raise _Refusal("tag", e.rule) from None


class _Component(_Open):
    image: _Image | None = None
    replicas: _Count | None = None
    resources: _ResourceBlock | None = None
    env: list[_EnvVar] | None = None


class ChartValues(_Open):
    """The seed lab's config.yaml shape: jupyter / scheduler / worker blocks (other accepted keys: chart_values)."""

    jupyter: _Component | None = None
    scheduler: _Component | None = None
    worker: _Component | None = None


def _chart_values(v) -> dict:
    """Chart values as YAML text or a mapping → the mapping as written, once it is bounded, holds only accepted keys
    (chart_values.ACCEPTED) and validates as ChartValues."""
    if isinstance(v, str):  # config.yaml as text
        v = _yaml_without_aliases(v)
        v = {} if v is None else v
    if not isinstance(v, dict):
        raise ValueError("must be a mapping of Dask Helm chart values (YAML text or a JSON object)")
    check_values_bound(v)
    try:
        check_chart_values(v)
    except ValidationError as e:
        raise _Refusal(e.field, e.rule) from None
    msgspec.convert(v, ChartValues, strict=False)
    return v


# --- commands ---

class WorkerCounts(_Strict):
    initial: _Count | None = None
    min: _Count = 0
    max: _AtLeastOne | None = None  # None: values.worker.replicas, else DEFAULT_MAX_WORKERS (see build_worker_counts)

    def __post_init__(self):
        if self.max is None:
            return  # checked by build_worker_counts once the maximum is known
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be ≤ max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must be between min ({self.min}) and max ({self.max})")


class WorkerResources(_Strict):
    cpu: _Quantity  # cores once parsed
    memory: _Quantity  # bytes once parsed

    def __post_init__(self):
        _set(self, "cpu", parse_cpu)
        _set(self, "memory", parse_memory)


# expose.source_ranges, all together (overlaps counted once), open at most as many addresses as a /8 (IPv4) or a
# /32 (IPv6): EXPOSE_RULE says so in every refusal, and docs/security.md quotes it
EXPOSE_MAX_ADDRESSES = {4: 2 ** (32 - 8), 6: 2 ** (128 - 32)}
EXPOSE_RULE = ("the ranges together (overlaps counted once) may open at most as many addresses as a /8 for IPv4 "
               "(16,777,216) and as a /32 for IPv6 (2^96); name the networks to allow")


def _cidrs(ranges: list[str]) -> list[str]:
    import ipaddress
    networks = []
    for cidr in ranges:
        network = ipaddress.ip_network(cidr, strict=False)
        if network.prefixlen == 0:
            raise ValueError(f"{cidr} opens Jupyter to the whole internet; name the networks to allow")
        networks.append(network)
    for version, most in EXPOSE_MAX_ADDRESSES.items():
        opened = sum(n.num_addresses for n in ipaddress.collapse_addresses(n for n in networks if n.version == version))
        if opened > most:
            raise ValueError(f"opens {opened:,} IPv{version} addresses: {EXPOSE_RULE}")
    return ranges


class Expose(_Strict):
    """Opt-in public Jupyter: only with source ranges (CIDRs) to restrict the load balancer to."""

    source_ranges: Annotated[list[str], msgspec.Meta(min_length=1, max_length=32)]

    def __post_init__(self):
        _set(self, "source_ranges", _cidrs)


class _Command(_Strict, tag_field="type"):
    v: Any = SCHEMA_VERSION  # checked here: lax decoding would let "1" pass a Literal[1]

    def __post_init__(self):
        if isinstance(self.v, str) or self.v != SCHEMA_VERSION:
            raise _Refusal("v", f"unsupported schema version; this controller speaks v{SCHEMA_VERSION}")
        msgspec.structs.force_setattr(self, "v", SCHEMA_VERSION)

    @property
    def type(self) -> str:
        return self.__struct_config__.tag


class StartLab(_Command, tag="start-lab", kw_only=True):
    lab: _Lab
    owner: _Owner
    workers: WorkerCounts = msgspec.field(default_factory=WorkerCounts)
    machine_type: str | None = None
    worker_resources: WorkerResources | None = None
    idle_timeout: int | str | None = None  # seconds once parsed
    max_lifetime: int | str | None = None  # seconds once parsed
    spot: bool = False
    expose: Expose | None = None
    values: dict | str = msgspec.field(default_factory=dict)  # Dask Helm chart values, kept as the user wrote them
    mixed_environment: bool = False  # accept different package pins / image tags per component (a note)

    def __post_init__(self):
        super().__post_init__()
        _set(self, "idle_timeout", _seconds)
        _set(self, "max_lifetime", _seconds)
        if self.machine_type is not None and self.machine_type not in MACHINE_TYPES:
            raise _Refusal("machine_type", f"unknown machine type {self.machine_type!r}; "
                                           f"known: {', '.join(sorted(MACHINE_TYPES))}")
        _set(self, "values", _chart_values)

    @property
    def chart(self) -> ChartValues:
        return msgspec.convert(self.values, ChartValues, strict=False)


class UpdateLab(_Command, tag="update-lab", kw_only=True):
    """New chart values for a running lab (a new Helm revision; replacement workers locally)."""

    lab: _Lab
    values: dict | str  # validated like start-lab's
    restart: bool = False  # accept a change that restarts the scheduler (its in-memory results are lost)
    mixed_environment: bool = False

    def __post_init__(self):
        super().__post_init__()
        _set(self, "values", _chart_values)

    @property
    def chart(self) -> ChartValues:
        return msgspec.convert(self.values, ChartValues, strict=False)


class StopLab(_Command, tag="stop-lab", kw_only=True):
    lab: _Lab


class KeepAlive(_Command, tag="keep-alive", kw_only=True):
    lab: _Lab | None = None
    class_: _Lab | None = msgspec.field(default=None, name="class")  # every lab of the class
    until: datetime | None = None
    for_: int | str | None = msgspec.field(default=None, name="for")  # seconds once parsed

    def __post_init__(self):
        super().__post_init__()
        if (self.lab is None) == (self.class_ is None):
            raise ValueError("give exactly one of 'lab' or 'class'")
        _set(self, "for_", _seconds, field="for")
        if self.until is not None and self.until.tzinfo is None:
            raise _Refusal("until", "must carry a time zone, e.g. 2026-11-27T02:00:00Z")
        if (self.until is None) == (self.for_ is None):
            raise ValueError("give exactly one of 'until' (a time) or 'for' (a duration)")

    def deadline(self, now: float) -> float:
        return self.until.timestamp() if self.until is not None else now + self.for_


class Scale(_Command, tag="scale", kw_only=True):
    lab: _Lab
    min: _Count | None = None
    max: _AtLeastOne | None = None
    pin: _Count | None = None
    unpin: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.min is None and self.max is None and self.pin is None and not self.unpin:
            raise ValueError("give at least one of min, max, pin, unpin")
        if self.pin is not None and self.unpin:
            raise ValueError("give pin or unpin, not both")


def _at(value: str) -> datetime:
    """An ISO 8601 time with its zone ('2026-12-07T09:00-08:00', seconds optional)."""
    try:
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("must be an ISO time with zone, e.g. 2026-12-07T09:00-08:00") from None
    if value.tzinfo is None:
        raise ValueError("must carry a time zone, e.g. 2026-12-07T09:00-08:00")
    return value


def _roster(names: list[str], class_name: str) -> list[str]:
    """Each student's lab is `<class>-<student>`: the name must be a lab name and a label value; no repeats."""
    seen: set[str] = set()
    for i, student in enumerate(names):
        if not re.fullmatch(LABEL_VALUE, student) or not re.fullmatch(LAB_NAME, f"{class_name}-{student}"):
            raise _Refusal(f"[{i}]", f"{student!r}: the lab {class_name}-{student} must be ≤ 40 chars of "
                                           "lowercase letters, digits and hyphens ending with a letter or digit (GKE "
                                           "cluster name rules), so a student name is lowercase letters, digits and "
                                           f"hyphens, at most {39 - len(class_name)} chars for class {class_name}")
        if student in seen:
            raise _Refusal(f"[{i}]", f"{student!r} is listed twice")
        seen.add(student)
    return names


_EMAIL = re.compile(r"[a-z0-9._%+'-]+@[a-z0-9-]+(\.[a-z0-9-]+)+", re.IGNORECASE)


def _identity(value: str) -> str:
    """A Google account (an e-mail: what GKE names a user in RBAC), lowercased as Google reports it."""
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        raise ValueError(f"{value!r} is not an e-mail address (a Google account, e.g. ann@example.edu)")
    return value.lower()


def _roster_entries(entries: list[str], class_name: str, identities: dict[str, str]) -> list[str]:
    """Roster entries `name` or `name=<Google account>`: the names (checked by _roster); each account into
    `identities`."""
    names = []
    for i, entry in enumerate(entries):
        name, given, identity = entry.partition("=")
        if given:
            try:
                identities[name] = _identity(identity)
            except ValueError as e:
                raise _Refusal(f"[{i}]", f"{name!r}: {e}") from None
        names.append(name)
    return _roster(names, class_name)


_USD = Annotated[float, msgspec.Meta(gt=0)]


class Budget(_Strict):
    """USD, estimated as `dasklab status` does: per student lab and for the whole class."""

    student: _USD | None = None
    class_: _USD | None = msgspec.field(default=None, name="class")


PLACEMENTS = ("own", "shared")


class StartClass(_Command, tag="start-class", kw_only=True):
    """A lab per student, named `<class>-<student>`, all from one template (validated as a start-lab's)."""

    class_: _Lab = msgspec.field(name="class")
    owner: _Owner
    roster: Annotated[list[str], msgspec.Meta(min_length=1, max_length=500)]
    workers: WorkerCounts = msgspec.field(default_factory=WorkerCounts)
    machine_type: str | None = None
    worker_resources: WorkerResources | None = None
    idle_timeout: int | str | None = None
    max_lifetime: int | str | None = None
    spot: bool = False
    values: dict | str = msgspec.field(default_factory=dict)
    mixed_environment: bool = False
    at: str | None = None  # a datetime once parsed: when the labs must be ready (provisioning starts a lead time before)
    duration: int | str | None = None  # seconds once parsed: the labs are torn down at `at` (or now) + duration
    budget: Budget = msgspec.field(default_factory=Budget)
    placement: str = ""  # "" = the controller's default; "own" = a cluster per student; "shared" = one per class
    # student → Google account, from roster entries `name=<account>`: in-cluster rights to connect to their own lab
    identities: dict[str, str] = msgspec.field(default_factory=dict)
    owner_identity: str | None = None  # the owner's Google account: the same rights in every student's lab

    def __post_init__(self):
        super().__post_init__()
        identities = dict(self.identities)
        _set(self, "roster", lambda entries: _roster_entries(entries, self.class_, identities))
        for name, identity in identities.items():
            if name not in self.roster:
                raise _Refusal(f"identities.{name}", f"{name!r} is not on the roster")
            try:
                identities[name] = _identity(identity)
            except ValueError as e:
                raise _Refusal(f"identities.{name}", str(e)) from None
        msgspec.structs.force_setattr(self, "identities", identities)
        _set(self, "owner_identity", _identity)
        _set(self, "values", _chart_values)  # refused here, naming the field, as a start-lab's are
        _set(self, "at", _at)
        _set(self, "duration", _seconds)
        if self.placement not in ("", *PLACEMENTS):
            raise _Refusal("placement", f"must be one of {', '.join(PLACEMENTS)}")

    def access_of(self, student: str) -> tuple[str, ...]:
        """The Google accounts that may connect to a student's lab: the student's, then the owner's."""
        return tuple(dict.fromkeys(a for a in (self.identities.get(student), self.owner_identity) if a))

    def student_lab(self, student: str) -> StartLab:
        """The start-lab of one student's lab (validated as one: its refusals name the start-lab's fields)."""
        return StartLab(lab=f"{self.class_}-{student}", owner=self.owner, workers=self.workers,
                        machine_type=self.machine_type, worker_resources=self.worker_resources,
                        idle_timeout=self.idle_timeout, max_lifetime=self.max_lifetime, spot=self.spot,
                        values=self.values, mixed_environment=self.mixed_environment)


class StopClass(_Command, tag="stop-class", kw_only=True):
    class_: _Lab = msgspec.field(name="class")


class ReconcileClass(_Command, tag="reconcile-class", kw_only=True):
    """A class's wake-up (its `at` minus the lead time, its end): one reconcile pass over that class."""

    class_: _Lab = msgspec.field(name="class")


class Reconcile(_Command, tag="reconcile"):
    budget_seconds: Annotated[float, msgspec.Meta(ge=0, le=530)] | None = None


class TeardownIdle(_Command, tag="teardown-idle"):
    pass


class NightlyTeardown(_Command, tag="nightly-teardown"):
    pass


Command = Union[StartLab, UpdateLab, StopLab, KeepAlive, Scale, StartClass, StopClass, Reconcile, ReconcileClass,
                TeardownIdle, NightlyTeardown]
COMMAND_TYPES = ("start-lab", "update-lab", "stop-lab", "keep-alive", "scale", "start-class", "stop-class")
TICK_TYPES = ("reconcile", "reconcile-class", "teardown-idle", "nightly-teardown")
CONTROL, TICKS = "control", "ticks"  # the topics a message can arrive on (infra/dasklab.yaml topics)
_DECODER = msgspec.json.Decoder(Command, strict=False)  # lax like JSON senders expect: "8" → 8, 1 → true


def _refused(err: msgspec.ValidationError) -> ValidationError:
    field, rule = _where(err)
    if field == "type":
        rule = "required: the message type" if rule == "Field required" else \
            f"must be one of {', '.join(COMMAND_TYPES + TICK_TYPES)}"
    elif not field and rule.startswith("Expected `object`"):
        field, rule = "data", "must be a JSON object"
    return ValidationError(field or "message", rule)


def parse_command(data: bytes | str | dict) -> Command:
    """Decode a message body (JSON) into a command, or raise ValidationError naming the field and rule."""
    if isinstance(data, (bytes, str)) and len(data) > MAX_MESSAGE_BYTES:
        raise ValidationError("data", f"message is {len(data)} bytes; at most {MAX_MESSAGE_BYTES} bytes allowed")
    if not isinstance(data, (bytes, str, dict)):
        raise ValidationError("data", "must be a JSON object")
    try:
        if isinstance(data, dict):
            return msgspec.convert(data, Command, strict=False)
        return _DECODER.decode(data)
    except msgspec.ValidationError as e:
        raise _refused(e) from None
    except msgspec.DecodeError as e:
        raise ValidationError("data", f"must be a JSON object ({e})") from None
    except RecursionError:
        raise ValidationError("data", "is nested too deeply to decode") from None


def check_topic(cmd: Command, topic: str) -> Command:
    """A tick only from the timers' topic (which only the timers may publish to), a command only from the control
    topic: anyone who may publish a command could otherwise forge a nightly teardown. Raises ValidationError."""
    if topic == CONTROL and cmd.type in TICK_TYPES:
        raise ValidationError("type", "ticks are accepted only from the timers' topic")
    if topic == TICKS and cmd.type not in TICK_TYPES:
        raise ValidationError("type", "the timers' topic carries ticks only: commands go to the control topic")
    return cmd


def decode_pubsub(event_data: dict) -> tuple[bytes, dict, str]:
    """The Pub/Sub message inside a CloudEvent's data → (payload bytes, attributes, message id)."""
    message = event_data.get("message") if isinstance(event_data, dict) else None
    if not isinstance(message, dict):
        raise ValidationError("message", "the CloudEvent carries no Pub/Sub message")
    try:
        payload = base64.b64decode(message.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValidationError("message.data", "must be base64") from None
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValidationError("message.attributes", "must be a mapping")
    return payload, attributes, str(message.get("messageId") or message.get("message_id") or "")


REQUEST_ID = "request_id"  # the message attribute a sender sets to find its command's outcome on the status topic
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_request_id(attributes: dict) -> str:
    """The sender's request id from the message attributes ('' when none), echoed on the command's outcome."""
    value = attributes.get(REQUEST_ID, "")
    if value and not (isinstance(value, str) and _REQUEST_ID.fullmatch(value)):
        raise ValidationError(f"message.attributes.{REQUEST_ID}", "must be 1-64 letters, digits, '-' or '_'")
    return value


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def decode_publish_time(event_data: dict) -> float | None:
    """The Pub/Sub message's publishTime (RFC 3339, up to nanoseconds) as epoch seconds; None when absent."""
    message = event_data.get("message") if isinstance(event_data, dict) else None
    raw = message.get("publishTime") or message.get("publish_time") if isinstance(message, dict) else None
    if raw is None:
        return None
    m = _RFC3339.match(raw) if isinstance(raw, str) else None
    try:
        when = datetime.fromisoformat(m[1] + m[3].replace("Z", "+00:00")) if m else None
    except ValueError:
        when = None
    if when is None:
        raise ValidationError("message.publishTime", "must be an RFC 3339 time like 2026-11-27T02:00:00.123Z")
    return when.timestamp() + (int(m[2].ljust(9, "0")) / 1e9 if m[2] else 0.0)
