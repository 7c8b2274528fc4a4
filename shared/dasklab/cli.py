"""The `dasklab` command: publish validated commands, show status, run the local controller and the demo."""

import argparse
import getpass
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from . import config as config_mod
from .errors import DasklabError, PermanentError, SchedulerUnreachable, TransientError


def _owner() -> str:
    return re.sub(r"[^a-z0-9_-]", "-", getpass.getuser().lower())[:63] or "nobody"


def build_start_lab(a) -> dict:
    """The start-lab message from command-line options (None values are left for the defaults)."""
    msg = {"v": 1, "type": "start-lab", "lab": a.lab, "owner": a.owner or _owner(),
           "workers": {k: v for k, v in (("initial", a.workers), ("min", a.min), ("max", a.max)) if v is not None},
           "machine_type": a.machine_type, "idle_timeout": a.idle_timeout, "max_lifetime": a.max_lifetime,
           "spot": a.spot or None}
    if a.values:
        msg["values"] = sys.stdin.read() if a.values == "-" else Path(a.values).read_text()
    if a.expose:
        msg["expose"] = {"source_ranges": a.expose}
    return {k: v for k, v in msg.items() if v is not None}


def _messages(a) -> dict:
    if a.cmd == "start-lab":
        return build_start_lab(a)
    if a.cmd == "stop-lab":
        return {"v": 1, "type": "stop-lab", "lab": a.lab}
    if a.cmd == "keep-alive":
        return {"v": 1, "type": "keep-alive", "lab": a.lab, **({"until": a.until} if a.until else {"for": a.for_})}
    if a.cmd == "scale":
        msg = {"v": 1, "type": "scale", "lab": a.lab, "min": a.min, "max": a.max, "pin": a.pin,
               "unpin": a.unpin or None}
        return {k: v for k, v in msg.items() if v is not None}
    return json.loads(sys.stdin.read() if a.file == "-" else Path(a.file).read_text())


def validate(payload: dict, cfg) -> None:
    """Refuse a command here with the very error the function would log (caps included)."""
    from .messages import Scale, StartLab, build_spec, check_caps, parse_command
    cmd = parse_command(payload)
    if isinstance(cmd, StartLab):
        build_spec(cmd, cfg)
    elif isinstance(cmd, Scale):
        check_caps(cmd, cfg)


def cmd_publish(a, cfg) -> int:
    payload = _messages(a)
    validate(payload, cfg)
    if cfg.backend == "gke":
        from .adapters import pubsub
        mid = pubsub.publish(cfg.project, cfg.control_topic, payload)
        where = f"projects/{cfg.project}/topics/{cfg.control_topic}"
    else:
        from .serve import publish_local, serve_info
        mid = publish_local(cfg.home, payload)
        where = f"the local controller ({serve_info(cfg.home)['bus']})"
    print(f"published {payload['type']} for {payload.get('lab', 'all labs')} to {where} (message {mid})")
    return 0


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "-"
    s = max(0, int(now - then))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fetch_status(cfg) -> list[dict]:
    """One row per lab: what `dasklab status` shows."""
    from .runtime import build_backend
    backend, now, rows = build_backend(cfg), time.time(), []
    for lab in backend.fetch_labs():
        load = None
        if lab.state.phase == "ready":
            try:
                load = backend.dashboard(lab).fetch_load()
            except (SchedulerUnreachable, TransientError):
                pass
        rows.append({
            "lab": lab.name, "owner": lab.spec.owner, "phase": lab.state.phase,
            "workers": {"current": load.workers if load else None, "target": lab.state.target_workers,
                        "min": lab.spec.min_workers, "max": lab.spec.max_workers},
            "processing": load.processing if load else None, "queued": load.queued if load else None,
            "idle_for": _ago(now, load.idle_since) if load and load.idle_since else "-",
            "age": _ago(now, lab.state.created_at), "dashboard": backend.connection_info(lab).get("dashboard"),
            "reason": lab.state.reason})
    return rows


def cmd_status(a, cfg) -> int:
    rows = fetch_status(cfg)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"dasklab labs ({cfg.backend})")
    for col in ("lab", "owner", "phase", "workers cur/target/min/max", "processing", "queued", "idle for", "age",
                "dashboard"):
        table.add_column(col)
    for r in rows:
        w = r["workers"]
        table.add_row(r["lab"], r["owner"], r["phase"],
                      f"{'-' if w['current'] is None else w['current']}/{w['target']}/{w['min']}/{w['max']}",
                      str(r["processing"] if r["processing"] is not None else "-"),
                      str(r["queued"] if r["queued"] is not None else "-"), r["idle_for"], r["age"],
                      r["dashboard"] or "-")
    Console(width=None if sys.stdout.isatty() else 200).print(table if rows else "no labs")
    return 0


def cmd_serve(a, cfg) -> int:
    from .serve import LocalController
    with LocalController(cfg.home, emulator=None if not a.no_emulator else False) as ctl:
        print(f"local controller running: bus={ctl.bus}, functions at {ctl.server.url}, home={cfg.home}")
        print("publish with `dasklab start-lab --lab NAME`; Ctrl-C stops it and every local lab")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping")
    return 0


def cmd_demo(a, cfg) -> int:
    from .demo import run_demo
    return run_demo(json_lines=a.json)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dasklab", description="Dask labs on GKE (or locally) driven by messages.")
    p.add_argument("--home", help="local state folder (default $DASKLAB_HOME or ~/.dasklab)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start-lab", help="provision a lab")
    s.add_argument("--lab", required=True)
    s.add_argument("--owner")
    s.add_argument("--workers", type=int, help="initial workers")
    s.add_argument("--min", type=int)
    s.add_argument("--max", type=int)
    s.add_argument("--machine-type")
    s.add_argument("--idle-timeout", help="e.g. 30m")
    s.add_argument("--max-lifetime", help="e.g. 8h")
    s.add_argument("--spot", action="store_true")
    s.add_argument("--values", help="Dask Helm chart values file (config.yaml), or - for stdin")
    s.add_argument("--expose", nargs="+", metavar="CIDR", help="public Jupyter, only from these networks")
    s = sub.add_parser("stop-lab", help="tear a lab down")
    s.add_argument("--lab", required=True)
    s = sub.add_parser("keep-alive", help="keep a lab from idle and nightly teardown")
    s.add_argument("--lab", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--until", help="an ISO time with zone, e.g. 2026-11-27T02:00:00Z")
    g.add_argument("--for", dest="for_", help="a duration, e.g. 4h")
    s = sub.add_parser("scale", help="change a lab's min/max or pin its worker count")
    s.add_argument("--lab", required=True)
    s.add_argument("--min", type=int)
    s.add_argument("--max", type=int)
    s.add_argument("--pin", type=int)
    s.add_argument("--unpin", action="store_true")
    s = sub.add_parser("publish", help="publish a raw JSON message (validated first)")
    s.add_argument("file", help="a JSON file, or - for stdin")
    s = sub.add_parser("status", help="show every lab")
    s.add_argument("--json", action="store_true")
    local = sub.add_parser("local", help="the local controller").add_subparsers(dest="local_cmd", required=True)
    s = local.add_parser("serve", help="run the local controller until Ctrl-C")
    s.add_argument("--no-emulator", action="store_true", help="use direct push even if the emulator exists")
    s = sub.add_parser("demo", help="the whole lab story on real Dask, in under two minutes")
    s.add_argument("--json", action="store_true", help="print the timeline as JSON lines")
    return p


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwind, so the demo and `local serve` stop what they started


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    a = parser().parse_args(argv)
    if a.home:
        os.environ["DASKLAB_HOME"] = a.home
    try:
        cfg = config_mod.from_env()
        handler = {"start-lab": cmd_publish, "stop-lab": cmd_publish, "keep-alive": cmd_publish,
                   "scale": cmd_publish, "publish": cmd_publish, "status": cmd_status, "demo": cmd_demo,
                   "local": cmd_serve}[a.cmd]
        return handler(a, cfg)
    except (DasklabError, OSError, ValueError) as e:
        print(f"dasklab: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, PermanentError) else 1


if __name__ == "__main__":
    sys.exit(main())
