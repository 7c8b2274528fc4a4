"""Entry-point glue: a Pub/Sub CloudEvent → decoded, validated command → the controller; an HTTPS command → its
verified sender → the trust rules → the control topic; errors classified."""

from functools import lru_cache

from dasklab.core import logs
from dasklab.core.errors import DasklabError, NotAllowed, PermanentError, TransientError, ValidationError
from dasklab.core.messages import CONTROL, REQUEST_ID, check_topic, decode_publish_time, decode_pubsub, \
    parse_command, parse_request_id
from dasklab.core.trust import SENDER, parse_sender


@lru_cache(maxsize=1)
def controller():
    """The controller for this process's configuration, built on first use so imports stay light."""
    from dasklab import runtime
    return runtime.build_controller()


def handle_event(data, event_id: str = "", topic: str = CONTROL) -> None:
    """Handle one message of `topic` (control: commands; ticks: the timers' ticks, which the control topic refuses).
    Permanent errors are logged, published as the command's outcome and acknowledged (return); transient ones
    propagate so Pub/Sub redelivers the message."""
    logs.setup()
    mid, request, cmd, payload, attributes = event_id, "", None, b"", {}
    try:
        payload, attributes, mid = decode_pubsub(data)
        mid = mid or event_id
        request = parse_request_id(attributes)
        published = decode_publish_time(data)  # a stop-lab wins over a start-lab published before it
        sender = parse_sender(attributes)  # None: an administrator's direct publish (core/trust.py)
        cmd = parse_command(payload)
        check_topic(cmd, topic)  # a forged tick is refused to its sender like any refusal
        controller().handle(cmd, mid, published=published, request_id=request, sender=sender)
    except PermanentError as e:
        logs.emit("ERROR", action="refused", reason=str(e), field=getattr(e, "field", None), message_id=mid,
                  lab=_lab_of(cmd))
        _publish_refusal(e, cmd, mid, request)
    except Exception as e:  # transient or unforeseen: Pub/Sub redelivers it (raise), its last error kept first
        _keep_last_error(e, payload, attributes, mid)
        raise


def _keep_last_error(e: Exception, payload: bytes, attributes: dict, mid: str) -> None:
    """Pub/Sub carries no error: after its last attempt it forwards the message to the dead-letter topic as it
    was. The error of each failed attempt is kept in the reports store (Firestore; files locally), which outlives
    this instance and is where the dead-letter pass of a reconcile tick looks, by a key computed from the message
    as both sides see it (core/dead_letters.py: failure_key). Keeping it must not hide the failure itself."""
    from dasklab.core.dead_letters import build_last_error, failure_key
    try:
        ctl = controller()
        if ctl.reports is not None:
            ctl.reports.apply_last_error(failure_key(payload, attributes),
                                         {"error": build_last_error(e), "message_id": mid},
                                         ctl.clock())
    except DasklabError as kept:  # the store fails too: a dead letter then says no error was kept
        logs.emit("WARNING", action="last-error", reason=f"not kept: {kept}", message_id=mid)


def _publish_refusal(e: PermanentError, cmd, mid: str, request: str) -> None:
    """The refusal, on the status topic for the sender (a failed publish raises: the message is redelivered)."""
    try:
        ctl = controller()
    except PermanentError:  # the controller's own configuration is refused: the log line is all there can be
        return
    ctl.publish_outcome(getattr(cmd, "type", None), _lab_of(cmd), mid, request, "refused", str(e),
                        field=getattr(e, "field", None), rule=getattr(e, "rule", None),
                        **{"class": getattr(cmd, "class_", None)})


def _lab_of(cmd) -> str | None:
    return getattr(cmd, "lab", None)


def handle_command(authorization: str, body: bytes, request_id: str = "") -> tuple[int, dict]:
    """One command over HTTPS: the caller verified from its ID token, the command validated and authorized (the
    trust rules, core/trust.py), then published on the control topic with the verified `sender` attribute.
    Answers (HTTP status, JSON): 202 with the message id; 400/403 naming the field and rule; 401 unauthenticated."""
    from dasklab.adapters.idtokens import Unauthenticated, verify_caller
    from dasklab.core.config import current
    logs.setup()
    cfg, sender, cmd, request = current(), None, None, ""
    try:
        audiences = [cfg.command_url] + [a.strip() for a in cfg.token_audiences.split(",") if a.strip()]
        sender = verify_caller(authorization, audiences, cfg.id_token_certs_url)
        request = parse_request_id({REQUEST_ID: request_id})
        payload = parse_json(body)
        if payload.get("type") in ("start-lab", "start-class"):
            payload.setdefault("owner", sender)  # the verified sender's, unless an administrator names one
        cmd = parse_command(payload)
        controller().authorize(cmd, sender)
        mid = publish_command(payload, {SENDER: sender, **({REQUEST_ID: request} if request else {})})
    except Unauthenticated as e:
        logs.emit("WARNING", action="unauthenticated", reason=str(e))
        return 401, {"outcome": "unauthenticated", "reason": str(e)}
    except PermanentError as e:
        code = 403 if isinstance(e, NotAllowed) else 400 if getattr(e, "field", None) else 500
        logs.emit("ERROR", action="refused", reason=str(e), field=getattr(e, "field", None), sender=sender)
        if request:  # also where a sender waiting on the status topic looks
            _publish_refusal(e, cmd, "", request)
        return code, {k: v for k, v in {"outcome": "refused", "reason": str(e), "field": getattr(e, "field", None),
                                        "rule": getattr(e, "rule", None), "sender": sender}.items() if v}
    except TransientError as e:  # the certificates or the topic did not answer: the caller may send it again
        logs.emit("WARNING", action="retry", reason=str(e), sender=sender)
        return 503, {"outcome": "retry", "reason": str(e)}
    logs.emit("INFO", action="published", reason=f"{cmd.type} from {sender}", message_id=mid, lab=_lab_of(cmd))
    return 202, {"outcome": "published", "message_id": mid, "sender": sender, "request_id": request or None}


def parse_json(body: bytes) -> dict:
    import json
    try:
        payload = json.loads(body or b"")
    except ValueError as e:
        raise ValidationError("data", f"must be a JSON object ({e})") from None
    if not isinstance(payload, dict):
        raise ValidationError("data", "must be a JSON object")
    return payload


def publish_command(payload: dict, attributes: dict) -> str:
    """On the control topic (Google Cloud, or the emulator); with neither (the local lab), straight to this
    process's controller as the topic's push subscription would deliver it (the same handle_event)."""
    import os
    from dasklab.core.config import current
    cfg = current()
    if cfg.backend == "gke" or os.environ.get("PUBSUB_EMULATOR_HOST"):
        from dasklab.adapters import pubsub
        return pubsub.publish(cfg.project or "dasklab-local", cfg.control_topic, payload, **attributes)
    from dasklab.local.serve import push_envelope
    envelope = push_envelope(payload, attributes=attributes)
    handle_event(envelope)
    return envelope["message"]["messageId"]
