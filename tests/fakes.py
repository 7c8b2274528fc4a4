"""An in-memory Backend for core-level properties (interleavings, fault injection): GKE-like semantics —
operations take several observations, deletion is refused while creating — without processes or clouds."""

import json
from dataclasses import dataclass, field, replace

from dasklab.adapters.dashboard import Dashboard
from dasklab.core.errors import ConflictError, PermanentError, RecordUnreadable, TransientError
from dasklab.core.model import NO_JUPYTER, JupyterActivity, Lab, WorkerInfo
from dasklab.core.policy import Infra

POLLS = 2  # observations an operation takes


@dataclass
class FakeLoad:
    adaptive_target: int = 0
    processing: int = 0
    queued: int = 0
    clients: int = 0
    idle_since: float | None = 0.0


@dataclass
class FakeLab:
    record: dict
    version: int = 1
    cluster: str = "absent"
    release: str = "absent"
    polls: int = 0
    workers: list = field(default_factory=list)
    next_worker: int = 0
    revision: int = 1  # the revision its (fake) release runs
    load: FakeLoad = field(default_factory=FakeLoad)
    jupyter: JupyterActivity = NO_JUPYTER
    problems: list = field(default_factory=list)  # WorkerProblems fetch_worker_health reports


class FakeTransport:
    """Serves the scheduler's HTTP API from the fake lab's load and workers."""

    def __init__(self, lab: FakeLab):
        self.lab = lab

    def get(self, path: str) -> bytes:
        import json
        load, workers = self.lab.load, self.lab.workers
        body = {"/json/counts.json": {"workers": len(workers), "processing": load.processing, "waiting": load.queued,
                                      "unrunnable": 0, "clients": load.clients + 1,
                                      "desired_workers": load.adaptive_target},
                "/api/v1/adaptive_target": {"workers": load.adaptive_target},
                "/api/v1/check_idle": {"idle_since": load.idle_since},
                "/api/v1/get_workers": {"workers": [{"name": w.name, "address": w.address} for w in workers]},
                "/json/identity.json": {"workers": {}}}[path]
        return json.dumps(body).encode()

    def post(self, path: str, body: bytes) -> bytes:
        import json
        gone = set(json.loads(body)["workers"])
        self.lab.workers = [w for w in self.lab.workers if w.address not in gone]
        return json.dumps({a: {} for a in gone}).encode()


class FakeBackend:
    def __init__(self):
        self.labs: dict[str, FakeLab] = {}
        self.unmanaged: set[str] = set()
        self.unreadable: dict = {}  # (kind, name) → why the last listing could not read it

    def _lab(self, rec: FakeLab) -> Lab:
        return Lab.from_dict(rec.record, str(rec.version))

    def _get(self, lab: Lab) -> FakeLab:
        if lab.name not in self.labs:
            raise TransientError(f"{lab.name} vanished")
        return self.labs[lab.name]

    def fetch_labs(self):
        """Every record that reads; one that does not is left out and kept in `unreadable` (as the real backends)."""
        labs, poisoned = [], {}
        for name, rec in self.labs.items():
            try:
                labs.append(self._lab(rec))
            except RecordUnreadable as e:
                poisoned[("lab", name)] = e
        self.unreadable = {**{k: v for k, v in self.unreadable.items() if not isinstance(v, RecordUnreadable)},
                           **poisoned}
        return labs

    def fetch_lab(self, name):
        if name in self.unmanaged:
            raise PermanentError(f"{name} is not managed by dasklab")
        return self._lab(self.labs[name]) if name in self.labs else None

    def fetch_infra(self, lab):
        rec = self._get(lab)
        if rec.cluster in ("creating", "deleting") or rec.release == "installing":
            rec.polls += 1
            if rec.polls >= POLLS:
                rec.polls = 0
                if rec.cluster == "creating":
                    rec.cluster = "running"
                elif rec.cluster == "deleting":
                    rec.cluster, rec.release, rec.workers = "absent", "absent", []
                elif rec.release == "installing":
                    rec.release = "deployed"
        return Infra(rec.cluster, rec.release)

    def fetch_requested(self, lab):
        return len(self._get(lab).workers)

    def fetch_worker_health(self, lab):
        return tuple(self._get(lab).problems)

    def dashboard(self, lab):
        return Dashboard(FakeTransport(self._get(lab)), node_of=lambda name: name.split("-")[0])

    def fetch_jupyter(self, lab):
        return self._get(lab).jupyter

    def apply_create(self, lab):
        if lab.name in self.labs:
            return False
        self.labs[lab.name] = FakeLab(lab.to_dict())
        return True

    def apply_provision(self, lab):
        rec = self._get(lab)
        if rec.cluster == "absent":
            rec.cluster = "creating"

    def apply_record(self, lab):
        rec = self._get(lab)
        if str(rec.version) != lab.version:
            raise ConflictError(f"{lab.name}: stale version {lab.version}")
        rec.record, rec.version = lab.to_dict(), rec.version + 1
        return self._lab(rec)

    def apply_install(self, lab):
        rec = self._get(lab)
        if rec.release == "absent":
            rec.release = "installing"
        self.apply_workers(lab, lab.state.target_workers)

    def apply_workers(self, lab, target):
        rec = self._get(lab)
        per_node = lab.spec.workers_per_node
        while len(rec.workers) < target:
            i = rec.next_worker
            rec.next_worker += 1
            rec.workers.append(WorkerInfo(f"tcp://w{i}", f"n{len(rec.workers) // per_node}-w{i}",
                                          f"n{len(rec.workers) // per_node}"))

    def apply_scale_down(self, lab, addresses, target):
        self.dashboard(lab).apply_retire(addresses)

    def apply_settle(self, lab):
        pass

    def apply_environment(self, spec):
        pass

    def apply_update(self, lab):
        rec = self._get(lab)  # replaced at once: the in-memory lab has no environment to change
        done, rec.revision = rec.revision == lab.spec.revision, lab.spec.revision
        return done

    def apply_delete(self, lab):
        rec = self._get(lab)
        if rec.cluster == "creating":
            raise TransientError("cluster is being created: wait before deleting")
        if rec.cluster != "absent":
            rec.cluster = "deleting"

    def apply_forget(self, lab):
        rec = self.labs.get(lab.name)
        if rec is not None and str(rec.version) != lab.version:
            raise ConflictError(f"{lab.name}: stale version {lab.version}")
        return self.labs.pop(lab.name, None) is not None

    def connection_info(self, lab):
        return {"dashboard": f"fake://{lab.name}"}


class ListEvents:
    def __init__(self):
        self.events = []

    def publish(self, event):
        self.events.append(event)


class FileLabRecords:
    """records.LabRecords in files (one JSON file per lab in `root`, a lock file for compare-and-swap), for a
    benchmark whose processes share the records without the Firestore emulator; tests use FirestoreLabRecords."""

    def __init__(self, root):
        from pathlib import Path
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _locked(self):
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def lock():
            with open(self.root / ".lock", "w") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                yield
        return lock()

    def _read(self, name: str):
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _write(self, lab, count: int):
        data = {"version": count, "class": lab.spec.class_name if lab.spec.placement == "shared" else "",
                "record": json.dumps(lab.to_dict())}
        (self.root / f"{lab.name}.json").write_text(json.dumps(data))
        return replace(lab, version=f"file:{count}")

    def fetch_records(self, class_name=None):
        from dasklab.adapters.records import decode_record
        from dasklab.core.errors import RecordUnreadable
        labs, unreadable = [], {}
        for path in sorted(self.root.glob("*.json")):
            data = json.loads(path.read_text())
            if class_name is not None and data["class"] != class_name:
                continue
            try:
                labs.append(decode_record(path.stem, data["record"], f"file:{data['version']}"))
            except RecordUnreadable as e:
                unreadable[path.stem] = e.reason
        return labs, unreadable

    def fetch_record(self, name):
        from dasklab.adapters.records import decode_record
        data = self._read(name)
        return data and decode_record(name, data["record"], f"file:{data['version']}")

    def apply_create(self, lab):
        with self._locked():
            return None if self._read(lab.name) else self._write(lab, 1)

    def apply_record(self, lab):
        with self._locked():
            data = self._read(lab.name)
            if data is None or lab.version != f"file:{data['version']}":
                raise ConflictError(f"lab {lab.name} changed since it was read (version {lab.version})")
            return self._write(lab, data["version"] + 1)

    def apply_forget(self, lab):
        with self._locked():
            data = self._read(lab.name)
            if data is None:
                return False
            if lab.version != f"file:{data['version']}":
                raise ConflictError(f"lab {lab.name} changed since it was read (version {lab.version})")
            (self.root / f"{lab.name}.json").unlink()
            return True
