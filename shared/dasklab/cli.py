"""The `dasklab` command: publish validated commands, show status, deploy to Google Cloud, run the local lab."""

import argparse
import getpass
import json
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from dasklab.core import config as config_mod
from dasklab.core.errors import DasklabError, PermanentError, SchedulerUnreachable, TransientError, ValidationError


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
    from dasklab.core.messages import Scale, StartLab, build_spec, check_caps, parse_command
    cmd = parse_command(payload)
    if isinstance(cmd, StartLab):
        build_spec(cmd, cfg)
    elif isinstance(cmd, Scale):
        check_caps(cmd, cfg)


def cmd_publish(a, cfg) -> int:
    payload = _messages(a)
    validate(payload, cfg)
    if cfg.backend == "gke":
        from dasklab.adapters import pubsub
        mid = pubsub.publish(cfg.project, cfg.control_topic, payload)
        where = f"projects/{cfg.project}/topics/{cfg.control_topic}"
    else:
        from dasklab.local.serve import publish_local, serve_info
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
    from dasklab.runtime import build_backend
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
            "dask": backend.connection_info(lab).get("dask_version"),
            "reason": lab.state.reason})
    return rows


def print_table(title: str, columns: tuple[str, ...], rows: list[tuple], empty: str = "nothing") -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(("-" if v is None else str(v)) for v in row))
    Console(width=None if sys.stdout.isatty() else 200).print(table if rows else empty)


@contextmanager
def progress(what: str):
    """A spinner on a terminal (a line otherwise) while something slow runs."""
    from rich.console import Console
    console = Console(stderr=True)
    if not console.is_terminal:
        print(f"{what} …", file=sys.stderr)
        yield
        return
    with console.status(what):
        yield


def cmd_status(a, cfg) -> int:
    rows = fetch_status(cfg)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"dasklab labs ({cfg.backend})")
    for col in ("lab", "owner", "phase", "workers cur/target/min/max", "processing", "queued", "idle for", "age",
                "dashboard", "dask"):
        table.add_column(col)
    for r in rows:
        w = r["workers"]
        table.add_row(r["lab"], r["owner"], r["phase"],
                      f"{'-' if w['current'] is None else w['current']}/{w['target']}/{w['min']}/{w['max']}",
                      str(r["processing"] if r["processing"] is not None else "-"),
                      str(r["queued"] if r["queued"] is not None else "-"), r["idle_for"], r["age"],
                      r["dashboard"] or "-", r["dask"] or "-")
    Console(width=None if sys.stdout.isatty() else 200).print(table if rows else "no labs")
    return 0


def cmd_serve(a, cfg) -> int:
    from dasklab.local.serve import LocalController
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
    from dasklab.local.demo import run_demo
    return run_demo(json_lines=a.json)


# --- Google Cloud: infrastructure, deployment, teardown, connection -----------------------------------

def _require_project(cfg) -> None:
    if not cfg.project:
        raise ValidationError("project", "give a Google Cloud project with --project, DASKLAB_PROJECT or "
                                         "GOOGLE_CLOUD_PROJECT")


def print_changes(title: str, changes) -> None:
    print_table(title, ("kind", "name", "action", "diff"), [(c.kind, c.name, c.action, c.diff) for c in changes])


def cmd_infra(a, cfg) -> int:
    """`infra apply [--dry-run]` / `infra destroy`: dasklab's topics, dead-letter subscription and timers."""
    from dasklab.cloud import infra
    from dasklab.local.timers import load_infra
    _require_project(cfg)
    infra.build_desired(load_infra(), cfg.project, cfg.region, nightly_at=cfg.nightly_at,
                        time_zone=cfg.nightly_time_zone)  # refuse bad settings before any client is built
    clients = infra.default_clients()
    where = f"{cfg.project} ({cfg.region})"
    if a.infra_cmd == "destroy":
        with progress(f"deleting dasklab's timers, subscriptions and topics on {where}"):
            changes = infra.destroy(cfg.project, cfg.region, clients)
        print_changes(f"infra destroy on {where}", changes)
        return 0
    with progress(f"{'planning' if a.dry_run else 'applying'} dasklab's topics and timers on {where}"):
        changes = infra.run(cfg.project, cfg.region, clients, dry_run=a.dry_run, nightly_at=cfg.nightly_at,
                            time_zone=cfg.nightly_time_zone)
    print_changes(f"infra {'plan (dry run: nothing written)' if a.dry_run else 'apply'} on {where}", changes)
    return 0


def deploy_steps(a, cfg) -> list:
    """What `dasklab deploy` runs: the identity of infra/iam.yaml, then cloudbuild.yaml's steps (or a build)."""
    from dasklab.cloud import deploy
    from dasklab.local.timers import load_infra
    build, iam = deploy.load_build(), deploy.load_iam()
    values = deploy.substitutions(build, cfg.project, {
        "_REGION": cfg.region, "_LOCATION": cfg.location, "_CONTROL_TOPIC": load_infra()["topics"]["control"],
        "_SERVICE_ACCOUNT": iam["accounts"]["controller"]["account"],
        "_NODE_SERVICE_ACCOUNT": iam["accounts"]["nodes"]["account"], "_NIGHTLY_AT": cfg.nightly_at,
        "_TIME_ZONE": cfg.nightly_time_zone})
    steps = []
    if not a.skip_identity:
        number = "PROJECT_NUMBER" if a.dry_run else deploy.fetch_project_number(cfg.project)
        steps += deploy.build_iam_steps(iam, cfg.project) + deploy.build_service_agent_steps(iam, cfg.project, number)
    if a.cloud_build:
        return steps + [deploy.cloud_build_step(values)]
    return steps + deploy.build_steps(build, values, skip=("test",) if a.skip_tests else ())


def cmd_deploy(a, cfg) -> int:
    from dasklab.cloud import deploy
    _require_project(cfg)
    steps = deploy_steps(a, cfg)
    if a.dry_run:
        for n, step in enumerate(steps, 1):
            guard = f"  # unless `{' '.join(step.unless)}` succeeds" if step.unless else ""
            print(f"[{n}/{len(steps)}] {step.id}: {step}{guard}")
        return 0
    deploy.run_steps(steps)
    print(f"dasklab is deployed on {cfg.project} ({cfg.region}): start a lab with `dasklab start-lab --lab NAME`")
    return 0


def cmd_destroy(a, cfg) -> int:
    """Delete the function(s) and what `infra` created; refuses while managed labs exist unless --force."""
    from dasklab.cloud import deploy, infra
    from dasklab.runtime import build_backend
    _require_project(cfg)
    backend = build_backend(replace(cfg, backend="gke"))
    labs = backend.fetch_labs()
    if labs:
        print_table(f"managed labs on {cfg.project}", ("lab", "owner", "phase"),
                    [(lab.name, lab.spec.owner, lab.state.phase) for lab in labs])
        if not a.force:
            raise PermanentError(f"{len(labs)} managed lab(s) still exist: stop them with `dasklab stop-lab --lab "
                                 f"NAME`, or pass --force to delete them with everything else")
    deploy.run_steps(deploy.delete_function_steps(deploy.load_build(), cfg.project, cfg.region))
    with progress(f"deleting {len(labs)} lab(s)"):
        for lab in labs:  # after the function is gone, so no invocation recreates anything
            backend.apply_delete(lab)
    with progress(f"deleting dasklab's timers, subscriptions and topics on {cfg.project}"):
        changes = infra.destroy(cfg.project, cfg.region, infra.default_clients())
    print_changes(f"destroyed on {cfg.project}", changes)
    accounts = ", ".join(i["account"] for i in deploy.load_iam()["accounts"].values())
    print(f"kept the service accounts ({accounts}): delete them with `gcloud iam service-accounts delete`")
    return 0


def cmd_connect(a, cfg) -> int:
    """What a student needs to reach a lab: from the backend's connection_info (never a secret itself)."""
    from dasklab.runtime import build_backend
    backend = build_backend(cfg)
    lab = backend.fetch_lab(a.lab)
    if lab is None:
        raise PermanentError(f"no lab named {a.lab!r} on the {cfg.backend} backend: see `dasklab status`")
    info = backend.connection_info(lab)
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"lab {lab.name} ({lab.state.phase}, owner {lab.spec.owner}, {cfg.backend} backend)")
    for key, value in info.items():
        print(f"{key}: {value if isinstance(value, str) else json.dumps(value)}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dasklab", description="Dask labs on GKE (or locally) driven by messages.")
    p.add_argument("--home", help="local state folder (default $DASKLAB_HOME or ~/.dasklab)")
    gcp = argparse.ArgumentParser(add_help=False)
    gcp.add_argument("--project", help="Google Cloud project (default $DASKLAB_PROJECT or $GOOGLE_CLOUD_PROJECT)")
    gcp.add_argument("--region", help="region of the functions and timers (default $DASKLAB_REGION, "
                                      "else the region of $DASKLAB_LOCATION, else us-central1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start-lab", parents=[gcp], help="provision a lab")
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
    s = sub.add_parser("stop-lab", parents=[gcp], help="tear a lab down")
    s.add_argument("--lab", required=True)
    s = sub.add_parser("keep-alive", parents=[gcp], help="keep a lab from idle and nightly teardown")
    s.add_argument("--lab", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--until", help="an ISO time with zone, e.g. 2026-11-27T02:00:00Z")
    g.add_argument("--for", dest="for_", help="a duration, e.g. 4h")
    s = sub.add_parser("scale", parents=[gcp], help="change a lab's min/max or pin its worker count")
    s.add_argument("--lab", required=True)
    s.add_argument("--min", type=int)
    s.add_argument("--max", type=int)
    s.add_argument("--pin", type=int)
    s.add_argument("--unpin", action="store_true")
    s = sub.add_parser("publish", parents=[gcp], help="publish a raw JSON message (validated first)")
    s.add_argument("file", help="a JSON file, or - for stdin")
    s = sub.add_parser("status", parents=[gcp], help="show every lab")
    s.add_argument("--json", action="store_true")
    local = sub.add_parser("local", help="the local controller").add_subparsers(dest="local_cmd", required=True)
    s = local.add_parser("serve", help="run the local controller until Ctrl-C")
    s.add_argument("--no-emulator", action="store_true", help="use direct push even if the emulator exists")
    s = sub.add_parser("connect", parents=[gcp], help="how to reach a lab's Jupyter and dashboard")
    s.add_argument("lab")
    s.add_argument("--json", action="store_true")
    infra = sub.add_parser("infra", help="dasklab's topics and timers on Google Cloud").add_subparsers(
        dest="infra_cmd", required=True)
    s = infra.add_parser("apply", parents=[gcp], help="create or update them (idempotent)")
    s.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    infra.add_parser("destroy", parents=[gcp], help="delete exactly what apply creates")
    s = sub.add_parser("deploy", parents=[gcp], help="identity, then cloudbuild.yaml's steps: tests, functions, infra")
    s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    s.add_argument("--cloud-build", action="store_true", help="run the build on Cloud Build (gcloud builds submit)")
    s.add_argument("--skip-tests", action="store_true", help="leave out the build's test step")
    s.add_argument("--skip-identity", action="store_true",
                   help="leave out creating the service accounts and granting their roles (infra/iam.yaml)")
    s = sub.add_parser("destroy", parents=[gcp], help="delete the functions and the infra (not the accounts)")
    s.add_argument("--force", action="store_true", help="also delete every managed lab")
    s = sub.add_parser("demo", help="the whole lab story on real Dask, in under two minutes")
    s.add_argument("--json", action="store_true", help="print the timeline as JSON lines")
    return p


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwind, so the demo and `local serve` stop what they started


def _cloud_errors() -> tuple[type, ...]:
    """Google API and credential errors, if their SDKs were imported (evaluated only when something failed)."""
    found = []
    for module, name in (("google.api_core.exceptions", "GoogleAPICallError"),
                         ("google.auth.exceptions", "GoogleAuthError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    a = parser().parse_args(argv)
    for option, variable in (("home", "DASKLAB_HOME"), ("project", "DASKLAB_PROJECT"), ("region", "DASKLAB_REGION")):
        if getattr(a, option, None):
            os.environ[variable] = getattr(a, option)
    try:
        cfg = config_mod.from_env()
        handler = {"start-lab": cmd_publish, "stop-lab": cmd_publish, "keep-alive": cmd_publish,
                   "scale": cmd_publish, "publish": cmd_publish, "status": cmd_status, "demo": cmd_demo,
                   "local": cmd_serve, "connect": cmd_connect, "infra": cmd_infra, "deploy": cmd_deploy,
                   "destroy": cmd_destroy}[a.cmd]
        return handler(a, cfg)
    except (DasklabError, OSError, ValueError, *_cloud_errors()) as e:
        print(f"dasklab: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, PermanentError) else 1


if __name__ == "__main__":
    sys.exit(main())
