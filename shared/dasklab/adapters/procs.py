"""Adapter for local processes (Pub/Sub emulator, functions-framework) used by the local backend, demo and tests."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
EMULATOR_ENV = "DASKLAB_PUBSUB_EMULATOR"
_LAUNCHER = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")

# functions-framework 3.10 serves with gunicorn: WORKERS processes x THREADS threads (gthread worker),
# CLOUD_RUN_TIMEOUT_SECONDS=0 disables gunicorn's timeout. We pin them so a long request never blocks
# the others and the behaviour does not depend on the CPU count (its default is THREADS = 4 x CPUs).
# GUNICORN_LOG_LEVEL=info makes it log "Listening at: …", which tells us the port it bound (it is ours).
FUNCTIONS_SERVER_ENV = {"WORKERS": "1", "THREADS": "8", "CLOUD_RUN_TIMEOUT_SECONDS": "0",
                        "GUNICORN_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"}


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Call `predicate` until it returns something truthy, and return that; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready after {timeout}s")
        time.sleep(interval)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a group of another user: it exists, but it is not ours to stop
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(pgid: int, timeout: float, reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM the group, wait up to `timeout` s for it to vanish, then SIGKILL it. Never raises."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap()  # a zombie leader we started still counts as a member until it is reaped
        if not _group_exists(pgid):
            return
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        reap()
        if not _group_exists(pgid):
            return
        time.sleep(0.05)


def _cmdline(pid: int) -> str | None:
    try:
        for _ in range(20):  # reads as empty for a moment while the process is exec'ing
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            if raw:
                return raw.replace(b"\0", b" ").decode(errors="replace")
            time.sleep(0.01)
        return None
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None
    except OSError:
        return None
    try:  # no /proc (macOS)
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def stop_pid_group(pid: int, timeout: float = 5.0, *, expect: str | None = None) -> bool:
    """Stop the process group led by `pid`, a process started by a `Proc` (maybe by another process).

    For a pid read from disk, pass `expect`, a substring of the leader's command line: the pid may have
    been reused since it was recorded (after a reboot, say); when the leader is gone or runs something
    else, nothing is signalled. Returns True when a group was signalled. Never raises if it is gone.
    """
    if pid <= 1 or pid == os.getpgrp():
        raise ValueError(f"refusing to stop process group {pid}")
    if not _group_exists(pid):
        return False
    if expect is not None:
        try:
            is_leader = os.getpgid(pid) == pid
        except ProcessLookupError:
            return False
        cmd = _cmdline(pid)
        if not is_leader or cmd is None or expect not in cmd:
            return False
    _stop_group(pid, timeout, reap=lambda: _reap(pid))
    return True


def _reap(pid: int) -> None:
    """Reap `pid` if it is our own exited child (else its zombie would keep the group alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class Proc:
    """A child process in its own process group (session), stopped with all the processes it started."""

    def __init__(self, popen: subprocess.Popen, name: str = "", log_path: Path | None = None, log_offset: int = 0):
        self.popen, self.name, self.log_path = popen, name or str(popen.args), log_path
        self.log_offset = log_offset  # where this run's output starts in an appended log
        self._stopped = False

    @classmethod
    def spawn(cls, argv: list[str], *, log_path: Path, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, name: str = "") -> Proc:
        """Start `argv` in a new session, stdout and stderr appended to `log_path` (never a pipe)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            offset = log.tell()
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
        return cls(popen, name, log_path, offset)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the whole group, wait up to `timeout` s, then SIGKILL it. Idempotent, never raises."""
        if self._stopped:  # the group is gone: its id may be reused by now, never signal it again
            return
        _stop_group(self.pid, timeout, reap=self.popen.poll)
        try:
            self.popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed processes always exit
            return
        self._stopped = not _group_exists(self.pid)

    def log_text(self) -> str:
        """What this run wrote to its log so far."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, alive={self.alive()})"


def _wait_ready(proc: Proc, ready: Callable[[], bool], timeout: float, what: str,
                failed: Callable[[], bool] = lambda: False) -> None:
    """Wait until `ready()`; RuntimeError with the log tail if the process exits, `failed()`, or times out."""
    def check() -> bool:
        if ready():
            return True
        if not proc.alive():
            raise RuntimeError(f"{what} exited with code {proc.popen.returncode}; log {proc.log_path}:\n"
                               f"{proc.log_tail()}")
        if failed():
            raise RuntimeError(f"{what} failed to start; log {proc.log_path}:\n{proc.log_tail()}")
        return False

    try:
        wait_until(check, timeout, what=what)
    except TimeoutError as exc:
        proc.stop(timeout=1.0)  # nothing in flight to finish (gunicorn ignores SIGTERM while retrying a bind)
        raise RuntimeError(f"{exc}; log {proc.log_path}:\n{proc.log_tail()}") from None
    except BaseException:
        proc.stop(timeout=1.0)
        raise


def _http_get(port: int) -> tuple[int, bytes] | None:
    """GET / on 127.0.0.1:`port` → (status, stripped body), None if no HTTP answer (ignores *_proxy)."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=1.0)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read().strip()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _unused_port() -> int:
    """A port free on 127.0.0.1 a moment ago, for the Java emulators only: asked for port 0, they bind one but log
    and report "listening on 0" (measured here), so we cannot learn theirs. Another process may take it first:
    `_spawn_listening` retries then."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _spawn_listening(argv: Callable[[int], list[str]], *, log_path: Path, env: Mapping[str, str] | None,
                     name: str, listening: str, ready: Callable[[int], bool], port_taken: str, timeout: float,
                     port: Callable[[], int] = lambda: 0) -> tuple[Proc, int]:
    """Start `argv(port())` (0: a port the OS gives it) and read the port it bound from its log (the regex
    `listening`, group 1), so that it is our process that holds it; ready once `ready(port)` too. A port named in
    advance (`port` given) may be taken by another process first: retry twice when the log says `port_taken`.
    RuntimeError with the log tail otherwise."""
    for attempt in range(3):
        proc = Proc.spawn(argv(port()), log_path=log_path, env=env, name=name)

        def bound(proc: Proc = proc) -> int | None:
            found = re.search(listening, proc.log_text())
            return int(found.group(1)) if found else None
        try:
            _wait_ready(proc, lambda bound=bound: (at := bound()) is not None and ready(at), timeout, what=name,
                        failed=lambda proc=proc: port_taken in proc.log_text())
        except RuntimeError as exc:
            if attempt < 2 and port_taken in str(exc):
                continue
            raise
        return proc, bound()
    raise AssertionError("unreachable")  # pragma: no cover


# --- Pub/Sub emulator -------------------------------------------------------------------------------

def _sdk_roots() -> list[Path]:
    roots = []
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(Path(gcloud).resolve().parent.parent)  # <root>/bin/gcloud
    roots += [Path("/usr/lib/google-cloud-sdk"), Path("/usr/share/google-cloud-sdk"),
              Path.home() / "google-cloud-sdk"]
    return roots


def find_pubsub_emulator() -> list[str] | None:
    """The command that launches the Pub/Sub emulator, or None (no launcher, or no `java` on PATH).

    $DASKLAB_PUBSUB_EMULATOR (a path to the launcher) wins when set; otherwise the launcher of the
    Google Cloud CLI's `pubsub-emulator` component.
    """
    if shutil.which("java") is None:
        return None
    configured = os.environ.get(EMULATOR_ENV)
    if configured:
        path = Path(configured).expanduser()
        return [str(path)] if path.is_file() and os.access(path, os.X_OK) else None
    for root in _sdk_roots():
        launcher = root / _LAUNCHER
        if launcher.is_file() and os.access(launcher, os.X_OK):
            return [str(launcher)]
    return None


class _Served:
    """A server process of ours: stopped with its process group, usable as a context manager."""

    proc: Proc

    def stop(self, timeout: float = 5.0) -> None:
        self.proc.stop(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Emulator(_Served):
    """A running Pub/Sub emulator. Clients reach it with PUBSUB_EMULATOR_HOST=`host` (see `env`)."""

    host: str
    project: str
    proc: Proc
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def env(self) -> dict[str, str]:
        return {"PUBSUB_EMULATOR_HOST": self.host, "PUBSUB_PROJECT_ID": self.project}


def start_pubsub_emulator(data_dir: Path, project: str = "dasklab-local", *, timeout: float = 30.0) -> Emulator:
    """Start the emulator on 127.0.0.1 on a free port; its log goes to `data_dir`/pubsub-emulator.log.

    The emulator keeps everything in memory: the launcher has no data-dir flag (only --host, --port,
    --iam_host, --iam_port, --projects), so `data_dir` only holds the log. Any project id is accepted.
    """
    cmd = find_pubsub_emulator()
    if cmd is None:
        raise RuntimeError("Pub/Sub emulator unavailable: install Java and the Google Cloud CLI component "
                           f"'pubsub-emulator', or set {EMULATOR_ENV} to its launcher")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "pubsub-emulator.log"
    # on a taken port the JVM logs a BindException and keeps running: the log tells, not the exit code
    proc, port = _spawn_listening(lambda port: [*cmd, f"--host={LOCALHOST}", f"--port={port}"],
                                  log_path=log_path, env=None, name="Pub/Sub emulator",
                                  listening=r"Server started, listening on (\d+)", port=_unused_port,
                                  ready=lambda port: _http_get(port) == (200, b"Ok"),
                                  port_taken="java.net.BindException", timeout=timeout)
    return Emulator(host=f"{LOCALHOST}:{port}", project=project, proc=proc, log_path=log_path)


# --- Firestore emulator (the GKE backend's tombstone store, run for real in tests) ----------------------

_FIRESTORE_LAUNCHER = Path("platform/cloud-firestore-emulator/cloud_firestore_emulator")


def find_firestore_emulator() -> list[str] | None:
    """The command that launches the Google Cloud CLI's Firestore emulator (Java 17), or None."""
    if shutil.which("java") is None:
        return None
    for root in _sdk_roots():
        launcher = root / _FIRESTORE_LAUNCHER
        if launcher.is_file() and os.access(launcher, os.X_OK):
            return [str(launcher), "start"]
    return None


@dataclass
class FirestoreEmulator(_Served):
    """A running Firestore emulator; clients reach it with FIRESTORE_EMULATOR_HOST=`host`."""

    host: str
    proc: Proc
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {"FIRESTORE_EMULATOR_HOST": self.host}


def start_firestore_emulator(data_dir: Path, *, timeout: float = 60.0) -> FirestoreEmulator:
    """Start the Firestore emulator on 127.0.0.1 on a free port (in memory; its log in `data_dir`)."""
    cmd = find_firestore_emulator()
    if cmd is None:
        raise RuntimeError("Firestore emulator unavailable: install Java and the Google Cloud CLI component "
                           "'cloud-firestore-emulator'")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "firestore-emulator.log"
    proc, port = _spawn_listening(lambda port: [*cmd, f"--host={LOCALHOST}", f"--port={port}"],
                                  log_path=log_path, env=None, name="Firestore emulator",
                                  listening=rf"API endpoint: http://{re.escape(LOCALHOST)}:(\d+)", port=_unused_port,
                                  ready=lambda port: _http_get(port) == (200, b"Ok"),
                                  port_taken="java.net.BindException", timeout=timeout)
    return FirestoreEmulator(host=f"{LOCALHOST}:{port}", proc=proc, log_path=log_path)


# --- functions-framework server ---------------------------------------------------------------------

@dataclass
class FunctionsServer(_Served):
    """A functions-framework server for one CloudEvent target, on 127.0.0.1."""

    url: str
    port: int
    proc: Proc
    log_path: Path = field(repr=False)


def start_functions_server(target: str, source: Path, *, env: Mapping[str, str] | None = None, log_path: Path,
                           timeout: float = 30.0) -> FunctionsServer:
    """Serve `target` from `source` with functions-framework (gunicorn, 1 worker x 8 threads, no request
    timeout; override with WORKERS, THREADS, CLOUD_RUN_TIMEOUT_SECONDS in `env`), once the port accepts.

    `env` is added to this process's environment. Raises RuntimeError with the log tail when it fails.
    """
    full_env = {**os.environ, **FUNCTIONS_SERVER_ENV, **(env or {})}

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "functions_framework", "--target", target, "--source", str(source),
                "--signature-type", "cloudevent", "--host", LOCALHOST, "--port", str(port)]

    # asked for port 0, gunicorn logs "Listening at: http://127.0.0.1:<the port it bound>" (info), then any HTTP
    # answer to GET / (405 for a CloudEvent target) means a worker serves
    proc, port = _spawn_listening(argv, log_path=Path(log_path), env=full_env, name=f"functions-framework {target}",
                                  listening=rf"Listening at: http://{re.escape(LOCALHOST)}:(\d+)",
                                  ready=lambda port: _http_get(port) is not None,
                                  port_taken="Connection in use", timeout=timeout)
    return FunctionsServer(url=f"http://{LOCALHOST}:{port}/", port=port, proc=proc, log_path=Path(log_path))


# --- processes recorded on disk (the local lab's scheduler and workers) --------------------------------

EXIT_NOTE = "[dasklab] process exited with code "


def spawn(argv: list[str], *, env: Mapping[str, str] | None = None, log_path: Path, note_exit: bool = False) -> int:
    """Start a long-lived process in its own group and return its pid, to be recorded and stopped later
    (possibly by another process) with `stop_pid_group`.

    With `note_exit`, the pid is a shell's that runs `argv` and, when it ends on its own, appends EXIT_NOTE and its
    exit code to the log (128 + N when killed by signal N, as container runtimes report it): the code outlives the
    process that started it, which a pid read from a record cannot wait for."""
    if note_exit:
        argv = ["/bin/sh", "-c", f'"$@"; echo "{EXIT_NOTE}$?"', "sh", *argv]
    return Proc.spawn(argv, log_path=log_path, env=env).pid


def read_report(path: Path) -> dict | None:
    """The JSON object a process wrote to `path`, or None while it is missing or half written."""
    try:
        report = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) else None


def wait_for_report(pid: int, path: Path, timeout: float, what: str) -> dict | None:
    """What process `pid` writes to `path` once it listens: the ports it bound, those the OS gave it when it asked
    for port 0 (a port found free and released can be taken by another process before it is bound, so we never pick
    one). None if `pid` exits first (an explicit port was taken, say); TimeoutError after `timeout` s (it runs on)."""
    deadline = time.monotonic() + timeout
    while (report := read_report(path)) is None:
        if not pid_alive(pid):
            return None
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} (pid {pid}) wrote no {path.name} in {timeout}s")
        time.sleep(0.05)
    return report


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (a zombie counts as gone, and is reaped if it is our child)."""
    _reap(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
