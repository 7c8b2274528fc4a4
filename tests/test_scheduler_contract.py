"""The scheduler-API contract: every endpoint and field the controller uses (dashboard.SCHEDULER_API), proven on real
scheduler and nanny-worker processes of the labs' pinned Dask (a cached venv from the package index, run with the
chart's commands `dask-scheduler` / `dask-worker`) and of the Dask installed here (`dask scheduler` / `dask worker`)."""

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dasklab.adapters import dashboard as dashboard_module
from dasklab.adapters.dashboard import SCHEDULER_API, SCHEDULER_HTTP_ROUTES, Dashboard, HttpTransport
from dasklab.adapters.procs import LOCALHOST, spawn, stop_pid_group, wait_for_report, wait_until
from dasklab.core.config import Config
from dasklab.core.errors import SchedulerUnreachable

from tests.dask_checks import LOG_LENGTH_ENV, alive, dask_env, process_tree

SHARED = Path(__file__).parent.parent / "shared" / "dasklab"
COVERED: dict[str, dict[str, set[str]]] = {}  # version label → endpoint → fields proven


def cover(lab, endpoint: str, *fields: str) -> None:
    COVERED.setdefault(lab.label, {}).setdefault(endpoint, set()).update(fields)


class Recording:
    """The HTTP transport, keeping each raw answer (to check a reply's shape beside what the adapter makes of it)."""

    def __init__(self, url: str, timeout: float):
        self.http, self.answers = HttpTransport(url, timeout), {}

    def get(self, path: str) -> bytes:
        self.answers[path] = self.http.get(path)
        return self.answers[path]

    def post(self, path: str, body: bytes) -> bytes:
        self.answers[path] = self.http.post(path, body)
        return self.answers[path]


class ContractLab:
    """A scheduler with the controller's routes setting and three workers under nannies, as the chart runs them,
    plus a client process of the same environment (a client of another version cannot send it tasks)."""

    def __init__(self, label: str, bin_dir: Path, chart_commands: bool, tmp: Path):
        self.label, self.bin, self.tmp = label, bin_dir, tmp
        self.python = str(bin_dir / "python")
        scheduler = [str(bin_dir / "dask-scheduler")] if chart_commands else [str(bin_dir / "dask"), "scheduler"]
        self.worker_cmd = [str(bin_dir / "dask-worker")] if chart_commands else [str(bin_dir / "dask"), "worker"]
        self.env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DASK_TEMPORARY_DIRECTORY": str(tmp), **LOG_LENGTH_ENV,
                    "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": json.dumps(SCHEDULER_HTTP_ROUTES)}
        file = tmp / "scheduler.json"  # the ports it bound (the OS's choice): its address and dashboard
        self.pids = [spawn([*scheduler, "--host", LOCALHOST, "--port", "0", "--dashboard-address", f"{LOCALHOST}:0",
                            "--scheduler-file", str(file)], env=self.env, log_path=tmp / "scheduler.log")]
        self.client = None
        try:
            info = wait_for_report(self.pids[0], file, 60, what=f"{label} scheduler")
            assert info, f"{label} scheduler exited: {(tmp / 'scheduler.log').read_text()[-2000:]}"
            self.address, self.url = info["address"], f"http://{LOCALHOST}:{info['services']['dashboard']}"
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        label, tmp = self.label, self.tmp
        self.transport = Recording(self.url, timeout=30)
        self.dashboard = Dashboard(self.transport)
        wait_until(self._healthy, 60, what=f"{label} scheduler")
        self.workers = {}
        for name in ("w1", "w2", "w3"):
            self.workers[name] = spawn([*self.worker_cmd, self.address, "--name", name, "--nthreads", "1",
                                        "--memory-limit", "1G", "--host", LOCALHOST, "--no-dashboard"],
                                       env=self.env, log_path=tmp / f"{name}.log")
            self.pids.append(self.workers[name])
        wait_until(lambda: len(self.dashboard.fetch_workers()) == 3, 90, what=f"{label} workers")
        self.client = subprocess.Popen([self.python, str(Path(__file__).parent / "contract_load.py"), self.address],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env,
                                       start_new_session=True)
        self.version = self.ask("version")["version"]

    def _healthy(self) -> bool:
        try:
            return self.transport.get("/health") == b"ok"
        except SchedulerUnreachable:
            return False

    def ask(self, command: str) -> dict:
        self.client.stdin.write(command + "\n")
        self.client.stdin.flush()
        line = self.client.stdout.readline()
        assert line, f"the {self.label} client exited ({self.client.poll()})"
        return json.loads(line)

    def close(self) -> list:
        tree = process_tree(self.pids + ([self.client.pid] if self.client else []))
        if self.client:
            self.client.stdin.close()
            try:
                self.client.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_pid_group(self.client.pid)
        for pid in self.pids:
            stop_pid_group(pid)
        return tree


@pytest.fixture(scope="module", params=["pinned", "installed"])
def lab(request, tmp_path_factory):
    if request.param == "pinned":  # the labs' version, with the chart's commands
        bin_dir, _ = dask_env(Config().dask_version)
        lab = ContractLab("pinned", bin_dir, True, tmp_path_factory.mktemp("pinned"))
        assert lab.version == Config().dask_version
    else:
        lab = ContractLab("installed", Path(sys.executable).parent, False, tmp_path_factory.mktemp("installed"))
    yield lab
    tree = lab.close()
    assert not alive(tree), "a scheduler, nanny or worker process survived"


def test_the_scheduler_starts_with_the_routes_setting_and_every_module_exists(lab):
    code = "import importlib, json, sys; [importlib.import_module(m) for m in json.loads(sys.argv[1])]"
    subprocess.run([lab.python, "-c", code, json.dumps(SCHEDULER_HTTP_ROUTES)], check=True, env=lab.env)
    assert lab.transport.get("/health") == b"ok"  # the scheduler started with the setting, and serves it
    cover(lab, "GET /health")


def test_get_workers_lists_the_nanny_workers_by_address_and_name(lab):
    listed = json.loads(lab.transport.get("/api/v1/get_workers"))["workers"]
    assert sorted(w["name"] for w in listed) == ["w1", "w2", "w3"]
    assert all(w["address"].startswith(f"tcp://{LOCALHOST}:") for w in listed)
    assert [w.name for w in lab.dashboard.fetch_workers()] == ["w1", "w2", "w3"]
    for pid in lab.workers.values():  # each `dask-worker` runs a nanny whose child is the worker
        assert len(process_tree([pid])) >= 2, "a worker without its nanny"
    cover(lab, "GET /api/v1/get_workers", "workers", "address", "name")


def test_identity_json_reports_each_worker_metrics_when_it_answers(lab):
    lab.ask("hold 30")

    def held_in_memory():  # workers report their metrics with their heartbeats
        try:
            identity = json.loads(lab.transport.get("/json/identity.json"))["workers"]
        except SchedulerUnreachable:  # 500 while a worker's last heartbeat carries tuple-keyed digests of activity
            return False
        return sum(i["metrics"]["task_counts"].get("memory", 0) for i in identity.values()) >= 30 and identity

    identity = wait_until(held_in_memory, 20, what="the held results in the workers' metrics")
    addresses = {w.address for w in lab.dashboard.fetch_workers()}
    assert set(identity) == addresses
    for info in identity.values():
        counts = info["metrics"]["task_counts"]
        assert isinstance(info["metrics"]["managed_bytes"], int) and isinstance(counts, dict)
        assert set(counts) <= {"executing", "ready", "memory", "waiting", "constrained", "fetch", "flight",
                               "long-running", "missing", "resumed", "cancelled", "released", "error", "rescheduled"}
    assert sum(w.load for w in lab.dashboard.fetch_workers()) >= 30  # what the adapter makes of it
    cover(lab, "GET /json/identity.json", "workers", "metrics", "task_counts", "executing", "ready", "memory",
          "waiting", "managed_bytes")


def test_counts_json_under_load_gives_the_fields_and_a_desired_worker_count(lab):
    lab.ask("load 60")  # 60 × 0.5 s on 3 single-threaded workers: about 10 s of work
    counts = wait_until(lambda: (c := json.loads(lab.transport.get("/json/counts.json")))["desired_workers"] > 3
                        and c, 20, what="desired_workers above the 3 workers")
    fields = SCHEDULER_API["GET /json/counts.json"]
    assert all(isinstance(counts[f], int) for f in fields), {f: counts.get(f) for f in fields}
    assert counts["workers"] == 3 and counts["processing"] >= 3 and counts["clients"] >= 2  # ours + fire-and-forget
    assert counts["memory"] >= 30 and counts["tasks"] >= 90
    assert counts["bytes"] > 0  # what the held results take: the memory-pressure reasons read it
    load = lab.dashboard.fetch_load(idle=True)
    assert load.memory_bytes > 0
    assert load.busy and load.queued > 0 and load.adaptive_target > 3 and load.clients >= 1
    assert load.idle_since is None  # busy: not idle
    assert json.loads(lab.transport.get("/api/v1/adaptive_target"))["workers"] >= 1
    assert [w.name for w in lab.dashboard.fetch_workers()] == ["w1", "w2", "w3"]  # identity.json or not
    cover(lab, "GET /json/counts.json", *fields)
    cover(lab, "GET /api/v1/check_idle", "idle_since")
    cover(lab, "GET /api/v1/adaptive_target", "workers")


def test_retire_workers_by_address_under_load_keeps_every_result_and_none_comes_back(lab):
    workers = {w.name: w.address for w in lab.dashboard.fetch_workers()}
    chosen = [workers["w2"], workers["w3"]]
    retired = lab.dashboard.apply_retire(chosen)  # while the 90 tasks still run
    reply = json.loads(lab.transport.answers["/api/v1/retire_workers"])
    assert retired == sorted(chosen) and set(reply) == set(chosen)  # a mapping keyed by the retired addresses
    assert [w.name for w in lab.dashboard.fetch_workers()] == ["w1"]
    gone = process_tree([lab.workers["w2"], lab.workers["w3"]])
    wait_until(lambda: not alive(gone), 30, what="the retired workers and their nannies exiting")
    for _ in range(15):  # no nanny restarts its worker: it never rejoins
        assert [w.name for w in lab.dashboard.fetch_workers()] == ["w1"]
        time.sleep(0.2)
    sums = lab.ask("gather")
    assert sums == {"held_sum": 3 * sum(range(30)), "running_sum": sum(range(1, 61))}  # 0 lost
    assert lab.ask("recomputed") == {"recomputed": 0, "overflowed": False}
    cover(lab, "POST /api/v1/retire_workers", "workers")


def test_check_idle_gives_the_time_the_scheduler_became_idle(lab):
    lab.ask("release")
    before = time.time()
    since = wait_until(lambda: lab.dashboard.fetch_load(idle=True).idle_since, 20, what="idle_since")
    assert before - 30 < since <= time.time()
    cover(lab, "GET /api/v1/check_idle", "idle_since")


def test_the_suite_covered_exactly_what_the_controller_uses(lab):
    """Last of each version's tests: every endpoint and field of SCHEDULER_API was proven on this version."""
    assert COVERED.get(lab.label) == {endpoint: set(fields) for endpoint, fields in SCHEDULER_API.items()}


# --- the controller uses nothing the suite does not cover -------------------------------------------------------

_SCHEDULER_PATH = ("/health", "/json/", "/api/v1/")


def _scheduler_paths(tree: ast.AST) -> set[str]:
    """Literal paths of the scheduler's API in a module (Kubernetes' /api/v1/namespaces/… is not one)."""
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith(_SCHEDULER_PATH) and not node.value.startswith("/api/v1/namespaces")}


def _fields_read(tree: ast.AST) -> set[str]:
    """String keys a module reads: x["key"], x.get("key"), `for k in ("a", "b")`, and keys of a dict it sends."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            found.add(node.slice.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args and isinstance(node.args[0], ast.Constant):
            found.add(node.args[0].value)
        elif isinstance(node, ast.comprehension) and isinstance(node.iter, ast.Tuple):
            found |= {e.value for e in node.iter.elts if isinstance(e, ast.Constant)}
        elif isinstance(node, ast.Dict):
            found |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
    return {f for f in found if isinstance(f, str)}


def test_the_controller_calls_and_reads_only_what_the_contract_lists():
    source = Path(dashboard_module.__file__).read_text()
    tree = ast.parse(source)
    body = [n for n in tree.body if not (isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "SCHEDULER_API")]
    listed_paths = {endpoint.split(" ", 1)[1] for endpoint in SCHEDULER_API}
    used = _scheduler_paths(ast.Module(body=body, type_ignores=[]))
    modules = ["adapters/local.py", "cli.py", "report.py"] + [str(p.relative_to(SHARED)) for p in
                                                               (SHARED / "adapters" / "gke").glob("*.py")] + \
        [f"core/{m}.py" for m in ("reconcile", "commands", "fleet", "lab_reconciler", "class_reconciler")]
    for module in modules:
        used |= _scheduler_paths(ast.parse((SHARED / module).read_text()))
    assert used and used <= listed_paths, f"the controller calls {sorted(used - listed_paths)} outside the contract"
    fields = {f for fs in SCHEDULER_API.values() for f in fs}
    # transport.get("/json/…") is a call, checked above; Content-Type a request header
    read = {f for f in _fields_read(ast.Module(body=body, type_ignores=[])) if not f.startswith("/")} - {"Content-Type"}
    assert read <= fields, f"the dashboard adapter reads {sorted(read - fields)} outside the contract"
    assert {"desired_workers", "idle_since", "address"} <= read  # the check sees the adapter's reads
