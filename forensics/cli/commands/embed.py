"""``fp embed DIR --encoder NAME --out FILE``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer

from forensics import defaults
from forensics.errors import printable
from forensics.plugin.encoders import POOLS

#: ``--pool`` choices; follows :data:`forensics.plugin.encoders.POOLS`.
Pool = Enum("Pool", {p: p for p in POOLS}, type=str)


def skip_bad_option() -> Any:
    """The ``--skip-bad`` option of every command that reads a folder of images."""
    return typer.Option(False, "--skip-bad",
                        help="Leave out files that cannot be used as images (not a regular "
                             "file, too large, unreadable, corrupt); they are listed and "
                             "recorded in the output.")


def ray_option() -> Any:
    """The ``--ray ADDRESS`` option of every command that embeds a folder."""
    return typer.Option(None, "--ray", metavar="ADDRESS",
                        help="Embed on a Ray cluster: auto (a running cluster, else a local "
                             "one), local, or HOST:PORT of a head node. Needs "
                             "'fp-forensics[scale]'; the images must be readable at the same "
                             "path on every node.")


def check_ray(address: str | None) -> None:
    """Before any work: ``--ray`` needs Ray installed (one ``Error:`` line otherwise)."""
    if address is not None:
        from forensics.data.ray_embed import require_ray

        require_ray()


def echo_skipped(manifest: Any, what: str = "") -> None:
    """Say on stderr which files of a manifest were left out, and why."""
    for s in getattr(manifest, "skipped", None) or ():
        typer.echo(f"skipped {what}{printable(s.relpath, 1000)}: {s.reason}", err=True)


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed_cmd(
        folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
        encoder: str = typer.Option(..., "--encoder", "-e",
                                    help="Encoder name (fp encoders list); NAME@SIZE sets "
                                         "the input size where allowed."),
        out: Path = typer.Option(..., "--out", "-o", help="Output file: .npz or .parquet."),
        weights: str = typer.Option(None, "--weights",
                                    help="hub, a local file, or random:SEED "
                                         "[default: the encoder's default]."),
        pool: Pool = typer.Option(Pool(defaults.POOL), "--pool",
                                  help="Transformer layers: class token or mean of patch "
                                       "tokens."),
        device: str = typer.Option(defaults.DEVICE, "--device", help="auto, cpu, cuda or cuda:N."),
        batch_size: int = typer.Option(defaults.BATCH_SIZE, "--batch-size", min=1,
                                       help="Images per batch."),
        num_workers: int = typer.Option(None, "--num-workers", min=0,
                                        help="Decoding workers [default: by device]."),
        skip_bad: bool = skip_bad_option(),
        ray: str = ray_option(),
        no_cache: bool = typer.Option(False, "--no-cache", help="Do not use the cache."),
        cache_dir: Path = typer.Option(None, "--cache-dir",
                                       help="Embedding cache [default: $FP_CACHE_DIR/"
                                            "embeddings or the user cache dir]."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        as_json: bool = typer.Option(False, "--json",
                                     help="Print what was written as JSON (no progress bar)."),
    ) -> None:
        """Embed every image of FOLDER at every layer of an encoder; write them to --out."""
        from forensics.data.embed import DEFAULT_CACHE, check_output_path, embed_folder

        check_output_path(out)  # before any work
        check_ray(ray)
        result = embed_folder(
            folder, encoder, weights=weights, pool=pool.value, device=device,
            batch_size=batch_size, num_workers=num_workers,
            cache_dir=None if no_cache else (cache_dir or DEFAULT_CACHE),
            progress=not (quiet or as_json), skip_bad=skip_bad, ray=ray,
        )
        result.save(out)
        info, manifest = result.encoder_info, result.manifest
        if as_json:
            from forensics.cli.commands.bank import echo_json

            echo_json({"out": str(out), "n_images": len(result), "layers": list(result.layers),
                       "dims": [int(a.shape[1]) for a in result.arrays],
                       "skipped": [{"image": s.relpath, "reason": s.reason}
                                   for s in manifest.skipped],
                       "encoder_info": info})
            return
        echo_skipped(manifest)
        typer.echo(
            f"{len(result)} images, {len(result.layers)} layers of {info['name']} "
            f"(weights {info['weights']}, pool {info['pool']}; "
            f"{info['cache']['hits']} from cache) -> {out}"
        )
