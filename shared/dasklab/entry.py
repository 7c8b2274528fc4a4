"""Entry-point glue: a Pub/Sub CloudEvent → decoded, validated command → the controller; errors classified."""

from functools import lru_cache

from dasklab.core import logs
from dasklab.core.errors import PermanentError
from dasklab.core.messages import CONTROL, check_topic, decode_publish_time, decode_pubsub, parse_command, \
    parse_request_id


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
    mid, request, cmd = event_id, "", None
    try:
        payload, attributes, mid = decode_pubsub(data)
        mid = mid or event_id
        request = parse_request_id(attributes)
        published = decode_publish_time(data)  # a stop-lab wins over a start-lab published before it
        cmd = parse_command(payload)
        check_topic(cmd, topic)  # a forged tick is refused to its sender like any refusal
        controller().handle(cmd, mid, published=published, request_id=request)
    except PermanentError as e:
        logs.emit("ERROR", action="refused", reason=str(e), field=getattr(e, "field", None), message_id=mid,
                  lab=_lab_of(cmd))
        _publish_refusal(e, cmd, mid, request)


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
