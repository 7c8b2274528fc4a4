"""The one translation table for google.api_core exceptions → our errors, shared by the adapters of Google APIs that
raise them the same way: GKE (container v1 over gRPC) and Compute Engine (over REST). Firestore keeps its own."""

import re

from google.api_core import exceptions as gexc

from dasklab.core.errors import ConflictError, Gone, PermanentError, RateLimited, TransientError

_RATE = re.compile(r"rateLimitExceeded|userRateLimitExceeded|per minute|per second|per 100 seconds", re.IGNORECASE)


def rate_limited(e: Exception) -> bool:
    """A 429 (TooManyRequests, gRPC RESOURCE_EXHAUSTED), or a 403 for a per-minute API quota (Compute's
    "rateLimitExceeded" reason; GKE's "Quota exceeded for quota metric 'Mutate requests' … per minute")."""
    reasons = " ".join(str(err.get("reason", "")) for err in getattr(e, "errors", None) or () if isinstance(err, dict))
    return isinstance(e, gexc.TooManyRequests) or bool(_RATE.search(f"{e} {reasons}"))


def translate(e: Exception, what: str) -> Exception:
    """One row per kind of answer, first match wins (the classes are google.api_core.exceptions', which map both
    HTTP statuses and gRPC codes; e.g. PermissionDenied is a Forbidden, InvalidArgument and FailedPrecondition are
    BadRequests, ResourceExhausted is a TooManyRequests)."""
    message = f"{what}: {getattr(e, 'message', None) or e}"
    if isinstance(e, gexc.NotFound):
        # 404 / NOT_FOUND "Not found: projects/…/clusters/c" (clusters.get, instanceGroupManagers.get): the object
        # is not there; a step on it is done (its caller says so), a read returns None
        return Gone(message)
    if isinstance(e, gexc.FailedPrecondition):
        # GKE FAILED_PRECONDITION: a stale label fingerprint (SetLabelsRequest.label_fingerprint docstring) is a
        # conflict; "Operation … is currently upgrading cluster c. Please wait and try again once it is done" (one
        # mutating operation per cluster, GKE's own upgrades and repairs included) is transient
        return ConflictError(message) if "fingerprint" in message.lower() else TransientError(message)
    if isinstance(e, gexc.Conflict):  # 409 / ALREADY_EXISTS, ABORTED: another writer was first
        return ConflictError(message)
    if rate_limited(e):  # per-minute quotas and 429: wait and retry (the reconciler backs off)
        return RateLimited(f"{message} (rate limited, retrying later)")
    if isinstance(e, (gexc.BadRequest, gexc.MethodNotImplemented)):  # 400 / INVALID_ARGUMENT, 501: a bad request
        return PermanentError(message)
    if isinstance(e, (gexc.Forbidden, gexc.Unauthorized)):
        # 403 / PERMISSION_DENIED: a missing permission ("Required 'compute.instanceGroupManagers.update'
        # permission"), a quota ("Insufficient regional quota … resource "CPUS"", Compute "quotaExceeded"); 401 /
        # UNAUTHENTICATED: no valid identity. Compute over REST raises Forbidden/Unauthorized, GKE over gRPC their
        # PermissionDenied/Unauthenticated subclasses. Permanent; a step that concerns no lab narrows it (StepRefused)
        return PermanentError(message)
    return TransientError(message)  # 5xx / UNAVAILABLE, DEADLINE_EXCEEDED, RetryError, the rest
