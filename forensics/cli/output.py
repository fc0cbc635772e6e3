"""How the ``fp`` command line shows help and errors: literal brackets, JSON errors.

Kept apart from :mod:`forensics.cli.app` (which builds the app) and light: nothing heavy is
imported, Rich only when help is formatted.
"""

from __future__ import annotations

from collections.abc import Iterator

import click


def walk(command: click.Command) -> Iterator[click.Command]:
    """``command`` and every command below it."""
    yield command
    for sub in getattr(command, "commands", {}).values():
        yield from walk(sub)


def _escape_help(root: click.Command) -> None:
    """Escape every help text of the tree so that Rich prints ``[default: ...]`` literally.

    Typer renders help as Rich markup, which reads ``[anything]`` as a style tag and deletes
    it. Done once per tree, when help is first formatted (Rich is imported only then).
    """
    if getattr(root, "_fp_help_escaped", False):
        return
    from rich.markup import escape

    for command in walk(root):
        for attr in ("help", "short_help", "epilog"):
            if getattr(command, attr, None):
                setattr(command, attr, escape(getattr(command, attr)))
        for param in command.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
    root._fp_help_escaped = True


def keep_help_literal(command: click.Command) -> None:
    """Make ``command``'s help escape the whole tree's help texts before Rich renders it."""
    format_help = command.format_help

    def wrapper(ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _escape_help(ctx.find_root().command)
        for param in command.get_params(ctx):  # on/off flags take no value: no "<bool>"
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        format_help(ctx, formatter)

    command.format_help = wrapper


def json_error(ctx: click.Context, exc: Exception, exit_code: int) -> bool:
    """With ``--json``, print an error as one JSON object on stderr; whether it did.

    stdout keeps only what the command itself printed (e.g. ``fp bank verify``'s report);
    the exit status is unchanged.
    """
    if not ctx.meta.get("fp.json"):
        return False
    import json

    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    click.echo(json.dumps({"error": {"type": type(exc).__name__, "message": message,
                                     "exit_code": exit_code}}), err=True)
    return True
