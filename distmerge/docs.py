"""README's option tables, generated from the argument parser so they cannot drift.

    python -m distmerge.docs          # rewrite the tables in README.md
    python -m distmerge.docs --check  # exit 1 if README.md is out of date (the tests run this)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- options: (\w+) -->\n)(.*?)(<!-- end options -->)", re.S)


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def options_table(command: str) -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for action in subparser(command)._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = " / ".join(action.option_strings) if action.option_strings else action.metavar
        if action.choices:
            name += " {" + ",".join(map(str, action.choices)) + "}"
        elif action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        if action.nargs == 0:
            default = "off"
        elif action.default is None:
            default = "none"
        else:
            default = f"`{action.default:g}`" if isinstance(action.default, float) else f"`{action.default}`"
        meaning = (action.help or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + options_table(m.group(2)) + m.group(4), text)


def main(argv=None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    text = README.read_text()
    new = render(text)
    if check:
        if new != text:
            print("README.md's option tables are out of date: run python -m distmerge.docs", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
