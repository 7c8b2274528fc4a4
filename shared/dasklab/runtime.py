"""Wiring: build the controller (backend + event sink) for the configured backend, importing SDKs lazily."""

import os
from pathlib import Path

from dasklab.core.config import Config, check_node_service_account, current
from dasklab.core.reconcile import Controller


def build_events(config: Config):
    """Status events go to the status topic when Pub/Sub is reachable (cloud or emulator), else to a file."""
    if config.backend == "gke" or os.environ.get("PUBSUB_EMULATOR_HOST"):
        from dasklab.adapters.pubsub import PubSubEvents
        return PubSubEvents(config.project or "dasklab-local", config.status_topic)
    from dasklab.adapters.files import FileEvents
    return FileEvents(Path(config.home) / "status.jsonl")


def build_backend(config: Config):
    if config.backend == "local":
        from dasklab.adapters.local import LocalBackend
        return LocalBackend(config.home)
    from dasklab.adapters.gke import GkeBackend
    return GkeBackend.from_config(config)


def build_tombstones(config: Config):
    """Where stop-labs outlive their labs: files under DASKLAB_HOME locally, Firestore on Google Cloud."""
    if config.backend == "local":
        from dasklab.adapters.files import FileTombstones
        return FileTombstones(config.home)
    from dasklab.adapters.firestore import FirestoreTombstones
    return FirestoreTombstones(config.project, config.firestore_database)


def build_classes(config: Config):
    """Where class records live: files under DASKLAB_HOME locally, Firestore on Google Cloud."""
    if config.backend == "local":
        from dasklab.adapters.files import FileClasses
        return FileClasses(config.home)
    from dasklab.adapters.firestore import FirestoreClasses
    return FirestoreClasses(config.project, config.firestore_database)


def build_wakeups(config: Config):
    """A class's one-off wake-ups: files the local timer fires; on GKE, one-off Cloud Scheduler jobs in the
    functions' region publishing on the timers' topic."""
    if config.backend == "local":
        from dasklab.local.timers import FileWakeups
        return FileWakeups(config.home)
    from dasklab.adapters.scheduler import SchedulerWakeups
    return SchedulerWakeups(config.project, config.region, config.tick_topic)


def build_reports(config: Config):
    """What was reported once (a contained lab's lab-degraded): files locally, Firestore on Google Cloud."""
    if config.backend == "local":
        from dasklab.adapters.files import FileReports
        return FileReports(config.home)
    from dasklab.adapters.firestore import FirestoreReports
    return FirestoreReports(config.project, config.firestore_database)


def build_dead_letters(config: Config):
    """The dead-letter subscription where Pub/Sub is reachable (cloud or emulator); by direct push, the files the
    local pusher keeps what it gave up on in."""
    if config.backend == "gke" or os.environ.get("PUBSUB_EMULATOR_HOST"):
        from dasklab.adapters.pubsub import PubSubDeadLetters
        return PubSubDeadLetters(config.project or "dasklab-local", config.dead_letter_subscription)
    from dasklab.adapters.files import FileDeadLetters
    return FileDeadLetters(config.home)


def build_controller(config: Config | None = None) -> Controller:
    """The controller; on GKE its configuration must name the lab nodes' own service account (it creates clusters)."""
    config = config or current()
    if config.backend == "gke":
        check_node_service_account(config)
    return Controller(build_backend(config), build_events(config), config, tombstones=build_tombstones(config),
                      classes=build_classes(config), wakeups=build_wakeups(config), reports=build_reports(config),
                      dead_letters=build_dead_letters(config))
