"""Local backend adapter: a lab is a real Dask scheduler and worker processes on 127.0.0.1, its record a file."""

import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from dasklab.adapters.files import flocked
from dasklab.core import logs
from dasklab.core.errors import ConflictError, JupyterUnreachable, PermanentError, RecordUnreadable, TransientError
from dasklab.core.environment import jupyter_enabled, jupyter_packages, lab_packages
from dasklab.core.model import MANAGED_BY, NO_JUPYTER, READY, JupyterActivity, Lab, LabSpec, WorkerProblem
from dasklab.core.policy import Infra, plan_rollout
from dasklab.adapters.dashboard import SCHEDULER_HTTP_ROUTES, Dashboard, HttpTransport
from dasklab.adapters.envs import ensure_env
from dasklab.adapters.jupyter import JupyterApi, jupyter_available, start_jupyter, stop_jupyter, write_token
from dasklab.adapters.procs import EXIT_NOTE, LOCALHOST, pid_alive, spawn, stop_pid_group, wait_for_report


SCHEDULER_START_S = 60.0  # until a scheduler writes its scheduler file (the ports it bound)
RETIRE_TIMEOUT_S = 15.0  # a retired worker still running this long after its retirement is stopped
EXITED_KEPT = 20  # workers that died, remembered (name, when) so their logs still say why after they are replaced
# what distributed 2026.8 logs (its default format "%(asctime)s - %(name)s - %(levelname)s - %(message)s"): the
# nanny's memory monitor (worker_memory.NannyMemoryManager) and its note of a worker process's death (Nanny)
_MEMORY_KILL = re.compile(r"\(pid=(\d+)\) exceeded (\d+)% memory budget")
_DEATH = re.compile(r"Worker process (\d+) (exited with status \d+|was killed by (?:unknown )?signal ?\d*)")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def installed_dask_version() -> str:
    """The distributed version a local lab runs: the one installed here (local labs run no image)."""
    return importlib.metadata.version("distributed")


def build_worker_argv(python: str, scheduler: str, name: str, nthreads: int, memory_limit: int) -> list[str]:
    """A local worker as the chart runs one (`dask-worker`, under a nanny), with `python`'s distributed.

    The nanny is its parent in the same process group: stopping the group stops both, and a worker retired by
    the scheduler closes its nanny too (distributed ≥ 2024.2.1), so it never comes back."""
    return [python, "-m", "distributed.cli.dask_worker", scheduler, "--name", name, "--nthreads", str(nthreads),
            "--memory-limit", str(memory_limit), "--nanny", "--no-dashboard", "--host", "127.0.0.1"]


def start_scheduler(args: list[str], *, file: Path, env: dict, log_path: Path, port: int = 0,
                    dashboard_port: int = 0) -> tuple[int, dict] | None:
    """Start a dask-scheduler on 127.0.0.1 (`args` are extra options) on `port`, its dashboard on `dashboard_port`
    (0: a port the OS gives it; a taken dashboard port moves elsewhere with a mere warning, distributed/node.py
    start_http_server), and wait for its scheduler file: (pid, the scheduler's identity there: `id`, `address`,
    `services` → `dashboard`). None if it exited first (a taken `port`); TransientError if it writes nothing."""
    file.parent.mkdir(parents=True, exist_ok=True)
    file.unlink(missing_ok=True)  # a stale one (a killed scheduler) would name ports no longer ours
    pid = spawn([sys.executable, "-m", "distributed.cli.dask_scheduler", f"--port={port}",
                 f"--dashboard-address={LOCALHOST}:{dashboard_port}", f"--scheduler-file={file}", *args,
                 "--host", LOCALHOST], env=env, log_path=log_path)
    file.with_suffix(".pid").write_text(str(pid))  # known before it is recorded: stop_all finds it if we die waiting
    try:
        report = wait_for_report(pid, file, SCHEDULER_START_S, what="dask-scheduler")
    except TimeoutError as e:
        stop_pid_group(pid)
        raise TransientError(f"{e}; log {log_path}") from None
    return (pid, report) if report else None


def _node_of(worker_name: str) -> str:
    return worker_name.split("-", 1)[0]  # workers are named n<node>-w<index>


def _plain_env(values: dict, component: str) -> dict[str, str]:
    """A component's `env` entries with a literal value (valueFrom needs Kubernetes), as process variables."""
    block = (values or {}).get(component) or {}
    return {e["name"]: str(e.get("value", "")) for e in block.get("env") or () if "valueFrom" not in e}


def _signature(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _reap(retiring: dict) -> None:
    """Forget the retired workers that exited; stop those still running after RETIRE_TIMEOUT_S (in place)."""
    for name, w in list(retiring.items()):
        if pid_alive(w["pid"]) and time.time() - w["since"] < RETIRE_TIMEOUT_S:
            continue
        stop_pid_group(w["pid"])  # nothing to do if it is gone, with whatever it started
        del retiring[name]


def _logged_at(line: str, default: float) -> float:
    m = _LOG_TIME.match(line)
    if not m:
        return default
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000


def worker_problems(name: str, log: Path, memory_limit: int, dead: bool) -> list[WorkerProblem]:
    """What a local worker's log says went wrong: its nanny restarting it above its memory budget or after its
    process died, and (`dead`) the worker's own end with the exit code `spawn(note_exit=True)` appended."""
    try:
        lines = log.read_bytes()[-65536:].decode(errors="replace").splitlines()
        mtime = log.stat().st_mtime
    except OSError:
        return []
    found: list[WorkerProblem] = []

    def upto(line: str) -> str:  # the log up to an event: what the worker was doing then
        at = len(lines) - lines[::-1].index(line)
        return "\n".join(lines[max(0, at - 8):at])

    kills = [(line, m) for line in lines if (m := _MEMORY_KILL.search(line))]
    if kills:
        line, m = kills[-1]
        found.append(WorkerProblem("oom-killed", name, f"restarted by its nanny above {m.group(2)}% of its memory "
                                   "limit", at=_logged_at(line, mtime), restarts=len(kills), memory_limit=memory_limit,
                                   log_tail=upto(line)))
    killed = {m.group(1) for _, m in kills}
    deaths = [(line, m) for line in lines if (m := _DEATH.search(line)) and m.group(1) not in killed]
    if deaths:
        line, m = deaths[-1]
        found.append(WorkerProblem("restarting", name, f"worker process {m.group(2)}", at=_logged_at(line, mtime),
                                   restarts=len(deaths), log_tail=upto(line)))
    code = next((line.removeprefix(EXIT_NOTE) for line in reversed(lines) if line.startswith(EXIT_NOTE)), None)
    if dead and code != "0":
        why = " (SIGKILL: the kernel's OOM killer, or kill -9)" if code == "137" else ""
        tail = "\n".join([line for line in lines if not line.startswith(EXIT_NOTE)][-8:])
        found.append(WorkerProblem("restarting", name, f"process exited with code {code or 'unknown'}{why}",
                                   at=mtime, log_tail=tail))
    return found


class LocalBackend:
    """Labs as local processes. The record `<home>/labs/<lab>.json` holds spec, state and the process ids."""

    installs_at_start = False  # EXTRA_PIP_PACKAGES go into the lab's venv before it runs (refused if pip fails)

    def __init__(self, home: str | Path):
        self.root = Path(home) / "labs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.unreadable: dict[tuple[str, str], RecordUnreadable] = {}  # what the last fetch_labs could not read

    # --- records ---

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def _locked(self, name: str):
        return flocked(self.root / f".{name}.lock")

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads(self._path(name).read_text())
        except FileNotFoundError:
            return None

    def _write(self, record: dict) -> None:
        path = self._path(record["spec"]["name"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)

    @contextmanager
    def _update(self, name: str):
        """Read-modify-write the record's process bookkeeping under its lock. The version (the concurrency
        token of spec and state) is left alone: bookkeeping never conflicts with a decision."""
        with self._locked(name):
            record = self._read(name)
            if record is None:
                raise TransientError(f"lab {name} record vanished")
            yield record["local"]
            self._write(record)

    @staticmethod
    def _lab(record: dict) -> Lab:
        return Lab.from_dict(record, str(record["version"]))

    def fetch_labs(self) -> list[Lab]:
        """Every managed record that reads; one that does not is left out and kept in `unreadable` with why."""
        labs, self.unreadable = [], {}
        for path in sorted(self.root.glob("*.json")):
            try:
                record = self._read(path.stem)
                if record and record.get("managed_by") == MANAGED_BY:
                    labs.append(self._lab(record))
            except RecordUnreadable as e:
                self.unreadable[("lab", path.stem)] = e
            except ValueError as e:  # not JSON
                self.unreadable[("lab", path.stem)] = RecordUnreadable(path.stem, f"not JSON: {e}")
        return labs

    def fetch_lab(self, name: str) -> Lab | None:
        record = self._read(name)
        if record is None:
            return None
        if record.get("managed_by") != MANAGED_BY:
            raise PermanentError(f"lab {name} is not managed by dasklab: refusing to touch it")
        return self._lab(record)

    def apply_create(self, lab: Lab) -> bool:
        with self._locked(lab.name):
            if self._path(lab.name).exists():
                return False
            self._write({"managed_by": MANAGED_BY, "version": 1, **lab.to_dict(),
                         "local": {"scheduler": None, "workers": {}, "retiring": {}, "installed": False,
                                   "next_worker": 0}})
        return True

    def apply_record(self, lab: Lab) -> Lab:
        with self._locked(lab.name):
            record = self._read(lab.name)
            if record is None or str(record["version"]) != lab.version:
                raise ConflictError(f"lab {lab.name} changed since it was read (version {lab.version})")
            record.update(lab.to_dict(), version=record["version"] + 1)
            self._write(record)
        return self._lab(record)

    def apply_forget(self, lab: Lab) -> bool:
        with self._locked(lab.name):
            record = self._read(lab.name)
            if record is not None and str(record["version"]) != lab.version:
                raise ConflictError(f"lab {lab.name} changed since it was read (version {lab.version})")
            if record is not None:
                self._path(lab.name).unlink()
            shutil.rmtree(self.root / lab.name, ignore_errors=True)
        (self.root / f".{lab.name}.lock").unlink(missing_ok=True)
        return record is not None

    # --- processes ---

    def _local(self, lab: Lab) -> dict:
        record = self._read(lab.name)
        return record["local"] if record else {"scheduler": None, "workers": {}, "installed": False}

    def _env(self, lab: Lab) -> dict:
        scratch = self.root / lab.name / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "DASK_TEMPORARY_DIRECTORY": str(scratch),
                "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": json.dumps(SCHEDULER_HTTP_ROUTES)}

    def _log(self, lab: Lab, what: str) -> Path:
        path = self.root / lab.name / "logs" / f"{what}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _tail(self, lab: Lab, what: str) -> str:
        path = self._log(lab, what)
        return path.read_text(errors="replace")[-300:].strip() if path.exists() else ""

    # --- environments ---

    def apply_environment(self, spec: LabSpec) -> None:
        """Install the EXTRA_PIP_PACKAGES of the spec's workers and Jupyter into the venv of each set (one when
        they list the same; cached; refused with pip's tail)."""
        self.python(spec)
        if jupyter_enabled(spec.values):
            self.jupyter_python(spec)

    def python(self, spec: LabSpec) -> str:
        """The interpreter of the lab's workers (made if missing: a cached venv is found at once)."""
        return ensure_env(self.root.parent, lab_packages(spec.values))

    def jupyter_python(self, spec: LabSpec) -> str:
        """The interpreter of the lab's Jupyter and its kernels: the venv of its own packages, as the chart's Jupyter
        image installs them (the workers' venv when they list the same)."""
        return ensure_env(self.root.parent, jupyter_packages(spec.values))

    def _worker_signature(self, spec: LabSpec) -> str:
        """What a worker of this spec runs: interpreter (packages), size and the worker's env variables."""
        return _signature(lab_packages(spec.values), spec.worker_cpu, spec.worker_memory,
                          _plain_env(spec.values, "worker"))

    @staticmethod
    def _scheduler_signature(spec: LabSpec) -> str:
        return _signature(_plain_env(spec.values, "scheduler"), ((spec.values or {}).get("scheduler") or {}).get(
            "resources"))

    def fetch_infra(self, lab: Lab) -> Infra:
        local = self._local(lab)
        sched = local["scheduler"]
        if sched is None:
            return Infra("absent")
        if not pid_alive(sched["pid"]):
            return Infra("error", detail=f"scheduler process {sched['pid']} exited: {self._tail(lab, 'scheduler')}")
        try:
            HttpTransport(self._dashboard_url(sched), timeout=2).get("/health")
        except TransientError:
            return Infra("creating", detail="scheduler starting")
        if not local["installed"]:
            return Infra("running", "absent")
        if lab.state.phase != READY and local.get("jupyter"):  # the lab is ready once its Jupyter answers
            if not pid_alive(local["jupyter"]["pid"]):
                return Infra("running", "failed", f"Jupyter exited: {self._tail(lab, 'jupyter')}")
            try:
                self.fetch_jupyter(lab)
            except TransientError:
                return Infra("running", "installing", "Jupyter starting")
        return Infra("running", "deployed")

    def apply_provision(self, lab: Lab) -> None:
        with self._update(lab.name) as local:
            if local["scheduler"] and pid_alive(local["scheduler"]["pid"]):
                return
            self._start_scheduler(lab, local)

    def _start_scheduler(self, lab: Lab, local: dict, port: int = 0, dash: int = 0) -> None:
        """Start the lab's scheduler and record the ports it bound, read back from its scheduler file: those the OS
        gave it, or (a restart) `port` and `dash` again so that its addresses stay; if another process took `port`
        meanwhile, it starts on a port the OS gives it, and the log says so (its workers start again on it)."""
        env, log = {**_plain_env(lab.spec.values, "scheduler"), **self._env(lab)}, self._log(lab, "scheduler")
        file = self.root / lab.name / "scheduler.json"
        started = start_scheduler([], file=file, env=env, log_path=log, port=port, dashboard_port=dash)
        if started is None and port:
            started = start_scheduler([], file=file, env=env, log_path=log, dashboard_port=dash)
        if started is None:
            raise TransientError(f"scheduler exited at start: {self._tail(lab, 'scheduler')}")
        pid, report = started
        bound, dashboard = int(report["address"].rsplit(":", 1)[1]), int(report["services"]["dashboard"])
        if port and (bound, dashboard) != (port, dash):
            logs.emit("WARNING", lab=lab.name, action="scheduler-ports", **{"from": [port, dash]},
                      to=[bound, dashboard], reason="its recorded ports were taken by another process meanwhile")
        local["scheduler"] = {"pid": pid, "port": bound, "dashboard_port": dashboard, "id": report["id"],
                              "signature": self._scheduler_signature(lab.spec)}

    def apply_install(self, lab: Lab) -> None:
        """Workers at the initial count, then Jupyter (once: a recorded one still running is kept)."""
        self.apply_workers(lab, lab.state.target_workers)
        with self._update(lab.name) as local:
            jupyter = local.get("jupyter")
            if jupyter is None or not pid_alive(jupyter["pid"]):
                local["jupyter"] = self._start_jupyter(lab, local["scheduler"])
            local["installed"] = True

    def _start_jupyter(self, lab: Lab, sched: dict, port: int | None = None) -> dict | None:
        """Start the lab's Jupyter with the lab's python: with a new token on a port the OS gives it, or (a restart)
        on `port` with the token it had, so the URL `dasklab connect` printed stays valid; if another process took
        `port` meanwhile, on a port the OS gives it, and the log says so. Records the port it serves on."""
        python = self.jupyter_python(lab.spec)
        if not jupyter_enabled(lab.spec.values) or not jupyter_available(python):
            return None  # the values disable it, or JupyterLab is not installed (connection_info says so)
        here = self.root / lab.name / "jupyter"
        if port is None:
            write_token(here / "token", secrets.token_hex(32))  # 256 bits, this user only
        options = dict(token_file=here / "token", root_dir=self.root / lab.name / "notebooks",
                       runtime_dir=here / "runtime", scheduler_address=f"tcp://{LOCALHOST}:{sched['port']}",
                       env=self._env(lab), log_path=self._log(lab, "jupyter"))
        started = start_jupyter(python, port=port or 0, **options)
        if started is None and port:
            started = start_jupyter(python, **options)
            if started:
                logs.emit("WARNING", lab=lab.name, action="jupyter-port", **{"from": port}, to=started[1],
                          reason="its recorded port was taken by another process meanwhile: its URL changed")
        if started is None:
            raise JupyterUnreachable(f"Jupyter exited at start: {self._tail(lab, 'jupyter')}")
        pid, bound = started
        return {"pid": pid, "port": bound, "python": python, "scheduler": sched["port"]}

    def _jupyter_api(self, lab: Lab, jupyter: dict) -> JupyterApi:
        token = (self.root / lab.name / "jupyter" / "token").read_text().strip()
        return JupyterApi(HttpTransport(f"http://127.0.0.1:{jupyter['port']}", timeout=5), token)

    def fetch_jupyter(self, lab: Lab) -> JupyterActivity:
        """NO_JUPYTER when the lab runs none (or it exited: nobody can use it); JupyterUnreachable if it is silent."""
        jupyter = self._local(lab).get("jupyter")
        if not jupyter or not pid_alive(jupyter["pid"]):
            return NO_JUPYTER
        return self._jupyter_api(lab, jupyter).fetch_activity()

    def jupyter_login_url(self, lab: Lab) -> str | None:
        """Jupyter's URL with its login token, for `dasklab connect` on this machine (never logged nor published)."""
        jupyter = self._local(lab).get("jupyter")
        if not jupyter:
            return None
        token = (self.root / lab.name / "jupyter" / "token").read_text().strip()
        return f"http://127.0.0.1:{jupyter['port']}/lab?token={token}"

    def fetch_requested(self, lab: Lab) -> int:
        """Live workers, not counting retired ones that are still exiting."""
        return sum(pid_alive(w["pid"]) for w in self._local(lab)["workers"].values())

    def apply_workers(self, lab: Lab, target: int) -> None:
        """Start workers until `target` are alive, filling partly used nodes before opening new ones."""
        python = self.python(lab.spec)
        with self._update(lab.name) as local:
            dead = [n for n, w in local["workers"].items() if not pid_alive(w["pid"])]
            local["exited"] = (local.get("exited", []) + [{"name": n, "at": time.time()} for n in dead])[-EXITED_KEPT:]
            local["workers"] = {n: w for n, w in local["workers"].items() if n not in dead}
            _reap(local.setdefault("retiring", {}))
            self._start_workers(lab, local, target - len(local["workers"]), python)

    def _start_workers(self, lab: Lab, local: dict, count: int, python: str) -> None:
        per_node, sched = lab.spec.workers_per_node, local["scheduler"]
        env = {**_plain_env(lab.spec.values, "worker"), **self._env(lab)}
        for _ in range(count):
            used: dict[str, int] = {}
            for w in local["workers"].values():
                used[w["node"]] = used.get(w["node"], 0) + 1
            node = next((n for n in sorted(used) if used[n] < per_node), None)
            if node is None:
                node = next(f"n{i}" for i in range(len(used) + 1) if f"n{i}" not in used)
            name = f"{node}-w{local['next_worker']}"
            local["next_worker"] += 1
            pid = spawn(build_worker_argv(python, f"tcp://127.0.0.1:{sched['port']}", name,
                                          max(1, int(lab.spec.worker_cpu)), lab.spec.worker_memory),
                        env=env, log_path=self._log(lab, name), note_exit=True)
            local["workers"][name] = {"pid": pid, "node": node, "signature": self._worker_signature(lab.spec)}

    def apply_update(self, lab: Lab) -> bool:
        """One step of running the recorded values: a scheduler whose env or resources changed is restarted on
        its ports (the controller refused that unless restart: true), its workers with it; workers of another
        environment or size are replaced: replacements start, join, then the old ones retire through the
        scheduler so their results move first; meanwhile a Jupyter of another environment is restarted into the
        new one. Each step is re-derived from the processes and the scheduler; True once every part runs it."""
        python = self.python(lab.spec)
        local = self._local(lab)
        sched = local["scheduler"]
        if sched and sched.get("signature") != self._scheduler_signature(lab.spec):
            with self._update(lab.name) as local:
                sched = local["scheduler"]
                if sched.get("signature") == self._scheduler_signature(lab.spec):
                    return False  # another pass restarted it meanwhile
                for w in [*local["workers"].values(), *local.get("retiring", {}).values()]:
                    stop_pid_group(w["pid"])
                stop_pid_group(local["scheduler"]["pid"])
                local.update(workers={}, retiring={})
                self._start_scheduler(lab, local, sched["port"], sched["dashboard_port"])
            return False
        jupyter = self._roll_jupyter(lab)
        return self._roll_workers(lab, python) and jupyter

    def _roll_jupyter(self, lab: Lab) -> bool:
        """One step of running the lab's Jupyter as its values say: in its environment, or none when they disable it
        (or JupyterLab is not installed). A Jupyter of another environment, one whose scheduler moved to another port
        (restarted while another process held its port: the kernels' DASK_SCHEDULER_ADDRESS names the old one), or
        one that exited (a crash between stopping and starting it), is started again on its port with its token; its
        kernels are lost, as the update's notes say. True once it runs as asked and answers."""
        local = self._local(lab)
        jupyter, wanted = local.get("jupyter"), jupyter_enabled(lab.spec.values)
        python = self.jupyter_python(lab.spec) if wanted else None
        scheduler = (local["scheduler"] or {}).get("port")
        if jupyter and jupyter.get("python") == python and jupyter.get("scheduler", scheduler) == scheduler \
                and pid_alive(jupyter["pid"]):
            try:
                self._jupyter_api(lab, jupyter).fetch_activity()
            except JupyterUnreachable:
                return False  # starting
            return True
        if jupyter is None and not (wanted and jupyter_available(python)):
            return True
        with self._update(lab.name) as local:
            if local.get("jupyter") != jupyter:
                return False  # another pass moved it meanwhile
            if jupyter:
                stop_jupyter(jupyter["pid"])  # its kernels with it
            local["jupyter"] = self._start_jupyter(lab, local["scheduler"], port=jupyter and jupyter["port"]) \
                if wanted else None
            port = (local["jupyter"] or {}).get("port")
        why = "stopped: the values disable it" if not wanted else "started: the values enable it"
        if wanted and jupyter:
            cause = f"for its scheduler, now on port {scheduler}" if jupyter.get("python") == python and \
                jupyter.get("scheduler", scheduler) != scheduler else "into the lab's environment"
            where = f"on its port {port}" if port == jupyter["port"] else f"on port {port} (its port was taken)"
            why = f"restarted {cause}, {where} with its token"
        logs.emit("INFO", lab=lab.name, action="jupyter-restart", revision=lab.spec.revision, python=python,
                  reason=why + ("; kernel state is lost, results on the workers are kept" if jupyter else ""))
        return False

    def _roll_workers(self, lab: Lab, python: str) -> bool:
        """One step of replacing the workers of another environment or size (see apply_update); True once none is
        left."""
        local = self._local(lab)
        signature = self._worker_signature(lab.spec)
        workers = self.dashboard(lab).fetch_workers() if local["workers"] else ()
        with self._update(lab.name) as local:  # decided and started under the record's lock: two passes at once
            alive = {n: w for n, w in local["workers"].items() if pid_alive(w["pid"])}  # start one set, not two
            stale = {n for n, w in alive.items() if w.get("signature") != signature}
            fresh = set(alive) - stale
            joined = {w.name for w in workers} & fresh
            step = plan_rollout(len(stale), len(fresh), len(joined), lab.state.target_workers)
            if step.action in ("start", "retire"):
                logs.emit("INFO", lab=lab.name, action=f"rollout-{step.action}", revision=lab.spec.revision,
                          reason=step.reason, workers=sorted(stale) if step.action == "retire" else None)
            if step.action == "start":
                self._start_workers(lab, local, step.count, python)
        if step.action == "retire":
            self.apply_scale_down(lab, [w.address for w in workers if w.name in stale], len(fresh))
            unjoined = stale - {w.name for w in workers}  # not connected: they hold no result
            if unjoined:
                with self._update(lab.name) as local:
                    for name in unjoined & set(local["workers"]):
                        stop_pid_group(local["workers"].pop(name)["pid"])
        return step.action == "done"

    def fetch_worker_health(self, lab: Lab) -> tuple[WorkerProblem, ...]:
        """From the workers' logs: nanny restarts (for memory or after a death), and the exit code of each worker
        that died, whether still in the record or already replaced (the last EXITED_KEPT)."""
        local, limit = self._local(lab), lab.spec.worker_memory
        found = [p for name, w in local["workers"].items()
                 for p in worker_problems(name, self._log(lab, name), limit, dead=not pid_alive(w["pid"]))]
        for gone in local.get("exited", []):
            found += [replace(p, at=min(p.at, gone["at"]) or gone["at"])
                      for p in worker_problems(gone["name"], self._log(lab, gone["name"]), limit, dead=True)]
        return tuple(found)

    def apply_scale_down(self, lab: Lab, addresses: list[str], target: int) -> None:
        """Retire through the scheduler (data moves to survivors; it removes them before answering), then
        record the retired processes as retiring: they exit on their own, and a later step reaps them.
        A crash before the record leaves exiting processes among the workers, which no longer count once gone."""
        dashboard = self.dashboard(lab)
        names = {w.address: w.name for w in dashboard.fetch_workers()}
        retired = dashboard.apply_retire(addresses)  # a worker whose data could not move is not retired
        with self._update(lab.name) as local:
            retiring = local.setdefault("retiring", {})
            for address in retired:
                entry = local["workers"].pop(names.get(address, ""), None)
                if entry:
                    retiring[names[address]] = {**entry, "since": time.time()}
            _reap(retiring)

    def apply_settle(self, lab: Lab) -> None:
        """Reap the retired workers: forget those that exited, stop those still running after RETIRE_TIMEOUT_S."""
        if self._local(lab).get("retiring"):
            with self._update(lab.name) as local:
                _reap(local["retiring"])

    def apply_delete(self, lab: Lab) -> None:
        with self._update(lab.name) as local:
            stops = [lambda pid=w["pid"]: stop_pid_group(pid)
                     for w in [*local["workers"].values(), *local.get("retiring", {}).values()]]
            if local.get("jupyter"):
                stops.append(lambda pid=local["jupyter"]["pid"]: stop_jupyter(pid))
            if stops:  # together (each waits for its processes to exit), then the scheduler they were connected to
                with ThreadPoolExecutor(max_workers=len(stops)) as pool:
                    list(pool.map(lambda stop: stop(), stops))
            if local["scheduler"]:
                stop_pid_group(local["scheduler"]["pid"])
            local.update(scheduler=None, workers={}, retiring={}, installed=False, jupyter=None)

    # --- access ---

    @staticmethod
    def _dashboard_url(sched: dict) -> str:
        return f"http://127.0.0.1:{sched['dashboard_port']}"

    def dashboard(self, lab: Lab) -> Dashboard:
        sched = self._local(lab)["scheduler"]
        if sched is None:
            raise TransientError(f"lab {lab.name} has no scheduler")
        return Dashboard(HttpTransport(self._dashboard_url(sched)), node_of=_node_of)

    def connection_info(self, lab: Lab) -> dict:
        local = self._local(lab)
        sched, jupyter = local["scheduler"] or {}, local.get("jupyter")
        info = {"dask_version": installed_dask_version(), "scheduler": f"tcp://127.0.0.1:{sched.get('port')}",
                "dashboard": f"{self._dashboard_url(sched)}/status" if sched else None,
                "how": "from Python on this machine: distributed.Client('<scheduler>')"}
        if jupyter:
            info["jupyter"] = f"http://127.0.0.1:{jupyter['port']}/lab"
            info["jupyter_token"] = f"dasklab connect {lab.name}  # prints the URL with its token"
        elif jupyter_enabled(lab.spec.values):
            info["jupyter"] = None
            info["jupyter_note"] = "no Jupyter: install it with pip install 'dasklab[jupyter]'"
        return info

    def pids(self, lab: Lab) -> list[int]:
        """The workers', Jupyter's and (last) the scheduler's process ids (for checks that nothing is left behind)."""
        local = self._local(lab)
        sched = [local["scheduler"]["pid"]] if local["scheduler"] else []
        jupyter = [local["jupyter"]["pid"]] if local.get("jupyter") else []
        return [w["pid"] for w in [*local["workers"].values(), *local.get("retiring", {}).values()]] + jupyter + sched

    def stop_all(self) -> int:
        """Delete every local lab, processes and records (when the local controller shuts down); first any scheduler
        or Jupyter a killed invocation started but never recorded (found by the pid files written at their start;
        a pid is signalled only while it still runs that lab's process)."""
        for pidfile in self.root.glob("*/jupyter/runtime/server.pid"):  # first: their files go with the labs
            if pid_alive(pid := int(pidfile.read_text() or 0)):
                stop_jupyter(pid)
        for pidfile in self.root.glob("*/scheduler.pid"):
            pid = int(pidfile.read_text() or 0)
            try:
                ours = str(pidfile.parent) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:  # gone
                ours = False
            if ours:
                stop_pid_group(pid)
        labs = self.fetch_labs()
        for lab in labs:
            self.apply_delete(lab)
            current = self.fetch_lab(lab.name)  # read again: the record may have moved on meanwhile
            if current is not None:
                self.apply_forget(current)
        return len(labs)
