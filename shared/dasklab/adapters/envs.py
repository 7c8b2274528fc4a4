"""Local lab environments (adapter over venv and pip): EXTRA_PIP_PACKAGES installed into a venv of their own under
$DASKLAB_HOME/envs that sees the base packages, created once per distinct package set and shared by the labs."""

import fcntl
import hashlib
import json
import shutil
import site
import subprocess
import sys
from pathlib import Path

from dasklab.core.errors import PermanentError, TransientError

PIP_TIMEOUT_S = 300.0
READY_MARK = ".dasklab-ready"  # written last: a venv without it is half made and is made again


def env_dir(home: str | Path, packages: tuple[str, ...]) -> Path:
    """Where the venv of this package set (on this base interpreter) lives."""
    key = json.dumps([sys.executable, sorted(packages)])
    return Path(home) / "envs" / hashlib.sha256(key.encode()).hexdigest()[:12]


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def python_for(home: str | Path, packages: tuple[str, ...]) -> str:
    """The interpreter a lab with these packages runs: the base one when there are none, else its venv's
    (which must have been made by `ensure_env`)."""
    return sys.executable if not packages else str(env_dir(home, packages) / "bin" / "python")


def ensure_env(home: str | Path, packages: tuple[str, ...]) -> str:
    """Make (once) the venv of `packages` and return its python. The venv sees the base interpreter's packages
    (`--system-site-packages`, plus a .pth adding this interpreter's site-packages with their own .pth files, which
    a venv made from a venv would not see), so only what is missing is installed. PermanentError naming the
    packages with pip's tail when pip refuses them; TransientError when it times out."""
    if not packages:
        return sys.executable
    venv = env_dir(home, packages)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two labs asking for the same set make it once
        if (venv / READY_MARK).exists():
            return python_for(home, packages)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                       check=True, capture_output=True, timeout=60)
        base = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
        # addsitedir also reads the .pth files there (editable installs, such as dasklab's own in development)
        _site_packages(venv).joinpath("dasklab-base.pth").write_text(
            "".join(f"import site; site.addsitedir({p!r})\n" for p in base))
        argv = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                "--disable-pip-version-check", "--no-input", *packages]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            shutil.rmtree(venv, ignore_errors=True)
            raise TransientError(f"pip install {' '.join(packages)} took longer than {PIP_TIMEOUT_S:.0f}s") from None
        if out.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            tail = (out.stderr or out.stdout)[-600:]
            raise PermanentError(f"EXTRA_PIP_PACKAGES {' '.join(packages)} could not be installed into the lab's "
                                 f"environment (pip exited {out.returncode}): {tail.strip()}")
        (venv / READY_MARK).write_text(json.dumps({"packages": list(packages), "base": sys.executable}))
    return python_for(home, packages)
