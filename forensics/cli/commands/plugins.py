"""``fp plugins`` and ``fp list KIND``."""

from __future__ import annotations

import json
from enum import Enum

import typer

from forensics.plugin.manager import KINDS

#: One choice per plugin kind; follows :data:`forensics.plugin.manager.KINDS`.
Kind = Enum("Kind", {kind: kind for kind in KINDS}, type=str)


def _describe(obj) -> str:
    text = getattr(obj, "description", "") or (obj.__doc__ or "").strip().splitlines()[0:1]
    return text if isinstance(text, str) else (text[0] if text else "")


def _check(kinds: list[Kind] | None, load: bool, as_json: bool) -> None:
    """``fp plugins --check``: a table of results; ``Error:`` naming each failing plugin."""
    from forensics.errors import PluginError
    from forensics.plugin.checks import check_registered, failure_message

    results = check_registered([k.value for k in kinds] if kinds else None, load=load)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("kind", "name", "plugin", "contract")
        for r in results:
            table.add_row(r.kind, r.name, r.plugin, "ok" if r.ok else "; ".join(r.problems))
        Console().print(table)
    if not all(r.ok for r in results):
        raise PluginError(failure_message(results))


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        check: bool = typer.Option(
            False, "--check", help="Run every registered object through its kind's contract."),
        kinds: list[Kind] = typer.Option(
            None, "--kind", help="With --check: only this kind (repeatable)."),
        load: bool = typer.Option(
            False, "--load", help="With --check: also load each encoder and embed two images."),
    ) -> None:
        """List loaded plugins, their versions and what each registers."""
        if check:
            _check(kinds, load, as_json)
            return
        from forensics.plugin.manager import plugin_info

        info = plugin_info()
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("plugin", "version", "registers")
        for p in info:
            regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in p["registers"].items())
            name = p["name"] + ("" if p["builtin"] else f" ({p['distribution']})")
            table.add_row(name, p["version"], regs or "-")
        Console().print(table)

    @app.command("list")
    def list_cmd(
        kind: Kind = typer.Argument(..., help="What to list."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """List what is registered for one plugin kind (encoders, distances, ...)."""
        from forensics.plugin.manager import registry

        rows = [
            {"name": e.name, "plugin": e.plugin, "description": _describe(e.obj)}
            for e in sorted(registry(kind.value).values(), key=lambda e: e.name)
        ]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("name", "plugin", "description")
        for r in rows:
            table.add_row(r["name"], r["plugin"], r["description"])
        Console().print(table)
