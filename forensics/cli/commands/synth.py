"""``fp synth KIND SRC OUT``: pathological generators as image-folder transforms."""

from __future__ import annotations

from pathlib import Path

import typer

#: The kinds of :mod:`forensics.paper.synth` (kept here too so ``--help`` imports no numpy/PIL).
KINDS_HELP = "rotate | downup | updown | shuffle | noise | background | jpeg | crop"


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth_cmd(
        kind: str = typer.Argument(..., help=f"Transform: {KINDS_HELP}."),
        src: Path = typer.Argument(..., help="Folder of source images (searched recursively)."),
        out: Path = typer.Argument(..., help="Output folder (PNG files, same relative paths)."),
        seed: int = typer.Option(0, "--seed", help="Seed of every random step."),
        force: bool = typer.Option(False, "--force", help="Write into a non-empty OUT."),
        angle: float | None = typer.Option(
            None, "--angle", help="rotate: fixed angle in degrees (counter-clockwise)."
        ),
        max_angle: float | None = typer.Option(
            None, "--max-angle", help="rotate: random angle in [-A, A] per image (default 30)."
        ),
        factor: float | None = typer.Option(
            None, "--factor",
            help="downup: down- then up-sampling factor (default 4); updown: up- then "
                 "down-sampling factor (default 2).",
        ),
        grid: int | None = typer.Option(
            None, "--grid", help="shuffle: GRID x GRID patches (default 4)."
        ),
        sigma: float | None = typer.Option(
            None, "--sigma", help="noise: Gaussian std on the 0-255 scale (default 25)."
        ),
        mode: str | None = typer.Option(
            None, "--mode", help="background: color | noise | checker (default color)."
        ),
        threshold: int | None = typer.Option(
            None, "--threshold", help="background: foreground = grey level above this (default 32)."
        ),
        quality: int | None = typer.Option(
            None, "--quality", help="jpeg: JPEG quality 1-95 (default 75)."
        ),
        fraction: float | None = typer.Option(
            None, "--fraction", help="crop: centre share of each side kept (default 0.9)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    ) -> None:
        """Write a transformed copy of an image folder (the paper's pathological generators)."""
        import json

        from forensics.paper.synth import synth_folder

        given = {
            "angle": angle,
            "max_angle": max_angle,
            "factor": factor,
            "grid": grid,
            "sigma": sigma,
            "mode": mode,
            "threshold": threshold,
            "quality": quality,
            "fraction": fraction,
        }
        params = {k: v for k, v in given.items() if v is not None}
        manifest = synth_folder(kind, src, out, seed=seed, force=force, **params)
        if as_json:
            typer.echo(json.dumps(manifest, indent=2))
            return
        shown = ", ".join(f"{k}={v}" for k, v in manifest["params"].items() if v is not None)
        typer.echo(f"Wrote {manifest['n_images']} images to {out} ({kind}: {shown}; seed {seed})")
