"""``fp invmm``: per-image InvMM memorization scores of a diffusers model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

#: Image files ``fp invmm`` reads from a folder (sorted by name).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _image_files(folder: Path) -> list[Path]:
    from forensics.errors import InputError

    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise InputError(f"{folder}: no such image folder or file")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def _fmt(value: float, digits: int = 4) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.{digits}g}"


def register(app: typer.Typer) -> None:
    @app.command("invmm")
    def invmm_cmd(
        images: Path = typer.Argument(..., help="Folder of .png/.jpg images (or one image)."),
        model: str = typer.Option(..., "--model", "-m",
                                  help="Diffusers folder (save_pretrained) or hub id."),
        steps: int | None = typer.Option(None, "--steps", help="Step budget [2000]."),
        similarity: str = typer.Option(
            "ncc", "--similarity",
            help="ncc | ssim | torchscript:PATH (e.g. SSCD) | encoder:NAME."),
        beta: float | None = typer.Option(None, "--beta", help="Similarity threshold [0.5]."),
        lr: float | None = typer.Option(None, "--lr", help="Adam learning rate [0.1]."),
        noises: int | None = typer.Option(
            None, "--noises", help="Noises per step [32; latent 16]."),
        check_every: int | None = typer.Option(
            None, "--check-every", help="C: steps between checks [50; latent 10]."),
        window: int | None = typer.Option(None, "--window", help="Loss smoothing window [100]."),
        xi: float | None = typer.Option(None, "--xi", help="Improvement threshold [1e-3]."),
        delta: float | None = typer.Option(
            None, "--delta", help="KL weight increment [1e-4; latent 5e-4]."),
        kl_weight: float | None = typer.Option(None, "--kl-weight", help="Initial KL weight [1]."),
        samples: int | None = typer.Option(None, "--samples", help="Samples per check [8]."),
        ddim_steps: int | None = typer.Option(
            None, "--ddim-steps", help="DDIM steps per sample [200; latent 50]."),
        conditioning: Path | None = typer.Option(
            None, "--conditioning",
            help="UNet2DConditionModel only: .safetensors with encoder_hidden_states."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 [auto]."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Images optimised in parallel [16 CUDA, 4 CPU]."),
        seed: int = typer.Option(0, "--seed", help="Random seed."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    ) -> None:
        """Score how strongly a diffusion model memorized each image (InvMM).

        Lower scores mean stronger memorization; "inf" means samples never matched the
        image within the step budget. Prints one row per image, most memorized first.
        """
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from forensics.plugins import get

        files = _image_files(images)
        params = dict(steps=steps, beta=beta, lr=lr, noises=noises, check_every=check_every,
                      window=window, xi=xi, delta=delta, kl_weight=kl_weight, samples=samples,
                      ddim_steps=ddim_steps)
        measure = get("memorization_measures", "invmm")
        err = Console(stderr=True)
        with Progress(TextColumn("invmm"), BarColumn(), TextColumn("{task.completed}/{task.total}"
                      " steps"), TimeRemainingColumn(), console=err,
                      disable=no_progress or not err.is_terminal, transient=True) as bar:
            task = bar.add_task("invmm", total=None)

            def progress(n: int) -> None:
                if bar.tasks[0].total is None:
                    bar.update(task, total=len(files) * (steps or 2000))
                bar.advance(task, n)

            report = measure.run(
                files, model, similarity=similarity, device=device, seed=seed,
                batch_size=batch_size, conditioning=conditioning, progress=progress, **params)
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2))
            return
        from rich.table import Table

        table = Table("rank", "image", "score (KL)", "step", "min sim", title="InvMM, most "
                      "memorized first")
        for rank_no, i in enumerate(report.ranking, 1):
            r = report.results[i]
            table.add_row(str(rank_no), Path(r["image"]).name, _fmt(r["score"]),
                          str(r["success_step"] or "-"), _fmt(r["similarity"], 3))
        Console().print(table)
        prov = report.provenance
        typer.echo(f"model {prov['model']['source']} ({prov['model']['space']}), similarity "
                   f"{prov['similarity']['name']}, seed {prov['seed']}, {prov['device']}, "
                   f"{prov['seconds']:.1f}s")
