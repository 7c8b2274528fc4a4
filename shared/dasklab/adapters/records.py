"""Lab records adapter: where the GKE backend keeps each lab's spec and state (LabRecords), in Firestore.

Document `dasklab-labs/<lab>`: `lab`, `class` (the class whose shared cluster holds the lab, "" for a cluster of its
own) and `record`, the JSON of `Lab.to_dict()` (chart values, env and notes included: they stay in this private
store, never on a cloud resource's labels). `Lab.version` is ``fs:<the document's update_time>``: a write is a
single commit with Firestore's `last_update_time` precondition (compare-and-swap; a stale version → ConflictError),
a creation one `create` (which fails if the document exists). The document outlives the lab's cluster (a failed
creation GKE removed), until `apply_forget` once the infrastructure is gone.
"""

import json
from typing import Protocol

from dasklab.core.errors import ConflictError, RecordUnreadable
from dasklab.core.model import SHARED, Lab
from dasklab.adapters.firestore import FirestoreTombstones, _translate

LABS = "dasklab-labs"
STORE = "fs"


class LabRecords(Protocol):
    """A store of lab records with compare-and-swap writes on `Lab.version`."""

    def fetch_records(self, class_name: str | None = None) -> tuple[list[Lab], dict[str, str]]:
        """Every lab's record (or a class's labs'), and {lab name: why it cannot be read} for those left out."""

    def fetch_record(self, name: str) -> Lab | None:
        """One lab's record, None if there is none; RecordUnreadable if it cannot be read."""

    def apply_create(self, lab: Lab) -> Lab | None:
        """Store a new record; None if one of that name exists (another invocation created it)."""

    def apply_record(self, lab: Lab) -> Lab:
        """Replace the record if `lab.version` is still current (ConflictError otherwise); with its new version."""

    def apply_forget(self, lab: Lab) -> bool:
        """Delete the record; False if it is already gone, ConflictError if it changed since it was read."""


def decode_record(name: str, text, version: str) -> Lab:
    """A stored record → Lab; RecordUnreadable (naming the lab) if it is not JSON or not a record this version
    knows (a key it does not have, a missing one)."""
    try:
        return Lab.from_dict(json.loads(text), version)
    except RecordUnreadable:
        raise
    except (ValueError, KeyError, TypeError) as e:  # json's decode errors are ValueErrors
        raise RecordUnreadable(name, f"{type(e).__name__}: {e}") from e


class FirestoreLabRecords(FirestoreTombstones):
    """LabRecords in the project's Firestore database (FIRESTORE_EMULATOR_HOST is honoured)."""

    def _ref(self, name: str):
        return self._db().document(f"{LABS}/{name}")

    def _call(self, what: str, fn):
        from google.api_core import exceptions as gexc
        try:
            return fn()
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise _translate(e, what) from e

    @staticmethod
    def _version(update_time) -> str:
        return f"{STORE}:{update_time.rfc3339()}"

    @staticmethod
    def _data(lab: Lab) -> dict:
        return {"lab": lab.name, "class": lab.spec.class_name if lab.spec.placement == SHARED else "",
                "record": json.dumps(lab.to_dict(), sort_keys=True)}

    def fetch_records(self, class_name: str | None = None) -> tuple[list[Lab], dict[str, str]]:
        def read():
            query = self._db().collection(LABS)
            if class_name is not None:
                from google.cloud.firestore_v1.base_query import FieldFilter
                query = query.where(filter=FieldFilter("class", "==", class_name))
            return list(query.stream())

        labs, unreadable = [], {}
        for doc in self._call("list the lab records", read):
            try:
                labs.append(decode_record(doc.id, doc.get("record"), self._version(doc.update_time)))
            except (RecordUnreadable, KeyError) as e:  # KeyError: the document has no `record` field
                unreadable[doc.id] = getattr(e, "reason", None) or f"no record field: {e}"
        return sorted(labs, key=lambda lab: lab.name), unreadable

    def fetch_record(self, name: str) -> Lab | None:
        doc = self._call(f"read the record of lab {name}", lambda: self._ref(name).get())
        if not doc.exists:
            return None
        try:
            text = doc.get("record")
        except KeyError as e:
            raise RecordUnreadable(name, f"no record field: {e}") from e
        return decode_record(name, text, self._version(doc.update_time))

    def apply_create(self, lab: Lab) -> Lab | None:
        from dataclasses import replace
        from google.api_core import exceptions as gexc

        def create():
            try:
                return self._ref(lab.name).create(self._data(lab))
            except gexc.AlreadyExists:
                return None

        written = self._call(f"create the record of lab {lab.name}", create)
        return written and replace(lab, version=self._version(written.update_time))

    def _precondition(self, lab: Lab):
        from google.api_core.datetime_helpers import DatetimeWithNanoseconds
        store, _, token = lab.version.partition(":")
        if store != STORE or not token:
            raise ConflictError(f"lab {lab.name}: version {lab.version!r} is not one of this store's")
        return self._db().write_option(last_update_time=DatetimeWithNanoseconds.from_rfc3339(token))

    def apply_record(self, lab: Lab) -> Lab:
        from dataclasses import replace
        from google.api_core import exceptions as gexc
        option = self._precondition(lab)

        def write():
            try:
                return self._ref(lab.name).update(self._data(lab), option=option)
            except (gexc.FailedPrecondition, gexc.NotFound) as e:  # changed or deleted since it was read
                raise ConflictError(f"lab {lab.name} changed since it was read (version {lab.version}): "
                                    f"{getattr(e, 'message', e)}") from e

        written = self._call(f"write the record of lab {lab.name}", write)
        return replace(lab, version=self._version(written.update_time))

    def apply_forget(self, lab: Lab) -> bool:
        from google.api_core import exceptions as gexc
        option = self._precondition(lab)

        def delete():
            try:
                self._ref(lab.name).delete(option=option)
                return True
            except (gexc.FailedPrecondition, gexc.NotFound) as e:
                if not self._ref(lab.name).get().exists:
                    return False  # another invocation forgot it first
                raise ConflictError(f"lab {lab.name} changed since it was read (version {lab.version}): "
                                    f"{getattr(e, 'message', e)}") from e

        return self._call(f"forget the record of lab {lab.name}", delete)
