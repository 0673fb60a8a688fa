"""The README's commands run as written: every command line in it parses with the parser of the command it names (its
subcommand and every flag), every script and make target it names exists, and it stays short."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250


def _commands() -> list[str]:
    """The README's command lines: its indented code lines, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.startswith("    ") or line.strip().startswith(("import ", "model,", "classifier", "#")):
            current = ""
            continue
        text = line.strip()
        text = text.split("  #")[0].rstrip() if "  #" in text else text
        current += text
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        lines.append(current)
        current = ""
    return lines


def _argv(command: str) -> tuple[str, list[str]]:
    """(the program, its arguments), past environment assignments and launchers (accelerate launch, torchrun, sbatch)."""
    words = shlex.split(command)
    while words and "=" in words[0] and not words[0].startswith("-"):
        words = words[1:]
    if words[:2] == ["accelerate", "launch"] or words[:1] == ["torchrun"]:
        return words[words.index("-m") + 1], words[words.index("-m") + 2:]
    if words[:2] == ["python", "-m"]:
        return words[2], words[3:]
    return words[0], words[1:]


def test_the_readme_is_short_and_has_commands():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= MAX_LINES
    assert len(_commands()) >= 20


@pytest.mark.parametrize("command", _commands())
def test_every_readme_command_parses(command):
    from data_tools import make_shards
    from mmcontrast import train
    from mmcontrast.cli import build_parser

    program, args = _argv(command)
    parsers = {"mmcontrast": build_parser, "mmcontrast.train": train.build_parser, "data_tools.make_shards": make_shards._parser}
    if program in parsers:
        try:
            parsers[program]().parse_args(args)
        except SystemExit as exit:
            pytest.fail(f"{command!r} does not parse (exit {exit.code})")
    elif program == "python":
        assert (ROOT / args[0]).is_file(), f"{command!r} names a script that does not exist"
    elif program == "make":
        assert f"\n{args[0]}:" in (ROOT / "Makefile").read_text(), f"{command!r} names no make target"
    elif program == "sbatch":
        assert (ROOT / next(a for a in args if a.endswith(".sbatch"))).is_file()
    elif program != "data_tools.inspect":
        pytest.fail(f"{command!r}: no check for {program}; add one")
