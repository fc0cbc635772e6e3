"""``fp memorize --measure NAME`` and ``fp invmm``: per-image memorization scores of a model.

``fp memorize`` runs any measure registered through ``register_memorization_measures``
(built-ins: ``invmm``, ``wen``, ``extraction``), with its options as ``-p KEY=VALUE``;
``fp invmm`` is ``fp memorize --measure invmm`` with InvMM's options spelled out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from forensics import defaults


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["steps=300", "similarity=ncc"]`` -> ``{"steps": 300, "similarity": "ncc"}``."""
    from forensics.errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"-p {item!r}: write measure options as KEY=VALUE")
        out[key.strip().replace("-", "_")] = _value(value.strip())
    return out


def _progress_bar(label: str, total_per_image: int | None, n_images: int, quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    bar = Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), console=err, disable=quiet or not err.is_terminal,
                   transient=True)
    task = bar.add_task(label, total=n_images * total_per_image if total_per_image else None)
    return bar, (lambda n: bar.advance(task, n))


def _print(body: dict[str, Any], out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    results = {r["image"]: r for r in body["results"]}
    extra = [k for k in ("success_step", "similarity", "flagged", "distance")
             if k in body["results"][0]]
    table = Table("rank", "image", "score", *extra,
                  title=f"{body['measure']}, most memorized first")
    for rank_no, name in enumerate(body["ranking"], 1):
        r = results[name]
        table.add_row(str(rank_no), Path(name).name, _fmt(r["score"]),
                      *[_fmt(r.get(k), 3) for k in extra])
    Console().print(table)
    prov = body.get("provenance", {})
    model = prov.get("model", {})
    sim = prov.get("similarity") or {}
    bits = [f"model {model.get('source')} ({model.get('family')})" if model else None,
            f"similarity {sim.get('name')}" if sim else None,
            f"beta {prov['params']['beta']:.4g}" if prov.get("params") else None,
            f"seed {prov['seed']}" if "seed" in prov else None, prov.get("device"),
            f"{prov['seconds']:.1f}s" if "seconds" in prov else None]
    typer.echo(", ".join(b for b in bits if b))
    if "members" in body:
        m = body["members"]
        typer.echo(f"members vs non-members ({m['members']} members, {m['non_members']} "
                   f"non-members): auroc {m['auroc']:.3f} (scores; ties count half), "
                   f"auroc_ranking {m['auroc_ranking']:.3f} (the ranking, ties broken), "
                   f"TPR at 1% FPR {m['tpr_at_1pct_fpr']:.3f}"
                   + (" (no false positive allowed: fewer than 100 non-members)"
                      if m["non_members"] < 100 else ""))
    off = prov.get("official")
    if off:
        rho = "-" if off["spearman"] is None else f"{off['spearman']:.3f}"
        typer.echo(f"official results {off['folder']}: {off['matched']} matched, reached/"
                   f"not reached agree on {off['success_agreement']:.0%}, Spearman {rho} "
                   f"over {off['both_reached']} both reached")
    if out is not None:
        typer.echo(f"Scores and evidence: {out}")


def _members_option():
    return typer.Option(None, "--members",
                        help="File naming the training members among the images (AUROC).")


def _out_option():
    return typer.Option(None, "--out", "-o",
                        help="Folder for scores.csv, report.json, evidence and members.png.")


def register(app: typer.Typer) -> None:
    @app.command("memorize")
    def memorize_cmd(
        images: Path = typer.Argument(..., help="Folder of images (or one image)."),
        model: str = typer.Option(..., "--model", "-m",
                                  help="Diffusers folder (save_pretrained), hub id, or single-file "
                                       "checkpoint with --config (-p config=DIR)."),
        measure: str = typer.Option(defaults.MEASURE, "--measure",
                                    help="invmm | wen | extraction | a plugin's measure."),
        param: list[str] = typer.Option([], "--param", "-p",
                                        help="A measure option, KEY=VALUE (repeatable)."),
        members: Path | None = _members_option(),
        captions: Path | None = typer.Option(
            None, "--captions",
            help="IMAGE<TAB>caption per line: extraction generates from each caption, wen "
                 "scores it (default for wen: img.txt beside img.png)."),
        out: Path | None = _out_option(),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Score how strongly a model memorized each image, by any registered measure.

        Lower or higher scores mean more memorized, as the measure declares; the table
        lists the most memorized first. With --members, reports members-vs-non-members
        AUROC.
        """
        from forensics.steps.memorize import run_measure

        options = parse_params(param)
        if captions is not None:
            options["captions"] = captions
        body = run_measure(measure, images, model, members=members, out=out, options=options)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        _print(body, out)

    @app.command("invmm")
    def invmm_cmd(
        images: Path = typer.Argument(..., help="Folder of images (or one image)."),
        model: str = typer.Option(..., "--model", "-m",
                                  help="Diffusers folder (save_pretrained), hub id, or single-file "
                                       "checkpoint with --config (-p config=DIR)."),
        steps: int | None = typer.Option(None, "--steps", help="Step budget [2000]."),
        similarity: str = typer.Option(
            "sscd", "--similarity",
            help="sscd (official; needs its file) | sscd:PATH | ncc | ssim | "
                 "torchscript:PATH | encoder:NAME."),
        calibrate: Path | None = typer.Option(
            None, "--calibrate",
            help="Held-out images (not members): beta for a non-SSCD similarity."),
        beta: float | None = typer.Option(
            None, "--beta", help="Similarity threshold [0.5 for SSCD]."),
        lr: float | None = typer.Option(None, "--lr", help="Adam learning rate [0.1]."),
        noises: int | None = typer.Option(
            None, "--noises", help="Noises per step [32; latent, text 16]."),
        check_every: int | None = typer.Option(
            None, "--check-every", help="C: steps between checks [50; latent 10]."),
        window: int | None = typer.Option(None, "--window", help="Loss smoothing window [100]."),
        xi: float | None = typer.Option(None, "--xi", help="Improvement threshold [1e-3]."),
        delta: float | None = typer.Option(
            None, "--delta", help="KL weight increment [1e-4; latent 5e-4; text 1e-3]."),
        kl_weight: float | None = typer.Option(None, "--kl-weight", help="Initial KL weight [1]."),
        samples: int | None = typer.Option(None, "--samples", help="Samples per check [8]."),
        ddim_steps: int | None = typer.Option(
            None, "--ddim-steps", help="DDIM steps per sample [200; latent, text 50]."),
        tokens: int | None = typer.Option(
            None, "--tokens", help="Text-to-image: prompt tokens learned [75]."),
        tau: float | None = typer.Option(
            None, "--tau", help="Text-to-image: Gumbel-softmax temperature [2]."),
        prompt: str | None = typer.Option(
            None, "--prompt", help="Text-to-image: a fixed prompt instead of learned tokens."),
        conditioning: Path | None = typer.Option(
            None, "--conditioning",
            help="Bare UNet2DConditionModel: .safetensors with encoder_hidden_states."),
        config: Path | None = typer.Option(
            None, "--config",
            help="For a single-file --model (.ckpt, .safetensors, .pt): the folder of its "
                 "diffusers configs (model_index.json, unet/, scheduler/...)."),
        official: Path | None = typer.Option(
            None, "--official",
            help="The official code's results folder (<id>/params.pt): compare scores."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 [auto]."),
        precision: str = typer.Option(
            "fp32", "--precision",
            help="fp32 (the official code's) | bf16 | fp16 (autocast; fp16 with loss "
                 "scaling): faster on a GPU, scores move (README)."),
        batch_size: str | None = typer.Option(
            None, "--batch-size",
            help="Images per model call: N or auto (from free CUDA memory; faster, scores "
                 "equal up to float round-off) [1: bit-identical scores]."),
        seed: int = typer.Option(0, "--seed", help="Random seed."),
        members: Path | None = _members_option(),
        out: Path | None = _out_option(),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    ) -> None:
        """Score how strongly a diffusion model memorized each image (InvMM).

        Same as `fp memorize --measure invmm`. Lower scores mean stronger memorization;
        "inf" means samples never matched the image within the step budget. Prints one
        row per image, most memorized first.
        """
        from forensics.errors import InputError
        from forensics.steps.memorize import image_list, run_measure

        if batch_size is not None and batch_size != "auto":
            if not batch_size.isdigit():
                raise InputError(f"--batch-size must be a whole number or 'auto', got "
                                 f"{batch_size!r}")
            batch_size = int(batch_size)

        params = dict(steps=steps, beta=beta, lr=lr, noises=noises, check_every=check_every,
                      window=window, xi=xi, delta=delta, kl_weight=kl_weight, samples=samples,
                      ddim_steps=ddim_steps, tokens=tokens, tau=tau)
        n = len(image_list(images))
        bar, progress = _progress_bar("invmm", steps or 2000, n, no_progress)
        with bar:
            body = run_measure(
                "invmm", images, model, members=members, out=out,
                options=dict(similarity=similarity, calibrate=calibrate, device=device,
                             seed=seed, batch_size=batch_size, precision=precision,
                             conditioning=conditioning, prompt=prompt, progress=progress,
                             config=config, official=official,
                             **params))
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        _print(body, out)
