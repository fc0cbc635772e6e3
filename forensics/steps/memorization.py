"""Does a generator copy its training images? The memorization report of a folder.

:func:`memorize` measures the folder against the baseline and builds the report
(:func:`forensics.stats.memorization.memorization_report`); :func:`write_report` writes
``memorization.json`` and ``memorization.png`` (the curve above the closest pairs).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from forensics import defaults
from forensics.data.atomic import atomic_write_bytes, check_report_folder, set_aside
from forensics.data.embed import DEFAULT_CACHE, Embeddings
from forensics.data.images import file_status, load_rgb
from forensics.errors import InputError
from forensics.steps.bank_access import LoadedBaseline, PathLike, train_manifest
from forensics.steps.curve import compute_curve

#: The report folder's files.
JSON_NAME = "memorization.json"
PNG_NAME = "memorization.png"
REPORT_FILES = (JSON_NAME, PNG_NAME)


def memorize(
    folder: PathLike | Embeddings,
    *,
    baseline: str | LoadedBaseline | None = None,
    bank: Any = None,
    threshold: float | None = None,
    top: int | None = None,
    layer: str | None = None,
    report: PathLike | None = None,
    tau: float | None = None,
    weights: str | None = None,
    device: str = defaults.DEVICE,
    batch_size: int = defaults.BATCH_SIZE,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Does a generator copy its training images? The memorization report of a folder.

    Args:
        folder: the generated images (or their embeddings).
        baseline: the baseline whose T the generator was trained on (None: the bank's
            only one), or a :class:`LoadedBaseline`.
        bank: the bank.
        threshold: C_T below this flags a layer (None: -2).
        top: closest generated/training pairs listed (None: 8).
        layer: layer to find the closest images in (None: the lowest C_T).
        report: a folder to write ``memorization.json`` and ``memorization.png`` into;
            one that holds such a report is refused (before any work) unless ``force``.
        tau, weights, device, batch_size, cache_dir, progress, skip_bad: as for
            :func:`compute_curve`.
        force: write ``report`` where a report is already (the old one is moved aside).

    Returns:
        :func:`forensics.stats.memorization.memorization_report`'s dict with ``folder``,
        ``n_images``, ``baseline`` and ``provenance`` (the JSON of ``fp memorization``).

    Raises:
        As :func:`compute_curve`; InputError: a bad ``layer``, ``top`` or ``report``.
    """
    from forensics.stats import memorization as mem

    if report is not None:
        check_report_folder(report, REPORT_FILES, force=force,
                            inside=None if isinstance(folder, Embeddings) else folder)
    res = compute_curve(folder, baseline=baseline, bank=bank, tau=tau, details=True,
                        fingerprints=[], weights=weights, device=device,
                        batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                        skip_bad=skip_bad)
    loaded = res.baseline
    body = mem.memorization_report(
        res.curve.layers, res.results, loaded.engine.layers,
        suspect_manifest=res.embeddings.manifest, train_manifest=train_manifest(loaded),
        threshold=defaults.MEMORIZATION_THRESHOLD if threshold is None else threshold,
        top=defaults.MEMORIZATION_TOP if top is None else top, layer=layer,
        file_status=file_status,
    )
    row = loaded.row
    out = {
        "folder": None if isinstance(folder, Embeddings) else str(folder),
        "n_images": len(res.rows),
        "baseline": {"name": row["name"], "baseline_id": row["baseline_id"],
                     "encoder": row["encoder"]},
        **body,
        "provenance": res.curve.to_dict()["provenance"],
    }
    if report is not None:
        root = res.embeddings.manifest.root if res.embeddings.manifest else None
        write_report(report, out, suspect_root=root, force=force)
    return out


# -- the --report folder -------------------------------------------------------------------


def _thumbnail(path: str | os.PathLike | None, size: int = 96) -> np.ndarray | None:
    if path is None:
        return None
    try:
        image = load_rgb(path)
    except (OSError, InputError):
        return None
    image.thumbnail((size, size))
    return np.asarray(image)


def _short_name(path: str | None, fallback: str, width: int = 18) -> str:
    """A file's name for a thumbnail label, shortened from the left to ``width`` characters."""
    if not path:
        return fallback
    name = Path(path).name
    return name if len(name) <= width else "…" + name[-(width - 1):]


def pair_labels(pair: dict[str, Any]) -> tuple[str, str]:
    """Labels of a pair's thumbnails: each image's file name (T's index only when T's
    manifest is unknown), with its p_quantile or distance."""
    gen = _short_name(pair["image"], f"#{pair['rank']}")
    train = _short_name(pair["train_image"], f"T[{pair['train_index']}]")
    copy = " copy" if pair.get("likely_copy") else ""
    return (f"{gen}\nq={pair['p_quantile']:.2f}{copy}", f"{train}\nd={pair['distance']:.3g}")


def plot_report(report: dict[str, Any], path: str | os.PathLike, *,
                suspect_root: str | None = None, title: str = "") -> Path:
    """Save a PNG: the C_T curve (copying layers red, hub crowds orange, threshold dashed) above the
    closest generated/training image pairs (generated on top, training below)."""

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r["layer"] for r in report["layers"]]
    values = np.array([np.nan if r["ct"] is None else r["ct"] for r in report["layers"]])
    copying = np.array([r["flagged"] and not r["collapsed"] for r in report["layers"]])
    crowd = np.array([r["collapsed"] for r in report["layers"]])
    pairs = report["closest"]["pairs"]
    ncols = max(len(pairs), 1)
    fig = Figure(figsize=(max(7.0, 0.45 * len(names) + 3, 1.3 * ncols), 7.2), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, ncols, height_ratios=[2.4, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    x = np.arange(len(names))
    n_early = len(report["copying"]["early_layers"])
    ax.axvspan(-0.5, n_early - 0.5, color="0.93", zorder=0, label="early layers")
    ax.axhline(0.0, color="0.5", lw=0.8)
    threshold = report["copying"]["threshold"]
    ax.axhline(threshold, color="tab:red", lw=0.9, ls="--", label=f"threshold {threshold:g}")
    ax.plot(x, values, color="black", marker="o", ms=4, lw=1.8, label="C_T")
    if copying.any():
        ax.plot(x[copying], values[copying], "o", color="tab:red", ms=7, label="copying")
    if crowd.any():
        ax.plot(x[crowd], values[crowd], "o", color="tab:orange", ms=7, label="hub crowd")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("C_T")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    summary = report.get("verdict", report["copying"])["summary"]
    ax.set_title(title or summary, fontsize=8, wrap=True)
    for j, pair in enumerate(pairs):
        gen = None
        if pair["image"] is not None and suspect_root is not None:
            gen = _thumbnail(Path(suspect_root) / pair["image"])
        train = _thumbnail(pair["train_image"]) if pair["train_image_status"] == "ok" else None
        for row, (img, label) in enumerate(zip((gen, train), pair_labels(pair), strict=True),
                                           start=1):
            sub = fig.add_subplot(grid[row, j])
            sub.set_xticks([])
            sub.set_yticks([])
            if img is None:
                sub.text(0.5, 0.5, "image\nnot available", ha="center", va="center",
                         fontsize=6, transform=sub.transAxes)
            else:
                sub.imshow(img, cmap="gray" if img.ndim == 2 else None)
            sub.set_xlabel(label, fontsize=6)
            if j == 0:
                sub.set_ylabel("generated" if row == 1 else "nearest in T", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    target = Path(path)
    atomic_write_bytes(target, buf.getvalue())
    return target


def write_report(outdir: str | os.PathLike, report: dict[str, Any], *,
                 suspect_root: str | None = None, force: bool = False) -> dict[str, Path]:
    """Write ``memorization.json`` and ``memorization.png`` into ``outdir`` (created).

    A report already there is refused; with ``force`` it is moved aside into
    ``<outdir>.replaced-<UTC time>/``.

    Raises:
        InputError: ``outdir`` is a file or lies under one, or holds a report and
            ``force`` is not given.
    """
    out = check_report_folder(outdir, REPORT_FILES, force=force)
    out.mkdir(parents=True, exist_ok=True)
    if force:
        set_aside(out, REPORT_FILES)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out / JSON_NAME, text.encode())
    png = plot_report(report, out / PNG_NAME, suspect_root=suspect_root)
    return {"json": out / JSON_NAME, "png": png}
