"""The documentation holds together: README stays a landing page, every relative link in README.md
and docs/ resolves (to a file, and to a heading where it names one), every page of docs/ is in the
index, and the option tables in docs/options.md are the parser's. In-process and fast."""
from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
README_LIMIT = 12 * 1024


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside code blocks, where links and headings count. A code block is fenced, or
    indented by 4 spaces after a blank line (an indented line right after prose continues a list)."""
    lines, fenced, indented, previous = [], False, False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            indented = line.startswith("    ") and (indented or not previous.strip())
            if not indented:
                lines.append(line)
        previous = line
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces become hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a markdown page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a page that lead nowhere: a missing file, a path outside the repository,
    or an anchor that no heading of the target has."""
    broken = []
    for line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):      # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_relative_to(root.resolve()) or not dest.exists():
                broken.append(f"{page.relative_to(root)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return broken


def test_every_relative_link_resolves():
    broken = [b for page in pages() for b in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Some `code` (here)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](other.md#some-code-here) [ok](#title) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [out](../../etc/passwd)\n"
        "```\n[in code](ignored.md)\n```\n\n    [indented code](ignored.md)\n"
        "- a list item\n    [continued](gone-too.md)\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#nope (no such heading)",
        "page.md: ../../etc/passwd (no such file)",
        "page.md: gone-too.md (no such file)",
    ]


def test_slug_follows_github():
    assert slug("Megatron-core torch_dist") == "megatron-core-torch_dist"
    assert slug("Coming from verl's `model_merger`") == "coming-from-verls-model_merger"
    assert slug("Presets in configs/") == "presets-in-configs"
    assert slug("`distmerge merge`") == "distmerge-merge"


def test_readme_is_a_landing_page_that_links_every_doc():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= README_LIMIT, f"README.md is {len(text.encode())} bytes; move detail to docs/"
    for command in ("bash launch/demo.sh", "bash launch/test.sh", 'bash launch/test.sh -m "not slow"',
                    "source .venv/bin/activate", "python3 -m venv", "bench/scaling.png"):
        assert command in text, command
    index = (DOCS / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"(docs/{page.name}" in text, f"README.md does not link docs/{page.name}"
            assert f"({page.name}" in index, f"docs/README.md does not list {page.name}"


def test_option_tables_are_generated_from_the_parser():
    from distmerge.docs import OPTIONS_PAGE, main, subcommands

    assert main(["--check"]) == 0, "run: python -m distmerge.docs"
    text = OPTIONS_PAGE.read_text()
    for command in subcommands():
        assert f"<!-- options: {command} -->" in text, command


def test_option_table_drift_is_caught_and_repaired(tmp_path):
    from distmerge.docs import OPTIONS_PAGE, main

    page = tmp_path / "options.md"
    shutil.copy(OPTIONS_PAGE, page)
    assert main([], page=page) == 0                     # up to date with today's parser, whatever the repo's page
    good = page.read_text()
    lines = good.splitlines(keepends=True)
    row = next(i for i, line in enumerate(lines) if line.startswith("| `--"))
    page.write_text("".join(lines[:row] + lines[row + 1:]))      # an option the page no longer lists
    assert main(["--check"], page=page) == 1
    assert main([], page=page) == 0
    assert page.read_text() == good


def test_a_subcommand_without_a_table_gets_one_and_a_stale_table_is_refused(tmp_path):
    from distmerge.docs import OPTIONS_PAGE, main

    page = tmp_path / "options.md"
    good = OPTIONS_PAGE.read_text()
    start = good.index("## `distmerge test`")
    page.write_text(good[:start].rstrip("\n") + "\n")
    assert main(["--check"], page=page) == 1
    assert main([], page=page) == 0
    assert "<!-- options: test -->\n| option |" in page.read_text()
    page.write_text(good + "\n<!-- options: nosuchcommand -->\n<!-- end options -->\n")
    assert main([], page=page) == 1
    assert page.read_text().endswith("<!-- options: nosuchcommand -->\n<!-- end options -->\n")


def table_shape_errors(text: str) -> list[str]:
    """Rows of a markdown table whose cell count differs from the header's (an unescaped `|` in a cell)."""
    errors, width = [], None
    for line in prose_lines(text):
        if not line.startswith("|"):
            width = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line.strip())) - 2
        if width is None:
            width = cells
        elif cells != width:
            errors.append(f"{cells} cells, header has {width}: {line[:80]}")
    return errors


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_keep_their_columns(page):
    assert not table_shape_errors(page.read_text()), "\n".join(table_shape_errors(page.read_text()))


def test_a_bare_pipe_in_a_cell_is_caught():
    table = "| a | b |\n|---|---|\n| `x\\|y` | ok |\n| `x|y` | split |\n"
    assert table_shape_errors(table) == ["3 cells, header has 2: | `x|y` | split |"]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_prose_lines_stay_readable(page):
    """Prose wraps near 100 characters, and no line of it passes the project's 120; tables and code
    cannot wrap, so they are exempt."""
    long = [line for line in prose_lines(page.read_text()) if len(line) > 120 and not line.startswith("|")]
    assert not long, "\n".join(long)
