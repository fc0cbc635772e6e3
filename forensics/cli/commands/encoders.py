"""``fp encoders list`` and ``fp encoders show NAME``."""

from __future__ import annotations

import json

import typer

from forensics import defaults


def _summary(encoder) -> dict:
    return {
        "name": encoder.name,
        "family": getattr(encoder, "family", ""),
        "default_weights": getattr(encoder, "default_weights", "hub"),
        "description": getattr(encoder, "description", ""),
    }


def register(app: typer.Typer) -> None:
    encoders_app = typer.Typer(
        help="List encoders and show their layers.", no_args_is_help=True
    )
    app.add_typer(encoders_app, name="encoders")

    @encoders_app.command("list")
    def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List every encoder: name, family, default weights, description."""
        from forensics.plugin.manager import registry

        rows = [{**_summary(e.obj), "plugin": e.plugin}
                for e in sorted(registry("encoders").values(), key=lambda e: e.name)]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("name", "family", "weights", "description")
        for r in rows:
            table.add_row(r["name"], r["family"], r["default_weights"], r["description"])
        Console().print(table)

    @encoders_app.command("show")
    def show_cmd(
        name: str = typer.Argument(..., help="Encoder name, e.g. vit-b16 or timm:resnet34."),
        pool: str = typer.Option(defaults.POOL, "--pool", help="cls or mean."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Show an encoder's layers and their dimensions (no weights are loaded)."""
        from forensics.data.embed import get_encoder
        from forensics.plugin.encoders import check_pool

        check_pool(pool)
        encoder = get_encoder(name)
        names = encoder.layer_names(pool)
        dims_fn = getattr(encoder, "layer_dims", None)
        dims = dims_fn(pool) if dims_fn is not None and names is not None else None
        info = {
            **_summary(encoder),
            "layers": None if names is None else [
                {"name": n, "dim": None if dims is None else dims[i]} for i, n in enumerate(names)
            ],
        }
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        typer.echo(f"{info['name']} ({info['family']}): {info['description']}")
        typer.echo(f"default weights: {info['default_weights']}")
        if names is None:
            typer.echo("layers: known only once the weights are loaded")
            return
        typer.echo(f"{len(names)} layers:")
        for layer in info["layers"]:
            typer.echo(f"  {layer['name']:<28} {layer['dim'] if layer['dim'] else '?'}")
