"""The ``--report`` folder of ``fp attribute``: the JSON answer and a plot of the curves."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forensics.atomic import atomic_write_bytes
from forensics.errors import InputError

JSON_NAME = "attribution.json"
PNG_NAME = "attribution.png"


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
    import io

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
    ax.set_ylabel("C_T")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    target = Path(path)
    atomic_write_bytes(target, buf.getvalue())
    return target


def write_report(outdir: str | os.PathLike[str], attribution: Any,
                 rows: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write ``attribution.json`` and ``attribution.png`` into ``outdir``.

    Args:
        outdir: report folder (created if needed).
        attribution: a :class:`forensics.attribute.Attribution`.
        rows: bank curve rows holding (at least) the ranked curves' values.

    Returns:
        ``{"json": path, "png": path}``.

    Raises:
        InputError: ``outdir`` is a file.
    """
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--report {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    data = attribution.to_dict()
    atomic_write_bytes(
        out / JSON_NAME, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
    by_id = {r["curve_id"]: r for r in rows}
    refs = [
        (f"#{m.rank} {m.model} ({m.family}) {m.score:.3f}", by_id[m.curve_id]["values"])
        for m in attribution.ranking if m.curve_id in by_id
    ]
    d = attribution.decision
    verdict = "unknown" if d.unknown else f"{d.family} / {d.model}"
    conf = "" if d.confidence is None else f", confidence {d.confidence:.2f}"
    curve = attribution.curve
    png = plot_curves(curve.layers, curve.values, refs, out / PNG_NAME,
                      title=f"decision: {verdict}{conf}",
                      dropped=attribution.parameters.get("drop_layers", ()))
    return {"json": out / JSON_NAME, "png": png}
