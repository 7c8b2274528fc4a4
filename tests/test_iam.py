"""infra/iam.yaml against the code: every SDK call and gcloud command has its permission in one table, every
permission an identity needs is granted by its roles, and no role is there without a need."""

import ast
import inspect
from functools import lru_cache
from pathlib import Path

import kubernetes.client as k8s
import pytest
import yaml
from google.cloud import compute_v1, container_v1, firestore, scheduler_v1
from google.pubsub_v1.services.publisher import PublisherClient
from google.pubsub_v1.services.subscriber import SubscriberClient

from dasklab.cloud import deploy

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "shared" / "dasklab"
IAM = yaml.safe_load((REPO / "infra" / "iam.yaml").read_text())
PROJECT = "demo-proj"

# SDK family → (the import that brings it in, its client classes [, only these methods])
FAMILIES = {
    "container": ("container_v1", [(container_v1.ClusterManagerClient, None)]),
    "pubsub": ("pubsub_v1", [(PublisherClient, None), (SubscriberClient, None)]),
    "scheduler": ("scheduler_v1", [(scheduler_v1.CloudSchedulerClient, None)]),
    "compute": ("compute_v1", [(compute_v1.InstanceGroupManagersClient, None), (compute_v1.RegionsClient, {"get"})]),
    "kubernetes": ("kubernetes", [(k8s.CoreV1Api, None), (k8s.AppsV1Api, None), (k8s.BatchV1Api, None),
                                  (k8s.RbacAuthorizationV1Api, None), (k8s.NetworkingV1Api, None),
                                  (k8s.ApiClient, {"call_api"})]),
    # the document API: each call on a DocumentReference is one RPC (get → BatchGetDocuments, set → Commit)
    "firestore": ("google.cloud.firestore", [(firestore.Client, {"document"}),
                                             (firestore.DocumentReference,
                                              {"get", "set", "create", "update", "delete"}),
                                             (firestore.Query, {"stream"})]),
}
# families whose API is one-word methods on short-lived references: every such name counts in their modules
ONE_WORD = {"firestore"}
KNOWN_CLIENTS = {cls.__name__ for _, classes in FAMILIES.values() for cls, _ in classes} | {"PublisherClient"}
_VARIANTS = ("_with_http_info", "_without_preload_content", "_unary")


@lru_cache(maxsize=None)
def methods(family: str) -> frozenset[str]:
    """The API methods of a family's clients: public plain functions (not path helpers, not properties)."""
    names = set()
    for cls, only in FAMILIES[family][1]:
        names |= {n for n, v in vars(cls).items() if inspect.isfunction(v) and not n.startswith("_")
                  and not n.endswith(_VARIANTS) and (only is None or n in only)}
    return frozenset(names)


def families_of(tree: ast.Module) -> set[str]:
    """The SDK families a module imports (at its top or inside a function)."""
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {f for f, (marker, _) in FAMILIES.items() if any(marker in name for name in imported)}


def scopes_of(rel: str, tree: ast.Module):
    """(scope, node): 'path::Function', 'path::Class.method' for each method of a class (and 'path::Class' for
    the rest of its body), 'path' for the module's other statements."""
    for top in tree.body:
        if isinstance(top, ast.ClassDef):
            for item in top.body:
                method = isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                yield (f"{rel}::{top.name}.{item.name}" if method else f"{rel}::{top.name}"), item
        elif isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{rel}::{top.name}", top
        else:
            yield rel, top


def scan(path: Path) -> list[tuple[str, str]]:
    """(family.method, scope) for every client method a module calls or passes on, scope as `scopes_of` names it.

    A method whose name has an underscore counts wherever it appears; a one-word name (get, publish) only on a
    receiver that also receives a multi-word method in the module, so `labels.get` is not read as an API call."""
    tree = ast.parse(path.read_text())
    families = families_of(tree)
    rel = path.relative_to(REPO).as_posix()
    found, receivers = [], set()
    for scope, top in scopes_of(rel, tree):
        for node in ast.walk(top):
            if isinstance(node, ast.Attribute):
                for family in families:
                    if node.attr in methods(family):
                        found.append((family, node.attr, ast.unparse(node.value), scope))
                        if "_" in node.attr:
                            receivers.add(ast.unparse(node.value))
    return sorted({(f"{family}.{name}", scope) for family, name, receiver, scope in found
                   if "_" in name or receiver in receivers or family in ONE_WORD})


def code_calls() -> list[tuple[str, str]]:
    return sorted({call for path in sorted(PACKAGE.rglob("*.py")) for call in scan(path)})


def gcloud_commands() -> set[str]:
    """Every gcloud command dasklab runs: cloudbuild.yaml's steps and those `dasklab deploy`/`destroy` build."""
    build = deploy.load_build()
    values = deploy.substitutions(build, PROJECT)
    steps = (deploy.build_iam_steps(IAM, PROJECT) + deploy.build_service_agent_steps(IAM, PROJECT, "123")
             + deploy.build_store_steps(PROJECT, "us-central1")
             + deploy.build_steps(build, values) + deploy.delete_function_steps(build, PROJECT, "us-central1")
             + [deploy.cloud_build_step(values)])
    argvs = [argv for s in steps for argv in (s.argv, s.unless, s.only_if) if argv]
    for node in ast.walk(ast.parse((PACKAGE / "cloud" / "deploy.py").read_text())):  # commands outside any step
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts[:2]):
            argvs.append([e.value for e in node.elts if isinstance(e, ast.Constant)])
    return {" ".join(a for a in argv if not a.startswith("-")) for argv in argvs if argv[0] == "gcloud"}


def command_key(command: str) -> str | None:
    keys = [k for k in IAM["calls"] if k.startswith("gcloud ") and (command + " ").startswith(k + " ")]
    return max(keys, key=len, default=None)


def role_permissions(role: str) -> set[str]:
    custom = role.rsplit("/roles/", 1)[1] if role.startswith("projects/") else None
    return set(IAM["custom_roles"][custom]["permissions"] if custom else IAM["role_permissions"][role])


def in_scope(scope: str, scopes: list[str]) -> bool:
    """A scope (file::function, file::Class.method) runs under an identity that runs it, its class, its file, or a
    folder holding it ("…/")."""
    return any(scope == s or scope.split("::")[0] == s or scope.startswith(s + ".")
               or (s.endswith("/") and scope.startswith(s)) for s in scopes)


def identities() -> dict[str, dict]:
    return {**{f"account {k}": v for k, v in IAM["accounts"].items()},
            **{f"service agent {k}": v for k, v in IAM["service_agents"].items()}, "deployer": IAM["deployer"],
            "operator": IAM["operator"], "administrator": IAM["administrator"], "student": IAM["student"]}


def needed(ident: dict) -> set[str]:
    perms = set(ident.get("platform", {}))
    for key, scope in code_calls():
        if in_scope(scope, ident.get("runs", [])):
            perms |= set(IAM["calls"][key])
    if "cloudbuild.yaml" in ident.get("runs", []):
        perms |= {p for command in gcloud_commands() for p in IAM["calls"][command_key(command)]}
    return perms


# --- the tests -------------------------------------------------------------------------------------

def test_the_scan_sees_the_calls_we_know_of():
    calls = dict.fromkeys(code_calls())
    assert ("container.create_cluster", "shared/dasklab/adapters/gke/clusters.py::Clusters._create_cluster") in calls
    assert ("container.get_cluster", "shared/dasklab/adapters/gke/base.py::GkeBase._get") in calls  # by method
    assert ("compute.get", "shared/dasklab/adapters/compute.py::Migs.target_sizes") in calls  # one-word, on a client
    assert any(key == "kubernetes.patch_namespaced_deployment_scale" and scope.startswith(
        "shared/dasklab/adapters/kube.py::Kube.") for key, scope in calls)
    assert ("pubsub.publish", "shared/dasklab/adapters/pubsub.py::publish") in calls
    assert any(key == "firestore.set" and scope.startswith("shared/dasklab/adapters/firestore.py::FirestoreTombstones.")
               for key, scope in calls)  # tombstones
    assert "gcloud firestore databases create" in gcloud_commands()
    assert ("scheduler.delete_job", "shared/dasklab/cloud/infra.py::destroy") in calls  # passed on, not called there
    assert not any(key.endswith(".get") and "/gke/" in scope for key, scope in calls)  # dict.get is not an API
    assert "gcloud functions deploy dasklab-control" in gcloud_commands()


def test_every_call_has_a_permission():
    missing = sorted({key for key, _ in code_calls() if key not in IAM["calls"]})
    assert missing == [], f"add these calls with their IAM permissions to infra/iam.yaml `calls`: {missing}"
    unmapped = sorted(c for c in gcloud_commands() if command_key(c) is None)
    assert unmapped == [], f"add these gcloud commands to infra/iam.yaml `calls`: {unmapped}"


def test_every_mapped_call_is_still_made():
    used = {key for key, _ in code_calls()} | {command_key(c) for c in gcloud_commands()}
    assert sorted(set(IAM["calls"]) - used) == []


def test_every_call_runs_as_a_known_identity():
    scopes = [s for ident in identities().values() for s in ident.get("runs", [])] + IAM["local_only"]
    strays = sorted({(key, scope) for key, scope in code_calls() if not in_scope(scope, scopes)})
    assert strays == [], "say in infra/iam.yaml which identity runs these (or that they are local_only)"


@pytest.mark.parametrize("name", sorted(identities()))
def test_roles_grant_every_permission_needed(name):
    ident = identities()[name]
    granted = set().union(*(role_permissions(g["role"]) for g in ident["roles"]))
    assert sorted(needed(ident) - granted) == []


def target(grant: dict) -> str:
    """Where a grant applies: the project, or one topic, service or account (its own IAM policy)."""
    for key in ("on_topic", "on_service", "on_account"):
        if grant.get(key):
            return f"{key}:{grant[key]}"
    return "project"


@pytest.mark.parametrize("name", sorted(identities()))
def test_no_role_is_unneeded(name):
    """A grant is needed when it gives a needed permission no other grant gives on its resource: a project-wide grant
    covers every resource of the project, a topic's grant that topic alone."""
    ident, need = identities()[name], needed(identities()[name])
    for grant in ident["roles"]:
        others = set().union(set(), *(role_permissions(g["role"]) for g in ident["roles"] if g is not grant
                                      and target(g) in ("project", target(grant))))
        only_here = (role_permissions(grant["role"]) & need) - others
        assert only_here, f"{grant['role']} grants nothing {name} needs that its other roles do not"
        assert grant.get("why"), f"{grant['role']}: say why"


def test_the_scan_knows_every_client_class_the_code_builds():
    names = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if families_of(tree):
            names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and (n.attr.endswith("Client") or n.attr.endswith("Api"))}
    assert sorted(names - KNOWN_CLIENTS) == [], "add the new client class to FAMILIES"


def test_deploy_grants_exactly_the_file_and_act_as_only_on_the_nodes_account():
    steps = deploy.build_iam_steps(IAM, PROJECT)
    grants = {(s.argv[1], s.argv[s.argv.index("add-iam-policy-binding") + 1], a.split("=", 1)[1], r.split("=", 1)[1])
              for s in steps if "add-iam-policy-binding" in s.argv
              for a in s.argv if a.startswith("--member=") for r in s.argv if r.startswith("--role=")}
    controller = f"serviceAccount:dasklab-controller@{PROJECT}.iam.gserviceaccount.com"
    nodes = f"dasklab-nodes@{PROJECT}.iam.gserviceaccount.com"
    assert ("iam", nodes, controller, "roles/iam.serviceAccountUser") in grants
    assert not any(g[0] == "projects" and g[3] == "roles/iam.serviceAccountUser" for g in grants)
    expected = sum(len(a["roles"]) for a in IAM["accounts"].values())
    assert len(grants) == expected
    assert {g[3] for g in grants if g[2] == controller} == {
        g["role"].format(project=PROJECT) for g in IAM["accounts"]["controller"]["roles"]}


def test_each_function_runs_as_its_account_and_its_nodes_as_the_nodes_account():
    """The control and ticks functions (and their triggers) run as dasklab-controller; the HTTPS command function as
    dasklab-command, which holds no write on any lab. Each knows the nodes' account and the administrators."""
    build = deploy.load_build()
    values = deploy.substitutions(build, PROJECT, {"_ADMINS": "root@example.edu,ops@example.edu"})
    accounts = {}
    for fn in deploy.function_deploys(build):
        flags = {k: deploy.substitute(v, values) if isinstance(v, str) else v for k, v in fn["flags"].items()}
        accounts[fn["name"]] = flags["service-account"]
        if "trigger-topic" in flags:
            assert flags["trigger-service-account"] == flags["service-account"]
        env = deploy.env_vars(flags["set-env-vars"])
        assert env["DASKLAB_NODE_SERVICE_ACCOUNT"] == deploy.account_email(IAM["accounts"]["nodes"]["account"], PROJECT)
        assert env["DASKLAB_ADMINS"] == "root@example.edu,ops@example.edu"  # commas kept: the ^|^ delimiter
    email = {key: deploy.account_email(a["account"], PROJECT) for key, a in IAM["accounts"].items()}
    assert accounts == {"dasklab-control": email["controller"], "dasklab-ticks": email["controller"],
                        "dasklab-command": email["command"]}
    command_roles = {g["role"] for g in IAM["accounts"]["command"]["roles"]}
    writes = {p for r in command_roles for p in role_permissions(r)
              if p.split(".")[-1] in ("create", "update", "delete", "setIamPolicy")}
    assert writes == set(), "the internet-facing function writes nothing"


def test_the_operator_calls_the_entry_point_and_reads_its_answers_and_nothing_more():
    """Item 6: an operator invokes the command entry point and attaches subscriptions to the status topic alone; it
    cannot publish a command, read the control topic, or delete a subscription (the trigger's stops every command)."""
    operator = IAM["operator"]
    granted = {p: g for g in operator["roles"] for p in role_permissions(g["role"])}
    assert {"pubsub.topics.publish", "pubsub.subscriptions.delete", "pubsub.topics.attachSubscription"} - set(
        granted) == {"pubsub.topics.publish", "pubsub.subscriptions.delete"}
    assert granted["pubsub.topics.attachSubscription"]["on_topic"] == "status"  # never the control topic
    assert granted["run.routes.invoke"] == {**granted["run.routes.invoke"], "role": "roles/run.invoker",
                                            "on_service": "dasklab-command"}
    assert not any(g.get("on_topic") == "control" for g in operator["roles"])
    # publishing on the control topic: administrators and the command entry point's account, each on that topic
    # alone; the deployer (pubsub.admin, and it may grant itself anything) is the only project-wide publisher
    publishers = sorted((name, target(g)) for name, ident in identities().items() for g in ident["roles"]
                        if "pubsub.topics.publish" in role_permissions(g["role"]))
    assert publishers == [("account command", "on_topic:control"), ("account command", "on_topic:status"),
                          ("account controller", "on_topic:status"), ("administrator", "on_topic:control"),
                          ("deployer", "project"), ("service agent pubsub", "on_topic:dead_letter"),
                          ("service agent scheduler", "on_topic:ticks")]


def test_an_operators_cli_leaves_its_reply_subscription_to_expire(monkeypatch):
    import dasklab.adapters.pubsub as pubsub
    from dasklab.replies import PubSubReplies
    calls = []
    monkeypatch.setattr(pubsub, "close_reply_subscription", lambda *a: calls.append(a))
    PubSubReplies("p", "dasklab-status", "r1", delete=False).__exit__(None, None, None)
    PubSubReplies("p", "dasklab-status", "r2").__exit__(None, None, None)
    assert calls == [("p", "dasklab-reply-r2")]  # the administrator's path deletes its own


def test_only_the_timers_may_publish_on_the_timers_topic():
    """The ticks topic's one publish grant is the Cloud Scheduler service agent's, on that topic alone, created first.
    Who can make a tick appear there: a publisher on the topic or the project, and anyone who may create a Cloud
    Scheduler job, since its Pub/Sub target is published by the agent ("a Cloud Scheduler Admin (or any custom role
    with the permission cloudscheduler.jobs.create) can create jobs that publish to any Pub/Sub topics within the
    project": cloud.google.com/scheduler/docs/access-control). Those are the agent, the controller (its classes'
    wake-ups are ticks) and the deployer (who may grant itself anything) - no operator, administrator, the command
    function nor the Pub/Sub agent."""
    from dasklab.core.timers import load_infra
    ticks = load_infra()["topics"]["ticks"]
    steps = deploy.build_service_agent_steps(IAM, PROJECT, "123")
    on_ticks = [s for s in steps if s.argv[:3] == ("gcloud", "pubsub", "topics") and ticks in s.argv]
    assert [s.argv[3:5] for s in on_ticks] == [("create", ticks), ("add-iam-policy-binding", ticks)]
    assert on_ticks[0].unless == ("gcloud", "pubsub", "topics", "describe", ticks, f"--project={PROJECT}")
    [grant] = [s for s in steps if "add-iam-policy-binding" in s.argv and ticks in s.argv]
    assert "--member=serviceAccount:service-123@gcp-sa-cloudscheduler.iam.gserviceaccount.com" in grant.argv
    assert "--role=roles/pubsub.publisher" in grant.argv

    def can_tick(ident: dict) -> bool:
        return any(target(g) in ("project", "on_topic:ticks") and role_permissions(g["role"])
                   & {"pubsub.topics.publish", "cloudscheduler.jobs.create"} for g in ident["roles"])

    assert sorted(name for name, ident in identities().items() if can_tick(ident)) == [
        "account controller", "deployer", "service agent scheduler"]
    # and every grant deploy applies to an account is where the file says: no project-wide publisher is left
    applied = deploy.build_iam_steps(IAM, PROJECT) + deploy.build_service_agent_steps(IAM, PROJECT, "123")
    assert not [s for s in applied if s.argv[1] == "projects" and "--role=roles/pubsub.publisher" in s.argv]


def test_deploy_grants_the_people_what_the_file_says_where_it_says():
    """Administrators (DASKLAB_ADMINS) and operators (--operators) get the `administrator`'s and `operator`'s grants:
    run.invoker on the command function's Cloud Run service alone, publish on the control topic to administrators
    alone, subscribe on the status topic; after the function is deployed (the service must exist)."""
    steps = deploy.build_people_steps(IAM, PROJECT, "europe-west1", "Root@Example.edu", "group:class@example.edu")
    grants = {(s.argv[1], s.argv[s.argv.index("add-iam-policy-binding") + 1], m.split("=", 1)[1], r.split("=", 1)[1])
              for s in steps if "add-iam-policy-binding" in s.argv
              for m in s.argv if m.startswith("--member=") for r in s.argv if r.startswith("--role=")}
    admin, group = "user:root@example.edu", "group:class@example.edu"
    assert grants == {
        ("run", "dasklab-command", admin, "roles/run.invoker"), ("run", "dasklab-command", group, "roles/run.invoker"),
        ("pubsub", "dasklab-control", admin, "roles/pubsub.publisher"),
        ("pubsub", "dasklab-status", admin, "roles/pubsub.subscriber"),
        ("pubsub", "dasklab-status", group, "roles/pubsub.subscriber"),
        ("projects", PROJECT, admin, f"projects/{PROJECT}/roles/dasklabOperator"),
        ("projects", PROJECT, admin, f"projects/{PROJECT}/roles/dasklabAdministrator"),
        ("projects", PROJECT, group, f"projects/{PROJECT}/roles/dasklabOperator")}
    [invoker] = [s for s in steps if s.argv[1] == "run" and admin in s.argv[7]]
    assert "--region=europe-west1" in invoker.argv
    assert {d["name"] for d in deploy.function_deploys(deploy.load_build())} >= {"dasklab-command"}
    assert [s.argv[3] for s in steps if s.argv[3] == "create"] == ["create", "create"]  # each topic once
    with pytest.raises(Exception, match="not an IAM principal"):
        deploy.build_people_steps(IAM, PROJECT, "r", "", "everyone")


def test_the_controller_reads_the_dead_letters_on_that_subscription_alone():
    """Every reconcile tick pulls and acknowledges the dead letters: consume is granted on dasklab-dead-letter-sub
    alone (not project-wide, which would reach the triggers' and the reply subscriptions), after the deploy has made
    sure the topic and the subscription exist (`infra apply` comes later in a deploy)."""
    from dasklab.core.config import Config
    [grant] = [g for g in IAM["accounts"]["controller"]["roles"] if g["role"] == "roles/pubsub.subscriber"]
    assert grant["on_subscription"] == "dead_letter"
    steps = deploy.build_iam_steps(IAM, PROJECT)
    ids = [s.id for s in steps]
    binding = next(s for s in steps if s.argv[1:4] == ("pubsub", "subscriptions", "add-iam-policy-binding"))
    assert binding.argv[4] == Config.dead_letter_subscription and "--role=roles/pubsub.subscriber" in binding.argv
    assert f"--member=serviceAccount:dasklab-controller@{PROJECT}.iam.gserviceaccount.com" in binding.argv
    assert ids.index("topic-dead_letter") < ids.index("subscription-dead_letter") < steps.index(binding)
    create = steps[ids.index("subscription-dead_letter")]
    assert create.unless[:4] == ("gcloud", "pubsub", "subscriptions", "describe")
    assert "--topic=dasklab-dead-letter" in create.argv
    consumers = sorted(name for name, ident in identities().items() for g in ident["roles"]
                       if "pubsub.subscriptions.consume" in role_permissions(g["role"]) and not g.get("on_topic"))
    assert consumers == ["account controller", "administrator", "operator", "service agent pubsub"]
