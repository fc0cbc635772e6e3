"""``fp cache info|clear``: the embedding cache."""

from __future__ import annotations

from pathlib import Path

import typer

from forensics.cli.commands.bank import _print_table, echo_json

cache_app = typer.Typer(name="cache", help="Show or clear the embedding cache.",
                        no_args_is_help=True)

CACHE_HELP = "Embedding cache [default: $FP_CACHE_DIR/embeddings or the user cache dir]."


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@cache_app.command("info")
def info_cmd(
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Where the cache is, and what it holds per encoder configuration."""
    from forensics.data.embed import cache_info

    info = cache_info(cache_dir)
    if as_json:
        echo_json(info)
        return
    if not info["entries"]:
        typer.echo(f"The embedding cache at {info['cache_dir']} is empty.")
        return
    _print_table(["encoder", "weights", "pool", "layers", "images", "size", "key"],
                 [[e["encoder"], e["weights"], e["pool"], e["n_layers"], e["n_images"],
                   _mib(e["bytes"]), e["key"][:12]] for e in info["entries"]],
                 title=f"{info['cache_dir']}: {_mib(info['bytes'])}")


@cache_app.command("clear")
def clear_cmd(
    encoder: str | None = typer.Option(None, "--encoder",
                                       help="Only the embeddings of this encoder name."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print what was removed as JSON."),
) -> None:
    """Delete cached embeddings (they are recomputed on next use)."""
    from forensics.data.embed import clear_cache

    out = clear_cache(cache_dir, encoder=encoder)
    if as_json:
        echo_json(out)
        return
    typer.echo(f"Removed {len(out['removed'])} cached configuration(s), "
               f"{_mib(out['bytes'])}, from {out['cache_dir']}.")


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
