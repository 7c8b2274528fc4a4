"""Firestore adapter: the GKE backend's tombstones (core.tombstones.Tombstones), one document per stopped lab.

Document `dasklab-tombstones/<lab>`: `stopped_at` (the latest stop-lab's publish time, epoch seconds, kept with
Firestore's server-side `maximum` transform so concurrent or out-of-order stop-labs never lower it) and
`expire_at` (a timestamp 24 h on: a Firestore TTL policy on it deletes old tombstones; reads ignore expired ones
in any case). google-cloud-firestore is imported on first use only, so the function's cold start does not pay.
"""

from datetime import datetime, timezone

from dasklab.core.errors import PermanentError, TransientError
from dasklab.core.tombstones import TOMBSTONE_TTL_S

COLLECTION = "dasklab-tombstones"


def _translate(e: Exception, what: str) -> Exception:
    """Firestore's errors → ours: refusals that retrying cannot fix are permanent, the rest transient."""
    from google.api_core import exceptions as gexc
    permanent = (gexc.PermissionDenied, gexc.Forbidden, gexc.Unauthenticated, gexc.Unauthorized, gexc.NotFound,
                 gexc.InvalidArgument, gexc.BadRequest)
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
