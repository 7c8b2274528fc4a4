"""The documentation's own checks: every relative link in README.md and docs/*.md resolves (the file exists; an
#anchor names a heading of that file, slugged as GitHub does), the README stays a front door linking every page,
and the package's long description is the README."""

import re
import tomllib
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

REPO = Path(__file__).parent.parent
DOCS = REPO / "docs"
FRONT_DOOR_LINES = 300  # issue 23: "under about 300 lines"
MD = MarkdownIt("commonmark").enable("table")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def _inlines(path: Path):
    """(heading?, inline token) for every inline run of the rendered page (code blocks are not inline)."""
    tokens = MD.parse(path.read_text())
    for i, t in enumerate(tokens):
        if t.type == "inline":
            yield tokens[i - 1].type == "heading_open", t


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: lowercased, every character but letters, digits, '_', '-' and spaces
    dropped, each space a hyphen (github/cmark-gfm's anchor rule, as html-pipeline's TableOfContentsFilter applies)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a page; a repeated one gets -1, -2 … as GitHub numbers them."""
    found, count = set(), {}
    for heading, t in _inlines(path):
        if heading:
            base = slug("".join(c.content for c in t.children if c.type in ("text", "code_inline")))
            found.add(f"{base}-{count[base]}" if base in count else base)
            count[base] = count.get(base, 0) + 1
    return found


def links(path: Path) -> list[str]:
    """Every link and image target of a page (not those inside code)."""
    found = []
    for _, t in _inlines(path):
        for c in t.children:
            if c.type == "link_open":
                found.append(c.attrs["href"])
            elif c.type == "image":
                found.append(c.attrs["src"])
    return found


def broken_links(path: Path) -> list[str]:
    """The relative links of a page that do not resolve, each with why."""
    broken = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: …: not ours to check
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## The labs' Dask version\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#the-labs-dask-version) [self](#page) [web](https://example.org/x)\n"
                    "[gone](missing.md) [no heading](other.md#nowhere) `[in code](missing.md)`\n\n"
                    "```\n[in a block](missing.md)\n```\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "other.md#nowhere"]


@pytest.mark.parametrize("heading, anchor", [
    ("When workers go missing: `dasklab status` says why", "when-workers-go-missing-dasklab-status-says-why"),
    ("Updating a lab (the seed's steps 4 and 6)", "updating-a-lab-the-seeds-steps-4-and-6"),
    ("Message schema (v1)", "message-schema-v1"),
    ("Identity: least privilege, checked against the code", "identity-least-privilege-checked-against-the-code"),
    ("The one command", "the-one-command"),
])
def test_anchors_are_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_a_repeated_heading_is_numbered(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A\n\n## Notes\n\n## Notes\n\n## Notes\n")
    assert anchors(page) == {"a", "notes", "notes-1", "notes-2"}


def test_the_readme_is_a_front_door_linking_every_page():
    readme = REPO / "README.md"
    lines = len(readme.read_text().splitlines())
    assert lines <= FRONT_DOOR_LINES, f"README.md has {lines} lines"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme)}
    assert [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked] == []
    titles = {slug(t.content) for heading, t in _inlines(readme) if heading}
    for section in ("quickstart", "the-seed-lab-step-by-step", "message-schema-v1", "trust-model",
                    "deploy-to-google-cloud", "dependencies"):
        assert section in titles


def test_the_readme_command_table_is_the_schema_pages():
    """The README's brief table of commands and their fields is the full schema page's, less its notes (a link
    compared by its text: each page links relative to itself)."""
    def rows(path):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", path.read_text())
        return [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in text.splitlines()
                if re.match(r"\| `[a-z-]+` \|", line)]
    brief, full = rows(REPO / "README.md"), rows(DOCS / "message-schema.md")
    assert brief and brief == full[:len(brief)]


def test_the_long_description_is_the_readme():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["readme"] == "README.md" and (REPO / project["readme"]).read_text().startswith("# dasklab\n")
