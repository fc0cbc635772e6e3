"""``fp memorization DIR --baseline NAME``: does a generator copy its training data, and how?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from forensics import defaults
from forensics.cli.commands.bank import _print_table, bank_option, echo_json
from forensics.cli.commands.embed import skip_bad_option
from forensics.cli.commands.pipeline import _batch, _common, _device, _no_cache, _quiet, _tau
from forensics.errors import printable


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _print_report(report: dict[str, Any]) -> None:
    threshold = report["copying"]["threshold"]
    _print_table(
        ["layer", "C_T", "cells kept", "status", "distinct NN", f"C_T < {threshold:g}"],
        [[r["layer"], _fmt(r["ct"]), sum(c["kept"] for c in r["cells"]), r["status"],
          r["distinct_nearest"],
          "hub crowd" if r["collapsed"] else "COPYING" if r["flagged"] else ""]
         for r in report["layers"]],
        title=f"{report['folder']} ({report['n_images']} images) vs baseline "
              f"{report['baseline']['name']}",
    )
    typer.echo(report["copying"]["summary"])
    typer.echo("Verdict: " + report["verdict"]["summary"])
    closest = report["closest"]
    if not closest["train_manifest"]:
        typer.echo("note: the baseline has no usable manifest of T (moved or changed "
                   "training folder), so training images are named by index only.")
    _print_table(
        ["#", "generated image", "nearest training image", "distance", "p_quantile",
         "rel. distance", "same NN", "likely copy"],
        [[p["rank"], p["image"] or p["index"], p["train_image"] or f"T[{p['train_index']}]",
          _fmt(p["distance"], ".4g"), _fmt(p["p_quantile"]), _fmt(p["relative_distance"]),
          f"{p['same_nearest_layers']}/{p['layers_with_details']}",
          "yes" if p["likely_copy"] else ""]
         for p in closest["pairs"]],
        title=f"Generated images closest to a training image (layer {closest['layer']}, "
              f"{closest['layer_choice']})",
    )


def register(app: typer.Typer) -> None:
    @app.command("memorization")
    def memorization_cmd(
        folder: Path = typer.Argument(..., help="Folder of generated images."),
        baseline: str = typer.Option(
            None, "--baseline", "-b",
            help="Baseline whose T the generator was trained on [default: the bank's only one]."),
        threshold: float = typer.Option(
            defaults.MEMORIZATION_THRESHOLD, "--threshold",
            help="A layer indicates copying when its C_T is below this (a Z-like scale)."),
        top: int = typer.Option(defaults.MEMORIZATION_TOP, "--top", min=1,
                                help="Closest generated/training pairs to list and draw."),
        layer: str = typer.Option(
            None, "--layer", help="Layer to find the closest images in [default: lowest C_T]."),
        tau: float = _tau(),
        report: Path = typer.Option(
            None, "--report", help="Write memorization.json and memorization.png here "
                                   "(a folder holding such a report is refused, see --force)."),
        force: bool = typer.Option(False, "--force",
                                   help="Write --report where a report is already; the old "
                                        "one is moved to DIR.replaced-<time>/."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
        device: str = _device(),
        batch_size: int = _batch(),
        no_cache: bool = _no_cache(),
        quiet: bool = _quiet(),
        skip_bad: bool = skip_bad_option(),
        bank: Path | None = bank_option(),
    ) -> None:
        """Does a generator copy its training images? Layer-wise C_T and closest pairs.

        Shows C_T per layer with per-cell detail, the layers that indicate copying (C_T
        below --threshold), whether that is low-level (early layers) or high-level (late
        layers), and the generated images closest to a training image.
        """
        from forensics.steps.memorization import memorize

        out = memorize(folder, baseline=baseline, bank=bank, threshold=threshold, top=top,
                       layer=layer, report=report, tau=tau, force=force,
                       **_common(device, batch_size, no_cache, quiet, as_json, skip_bad))
        for relpath, reason in out["provenance"].get("skipped") or ():
            typer.echo(f"skipped {printable(relpath, 1000)}: {reason}", err=True)
        if as_json:
            echo_json(out)
            return
        _print_report(out)
        if report is not None:
            typer.echo(f"Report: {report}")
