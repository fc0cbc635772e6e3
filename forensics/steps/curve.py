"""Measure one image set against a stored baseline: its C_T curve and fingerprints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forensics import defaults
from forensics.data.embed import DEFAULT_CACHE, Embeddings
from forensics.errors import InputError, InsufficientDataError
from forensics.jsonable import jsonable
from forensics.plugin import manager
from forensics.stats import fingerprints as fpmod
from forensics.steps.bank_access import LoadedBaseline, PathLike, _absolute, load_baseline
from forensics.steps.baseline_files import extras_file


@dataclass
class CurveResult:
    """One image set measured against a baseline.

    Attributes:
        curve: the C_T-layer curve with its provenance.
        results: one :class:`~forensics.stats.ct.CTResult` per layer.
        embeddings: the set's embeddings (all images of the folder; ``rows`` says which
            ones the curve used).
        fingerprints: ``{name: vector}`` of the fingerprints computed.
        rows: indices into ``embeddings`` of the images behind the curve.
        baseline: the baseline it was measured against.
        spreads: ``{name: per-entry variance of its per-image vectors}`` (with ``spreads``).
        image_rows: ``{name: per-image vectors, every entry}`` of the belonging test's
            fingerprint (with ``spreads``): what the bank stores for the belonging test
            and the per-image attributor.
    """

    curve: Any
    results: list[Any]
    embeddings: Embeddings
    fingerprints: dict[str, np.ndarray]
    rows: np.ndarray
    baseline: LoadedBaseline
    spreads: dict[str, np.ndarray] = field(default_factory=dict)
    image_rows: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self, details: bool = False) -> dict[str, Any]:
        """JSON-ready: the curve (layers, values, provenance), per-layer results, fingerprints."""
        out = self.curve.to_dict()
        out["results"] = [r.to_dict() for r in self.results]
        if not details:
            for r in out["results"]:
                r.pop("details", None)
        out["fingerprints"] = jsonable(dict(self.fingerprints))
        return out


def encoder_record(loaded: LoadedBaseline) -> dict[str, Any] | None:
    """The encoder configuration a baseline was embedded with (what keys the cache; None:
    its row does not record it all)."""
    row, params = loaded.row, loaded.params
    if not row.get("weights_sha256") or row.get("layers") is None:
        return None
    return {"name": row["encoder"], "weights_sha256": row["weights_sha256"],
            "preprocessing": params.get("preprocessing"), "pool": row.get("pooling") or "cls",
            "precision": params.get("precision"), "layers": list(row["layers"])}


def _embed_suspect(loaded: LoadedBaseline, source: Any, *, weights: str | None, device: str,
                   batch_size: int, cache_dir: Any, progress: bool,
                   skip_bad: bool, ray: str | None = None) -> Embeddings:
    """Embed a folder the way the baseline was embedded, or check given embeddings."""
    from forensics.data.embed import embed_folder

    row = loaded.row
    if isinstance(source, Embeddings):
        emb = source
    else:
        emb = embed_folder(source, row["encoder"],
                           weights=weights if weights is not None else loaded.params.get("weights"),
                           pool=row["pooling"] or "cls", device=device, batch_size=batch_size,
                           cache_dir=cache_dir, progress=progress, skip_bad=skip_bad,
                           ray=ray, expect=None if weights is not None else encoder_record(loaded))
    info = emb.encoder_info or {}
    checks = (("encoder", info.get("name"), row["encoder"]),
              ("weights (SHA-256)", info.get("weights_sha256"), row["weights_sha256"]),
              ("pooling", info.get("pool"), row["pooling"]),
              ("layers", list(emb.layers), list(row["layers"])))
    for what, mine, theirs in checks:
        if theirs is not None and mine != theirs:
            raise InputError(
                f"the suspect images were embedded with {what} {mine!r} but baseline "
                f"{row['name']!r} uses {theirs!r}; embed them with --encoder {row['encoder']} "
                f"--weights {loaded.params.get('weights', '?')} --pool {row['pooling']}, or "
                f"choose the baseline that matches (fp baseline list)"
            )
    return emb


def _subset_manifest_sha(emb: Embeddings, rows: np.ndarray) -> tuple[str, str | None]:
    """SHA-256 of the manifest of ``rows`` (or of the arrays without a manifest), and root."""
    from forensics.data.images import Manifest
    from forensics.stats.baseline import array_digest

    if emb.manifest is not None:
        entries = [emb.manifest.entries[int(i)] for i in rows]
        return Manifest(emb.manifest.root, entries).sha256, emb.manifest.root
    import hashlib

    h = hashlib.sha256()
    for a in emb.arrays:
        h.update(array_digest(np.asarray(a)[rows]).encode())
    return "embeddings:" + h.hexdigest(), None


def _fingerprint_objects(names: Sequence[str] | None, loaded: LoadedBaseline,
                         strict: bool) -> tuple[list[Any], list[str]]:
    """Fingerprints to compute, and notes on those left out (their arrays are missing)."""
    objs, notes = [], []
    for n in (manager.names("fingerprints") if names is None else names):
        fp = manager.get("fingerprints", n)
        if loaded.extras(fp) is None:
            if fp.name in loaded.params.get("fingerprints", ()):
                msg = (f"the file {extras_file(fp.name)} of fingerprint {fp.name!r} is "
                       f"missing from baseline {loaded.name!r} ({loaded.folder}), which was "
                       f"built with it; run fp bank verify, restore the bank from an export "
                       f"(fp bank import), or choose another fingerprint (--fingerprint paper)")
            else:
                msg = (f"baseline {loaded.name!r} was built without the arrays of fingerprint "
                       f"{fp.name!r}; rebuild the baseline (fp baseline build) to use it, or "
                       f"choose another fingerprint (--fingerprint paper)")
            if strict:
                raise InputError(msg)
            notes.append(msg)
            continue
        objs.append(fp)
    return objs, notes


def _query(loaded: LoadedBaseline, emb: Embeddings, rows: np.ndarray, tau: float | None,
           details: bool) -> tuple[list[Any], list[np.ndarray]]:
    Q = [np.asarray(a)[rows] for a in emb.arrays]
    return loaded.engine.query(Q, tau=tau, details=details), Q


def _contexts(fps: Sequence[Any], loaded: LoadedBaseline, results: list[Any],
              Q: list[np.ndarray]) -> list[tuple[Any, Any]]:
    return [(fp, fpmod.FingerprintContext(list(loaded.row["layers"]), results, Q,
                                          loaded.engine, loaded.extras(fp) or {}))
            for fp in fps]


def _vectors(fps: Sequence[Any], loaded: LoadedBaseline, results: list[Any],
             Q: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {fp.name: fpmod.compute(fp, ctx) for fp, ctx in _contexts(fps, loaded, results, Q)}


def _spreads(fps: Sequence[Any], loaded: LoadedBaseline, results: list[Any],
             Q: list[np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-image variance of every fingerprint that has per-image vectors, and the per-image
    rows of the belonging test's (``defaults.BELONG_FINGERPRINT``), every entry."""
    var, rows = {}, {}
    for fp, ctx in _contexts(fps, loaded, results, Q):
        r = fpmod.per_image_rows(fp, ctx)
        if r is not None:
            var[fp.name] = r.var(axis=0)
            if fp.name == defaults.BELONG_FINGERPRINT:
                rows[fp.name] = r
    return var, rows




def _check_tau(tau: float | None) -> None:
    """Refuse a bad tau before any image is embedded (the rule itself: ct.check_tau)."""
    from forensics.stats.ct import check_tau

    if tau is not None:  # the bound of a set of 20 or more images: 1
        check_tau(tau, defaults.TAU_MIN_COUNT)


def _check_defined(results: list[Any], what: str) -> None:
    bad = [r for r in results if r.status == "no_cells"]
    if bad:
        r = bad[0]
        raise InsufficientDataError(
            f"{what}: C_T is undefined at {len(bad)} layer(s) ({', '.join(x.layer for x in bad)})"
            f" because too few images share a cell; layer {r.layer!r}: {r.message}. Use a "
            f"folder with more images (fp enroll: a larger --per-curve), a smaller --tau, or "
            f"a fingerprint that needs no C_T (fp attribute --fingerprint resid-early)"
        )


def undefined_layers(results: Sequence[Any]) -> list[str]:
    """The layers whose C_T is undefined (too few images share a cell)."""
    return [r.layer for r in results if r.status == "no_cells"]


def _measure(loaded: LoadedBaseline, emb: Embeddings, rows: np.ndarray, *, tau: float | None,
             details: bool, fps: Sequence[Any], what: str, folder: str | None,
             extra: dict[str, Any] | None = None, spreads: bool = False,
             undefined_ok: bool = False) -> CurveResult:
    """Measure ``rows`` of ``emb``: the curve, its fingerprints and provenance.

    With ``undefined_ok``, a set too small for C_T at some layer is measured all the same:
    the curve holds NaN there and the fingerprints that read C_T are left out of
    ``fingerprints`` (refused otherwise, with what to do).
    """
    from forensics.stats.curve import Curve, make_provenance

    if len(rows) < defaults.MIN_IMAGES:
        raise InsufficientDataError(
            f"{what}: {len(rows)} image(s); a set needs at least {defaults.MIN_IMAGES} images")
    need = details or any(getattr(fp, "needs_details", False) for fp in fps)
    results, Q = _query(loaded, emb, rows, tau, need)
    if undefined_ok and undefined_layers(results):
        fps = [fp for fp in fps if not fpmod.needs_ct(fp)]
    elif any(fpmod.needs_ct(fp) for fp in fps):
        _check_defined(results, what)
    vectors = _vectors(fps, loaded, results, Q)
    manifest_sha, _ = _subset_manifest_sha(emb, rows)
    row, info = loaded.row, emb.encoder_info or {}
    if emb.manifest is not None:  # files left out with skip_bad, and why
        extra = {"skipped": [list(s) for s in emb.manifest.skipped], **(extra or {})}
    params = {
        "partitioner": row["partitioner"], "distance": row["distance"],
        "tau": float(results[0].tau), "tau_rule": defaults.TAU_RULE if tau is None else "given",
        "pooling": row["pooling"], "seed": row["seed"],
        **{k: loaded.params[k] for k in ("n_cells", "pca_dim", "n_init", "weights")
           if k in loaded.params},
    }
    prov = make_provenance(
        manifest_sha256=manifest_sha, n_images=len(rows), encoder=row["encoder"],
        weights_sha256=row["weights_sha256"], baseline_id=row["baseline_id"], params=params,
        baseline_name=row["name"], folder=folder,
        embedding={"cache": info.get("cache"), "torch_version": info.get("torch_version"),
                   "preprocessing": info.get("preprocessing")},
        **(extra or {}),
    )
    values = np.array([r.ct for r in results], dtype=np.float64)
    curve = Curve(list(row["layers"]), values, prov)
    var, image_rows = _spreads(fps, loaded, results, Q) if spreads else ({}, {})
    return CurveResult(curve, results, emb, vectors, np.asarray(rows), loaded, var, image_rows)


def compute_curve(
    folder_or_embeddings: PathLike | Embeddings,
    *,
    baseline: str | LoadedBaseline | None = None,
    bank: Any = None,
    tau: float | None = None,
    details: bool = False,
    fingerprints: Sequence[str] | None = None,
    weights: str | None = None,
    device: str = defaults.DEVICE,
    batch_size: int = defaults.BATCH_SIZE,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
) -> CurveResult:
    """The C_T-layer curve of a folder (or of precomputed embeddings) against a baseline.

    Args:
        folder_or_embeddings: a folder of images, or :class:`~forensics.data.embed.Embeddings`
            made with the baseline's encoder, weights and pooling.
        baseline: baseline name or id in the bank (None: the bank's only baseline), or a
            :class:`LoadedBaseline` from :func:`load_baseline` (to measure many sets
            without loading the baseline each time; ``bank`` is then not read).
        bank: the bank (a :class:`refbank.Bank`, a folder, or None for the default).
        tau: cell threshold on the set's share; default 20/m.
        details: keep per-image details (cell, distance, nearest T index) in ``results``.
        fingerprints: names of the fingerprints to compute (None: every registered one
            whose baseline arrays exist).
        weights: where the baseline's encoder weights are now, if they moved (their
            SHA-256 must match).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        batch_size: images per forward pass.
        cache_dir: embedding cache (None disables it).
        progress: show a progress bar on stderr.
        skip_bad: skip unreadable images instead of failing.

    Raises:
        BankError: no such baseline.
        InputError: the embeddings do not match the baseline's encoder, weights or pooling.
        InsufficientDataError: too few images for tau at some layer.
    """
    from forensics.plugin.encoders import resolve_device

    _check_tau(tau)
    device = resolve_device(device)
    loaded = (baseline if isinstance(baseline, LoadedBaseline)
              else load_baseline(baseline, bank=bank, device=device))
    emb = _embed_suspect(loaded, folder_or_embeddings, weights=weights, device=device,
                         batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                         skip_bad=skip_bad)
    fps, _ = _fingerprint_objects(fingerprints, loaded, strict=fingerprints is not None)
    folder = (None if isinstance(folder_or_embeddings, Embeddings)
              else str(_absolute(folder_or_embeddings)))
    return _measure(loaded, emb, np.arange(len(emb)), tau=tau, details=details, fps=fps,
                    what=folder or "the embeddings", folder=folder)
