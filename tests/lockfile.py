"""Test helper: read requirements.txt, the deployed function's lock (`uv pip compile --generate-hashes` output)."""

from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


@dataclass
class Pin:
    requirement: Requirement
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)  # who needs it: pinned names, or "dasklab (pyproject.toml)"

    @property
    def version(self) -> str | None:
        specs = list(self.requirement.specifier)
        return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def read_lock(path: Path) -> dict[str, Pin]:
    """Pins by canonical name. A pin is `name==version \\` then `--hash=` lines, then `# via` comments (one
    `# via X` line, or `# via` followed by `#   X` lines)."""
    pins: dict[str, Pin] = {}
    pin = None
    in_via = False
    for raw in path.read_text().splitlines():
        line = raw.strip().removesuffix("\\").strip()
        if not line:
            continue
        if not raw[0].isspace() and not line.startswith("#"):  # a requirement line starts at column 0
            pin = Pin(Requirement(line.split(" #")[0]))
            pins[canonicalize_name(pin.requirement.name)] = pin
            in_via = False
        elif pin and line.startswith("--hash="):
            pin.hashes.append(line.removeprefix("--hash="))
        elif pin and raw[0].isspace() and line.startswith("# via"):
            rest = line.removeprefix("# via").strip()
            in_via = not rest
            pin.via |= {rest} if rest else set()
        elif pin and in_via and line.startswith("#   "):
            pin.via.add(line.removeprefix("#").strip())
    return pins
