"""cloudbuild.yaml: one deploy step per entry point of functions/main.py, consistent substitutions, and a staged
source folder in which the deployed function really imports (built here by running the staging step)."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from dasklab import inputs
from dasklab.cloud import deploy
from dasklab.core.errors import PermanentError
from dasklab.core.timers import load_infra
from tests.lockfile import read_lock

REPO = Path(__file__).resolve().parents[1]
BUILD = deploy.load_build()
STEPS = {s.get("id"): s for s in BUILD["steps"]}


def entry_points(kind: str = "cloud_event") -> set[str]:
    """Functions of functions/main.py decorated with @functions_framework.<kind> (cloud_event or http)."""
    tree = ast.parse((REPO / "functions" / "main.py").read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
            and any(ast.unparse(d) == f"functions_framework.{kind}" for d in node.decorator_list)}


@pytest.mark.smoke
def test_one_deploy_step_per_entry_point():
    deploys = deploy.function_deploys(BUILD)
    assert entry_points() == {"control", "ticks"} and entry_points("http") == {"command"}
    assert sorted(d["flags"]["entry-point"] for d in deploys) == sorted(entry_points() | entry_points("http"))
    assert len({d["name"] for d in deploys}) == len(deploys)


def test_the_command_function_is_https_iam_authenticated_with_its_own_url_as_audience():
    """Gen2, HTTP trigger, no unauthenticated callers (Cloud Run checks the ID token and run.invoker first), reachable
    from anywhere, its own account; its env names its URL (the audience its callers' tokens must name), the
    administrators and the further audiences (gcloud's client id by default: `gcloud auth print-identity-token`)."""
    [fn] = [d for d in deploy.function_deploys(BUILD) if d["flags"]["entry-point"] == "command"]
    flags = fn["flags"]
    assert fn["name"] == "dasklab-command" and flags["gen2"] is True and flags["trigger-http"] is True
    assert "retry" not in flags and "trigger-topic" not in flags and "allow-unauthenticated" not in flags
    assert flags["no-allow-unauthenticated"] is True and flags["ingress-settings"] == "all"
    assert flags["service-account"] == "$_COMMAND_SERVICE_ACCOUNT@$PROJECT_ID.iam.gserviceaccount.com"
    values = deploy.substitutions(BUILD, "p1", {"_REGION": "europe-west1", "_ADMINS": "a@x.org,b@x.org"})
    env = deploy.env_vars(deploy.substitute(flags["set-env-vars"], values))
    assert env["DASKLAB_COMMAND_URL"] == deploy.command_url("europe-west1", "p1") == \
        "https://europe-west1-p1.cloudfunctions.net/dasklab-command"
    assert env["DASKLAB_ADMINS"] == "a@x.org,b@x.org" and env["DASKLAB_PROJECT"] == "p1"
    assert env["DASKLAB_TOKEN_AUDIENCES"] == "32555940559.apps.googleusercontent.com"
    from dasklab.core.config import from_env
    cfg = from_env(env)  # the entry point reads it as such
    assert (cfg.command_url, cfg.admins, cfg.backend) == (env["DASKLAB_COMMAND_URL"], "a@x.org,b@x.org", "gke")
    order = list(STEPS)
    assert order.index("stage") < order.index(fn["step"]) < order.index("infra")


def test_env_vars_reads_gcloud_escaping():
    assert deploy.env_vars("A=1,B=2") == {"A": "1", "B": "2"}
    assert deploy.env_vars("^|^A=1,2|B=") == {"A": "1,2", "B": ""}


@pytest.mark.parametrize("fn", [d for d in deploy.function_deploys(BUILD) if "trigger-topic" in d["flags"]],
                         ids=lambda d: d["name"])
def test_deploy_step_flags(fn):
    flags = fn["flags"]
    assert flags["gen2"] is True and flags["retry"] is True
    assert (flags["runtime"], flags["region"], flags["source"], flags["timeout"]) == (
        "python312", "$_REGION", "build/function", "540s")
    assert flags["trigger-topic"] == {"control": "$_CONTROL_TOPIC", "ticks": "$_TICK_TOPIC"}[flags["entry-point"]]
    assert flags["max-instances"] == "$_MAX_INSTANCES"
    assert flags["service-account"] == "$_SERVICE_ACCOUNT@$PROJECT_ID.iam.gserviceaccount.com"
    env = deploy.env_vars(flags["set-env-vars"])
    assert env["DASKLAB_PROJECT"] == "$PROJECT_ID" and env["DASKLAB_LOCATION"] == "$_LOCATION"
    assert flags["ingress-settings"] == "internal-only" and flags["no-allow-unauthenticated"] is True
    order = list(STEPS)
    assert order.index("smoke") < order.index("stage") < order.index(fn["step"]) < order.index("infra")


def test_substitutions_are_declared_used_and_agree_with_the_infra_files():
    text = yaml.safe_dump(BUILD["steps"])
    used = set(re.findall(r"\$\{?(_[A-Z0-9_]+)", text))
    assert used == set(BUILD["substitutions"]), "every $_NAME is declared, every declared one is used"
    assert BUILD["substitutions"]["_CONTROL_TOPIC"] == load_infra()["topics"]["control"]
    assert BUILD["substitutions"]["_TICK_TOPIC"] == load_infra()["topics"]["ticks"]
    iam = deploy.load_iam()
    assert BUILD["substitutions"]["_SERVICE_ACCOUNT"] == iam["accounts"]["controller"]["account"]
    assert BUILD["substitutions"]["_COMMAND_SERVICE_ACCOUNT"] == iam["accounts"]["command"]["account"]
    assert BUILD["substitutions"]["_NODE_SERVICE_ACCOUNT"] == iam["accounts"]["nodes"]["account"]
    assert all("entrypoint" in s for s in BUILD["steps"]), "each step must also run outside Cloud Build"


def test_substitution_rules():
    values = deploy.substitutions(BUILD, "p1", {"_REGION": "europe-west1"})
    assert deploy.substitute("--region=$_REGION ${PROJECT_ID} $$HOME", values) == "--region=europe-west1 p1 $HOME"
    with pytest.raises(Exception, match=r"\$_NOPE"):
        deploy.substitute("$_NOPE", values)
    with pytest.raises(Exception, match="_NOPE"):
        deploy.substitutions(BUILD, "p1", {"_NOPE": "x"})


def test_the_infra_step_applies_with_the_timer_settings():
    [step] = [s for s in deploy.build_steps(BUILD, deploy.substitutions(BUILD, "p1")) if s.id == "infra"]
    assert "python -m dasklab.cli infra apply --project=p1 --region=us-central1" in step.argv[-1]
    assert "pip install -e" not in step.argv[-1]  # the staged library applies: no checkout needed
    assert step.env == {"DASKLAB_NIGHTLY_AT": "02:00", "DASKLAB_NIGHTLY_TIME_ZONE": "Etc/UTC",
                        "PYTHONPATH": "build/function"}


def run_step(step_id: str, workspace: Path, **kw) -> subprocess.CompletedProcess:
    [step] = [s for s in deploy.build_steps(BUILD, deploy.substitutions(BUILD, "p1")) if s.id == step_id]
    return subprocess.run(step.argv, cwd=workspace, env=deploy.local_env(step.env), capture_output=True, text=True,
                          check=True, **kw)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The folder `dasklab deploy` generates and runs the build's steps in."""
    return deploy.build_workspace(tmp_path_factory.mktemp("deploy") / "workspace")


@pytest.fixture(scope="module")
def staged(workspace) -> Path:
    """Run the staging step's script in the workspace."""
    run_step("stage", workspace, timeout=60)
    return workspace / "build" / "function"


def test_the_workspace_is_laid_out_as_the_repository_top_with_the_package_carrying_its_inputs(workspace):
    for name in ("cloudbuild.yaml", "requirements.txt", "functions/main.py", "infra/dasklab.yaml", "infra/iam.yaml"):
        assert (workspace / name).read_bytes() == (REPO / name).read_bytes()
        assert (workspace / "shared" / "dasklab" / "_inputs" / name).read_bytes() == (REPO / name).read_bytes()
    assert (workspace / "shared" / "dasklab" / "cli.py").read_bytes() == (REPO / "shared/dasklab/cli.py").read_bytes()
    assert not list(workspace.rglob("__pycache__")) and not (workspace / "tests").exists()


def test_the_smoke_step_says_it_is_skipped_without_tests_and_runs_the_smoke_tier_with_them(workspace, tmp_path):
    skipped = run_step("smoke", workspace, timeout=60)
    assert "smoke tier: skipped, no tests/ in this upload" in skipped.stdout
    with_tests = deploy.build_workspace(tmp_path / "ws", with_tests=True)
    ran = run_step("smoke", with_tests, timeout=600)  # dasklab's dependencies are here: no pip install
    assert "smoke tier: pytest -m smoke" in ran.stdout
    assert int(re.search(r"(\d+) passed", ran.stdout)[1]) >= 10 and "failed" not in ran.stdout


def test_the_smoke_step_names_every_file_with_smoke_tests():
    marked = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py") if "@pytest.mark.smoke" in p.read_text()}
    [step] = [s for s in deploy.build_steps(BUILD, deploy.substitutions(BUILD, "p1")) if s.id == "smoke"]
    assert set(re.findall(r"tests/test_\w+\.py", step.argv[-1])) == marked


def test_the_inputs_come_from_the_package_when_it_carries_them_else_from_the_checkout(monkeypatch, tmp_path):
    assert inputs.inputs_root() == REPO  # this checkout: the package carries no copy
    package = tmp_path / "site-packages" / "dasklab"
    (package / "_inputs").mkdir(parents=True)
    (package / "_inputs" / "cloudbuild.yaml").write_text("steps: []\n")
    monkeypatch.setattr(inputs, "PACKAGE", package)  # an installed wheel's
    assert inputs.input_path("infra/iam.yaml") == package / "_inputs" / "infra" / "iam.yaml"
    (package / "_inputs" / "cloudbuild.yaml").unlink()
    with pytest.raises(PermanentError, match="has no deploy inputs"):
        inputs.inputs_root()
    with pytest.raises(ValueError, match="not a deploy input"):
        inputs.input_path("setup.py")


def test_the_staged_folder_holds_the_function_and_the_library(staged):
    assert (staged / "main.py").read_text() == (REPO / "functions" / "main.py").read_text()
    assert (staged / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()
    assert (staged / "dasklab" / "__init__.py").is_file() and (staged / "dasklab" / "adapters" / "gke" / "nodes.py").is_file()
    assert not list(staged.rglob("__pycache__")) and not (staged / "dasklab" / "tests").exists()


@pytest.mark.slow
def test_the_staged_function_imports_its_own_copy_of_the_library(staged):
    code = ("import sys, main, dasklab, dasklab.runtime, dasklab.adapters.gke, dasklab.adapters.kube; "
            "from dasklab.core.timers import load_infra, infra_path; from dasklab.inputs import inputs_root; "
            "load_infra(); print(main.control.__name__, dasklab.__file__, inputs_root(), infra_path())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=staged, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    name, *where = out.stdout.split()
    assert name == "control" and all(Path(w).resolve().is_relative_to(staged.resolve()) for w in where), where


def distribution_of(module: str) -> str:
    """The installed distribution providing `module` (the longest dotted prefix that one distribution owns)."""
    top = module.split(".")[0]
    candidates = importlib.metadata.packages_distributions().get(top, [top])
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i])
        owners = {d for d in candidates if any(str(f) == path + ".py" or str(f).startswith(path + "/")
                                                for f in importlib.metadata.distribution(d).files or [])}
        if len(owners) == 1:
            return owners.pop().lower()
    return candidates[0].lower()


@pytest.mark.slow
def test_requirements_cover_what_the_staged_library_imports(staged):
    """Every third-party distribution imported by the deployed modules is pinned in requirements.txt."""
    wanted = set(read_lock(staged / "requirements.txt"))
    modules = set()
    for path in [staged / "main.py", *(staged / "dasklab").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules |= {f"{node.module}.{a.name}" for a in node.names}
    third_party = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names | {"dasklab", "main"}}
    needed = {canonicalize_name(distribution_of(m)) for m in third_party}
    missing = sorted(needed - wanted)
    assert missing == [], f"add to pyproject.toml, then regenerate requirements.txt: {missing}"


def test_run_steps_in_order_skipping_what_is_done_and_stopping_at_a_failure(tmp_path):
    said = []
    steps = [deploy.Step("exists", ("sh", "-c", "exit 9"), unless=("true",)),
             deploy.Step("absent", ("sh", "-c", "exit 9"), only_if=("false",)),
             deploy.Step("first", ("sh", "-c", "touch first"), env={"X": "1"}),
             deploy.Step("broken", ("sh", "-c", "exit 3")),
             deploy.Step("never", ("sh", "-c", "touch never"))]
    with pytest.raises(deploy.StepFailed, match="step broken failed with exit code 3"):
        deploy.run_steps(steps, cwd=tmp_path, say=said.append)
    assert (tmp_path / "first").exists() and not (tmp_path / "never").exists()
    assert said == ["[1/5] exists: nothing to do", "[2/5] absent: nothing to do",
                    "[3/5] first: X=1 sh -c 'touch first'", "[4/5] broken: sh -c 'exit 3'"]
    with pytest.raises(deploy.StepFailed, match="no-such-tool-here is not installed"):
        deploy.run_steps([deploy.Step("x", ("no-such-tool-here",))], cwd=tmp_path, say=said.append)
