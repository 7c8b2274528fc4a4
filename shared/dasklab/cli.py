"""The `dasklab` command: publish validated commands, show status, deploy to Google Cloud, run the local lab."""

import argparse
import getpass
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from dasklab.report import _span, fetch_class_report, fetch_class_status, fetch_status, \
    print_class_report
from dasklab.core import config as config_mod
from dasklab.core.errors import DasklabError, PermanentError
from dasklab.cli_cloud import cmd_connect, cmd_deploy, cmd_destroy, cmd_infra


DEFAULT_WAIT_S = 10.0  # how long a command waits for its outcome by default (a cold function can take seconds)


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
    if a.mixed_environment:
        msg["mixed_environment"] = True
    return {k: v for k, v in msg.items() if v is not None}


def build_update_lab(a) -> dict:
    """The update-lab message: the lab's new chart values (config.yaml), and what the sender accepts."""
    msg = {"v": 1, "type": "update-lab", "lab": a.lab,
           "values": sys.stdin.read() if a.values == "-" else Path(a.values).read_text()}
    if a.restart:
        msg["restart"] = True
    if a.mixed_environment:
        msg["mixed_environment"] = True
    return msg


def read_roster(path: str) -> list[str]:
    """A roster file: one student per line (blank lines and `#` comments skipped), or - for stdin."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def build_start_class(a) -> dict:
    """The start-class message: the roster file's students, and the per-student template from the options."""
    msg = {"v": 1, "type": "start-class", "class": a.class_, "owner": a.owner or _owner(),
           "roster": read_roster(a.roster),
           "workers": {k: v for k, v in (("initial", a.workers), ("min", a.min), ("max", a.max)) if v is not None},
           "machine_type": a.machine_type, "idle_timeout": a.idle_timeout, "max_lifetime": a.max_lifetime,
           "spot": a.spot or None, "at": a.at, "duration": a.duration, "placement": a.placement}
    budget = {k: v for k, v in (("student", a.budget_student), ("class", a.budget_class)) if v is not None}
    if budget:
        msg["budget"] = budget
    if a.values:
        msg["values"] = Path(a.values).read_text()
    return {k: v for k, v in msg.items() if v is not None}


def _messages(a) -> dict:
    if a.cmd == "start-lab":
        return build_start_lab(a)
    if a.cmd == "start-class":
        return build_start_class(a)
    if a.cmd == "stop-class":
        return {"v": 1, "type": "stop-class", "class": a.class_}
    if a.cmd == "update-lab":
        return build_update_lab(a)
    if a.cmd == "stop-lab":
        return {"v": 1, "type": "stop-lab", "lab": a.lab}
    if a.cmd == "keep-alive":
        return {"v": 1, "type": "keep-alive", **({"lab": a.lab} if a.lab else {"class": a.class_}),
                **({"until": a.until} if a.until else {"for": a.for_})}
    if a.cmd == "scale":
        msg = {"v": 1, "type": "scale", "lab": a.lab, "min": a.min, "max": a.max, "pin": a.pin,
               "unpin": a.unpin or None}
        return {k: v for k, v in msg.items() if v is not None}
    return json.loads(sys.stdin.read() if a.file == "-" else Path(a.file).read_text())


def validate(payload: dict, cfg) -> None:
    """Refuse a command here with the very error the function would log (caps included)."""
    from dasklab.core.environment import check_environment
    from dasklab.core.messages import Scale, StartClass, StartLab, UpdateLab, parse_command
    from dasklab.core.specs import build_spec, check_caps
    cmd = parse_command(payload)
    if isinstance(cmd, (StartLab, StartClass)):
        spec = build_spec(cmd.student_lab(cmd.roster[0]) if isinstance(cmd, StartClass) else cmd, cfg)
        for note in spec.notes:  # what the controller will replace, said before sending
            print(f"note: {note}", file=sys.stderr)
    elif isinstance(cmd, UpdateLab):
        for note in check_environment(cmd.values, cmd.mixed_environment, cmd.lab):  # the rest needs the lab: the controller
            print(f"note: {note}", file=sys.stderr)
    elif isinstance(cmd, Scale):
        check_caps(cmd, cfg)


def _replies(cfg, request_id: str, wait: float, delete: bool = True):
    """Where this command's outcome will appear: the status topic (Google Cloud or the emulator) or the local
    status file; listening starts before the command is published, so nothing is missed. An operator may not
    delete subscriptions (`delete=False`): theirs expires by itself."""
    from dasklab import replies
    if wait <= 0:
        return replies.NoReplies()
    if cfg.backend == "gke":
        return replies.PubSubReplies(cfg.project, cfg.status_topic, request_id, delete)
    from dasklab.local.serve import serve_info
    info = serve_info(cfg.home)
    if info["emulator_host"]:
        os.environ.setdefault("PUBSUB_EMULATOR_HOST", info["emulator_host"])
        return replies.PubSubReplies(info["project"], info.get("status_topic", cfg.status_topic), request_id, delete)
    return replies.FileReplies(Path(cfg.home) / "status.jsonl", request_id)


def print_outcome(outcome: dict | None, mid: str, wait: float) -> int:
    """The controller's answer, as the command's exit code: 2 if it refused the command, 1 if it failed."""
    if outcome is None:
        print(f"dasklab: no outcome from the controller within {wait:g}s (message {mid}); it may still come: see "
              f"`dasklab status`, or wait longer with --wait SECONDS", file=sys.stderr)
        return 0
    if outcome["outcome"] == "refused":
        print(f"dasklab: refused by the controller (message {mid}): {outcome['reason']}", file=sys.stderr)
        return 2
    if outcome["outcome"] == "failed":  # a command-failed event: given up after its delivery attempts
        print(f"dasklab: the command failed (message {mid}): {outcome['reason']}", file=sys.stderr)
        return 1
    print(f"{outcome['outcome'].replace('-', ' ')}: {outcome['reason']}")
    return 0


def cmd_publish(a, cfg) -> int:
    from dasklab.core.messages import REQUEST_ID
    from dasklab.replies import new_request_id
    payload = _messages(a)
    validate(payload, cfg)
    wait = 0.0 if a.no_wait else a.wait
    request_id = new_request_id()
    direct = getattr(a, "direct", False) or not cfg.command_url
    if not direct and a.cmd in ("start-lab", "start-class") and not a.owner:
        payload.pop("owner")  # the entry point makes the verified caller its owner
    with _replies(cfg, request_id, wait, delete=direct) as replies:
        if not direct:  # the HTTPS entry point, with the caller's own credentials: it verifies who sends
            from dasklab.adapters.idtokens import post_command
            answer = post_command(cfg.command_url, payload, request_id)
            mid, where = answer["message_id"], f"{cfg.command_url} as {answer['sender']}"
        elif cfg.backend == "gke":
            from dasklab.adapters import pubsub
            mid = pubsub.publish(cfg.project, cfg.control_topic, payload, **{REQUEST_ID: request_id})
            where = f"projects/{cfg.project}/topics/{cfg.control_topic}"
        else:
            from dasklab.local.serve import publish_local, serve_info
            mid = publish_local(cfg.home, payload, attributes={REQUEST_ID: request_id}, background=False)
            where = f"the local controller ({serve_info(cfg.home)['bus']})"
        what = payload.get("lab") or (f"class {payload['class']}" if "class" in payload else "all labs")
        print(f"published {payload['type']} for {what} to {where} (message {mid})", flush=True)
        if wait <= 0:
            return 0
        try:
            outcome = replies.wait(mid, wait)
        except KeyboardInterrupt:
            print("dasklab: stopped waiting for the outcome", file=sys.stderr)
            return 130
    return print_outcome(outcome, mid, wait)


def cmd_status(a, cfg) -> int:
    rows = fetch_status(cfg)
    wanted = getattr(a, "class_", None)
    if wanted:
        rows = [r for r in rows if r["class"] == wanted]
    classes = [c for c in fetch_class_status(cfg, rows) if not wanted or c["class"] == wanted]
    if wanted and not classes:
        raise PermanentError(f"no class named {wanted!r}: see `dasklab status`")
    if a.json:
        print(json.dumps({"labs": rows, "classes": classes} if wanted or classes else rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"dasklab labs ({cfg.backend})")
    for col in ("lab", "owner", "phase", "revision", "workers cur/target/min/max", "pin", "processing", "queued", "idle for",
                "kept alive", "next teardown", "age", "dashboard", "dask"):
        table.add_column(col)
    dash = lambda v: "-" if v is None else str(v)  # noqa: E731
    for r in rows:
        w, t, kept = r["workers"], r["next_teardown"], r["keep_alive_s"]
        table.add_row(r["lab"], r["owner"], r["phase"], r["revision"], f"{dash(w['current'])}/{w['target']}/{w['min']}/{w['max']}",
                      dash(r["pinned"]), dash(r["processing"]), dash(r["queued"]), r["idle_for"],
                      f"{_span(kept)} more" if kept else "-", f"in {_span(t['in_s'])}" if t else "-", r["age"],
                      r["dashboard"] or "-", r["dask"] or "-")
    Console(width=None if sys.stdout.isatty() else 200).print(table if rows else "no labs")
    for r in rows:  # the rest of what the controller decides from, and why the next teardown comes (unwrapped)
        t, cost = r["next_teardown"], r["estimated_cost_usd"]
        kept = f"kept alive until {r['keep_alive_until']} · " if r["keep_alive_until"] else ""
        print(f"{r['lab']}: idle timeout {_span(r['idle_timeout_s'])} · {kept}lifetime left "
              f"{_span(r['lifetime_left_s'])} · cost so far ${cost:.{2 if cost >= 1 else 4}f} (estimated)")
        if t:
            by = f" (the {t['tick']} tick), if nothing changes" if t["tick"] else ""
            print(f"{r['lab']}: next teardown at {t['at']}{by}: {t['reason']}")
        for note in r["notes"]:
            print(f"{r['lab']}: note: {note}")
    for r in rows:  # why workers are missing, as the controller last reported it (lab-degraded)
        if r["degraded"]:
            print(f"{r['lab']} degraded: {r['degraded']}")
        if r["cluster"]:  # its cluster runs but is not plainly RUNNING (DEGRADED, RECONCILING), as the backend reads it
            print(f"{r['lab']}: {r['cluster']}")
    for c in classes:
        budget = f" of its budget ${c['budget_usd']:.2f}" if c["budget_usd"] else ""
        labs = ", ".join(f"{n} {p}" for p, n in c["labs"].items()) or "no lab yet"
        when = "".join(f" · {k} {c[v]}" for k, v in (("ready at", "at"), ("ends at", "ends_at")) if c[v])
        print(f"class {c['class']} ({c['owner']}): {c['students']} student(s), {labs} · cost so far "
              f"${c['estimated_cost_usd']:.4f} (estimated){budget}{when}"
              + (f" · stopped: {c['stopped']}" if c["stopped"] else ""))
        for student, why in sorted(c["failed"].items()):
            print(f"class {c['class']}: {student} failed: {why}")
    return 0


def cmd_quota(a, cfg) -> int:
    """The start-class's need against the project's quotas, decided as the controller decides it; 2 if refused."""
    from dasklab import runtime
    from dasklab.core.messages import parse_command
    from dasklab.core.quotas import REFUSE, build_quota_table
    from dasklab.core.reconcile import Controller
    payload = build_start_class(a)
    validate(payload, cfg)  # refused here as the controller would refuse it, its notes said
    cmd = parse_command(payload)
    decision = Controller(runtime.build_backend(cfg), None, cfg).commands.preflight_class(cmd)
    if decision is None:
        print(f"the {cfg.backend} backend has no cloud quotas: nothing to check")
        return 0
    print(build_quota_table(decision))
    return 2 if decision.action == REFUSE else 0


def cmd_class_report(a, cfg) -> int:
    report = fetch_class_report(cfg, a.class_)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print_class_report(report)
    return 0


def cmd_serve(a, cfg) -> int:
    import threading

    from dasklab.local.serve import LocalController, describe, follow_log
    stop = threading.Event()
    with LocalController(cfg.home, emulator=None if not a.no_emulator else False) as ctl:
        print(f"local controller running: bus={ctl.bus}, functions at {ctl.server.url}, home={cfg.home}")
        print("publish with `dasklab start-lab --lab NAME`; Ctrl-C stops it and every local lab")
        print(f"the controller's full JSON log: {ctl.functions_log} (its ticks: {ctl.ticks_log})")
        if not a.quiet:
            print("its decisions, as they happen (--quiet hides them):", flush=True)
            show = lambda entry: (line := describe(entry)) and print(line, flush=True)  # noqa: E731
            for log in (ctl.functions_log, ctl.ticks_log):
                threading.Thread(target=follow_log, args=(log, stop, show), daemon=True).start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping")
        finally:
            stop.set()
    return 0


def cmd_demo(a, cfg) -> int:
    if a.class_size is not None:
        from dasklab.local.class_demo import run_class_demo
        return run_class_demo(a.class_size, json_lines=a.json)
    from dasklab.local.demo import run_demo
    return run_demo(json_lines=a.json)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dasklab", description="Dask labs on GKE (or locally) driven by messages.")
    p.add_argument("--home", help="local state folder (default $DASKLAB_HOME or ~/.dasklab)")
    gcp = argparse.ArgumentParser(add_help=False)
    gcp.add_argument("--project", help="Google Cloud project (default $DASKLAB_PROJECT or $GOOGLE_CLOUD_PROJECT)")
    gcp.add_argument("--region", help="region of the functions and timers (default $DASKLAB_REGION, "
                                      "else the region of $DASKLAB_LOCATION, else us-central1)")
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS",
                      help=f"wait this long for the controller's outcome (default {DEFAULT_WAIT_S:g})")
    wait.add_argument("--no-wait", action="store_true", help="publish and return at once")
    wait.add_argument("--direct", action="store_true", help="publish on the control topic itself (administrators "
                                                            "only), not through $DASKLAB_COMMAND_URL")
    sizing = argparse.ArgumentParser(add_help=False)  # what start-lab and start-class give each lab
    sizing.add_argument("--min", type=int)
    sizing.add_argument("--max", type=int)
    sizing.add_argument("--machine-type")
    sizing.add_argument("--idle-timeout", help="seconds, or e.g. 30m")
    sizing.add_argument("--max-lifetime", help="seconds, or e.g. 8h")
    sizing.add_argument("--spot", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start-lab", parents=[gcp, wait, sizing], help="provision a lab")
    s.add_argument("--lab", required=True)
    s.add_argument("--owner")
    s.add_argument("--workers", type=int, help="initial workers")
    s.add_argument("--values", help="Dask Helm chart values file (config.yaml), or - for stdin")
    s.add_argument("--expose", nargs="+", metavar="CIDR", help="public Jupyter, only from these networks")
    s.add_argument("--mixed-environment", action="store_true",
                   help="accept a package pinned differently or different image tags across jupyter, "
                        "scheduler and worker")
    s = sub.add_parser("update-lab", parents=[gcp, wait], help="give a running lab new chart values (a new revision)")
    s.add_argument("--lab", required=True)
    s.add_argument("--values", required=True, help="Dask Helm chart values file (config.yaml), or - for stdin")
    s.add_argument("--restart", action="store_true",
                   help="accept a change that restarts the scheduler (results held in memory are lost)")
    s.add_argument("--mixed-environment", action="store_true",
                   help="accept a package pinned differently or different image tags across jupyter, "
                        "scheduler and worker")
    s = sub.add_parser("stop-lab", parents=[gcp, wait], help="tear a lab down")
    s.add_argument("--lab", required=True)
    s = klass = argparse.ArgumentParser(add_help=False)  # a class: start-class, and the quota preflight
    s.add_argument("--class", dest="class_", required=True, help="the class name: labs are <class>-<student>")
    s.add_argument("--roster", required=True, help="a file with one student per line (# comments), or - for stdin")
    s.add_argument("--owner", help="the instructor (default: your user name)")
    s.add_argument("--values", help="Dask Helm chart values file (config.yaml), for every student's lab")
    s.add_argument("--at", help="when the labs must be ready: an ISO time with zone, e.g. 2026-12-07T09:00-08:00")
    s.add_argument("--duration", help="the class's length (e.g. 3h): its labs are torn down at --at + duration")
    s.add_argument("--workers", type=int, help="initial workers per student")
    s.add_argument("--budget-student", type=float, metavar="USD", help="estimated cost at which a lab is stopped")
    s.add_argument("--budget-class", type=float, metavar="USD", help="estimated cost at which the class is stopped")
    s.add_argument("--placement", choices=("own", "shared"),
                   help="a cluster per student, or one for the class (the default: shared)")
    sub.add_parser("start-class", parents=[gcp, wait, sizing, klass], help="a lab per student of a roster, from one "
                                                                        "message")
    sub.add_parser("quota", parents=[gcp, sizing, klass], help="what a start-class would need of the project's "
                                                              "quotas (the controller's check), starting nothing")
    s = sub.add_parser("stop-class", parents=[gcp, wait], help="tear down every lab of a class")
    s.add_argument("--class", dest="class_", required=True)
    s = sub.add_parser("class-report", parents=[gcp], help="usage per student of a class")
    s.add_argument("--class", dest="class_", required=True)
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("keep-alive", parents=[gcp, wait], help="keep a lab (or a class) from idle and nightly teardown")
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--lab")
    who.add_argument("--class", dest="class_", help="every lab of the class, and those it starts later")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--until", help="an ISO time with zone, e.g. 2026-11-27T02:00:00Z")
    g.add_argument("--for", dest="for_", help="seconds, or a duration like 4h")
    s = sub.add_parser("scale", parents=[gcp, wait], help="change a lab's min/max or pin its worker count")
    s.add_argument("--lab", required=True)
    s.add_argument("--min", type=int)
    s.add_argument("--max", type=int)
    s.add_argument("--pin", type=int)
    s.add_argument("--unpin", action="store_true")
    s = sub.add_parser("publish", parents=[gcp, wait], help="publish a raw JSON message (validated first)")
    s.add_argument("file", help="a JSON file, or - for stdin")
    s = sub.add_parser("status", parents=[gcp], help="show every lab (and class)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--class", dest="class_", help="only this class's labs, and its cost")
    local = sub.add_parser("local", help="the local controller").add_subparsers(dest="local_cmd", required=True)
    s = local.add_parser("serve", help="run the local controller until Ctrl-C")
    s.add_argument("--no-emulator", action="store_true", help="use direct push even if the emulator exists")
    s.add_argument("--quiet", action="store_true", help="do not print the controller's decisions")
    s = sub.add_parser("connect", parents=[gcp], help="forward local ports to a lab's Jupyter and dashboard (GKE), "
                                                     "or say how to reach them")
    s.add_argument("lab", nargs="?")
    s.add_argument("--lab", dest="lab_option", help="the lab (same as the positional argument)")
    s.add_argument("--port", type=int, default=8080, help="local port of Jupyter (default 8080, Cloud Shell's "
                                                          "web preview port; another is taken if it is busy)")
    s.add_argument("--dashboard-port", type=int, default=8787, help="local port of the Dask dashboard (default 8787)")
    s.add_argument("--no-forward", action="store_true", help="only print the kubectl commands to do it yourself")
    s.add_argument("--class", dest="class_", help="the table of a class, for its instructor: who connects how")
    s.add_argument("--show-tokens", action="store_true", help="with --class: each lab's Jupyter login (its token) "
                   "too, as before: for the instructor's own terminal only")
    s.add_argument("--json", action="store_true")
    infra = sub.add_parser("infra", help="dasklab's topics and timers on Google Cloud").add_subparsers(
        dest="infra_cmd", required=True)
    s = infra.add_parser("apply", parents=[gcp], help="create or update them (idempotent)")
    s.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    infra.add_parser("destroy", parents=[gcp], help="delete exactly what apply creates")
    s = sub.add_parser("deploy", parents=[gcp], help="identity, then cloudbuild.yaml's steps: stage, functions, infra")
    s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    s.add_argument("--cloud-build", action="store_true", help="run the build on Cloud Build (gcloud builds submit)")
    s.add_argument("--smoke", action="store_true", help="also run the smoke tier (pytest -m smoke; a checkout's tests)")
    s.add_argument("--skip-identity", action="store_true",
                   help="leave out creating the service accounts and granting their roles (infra/iam.yaml)")
    s.add_argument("--operators", metavar="MEMBER,…", help="IAM principals (user:, group:, domain:) who may send "
                   "commands through the command function: instructors and students (DASKLAB_ADMINS are granted too)")
    s = sub.add_parser("destroy", parents=[gcp], help="delete the functions and the infra (not the accounts)")
    s.add_argument("--force", action="store_true", help="also delete every managed lab")
    s = sub.add_parser("demo", help="the whole lab story on real Dask, in under two minutes")
    s.add_argument("--json", action="store_true", help="print the timeline as JSON lines")
    s.add_argument("--class", dest="class_size", type=int, metavar="N",
                   help="a class of N students instead: one busy (autoscales), one idle (torn down), one kept alive")
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
        handler = {"start-lab": cmd_publish, "update-lab": cmd_publish, "stop-lab": cmd_publish,
                   "keep-alive": cmd_publish, "scale": cmd_publish, "publish": cmd_publish, "status": cmd_status,
                   "start-class": cmd_publish, "stop-class": cmd_publish, "class-report": cmd_class_report,
                   "quota": cmd_quota,
                   "demo": cmd_demo, "local": cmd_serve, "connect": cmd_connect, "infra": cmd_infra,
                   "deploy": cmd_deploy, "destroy": cmd_destroy}[a.cmd]
        return handler(a, cfg)
    except (DasklabError, OSError, ValueError, *_cloud_errors()) as e:
        print(f"dasklab: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, PermanentError) else 1


if __name__ == "__main__":
    sys.exit(main())
