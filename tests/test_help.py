"""Every command's help shows every option's help text whole, brackets included."""

from __future__ import annotations

import re

import click
import pytest
import typer
import typer.rich_utils
from typer.testing import CliRunner

from forensics.cli.app import app

runner = CliRunner()


def _paths(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _paths(sub, (*path, name))


PATHS = [(path, cmd) for path, cmd in _paths(typer.main.get_command(app))]


def _flat(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text).strip()


@pytest.mark.parametrize("path,command", PATHS, ids=[" ".join(p) or "fp" for p, _ in PATHS])
def test_help_keeps_every_bracket(monkeypatch, path, command):
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 1000)  # no wrapping inside a cell
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    shown = _flat(result.output)
    texts = [p.help for p in command.params if getattr(p, "help", None)]
    texts += [c.help.split("\n\n")[0] for c in getattr(command, "commands", {}).values()
              if c.help and not c.hidden]
    for text in texts:
        assert _flat(text) in shown, f"help text lost in `fp {' '.join(path)} --help`: {text!r}"
    stray = re.findall(r".{0,30} [.,](?=\s|$)", shown)  # what is left of a lost "[...]"
    assert not stray, stray


def test_a_default_in_brackets_is_shown():
    result = runner.invoke(app, ["embed", "--help"], env={"COLUMNS": "200"})
    assert "Decoding workers [default: by device]." in result.output


@pytest.mark.parametrize("path,command", PATHS, ids=[" ".join(p) or "fp" for p, _ in PATHS])
def test_flags_show_no_type(monkeypatch, path, command):
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 1000)
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output


def test_top_level_help_groups_commands_as_users_meet_them(monkeypatch):
    from forensics.cli.app import PANELS

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 1000)
    top = typer.main.get_command(app)
    listed = [name for _, names in PANELS for name in names]
    assert sorted(listed) == sorted(top.commands)  # every command in exactly one panel
    out = runner.invoke(app, ["--help"]).output
    titles = [title for title, _ in PANELS]
    at = [out.index(f"─ {title} ─") for title in titles]
    assert at == sorted(at) and "─ Commands ─" not in out
    for (title, names), start, end in zip(PANELS, at, [*at[1:], len(out)], strict=True):
        panel = out[start:end]
        rows = [re.match(r"│ (\S+)", line) for line in panel.splitlines()[1:]]
        assert [m.group(1) for m in rows if m] == list(names), title
