"""Structured logging: one JSON line per decision, in the shape Cloud Logging reads from stdout."""

import json
import logging
import sys

logger = logging.getLogger("dasklab")
_SEVERITY = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


def setup(stream=None) -> None:
    """Send dasklab's JSON lines, as they are, to `stream` (stdout by default). Idempotent."""
    if not any(getattr(h, "_dasklab", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._dasklab = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = True


def emit(severity: str = "INFO", **fields) -> dict:
    """Log one decision or event as a JSON line; fields with value None are left out. Returns the entry."""
    entry = {"severity": severity, **{k: v for k, v in fields.items() if v is not None}}
    logger.log(_SEVERITY[severity], json.dumps(entry, default=str, sort_keys=False))
    return entry


def decision(lab: str, action: str, before, after, reason: str, message_id: str | None = None, **extra) -> dict:
    """The line for a decision that changes something: lab, action, from → to, reason, message id."""
    return emit("INFO", lab=lab, action=action, **{"from": before, "to": after}, reason=reason,
                message_id=message_id, **extra)
