"""The README and docs/ cannot go stale: every `slm` command they show parses with the real parser, every
relative link and image resolves (anchors included), and docs/cli.md is what the parser generates."""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from slm.cli import parse_args

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
COMMAND_LINE = re.compile(r"\bslm\s")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def shown_commands(markdown: str) -> list[list[str]]:
    """The argv of every `slm ...` command in the page's shell blocks (continued lines joined; commands
    after `&&`, `|` or `;` and after VAR=value prefixes included; comments dropped)."""
    commands = []
    for language, body in FENCE.findall(markdown):
        if language not in ("", "bash", "sh", "shell"):  # a file tree or an output is fenced as `text`
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if not COMMAND_LINE.search(line):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
            lexer.whitespace_split, lexer.commenters = True, "#"
            words, command = list(lexer), []
            for word in words + [";"]:
                if word in ("&&", "||", "|", ";"):
                    while command and re.fullmatch(r"[A-Z_]+=.*", command[0]):
                        command.pop(0)
                    if command[:1] == ["slm"]:
                        commands.append(command[1:])
                    command = []
                else:
                    command.append(word)
    return commands


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_a_page_shows_parses(page):
    commands = shown_commands(page.read_text())
    if page.name in ("README.md", "cli.md", "training.md", "serving.md", "assistant.md"):
        assert commands, f"{page.name} shows no slm command: the reader cannot have been checked"
    for argv in commands:
        try:
            parse_args(argv)
        except SystemExit as exit:  # argparse's own exit, e.g. a --help line
            assert exit.code == 0, f"{page.name}: slm {shlex.join(argv)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_image_a_page_has_resolves(page):
    assert broken_links(page) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](missing.md) [no anchor](#nowhere) ![pic](pic.png)\n\n"
                    "```bash\nSLM_API_KEY=x slm serve RUN && echo hi | slm chat RUN  # talk\n"
                    "slm train --data d \\\n  --out r\n```\n")
    assert broken_links(page) == ["missing.md", "#nowhere", "pic.png"]
    assert shown_commands(page.read_text()) == [["serve", "RUN"], ["chat", "RUN"], ["train", "--data", "d", "--out", "r"]]
    with pytest.raises(Exception):  # a flag that does not exist fails the first test
        parse_args(["train", "--no-such-flag"])


def test_the_cli_reference_is_what_the_parser_generates():
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py")], capture_output=True,
                               text=True, check=True).stdout
    assert (ROOT / "docs" / "cli.md").read_text() == generated, "run: python scripts/cli_reference.py > docs/cli.md"
    assert all(f"## `slm {command}`" in generated for command in runpy.run_path(
        str(ROOT / "src" / "slm" / "cli.py"))["COMMANDS"])
