"""Cloud Function entry points: decode the Pub/Sub CloudEvent, validate it, hand it to the controller."""

import functions_framework

from dasklab.entry import handle_event


@functions_framework.cloud_event
def control(cloud_event):
    """Commands (start-lab, update-lab, stop-lab, keep-alive, scale) and timer ticks, all from the control topic."""
    handle_event(cloud_event.data, cloud_event["id"])
