"""The `dasklab` command as a user runs it (subprocesses): local serve, publish commands, status, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import pytest

from dasklab.core import config
from dasklab.adapters import procs

from tests.conftest import stop_group

DASKLAB = [sys.executable, "-m", "dasklab.cli"]


def run(home, *args, check=True):
    env = {**os.environ, "DASKLAB_HOME": str(home)}
    env.pop("PUBSUB_EMULATOR_HOST", None)
    out = subprocess.run([*DASKLAB, *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def status(home) -> list[dict]:
    return json.loads(run(home, "status", "--json").stdout)


@pytest.fixture
def serve(home, tmp_path, request):
    """`dasklab local serve` (with the options of an indirect parameter, if any); its output in serve.log."""
    env = {**os.environ, "DASKLAB_HOME": str(home), "DASKLAB_POLL_S": "0.5", "DASKLAB_CONFIRM_S": "2"}
    env.pop("PUBSUB_EMULATOR_HOST", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([*DASKLAB, "local", "serve", *getattr(request, "param", ())], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    procs.wait_until(lambda: (home / "serve.json").exists() or proc.poll() is not None, 60, what="local serve")
    assert proc.poll() is None, (tmp_path / "serve.log").read_text()
    info = json.loads((home / "serve.json").read_text())
    yield info
    stop_group(proc, first=signal.SIGINT)  # Ctrl-C, as a user stops it (the group killed if it hangs)
    log.close()
    assert not (home / "serve.json").exists()


def wait_for(check, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_commands_through_the_local_controller(serve, home):
    assert serve["bus"] == "Pub/Sub emulator"
    out = run(home, "start-lab", "--lab", "cli1", "--workers", "1", "--max", "3", "--idle-timeout", "5m")
    assert "published start-lab for cli1 to the local controller (Pub/Sub emulator)" in out.stdout
    row = wait_for(lambda: next((r for r in status(home) if r["lab"] == "cli1" and r["phase"] == "ready"), None))
    assert row["workers"]["min"] == 0 and row["workers"]["max"] == 3 and row["dashboard"].startswith("http://127.0.0.1")
    table = run(home, "status").stdout
    assert "cli1" in table and "ready" in table and "workers cur/target/min/max" in table
    run(home, "scale", "--lab", "cli1", "--pin", "2")
    wait_for(lambda: status(home)[0]["workers"]["current"] == 2)
    run(home, "keep-alive", "--lab", "cli1", "--for", "2h")
    connect = run(home, "connect", "cli1").stdout
    assert "local backend" in connect and "scheduler: tcp://127.0.0.1:" in connect
    assert f"dashboard: {row['dashboard']}" in connect
    import importlib.metadata
    installed = importlib.metadata.version("distributed")  # a local lab runs the Dask installed here
    assert row["dask"] == installed and f"dask_version: {installed}" in connect
    run(home, "stop-lab", "--lab", "cli1")
    wait_for(lambda: status(home) == [])
    pids = [serve["pid"]]
    assert all(not procs.pid_alive(p) for p in pids if p != serve["pid"])


WAIT = ("--wait", "60")  # generous: the machine running the tests may be loaded


@pytest.mark.slow
def test_the_controllers_outcome_reaches_whoever_sent_the_command(serve, home, tmp_path):
    """Refusals made by the controller (not the CLI) exit 2 with the field and rule; the rest say what happened;
    `local serve` shows each decision as it happens."""
    out = run(home, "start-lab", "--lab", "syoh-a", "--owner", "root", "--max", "4", "--idle-timeout", "60", *WAIT)
    assert "published start-lab for syoh-a" in out.stdout
    assert "accepted: new lab requested: provisioning 0 worker(s), min 0, max 4; lab-ready follows" in out.stdout

    def refused(*args):
        out = run(home, *args, *WAIT, check=False)
        assert out.returncode == 2, (out.stdout, out.stderr)
        assert "published" in out.stdout and "dasklab: refused by the controller (message " in out.stderr
        return out.stderr

    assert "lab syoh-a exists and belongs to root" in refused("start-lab", "--lab", "syoh-a", "--owner", "alice")
    assert "min: min (5) must be ≤ max (4)" in refused("scale", "--lab", "syoh-a", "--min", "5")
    assert "until: must be in the future" in refused("keep-alive", "--lab", "syoh-a", "--until",
                                                     "2020-01-01T00:00:00Z")
    out = run(home, "stop-lab", "--lab", "ghost", *WAIT)
    assert out.stdout.splitlines()[-1] == "nothing to do: no lab named ghost"
    out = run(home, "keep-alive", "--lab", "syoh-a", "--for", "90", *WAIT)  # plain seconds
    assert "done: kept alive until 20" in out.stdout
    out = run(home, "scale", "--lab", "syoh-a", "--min", "9", "--no-wait")  # published, not waited for
    assert out.stdout.startswith("published scale") and len(out.stdout.splitlines()) == 1 and not out.stderr
    lab = wait_for(lambda: next((r for r in status(home) if r["phase"] == "ready"), None))
    assert lab["idle_timeout_s"] == 60
    assert "done: limits now min 0, max 4, pinned at 2" in run(home, "scale", "--lab", "syoh-a", "--pin", "2",
                                                               *WAIT).stdout
    wait_for(lambda: status(home)[0]["workers"]["current"] == 2)
    # status shows what the controller decides from, and the next teardown the policy plans
    [row] = status(home)
    assert row["pinned"] == 2 and row["idle_timeout_s"] == 60 and row["keep_alive_until"].startswith("20")
    assert 0 < row["lifetime_left_s"] <= 8 * 3600 and row["estimated_cost_usd"] >= 0 and row["notes"] == []
    assert row["dask"] == version("distributed")
    teardown = row["next_teardown"]
    # an idle lab goes at the first reconcile tick past its idle timeout
    assert teardown["tick"] in ("reconcile", "teardown-idle", "nightly-teardown") and teardown["in_s"] > 0
    assert teardown["at"].endswith("Z") and teardown["reason"]
    table = run(home, "status").stdout
    [cells] = table_rows(table)
    header = next(line for line in table.splitlines() if "lab" in line and "owner" in line)
    columns = [c.strip() for c in header.strip("┃").split("┃")]
    shown = dict(zip(columns, cells))
    assert shown["pin"] == "2" and shown["kept alive"].endswith("more") and shown["next teardown"].startswith("in ")
    assert "syoh-a: idle timeout 1m00s · kept alive until " in table and "lifetime left " in table
    assert f"syoh-a: next teardown at {teardown['at']} (the {teardown['tick']} tick), if nothing changes: " in table
    run(home, "scale", "--lab", "syoh-a", "--pin", "1", *WAIT)
    wait_for(lambda: status(home)[0]["workers"]["current"] == 1)
    assert "accepted: teardown started (ready → tearing-down)" in run(home, "stop-lab", "--lab", "syoh-a",
                                                                      *WAIT).stdout
    wait_for(lambda: status(home) == [])

    def shown(action):  # the decision lines `local serve` printed for this action
        return [line for line in (tmp_path / "serve.log").read_text().splitlines() if f" {action} " in line
                or line.endswith(f" {action}")]

    text = (tmp_path / "serve.log").read_text()
    assert f"the controller's full JSON log: {home / 'logs' / 'functions.log'}" in text
    wait_for(lambda: shown("forget"))
    assert len(shown("create")) == 1 and "gone → provisioning" in shown("create")[0]
    assert "installing → ready" in shown("mark-ready")[0]
    assert [line for line in shown("refused") if "belongs to root" in line]
    assert [line for line in shown("refused") if "min: min (9) must be ≤ max (4)" in line]  # the --no-wait one
    assert shown("scale-up") and shown("scale-down") and shown("retire")
    assert len(shown("teardown")) == 1 and "ready → tearing-down" in shown("teardown")[0]
    assert len(shown("forget")) == 1 and "tearing-down → gone" in shown("forget")[0]


@pytest.mark.parametrize("serve", [("--no-emulator", "--quiet")], indirect=True)
@pytest.mark.slow
def test_outcomes_over_direct_push_and_a_quiet_serve(serve, home, tmp_path):
    assert serve["bus"] == "direct push (no emulator)"
    out = run(home, "keep-alive", "--lab", "nolab", "--until", "2020-01-01T00:00:00Z", *WAIT, check=False)
    assert out.returncode == 2 and "until: must be in the future" in out.stderr, (out.stdout, out.stderr)
    out = run(home, "start-lab", "--lab", "quiet1", *WAIT)
    assert "accepted: new lab requested" in out.stdout
    run(home, "start-lab", "--lab", "quiet2", "--no-wait")  # delivered before the command returns
    assert "quiet2" in [r["lab"] for r in status(home)]
    text = (tmp_path / "serve.log").read_text()
    assert "the controller's full JSON log:" in text
    assert " create " not in text and " refused " not in text and "as they happen" not in text


@pytest.mark.parametrize("args, message", [
    (["start-lab", "--lab", "Bad_Name"], "lab: must be ≤ 40 chars"),
    (["start-lab", "--lab", "ok", "--max", "99"], "workers.max: 99 is above the controller cap max_workers=16"),
    (["start-lab", "--lab", "ok", "--idle-timeout", "soon"], "idle_timeout: 'soon' is not a duration"),
    (["scale", "--lab", "ok"], "message: give at least one of min, max, pin, unpin"),
    (["keep-alive", "--lab", "ok", "--for", "forever"], "for: 'forever' is not a duration"),
])
def test_bad_commands_are_refused_locally(home, args, message):
    out = run(home, *args, check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_publishing_without_a_controller_says_how_to_start_one(home):
    out = run(home, "start-lab", "--lab", "ok", check=False)
    assert out.returncode == 2 and "dasklab local serve" in out.stderr


def test_status_without_labs(home):
    assert "no labs" in run(home, "status").stdout


# --- Google Cloud commands -------------------------------------------------------------------------

def cloud_run(home, *args, project=None):
    """The command with no project in the environment (so the one on the command line is the only one)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DASKLAB_PROJECT", "GOOGLE_CLOUD_PROJECT", "DASKLAB_REGION", "DASKLAB_LOCATION",
                        "PUBSUB_EMULATOR_HOST")}
    env["DASKLAB_HOME"] = str(home)
    if project:
        env["DASKLAB_PROJECT"] = project
    return subprocess.run([*DASKLAB, *args], env=env, capture_output=True, text=True, timeout=60)


def step_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[")]


def test_deploy_dry_run_prints_the_identity_then_the_build_steps(home):
    out = cloud_run(home, "deploy", "--dry-run", "--project", "demo-p", "--region", "europe-west1")
    assert out.returncode == 0, out.stderr
    lines = step_lines(out.stdout)
    ids = [line.split(":", 1)[0].split("] ", 1)[1] for line in lines]
    assert ids[0] == "role-dasklabController" and ids[-5:] == ["stage", "deploy-control", "deploy-ticks",
                                                               "deploy-command", "infra"]
    assert lines[0].startswith(f"[1/{len(lines)}] ")
    deploy_line = next(line for line in lines if "gcloud functions deploy dasklab-control" in line)
    assert "--region=europe-west1" in deploy_line and "--entry-point=control" in deploy_line
    assert "--service-account=dasklab-controller@demo-p.iam.gserviceaccount.com" in deploy_line
    assert "DASKLAB_PROJECT=demo-p" in deploy_line
    assert "infra apply --project=demo-p --region=europe-west1" in lines[-1]
    assert "unless `gcloud iam service-accounts describe dasklab-controller@demo-p" in out.stdout
    assert "service-PROJECT_NUMBER@gcp-sa-pubsub" in out.stdout  # not looked up in a dry run
    head, tests, *_, last = out.stdout.splitlines()
    workspace = home / "deploy"
    assert f"{len(lines)} steps, run in {workspace} (generated from " in head
    assert (workspace / "cloudbuild.yaml").is_file() and (workspace / "functions" / "main.py").is_file()
    assert tests.startswith("tests: none at deploy") and "smoke" not in ids
    assert last == "dry run: nothing was run. Next: `dasklab deploy --project demo-p --region europe-west1` runs these steps"


def test_deploy_dry_run_options(home):
    quick = cloud_run(home, "deploy", "--dry-run", "--smoke", "--skip-identity", project="env-p").stdout
    assert [line.split(":", 1)[0].split("] ")[1] for line in step_lines(quick)] == [
        "smoke", "stage", "deploy-control", "deploy-ticks", "deploy-command", "infra"]
    assert "tests: the smoke tier (pytest -m smoke)" in quick and (home / "deploy" / "tests" / "conftest.py").is_file()
    assert "DASKLAB_PROJECT=env-p" in quick  # the project from the environment
    build = cloud_run(home, "deploy", "--dry-run", "--cloud-build", "--skip-identity", "--project", "p2").stdout
    assert step_lines(build) == ["[1/1] cloud-build: gcloud builds submit --project=p2 --config=cloudbuild.yaml "
                                 "--substitutions=_REGION=us-central1,_LOCATION=us-central1-a,"
                                 "_CONTROL_TOPIC=dasklab-control,_TICK_TOPIC=dasklab-ticks,_SERVICE_ACCOUNT=dasklab-controller,"
                                 "_COMMAND_SERVICE_ACCOUNT=dasklab-command,_ADMINS=,"
                                 "_TOKEN_AUDIENCES=32555940559.apps.googleusercontent.com,"
                                 "_NODE_SERVICE_ACCOUNT=dasklab-nodes,_MAX_INSTANCES=10,_NIGHTLY_AT=02:00,"
                                 "_TIME_ZONE=Etc/UTC ."]
    assert not (home / "deploy" / "tests").exists()  # the upload: no tests, its smoke step skips and says so


def test_deploy_grants_administrators_and_operators_once_the_command_function_exists(home):
    """DASKLAB_ADMINS reach the functions' environment (commas kept) and, with --operators, get their grants after
    the functions are deployed (run.invoker is granted on the command function's service); --cloud-build too."""
    env = {k: v for k, v in os.environ.items() if k not in ("DASKLAB_PROJECT", "GOOGLE_CLOUD_PROJECT",
                                                             "DASKLAB_REGION", "DASKLAB_LOCATION")}
    env.update(DASKLAB_HOME=str(home), DASKLAB_ADMINS="root@example.edu,ops@example.edu")
    for extra in ([], ["--cloud-build"]):
        out = subprocess.run([*DASKLAB, "deploy", "--dry-run", "--project", "p", *extra,
                              "--operators", "group:intro@example.edu"], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        last_build = max(i for i, line in enumerate(lines) if "] infra:" in line or "] cloud-build:" in line)
        people = [line for line in lines[last_build + 1:] if "grant-" in line]
        assert people and all("grant-administrator" in line or "grant-operator" in line for line in people)
        assert sum("run services add-iam-policy-binding dasklab-command" in line for line in people) == 3
        assert any("--member=group:intro@example.edu --role=roles/run.invoker" in line for line in people)
        assert any("topics add-iam-policy-binding dasklab-control --project=p --member=user:ops@example.edu "
                   "--role=roles/pubsub.publisher" in line for line in people)
        assert not any("dasklab-control" in line and "group:" in line for line in people)
        said = "'--substitutions=^|^_REGION=" if extra else "DASKLAB_ADMINS="  # gcloud topic escaping: commas kept
        assert f"{said}" in out.stdout and "ADMINS=root@example.edu,ops@example.edu|" in out.stdout


@pytest.mark.parametrize("args, code, message", [
    (["deploy", "--dry-run"], 2, "project: give a Google Cloud project with --project, DASKLAB_PROJECT"),
    (["infra", "apply", "--dry-run"], 2, "project: give a Google Cloud project"),
    (["infra", "destroy"], 2, "project: give a Google Cloud project"),
    (["destroy"], 2, "project: give a Google Cloud project"),
    (["infra"], 2, "the following arguments are required: infra_cmd"),
    (["deploy", "--project"], 2, "argument --project: expected one argument"),
    (["connect"], 2, "lab: give a lab, or --class CLASS"),
    (["connect", "nosuch"], 2, "no lab named 'nosuch' on the local backend"),
])
def test_cloud_command_errors(home, args, code, message):
    out = cloud_run(home, *args)
    assert out.returncode == code and message in out.stderr, out.stderr


def test_a_bad_nightly_time_is_refused_before_anything_runs(home):
    out = subprocess.run([*DASKLAB, "infra", "apply", "--dry-run", "--project", "p"], capture_output=True, text=True,
                         env={**os.environ, "DASKLAB_HOME": str(home), "DASKLAB_NIGHTLY_AT": "25:00"}, timeout=60)
    assert out.returncode == 2 and "nightly_at: must be HH:MM" in out.stderr, out.stderr


# --- in-process against the Pub/Sub emulator and the Cloud Scheduler stand-in ----------------------
# (a subprocess cannot reach the in-process stand-in, so these call the CLI's main() in this process)

@pytest.fixture(scope="module")
def emulator_host(tmp_path_factory):
    emu = procs.start_pubsub_emulator(tmp_path_factory.mktemp("pubsub-cli"))
    yield emu.host
    emu.stop()
    assert not emu.proc.alive()


@pytest.fixture
def gcp(emulator_host, monkeypatch, home):
    """`infra.default_clients` answering from the emulator and the stand-in; a fresh project per test."""
    from google.cloud import pubsub_v1

    from dasklab.cloud import infra
    from tests.standins.cloud_scheduler import CloudSchedulerStandin

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator_host)
    for name in ("DASKLAB_PROJECT", "DASKLAB_REGION"):  # recorded, so what main() sets is undone
        monkeypatch.setenv(name, "recorded")
        monkeypatch.delenv(name)
    monkeypatch.setenv("DASKLAB_HOME", str(home))
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    with CloudSchedulerStandin(lambda topic, data, attrs: publisher.publish(topic, data, **attrs).result(10)) as s:
        monkeypatch.setattr(infra, "default_clients", lambda: infra.Clients(publisher, subscriber, s.client()))
        yield s
    config.current.cache_clear()


def main(*args) -> int:
    """The CLI's main() in this process; it installs a SIGTERM handler, put back afterwards."""
    from dasklab import cli
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return cli.main(list(args))
    finally:
        signal.signal(signal.SIGTERM, previous)


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table, as lists of cell texts."""
    return [[c.strip() for c in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]


_projects = iter(range(1, 1000))


def test_infra_apply_dry_run_then_apply_then_destroy(gcp, capsys):
    project = f"cli-p{next(_projects)}"
    assert main("infra", "apply", "--dry-run", "--project", project) == 0
    plan = capsys.readouterr()
    assert "infra plan (dry run: nothing written)" in plan.out and "planning" in plan.err
    rows = table_rows(plan.out)
    assert [(r[0], r[2]) for r in rows] == [("topic", "create")] * 4 + [("subscription", "create")] + [
        ("job", "create")] * 3
    assert gcp.jobs == {}
    assert main("infra", "apply", "--project", project, "--region", "europe-west1") == 0
    assert {name.split("/")[3] for name in gcp.jobs} == {"europe-west1"}
    capsys.readouterr()
    assert main("infra", "apply", "--dry-run", "--project", project, "--region", "europe-west1") == 0
    assert {r[2] for r in table_rows(capsys.readouterr().out)} == {"unchanged"}
    assert main("infra", "destroy", "--project", project, "--region", "europe-west1") == 0
    assert {(r[0], r[2]) for r in table_rows(capsys.readouterr().out)} == {("job", "delete"), ("topic", "delete"),
                                                                          ("subscription", "delete")}
    assert gcp.jobs == {}


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A `gcloud` on PATH that logs its arguments; `functions describe` says the function does not exist."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    script = bin_dir / "gcloud"
    script.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in *describe*) exit 1;; esac\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_destroy_refuses_while_labs_exist_and_force_deletes_them_with_the_rest(gcp, capsys, home, monkeypatch,
                                                                              fake_gcloud):
    from dasklab import runtime
    from dasklab.adapters.local import LocalBackend
    from dasklab.core.model import Lab
    from tests.conftest import make_spec, make_state

    backend = LocalBackend(home)
    backend.apply_create(Lab(make_spec(name="left-over"), make_state(phase="ready")))
    monkeypatch.setattr(runtime, "build_backend", lambda cfg: backend)  # the labs a GKE backend would list
    project = f"cli-p{next(_projects)}"
    assert main("infra", "apply", "--project", project) == 0
    capsys.readouterr()

    assert main("destroy", "--project", project) == 2
    out = capsys.readouterr()
    assert "1 managed lab(s) still exist" in out.err and "--force" in out.err
    assert ["left-over", "alice", "ready"] in table_rows(out.out)
    assert len(gcp.jobs) == 3 and not fake_gcloud.exists()  # nothing touched

    assert main("destroy", "--force", "--project", project) == 0
    out = capsys.readouterr()
    assert "functions describe dasklab-control --gen2 --region=us-central1" in fake_gcloud.read_text()
    assert "functions delete" not in fake_gcloud.read_text()  # it did not exist: skipped
    assert "delete-dasklab-control: nothing to do" in out.out
    assert gcp.jobs == {} and "kept the service accounts (dasklab-controller, dasklab-command, dasklab-nodes)" in out.out
    assert backend.fetch_lab("left-over").state.phase == "ready"  # its infrastructure deleted (no processes here)


def test_connect_to_a_gke_lab_prints_the_backends_commands(monkeypatch, capsys, tmp_path):
    """Over the GKE stand-in, with --no-forward: the lab is read from its record, the commands come from
    connection_info (tests/test_connect.py forwards)."""
    from dasklab import runtime
    from dasklab.adapters.compute import Migs
    from dasklab.adapters.gke import GkeBackend
    from dasklab.core.model import Lab
    from tests.conftest import make_spec, make_state
    from tests.fakes import FileLabRecords
    from tests.standins.gke import GkeStandin

    for name in ("DASKLAB_PROJECT", "DASKLAB_REGION"):  # recorded, so what main() sets is undone
        monkeypatch.setenv(name, "recorded")
        monkeypatch.delenv(name)
    cfg = config.Config(backend="gke", project="demo-p", location="us-central1-a",
                        node_service_account="dasklab-nodes@demo-p.iam.gserviceaccount.com")
    with GkeStandin() as gke:
        backend = GkeBackend(cfg, gke.client(), lambda cluster: None, Migs(lambda: None),
                             FileLabRecords(tmp_path))
        assert backend.apply_create(Lab(make_spec(name="intro", dask_version="2025.12.0"),
                                        make_state(phase="provisioning")))
        monkeypatch.setattr(runtime, "build_backend", lambda cfg: backend)
        assert main("connect", "intro", "--project", "demo-p", "--no-forward") == 0
        assert main("connect", "--lab", "nosuch", "--project", "demo-p", "--no-forward") == 2
    out = capsys.readouterr()
    assert "lab intro (provisioning, owner alice, gke backend)" in out.out
    assert "credentials: gcloud container clusters get-credentials intro --location us-central1-a --project demo-p" \
        in out.out
    assert "jupyter_token: kubectl -n dasklab-intro get secret dasklab-jupyter-token" in out.out
    assert "dask_version: 2025.12.0" in out.out  # the lab's images, recorded on its cluster
    assert "no lab named 'nosuch' on the gke backend" in out.err


def test_the_reply_subscription_is_filtered_on_the_request_and_deleted_afterwards(emulator_host, monkeypatch):
    """On the emulator: events carry the attributes a Google Cloud filter reads; the subscription asks for the
    filter (which the emulator ignores, so the CLI filters too) and is gone once the wait ends."""
    from google.api_core.exceptions import NotFound

    from dasklab.adapters import pubsub
    from dasklab.replies import PubSubReplies

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator_host)
    pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()
    project, topic = f"cli-p{next(_projects)}", "dasklab-status"
    try:
        pubsub.ensure_topic(project, topic)
        pubsub.ensure_subscription(project, topic, "watch")
        events = pubsub.PubSubEvents(project, topic)
        with PubSubReplies(project, topic, "req1") as replies:
            sub = pubsub.subscriber().get_subscription(subscription=pubsub.subscriber().subscription_path(
                project, replies.name))
            assert sub.filter == 'attributes.request_id = "req1"'
            assert sub.expiration_policy.ttl.total_seconds() == 86400  # left behind, it goes by itself
            events.publish({"event": "command-outcome", "lab": "x", "message_id": "m0", "request_id": "other",
                            "outcome": "done", "reason": "someone else's"})
            events.publish({"event": "command-outcome", "lab": "x", "message_id": "m1", "request_id": "req1",
                            "outcome": "refused", "reason": "min: min (5) must be ≤ max (4)"})
            got = replies.wait("m1", timeout=30)
        assert got["reason"] == "min: min (5) must be ≤ max (4)"
        with pytest.raises(NotFound):
            pubsub.subscriber().get_subscription(subscription=pubsub.subscriber().subscription_path(
                project, replies.name))
        path = pubsub.subscriber().subscription_path(project, "watch")
        received = pubsub.subscriber().pull(subscription=path, max_messages=10, timeout=10).received_messages
        assert sorted((dict(m.message.attributes) for m in received), key=str) == sorted([
            {"event": "command-outcome", "lab": "x", "message_id": m, "request_id": r}
            for m, r in (("m0", "other"), ("m1", "req1"))], key=str)
    finally:
        pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()


def test_the_cli_waits_for_the_outcome_on_google_cloud(emulator_host, monkeypatch, capsys, home):
    """The GKE-backend path of the CLI on the emulator: a "function" thread runs each control message through
    the real entry point, whose controller publishes on the status topic; the CLI's reply subscriptions go."""
    import threading

    from dasklab import entry
    from dasklab.adapters import pubsub
    from dasklab.core.reconcile import Controller
    from tests.fakes import FakeBackend

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator_host)
    for name in ("DASKLAB_PROJECT", "DASKLAB_REGION"):  # recorded, so what main() sets is undone
        monkeypatch.setenv(name, "recorded")
        monkeypatch.delenv(name)
    monkeypatch.setenv("DASKLAB_HOME", str(home))
    pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()
    project = f"cli-p{next(_projects)}"
    for topic in ("dasklab-control", "dasklab-status"):
        pubsub.ensure_topic(project, topic)
    pubsub.ensure_subscription(project, "dasklab-control", "trigger")
    ctl = Controller(FakeBackend(), pubsub.PubSubEvents(project, "dasklab-status"),
                     config.Config(backend="gke", project=project))
    monkeypatch.setattr(entry, "controller", lambda: ctl)
    stop = threading.Event()
    thread = threading.Thread(target=pump_control, args=(project, stop), daemon=True)
    thread.start()
    try:
        assert main("keep-alive", "--project", project, "--lab", "x", "--until", "2020-01-01T00:00:00Z",
                    "--wait", "60") == 2
        out = capsys.readouterr()
        assert f"to projects/{project}/topics/dasklab-control (message " in out.out
        assert "dasklab: refused by the controller (message " in out.err and "until: must be in the future" in out.err
        assert main("stop-lab", "--project", project, "--lab", "ghost", "--wait", "60") == 0
        assert "nothing to do: no lab named ghost" in capsys.readouterr().out
    finally:
        stop.set()
        thread.join(timeout=10)
    assert main("stop-lab", "--project", project, "--lab", "ghost", "--wait", "1") == 0  # nobody answers
    assert "no outcome from the controller within 1s" in capsys.readouterr().err
    listed = pubsub.subscriber().list_subscriptions(project=f"projects/{project}")
    assert [s.name.rsplit("/", 1)[1] for s in listed] == ["trigger"]  # every reply subscription deleted
    pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()


def pump_control(project: str, stop) -> None:
    """What the deployed control function does with each message of its trigger subscription (the emulator's pull
    standing in for the push), until `stop` is set."""
    import base64

    from dasklab import entry
    from dasklab.adapters import pubsub
    subscriber = pubsub.subscriber()
    path = subscriber.subscription_path(project, "trigger")
    while not stop.is_set():
        for m in subscriber.pull(subscription=path, max_messages=10, timeout=5).received_messages:
            entry.handle_event({"message": {"data": base64.b64encode(m.message.data).decode(),
                                            "attributes": dict(m.message.attributes),
                                            "messageId": m.message.message_id}})
            subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id])
        stop.wait(0.2)
