"""Cloud Function entry points: a Pub/Sub CloudEvent (decoded, validated, to the controller), an HTTPS command."""

import functions_framework

from dasklab.entry import handle_command, handle_event


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


@functions_framework.http
def command(request):
    """A person's command over HTTPS (IAM-authenticated): the verified caller becomes its `sender`, then the control
    topic. Answers 202 with the message id, or the refusal naming the field and rule."""
    code, answer = handle_command(request.headers.get("Authorization", ""), request.get_data(),
                                  request.headers.get("X-Request-Id", ""))
    return answer, code
