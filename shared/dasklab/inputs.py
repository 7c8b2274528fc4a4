"""Where the deploy's inputs are (functions/, infra/, cloudbuild.yaml, requirements.txt): the one resolver that the
deploy, the local controller and the timers use, for an installed wheel and for a source checkout alike.

A wheel carries them as package data in dasklab/_inputs (setup.py copies them there at build time); a checkout (or an
editable install) has them at the repository's top, beside shared/dasklab.
"""

from pathlib import Path

from dasklab.core.errors import PermanentError

PACKAGE = Path(__file__).resolve().parent
BUNDLE = "_inputs"  # the package-data folder's name (setup.py writes it)
NAMES = ("functions", "infra", "cloudbuild.yaml", "requirements.txt")  # what setup.py copies, top-level names


def inputs_root() -> Path:
    """The folder holding NAMES: the package's own copy if it has one, else the checkout's top."""
    bundled = PACKAGE / BUNDLE
    if (bundled / "cloudbuild.yaml").is_file():
        return bundled
    checkout = PACKAGE.parents[1]  # <repo>/shared/dasklab → <repo>
    if (checkout / "cloudbuild.yaml").is_file() and (checkout / "shared" / "dasklab") == PACKAGE:
        return checkout
    raise PermanentError(f"this dasklab ({PACKAGE}) has no deploy inputs: neither {bundled} nor a source checkout "
                         f"around it holds cloudbuild.yaml; reinstall dasklab from its wheel")


def input_path(relative: str) -> Path:
    """One input by its path from the repository's top, e.g. "infra/iam.yaml" or "functions/main.py"."""
    if relative.split("/", 1)[0] not in NAMES:
        raise ValueError(f"{relative!r} is not a deploy input (one of {', '.join(NAMES)})")
    return inputs_root() / relative
