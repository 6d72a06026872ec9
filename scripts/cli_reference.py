"""Write docs/cli.md, every command's arguments, from the real parser, so the reference cannot drift.

    python scripts/cli_reference.py > docs/cli.md     (tests/test_docs.py checks the file equals this output)

The tables are built from the parser's actions rather than argparse's --help text, whose layout changes
between Python versions.
"""

from __future__ import annotations

import argparse

from slm.cli import COMMANDS, build_parser


def subparser(command: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def argument_row(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if action.option_strings:
        metavar = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
        name = ", ".join(f"`{flag}{metavar}`" for flag in action.option_strings)
    else:
        name = f"`{action.metavar or action.dest}`"
    if action.choices and not isinstance(action.choices, dict):
        name += " (" + ", ".join(f"`{choice}`" for choice in action.choices) + ")"
    text = parser._get_formatter()._expand_help(action) if action.help else ""  # fills in %(default)s
    unsaid = action.default in (None, argparse.SUPPRESS, False) or action.required or "default" in text
    default = "" if unsaid else f"`{action.default}`"
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"| {name} | {default} | {text} |"


def reference() -> str:
    lines = ["# Command reference", "",
             "Generated from the parser by `python scripts/cli_reference.py > docs/cli.md`; do not edit by hand.",
             "Every command also prints this with `--help`, with examples.", ""]
    for command, (_, summary) in COMMANDS.items():
        parser = subparser(command)
        lines += [f"## `slm {command}`", "", summary[0].upper() + summary[1:] + ".", "",
                  "| argument | default | meaning |", "| --- | --- | --- |"]
        lines += [argument_row(parser, a) for a in parser._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
        lines += ["", "```", parser.epilog.strip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
