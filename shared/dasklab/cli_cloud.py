"""The `dasklab` command's Google Cloud half (infra, deploy, destroy, connect) and its spinner: called by cli.main."""

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from dasklab import __version__
from dasklab.report import _class_labs, print_table
from dasklab.core.errors import PermanentError, ValidationError


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


def cmd_connect_class(a, cfg) -> int:
    """The instructor's table of who connects how: each student's account and the command they run; their labs'
    tokens only with --show-tokens (the instructor's own terminal)."""
    from dasklab.core.messages import parse_command
    from dasklab.report import build_connect_rows
    record, backend, labs = _class_labs(cfg, a.class_)
    table = build_connect_rows(record, labs, backend, show_tokens=a.show_tokens)
    if a.json:
        print(json.dumps(table, indent=1))
        return 0
    owner = parse_command(record.template).owner_identity
    print_table(f"class {record.name}: who connects how" + (f" ({owner} may connect to every lab)" if owner else "")
                + (" - tokens included: keep this to yourself" if a.show_tokens else ""),
                ("student", "lab", "phase", "identity", "they run") + (("jupyter", "dashboard") if a.show_tokens
                                                                        else ()),
                [(r["student"], r["lab"], r["phase"], r["identity"], r["connect"])
                 + ((r.get("jupyter"), r.get("dashboard")) if a.show_tokens else ()) for r in table])
    return 0


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
    from dasklab.core.timers import load_infra
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


def deploy_steps(a, cfg, workspace) -> list:
    """What `dasklab deploy` runs: the identity of infra/iam.yaml, then the workspace's cloudbuild.yaml steps (all but
    the smoke tier unless --smoke), or a build of them on Cloud Build."""
    from dasklab.cloud import deploy
    from dasklab.core.timers import load_infra
    build, iam = deploy.load_build(workspace / "cloudbuild.yaml"), deploy.load_iam(workspace / "infra" / "iam.yaml")
    values = deploy.substitutions(build, cfg.project, {
        "_REGION": cfg.region, "_LOCATION": cfg.location, "_CONTROL_TOPIC": load_infra()["topics"]["control"],
        "_TICK_TOPIC": load_infra()["topics"]["ticks"],
        "_SERVICE_ACCOUNT": iam["accounts"]["controller"]["account"],
        "_COMMAND_SERVICE_ACCOUNT": iam["accounts"]["command"]["account"], "_ADMINS": cfg.admins,
        "_NODE_SERVICE_ACCOUNT": iam["accounts"]["nodes"]["account"], "_NIGHTLY_AT": cfg.nightly_at,
        "_TIME_ZONE": cfg.nightly_time_zone})
    steps, people = [], []
    if not a.skip_identity:
        number = "PROJECT_NUMBER" if a.dry_run else deploy.fetch_project_number(cfg.project)
        steps += deploy.build_iam_steps(iam, cfg.project) + deploy.build_service_agent_steps(iam, cfg.project, number)
        steps += deploy.build_store_steps(cfg.project, cfg.region, cfg.firestore_database)  # the tombstones' store
        # once the command function exists: run.invoker is granted on its service
        people = deploy.build_people_steps(iam, cfg.project, cfg.region, cfg.admins, a.operators or "")
    if a.cloud_build:
        return steps + [deploy.cloud_build_step(values, workspace / "cloudbuild.yaml")] + people
    return steps + deploy.build_steps(build, values, skip=() if a.smoke else ("smoke",)) + people


def cmd_deploy(a, cfg) -> int:
    """Generate the workspace from this installed dasklab, then run (or, with --dry-run, print) the steps in it."""
    from dasklab.cloud import deploy
    from dasklab.inputs import inputs_root
    _require_project(cfg)
    started = time.monotonic()
    workspace = deploy.build_workspace(Path(cfg.home) / "deploy", with_tests=a.smoke)
    steps = deploy_steps(a, cfg, workspace)
    where, again = f"{cfg.project} ({cfg.region})", f"--project {cfg.project} --region {cfg.region}"
    print(f"deploy of dasklab {__version__} on {where}: {len(steps)} steps, run in {workspace} "
          f"(generated from {inputs_root()})")
    print("tests: the smoke tier (pytest -m smoke)" if a.smoke else
          "tests: none at deploy (--smoke adds the smoke tier, a checkout's tests; the full suite is .ci/run)")
    if a.dry_run:
        for n, step in enumerate(steps, 1):
            guard = f"  # unless `{' '.join(step.unless)}` succeeds" if step.unless else ""
            print(f"[{n}/{len(steps)}] {step.id}: {step}{guard}")
        print(f"dry run: nothing was run. Next: `dasklab deploy {again}` runs these steps")
        return 0
    deploy.run_steps(steps, cwd=workspace)
    print(f"dasklab is deployed on {where} in {time.monotonic() - started:.0f} s. Send commands through it with\n"
          f"  export DASKLAB_COMMAND_URL={deploy.command_url(cfg.region, cfg.project)}\n"
          f"Next:\n"
          f"  dasklab status {again}                  # the labs (none yet)\n"
          f"  dasklab start-lab --lab NAME {again}    # a lab; then `dasklab connect --lab NAME {again}`")
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
    """On GKE: forward local ports to the lab's Jupyter and dashboard with the caller's own identity, until Ctrl-C
    (cloud.connect). With --no-forward or --json, or locally: what a person needs to reach the lab, from the
    backend's connection_info (never a secret itself)."""
    from dasklab.runtime import build_backend
    if a.class_:
        return cmd_connect_class(a, cfg)
    name = a.lab_option or a.lab
    if not name:
        raise ValidationError("lab", "give a lab, or --class CLASS for the table of a class")
    if cfg.backend == "gke" and not (a.no_forward or a.json):
        return cmd_forward(name, a, cfg)
    backend = build_backend(cfg)
    lab = backend.fetch_lab(name)
    if lab is None:
        raise PermanentError(f"no lab named {name!r} on the {cfg.backend} backend: see `dasklab status`")
    info = backend.connection_info(lab)
    login = getattr(backend, "jupyter_login_url", None)  # the local lab: this machine's own Jupyter, with its token
    if login and (url := login(lab)):
        info["jupyter"] = url
        info.pop("jupyter_token", None)
    if a.json:
        print(json.dumps({**info, "notes": list(lab.spec.notes)}, indent=1))
        return 0
    print(f"lab {lab.name} ({lab.state.phase}, owner {lab.spec.owner}, {cfg.backend} backend)")
    for key, value in info.items():
        print(f"{key}: {value if isinstance(value, str) else json.dumps(value)}")
    for note in lab.spec.notes:
        print(f"note: {note}")
    return 0


def cmd_forward(name: str, a, cfg) -> int:
    """`dasklab connect --lab LAB` on GKE: listen on 127.0.0.1 (Jupyter, dashboard) until Ctrl-C or SIGTERM."""
    from dasklab.cloud.connect import default_clients, describe, open_connection
    _require_project(cfg)
    clusters, kube_for = default_clients()
    with progress(f"connecting to lab {name}"):
        conn = open_connection(name, cfg.project, clusters, kube_for, jupyter_port=a.port,
                               dashboard_port=a.dashboard_port,
                               on_error=lambda error: print(f"dasklab: {error}", file=sys.stderr, flush=True))
    try:
        print("\n".join(describe(conn)), flush=True)
        while True:  # until Ctrl-C (KeyboardInterrupt) or SIGTERM (main's handler: SystemExit)
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()
    return 0
