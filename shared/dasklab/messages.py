"""Message schema: decode and validate control-topic commands and timer ticks (pure, no cloud SDK)."""

import base64
import binascii
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator
from pydantic import ValidationError as PydanticError

from .config import Config
from .errors import ValidationError
from .model import MACHINE_TYPES, LabSpec, parse_cpu, parse_memory

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
LAB_NAME = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"  # a GKE cluster name: ≤ 40 chars
LABEL_VALUE = r"^[a-z0-9_-]{1,63}$"
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNSAFE_PIP = re.compile(r"[;&|`$<>\\\n\r]")


def _seconds(value) -> int:
    """A duration as seconds: an integer, or '90s', '30m', '8h', '1d'."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like 30m, 8h or a number of seconds")
    if isinstance(value, int):
        seconds = value
    else:
        m = _DURATION.match(str(value).strip())
        if not m:
            raise ValueError(f"{value!r} is not a duration like 90s, 30m, 8h, 1d or a number of seconds")
        seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- Dask Helm chart values: the parts the controller reads are checked; the rest passes through. ---

class _Resources(BaseModel):
    model_config = ConfigDict(extra="allow")
    cpu: Annotated[float, Field(gt=0)] | None = None
    memory: int | None = None

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, v):
        return None if v is None else parse_cpu(v)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v):
        return None if v is None else parse_memory(v)


class _ResourceBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    limits: _Resources | None = None
    requests: _Resources | None = None


class _EnvVar(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    value: str = ""

    @model_validator(mode="after")
    def _pip(self):
        if self.name == "EXTRA_PIP_PACKAGES" and _UNSAFE_PIP.search(self.value):
            raise ValueError("EXTRA_PIP_PACKAGES may hold package specs only, no shell characters ; & | ` $ < > \\")
        return self


class _Component(BaseModel):
    model_config = ConfigDict(extra="allow")
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = None
    replicas: Annotated[int, Field(ge=0)] | None = None
    resources: _ResourceBlock | None = None
    env: list[_EnvVar] | None = None


class ChartValues(BaseModel):
    """The seed lab's config.yaml shape: jupyter / scheduler / worker blocks; other chart keys pass."""

    model_config = ConfigDict(extra="allow")
    jupyter: _Component | None = None
    scheduler: _Component | None = None
    worker: _Component | None = None


# --- commands ---

class WorkerCounts(_Strict):
    initial: Annotated[int, Field(ge=0)] | None = None
    min: Annotated[int, Field(ge=0)] = 0
    max: Annotated[int, Field(ge=1)] = 4

    @model_validator(mode="after")
    def _order(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be ≤ max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must be between min ({self.min}) and max ({self.max})")
        return self


class WorkerResources(_Strict):
    cpu: float
    memory: int

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, v):
        return parse_cpu(v)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v):
        return parse_memory(v)


class Expose(_Strict):
    """Opt-in public Jupyter: only with source ranges (CIDRs) to restrict the load balancer to."""

    source_ranges: Annotated[list[str], Field(min_length=1, max_length=32)]

    @field_validator("source_ranges")
    @classmethod
    def _cidrs(cls, v):
        import ipaddress
        for cidr in v:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.prefixlen == 0:
                raise ValueError(f"{cidr} opens Jupyter to the whole internet; name the networks to allow")
        return v


class _Command(_Strict):
    v: Literal[1] = SCHEMA_VERSION


class StartLab(_Command):
    type: Literal["start-lab"]
    lab: Annotated[str, Field(pattern=LAB_NAME)]
    owner: Annotated[str, Field(pattern=LABEL_VALUE)]
    workers: WorkerCounts = WorkerCounts()
    machine_type: str | None = None
    worker_resources: WorkerResources | None = None
    idle_timeout: int | None = None
    max_lifetime: int | None = None
    spot: bool = False
    expose: Expose | None = None
    values: dict = Field(default_factory=dict)  # Dask Helm chart values, kept as the user wrote them

    _durations = field_validator("idle_timeout", "max_lifetime", mode="before")(
        lambda v: None if v is None else _seconds(v))

    @field_validator("machine_type")
    @classmethod
    def _machine(cls, v):
        if v is not None and v not in MACHINE_TYPES:
            raise ValueError(f"unknown machine type {v!r}; known: {', '.join(sorted(MACHINE_TYPES))}")
        return v

    @field_validator("values", mode="before")
    @classmethod
    def _yaml(cls, v):
        if isinstance(v, str):  # config.yaml as text
            try:
                v = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise ValueError(f"is not valid YAML: {e}") from None
            v = {} if v is None else v
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of Dask Helm chart values (YAML text or a JSON object)")
        try:
            ChartValues.model_validate(v)
        except PydanticError as e:
            raise _field_error(e, prefix="values") from None
        return v

    @property
    def chart(self) -> ChartValues:
        return ChartValues.model_validate(self.values)


class StopLab(_Command):
    type: Literal["stop-lab"]
    lab: Annotated[str, Field(pattern=LAB_NAME)]


class KeepAlive(_Command):
    type: Literal["keep-alive"]
    lab: Annotated[str, Field(pattern=LAB_NAME)]
    until: datetime | None = None
    for_: int | None = Field(default=None, alias="for")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    _duration = field_validator("for_", mode="before")(lambda v: None if v is None else _seconds(v))

    @field_validator("until")
    @classmethod
    def _aware(cls, v):
        if v is not None and v.tzinfo is None:
            raise ValueError("must carry a time zone, e.g. 2026-11-27T02:00:00Z")
        return v

    @model_validator(mode="after")
    def _one(self):
        if (self.until is None) == (self.for_ is None):
            raise ValueError("give exactly one of 'until' (a time) or 'for' (a duration)")
        return self

    def deadline(self, now: float) -> float:
        return self.until.timestamp() if self.until is not None else now + self.for_


class Scale(_Command):
    type: Literal["scale"]
    lab: Annotated[str, Field(pattern=LAB_NAME)]
    min: Annotated[int, Field(ge=0)] | None = None
    max: Annotated[int, Field(ge=1)] | None = None
    pin: Annotated[int, Field(ge=0)] | None = None
    unpin: bool = False

    @model_validator(mode="after")
    def _something(self):
        if self.min is None and self.max is None and self.pin is None and not self.unpin:
            raise ValueError("give at least one of min, max, pin, unpin")
        if self.pin is not None and self.unpin:
            raise ValueError("give pin or unpin, not both")
        return self


class Reconcile(_Command):
    type: Literal["reconcile"]
    budget_seconds: Annotated[float, Field(ge=0, le=530)] | None = None


class TeardownIdle(_Command):
    type: Literal["teardown-idle"]


class NightlyTeardown(_Command):
    type: Literal["nightly-teardown"]


Command = Union[StartLab, StopLab, KeepAlive, Scale, Reconcile, TeardownIdle, NightlyTeardown]
COMMAND_TYPES = ("start-lab", "stop-lab", "keep-alive", "scale")
TICK_TYPES = ("reconcile", "teardown-idle", "nightly-teardown")
_ADAPTER = TypeAdapter(Annotated[Command, Field(discriminator="type")])


def _field_error(err: PydanticError, prefix: str = "") -> ValidationError:
    first = err.errors()[0]
    loc = ".".join([prefix] * bool(prefix) + [str(p) for p in first["loc"] if p not in COMMAND_TYPES + TICK_TYPES])
    loc = loc or "message"
    rule = first["msg"].removeprefix("Value error, ")
    if first["type"] == "string_pattern_mismatch":
        rule = {LAB_NAME: "must be ≤ 40 chars of lowercase letters, digits and hyphens, start with a letter "
                          "and end with a letter or digit (GKE cluster name rules)",
                LABEL_VALUE: "must be 1-63 chars of lowercase letters, digits, '_' and '-' (GKE label value)"
                }.get(first["ctx"]["pattern"], rule)
    elif first["type"] == "union_tag_invalid":
        loc, rule = "type", f"must be one of {', '.join(COMMAND_TYPES + TICK_TYPES)}"
    elif first["type"] == "union_tag_not_found":
        loc, rule = "type", "required: the message type"
    elif first["type"] == "literal_error" and loc == "v":
        rule = f"unsupported schema version; this controller speaks v{SCHEMA_VERSION}"
    more = len(err.errors()) - 1
    return ValidationError(loc, rule + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))


def parse_command(data: bytes | str | dict) -> Command:
    """Decode a message body (JSON) into a command, or raise ValidationError naming the field and rule."""
    if isinstance(data, (bytes, str)):
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValidationError("data", f"message is {len(data)} bytes; at most {MAX_MESSAGE_BYTES} bytes allowed")
        try:
            data = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValidationError("data", f"must be a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise ValidationError("data", "must be a JSON object")
    try:
        return _ADAPTER.validate_python(data)
    except PydanticError as e:
        raise _field_error(e) from None


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


def check_caps(cmd: StartLab | Scale, config: Config, spec: LabSpec | None = None) -> None:
    """Refuse requests above the controller's caps (never truncate them)."""
    max_workers = cmd.workers.max if isinstance(cmd, StartLab) else cmd.max
    if max_workers is not None and max_workers > config.max_workers:
        raise ValidationError("workers.max" if isinstance(cmd, StartLab) else "max",
                              f"{max_workers} is above the controller cap max_workers={config.max_workers}")
    if isinstance(cmd, StartLab) and (cmd.max_lifetime or 0) > config.max_lifetime_s:
        raise ValidationError("max_lifetime", f"{cmd.max_lifetime}s is above the controller cap "
                                              f"max_lifetime={config.max_lifetime_s}s")
    if isinstance(cmd, Scale) and cmd.pin is not None and cmd.pin > config.max_workers:
        raise ValidationError("pin", f"{cmd.pin} is above the controller cap max_workers={config.max_workers}")
    if spec is not None and max_workers is not None and spec.nodes_for(max_workers) > config.max_nodes:
        raise ValidationError("workers.max" if isinstance(cmd, StartLab) else "max",
                              f"{max_workers} workers need {spec.nodes_for(max_workers)} {spec.machine_type} "
                              f"nodes, above the controller cap max_nodes={config.max_nodes}")


def build_spec(cmd: StartLab, config: Config) -> LabSpec:
    """The lab's desired spec from a start-lab: fill defaults from the config and the chart values."""
    worker = cmd.chart.worker
    limits = worker.resources.limits if worker and worker.resources and worker.resources.limits else None
    if cmd.worker_resources:
        cpu, memory = cmd.worker_resources.cpu, cmd.worker_resources.memory
    else:
        cpu = (limits and limits.cpu) or config.default_worker_cpu
        memory = (limits and limits.memory) or parse_memory(config.default_worker_memory)
    initial = cmd.workers.initial
    if initial is None:
        initial = min(max(worker.replicas if worker and worker.replicas is not None else cmd.workers.min,
                          cmd.workers.min), cmd.workers.max)
    spec = LabSpec(
        name=cmd.lab, owner=cmd.owner, min_workers=cmd.workers.min, max_workers=cmd.workers.max,
        initial_workers=initial, machine_type=cmd.machine_type or config.default_machine_type,
        worker_cpu=cpu, worker_memory=memory,
        idle_timeout_s=cmd.idle_timeout or config.default_idle_timeout_s,
        max_lifetime_s=cmd.max_lifetime or min(config.default_lifetime_s, config.max_lifetime_s),
        spot=cmd.spot, values=cmd.values,
        public_source_ranges=tuple(cmd.expose.source_ranges) if cmd.expose else (),
    )
    cpu_node, mem_node = MACHINE_TYPES[spec.machine_type]
    if cpu > cpu_node or memory > mem_node * 2**30:
        raise ValidationError("worker_resources", f"a worker of {cpu} CPU / {memory / 1e9:.1f} GB does not fit "
                                                  f"on one {spec.machine_type} ({cpu_node} CPU / {mem_node} GiB)")
    check_caps(cmd, config, spec)
    return spec

