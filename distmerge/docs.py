"""The option tables of docs/options.md, generated from the argument parser so they cannot drift.

    python -m distmerge.docs          # rewrite the tables; add a section for a subcommand that has none
    python -m distmerge.docs --check  # exit 1 if docs/options.md is out of date (the tests run this)

A table lives between `<!-- options: NAME -->` and `<!-- end options -->`; everything else on the page is
written by hand and left as it is.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .cli import build_parser

OPTIONS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "options.md"
BLOCK = re.compile(r"(<!-- options: (\w+) -->\n)(.*?)(<!-- end options -->)", re.S)


class StaleTableError(ValueError):
    """The page has a table for a subcommand the parser no longer has."""


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand of `distmerge`, by name, in the parser's order."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def subparser(name: str) -> argparse.ArgumentParser:
    return subcommands()[name]


def _cell(text: str) -> str:
    """Text for a table cell: a bare `|` would end the cell, even inside backticks (as in `all|latest`)."""
    return text.replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "off"
    if action.default is None:
        return "none"
    if isinstance(action.default, float):
        return f"`{action.default:g}`"
    return f"`{action.default}`"


def options_table(command: str, parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown table of one subcommand's arguments: name (with metavar or choices), default, help."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for action in (parser or subparser(command))._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = " / ".join(action.option_strings) if action.option_strings else action.metavar
        if action.choices:
            name += " {" + ",".join(map(str, action.choices)) + "}"
        elif action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        rows.append(f"| `{_cell(name)}` | {_cell(_default(action))} | {_cell(action.help or '')} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """The page with every table regenerated, and a new section at the end for each subcommand without one.

    Raises StaleTableError for a table whose subcommand is gone: deleting prose around it is a person's job.
    """
    commands = subcommands()
    present = BLOCK.findall(text)
    stale = sorted({name for _, name, _, _ in present} - set(commands))
    if stale:
        raise StaleTableError(f"tables for subcommands that no longer exist: {', '.join(stale)}")
    have = {name for _, name, _, _ in present}
    for name in commands:
        if name not in have:
            text = text.rstrip("\n") + f"\n\n## `distmerge {name}`\n\n<!-- options: {name} -->\n<!-- end options -->\n"
    return BLOCK.sub(lambda m: m.group(1) + options_table(m.group(2), commands[m.group(2)]) + m.group(4), text)


def main(argv: list[str] | None = None, page: Path = OPTIONS_PAGE) -> int:
    """Rewrite `page` (or with --check, only compare it): 0 when it is up to date, 1 when not."""
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    try:
        text = page.read_text()
        new = render(text)
    except (OSError, StaleTableError) as e:
        print(f"distmerge.docs: {page}: {e}", file=sys.stderr)
        return 1
    if check:
        if new != text:
            print(f"{page}'s option tables are out of date: run python -m distmerge.docs", file=sys.stderr)
            return 1
        return 0
    page.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
