"""Error classes every layer raises; entry points map them to acknowledge (permanent) or retry (transient)."""


class DasklabError(Exception):
    """Base class of the errors the controller classifies."""


class PermanentError(DasklabError):
    """Retrying will not help: bad input, refused by policy, unknown lab. Logged and acknowledged."""


class ValidationError(PermanentError):
    """A message or configuration value breaks a rule; `field` names it, `rule` says which."""

    def __init__(self, field: str, rule: str):
        self.field, self.rule = field, rule
        super().__init__(f"{field}: {rule}")


class NotAllowed(PermanentError):
    """The trust model refuses this sender this command (core/trust.py): `rule` names the rule, `field` the field."""

    def __init__(self, field: str, rule: str, reason: str):
        self.field, self.rule = field, rule
        super().__init__(f"{reason}: {rule}")


class TransientError(DasklabError):
    """Retrying later may help: timeouts, conflicts, an operation in progress. Raised to get a redelivery."""


class ConflictError(TransientError):
    """Somebody else changed the lab resource since we read it (optimistic concurrency)."""


class LeaseHeld(TransientError):
    """Another invocation holds the lab's lease (it is acting on the lab): this one leaves the lab alone for now."""


class SchedulerUnreachable(TransientError):
    """The Dask scheduler's dashboard HTTP API did not answer."""


class JupyterUnreachable(TransientError):
    """The lab's Jupyter Server did not answer (its token is never in the message)."""


class NoEndpoints(SchedulerUnreachable):
    """The API server's service proxy found no ready pod behind the Service: nothing runs there to answer."""


class RateLimited(TransientError):
    """The service refused for a rate limit (HTTP 429, a per-minute quota): retried, after `retry_after_s` at least."""

    def __init__(self, message: str, retry_after_s: float = 10.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StepRefused(PermanentError):
    """The cloud refused one step for a reason that does not concern the lab itself (e.g. deleting an emptied node:
    a permission the scale-down needs, a policy on the instance group): the lab is not failed; it holds where it is,
    says why (lab-degraded), and the step is tried again on a later pass."""


class RecordUnreadable(PermanentError):
    """A lab's stored record cannot be read by this version (corrupt, a key this version does not know, a schema
    newer than this function's): that lab alone is left alone and reported; the others go on."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"lab {name}: record unreadable: {reason}")


class Gone(TransientError):
    """The object a call named is not there (HTTP 404, gRPC NOT_FOUND). A step whose object vanished is already done
    (the step functions that know it say so and return); anywhere else the next pass reads the world again."""
