"""Firestore adapter: the GKE backend's tombstones (core.tombstones.Tombstones), one document per stopped lab, its
class records (core.classes.Classes), one document per class, and what it reported once (failed creations).

Document `dasklab-tombstones/<lab>`: `stopped_at` (the latest stop-lab's publish time, epoch seconds, kept with
Firestore's server-side `maximum` transform so concurrent or out-of-order stop-labs never lower it) and
`expire_at` (a timestamp 24 h on: a Firestore TTL policy on it deletes old tombstones; reads ignore expired ones
in any case). google-cloud-firestore is imported on first use only, so the function's cold start does not pay.
"""

from datetime import datetime, timezone

from dasklab.core.classes import merge_usage
from dasklab.core.errors import ConflictError, PermanentError, TransientError
from dasklab.core.dead_letters import LAST_ERROR_TTL_S
from dasklab.core.tombstones import TOMBSTONE_TTL_S

COLLECTION = "dasklab-tombstones"
DELETE = "delete"
CLASSES = "dasklab-classes"  # `<class>`: {"version": n, "record": ClassRecord.to_dict()}
REPORTED = "dasklab-reported"  # `<key>`: {"reported_at": epoch s, "expire_at": timestamp} — an event published once
REPORTED_TTL_S = 30 * 86400  # longer than GKE keeps a finished operation listed (its evidence)
FAILURES = "dasklab-failures"  # `<key>`: {"error", "message_id", "at", "expire_at"} — a failing message's last error


def _translate(e: Exception, what: str) -> Exception:
    """Firestore's table (its own: a document read never raises NotFound, so a NotFound here is the database or
    project itself, not an object a step could find gone): refusals that retrying cannot fix are permanent, the rest
    transient (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED contention, RESOURCE_EXHAUSTED: retried by redelivery)."""
    from google.api_core import exceptions as gexc
    permanent = (gexc.PermissionDenied, gexc.Forbidden,  # 403: the function's identity lacks datastore.* roles
                 gexc.Unauthenticated, gexc.Unauthorized,  # 401: no valid identity
                 gexc.NotFound,  # 404: "The database (default) does not exist for project p"
                 gexc.InvalidArgument, gexc.BadRequest)  # 400: a request this code built wrong
    kind = PermanentError if isinstance(e, permanent) else TransientError
    return kind(f"{what}: {e}")


class FirestoreTombstones:
    """Tombstones in Firestore (Native mode) database `database` of `project`; FIRESTORE_EMULATOR_HOST is honoured."""

    def __init__(self, project: str, database: str = "(default)", client=None):
        self.project, self.database, self._client = project, database, client

    def _db(self):
        if self._client is None:
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import firestore
            try:
                self._client = firestore.Client(project=self.project, database=self.database)
            except DefaultCredentialsError as e:  # no identity to reach Firestore with: not fixed by a retry
                raise PermanentError(f"Firestore client for project {self.project}: {e}") from e
        return self._client

    def fetch_stopped(self, lab: str, now: float) -> float | None:
        from google.api_core import exceptions as gexc
        try:
            doc = self._db().document(f"{COLLECTION}/{lab}").get()
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"read the tombstone of {lab}") from e
        stopped = doc.get("stopped_at") if doc.exists else None
        return float(stopped) if stopped is not None and stopped + TOMBSTONE_TTL_S > now else None

    def apply_stopped(self, lab: str, published: float, now: float) -> None:
        from google.api_core import exceptions as gexc
        from google.cloud import firestore
        expire = datetime.fromtimestamp(max(now, published) + TOMBSTONE_TTL_S, timezone.utc)
        try:  # one Commit: an upsert whose maximum transform keeps the latest stop-lab
            self._db().document(f"{COLLECTION}/{lab}").set(
                {"lab": lab, "stopped_at": firestore.Maximum(published), "expire_at": expire}, merge=True)
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"write the tombstone of {lab}") from e


class FirestoreReports(FirestoreTombstones):
    """What has been reported once (gke.Reports): documents `dasklab-reported/<key>`, expiring after
    REPORTED_TTL_S (the same TTL policy field as the tombstones')."""

    def fetch_reported(self, key: str, now: float) -> bool:
        from google.api_core import exceptions as gexc
        try:
            doc = self._db().document(f"{REPORTED}/{key}").get()
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"read whether {key} was reported") from e
        return doc.exists and doc.get("reported_at") + REPORTED_TTL_S > now

    def apply_reported(self, key: str, now: float) -> None:
        from google.api_core import exceptions as gexc
        expire = datetime.fromtimestamp(now + REPORTED_TTL_S, timezone.utc)
        try:
            self._db().document(f"{REPORTED}/{key}").set({"reported_at": now, "expire_at": expire})
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"record that {key} was reported") from e


    def fetch_last_error(self, key: str, now: float) -> dict | None:
        from google.api_core import exceptions as gexc
        try:
            doc = self._db().document(f"{FAILURES}/{key}").get()
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"read the last error of {key}") from e
        if not doc.exists or doc.get("at") + LAST_ERROR_TTL_S <= now:
            return None
        return {k: v for k, v in doc.to_dict().items() if k != "expire_at"}

    def apply_last_error(self, key: str, error: dict, now: float) -> None:
        from google.api_core import exceptions as gexc
        expire = datetime.fromtimestamp(now + LAST_ERROR_TTL_S, timezone.utc)
        try:
            self._db().document(f"{FAILURES}/{key}").set({**error, "at": now, "expire_at": expire})
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, f"keep the last error of {key}") from e


class FirestoreClasses(FirestoreTombstones):
    """Class records in Firestore: each write is a transaction that checks the version it read (optimistic, like the
    labs' records), so two invocations never overwrite each other's decisions."""

    def _ref(self, name: str):
        return self._db().document(f"{CLASSES}/{name}")

    def _call(self, what: str, fn):
        from google.api_core import exceptions as gexc
        try:
            return fn()
        except ConflictError:
            raise
        except (gexc.Aborted, gexc.Conflict) as e:  # a concurrent transaction won: retried with a fresh read
            raise ConflictError(f"{what}: {e}") from e
        except ValueError as e:  # firestore.transactional wraps an Aborted commit, its attempts used up, in one
            if isinstance(e.__cause__, (gexc.Aborted, gexc.Conflict)):
                raise ConflictError(f"{what}: {e.__cause__}") from e
            raise
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, what) from e

    def fetch_classes(self) -> list:
        from dasklab.core.classes import ClassRecord
        docs = self._call("list the classes", lambda: list(self._db().collection(CLASSES).stream()))
        return [ClassRecord.from_dict(_folded(d.get("record")), str(d.get("version"))) for d in docs]

    def fetch_class(self, name: str):
        from dasklab.core.classes import ClassRecord
        doc = self._call(f"read class {name}", lambda: self._ref(name).get())
        return ClassRecord.from_dict(_folded(doc.get("record")), str(doc.get("version"))) if doc.exists else None

    def _transact(self, name: str, what: str, change) -> int | None:
        """Run change(current data or None) → new data (None: write nothing; DELETE) in one transaction; the new
        version."""
        from google.cloud import firestore

        @firestore.transactional
        def run(tx):
            doc = self._ref(name).get(transaction=tx)
            data = change(doc.to_dict() if doc.exists else None)
            if data == DELETE:
                tx.delete(self._ref(name))
            elif data is not None:
                tx.set(self._ref(name), data)
                return data["version"]
            return None

        return self._call(what, lambda: run(self._db().transaction(max_attempts=1)))

    def apply_class(self, record):
        from dataclasses import replace

        def change(current):
            version = str(current["version"]) if current else ""
            if version != record.version:
                raise ConflictError(f"class {record.name} changed since it was read (version {record.version})")
            return {"version": int(version or 0) + 1, "record": record.to_dict()}

        return replace(record, version=str(self._transact(record.name, f"write class {record.name}", change)))

    def apply_usage(self, name: str, student: str, usage: dict) -> None:
        """One field update, no transaction: the lab's figures as one run of the student's (`runs`, keyed by its
        creation time: a redelivery replaces it), the totals folded from the runs on read (merge_usage). The labs
        of a class torn down in one pass (66 of 100 in tests/test_gke_class_scale.py) write at once, and
        transactions on the one document abort each other for minutes; an update is atomic, and it moves the
        version, so a stale record cannot erase it."""
        from google.api_core import exceptions as gexc
        from google.cloud import firestore
        from google.cloud.firestore_v1.field_path import FieldPath
        run = {k: v for k, v in usage.items() if k != "runs"}
        field = FieldPath("record", "usage", student, "runs", str(usage.get("created_at") or "-")).to_api_repr()

        def write():
            try:
                self._ref(name).update({field: run, "version": firestore.Increment(1)})
            except gexc.NotFound:  # the class is gone: nothing to keep
                pass

        self._call(f"record {student}'s usage in class {name}", write)

    def apply_forget_class(self, record) -> None:
        def change(current):
            if current is not None and str(current["version"]) != record.version:
                raise ConflictError(f"class {record.name} changed since it was read (version {record.version})")
            return DELETE if current is not None else None

        self._transact(record.name, f"forget class {record.name}", change)


def _folded(record: dict | None) -> dict | None:
    """The record with each student's usage as merge_usage gives it, from its runs (apply_usage adds a run by a
    field update, leaving the totals beside it to be folded here)."""
    if not record or not record.get("usage"):
        return record
    usage = {}
    for student, kept in record["usage"].items():
        runs = (kept or {}).get("runs")
        if not runs:
            usage[student] = kept
            continue
        folded = None
        for run in sorted(runs.values(), key=lambda u: u.get("created_at") or 0.0):
            folded = merge_usage(folded, run)
        usage[student] = folded
    return {**record, "usage": usage}
