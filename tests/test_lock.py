"""requirements.txt, the lock the deployed function installs from, agrees with pyproject.toml's runtime
dependencies (no network: both files are read as they are committed)."""

import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from dasklab.cloud import deploy
from tests.lockfile import read_lock

REPO = Path(__file__).resolve().parents[1]
ROOT = "dasklab (pyproject.toml)"  # how the resolver names a dependency asked for by pyproject.toml
# the functions' runtime (cloudbuild.yaml --runtime=python312), on Linux: the environment the lock is resolved for
FUNCTION_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
                "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}


def runtime_dependencies() -> list[Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [r for r in map(Requirement, deps) if not r.marker or r.marker.evaluate(FUNCTION_ENV)]


def lock_problems(deps: list[Requirement], pins: dict) -> list[str]:
    """What makes a lock disagree with the dependencies it was compiled from."""
    problems = []
    for dep in deps:
        pin = pins.get(canonicalize_name(dep.name))
        if pin is None:
            problems.append(f"{dep.name}: not in the lock")
        elif pin.version is None or not dep.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{dep.name}: locked {pin.requirement.specifier}, pyproject wants {dep.specifier}")
    for name, pin in pins.items():
        if pin.version is None:
            problems.append(f"{name}: not pinned with == ({pin.requirement})")
        if not pin.hashes or not all(h.startswith("sha256:") for h in pin.hashes):
            problems.append(f"{name}: no sha256 hash")
    # stale pins: a root the resolver saw in pyproject.toml that pyproject no longer lists, or a pin nothing needs
    wanted = {canonicalize_name(d.name) for d in deps}
    problems += [f"{name}: pinned for pyproject.toml, which no longer asks for it"
                 for name, pin in pins.items() if ROOT in pin.via and name not in wanted]
    needed, todo = set(), [n for n in wanted if n in pins]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += [n for n, p in pins.items() if name in {canonicalize_name(v) for v in p.via if v != ROOT}]
    problems += [f"{name}: pinned, but no dependency needs it" for name in sorted(set(pins) - needed)]
    return problems


def test_the_lock_pins_every_runtime_dependency_within_pyproject_with_hashes():
    pins = read_lock(REPO / "requirements.txt")
    assert lock_problems(runtime_dependencies(), pins) == []
    assert len(pins) > len(runtime_dependencies())  # transitive pins too: the function installs nothing unpinned


def test_the_lock_header_says_how_to_regenerate_it_for_the_functions_python():
    header = [line for line in (REPO / "requirements.txt").read_text().splitlines()[:3] if line.startswith("#")]
    command = " ".join(header)
    assert "compile pyproject.toml" in command and "--generate-hashes" in command and "-o requirements.txt" in command
    [runtime] = {d["flags"]["runtime"] for d in deploy.function_deploys(deploy.load_build())}
    version = f"{runtime.removeprefix('python')[0]}.{runtime.removeprefix('python')[1:]}"  # python312 → 3.12
    assert f"--python-version {version}" in command and FUNCTION_ENV["python_version"] == version


def test_a_lock_that_drifted_from_pyproject_is_caught(tmp_path):
    lock = tmp_path / "requirements.txt"
    lock.write_text("# header\n"
                    "kubernetes==36.0.3 \\\n    --hash=sha256:aa\n    # via dasklab (pyproject.toml)\n"
                    "urllib3==2.8.0 \\\n    --hash=sha256:bb\n    # via kubernetes\n"
                    "croniter==7.0.0\n    # via dasklab (pyproject.toml)\n"
                    "left-over==1.0 \\\n    --hash=sha256:cc\n    # via nothing-pinned\n"
                    "rich==15.0.0 \\\n    --hash=sha256:dd\n    # via dasklab (pyproject.toml)\n")
    deps = [Requirement("kubernetes>=37"), Requirement("croniter>=2"), Requirement("msgspec>=0.19")]
    assert lock_problems(deps, read_lock(lock)) == [
        "kubernetes: locked ==36.0.3, pyproject wants >=37", "msgspec: not in the lock",
        "croniter: no sha256 hash", "rich: pinned for pyproject.toml, which no longer asks for it",
        "left-over: pinned, but no dependency needs it", "rich: pinned, but no dependency needs it"]


# APIs the code calls that older releases lack: (distribution, last release without it, what needs it). Each was
# checked by downloading that release's wheel and the next one's (`pip download --no-deps`) and reading it.
NEWER_APIS = [
    ("kubernetes", "36.0.3", "ApiClient.param_serialize (adapters/kube.py ProxyTransport); first in 37.0.0"),
]


def test_pyproject_floors_exclude_releases_without_the_apis_called():
    specs = {canonicalize_name(r.name): r.specifier for r in runtime_dependencies()}
    too_old = [f"{name} {version}: {why}" for name, version, why in NEWER_APIS
               if specs[name].contains(Version(version))]
    assert too_old == []
