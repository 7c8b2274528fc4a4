"""Cloud Function entry points: decode the Pub/Sub CloudEvent, validate it, hand it to the controller."""

import functions_framework

from dasklab.entry import handle_event


@functions_framework.cloud_event
def control(cloud_event):
    """Commands (start-lab, update-lab, stop-lab, keep-alive, scale, start-class, stop-class) from the control topic;
    a tick there is refused (ticks come from the timers' topic alone)."""
    handle_event(cloud_event.data, cloud_event["id"], topic="control")


@functions_framework.cloud_event
def ticks(cloud_event):
    """The timers' ticks (reconcile, teardown-idle, nightly-teardown, a class's reconcile-class wake-up) from the
    timers' topic, which only the timers' identity may publish to; a command there is refused."""
    handle_event(cloud_event.data, cloud_event["id"], topic="ticks")
