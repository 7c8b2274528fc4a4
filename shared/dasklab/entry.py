"""Entry-point glue: a Pub/Sub CloudEvent → decoded, validated command → the controller; errors classified."""

from functools import lru_cache

from dasklab.core import logs
from dasklab.core.errors import PermanentError
from dasklab.core.messages import decode_publish_time, decode_pubsub, parse_command


@lru_cache(maxsize=1)
def controller():
    """The controller for this process's configuration, built on first use so imports stay light."""
    from dasklab import runtime
    return runtime.build_controller()


def handle_event(data, event_id: str = "") -> None:
    """Handle one control-topic message. Permanent errors are logged and acknowledged (return);
    transient ones propagate so Pub/Sub redelivers the message."""
    logs.setup()
    mid = event_id
    try:
        payload, _attributes, mid = decode_pubsub(data)
        mid = mid or event_id
        published = decode_publish_time(data)  # a stop-lab wins over a start-lab published before it
        cmd = parse_command(payload)
        controller().handle(cmd, mid, published=published)
    except PermanentError as e:
        logs.emit("ERROR", action="refused", reason=str(e), field=getattr(e, "field", None), message_id=mid,
                  lab=_lab_of(locals().get("cmd")))


def _lab_of(cmd) -> str | None:
    return getattr(cmd, "lab", None)
