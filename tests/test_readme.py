"""The README walked line by line: every ``allocsearch`` command in its shell blocks names
a command that exists, options that command takes, values of the right types and files
of this repository that exist (parsed by the CLI's own parser, nothing run), and the two
commands at its top are the ones CI runs (issue 16: "README walked line by line")."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from allocsearch.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def shell_lines(text: str) -> list[str]:
    """Every command line of the ``bash`` blocks (comments and blank lines dropped,
    backslash continuations joined)."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        lines += [ln.strip() for ln in joined.splitlines() if ln.strip() and ln[0] != "#"]
    return lines


def allocsearch_commands() -> list[list[str]]:
    cmds = []
    for line in shell_lines(README):
        for part in line.split("&&"):
            words = shlex.split(part)
            if words and words[0] == "allocsearch":
                cmds.append(words[1:])
    return cmds


def test_the_readme_has_the_commands_a_user_needs():
    names = {c[0] for c in allocsearch_commands()}
    expected = {"demo", "build", "search", "compare", "sweep", "export", "apply", "eval", "plan"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("words", allocsearch_commands(), ids=lambda w: " ".join(w)[:60])
def test_every_readme_command_parses(words):
    group = typer.main.get_command(app)
    command = group.get_command(None, words[0])
    assert command is not None, f"README names a command that does not exist: {words[0]}"
    # the CLI's parser: unknown options, missing values and bad types raise here
    command.make_context(words[0], list(words[1:]))
    for w in words[1:]:
        if w.startswith(("configs/", "allocsearch/")):
            assert (ROOT / w).exists(), f"README refers to {w}, which is not in the repository"


def test_the_first_two_commands_are_install_and_demo_then_the_tests():
    lines = shell_lines(README)
    assert "pip install" in lines[0] and lines[0].endswith("allocsearch demo")
    assert "pip install" in lines[1] and '".[test]"' in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = lines[1].split("&&")[-1].strip()
    assert test_command.split()[:5] == ["python", "-m", "pytest", "-n", "2"]
    assert "python -m pytest -n 2 -q" in ci  # the README's test command (after its install)
