"""The ``--report`` folder of ``fp attribute``: the JSON answer, its picture, the case report.

The picture shows what the decision was made on: for the paper's fingerprint the C_T
curves (:func:`plot_curves`); for any other (a vector) the ranked scores against the
``unknown`` threshold and, per layer, how far the suspect's vector lies from its top
matches (:func:`plot_vector_match`). ``report.html`` (:mod:`forensics.steps.report_html`)
holds all of it in one self-contained file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forensics import defaults
from forensics.data.atomic import atomic_write_bytes, check_report_folder, set_aside

JSON_NAME = "attribution.json"
PNG_NAME = "attribution.png"
HTML_NAME = "report.html"
#: The index page of a batch of case reports (``fp attribute DIR DIR ... --report OUT``).
INDEX_NAME = "index.html"
#: The files of a report folder: a folder holding any of them holds a report.
#: The digest of a report folder: ``sha256sum`` lines over its files, written last.
SUMS_NAME = "SHA256SUMS"
REPORT_FILES = (JSON_NAME, PNG_NAME, HTML_NAME, SUMS_NAME)
#: The fingerprint whose picture is the C_T curves (the curves' ``values`` column).


@dataclass
class Evidence:
    """What a report shows beyond the answer: the vectors matched, the images, the baseline.

    Attributes:
        vector: the suspect's matched vector (entries of the kept layers).
        bank_vectors: (N, E) every enrolled vector it was ranked against, same entries.
        bank_ids: the curve id of each row of ``bank_vectors``.
        entry_layers: (E,) layer index of each entry (-1: an entry of no layer).
        manifest: the suspect images' :class:`~forensics.data.images.Manifest` (None: the
            suspect was given as embeddings).
        baseline: the bank's ``baselines`` row of the baseline used.
    """

    vector: np.ndarray | None = None
    bank_vectors: np.ndarray | None = None
    bank_ids: list[str] = field(default_factory=list)
    entry_layers: np.ndarray | None = None
    manifest: Any = None
    baseline: dict[str, Any] | None = None


def _save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    target = Path(path)
    atomic_write_bytes(target, buf.getvalue())
    return target


def plot_curves(
    layers: Sequence[str],
    suspect: np.ndarray,
    references: Sequence[tuple[str, np.ndarray]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    dropped: Sequence[int] = (),
) -> Path:
    """Save a PNG of the suspect curve against reference curves.

    Args:
        layers: layer names (x axis).
        suspect: the suspect curve's values.
        references: ``(label, values)`` per reference curve, best first.
        path: the PNG to write (replaced atomically).
        title: figure title.
        dropped: layer indices left out of matching (shaded).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.arange(len(layers))
    fig = Figure(figsize=(max(6.0, 0.45 * len(layers) + 3), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i in dropped:
        j = int(i) % len(layers)
        ax.axvspan(j - 0.5, j + 0.5, color="0.9", zorder=0)
    for label, values in references:
        ax.plot(x, np.asarray(values, dtype=float), marker="o", ms=3, lw=1.2, alpha=0.85,
                label=label)
    ax.plot(x, np.asarray(suspect, dtype=float), color="black", marker="s", ms=4, lw=2.4,
            label="suspect")
    ax.set_xticks(x, [str(n) for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("C_T (< 0: closer to T than fresh samples; > 0: farther)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save_figure(fig, path)


def layer_distances(vector: np.ndarray, refs: np.ndarray, bank: np.ndarray,
                    entry_layers: np.ndarray, n_layers: int) -> np.ndarray:
    """Per layer, the RMS difference of the suspect's entries from each reference's.

    Each entry is in units of its spread (standard deviation) over the enrolled vectors
    ``bank``, as ``zscore`` measures it; entries without spread are left out.

    Returns:
        (len(refs), n_layers), NaN for a layer with no entry.
    """
    q = np.asarray(vector, dtype=np.float64).reshape(-1)
    r = np.atleast_2d(np.asarray(refs, dtype=np.float64))
    b = np.atleast_2d(np.asarray(bank, dtype=np.float64))
    sd = b.std(axis=0) if b.shape[0] > 1 else np.ones_like(q)
    keep = sd > 1e-12 * max(float(np.abs(b).max()) if b.size else 0.0, 1.0)
    z = np.where(keep, (r - q) / np.where(keep, sd, 1.0), 0.0)
    out = np.full((r.shape[0], n_layers), np.nan)
    layers = np.asarray(entry_layers, dtype=np.int64).reshape(-1)
    for i in range(n_layers):
        sel = (layers == i) & keep
        if sel.any():
            out[:, i] = np.sqrt((z[:, sel] ** 2).mean(axis=1))
    return out


def plot_vector_match(
    layers: Sequence[str],
    ranking: Sequence[Any],
    threshold: float | None,
    distances: np.ndarray | None,
    path: str | os.PathLike[str],
    *,
    title: str = "",
    matcher: str = "",
    dropped: Sequence[int] = (),
    n_lines: int = 3,
) -> Path:
    """Save a PNG of what a vector fingerprint's decision was made on.

    Left: the ranked matches' scores as bars, with the ``unknown`` threshold. Right (when
    ``distances`` is given): per layer, the suspect's distance to each of the top
    ``n_lines`` matches (:func:`layer_distances`), layers left out of matching shaded.

    Args:
        layers: layer names.
        ranking: :class:`~forensics.stats.attribution.Match` objects, best first.
        threshold: the ``unknown`` threshold (None: not calibrated).
        distances: (len(ranking), len(layers)) per-layer distances, or None.
        path: the PNG to write (replaced atomically).
        title: figure title.
        matcher: the matcher's name (axis label).
        dropped: layer indices left out of matching.
        n_lines: top matches drawn per layer.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    wide = distances is not None
    fig = Figure(figsize=(13.0 if wide else 7.0, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.25]}) if wide else \
        [fig.add_subplot()]
    families = sorted({m.family for m in ranking})
    colour = {f: f"C{i % 10}" for i, f in enumerate(families)}
    ax = axes[0]
    y = np.arange(len(ranking))[::-1]
    scores = [m.score for m in ranking]
    ax.barh(y, scores, color=[colour[m.family] for m in ranking], alpha=0.85)
    ax.set_yticks(y, [f"#{m.rank} {m.model} ({m.family})" for m in ranking], fontsize=7)
    for yi, sc in zip(y, scores, strict=True):
        ax.text(sc, yi, f" {sc:.3f}", va="center", fontsize=7)
    if threshold is not None:
        ax.axvline(threshold, color="crimson", ls="--", lw=1.5,
                   label=f"unknown threshold {threshold:.3f}")
        ax.legend(fontsize=7, loc="lower right")
    top = max([*scores, threshold or 0.0, 1e-9])
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel(f"score ({matcher}; higher is closer)" if matcher else "score")
    ax.set_ylabel("enrolled curve (rank, model, family)")
    ax.set_title("ranked matches", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if wide:
        ax = axes[1]
        filled = np.flatnonzero(~np.isnan(distances).all(axis=0))
        last = int(filled.max()) + 1 if filled.size else len(layers)
        dropped = [j for j in (int(i) % len(layers) for i in dropped) if j < last]
        layers, distances = list(layers)[:last], distances[:, :last]
        x = np.arange(len(layers))
        for j in dropped:
            ax.axvspan(j - 0.5, j + 0.5, color="0.9", zorder=0)
        for m, row in list(zip(ranking, distances, strict=False))[:n_lines]:
            ax.plot(x, row, marker="o", ms=3, lw=1.4, color=colour[m.family],
                    label=f"#{m.rank} {m.model} ({m.family})")
        ax.set_xticks(x, [str(n) for n in layers], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("layer (grey: left out of matching)" if len(dropped) else "layer")
        ax.set_ylabel("suspect - match, RMS per layer\n(units of spread over the bank)")
        ax.set_title("where the suspect differs from its top matches", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def _verdict(attribution: Any) -> str:
    d = attribution.decision
    verdict = (f"unknown (closest {d.closest or d.nearest_family})" if d.unknown
               else f"{d.family} / {d.model}")
    if d.consistent or d.alpha is not None:
        verdict += f"; consistent models: {len(d.consistent)}"
    conf = "" if d.confidence is None else f", confidence {d.confidence:.2f}"
    return f"{verdict}{conf}"


def plot_attribution(attribution: Any, rows: Sequence[dict[str, Any]], path: str | os.PathLike,
                     evidence: Evidence | None = None) -> Path:
    """The picture of an answer: what its fingerprint matched, named in the title.

    The paper's fingerprint gets the suspect's C_T curve against its top matches'; any
    other the ranked scores with the threshold and, given ``evidence``, the per-layer
    distances of the suspect's vector to its top matches.
    """
    params = attribution.parameters
    fingerprint = params.get("fingerprint", defaults.PAPER_FINGERPRINT)
    matcher = params.get("matcher", attribution.calibration.matcher)
    dropped = params.get("drop_layers", ())
    curve = attribution.curve
    title = (f"fingerprint {fingerprint}, matcher {matcher}: decision "
             f"{_verdict(attribution)}")
    if fingerprint == defaults.PAPER_FINGERPRINT:
        by_id = {r["curve_id"]: r for r in rows}
        refs = [(f"#{m.rank} {m.model} ({m.family}) {m.score:.3f}", by_id[m.curve_id]["values"])
                for m in attribution.ranking if m.curve_id in by_id]
        return plot_curves(curve.layers, curve.values, refs, path, title=title, dropped=dropped)
    distances = None
    ev = evidence
    if ev is not None and ev.vector is not None and ev.bank_vectors is not None:
        index = {cid: i for i, cid in enumerate(ev.bank_ids)}
        picked = [index[m.curve_id] for m in attribution.ranking if m.curve_id in index]
        if len(picked) == len(attribution.ranking):
            distances = layer_distances(ev.vector, ev.bank_vectors[picked], ev.bank_vectors,
                                        ev.entry_layers, len(curve.layers))
    return plot_vector_match(curve.layers, attribution.ranking,
                             attribution.calibration.threshold, distances, path, title=title,
                             matcher=matcher, dropped=dropped)


def write_report(outdir: str | os.PathLike[str], attribution: Any,
                 rows: Sequence[dict[str, Any]], *,
                 evidence: Evidence | None = None, force: bool = False) -> dict[str, Path]:
    """Write ``attribution.json``, ``attribution.png``, ``report.html`` into ``outdir``, and
    last ``SHA256SUMS`` over them (``fp case verify`` checks it: an edited answer fails).

    A report already in ``outdir`` is refused; with ``force`` it is moved aside into
    ``<outdir>.replaced-<UTC time>/`` (returned as ``"replaced"``), never deleted.

    Args:
        outdir: report folder (created if needed).
        attribution: a :class:`forensics.stats.attribution.Attribution`.
        rows: bank curve rows holding (at least) the ranked curves' values: every
            reference the suspect was compared with, for the case report.
        evidence: the vectors, images and baseline behind the answer, if known.
        force: write where a report is already (the old one is moved aside).

    Returns:
        ``{"json": path, "png": path, "html": path, "sums": path}``, and ``"replaced"``: where an
        earlier report was moved.

    Raises:
        InputError: ``outdir`` is a file or lies under one, or holds a report and
            ``force`` is not given.
    """
    from forensics.steps.report_html import write_html

    out = check_report_folder(outdir, REPORT_FILES, force=force)
    out.mkdir(parents=True, exist_ok=True)
    replaced = set_aside(out, REPORT_FILES) if force else None
    if replaced is not None:
        import warnings

        from forensics.errors import FpWarning

        warnings.warn(f"the report that was in {out} was moved to {replaced} (--force)",
                      FpWarning, stacklevel=2)
    data = attribution.to_dict()
    atomic_write_bytes(
        out / JSON_NAME, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
    png = plot_attribution(attribution, rows, out / PNG_NAME, evidence)
    html = write_html(out / HTML_NAME, data, png.read_bytes(), rows, evidence or Evidence())
    from refbank.hashing import file_sha256

    sums = "".join(f"{file_sha256(out / n)}  {n}\n" for n in (JSON_NAME, PNG_NAME, HTML_NAME))
    atomic_write_bytes(out / SUMS_NAME, sums.encode())
    paths = {"json": out / JSON_NAME, "png": png, "html": html, "sums": out / SUMS_NAME}
    if replaced is not None:
        paths["replaced"] = replaced
    return paths


def write_index(outdir: str | os.PathLike[str], answers: Sequence[Any], *,
                force: bool = False) -> Path:
    """Write ``index.html`` for a batch of case reports (one row per suspect set) into
    ``outdir``; an old index is moved aside with ``force``, refused otherwise."""
    from forensics.data.atomic import atomic_write_text
    from forensics.steps.report_html import render_index

    out = check_report_folder(outdir, (INDEX_NAME,), force=force)
    out.mkdir(parents=True, exist_ok=True)
    if force:
        set_aside(out, (INDEX_NAME,))
    path = out / INDEX_NAME
    atomic_write_text(path, render_index(answers))
    return path
