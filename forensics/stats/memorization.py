"""Memorization report: which layers say the generated images copy the training data.

The C_T of a layer compares the generated images' nearest-neighbour distances to the
training set T with those of fresh held-out images, cell by cell; it is a weighted mean
of Z-scores (Mann-Whitney U), so it reads on a Z-like scale:

* a layer **indicates copying** when its C_T is *clearly below 0*, defined here as
  ``C_T < threshold`` with ``threshold = -2``
  (:data:`forensics.defaults.MEMORIZATION_THRESHOLD`): the generated images sit closer to T
  than fresh samples do by more than two standard deviations of U's null distribution.
  Layers whose C_T is undefined (no cell with enough generated images, constant
  embeddings) indicate nothing;
* **low-level vs high-level**: the first half of the layers (index ``i < L/2``) are the
  *early* layers, which see colours, textures and simple patterns; the rest are the *late*
  layers, which see shapes and meaning. Copying only in early layers is ``low-level``,
  only in late layers ``high-level``, in both ``both``;
* **hubs are not copies**: a layer with C_T below the threshold where the generated
  images have fewer than 25 % as many distinct nearest training images as images
  (:data:`COLLAPSE_SHARE`) is ``collapsed``: the images crowd onto a few training images
  (e.g. heavy noise, which the middle Inception layers map next to one noisy-looking
  training image) instead of reproducing their own sources; it does not count as copying.

For each generated image the report also measures how close it is to its nearest
training image in one layer (by default the one with the lowest C_T), relative to fresh
images of the same cell: ``p_quantile`` is the share of that cell's held-out images that
lie closer to T (ties count half, as in U), ``relative_distance`` its distance divided by
the cell's median held-out distance. The images with the smallest values are listed with
their nearest training image (from T's manifest, stored with the baseline).

C_T summarises the whole set, so it can miss a few copies among novel images, or copies
whose edits (noise) push them away from T in most layers. Each image is therefore also
checked on its own: it is a *likely copy* when it is closer to its nearest training image
than every held-out image of its cell, and that training image is its nearest in at least
75 % of the layers (:data:`COPY_AGREEMENT`; fresh images of the data almost never are),
unless several generated images crowd onto that training image (a hub, not a copy).
The ``verdict`` combines both and says why they differ when they do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forensics import defaults
from forensics.errors import InputError
from forensics.stats.ct import STATUS_OK, CTResult

#: A flagged layer whose generated images name fewer distinct nearest training images
#: than this share of m is reported as a collapse onto hubs (see :func:`nearest_spread`).
COLLAPSE_SHARE = 0.25
#: An image is a *likely copy* of its nearest training image when it lies closer to it
#: than every held-out image of its cell does (``p_quantile == 0``) and that same training
#: image is nearest in at least this share of the layers (see :func:`likely_copies`).
COPY_AGREEMENT = 0.75
#: In a layer where the images crowd onto few training images, a training image nearest to
#: this many generated images or more is a hub: those images are not counted as its copies.
HUB_SIZE = 3

SCOPES = ("none", "low-level", "high-level", "both")


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def copying_layers(
    layers: Sequence[str],
    values: Sequence[float],
    threshold: float = defaults.MEMORIZATION_THRESHOLD,
    collapsed: Sequence[str] = (),
) -> dict[str, Any]:
    """Which layers indicate copying, and whether that is low-level or high-level.

    Args:
        layers: layer names, in network order.
        values: C_T per layer (NaN where undefined).
        threshold: a layer with ``C_T < threshold`` is flagged.
        collapsed: flagged layers where the generated images crowd onto a few training
            images (see :func:`nearest_spread`); they do not count as copying.

    Returns:
        ``{"threshold", "flagged": [C_T < threshold], "collapsed", "copying": [flagged,
        not collapsed], "early_layers", "late_layers", "copying_early", "copying_late",
        "scope": "none"|"low-level"|"high-level"|"both", "summary": a sentence}``.

    Raises:
        InputError: lengths differ, or the threshold is not finite.
    """
    names = [str(n) for n in layers]
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size != len(names) or not names:
        raise InputError(f"need one C_T value per layer: got {v.size} values for "
                         f"{len(names)} layers")
    if not math.isfinite(threshold):
        raise InputError(f"the copying threshold must be a finite number, got {threshold}")
    n = len(names)
    early = [names[i] for i in range(n) if i < n / 2]
    late = [names[i] for i in range(n) if i >= n / 2]
    flagged = [names[i] for i in range(n) if np.isfinite(v[i]) and v[i] < threshold]
    crowd = [x for x in flagged if x in set(collapsed)]
    copying = [x for x in flagged if x not in crowd]
    c_early = [x for x in copying if x in early]
    c_late = [x for x in copying if x in late]
    scope = ("both" if c_early and c_late else "low-level" if c_early
             else "high-level" if c_late else "none")
    n_defined = int(np.isfinite(v).sum())
    if scope == "none":
        summary = f"No layer indicates copying (C_T < {threshold:g}) of the images' sources"
        summary += "." if crowd else f": C_T >= {threshold:g} at all {n_defined} defined layers."
    else:
        what = {"low-level": "low-level copying (early layers only: colours, textures, "
                             "simple patterns)",
                "high-level": "high-level copying (late layers only: shapes, semantics)",
                "both": "copying at low and high level (early and late layers)"}[scope]
        summary = (f"{len(copying)} of {n_defined} layers indicate copying (C_T < "
                   f"{threshold:g}): {what}; {len(c_early)} of {len(early)} early and "
                   f"{len(c_late)} of {len(late)} late layers.")
    if crowd:
        summary += (
            f" At {', '.join(crowd)}, C_T < {threshold:g} but the images have fewer than "
            f"{COLLAPSE_SHARE:.0%} as many distinct nearest training images as images: they "
            f"crowd onto a few training images (hubs) rather than copy their own sources."
        )
    return {
        "threshold": float(threshold),
        "flagged": flagged,
        "collapsed": crowd,
        "copying": copying,
        "early_layers": early,
        "late_layers": late,
        "copying_early": c_early,
        "copying_late": c_late,
        "scope": scope,
        "summary": summary,
    }


def pick_layer(layers: Sequence[str], values: Sequence[float], layer: str | None = None) -> int:
    """Index of the layer to find the closest images in: ``layer``, else the lowest C_T.

    Raises:
        InputError: ``layer`` is not one of ``layers``, or no layer has a C_T.
    """
    names = [str(n) for n in layers]
    if layer is not None:
        if layer not in names:
            raise InputError(f"--layer {layer!r} is not a layer of the baseline; layers: "
                             f"{', '.join(names)}")
        return names.index(layer)
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).any():
        raise InputError("no layer has a C_T value, so no layer can rank the images; "
                         "use more generated images (see the per-layer messages)")
    return int(np.nanargmin(v))


def sample_closeness(result: CTResult, layer_baseline: Any) -> dict[str, np.ndarray]:
    """Per generated image, how close it is to T compared with fresh images of its cell.

    Args:
        result: the layer's :class:`~forensics.stats.ct.CTResult`, queried with ``details=True``.
        layer_baseline: the layer's :class:`~forensics.stats.baseline.LayerBaseline` (its sorted
            held-out distances per cell).

    Returns:
        ``{"cell", "distance", "nn_index", "p_quantile", "relative_distance"}``, arrays of
        length m; NaN (index -1) where the image's cell has no T or no held-out image.

    Raises:
        InputError: the result carries no details, or the layer is not usable.
    """
    if result.details is None:
        raise InputError("the C_T result has no per-image details; query with details=True")
    if result.status != STATUS_OK or getattr(layer_baseline, "p_dist", None) is None:
        raise InputError(f"layer {result.layer!r} has no usable C_T ({result.status}); "
                         f"pick another layer")
    cells = np.asarray(result.details["cells"], dtype=np.int64)
    dist = np.asarray(result.details["distance"], dtype=np.float64)
    nn = np.asarray(result.details["nn_index"], dtype=np.int64)
    p_dist, p_off = layer_baseline.p_dist, layer_baseline.p_offsets
    quantile = np.full(dist.shape, np.nan)
    relative = np.full(dist.shape, np.nan)
    for c in np.unique(cells):
        if c < 0 or c + 1 >= p_off.shape[0]:
            continue
        sp = p_dist[p_off[c] : p_off[c + 1]]
        sp = sp[np.isfinite(sp)]
        rows = np.flatnonzero((cells == c) & np.isfinite(dist))
        if sp.size == 0 or rows.size == 0:
            continue
        below = np.searchsorted(sp, dist[rows], side="left")
        upto = np.searchsorted(sp, dist[rows], side="right")
        quantile[rows] = (below + 0.5 * (upto - below)) / sp.size
        median = float(np.median(sp))
        if median > 0:
            relative[rows] = dist[rows] / median
    return {"cell": cells, "distance": dist, "nn_index": nn, "p_quantile": quantile,
            "relative_distance": relative}


def nearest_spread(result: CTResult) -> dict[str, Any]:
    """How many different training images are the generated images' nearest neighbours.

    Copies of many training images name many different ones (``distinct_nearest`` close
    to m). A low C_T with few distinct neighbours, one of them taking a large share
    (``top_nearest_share``), is generated images collapsing onto a few "hub" training
    images rather than copying their own sources.
    """
    if result.details is None:
        return {"distinct_nearest": None, "top_nearest_share": None}
    nn = np.asarray(result.details["nn_index"], dtype=np.int64)
    nn = nn[nn >= 0]
    if nn.size == 0:
        return {"distinct_nearest": 0, "top_nearest_share": None}
    counts = np.unique(nn, return_counts=True)[1]
    return {"distinct_nearest": int(counts.size),
            "top_nearest_share": float(counts.max() / result.m)}


def nearest_agreement(results: Sequence[CTResult], layer_index: int) -> tuple[np.ndarray, int]:
    """Per generated image, in how many layers its nearest training image is the one of
    layer ``layer_index``; and the number of layers with per-image details."""
    nn = np.asarray(results[layer_index].details["nn_index"],  # type: ignore[index]
                    dtype=np.int64)
    detailed = [r for r in results if r.details is not None and r.status == STATUS_OK]
    agree = np.zeros(nn.shape, dtype=np.int64)
    for r in detailed:
        agree += np.asarray(r.details["nn_index"], dtype=np.int64) == nn  # type: ignore[index]
    return agree, len(detailed)


def likely_copies(closeness: dict[str, np.ndarray], results: Sequence[CTResult],
                  layer_index: int, agreement: float = COPY_AGREEMENT) -> np.ndarray:
    """Boolean mask of the generated images that look like copies of one training image.

    An image qualifies when, in the chosen layer, it lies closer to its nearest training
    image than every held-out image of its cell (``p_quantile == 0``), and that training
    image is its nearest in at least ``agreement`` of the layers with details; in a layer
    where the images crowd onto few training images (:func:`nearest_spread` under
    :data:`COLLAPSE_SHARE`), not onto a hub (nearest to :data:`HUB_SIZE` or more of them).
    """
    agree, n_layers = nearest_agreement(results, layer_index)
    nn = np.asarray(closeness["nn_index"], dtype=np.int64)
    close = np.isfinite(closeness["p_quantile"]) & (closeness["p_quantile"] == 0.0)
    hub = np.zeros(nn.shape, dtype=bool)
    spread = nearest_spread(results[layer_index])["distinct_nearest"]
    if spread is not None and spread < COLLAPSE_SHARE * results[layer_index].m:
        ids, counts = np.unique(nn, return_counts=True)
        hub = np.isin(nn, ids[counts >= HUB_SIZE])
    return close & (nn >= 0) & ~hub & (agree >= agreement * max(n_layers, 1))


def verdict(copying: dict[str, Any], copies: np.ndarray, n_defined: int) -> dict[str, Any]:
    """One answer from the layers' C_T and the images' own evidence, saying why they differ.

    Args:
        copying: :func:`copying_layers`'s result.
        copies: :func:`likely_copies`'s mask.
        n_defined: number of layers with a defined C_T.

    Returns:
        ``{"copying": bool, "by_layers": bool, "likely_copies": int, "n_images": int,
        "agree": bool, "summary": a sentence}``.
    """
    by_layers = bool(copying["copying"])
    n_copies, m = int(copies.sum()), int(copies.size)
    rule = (f"closer to it than every held-out image of its cell and the same nearest "
            f"training image in at least {COPY_AGREEMENT:.0%} of the layers")
    if by_layers and n_copies:
        summary = (f"Copying: {len(copying['copying'])} of {n_defined} layers have C_T < "
                   f"{copying['threshold']:g}, and {n_copies} of {m} images are likely copies of "
                   f"one training image ({rule}).")
    elif by_layers:
        summary = (f"The set sits close to the training data ({len(copying['copying'])} of "
                   f"{n_defined} layers have C_T < {copying['threshold']:g}), but no image is a "
                   f"likely copy of one training image ({rule}): the generator reproduces "
                   f"the data's look as a whole rather than individual images.")
    elif n_copies:
        summary = (f"{n_copies} of {m} images are likely copies of one training image "
                   f"({rule}), although no layer's C_T is below {copying['threshold']:g}: "
                   f"C_T averages over the whole set, so a few copies among novel images, "
                   f"or copies altered (e.g. by noise) enough to sit farther from T than "
                   f"fresh images in most layers, do not move it. Check the closest pairs.")
    else:
        summary = (f"No sign of copying: no layer's C_T is below {copying['threshold']:g} and "
                   f"no image is a likely copy of one training image ({rule}).")
    return {"copying": by_layers or n_copies > 0, "by_layers": by_layers,
            "likely_copies": n_copies, "n_images": m, "agree": by_layers == (n_copies > 0),
            "summary": summary}


def closest_pairs(
    closeness: dict[str, np.ndarray],
    results: Sequence[CTResult],
    layer_index: int,
    suspect_manifest: Any = None,
    train_manifest: Any = None,
    top: int = defaults.MEMORIZATION_TOP,
    file_status: Callable[[Path, str], str] | None = None,
) -> list[dict[str, Any]]:
    """The generated images closest to a training image, with that training image.

    Ranked by ``p_quantile``, then ``relative_distance``, then distance (smallest first).

    Args:
        closeness: :func:`sample_closeness` of the chosen layer.
        results: every layer's result (with details), to count the layers that agree on
            the same nearest training image.
        layer_index: index of the chosen layer in ``results``.
        suspect_manifest: the generated images' manifest (paths), if known.
        train_manifest: T's manifest (paths), if known.
        top: how many pairs.
        file_status: ``file_status(path, sha256)`` of a training image: ``ok``, ``missing``
            or ``changed`` (None: not checked, ``unknown``).

    Returns:
        One dict per pair: ``rank, index, image, image_sha256, train_index, train_image,
        train_sha256, train_image_status (ok | missing | changed | unknown), cell,
        distance, p_quantile, relative_distance, same_nearest_layers`` (how many layers
        with details name the same nearest training image), ``layers_with_details`` and
        ``likely_copy`` (see :func:`likely_copies`).
    """
    if top < 1:
        raise InputError(f"--top must be at least 1, got {top}")
    q = closeness["p_quantile"]
    ok = np.flatnonzero(np.isfinite(q) & (closeness["nn_index"] >= 0))
    rel = np.where(np.isfinite(closeness["relative_distance"]),
                   closeness["relative_distance"], np.inf)
    order = ok[np.lexsort((closeness["distance"][ok], rel[ok], q[ok]))][:top]
    agree, n_detailed = nearest_agreement(results, layer_index)
    copies = likely_copies(closeness, results, layer_index)
    pairs = []
    for rank, i in enumerate(order, start=1):
        t = int(closeness["nn_index"][i])
        pair: dict[str, Any] = {
            "rank": rank,
            "index": int(i),
            "image": None, "image_sha256": None,
            "train_index": t,
            "train_image": None, "train_sha256": None, "train_image_status": "unknown",
            "cell": int(closeness["cell"][i]),
            "distance": _finite(closeness["distance"][i]),
            "p_quantile": _finite(q[i]),
            "relative_distance": _finite(closeness["relative_distance"][i]),
            "same_nearest_layers": int(agree[i]),
            "layers_with_details": n_detailed,
            "likely_copy": bool(copies[i]),
        }
        if suspect_manifest is not None:
            entry = suspect_manifest.entries[i]
            pair["image"], pair["image_sha256"] = entry.relpath, entry.sha256
        if train_manifest is not None:
            if t >= len(train_manifest.entries):
                raise InputError(f"nearest training index {t} is beyond T's manifest "
                                 f"({len(train_manifest.entries)} images); the stored "
                                 f"manifest does not belong to this baseline")
            entry = train_manifest.entries[t]
            pair["train_image"] = str(train_manifest.path(t))
            pair["train_sha256"] = entry.sha256
            if file_status is not None:
                pair["train_image_status"] = file_status(train_manifest.path(t), entry.sha256)
        pairs.append(pair)
    return pairs


def memorization_report(
    layers: Sequence[str],
    results: Sequence[CTResult],
    layer_baselines: Sequence[Any],
    *,
    suspect_manifest: Any = None,
    train_manifest: Any = None,
    threshold: float = defaults.MEMORIZATION_THRESHOLD,
    top: int = defaults.MEMORIZATION_TOP,
    layer: str | None = None,
    file_status: Callable[[Path, str], str] | None = None,
) -> dict[str, Any]:
    """The whole report as a JSON-ready dict.

    Args:
        layers: layer names.
        results: per layer, the C_T result of the generated images (``details=True``).
        layer_baselines: per layer, the baseline's
            :class:`~forensics.stats.baseline.LayerBaseline` (``Baseline.layers``).
        suspect_manifest: the generated images' manifest, if known.
        train_manifest: T's manifest, if known (else pairs name T indices only).
        threshold: see :func:`copying_layers`.
        top: number of closest pairs.
        layer: layer to rank the images in (default: lowest C_T).
        file_status: how to check each listed training image (see :func:`closest_pairs`).

    Returns:
        ``{"layers": [CTResult dicts with "flagged", "collapsed", "distinct_nearest",
        "top_nearest_share"], "copying": copying_layers(...), "verdict": verdict(...),
        "closest": {"layer", "criterion", "pairs", "train_manifest"}}``.
    """
    if not (len(layers) == len(results) == len(layer_baselines)):
        raise InputError(f"need one result and one baseline layer per layer: {len(layers)} "
                         f"layers, {len(results)} results, {len(layer_baselines)} baselines")
    values = [r.ct for r in results]
    rows = []
    for name, r in zip(layers, results, strict=True):
        d = r.to_dict()
        d.pop("details", None)
        d["layer"] = str(name)
        d.update(nearest_spread(r))
        d["flagged"] = d["ct"] is not None and d["ct"] < threshold
        d["collapsed"] = (d["flagged"] and d["distinct_nearest"] is not None
                          and d["distinct_nearest"] < COLLAPSE_SHARE * d["m"])
        rows.append(d)
    copying = copying_layers(layers, values, threshold,
                             collapsed=[d["layer"] for d in rows if d["collapsed"]])
    k = pick_layer(layers, values, layer)
    closeness = sample_closeness(results[k], layer_baselines[k])
    pairs = closest_pairs(closeness, results, k, suspect_manifest, train_manifest, top,
                          file_status)
    n_defined = int(np.isfinite(np.asarray(values, dtype=np.float64)).sum())
    return {
        "layers": rows,
        "copying": copying,
        "verdict": verdict(copying, likely_copies(closeness, results, k), n_defined),
        "closest": {
            "layer": str(layers[k]),
            "layer_choice": "given" if layer is not None else "lowest C_T",
            "criterion": "share of the cell's held-out images closer to T (p_quantile), "
                         "then distance over the cell's median held-out distance",
            "train_manifest": train_manifest is not None,
            "pairs": pairs,
        },
    }
