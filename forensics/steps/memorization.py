"""Does a generator copy its training images? The memorization report of a folder."""

from __future__ import annotations

from typing import Any

from forensics.data.embed import DEFAULT_CACHE, Embeddings
from forensics.steps.bank_access import LoadedBaseline, PathLike, train_manifest
from forensics.steps.curve import compute_curve


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
    device: str = "auto",
    batch_size: int = 64,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
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
        report: a folder to write ``memorization.json`` and ``memorization.png`` into.
        tau, weights, device, batch_size, cache_dir, progress, skip_bad: as for
            :func:`compute_curve`.

    Returns:
        :func:`forensics.stats.memorization.memorization_report`'s dict with ``folder``,
        ``n_images``, ``baseline`` and ``provenance`` (the JSON of ``fp memorization``).

    Raises:
        As :func:`compute_curve`; InputError: a bad ``layer``, ``top`` or ``report``.
    """
    from forensics.stats import memorization as mem

    res = compute_curve(folder, baseline=baseline, bank=bank, tau=tau, details=True,
                        fingerprints=[], weights=weights, device=device,
                        batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                        skip_bad=skip_bad)
    loaded = res.baseline
    body = mem.memorization_report(
        res.curve.layers, res.results, loaded.engine.layers,
        suspect_manifest=res.embeddings.manifest, train_manifest=train_manifest(loaded),
        threshold=mem.DEFAULT_THRESHOLD if threshold is None else threshold,
        top=mem.DEFAULT_TOP if top is None else top, layer=layer,
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
        mem.write_report(report, out, suspect_root=root)
    return out
