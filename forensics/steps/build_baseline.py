"""Build a baseline once: embed T and P, fit the engine, prepare fingerprints, store it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forensics import defaults
from forensics.data.embed import DEFAULT_CACHE, Embeddings
from forensics.errors import BankError, InputError
from forensics.plugin import manager
from forensics.progress import Stages, stages
from forensics.stats import fingerprints as fpmod
from forensics.steps.bank_access import (
    TRAIN_MANIFEST_FILE,
    PathLike,
    _absolute,
    _absolute_weights,
    open_bank,
)
from forensics.steps.baseline_files import save_all_extras, save_engine
from forensics.threads import _one_thread


def build_baseline(
    name: str,
    train: PathLike,
    heldout: PathLike,
    *,
    encoder: str,
    weights: str | None = None,
    pool: str = defaults.POOL,
    distance: str = defaults.DISTANCE,
    partitioner: str = defaults.PARTITIONER,
    seed: int = defaults.SEED,
    n_cells: int = defaults.N_CELLS,
    pca_dim: int = defaults.PCA_DIM,
    n_init: int = defaults.N_INIT,
    device: str = defaults.DEVICE,
    bank: Any = None,
    notes: str | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
    ray: str | None = None,
    store: PathLike | None = None,
    search: str = defaults.SEARCH,
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
        ray: embed on a Ray cluster (``auto``, ``local`` or an address; see
            :func:`~forensics.data.embed.embed_folder`); None: in this process.
        store: a folder for T's and P's embeddings as on-disk, layer-major stores
            (``store/train``, ``store/heldout``; see :mod:`forensics.data.store`): the
            build then holds a bounded number of rows of one layer at a time, whatever
            the number of images. ``None``: in memory. The baseline is the same either way.
        search: nearest-neighbour search of the cells: ``auto`` (exact), or the approximate
            ``ivf[:nlist=N,nprobe=P,min_rows=R]`` for training sets beyond what the exact
            search affords (recorded in the baseline's parameters and id; its effect on C_T
            is measured by ``benchmarks/bench_scale.py --approximate``).

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
    from forensics.stats.neighbours import check_search
    from refbank.bank import check_labels, check_name

    # Every cheap check first: embedding T and P is the expensive step.
    check_name(name, "baseline name")
    check_labels({"notes": notes})
    seed = check_seed(seed)
    check_pool(pool)
    get_encoder(encoder)
    dist = get("distances", distance)
    part = get("partitioners", partitioner)
    check_search(search, dist)  # a bad --search is refused before anything is embedded
    b = open_bank(bank)
    b.check_writable()
    taken = {r["name"]: r for r in b.baselines()}
    if name in taken:
        raise BankError(f"a baseline named {name!r} is already in the bank at {b.path}; "
                        f"choose another name, or remove it first: fp baseline remove {name}")
    if partitioner == defaults.GIVEN_PARTITIONER:
        raise InputError("the 'given' partitioner cannot assign new images to cells; "
                         "use --partitioner kmeans")
    embed_device = device if ray is not None else None  # Ray actors: the cluster's devices
    device = resolve_device(device)
    train, heldout, weights = _absolute(train), _absolute(heldout), _absolute_weights(weights)
    embed_kw = dict(weights=weights, pool=pool, device=embed_device or device,
                    batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                    skip_bad=skip_bad, ray=ray)
    with reusing_encoders():
        stores = ((None, None) if store is None
                  else (Path(store) / "train", Path(store) / "heldout"))
        T = embed_folder(train, encoder, **embed_kw, store=stores[0])
        P = embed_folder(heldout, encoder, **embed_kw, store=stores[1])
    overlap = set(T.manifest.hashes) & set(P.manifest.hashes)
    if overlap:
        raise InputError(f"{len(overlap)} image(s) are in both {train} and {heldout}; the "
                         f"held-out set P must not contain training images")
    params = {"n_cells": int(n_cells), "pca_dim": int(pca_dim), "n_init": int(n_init)}
    with stages(progress) as bars:
        layer_done = bars.stage("baseline layers", len(T.layers))
        shared: dict = {}  # T's covariance per layer: read once for the PCA and fingerprints
        with _one_thread(max(a.size for a in T.arrays)):
            engine = Baseline.build(T.arrays, P.arrays, T.layers, distance=dist,
                                    partitioner=part, seed=seed,
                                    partitioner_params=params, device=device,
                                    on_layer=lambda _i, layer: layer_done(layer),
                                    shared=shared, bars=bars, search=search)
        for other in taken.values():
            if other["baseline_id"] == engine.id:
                raise BankError(f"this baseline (same images, encoder and parameters) is "
                                f"already in the bank at {b.path} as {other['name']!r}; use "
                                f"--baseline {other['name']}")
        extras = _prepare_fingerprints(T, P, engine, bars, shared)
        row = _baseline_row(name, T, P, engine, partitioner, distance, pool, seed, params,
                            extras, train, heldout, notes)

        def save(folder: Path) -> None:
            save_engine(engine, folder)
            (folder / TRAIN_MANIFEST_FILE).write_text(json.dumps(T.manifest.to_dict()) + "\n")
            save_all_extras(folder, extras)

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
            **({"search": engine.meta["search"]} if "search" in engine.meta else {}),
            **({"skipped": {"train": [list(s) for s in T.manifest.skipped],
                            "heldout": [list(s) for s in P.manifest.skipped]}}
               if T.manifest.skipped or P.manifest.skipped else {}),
        },
        "notes": notes,
    }
    return row


def _prepare_fingerprints(T: Embeddings, P: Embeddings, engine: Any,
                          bars: Stages | None = None, shared: dict | None = None
                          ) -> dict[str, dict]:
    """Every fingerprint's baseline arrays; one context, so shared arrays are computed once.

    ``shared``: what the baseline build computed from T (its covariance per layer).
    """
    ctx = fpmod.PrepareContext(list(T.layers), list(T.arrays), list(P.arrays), engine,
                               shared if shared is not None else {})
    fps = [fp for fp in (manager.get("fingerprints", n) for n in manager.names("fingerprints"))
           if fpmod.needs_extras(fp)]
    update = (bars or Stages()).stage("fingerprint arrays", len(fps))
    out = {}
    with _one_thread(max(a.size for a in T.arrays)):  # 20x faster on a busy 2-core machine
        for fp in fps:
            update(fp.name, advance=0)
            out[fp.name] = dict(fp.prepare(ctx))
            update(fp.name)
    return out
