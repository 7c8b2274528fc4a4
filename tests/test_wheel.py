"""dasklab from a built wheel, in a fresh venv, nowhere near this checkout: the deploy's inputs ship in the wheel,
`dasklab deploy --dry-run` lists its steps in a workspace of real paths, `dasklab local serve` and `dasklab demo` run.

Slow (minutes): it builds the wheel, installs it with its dependencies (from pip's cache once they are there) and runs
the demo on real Dask."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOT_PACKAGED = ("*.egg-info", "__pycache__", ".git", ".venv", "build", ".dasklab", ".pytest_cache", ".hypothesis")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding dasklab installed from a wheel built out of a copy of this tree (not editable)."""
    root = tmp_path_factory.mktemp("wheel")
    tree, wheels, venv = root / "tree", root / "dist", root / "venv"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*NOT_PACKAGED))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, tree], check=True,
                   timeout=600, env=clean_env())
    [wheel] = wheels.glob("dasklab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("cloudbuild.yaml", "requirements.txt", "functions/main.py", "infra/dasklab.yaml", "infra/iam.yaml"):
        assert f"dasklab/_inputs/{name}" in names
    shutil.rmtree(tree)  # nothing can be found there any more
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel], check=True, timeout=1800,
                   env=clean_env())
    return venv


def clean_env(**extra) -> dict:
    """This environment without what points at this checkout or at a running emulator, or sets dasklab's cloud."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PUBSUB_EMULATOR_HOST", "VIRTUAL_ENV")
           and not k.startswith("DASKLAB_") and k != "GOOGLE_CLOUD_PROJECT"}
    return {**env, **{k: str(v) for k, v in extra.items()}}


def outside_the_checkout(path: str | Path) -> bool:
    return not Path(path).resolve().is_relative_to(REPO.resolve())


def test_dasklab_is_the_wheels(venv, tmp_path):
    out = subprocess.run([venv / "bin" / "python", "-c", "import dasklab.inputs as i; print(i.inputs_root())"],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True, check=True, timeout=60)
    root = Path(out.stdout.strip())
    assert root.is_relative_to(venv) and root.name == "_inputs" and (root / "functions" / "main.py").is_file()


def test_deploy_dry_run_lists_every_step_in_a_workspace_of_real_paths(venv, tmp_path):
    home = tmp_path / "home"
    out = subprocess.run([venv / "bin" / "dasklab", "deploy", "--dry-run", "--project", "p"], cwd=tmp_path,
                         env=clean_env(DASKLAB_HOME=home), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    head = out.stdout.splitlines()[0]
    workspace, source = re.search(r"run in (\S+) \(generated from (\S+)\)", head).groups()
    assert Path(workspace) == home / "deploy" and Path(source).is_relative_to(venv)
    steps = [line for line in out.stdout.splitlines() if line.startswith("[")]
    build = ["stage", "deploy-control", "deploy-ticks", "deploy-command", "infra"]  # cloudbuild.yaml's, in order
    assert [i for i in (s.split(":", 1)[0].split("] ")[1] for s in steps) if i in build] == build
    assert steps[0].startswith(f"[1/{len(steps)}] ") and len(steps) > 20
    for used in ("cloudbuild.yaml", "requirements.txt", "functions/main.py", "shared/dasklab/cli.py",
                 "shared/dasklab/_inputs/infra/dasklab.yaml", "infra/iam.yaml"):  # what the steps name, relatively
        assert (Path(workspace) / used).is_file(), used
    assert "functions/main.py" in out.stdout and "shared/dasklab" in out.stdout and "--source=build/function" in out.stdout
    absolute = re.findall(r"(?<![\w.])/[\w./-]+", out.stdout)
    assert absolute and all(outside_the_checkout(p) for p in absolute), [p for p in absolute if not outside_the_checkout(p)]


def test_local_serve_runs_the_wheels_entry_points_until_interrupted(venv, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        serve = subprocess.Popen([venv / "bin" / "dasklab", "local", "serve", "--quiet"], cwd=tmp_path,
                                 env=clean_env(DASKLAB_HOME=tmp_path / "home"), stdout=sink, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "local controller running" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        sources = [c.cmdline()[c.cmdline().index("--source") + 1] for c in psutil.Process(serve.pid).children()
                   if "functions_framework" in c.cmdline()]
        assert len(sources) == 2 and all(Path(s).is_relative_to(venv) for s in sources), sources
        serve.send_signal(signal.SIGINT)  # Ctrl-C
        assert serve.wait(timeout=120) == 0, log.read_text()
        assert "stopping" in log.read_text()
    finally:
        stop_group(serve)


def test_the_demo_runs_from_the_wheel(venv, tmp_path):
    log = tmp_path / "demo.log"
    with open(log, "w") as sink:
        demo = subprocess.Popen([venv / "bin" / "dasklab", "demo"], cwd=tmp_path, stdout=sink,
                                stderr=subprocess.STDOUT, env=clean_env(DASKLAB_HOME=tmp_path / "home"),
                                start_new_session=True)
    try:
        code = demo.wait(timeout=900)
    finally:
        stop_group(demo)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "controller stopped; processes left: 0" in text


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to what is still running of the process's group (dasklab unwinds and stops what it started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
