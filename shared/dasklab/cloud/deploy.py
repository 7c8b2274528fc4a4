"""Deployment: the steps of cloudbuild.yaml run here in order, the identity of infra/iam.yaml, and teardown.

    build_workspace (the repository's top, generated from the installed package: dasklab/inputs.py)
    load_build → build_steps (pure: substitute Cloud Build variables) → run_steps (subprocesses, in the workspace)
    load_iam   → build_iam_steps (pure: gcloud commands)              → run_steps

`dasklab deploy` runs the identity steps, then the build's steps (or `gcloud builds submit` of the workspace with
`--cloud-build`); `dasklab destroy` deletes the functions the build deploys and what `infra` created.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dasklab.core.errors import DasklabError, ValidationError
from dasklab.core.timers import dead_letter_subscription, load_infra
from dasklab.inputs import BUNDLE, NAMES, PACKAGE, input_path, inputs_root

_VARIABLE = re.compile(r"\$\$|\$\{(\w+)\}|\$(\w+)")


class StepFailed(DasklabError):
    """A deployment step exited with an error."""


@dataclass(frozen=True)
class Step:
    id: str
    argv: tuple[str, ...]
    env: dict = field(default_factory=dict)
    dir: str = ""
    unless: tuple[str, ...] = ()  # skip the step when this command succeeds ("it exists already")
    only_if: tuple[str, ...] = ()  # skip the step when this command fails ("there is nothing to delete")

    def __str__(self) -> str:
        env = " ".join(f"{k}={_quote(v)}" for k, v in self.env.items())
        return " ".join(filter(None, [env, " ".join(map(_quote, self.argv))]))


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


# --- cloudbuild.yaml -------------------------------------------------------------------------------

def load_build(path: Path | None = None) -> dict:
    return yaml.safe_load(Path(path or input_path("cloudbuild.yaml")).read_text())


def substitute(text: str, values: dict) -> str:
    """Cloud Build's substitution: $NAME and ${NAME} from `values`, `$$` → `$`; an unknown name is an error."""
    def one(m: re.Match) -> str:
        if m[0] == "$$":
            return "$"
        name = m[1] or m[2]
        if name not in values:
            raise ValidationError(f"${name}", "is not a substitution of cloudbuild.yaml (declare it under "
                                              "`substitutions`) nor PROJECT_ID")
        return str(values[name])
    return _VARIABLE.sub(one, text)


def substitutions(build: dict, project: str, overrides: dict | None = None) -> dict:
    """The file's defaults, overridden by `overrides` (keys like _REGION), plus PROJECT_ID."""
    declared = {k: str(v) for k, v in (build.get("substitutions") or {}).items()}
    unknown = sorted(set(overrides or {}) - set(declared))
    if unknown:
        raise ValidationError(unknown[0], "is not declared under `substitutions` in cloudbuild.yaml")
    return {**declared, **{k: str(v) for k, v in (overrides or {}).items()}, "PROJECT_ID": project}


def build_steps(build: dict, values: dict, skip: tuple[str, ...] = ()) -> list[Step]:
    """Every step of the build as a local command, substituted; each must name its entrypoint."""
    steps = []
    for i, raw in enumerate(build["steps"]):
        step_id = raw.get("id", f"step-{i}")
        if step_id in skip:
            continue
        if "entrypoint" not in raw:
            raise ValidationError(f"steps[{i}].entrypoint", "is required: the step must also run outside Cloud Build")
        env = dict(item.split("=", 1) for item in raw.get("env", []))
        steps.append(Step(step_id, tuple(substitute(a, values) for a in [raw["entrypoint"], *raw.get("args", [])]),
                          {k: substitute(v, values) for k, v in env.items()}, raw.get("dir", "")))
    return steps


def function_deploys(build: dict) -> list[dict]:
    """The functions the build deploys: {"step", "name", "flags": {--flag: value}} per `gcloud functions deploy`."""
    deploys = []
    for raw in build["steps"]:
        args = [raw.get("entrypoint", ""), *raw.get("args", [])]
        if args[:3] == ["gcloud", "functions", "deploy"]:
            flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in args[4:] if a.startswith("--"))
            deploys.append({"step": raw.get("id", ""), "name": args[3], "flags": flags})
    return deploys


def delete_function_steps(build: dict, project: str, region: str) -> list[Step]:
    """`gcloud functions delete` for each function the build deploys, skipped when it does not exist."""
    where = (f"--region={region}", f"--project={project}")
    return [Step(f"delete-{d['name']}", ("gcloud", "functions", "delete", d["name"], "--gen2", *where, "--quiet"),
                 only_if=("gcloud", "functions", "describe", d["name"], "--gen2", *where, "--format=none"))
            for d in function_deploys(build)]


def cloud_build_step(values: dict, build_file: Path | None = None) -> Step:
    """`gcloud builds submit` of this repository with the same substitutions."""
    pairs = [f"{k}={v}" for k, v in values.items() if k.startswith("_")]
    subs = "^|^" + "|".join(pairs) if any("," in p for p in pairs) else ",".join(pairs)  # gcloud topic escaping
    return Step("cloud-build", ("gcloud", "builds", "submit", f"--project={values['PROJECT_ID']}",
                                f"--config={(build_file or input_path('cloudbuild.yaml')).name}", f"--substitutions={subs}", "."))


def env_vars(flag: str) -> dict:
    """A --set-env-vars value as gcloud reads it: KEY=VALUE pairs split on commas, or on the delimiter D of a value
    starting `^D^` (`gcloud topic escaping`), so a value may hold commas."""
    delimiter = ","
    if flag.startswith("^") and flag.index("^", 1) > 1:
        delimiter, flag = flag[1:flag.index("^", 1)], flag[flag.index("^", 1) + 1:]
    return dict(kv.split("=", 1) for kv in flag.split(delimiter) if kv)


def command_url(region: str, project: str, name: str = "dasklab-command") -> str:
    """The HTTPS function's URL (Cloud Functions gen2: https://REGION-PROJECT.cloudfunctions.net/NAME): where the CLI
    sends commands, and the audience of its callers' ID tokens."""
    return f"https://{region}-{project}.cloudfunctions.net/{name}"


# --- infra/iam.yaml --------------------------------------------------------------------------------

def load_iam(path: Path | None = None) -> dict:
    return yaml.safe_load(Path(path or input_path("infra/iam.yaml")).read_text())


def account_email(name: str, project: str) -> str:
    return f"{name}@{project}.iam.gserviceaccount.com"


def build_iam_steps(iam: dict, project: str) -> list[Step]:
    """gcloud commands that create the custom roles and the service accounts, and grant exactly the roles of
    infra/iam.yaml. Every command is idempotent; a role or account is created only when `describe` finds none."""
    steps = []
    for role_id, role in iam.get("custom_roles", {}).items():
        where = (f"--project={project}", f"--title={role['title']}", f"--permissions={','.join(role['permissions'])}")
        steps.append(Step(f"role-{role_id}", ("gcloud", "iam", "roles", "create", role_id, *where, "--stage=GA"),
                          unless=("gcloud", "iam", "roles", "describe", role_id, f"--project={project}")))
        steps.append(Step(f"role-{role_id}", ("gcloud", "iam", "roles", "update", role_id, *where, "--quiet")))
    for key, ident in iam["accounts"].items():
        email = account_email(ident["account"], project)
        steps.append(Step(f"account-{key}", ("gcloud", "iam", "service-accounts", "create", ident["account"],
                                             f"--project={project}", f"--display-name={ident['display_name']}"),
                          unless=("gcloud", "iam", "service-accounts", "describe", email, f"--project={project}")))
    for key, ident in iam["accounts"].items():
        member = f"serviceAccount:{account_email(ident['account'], project)}"
        for grant in ident.get("roles", []):
            steps += build_grant_steps(f"grant-{key}", member, grant, iam, project)
    return _once(steps)


def build_grant_steps(step_id: str, member: str, grant: dict, iam: dict, project: str, region: str = "") -> list[Step]:
    """One grant of infra/iam.yaml to `member` (an IAM principal) where the grant says: on another service account
    (`on_account`), on one of dasklab's topics (`on_topic`, a key of infra/dasklab.yaml topics: created first if
    absent), on one of dasklab's subscriptions (`on_subscription`: created first if absent), on a Cloud Run service
    (`on_service`: a function of cloudbuild.yaml, in `region`), else on the project."""
    role, flags = grant["role"].format(project=project), (f"--member={member}",)
    if grant.get("on_account"):
        email = account_email(iam["accounts"][grant["on_account"]]["account"], project)
        return [Step(step_id, ("gcloud", "iam", "service-accounts", "add-iam-policy-binding", email,
                               f"--project={project}", *flags, f"--role={role}", "--condition=None", "--quiet",
                               "--format=none"))]
    if grant.get("on_topic"):
        topic, where = load_infra()["topics"][grant["on_topic"]], f"--project={project}"
        return [Step(f"topic-{grant['on_topic']}", ("gcloud", "pubsub", "topics", "create", topic, where),
                     unless=("gcloud", "pubsub", "topics", "describe", topic, where)),
                Step(step_id, ("gcloud", "pubsub", "topics", "add-iam-policy-binding", topic, where, *flags,
                               f"--role={role}", "--quiet", "--format=none"))]
    if grant.get("on_subscription"):  # no conditions on a subscription's policy
        sub, where = _subscription_of(grant["on_subscription"]), f"--project={project}"
        return _subscription_steps(grant["on_subscription"], project) + [
            Step(step_id, ("gcloud", "pubsub", "subscriptions", "add-iam-policy-binding", sub, where, *flags,
                           f"--role={role}", "--quiet", "--format=none"))]
    if grant.get("on_service"):
        if not region:
            raise ValidationError("region", f"is needed to grant {role} on the service {grant['on_service']}")
        return [Step(step_id, ("gcloud", "run", "services", "add-iam-policy-binding", grant["on_service"],
                               f"--region={region}", f"--project={project}", *flags, f"--role={role}", "--quiet",
                               "--format=none"))]
    return [Step(step_id, ("gcloud", "projects", "add-iam-policy-binding", project, *flags, f"--role={role}",
                           "--condition=None", "--quiet", "--format=none"))]


def _once(steps: list[Step]) -> list[Step]:
    """The steps in order, a repeated one (a topic created for a second grant on it) left out."""
    seen, kept = set(), []
    for step in steps:
        if (step.id, step.argv, step.unless) not in seen:
            seen.add((step.id, step.argv, step.unless))
            kept.append(step)
    return kept


def _subscription_of(key: str) -> str:
    """`on_subscription: dead_letter`: the subscription keeping that topic's messages (infra/dasklab.yaml)."""
    if key != "dead_letter":
        raise ValidationError("on_subscription", f"only dead_letter has a subscription of dasklab's own, not {key!r}")
    return dead_letter_subscription(load_infra()["topics"])


def _subscription_steps(key: str, project: str) -> list[Step]:
    """The topic and subscription a grant is on, created as `dasklab infra apply` creates them, unless they exist
    (the grant comes before the infra step of a deploy)."""
    from dasklab.cloud.infra import DEAD_LETTER_ACK_S
    topic, sub, where = load_infra()["topics"][key], _subscription_of(key), f"--project={project}"
    return [Step(f"topic-{key}", ("gcloud", "pubsub", "topics", "create", topic, where),
                 unless=("gcloud", "pubsub", "topics", "describe", topic, where)),
            Step(f"subscription-{key}", ("gcloud", "pubsub", "subscriptions", "create", sub, f"--topic={topic}",
                                         f"--ack-deadline={DEAD_LETTER_ACK_S}", where),
                 unless=("gcloud", "pubsub", "subscriptions", "describe", sub, where))]


def build_service_agent_steps(iam: dict, project: str, project_number: str) -> list[Step]:
    """Grants to Google's service agents (named by the project number) that dasklab relies on: on the project, or on
    one of dasklab's topics (the topic is created first if absent)."""
    steps = []
    for key, agent in iam.get("service_agents", {}).items():
        member = f"serviceAccount:{agent['email'].format(project_number=project_number)}"
        for grant in agent["roles"]:
            steps += build_grant_steps(f"grant-{key}", member, grant, iam, project)
    return _once(steps)


def people_members(emails: str) -> list[str]:
    """Comma-separated Google identities (DASKLAB_ADMINS) → IAM principals: a service account's e-mail is a
    serviceAccount:, any other a user:; one already prefixed (user:, group:, domain:, serviceAccount:) is kept."""
    members = []
    for item in (e.strip() for e in emails.split(",")):
        if not item:
            continue
        if ":" not in item:
            item = f"{'serviceAccount' if item.endswith('.gserviceaccount.com') else 'user'}:{item.lower()}"
        if not re.fullmatch(r"(user|group|serviceAccount):[\w.%+-]+@[\w-]+(\.[\w-]+)+|domain:[\w-]+(\.[\w-]+)+", item):
            raise ValidationError("member", f"{item!r} is not an IAM principal (user:, group:, domain:, serviceAccount:)")
        members.append(item)
    return members


def build_people_steps(iam: dict, project: str, region: str, admins: str, operators: str) -> list[Step]:
    """The grants of infra/iam.yaml's `administrator` to each of `admins` (DASKLAB_ADMINS) and of its `operator` to
    each of `operators` (IAM principals: a class's group, its students): run once the command function exists, since
    run.invoker is granted on its Cloud Run service."""
    steps = []
    for kind, members in (("administrator", people_members(admins)), ("operator", people_members(operators))):
        for member in members:
            for grant in iam[kind]["roles"]:
                steps += build_grant_steps(f"grant-{kind}", member, grant, iam, project, region)
    return _once(steps)


def build_store_steps(project: str, region: str, database: str = "(default)") -> list[Step]:
    """The Firestore (Native mode) database that keeps the tombstones of stopped labs, created when `describe`
    finds none, and the TTL policies on `expire_at` that delete tombstones past Pub/Sub's 24 h retry horizon, the
    records of what was reported once (failed creations) after 30 days, and failing messages' last errors after 8."""
    where = (f"--database={database}", f"--project={project}")
    return [Step("firestore-database", ("gcloud", "firestore", "databases", "create", *where, f"--location={region}",
                                        "--type=firestore-native"),
                 unless=("gcloud", "firestore", "databases", "describe", *where, "--format=none")),
            *(Step(f"firestore-ttl{suffix}", ("gcloud", "firestore", "fields", "ttls", "update", "expire_at",
                                              f"--collection-group={group}", "--enable-ttl", "--async", *where))
              for suffix, group in (("", "dasklab-tombstones"), ("-reported", "dasklab-reported"),
                                    ("-failures", "dasklab-failures")))]


def fetch_project_number(project: str) -> str:
    out = subprocess.run(["gcloud", "projects", "describe", project, "--format=value(projectNumber)"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise StepFailed(f"cannot read the number of project {project}: {out.stderr.strip()}")
    return out.stdout.strip()


# --- the workspace: what the build's relative paths name, generated from the installed package --------

def build_workspace(dest: Path, *, with_tests: bool = False) -> Path:
    """A fresh folder laid out as the repository's top for the build's steps (and what `gcloud builds submit`
    uploads): the inputs, and shared/dasklab, a copy of this dasklab with its inputs as package data (so the staged
    function and the infra step find theirs). `with_tests` adds the checkout's tests/ (and the examples they read)
    for the smoke step."""
    root, dest = inputs_root(), Path(dest)
    if with_tests and not (root / "tests").is_dir():
        raise ValidationError("--smoke", f"needs the tests of a source checkout; this dasklab is installed ({root})")
    shutil.rmtree(dest, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, dest / "shared" / "dasklab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", BUNDLE))
    for into in (dest, dest / "shared" / "dasklab" / BUNDLE):
        for name in NAMES:
            if (root / name).is_dir():
                shutil.copytree(root / name, into / name, ignore=skip)
            else:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, into / name)
    if with_tests:
        for name in ("tests", "examples"):
            shutil.copytree(root / name, dest / name, ignore=skip)
        shutil.copy2(root / "pyproject.toml", dest / "pyproject.toml")  # the markers, the asyncio mode
    return dest


# --- running ---------------------------------------------------------------------------------------

def local_env(extra: dict | None = None) -> dict:
    """This environment, with this interpreter's bin folder first so `python` and `pip` are the venv's."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_steps(steps: list[Step], *, cwd: Path | None = None, say=print) -> None:
    """Run each step in order (in `cwd`, by default this process's), its output streamed; StepFailed at the first
    that fails."""
    cwd = Path(cwd or Path.cwd())
    def succeeds(argv) -> bool:
        return subprocess.run(argv, cwd=cwd, capture_output=True, check=False, env=local_env()).returncode == 0

    for n, step in enumerate(steps, 1):
        if (step.unless and succeeds(step.unless)) or (step.only_if and not succeeds(step.only_if)):
            say(f"[{n}/{len(steps)}] {step.id}: nothing to do")
            continue
        say(f"[{n}/{len(steps)}] {step.id}: {step}")
        try:
            code = subprocess.run(step.argv, cwd=cwd / step.dir, env=local_env(step.env), check=False).returncode
        except FileNotFoundError:
            raise StepFailed(f"step {step.id}: {step.argv[0]} is not installed") from None
        if code != 0:
            raise StepFailed(f"step {step.id} failed with exit code {code}")
