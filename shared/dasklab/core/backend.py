"""The ports the core drives: a lab backend (local processes or GKE) and a status-event sink."""

from typing import Protocol

from dasklab.adapters.dashboard import Dashboard
from dasklab.core.dead_letters import DeadLetter
from dasklab.core.model import JupyterActivity, Lab, LabSpec, WorkerProblem
from dasklab.core.policy import Infra


class Backend(Protocol):
    """Where labs live. Reads re-observe reality; every write is idempotent."""

    # whether the workers install EXTRA_PIP_PACKAGES as they start (GKE: the image's entrypoint), so a new lab's
    # workers are checked for a failed install; False where they are installed before the lab runs (local)
    installs_at_start: bool

    def fetch_labs(self) -> list[Lab]:
        """Every lab this controller manages (resources without the managed-by marker are never listed). What the
        listing found but could not read is left out and kept in the backend's `unreadable`: (kind, name) → the
        error (RecordUnreadable: for good, contained; TransientError: this time only)."""

    def fetch_lab(self, name: str) -> Lab | None:
        """One managed lab, or None; PermanentError if a resource of that name exists but is not managed."""

    def fetch_infra(self, lab: Lab) -> Infra:
        """The state of the lab's cluster and Dask release."""

    def fetch_requested(self, lab: Lab) -> int:
        """How many workers the backend is running or starting (joined or not)."""

    def fetch_worker_health(self, lab: Lab) -> tuple[WorkerProblem, ...]:
        """What is wrong with the lab's workers (killed, crashing, pending, restarting), with log tails; () if nothing."""

    def dashboard(self, lab: Lab) -> Dashboard:
        """The lab's scheduler HTTP API, reached the backend's secure way."""

    def fetch_jupyter(self, lab: Lab) -> JupyterActivity:
        """What the lab's Jupyter Server reports (NO_JUPYTER if the lab runs none); JupyterUnreachable otherwise."""

    def apply_create(self, lab: Lab) -> bool:
        """Create the lab resource (and start provisioning where that is one call); False if it exists."""

    def apply_provision(self, lab: Lab) -> None:
        """(Re)start creating the lab's cluster; idempotent."""

    def apply_record(self, lab: Lab) -> Lab:
        """Store spec and state if `lab.version` is still current (ConflictError otherwise)."""

    def apply_install(self, lab: Lab) -> None:
        """Install (or resume installing) the Dask release with the lab's initial workers."""

    def apply_workers(self, lab: Lab, target: int) -> None:
        """Raise the worker pool (and the nodes under it) to `target` workers."""

    def apply_scale_down(self, lab: Lab, addresses: list[str], target: int) -> None:
        """Retire exactly these workers through the scheduler, then remove them and the nodes they empty."""

    def apply_settle(self, lab: Lab) -> None:
        """Workers are where the target wants them: finish what a scaling step left (e.g. after a crash)."""

    def apply_environment(self, spec: LabSpec) -> None:
        """Make the software environment the spec's values ask for available before they are recorded (the local
        lab installs EXTRA_PIP_PACKAGES into its own venv; PermanentError with pip's tail if that fails). On GKE
        the images install them at container start: nothing to do."""

    def apply_update(self, lab: Lab) -> bool:
        """One step toward running the recorded revision (`lab.spec.revision`) everywhere: a new Helm revision on
        GKE; replacement workers, then retiring the old ones, locally. True once it runs everywhere."""

    def apply_delete(self, lab: Lab) -> None:
        """Delete the lab's infrastructure (idempotent; TransientError while that cannot happen yet)."""

    def apply_forget(self, lab: Lab) -> bool:
        """Drop what is left of the lab's record once its infrastructure is gone; False if another invocation
        already did (so the decision is logged once), ConflictError if the record changed since it was read."""

    def connection_info(self, lab: Lab) -> dict:
        """How a person reaches the lab's Jupyter and dashboard (never a secret)."""


class Reports(Protocol):
    """What has been reported once, in a store that outlives function instances (Firestore; files locally)."""

    def fetch_reported(self, key: str, now: float) -> bool: ...

    def apply_reported(self, key: str, now: float) -> None: ...

    def fetch_last_error(self, key: str, now: float) -> dict | None:
        """The last error kept under `key` ({"error", "message_id", "at"}), None if none (or expired)."""

    def apply_last_error(self, key: str, error: dict, now: float) -> None:
        """Keep a failing message's last error (the entry point, before Pub/Sub redelivers it) for the dead-letter
        pass, which finds it by the same key (core.dead_letters.failure_key)."""


class DeadLetters(Protocol):
    """The messages Pub/Sub gave up on: a pull subscription on the dead-letter topic."""

    def fetch_dead_letters(self) -> list[DeadLetter]:
        """What waits there now (not yet acknowledged); [] if nothing."""

    def apply_handled(self, letter: DeadLetter) -> None:
        """Acknowledge a letter once it is handled (TransientError: it is read again later)."""

    def apply_retry(self, letter: DeadLetter) -> None:
        """Hand back a letter that could not be handled, for the next tick (failing that, its ack deadline does)."""


class Events(Protocol):
    """Where status events (lab ready, failed, deleted) are published."""

    def publish(self, event: dict) -> None: ...
