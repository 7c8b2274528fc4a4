"""Pub/Sub adapter: publish commands and status events, set up topics and subscriptions (cloud or emulator)."""

import json
from functools import lru_cache

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from dasklab.core.errors import PermanentError, TransientError

ACK_DEADLINE_S = 600  # the longest Pub/Sub allows: a reconcile tick polls for about a minute


@lru_cache(maxsize=1)
def publisher() -> pubsub_v1.PublisherClient:
    return pubsub_v1.PublisherClient()


@lru_cache(maxsize=1)
def subscriber() -> pubsub_v1.SubscriberClient:
    return pubsub_v1.SubscriberClient()


def topic_path(project: str, topic: str) -> str:
    return publisher().topic_path(project, topic)


def publish(project: str, topic: str, payload: dict, timeout: float = 30.0, **attributes: str) -> str:
    """Publish one JSON message; returns its message id."""
    future = publisher().publish(topic_path(project, topic), json.dumps(payload).encode(), **attributes)
    try:
        return future.result(timeout=timeout)
    except (gexc.GoogleAPICallError, TimeoutError) as e:
        raise TransientError(f"publish to {topic} failed: {e}") from e


EVENT_ATTRIBUTES = ("event", "lab", "class", "message_id", "request_id")  # copied to attributes: subscription filters read them


class PubSubEvents:
    """Status events published as JSON on the status topic, with their kind, lab and command ids as attributes."""

    def __init__(self, project: str, topic: str):
        self.project, self.topic = project, topic

    def publish(self, event: dict) -> None:
        publish(self.project, self.topic, event, **{k: str(event[k]) for k in EVENT_ATTRIBUTES if event.get(k)})


def ensure_topic(project: str, topic: str) -> bool:
    """Create the topic if missing; True if it was created."""
    try:
        publisher().create_topic(name=topic_path(project, topic))
        return True
    except gexc.AlreadyExists:
        return False


def ensure_subscription(project: str, topic: str, name: str, push_endpoint: str | None = None,
                        dead_letter_topic: str | None = None) -> bool:
    """Create a pull (or push, with an endpoint) subscription if missing; True if it was created.

    A push subscription retries failures with backoff (without a policy the emulator redelivers every
    second) and, given a dead-letter topic, gives up after 10 attempts as the deployed trigger does.
    """
    request = {"name": subscriber().subscription_path(project, name), "topic": topic_path(project, topic),
               "ack_deadline_seconds": ACK_DEADLINE_S}
    if push_endpoint:
        request["push_config"] = {"push_endpoint": push_endpoint}
        request["retry_policy"] = {"minimum_backoff": {"seconds": 10}, "maximum_backoff": {"seconds": 600}}
    if dead_letter_topic:
        request["dead_letter_policy"] = {"dead_letter_topic": topic_path(project, dead_letter_topic),
                                         "max_delivery_attempts": 10}
    try:
        subscriber().create_subscription(request=request)
        return True
    except gexc.AlreadyExists:
        return False


REPLY_TTL_S = 24 * 3600  # the shortest expiration Pub/Sub allows: a reply subscription left behind goes by itself
REPLY_RETENTION_S = 600  # the shortest message retention Pub/Sub allows


def open_reply_subscription(project: str, topic: str, name: str, request_id: str) -> None:
    """A short-lived pull subscription on the status topic for the events of one request: the filter keeps only
    those with attribute request_id (Google Cloud applies it; the emulator ignores filters, so callers filter too)."""
    request = {"name": subscriber().subscription_path(project, name), "topic": topic_path(project, topic),
               "filter": f'attributes.request_id = "{request_id}"', "ack_deadline_seconds": 10,
               "expiration_policy": {"ttl": {"seconds": REPLY_TTL_S}},
               "message_retention_duration": {"seconds": REPLY_RETENTION_S}}
    try:
        subscriber().create_subscription(request=request)
    except gexc.PermissionDenied as e:
        raise PermanentError(f"cannot subscribe to {topic} for the command's outcome ({e.message}): you need "
                             f"the role dasklabOperator and roles/pubsub.subscriber on {topic} (infra/iam.yaml: "
                             "operator), or pass --no-wait") from e
    except gexc.NotFound as e:
        raise PermanentError(f"topic {topic} not found in {project}: run `dasklab infra apply` first") from e
    except (gexc.GoogleAPICallError, gexc.RetryError) as e:
        raise TransientError(f"subscribe to {topic}: {e}") from e


def close_reply_subscription(project: str, name: str) -> None:
    """Delete a reply subscription (gone already: nothing to do)."""
    try:
        subscriber().delete_subscription(subscription=subscriber().subscription_path(project, name))
    except gexc.NotFound:
        pass
    except (gexc.GoogleAPICallError, gexc.RetryError) as e:
        raise TransientError(f"delete subscription {name} (it expires by itself within a day): {e}") from e


def pull(project: str, subscription: str, max_messages: int = 100, timeout: float = 5.0) -> list[dict]:
    """Pull and acknowledge what is waiting on a subscription; returns the decoded JSON bodies."""
    path = subscriber().subscription_path(project, subscription)
    try:
        response = subscriber().pull(request={"subscription": path, "max_messages": max_messages},
                                     timeout=timeout)
    except gexc.DeadlineExceeded:
        return []
    except (gexc.GoogleAPICallError, gexc.RetryError) as e:
        raise TransientError(f"pull from {subscription}: {e}") from e
    if response.received_messages:
        subscriber().acknowledge(request={"subscription": path,
                                          "ack_ids": [m.ack_id for m in response.received_messages]})
    return [json.loads(m.message.data) for m in response.received_messages]


def _subscription_error(e: Exception, what: str, subscription: str) -> Exception:
    """Pub/Sub's answers on a subscription the controller reads: gone or forbidden is for an administrator to fix
    (`dasklab infra apply`, infra/iam.yaml); the rest (UNAVAILABLE, DEADLINE_EXCEEDED, …) passes."""
    if isinstance(e, gexc.NotFound):
        return PermanentError(f"{what}: subscription {subscription} not found: run `dasklab infra apply`")
    if isinstance(e, (gexc.PermissionDenied, gexc.Unauthenticated)):
        return PermanentError(f"{what}: {e.message} (infra/iam.yaml: the controller subscribes to {subscription})")
    return TransientError(f"{what} on {subscription}: {e}")


class PubSubDeadLetters:
    """The dead-letter topic's pull subscription (core.backend.DeadLetters): read without acknowledging, each letter
    acknowledged once handled. Its ack deadline (infra) is far longer than a dead-letter pass takes."""

    def __init__(self, project: str, subscription: str, max_messages: int = 50, timeout: float = 3.0):
        self.project, self.subscription = project, subscription
        self.max_messages, self.timeout = max_messages, timeout

    def fetch_dead_letters(self) -> list:
        from dasklab.core.dead_letters import DeadLetter
        path = subscriber().subscription_path(self.project, self.subscription)
        try:
            response = subscriber().pull(request={"subscription": path, "max_messages": self.max_messages},
                                         timeout=self.timeout)
        except gexc.DeadlineExceeded:  # nothing waiting (a pull answers when something comes, or at its deadline)
            return []
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _subscription_error(e, "read the dead letters", self.subscription) from e
        return [DeadLetter(bytes(m.message.data), dict(m.message.attributes), m.message.message_id, m.ack_id)
                for m in response.received_messages]

    def apply_handled(self, letter) -> None:
        path = subscriber().subscription_path(self.project, self.subscription)
        try:
            subscriber().acknowledge(request={"subscription": path, "ack_ids": [letter.handle]})
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _subscription_error(e, "acknowledge a dead letter", self.subscription) from e

    def apply_retry(self, letter) -> None:
        path = subscriber().subscription_path(self.project, self.subscription)
        try:  # a deadline of 0 (a nack): delivered again to the next pull, the next tick's
            subscriber().modify_ack_deadline(request={"subscription": path, "ack_ids": [letter.handle],
                                                      "ack_deadline_seconds": 0})
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _subscription_error(e, "hand back a dead letter", self.subscription) from e
