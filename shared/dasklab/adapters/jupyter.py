"""Adapter for Jupyter Server: start one for a local lab (with any python), and read its activity over its REST API
(/api/status, /api/kernels) behind any dashboard Transport — plain HTTP locally, the service proxy on GKE."""

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from dasklab.adapters.procs import LOCALHOST, spawn, stop_pid_group, wait_for_report
from dasklab.core.errors import JupyterUnreachable, NoEndpoints, SchedulerUnreachable
from dasklab.core.model import NO_JUPYTER, JupyterActivity

JUPYTER_START_S = 120.0  # until Jupyter Server writes its server file (the port it serves on)
STOP_TIMEOUT_S = 20.0  # on SIGTERM Jupyter shuts its kernels down (a busy one is killed after ~5 s)


def jupyter_available(python: str) -> bool:
    """Whether `python` can run JupyterLab (the `dasklab[jupyter]` extra)."""
    if python == sys.executable:
        return importlib.util.find_spec("jupyterlab") is not None
    return subprocess.run([python, "-c", "import jupyterlab"], capture_output=True, check=False).returncode == 0


def write_token(path: Path, token: str) -> None:
    """The login token, readable by this user only (Jupyter reads it through JUPYTER_TOKEN_FILE)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


def start_jupyter(python: str, *, port: int = 0, token_file: Path, root_dir: Path, runtime_dir: Path,
                  scheduler_address: str, env: dict, log_path: Path) -> tuple[int, int] | None:
    """Start JupyterLab with `python` (its kernels run that python too) on 127.0.0.1:`port` (0: one the OS gives
    it), logging in with the token in `token_file`, DASK_SCHEDULER_ADDRESS set (so `distributed.Client()` joins the
    lab), and wait for its server file in the runtime dir (the lab's own; connection files too): (pid, the port it
    serves on), the pid to stop with `stop_jupyter`. None if it exited first (a taken `port`: it tries no other);
    TransientError if it writes nothing in time. The token is never on the command line."""
    root_dir.mkdir(parents=True, exist_ok=True)
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = [python, "-m", "jupyterlab", "--no-browser", f"--ServerApp.ip={LOCALHOST}", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root_dir}"]
    if os.geteuid() == 0:  # Jupyter refuses to run as root without it (CI runs as root)
        argv.append("--allow-root")
    full_env = {**env, "JUPYTER_TOKEN_FILE": str(token_file), "JUPYTER_RUNTIME_DIR": str(runtime_dir),
                "DASK_SCHEDULER_ADDRESS": scheduler_address}
    full_env.pop("JUPYTER_TOKEN", None)
    pid = spawn(argv, env=full_env, log_path=log_path)
    (runtime_dir / "server.pid").write_text(str(pid))  # known before it is recorded: a lab's stop finds it
    # jupyter_server 2 writes jpserver-<pid>.json (ServerApp.info_file) with the port it chose, then binds it
    try:
        report = wait_for_report(pid, runtime_dir / f"jpserver-{pid}.json", JUPYTER_START_S, what="Jupyter Server")
    except TimeoutError as e:
        stop_jupyter(pid)
        raise JupyterUnreachable(f"{e}; log {log_path}") from None
    return (pid, int(report["port"])) if report else None


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Jupyter's kernels, each in a session of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop_jupyter(pid: int) -> None:
    """Stop the Jupyter Server `pid` (read from a record: nothing is signalled unless it still runs JupyterLab) and
    its kernels: SIGTERM lets it shut them down; any kernel still alive after the server is gone is stopped too (a
    kernel runs in its own session, outside the server's process group)."""
    kernels = _children(pid)
    if stop_pid_group(pid, timeout=STOP_TIMEOUT_S, expect="jupyterlab"):
        for kernel in kernels:
            stop_pid_group(kernel, expect="kernel")


def _epoch(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


class JupyterApi:
    """A Jupyter Server's REST API behind a transport. The token goes in the query string (the API server's proxy
    strips Authorization headers, kubernetes#38775) and never into an error message."""

    def __init__(self, transport, token: str):
        self.transport, self.token = transport, token

    def _get(self, path: str):
        sep = "&" if "?" in path else "?"
        try:
            raw = self.transport.get(f"{path}{sep}token={self.token}")
            return json.loads(raw)
        except NoEndpoints:
            raise
        except SchedulerUnreachable as e:
            raise JupyterUnreachable(str(e).replace(self.token, "…")) from None
        except ValueError:
            raise JupyterUnreachable(f"{path}: not JSON") from None

    def fetch_activity(self) -> JupyterActivity:
        """Two calls that Jupyter does not count as activity: /api/status (untracked) and /api/kernels with
        no_track_activity=1 (what JupyterHub's culler passes). NO_JUPYTER when no pod is behind the Service."""
        try:
            status = self._get("/api/status")
            kernels = self._get("/api/kernels?no_track_activity=1")
        except NoEndpoints:
            return NO_JUPYTER
        stamps = [_epoch(status.get("last_activity"))] + [_epoch(k.get("last_activity")) for k in kernels]
        stamps = [s for s in stamps if s is not None]
        return JupyterActivity(last_activity=max(stamps) if stamps else None, kernels=len(kernels),
                               busy_kernels=sum(k.get("execution_state") == "busy" for k in kernels))
