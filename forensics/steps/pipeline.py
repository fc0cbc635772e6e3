"""The investigator's pipeline: the only module that knows the order of the steps.

::

    build_baseline(name, train, heldout, encoder=...)
      train/, heldout/ ─► scan_folder ─► embed_folder ─► T, P per layer ─► Baseline.build
                          (manifest)     (cached)                          (PCA, cells, P->T)
                                                   └─► fingerprint.prepare (e.g. T's stats)
                                                                 └─► bank: baselines row + files

    compute_curve(folder, baseline=NAME)
      folder ─► embed_folder ─► Baseline.query ─► C_T per layer ─► Curve (+ provenance)
                (same encoder,   (no refit)           └──────────► fingerprints {name: vector}
                 weights, pool)

    enroll(folder, baseline=NAME, model=M, family=F, per_curve=N)
      folder ─► embed once ─► chunks of N in manifest order ─► compute each ─► bank curve rows

    memorize(folder, baseline=NAME)
      folder ─► compute_curve (per-image details) ─► copying layers, likely copies ─► report

    attribute(folder, baseline=NAME, fingerprint=..., matcher=...)
      folder ─► compute_curve ─► fingerprint vector ─► rank vs bank ─► calibrate ─► decide
                      └─► resample embedding rows ─► query ─► fingerprint ─► bootstrap confidence
                                                                      └─► report (JSON, PNG, HTML)

Each folder is embedded once (the embedding cache makes repeats free) and the stored
baseline is only queried: PCA and KMeans are never refitted after ``build_baseline``.
The steps themselves live in :mod:`forensics.data.images`, :mod:`forensics.data.embed`,
:mod:`forensics.stats.baseline`, :mod:`forensics.stats.fingerprints`, :mod:`forensics.stats.curve`,
:mod:`forensics.stats.attribution` and :mod:`refbank`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forensics.data.embed import DEFAULT_CACHE, Embeddings
from forensics.errors import BankError, InputError, InsufficientDataError
from forensics.progress import Stages, stages
from forensics.stats import fingerprints as fpmod
from forensics.stats.confidence import var_key

if TYPE_CHECKING:
    from forensics.stats.attribution import Attribution

PathLike = str | os.PathLike

#: Images per enrolled curve unless told otherwise (as in the paper).
DEFAULT_PER_CURVE = 500
#: Bootstrap resamples of the suspect images behind ``confidence``.
DEFAULT_N_BOOT = 100
#: How tau is chosen when none is given (recorded in provenance).
TAU_RULE = "20/m"
#: T's manifest (relative paths and SHA-256 of the training images, in T's row order),
#: stored in each baseline's folder so reports can show the training image behind an index.
TRAIN_MANIFEST_FILE = "train_manifest.json"


# -- the bank and its baselines ----------------------------------------------------------


def _absolute(path: PathLike) -> Path:
    """``path`` made absolute and resolved, so that a stored path works from any folder."""
    return Path(path).expanduser().resolve()


def _absolute_weights(weights: str | None) -> str | None:
    """A weights spec with a relative file path made absolute (``hub``, ``random:N`` as is)."""
    if weights is None or weights.strip() == "hub" or weights.strip().startswith("random:"):
        return weights
    path = Path(weights.strip()).expanduser()
    return str(path.resolve()) if path.is_file() else weights


def open_bank(bank: Any = None):
    """A :class:`refbank.Bank` from a Bank, a folder, or ``None`` (``FP_BANK`` or default)."""
    from refbank import Bank

    return bank if isinstance(bank, Bank) else Bank(bank)


@dataclass
class LoadedBaseline:
    """A baseline of the bank, loaded for querying.

    Attributes:
        row: its ``baselines`` row.
        engine: the :class:`~forensics.stats.baseline.Baseline` (stored state, never refitted).
        folder: the folder of its files in the bank.
        params: every parameter (columns and ``params_json`` together).
        files: ``{relative path: SHA-256}`` of its files, as checked when it was loaded.
        unverified: the problems of its row and files that ``allow_unverified`` let
            through (``[]``: every hash matched).
    """

    row: dict[str, Any]
    engine: Any
    folder: Path
    params: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    unverified: list[dict[str, str]] = field(default_factory=list)
    _extras: dict[str, dict[str, np.ndarray] | None] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The baseline's name in the bank."""
        return self.row["name"]

    @property
    def dims(self) -> list[int]:
        """Embedding size of each layer."""
        return [int(lb.dim) for lb in self.engine.layers]

    def extras(self, fp: Any) -> dict[str, np.ndarray] | None:
        """A fingerprint's stored arrays; ``{}`` if it needs none, None if they are missing."""
        if not fpmod.needs_extras(fp):
            return {}
        if fp.name not in self._extras:
            self._extras[fp.name] = fpmod.load_extras(self.folder, fp.name)
        return self._extras[fp.name]


def load_baseline(name: str | None = None, *, bank: Any = None, device: str = "cpu",
                  allow_unverified: bool = False) -> LoadedBaseline:
    """Load a baseline of the bank by name or id (None: the bank's only baseline).

    Its row and every one of its files are checked against their SHA-256 first.

    Args:
        name: baseline name or id.
        bank: the bank (a :class:`refbank.Bank`, a folder, or None for the default).
        device: where the engine's arrays go.
        allow_unverified: load it even if its row or files fail their hash (the
            problems are kept in :attr:`LoadedBaseline.unverified`).

    Raises:
        BankError: no such baseline, none at all, or several and no name given; or its
            row or files fail their hash (without ``allow_unverified``).
        InputError: its files are missing or damaged.
    """

    from forensics.stats.baseline import Baseline
    from refbank.bank import modified_rows, unverified_message

    b = open_bank(bank)
    row = b.resolve_baseline(name)
    files, problem = b.baseline_files(row)
    problems = modified_rows("baselines", [row]) + ([problem] if problem else [])
    if problems and not allow_unverified:
        raise BankError(unverified_message(problems, b.path))
    folder = b.baseline_dir(row["baseline_id"])
    try:
        engine = Baseline.load(folder, device=device)
    except InputError as exc:
        raise BankError(f"baseline {row['name']!r} in {b.path} cannot be loaded ({exc}); run "
                        f"fp bank verify, or remove and rebuild it") from None
    if engine.id != row["baseline_id"]:
        raise BankError(f"the files of baseline {row['name']!r} belong to baseline "
                        f"{engine.id}, not {row['baseline_id']}; run fp bank verify")
    params = json.loads(row["params_json"] or "{}")
    params.update({k: row[k] for k in ("partitioner", "distance", "pooling", "seed")
                   if row.get(k) is not None})
    return LoadedBaseline(row, engine, folder, params, files,
                          [dataclasses.asdict(p) for p in problems])


def build_baseline(
    name: str,
    train: PathLike,
    heldout: PathLike,
    *,
    encoder: str,
    weights: str | None = None,
    pool: str = "cls",
    distance: str = "abscosine",
    partitioner: str = "kmeans",
    seed: int = 0,
    n_cells: int = 10,
    pca_dim: int = 64,
    n_init: int = 10,
    device: str = "auto",
    bank: Any = None,
    notes: str | None = None,
    batch_size: int = 64,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Embed T (``train``) and P (``heldout``), build the baseline once and store it.

    Args:
        name: the baseline's name in the bank (unique).
        train: folder of training images T (what the generators learned from).
        heldout: folder of held-out images P from T's distribution.
        encoder: encoder name (``fp list encoders``); ``NAME@SIZE`` sets the input size.
        weights: ``hub``, a local file or ``random:SEED`` (default: the encoder's).
        pool: ``cls`` or ``mean`` for transformer layers.
        distance: nearest-neighbour distance plugin.
        partitioner: partitioner plugin (one that assigns new samples, e.g. ``kmeans``).
        seed: seed of every random step.
        n_cells: cells per layer.
        pca_dim: PCA dimensions before KMeans.
        n_init: KMeans restarts.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for embedding and distances.
        bank: the bank (a :class:`refbank.Bank`, a folder, or None for the default).
        notes: free text stored with the baseline.
        batch_size: images per forward pass.
        cache_dir: embedding cache (None disables it).
        progress: show progress bars on stderr.
        skip_bad: skip unreadable images instead of failing.

    Returns:
        The bank's ``baselines`` row of the new baseline.

    Raises:
        BankError: the name is taken, or the same baseline is stored under another name.
        InputError: bad folders or parameters.
    """
    from forensics.data.embed import embed_folder, get_encoder, reusing_encoders
    from forensics.plugin.encoders import check_pool, resolve_device
    from forensics.plugin.manager import get
    from forensics.stats.baseline import Baseline
    from forensics.stats.ct import check_seed
    from refbank.bank import check_labels, check_name

    # Every cheap check first: embedding T and P is the expensive step.
    check_name(name, "baseline name")
    check_labels({"notes": notes})
    seed = check_seed(seed)
    check_pool(pool)
    get_encoder(encoder)
    get("distances", distance)
    get("partitioners", partitioner)
    b = open_bank(bank)
    b.check_writable()
    taken = {r["name"]: r for r in b.baselines()}
    if name in taken:
        raise BankError(f"a baseline named {name!r} is already in the bank at {b.path}; "
                        f"choose another name, or remove it first: fp baseline remove {name}")
    if partitioner == "given":
        raise InputError("the 'given' partitioner cannot assign new images to cells; "
                         "use --partitioner kmeans")
    device = resolve_device(device)
    train, heldout, weights = _absolute(train), _absolute(heldout), _absolute_weights(weights)
    embed_kw = dict(weights=weights, pool=pool, device=device, batch_size=batch_size,
                    cache_dir=cache_dir, progress=progress, skip_bad=skip_bad)
    with reusing_encoders():
        T = embed_folder(train, encoder, **embed_kw)
        P = embed_folder(heldout, encoder, **embed_kw)
    overlap = set(T.manifest.hashes) & set(P.manifest.hashes)
    if overlap:
        raise InputError(f"{len(overlap)} image(s) are in both {train} and {heldout}; the "
                         f"held-out set P must not contain training images")
    params = {"n_cells": int(n_cells), "pca_dim": int(pca_dim), "n_init": int(n_init)}
    with stages(progress) as bars:
        layer_done = bars.stage("baseline layers", len(T.layers))
        with _one_thread(max(a.size for a in T.arrays)):
            engine = Baseline.build(T.arrays, P.arrays, T.layers, distance=distance,
                                    partitioner=partitioner, seed=seed,
                                    partitioner_params=params, device=device,
                                    on_layer=lambda _i, layer: layer_done(layer))
        for other in taken.values():
            if other["baseline_id"] == engine.id:
                raise BankError(f"this baseline (same images, encoder and parameters) is "
                                f"already in the bank at {b.path} as {other['name']!r}; use "
                                f"--baseline {other['name']}")
        extras = _prepare_fingerprints(T, P, engine, bars)
        row = _baseline_row(name, T, P, engine, partitioner, distance, pool, seed, params,
                            extras, train, heldout, notes)

        def save(folder: Path) -> None:
            engine.save(folder)
            (folder / TRAIN_MANIFEST_FILE).write_text(json.dumps(T.manifest.to_dict()) + "\n")
            fpmod.save_all_extras(folder, extras)

        stored = bars.stage("storing in the bank", 1)
        b.add_baseline(row, save=save)
        stored()
    return b.get_baseline(name)


def _baseline_row(name: str, T: Embeddings, P: Embeddings, engine: Any, partitioner: str,
                  distance: str, pool: str, seed: int, params: dict[str, Any],
                  extras: dict[str, Any], train: PathLike, heldout: PathLike,
                  notes: str | None) -> dict[str, Any]:
    """The bank's ``baselines`` row of a new baseline."""
    info = T.encoder_info
    row = {
        "baseline_id": engine.id,
        "name": name,
        "encoder": info["name"],
        "weights_sha256": info["weights_sha256"],
        "layers": list(T.layers),
        "train_manifest_sha256": T.manifest.sha256,
        "heldout_manifest_sha256": P.manifest.sha256,
        "n_train": len(T),
        "n_heldout": len(P),
        "partitioner": partitioner,
        "distance": distance,
        "pooling": pool,
        "seed": int(seed),
        "params": {
            **params,
            "weights": info["weights"],
            "encoder_family": info.get("family", ""),
            "preprocessing": info.get("preprocessing"),
            "precision": info.get("precision"),
            "torch_version": info.get("torch_version"),
            "train_folder": str(train),
            "heldout_folder": str(heldout),
            "fingerprints": sorted(extras),
            **({"skipped": {"train": [list(s) for s in T.manifest.skipped],
                            "heldout": [list(s) for s in P.manifest.skipped]}}
               if T.manifest.skipped or P.manifest.skipped else {}),
        },
        "notes": notes,
    }
    return row


def train_manifest(loaded: LoadedBaseline) -> Any:
    """T's :class:`~forensics.data.images.Manifest` for a baseline, or ``None`` if unknown.

    Read from the baseline's ``train_manifest.json``; for a baseline stored without it,
    T's folder (recorded at build time) is scanned again and used only if its manifest
    hash still equals the baseline's ``train_manifest_sha256``. Row ``i`` of T is entry
    ``i`` of the manifest.
    """
    from forensics.data.images import Manifest, scan_folder

    row = loaded.row
    path = loaded.folder / TRAIN_MANIFEST_FILE
    if path.is_file():
        try:
            manifest = Manifest.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    else:
        folder = loaded.params.get("train_folder")
        if not folder or not Path(folder).is_dir():
            return None
        try:
            manifest = scan_folder(folder, skip_bad=True)
        except InputError:
            return None
    return manifest if manifest.sha256 == row["train_manifest_sha256"] else None


def _prepare_fingerprints(T: Embeddings, P: Embeddings, engine: Any,
                          bars: Stages | None = None) -> dict[str, dict]:
    """Every fingerprint's baseline arrays; one context, so shared arrays are computed once."""
    ctx = fpmod.PrepareContext(list(T.layers), list(T.arrays), list(P.arrays), engine)
    fps = [fp for fp in (fpmod.get(n) for n in fpmod.names()) if fpmod.needs_extras(fp)]
    update = (bars or Stages()).stage("fingerprint arrays", len(fps))
    out = {}
    with _one_thread(max(a.size for a in T.arrays)):  # 20x faster on a busy 2-core machine
        for fp in fps:
            update(fp.name, advance=0)
            out[fp.name] = dict(fp.prepare(ctx))
            update(fp.name)
    return out


# -- curves -------------------------------------------------------------------------------


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
    """

    curve: Any
    results: list[Any]
    embeddings: Embeddings
    fingerprints: dict[str, np.ndarray]
    rows: np.ndarray
    baseline: LoadedBaseline
    spreads: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self, details: bool = False) -> dict[str, Any]:
        """JSON-ready: the curve (layers, values, provenance), per-layer results, fingerprints."""
        from forensics.stats.curve import _jsonable

        out = self.curve.to_dict()
        out["results"] = [r.to_dict() for r in self.results]
        if not details:
            for r in out["results"]:
                r.pop("details", None)
        out["fingerprints"] = _jsonable(dict(self.fingerprints))
        return out


def _embed_suspect(loaded: LoadedBaseline, source: Any, *, weights: str | None, device: str,
                   batch_size: int, cache_dir: Any, progress: bool,
                   skip_bad: bool) -> Embeddings:
    """Embed a folder the way the baseline was embedded, or check given embeddings."""
    from forensics.data.embed import embed_folder

    row = loaded.row
    if isinstance(source, Embeddings):
        emb = source
    else:
        emb = embed_folder(source, row["encoder"],
                           weights=weights if weights is not None else loaded.params.get("weights"),
                           pool=row["pooling"] or "cls", device=device, batch_size=batch_size,
                           cache_dir=cache_dir, progress=progress, skip_bad=skip_bad)
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
    for n in (fpmod.names() if names is None else names):
        fp = fpmod.get(n)
        if loaded.extras(fp) is None:
            if fp.name in loaded.params.get("fingerprints", ()):
                msg = (f"the file {fpmod.extras_file(fp.name)} of fingerprint {fp.name!r} is "
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
             Q: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image variance of every fingerprint that has per-image vectors."""
    out = {}
    for fp, ctx in _contexts(fps, loaded, results, Q):
        var = fpmod.per_image_variance(fp, ctx)
        if var is not None:
            out[fp.name] = var
    return out


#: Up to this many array elements, linear algebra runs single-threaded (see below).
SMALL_WORK = 4_000_000


def _one_thread(elements: int = 0) -> contextlib.AbstractContextManager:
    """Single-threaded BLAS and OpenMP for small arrays (``elements`` up to SMALL_WORK).

    Waking thread pools for a (m, D) x (D, d) product or the SVD of a few thousand rows
    costs more than the work itself, a hundred times more on a busy machine.
    """
    if elements > SMALL_WORK:
        return contextlib.nullcontext()
    try:
        # A limit reaches only libraries already loaded: load SciPy's and scikit-learn's.
        import scipy.linalg  # noqa: F401
        import sklearn.cluster  # noqa: F401
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - they come with the dependencies
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


#: The fewest images of a set (C_T-free fingerprints; C_T itself needs far more).
MIN_IMAGES = 2


def _check_tau(tau: float | None) -> None:
    """Refuse a bad tau before any image is embedded (the rule itself: ct.check_tau)."""
    from forensics.stats.ct import check_tau

    if tau is not None:
        check_tau(tau, 1)


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


def _measure(loaded: LoadedBaseline, emb: Embeddings, rows: np.ndarray, *, tau: float | None,
             details: bool, fps: Sequence[Any], what: str, folder: str | None,
             extra: dict[str, Any] | None = None, spreads: bool = False) -> CurveResult:
    from forensics.stats.curve import Curve, make_provenance

    if len(rows) < MIN_IMAGES:
        raise InsufficientDataError(
            f"{what}: {len(rows)} image(s); a set needs at least {MIN_IMAGES} images")
    need = details or any(getattr(fp, "needs_details", False) for fp in fps)
    results, Q = _query(loaded, emb, rows, tau, need)
    if any(fpmod.needs_ct(fp) for fp in fps):
        _check_defined(results, what)
    vectors = _vectors(fps, loaded, results, Q)
    manifest_sha, _ = _subset_manifest_sha(emb, rows)
    row, info = loaded.row, emb.encoder_info or {}
    if emb.manifest is not None:  # files left out with skip_bad, and why
        extra = {"skipped": [list(s) for s in emb.manifest.skipped], **(extra or {})}
    params = {
        "partitioner": row["partitioner"], "distance": row["distance"],
        "tau": float(results[0].tau), "tau_rule": TAU_RULE if tau is None else "given",
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
    return CurveResult(curve, results, emb, vectors, np.asarray(rows), loaded,
                       _spreads(fps, loaded, results, Q) if spreads else {})


def compute_curve(
    folder_or_embeddings: PathLike | Embeddings,
    *,
    baseline: str | LoadedBaseline | None = None,
    bank: Any = None,
    tau: float | None = None,
    details: bool = False,
    fingerprints: Sequence[str] | None = None,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
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


# -- enrolment ----------------------------------------------------------------------------


def enroll(
    folder: PathLike,
    *,
    baseline: str | None,
    model: str,
    family: str,
    checkpoint: str | None = None,
    per_curve: int = DEFAULT_PER_CURVE,
    split: str = "enroll",
    bank: Any = None,
    tau: float | None = None,
    source: str | None = None,
    notes: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
    allow_duplicate: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[str]:
    """Split a generator's images into curves of ``per_curve`` images and store each.

    The images are taken in manifest order (sorted relative paths): curve k uses images
    ``k*N .. (k+1)*N - 1``; a remainder smaller than N is left out (``echo`` says so).
    Every registered fingerprint is computed and stored with each curve.

    Args:
        folder: the generator's images.
        baseline: baseline name or id (None: the bank's only baseline).
        model, family: the generator and its family.
        checkpoint: checkpoint or release of the generator.
        per_curve: images per curve (the paper: 500).
        split: split tag stored with the rows.
        bank: the bank.
        tau: cell threshold; default 20/N.
        source, notes: stored with the rows.
        weights, device, batch_size, cache_dir, progress, skip_bad: as for
            :func:`compute_curve`.
        allow_duplicate: enroll images that are enrolled against this baseline already
            (refused otherwise, before embedding); the new rows record the curves they
            repeat (``duplicate_of`` in their parameters).
        echo: called with messages for the user (e.g. images left out).

    Returns:
        The new curve ids, in order.

    Raises:
        InsufficientDataError: fewer images than ``per_curve``, or too few for tau.
        BankError: the images are enrolled already, the bank is read-only, or see
            :func:`compute_curve`.
        InputError: see :func:`compute_curve`; labels with control characters.
    """
    from forensics.data.images import scan_folder
    from forensics.plugin.encoders import resolve_device
    from refbank.bank import check_labels

    say = echo or (lambda _msg: None)
    if int(per_curve) < 2:
        raise InputError(f"--per-curve must be at least 2 images, got {per_curve}")
    for what, value in (("model", model), ("family", family)):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"--{what} must be a non-empty name")
    _check_tau(tau)
    check_labels({"model": model, "family": family, "checkpoint": checkpoint, "split": split,
                  "source": source, "notes": notes})
    b = open_bank(bank)
    b.check_writable()
    device = resolve_device(device)
    loaded = load_baseline(baseline, bank=b, device=device)
    manifest = scan_folder(folder, skip_bad=skip_bad)
    for s in manifest.skipped:
        say(f"skipped {s.relpath}: {s.reason}")
    n, per = len(manifest), int(per_curve)
    if n < per:
        raise InsufficientDataError(
            f"{folder} holds {n} image(s), fewer than --per-curve {per}; add images or "
            f"lower --per-curve (C_T needs more than 20 images in a cell with the default tau)"
        )
    k, rest = divmod(n, per)
    if not allow_duplicate:
        _refuse_enrolled(b, loaded, manifest, k, per, folder)
    if rest:
        say(f"{folder}: {k} curve(s) of {per} images; the last {rest} image(s) in path order "
            f"are left out (fewer than --per-curve {per})")
    emb = _embed_suspect(loaded, manifest, weights=weights, device=device,
                         batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                         skip_bad=skip_bad)
    fps, missing = _fingerprint_objects(None, loaded, strict=False)
    for msg in missing:
        say(msg + "; curves are stored without it")
    labels = dict(model=model, family=family, checkpoint=checkpoint, source=source,
                  notes=notes, split=split)
    with _one_thread():
        rows = [_enroll_chunk(loaded, emb, c, k, per, fps, folder, tau, manifest.sha256, labels)
                for c in range(k)]
    return b.add_curves(rows, allow_duplicate=allow_duplicate)


def _refuse_enrolled(b: Any, loaded: LoadedBaseline, manifest: Any, k: int, per: int,
                     folder: PathLike) -> None:
    """Refuse, before embedding, images enrolled against this baseline already."""
    from forensics.data.images import Manifest
    from refbank.bank import duplicate_message

    bid = loaded.row["baseline_id"]
    rows = [{"baseline_id": bid,
             "manifest_sha256": Manifest(manifest.root, manifest.entries[c * per:(c + 1) * per]
                                         ).sha256,
             "params": {"folder_manifest_sha256": manifest.sha256}} for c in range(k)]
    found = b.find_duplicates(rows)
    if found:
        i, hit = found[0]
        raise BankError(duplicate_message(f"{folder} (curve {i + 1} of {k})", hit, loaded.name))


def _enroll_chunk(loaded: LoadedBaseline, emb: Embeddings, c: int, k: int, per: int,
                  fps: Sequence[Any], folder: PathLike, tau: float | None,
                  folder_sha: str, labels: dict[str, Any]) -> dict[str, Any]:
    """The bank row of chunk ``c`` of ``k`` (``labels``: model, family, ...)."""
    idx = np.arange(c * per, (c + 1) * per)
    res = _measure(
        loaded, emb, idx, tau=tau, details=False, fps=fps, folder=str(_absolute(folder)),
        what=f"{folder} (curve {c + 1} of {k}: images {c * per}..{(c + 1) * per - 1})",
        extra={"chunk": {"index": c, "of": k, "start": c * per, "stop": (c + 1) * per,
                         "folder_manifest_sha256": folder_sha}},
        spreads=True,
    )
    row = res.curve.to_row(**labels)
    if res.curve.provenance.get("skipped"):  # the folder's files left out with skip_bad
        row["params"]["skipped"] = res.curve.provenance["skipped"]
    row["params"]["folder_manifest_sha256"] = folder_sha  # the folder the curve was cut from
    row["fingerprints"] = {name: vec.tolist() for name, vec in res.fingerprints.items()}
    row["fingerprints"].update({var_key(name): var.tolist()
                                for name, var in res.spreads.items()})
    return row


# -- attribution --------------------------------------------------------------------------


def _pick_baseline(b: Any, rows: list[dict[str, Any]], baseline: str | None) -> str | None:
    """The baseline to attribute against: given, the bank's only one, or the curves' only one."""
    if baseline:
        return baseline
    used = sorted({r["baseline_id"] for r in rows})
    if len(b.baselines()) > 1 and len(used) == 1:
        return used[0]
    return None


def _reference_vectors(fp: Any, same_rows: list[dict[str, Any]], refs: np.ndarray,
                       where: str) -> np.ndarray:
    """The enrolled vectors of fingerprint ``fp`` (the paper's: the ``values`` column)."""
    from refbank.bank import curve_fingerprints

    if fp.name == fpmod.PAPER_FINGERPRINT:
        return refs
    vecs, lacking = [], []
    for r in same_rows:
        vec = curve_fingerprints(r).get(fp.name)
        if vec is None:
            lacking.append(r["curve_id"])
        vecs.append(vec)
    if lacking:
        shown = ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else "")
        raise BankError(
            f"{len(lacking)} enrolled curve(s){where} have no {fp.name!r} fingerprint ({shown}): "
            f"they were enrolled before it existed or imported without images. Re-enroll "
            f"those generators (fp enroll), or match on --fingerprint paper"
        )
    sizes = {len(v) for v in vecs}
    if len(sizes) != 1:
        raise BankError(f"enrolled {fp.name!r} fingerprints{where} have different lengths "
                        f"{sorted(sizes)}; run fp bank verify")
    return np.asarray(vecs, dtype=np.float64)


def _confidence_model(fp: Any, rows: list[dict[str, Any]], R: np.ndarray, mask: np.ndarray,
                      meta: list[dict[str, Any]], matcher: Any, quantile: float,
                      seed: int) -> Any:
    """The bank's calibration of confidence (None: ``fp`` has no per-image variances)."""
    from forensics.stats import confidence
    from refbank.bank import curve_fingerprints

    variances = [curve_fingerprints(r).get(var_key(fp.name)) for r in rows]
    families = [m["family"] for m in meta]
    if any(v is None for v in variances) or len(set(families)) < 2:
        return None
    S = np.asarray(variances, dtype=np.float64)
    if S.shape[1] != mask.shape[0]:
        return None
    sim = confidence.simulate(R, S[:, mask], [int(r["n_images"]) for r in rows], families,
                              matcher.score, seed=seed)
    if sim.size.size == 0:
        return None
    return confidence.fit(sim, quantile=quantile, seed=seed)


def attribute(
    folder: PathLike | Embeddings,
    *,
    baseline: str | None = None,
    matcher: str | None = None,
    fingerprint: str | None = None,
    top: int = 5,
    drop_layers: Sequence[int] = (0,),
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    quantile: float = 0.05,
    bank: Any = None,
    report: PathLike | None = None,
    tau: float | None = None,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
    allow_unverified: bool = False,
) -> Attribution:
    """Which enrolled generator made these images? Ranked, calibrated, with confidence.

    Args:
        folder: the suspect images (or their embeddings).
        baseline: baseline name or id (None: the bank's only baseline, or the one every
            enrolled curve uses).
        matcher: ``zscore``, ``l2``, ``cosine``, ``combined`` or a plugin's (None: the
            fingerprint's default: ``zscore`` for ``resid-early`` and the other
            projected-mean fingerprints, ``combined`` for ``paper`` and ``setstats``).
        fingerprint: what is matched (None: ``resid-early``, the early layers' set means
            with the image content regressed out, matched by ``zscore``; ``paper``: the C_T-layer
            curve, with ``matcher="combined"`` the paper's method; ``setstats``: the
            paper's mean/std/FID baseline; or a plugin's).
        top: matches kept in the ranking.
        drop_layers: layer indices left out of matching (the paper drops layer 0).
        n_boot: bootstrap resamples of the suspect images (0: no confidence).
        seed: seed of the resampling.
        quantile: share of genuine curves accepted to be called unknown.
        bank: the bank.
        report: a folder to write ``attribution.json``, ``attribution.png`` and the
            case report ``report.html`` into.
        tau, weights, device, batch_size, cache_dir, progress, skip_bad: as for
            :func:`compute_curve`.
        allow_unverified: use bank rows and baseline files that fail their SHA-256
            (refused otherwise); they are listed in the answer's
            ``provenance.custody.unverified``.

    Returns:
        A :class:`forensics.stats.attribution.Attribution` (``to_dict()`` is the JSON answer; its
        ``provenance.custody`` is the chain of custody, see :mod:`forensics.steps.case`).

    Raises:
        BankError: empty bank, no curves for the baseline, or curves that do not match the
            suspect's encoder, weights or layers, or lack the fingerprint; rows or files
            that fail their hash.
        InsufficientDataError: too few suspect images for tau.
    """
    from forensics.plugin.encoders import resolve_device
    from forensics.stats.attribution import keep_mask
    from forensics.stats.ct import check_seed
    from refbank.bank import modified_rows, unverified_message

    seed = check_seed(seed)
    if int(top) < 1 or int(n_boot) < 0 or not 0.0 <= float(quantile) <= 1.0:
        raise InputError(f"need top >= 1, n_boot >= 0 and 0 <= quantile <= 1; got top {top}, "
                         f"n_boot {n_boot}, quantile {quantile}")
    b = open_bank(bank)
    all_rows = b.curves()
    if not all_rows:
        raise BankError(f"the bank at {b.path} has no enrolled curves; enroll references "
                        f"first: fp enroll DIR --baseline NAME --model M --family F")
    fp = fpmod.get(fingerprint or fpmod.DEFAULT_FINGERPRINT)
    device = resolve_device(device)
    loaded = load_baseline(_pick_baseline(b, all_rows, baseline), bank=b, device=device,
                           allow_unverified=allow_unverified)
    same = [r for r in all_rows if r["baseline_id"] == loaded.row["baseline_id"]]
    forged = modified_rows("curves", same)
    if forged and not allow_unverified:
        raise BankError(unverified_message(forged, b.path))
    unverified = loaded.unverified + [dataclasses.asdict(p) for p in forged]
    _fingerprint_objects([fp.name], loaded, strict=True)
    keep = keep_mask(len(loaded.row["layers"]), tuple(int(i) for i in drop_layers))
    fpmod.resolve_matcher(fp, matcher, [d for d, k in zip(loaded.dims, keep, strict=True) if k])
    _check_tau(tau)
    weights = _absolute_weights(weights)
    emb = _embed_suspect(loaded, folder, weights=weights, device=device, batch_size=batch_size,
                         cache_dir=cache_dir, progress=progress, skip_bad=skip_bad)
    settings = {"tau": tau, "weights": weights, "device": device, "batch_size": int(batch_size),
                "skip_bad": bool(skip_bad), "allow_unverified": bool(allow_unverified)}
    with _one_thread():
        return _attribute(b, all_rows, loaded, fp, emb, folder, matcher=matcher, top=top,
                          drop_layers=drop_layers, n_boot=n_boot, seed=seed, quantile=quantile,
                          report=report, tau=tau, settings=settings, unverified=unverified)


def _attribute(b: Any, all_rows: list[dict[str, Any]], loaded: LoadedBaseline, fp: Any,
               emb: Embeddings, folder: Any, *, matcher: str | None, top: int,
               drop_layers: Sequence[int], n_boot: int, seed: int, quantile: float,
               report: PathLike | None, tau: float | None, settings: dict[str, Any],
               unverified: list[dict[str, str]]) -> Attribution:
    from forensics.stats.attribution import (
        Attribution,
        bootstrap_confidence,
        calibrate_unknown,
        comparable_references,
        decide,
        keep_mask,
        rank,
    )
    from forensics.steps.case import custody_record

    where = f" in the bank at {b.path}"
    fps = [fp]
    folder_str = None if isinstance(folder, Embeddings) else str(_absolute(folder))
    res = _measure(loaded, emb, np.arange(len(emb)), tau=tau, details=False, fps=fps,
                   what=folder_str or "the embeddings", folder=folder_str)
    names = {r["baseline_id"]: r["name"] for r in b.baselines()}
    refs, meta = comparable_references(res.curve, all_rows, bank=str(b.path),
                                       baseline_names=names)
    same_rows = [r for r in all_rows if r["baseline_id"] == loaded.row["baseline_id"]]
    ref_vecs = _reference_vectors(fp, same_rows, refs, where)

    drop = tuple(int(i) for i in drop_layers)
    keep = keep_mask(len(loaded.row["layers"]), drop)
    dims = loaded.dims
    mask = fpmod.entry_mask(fp, dims, keep)
    if mask.shape[0] != ref_vecs.shape[1]:
        raise BankError(f"enrolled {fp.name!r} fingerprints have {ref_vecs.shape[1]} values "
                        f"but the suspect's has {mask.shape[0]}; re-enroll them with this fp")
    mname, mobj = fpmod.resolve_matcher(fp, matcher, [d for d, k in zip(dims, keep,
                                                                          strict=True) if k])
    query, R = res.fingerprints[fp.name][mask], ref_vecs[:, mask]
    ranking = rank(query, R, meta, mobj, drop_layers=())
    calibration = calibrate_unknown(R, [m["family"] for m in meta], mobj, (), quantile)
    calibration = dataclasses.replace(calibration, matcher=mname, drop_layers=drop)
    model = _confidence_model(fp, same_rows, R, mask, meta, mobj, quantile, seed)
    if model is not None:
        calibration = dataclasses.replace(
            calibration, threshold=model.threshold(len(emb)), confidence=model.to_dict(),
            margin_threshold=model.margin_threshold(len(emb)),
            note=(f"threshold = {quantile:g}-quantile of the best scores of suspects of "
                  f"{len(emb)} images simulated from the bank ({model.note})"))
    decision = decide(ranking, calibration)
    if model is not None and not decision.unknown:
        from forensics.stats.confidence import family_scores, margin_of

        _, best, margin = margin_of(family_scores([m.score for m in ranking],
                                                  [m.family for m in ranking]))
        decision = dataclasses.replace(decision,
                                       confidence=model.probability(margin, best, len(emb)))

    boot = None
    if n_boot > 0:
        reads_ct = fpmod.needs_ct(fp) or getattr(fp, "needs_details", False)

        def curve_fn(indices: np.ndarray) -> np.ndarray:
            if reads_ct:
                results, Q = _query(loaded, emb, np.asarray(indices), tau,
                                    getattr(fp, "needs_details", False))
            else:  # the fingerprint reads no C_T: skip the query
                results, Q = res.results, [np.asarray(a)[indices] for a in emb.arrays]
            vec = _vectors([fp], loaded, results, Q)[fp.name]
            return np.nan_to_num(vec, nan=0.0)[mask]  # the authors' rule: NaN counts as 0

        boot = bootstrap_confidence(curve_fn, len(emb), n_boot, seed, bank_vectors=R,
                                    meta=meta, matcher=mobj, drop_layers=(),
                                    calibration=calibration, decision=decision)
        decision = dataclasses.replace(decision, stability=boot.confidence,
                                       model_stability=boot.model_confidence)
    parameters = {
        "fingerprint": fp.name, "matcher": mname, "drop_layers": list(drop), "top": int(top),
        "quantile": quantile, "n_boot": n_boot if boot is not None else 0, "seed": int(seed),
        "bank": str(b.path), "baseline": loaded.name, "n_references": len(meta), **settings,
    }
    custody = custody_record(bank=b, loaded=loaded, manifest=emb.manifest, folder=folder_str,
                             rows=same_rows, unverified=unverified)
    result = Attribution(decision, ranking[: max(int(top), 1)], calibration, res.curve, boot,
                         parameters, custody)
    if report is not None:
        from forensics.steps.reports import Evidence, write_report

        evidence = Evidence(vector=query, bank_vectors=R,
                            bank_ids=[str(m["curve_id"]) for m in meta],
                            entry_layers=fpmod.entry_layers(fp, dims)[mask],
                            manifest=emb.manifest, baseline=loaded.row)
        write_report(report, result, same_rows, evidence=evidence)
    return result
