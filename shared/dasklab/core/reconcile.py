"""The controller: its ports (backend, events, stores, clock) and the reconcilers that share them — the command
handlers, the fleet pass that schedules the lab and class reconcilers (the shape of controller-runtime and kopf)."""

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from dasklab.core.backend import Backend, DeadLetters, Events, Reports
from dasklab.core.classes import Classes, Wakeups
from dasklab.core.class_reconciler import ClassReconciler
from dasklab.core.commands import Commands
from dasklab.core.config import Config
from dasklab.core.dead_letters import DeadLetterPass
from dasklab.core.fleet import Fleet
from dasklab.core.lab_reconciler import LabReconciler
from dasklab.core.policy import ScaleParams
from dasklab.core.tombstones import Tombstones


@dataclass
class Controller:
    backend: Backend
    events: Events
    config: Config
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    tombstones: Tombstones | None = None  # where stop-labs outlive their labs (None: not remembered)
    classes: Classes | None = None  # class records (None: start-class is refused)
    wakeups: Wakeups | None = None  # one-off timers for a class's `at` and end (None: the reconcile ticks alone)
    reports: Reports | None = None  # what was reported once (a lab's contained failure), in a real store
    dead_letters: DeadLetters | None = None  # commands Pub/Sub gave up on (None: nothing reads them)
    params: ScaleParams = field(init=False)

    def __post_init__(self):
        self.params = ScaleParams(self.config.confirm_s, self.config.cooldown_s, self.config.down_fraction,
                                  warmup_s=self.config.warmup_s)
        self._instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.labs = LabReconciler(self)  # one lab one step
        self.class_steps = ClassReconciler(self)  # one class one step
        self.fleet = Fleet(self)  # ticks: every lab's and class's step, each contained
        self.commands = Commands(self)  # messages → decisions → first steps
        self.dead_letter_pass = DeadLetterPass(self)  # commands Pub/Sub gave up on: said, and a stop carried out

    @property
    def holder(self) -> str:
        """Who holds a lab's lease: this instance's thread (a functions server runs invocations side by side in
        one process; each is an actor of its own)."""
        return f"{self._instance}-{threading.get_ident()}"

    def handle(self, cmd, message_id: str = "", published: float | None = None, request_id: str = "",
               sender: str | None = None) -> None:
        """Run one command or tick (see Commands.handle)."""
        self.commands.handle(cmd, message_id, published, request_id, sender)

    def authorize(self, cmd, sender: str) -> None:
        """The trust rules for this sender and command on the records it names (NotAllowed if refused)."""
        self.commands.authorize(cmd, sender)

    def publish_outcome(self, *args, **extra) -> None:
        self.commands.publish_outcome(*args, **extra)

    def tick(self, cmd, mid: str, published: float | None = None) -> None:
        self.fleet.tick(cmd, mid, published)

    def reconcile_all(self, tick: str, mid: str = "", **kw) -> list[str]:
        return self.fleet.reconcile_all(tick, mid, **kw)

    def reconcile_classes(self, mid: str = "") -> list[str]:
        return self.fleet.reconcile_classes(mid)

    def reconcile_class(self, record, mid: str = "", labs=None) -> bool:
        return self.class_steps.reconcile_class(record, mid, labs)

    def reconcile_lab(self, lab, tick: str, mid: str = "", idle: bool | None = None) -> None:
        self.labs.reconcile_lab(lab, tick, mid, idle)
