"""How well do curves identify their generator family? (the paper's Table 1 protocol)

Each query vector is matched to its nearest enrolled vector; the query is correct when
that vector's family is the query's family. Two protocols:

``split``
    The paper's: every ``query``-tagged vector against the ``enroll``-tagged ones.
``loo``
    Leave-one-out: every vector against all the others, whatever their tags.

The rule follows the authors' ``fingerprint.py`` (repository ``JackHe313/LayerChoice``):
NaN values become 0, the first value of each curve is dropped (``drop_layers=(0,)``),
the nearest vector is the one with the highest matcher score, and on a tie the first in
input order wins (their loop keeps the first maximum). Accuracy is correct / queries;
the paper prints it truncated to three decimals (4/6 appears as 0.666), given here as
``accuracy_3dp``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from forensics import defaults
from forensics.data.curvefiles import SPLITS
from forensics.errors import InputError, InsufficientDataError

PROTOCOLS = ("split", "loo")


def resolve_matchers(matchers: str | Iterable[Any]) -> list[Any]:
    """Turn names (or ``"all"``) and matcher objects into matcher objects.

    Args:
        matchers: ``"all"`` (every registered matcher), one name, or an iterable of
            names and/or objects with ``.name`` and ``.score(query, refs)``.

    Raises:
        UnknownNameError: a name is not a registered matcher (the message lists them).
        InputError: no matcher, or two with the same name.
    """
    from forensics.plugin import manager as plugins

    if isinstance(matchers, str):
        matchers = [matchers]
    resolved = []
    for m in matchers:
        if m == "all":
            resolved.extend(plugins.get("matchers", n) for n in plugins.names("matchers"))
        elif isinstance(m, str):
            resolved.append(plugins.get("matchers", m))
        else:
            resolved.append(m)
    names = [m.name for m in resolved]
    if not names:
        raise InputError("no matcher given; choose one or more of: "
                         + ", ".join(defaults.PAPER_MATCHERS))
    if len(set(names)) != len(names):
        raise InputError(f"matchers must have distinct names, got {names}")
    return resolved


def prepare_vectors(vectors: np.ndarray, drop_layers: Sequence[int] = (0,)) -> np.ndarray:
    """The vectors as the paper matches them: NaN -> 0, columns ``drop_layers`` removed.

    Raises:
        InputError: ``vectors`` is not 2-D, or a dropped index is out of range, or no
            column would remain.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"vectors must be a 2-D array (curves x layers), got shape {x.shape}")
    n_layers = x.shape[1]
    drop = set()
    for i in drop_layers:
        if not -n_layers <= int(i) < n_layers:
            raise InputError(
                f"drop_layers index {i} is out of range for curves of {n_layers} values"
            )
        drop.add(int(i) % n_layers)
    keep = [i for i in range(n_layers) if i not in drop]
    if not keep:
        raise InputError("drop_layers removes every value of the curves; drop fewer")
    return np.nan_to_num(x[:, keep], nan=0.0)


def _pairs(protocol: str, splits: Sequence[str] | None, n: int) -> list[tuple[int, np.ndarray]]:
    """(query index, enrolled indices) for each query of the protocol."""
    if protocol == "loo":
        if n < 2:
            raise InsufficientDataError("leave-one-out needs at least 2 curves")
        everyone = np.arange(n)
        return [(i, np.delete(everyone, i)) for i in range(n)]
    if splits is None:
        raise InputError("the split protocol needs a split tag per curve; or use protocol 'loo'")
    tags = list(splits)
    bad = sorted({repr(t) for t in tags if t not in SPLITS})
    if bad:
        raise InputError(f"unknown split tags {', '.join(bad)}; use {' or '.join(SPLITS)}")
    queries = [i for i, t in enumerate(tags) if t == "query"]
    refs = np.array([i for i, t in enumerate(tags) if t == "enroll"], dtype=np.int64)
    if not queries or refs.size == 0:
        raise InsufficientDataError(
            f"the split protocol needs query and enroll curves; got {len(queries)} query and "
            f"{refs.size} enroll. Tag some curves, or use protocol 'loo'"
        )
    return [(i, refs) for i in queries]


def truncate3(correct: int, total: int) -> float:
    """``correct / total`` truncated (not rounded) to three decimals, as the paper prints it.

    Integer arithmetic, so 4/6 gives 0.666 and 29/100 gives 0.29 exactly.
    """
    return (1000 * int(correct) // int(total)) / 1000


def confusion(true: Sequence[str], pred: Sequence[str]) -> dict[str, list]:
    """Confusion matrix: ``matrix[i][j]`` = queries of ``labels[i]`` predicted ``labels[j]``.

    Labels are the sorted union of true and predicted families.
    """
    labels = sorted(set(true) | set(pred))
    index = {label: k for k, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, pred, strict=True):
        matrix[index[t]][index[p]] += 1
    return {"labels": labels, "matrix": matrix}


def bootstrap_ci(
    correct: np.ndarray, resamples: np.ndarray | None, level: float = 0.95
) -> dict[str, Any] | None:
    """Percentile bootstrap interval of the accuracy, resampling queries with replacement."""
    if resamples is None:
        return None
    accs = correct[resamples].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(accs, [tail, 100.0 - tail])
    return {"low": float(low), "high": float(high), "level": level}


def _predict(
    matcher: Any,
    x: np.ndarray,
    pairs: list[tuple[int, np.ndarray]],
    fam: list[str],
    labels: list[str],
) -> list[dict[str, Any]]:
    """Nearest enrolled row of each query: highest score, first one on a tie, NaN never wins."""
    predictions = []
    for i, refs in pairs:
        scores = np.asarray(matcher.score(x[i], x[refs]), dtype=np.float64).reshape(-1)
        if scores.shape[0] != refs.size:
            raise InputError(
                f"matcher {matcher.name!r} returned {scores.shape[0]} scores for "
                f"{refs.size} enrolled vectors"
            )
        scores = np.where(np.isnan(scores), -np.inf, scores)
        k = int(np.argmax(scores))
        best = int(refs[k])
        predictions.append(
            {
                "query": labels[i],
                "family": fam[i],
                "predicted": fam[best],
                "matched": labels[best],
                "score": float(scores[k]) if np.isfinite(scores[k]) else None,
                "correct": fam[best] == fam[i],
            }
        )
    return predictions


def evaluate(
    vectors: np.ndarray,
    families: Sequence[str],
    splits: Sequence[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    matchers: str | Iterable[Any] = defaults.PAPER_MATCHERS,
    protocol: str = "split",
    drop_layers: Sequence[int] = (0,),
    n_boot: int = defaults.EVALUATE_N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Accuracy of nearest-vector family identification, per matcher.

    Args:
        vectors: ``(N, L)`` curves (or any per-set vectors), one row per image set.
        families: family (generator) of each row.
        splits: ``"enroll"`` or ``"query"`` per row; needed by the ``split`` protocol.
        names: a label per row for the predictions (default ``"0"``, ``"1"``, ...).
        matchers: registered matcher names, ``"all"``, or matcher objects
            (``.name``, ``.score(query, refs)`` with higher = closer).
        protocol: ``"split"`` (query vs enrolled) or ``"loo"`` (leave-one-out).
        drop_layers: column indices removed before matching; ``(0,)`` is the paper's rule.
        n_boot: bootstrap resamples of the queries for the interval (0: none).
        seed: seed of the bootstrap resampling (the same resamples serve every matcher).
        level: confidence level of the interval.

    Returns:
        A JSON-ready dict: ``protocol``, counts, ``drop_layers``, ``bootstrap`` settings and
        ``matchers: {name: {accuracy, accuracy_3dp, correct, total, ci, confusion,
        predictions}}``; each prediction names the query, its family, the predicted
        family, the matched row and its score.

    Raises:
        InputError: inconsistent lengths, unknown protocol or split tags, bad arguments.
        InsufficientDataError: no query or no enrolled vector.
        UnknownNameError: an unknown matcher name.
    """
    from forensics.stats.ct import check_n_boot, check_seed

    seed = check_seed(seed)
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    n_boot = check_n_boot(n_boot)
    if not 0.0 < level < 1.0:
        raise InputError(f"level must be within (0, 1), got {level}")
    x = prepare_vectors(vectors, drop_layers)
    n = x.shape[0]
    fam = [str(f) for f in families]
    labels = [str(s) for s in names] if names is not None else [str(i) for i in range(n)]
    for what, seq in (("families", fam), ("names", labels), ("splits", splits)):
        if seq is not None and len(seq) != n:
            raise InputError(f"{what} has {len(seq)} entries but there are {n} vectors")
    pairs = _pairs(protocol, splits, n)
    objs = resolve_matchers(matchers)

    n_q = len(pairs)
    resamples = None
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        resamples = rng.integers(0, n_q, size=(n_boot, n_q))

    enrolled_families = sorted({fam[j] for _, refs in pairs for j in refs})
    result: dict[str, Any] = {
        "protocol": protocol,
        "n_vectors": n,
        "n_queries": n_q,
        "n_enrolled": len({int(j) for _, refs in pairs for j in refs}),
        "n_values_used": int(x.shape[1]),
        "drop_layers": sorted({int(i) % np.asarray(vectors).shape[1] for i in drop_layers}),
        "families": sorted(set(fam)),
        "unenrolled_query_families": sorted({fam[i] for i, _ in pairs} - set(enrolled_families)),
        "bootstrap": {
            "n_boot": n_boot,
            "seed": seed,
            "level": level,
            "method": "percentile, queries resampled with replacement",
        },
        "tie_rule": "first maximum in input order",
        "matchers": {},
    }
    for matcher in objs:
        predictions = _predict(matcher, x, pairs, fam, labels)
        correct = np.array([p["correct"] for p in predictions], dtype=np.float64)
        n_correct = int(correct.sum())
        accuracy = n_correct / n_q
        result["matchers"][matcher.name] = {
            "accuracy": accuracy,
            "accuracy_3dp": truncate3(n_correct, n_q),
            "correct": n_correct,
            "total": n_q,
            "ci": bootstrap_ci(correct, resamples, level),
            "confusion": confusion(
                [p["family"] for p in predictions], [p["predicted"] for p in predictions]
            ),
            "predictions": predictions,
        }
    return result


def evaluate_curves(curves: Sequence[dict], **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate` on curve dicts.

    As :func:`forensics.data.curvefiles.read_layerchoice` returns them.

    Each dict needs ``values``, ``family`` and ``split``; ``model`` or ``name`` labels the
    predictions. Keyword arguments go to :func:`evaluate`.

    Raises:
        InputError: no curves, or curves of different lengths.
    """
    if not curves:
        raise InputError("no curves to evaluate; import some first")
    lengths = {np.asarray(c["values"]).size for c in curves}
    if len(lengths) != 1:
        raise InputError(
            f"curves have different numbers of values {sorted(lengths)}; evaluate curves of "
            f"one encoder and layer set at a time"
        )
    vectors = np.stack([np.asarray(c["values"], dtype=np.float64) for c in curves])
    return evaluate(
        vectors,
        [c["family"] for c in curves],
        [c.get("split") for c in curves],
        names=[c.get("model", c.get("name", str(i))) for i, c in enumerate(curves)],
        **kwargs,
    )


# -- curves of a bank ---------------------------------------------------------------------


def select_curves(bank: Any, baseline: str | None = None) -> tuple[dict[str, Any], list[dict]]:
    """The curve rows of one baseline of ``bank``, and that baseline's row.

    Curves of different baselines (other encoders, layers, reference data, or curves
    imported from elsewhere) are never evaluated together.

    Args:
        bank: a :class:`refbank.Bank`.
        baseline: baseline name or id; ``None``: the one baseline that has curves.

    Raises:
        BankError: no such baseline; or no name given and the curves belong to several
            baselines (the message lists them with their curve counts).
        InsufficientDataError: the baseline has no curves.
    """
    from forensics.errors import BankError

    if baseline:
        row = bank.get_baseline(baseline)
        curves = bank.curves(baseline_id=row["baseline_id"])
        if not curves:
            raise InsufficientDataError(
                f"baseline {row['name']!r} in {bank.path} has no curves; enroll some "
                f"(fp enroll) or import some (fp bank import-curves)"
            )
        return row, curves
    curves = bank.curves()
    if not curves:
        raise InsufficientDataError(
            f"the bank at {bank.path} has no curves; enroll some (fp enroll) or import "
            f"some (fp bank import-curves FILE --format layerchoice)"
        )
    counts: dict[str, int] = {}
    for c in curves:
        counts[c["baseline_id"]] = counts.get(c["baseline_id"], 0) + 1
    names = {b["baseline_id"]: b["name"] for b in bank.baselines()}
    if len(counts) > 1:
        listed = ", ".join(f"{names.get(b, b)} ({n} curves)" for b, n in sorted(
            counts.items(), key=lambda kv: names.get(kv[0], kv[0])))
        raise BankError(
            f"the curves in {bank.path} belong to several baselines: {listed}; choose one "
            f"with --baseline NAME (curves of different baselines are not comparable)"
        )
    (bid,) = counts
    return bank.get_baseline(bid), curves


def _layer_dims(bank: Any, base: dict[str, Any]) -> list[int]:
    """Embedding size of each layer of a baseline, from its stored ``meta.json``.

    A baseline without engine files (curves imported from files) gives ones: only the
    paper's fingerprint, one value per layer, can be evaluated there.
    """
    import json

    from forensics.stats.baseline import META_FILE

    try:
        meta = json.loads((bank.baseline_dir(base["baseline_id"]) / META_FILE).read_text())
        return [int(lm["dim"]) for lm in meta["layers"]]
    except (OSError, ValueError, KeyError, TypeError):
        return [1] * len(base["layers"])


def fingerprint_matchers(fp: Any, matchers: str | Iterable[Any] | None,
                         kept_dims: Sequence[int]) -> list[Any]:
    """The matcher objects for ``fp``'s vectors of the kept layers.

    Args:
        fp: a fingerprint object.
        matchers: names, ``"all"`` (every registered matcher), or matcher objects; None:
            the paper's three for the paper's fingerprint, else ``fp``'s default matcher.
        kept_dims: embedding size of each kept layer.

    Returns:
        One object per name: the fingerprint's own rule where it has one (e.g. the
        authors' rule for ``setstats``), else the matcher plugin.
    """
    from forensics.plugin import manager as plugins

    if matchers is None:
        matchers = (list(defaults.PAPER_MATCHERS) if fp.name == defaults.PAPER_FINGERPRINT
                    else [getattr(fp, "default_matcher", None) or defaults.MATCHER])
    if isinstance(matchers, str):
        matchers = [matchers]
    names: list[Any] = []
    for m in matchers:
        names.extend(plugins.names("matchers") if m == "all" else [m])
    return resolve_matchers([plugins.resolve_matcher(fp, m, kept_dims)[1] if isinstance(m, str)
                             else m for m in names])


def evaluate_bank(
    bank: Any = None,
    baseline: str | None = None,
    *,
    fingerprint: str | None = None,
    matchers: str | Iterable[Any] | None = None,
    protocol: str = "split",
    drop_layers: Sequence[int] = (0,),
    n_boot: int = defaults.EVALUATE_N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """:func:`evaluate` on the stored vectors of one baseline of a bank, with the paper's
    baseline method (mean/std/FID, see :mod:`forensics.stats.setstats`) side by side where the
    curves carry it.

    Args:
        bank: a :class:`refbank.Bank`, a bank folder, or None (``FP_BANK`` or the
            default bank).
        baseline: see :func:`select_curves`.
        fingerprint: the vectors matched: a registered fingerprint (None: fp's default,
            ``resid-early``; ``paper``: the C_T-layer curves, as in the paper's Table 1).
        matchers: see :func:`fingerprint_matchers`.
        protocol, drop_layers, n_boot, seed, level: as in :func:`evaluate`;
            ``drop_layers`` are layer indices (their entries of the vector are left out).

    Returns:
        :func:`evaluate`'s dict (``matchers`` holds the fingerprint's results), plus
        ``fingerprint``, ``baseline`` (name, id, encoder, number of layers), ``method``
        and ``comparison``: ``{"setstats": {"available": bool, "reason" | "matchers": ...}}``.

    Raises:
        BankError: as :func:`select_curves`, or curves that lack the fingerprint.
        UnknownNameError: an unknown fingerprint or matcher.
    """
    from forensics.plugin import manager as plugins
    from forensics.stats import fingerprints as fpmod
    from forensics.stats.attribution import keep_mask
    from forensics.stats.ct import check_n_boot
    from forensics.steps.attribute import _reference_vectors, refuse_undefined_ct
    from forensics.steps.bank_access import open_bank

    check_n_boot(n_boot)  # before anything is read
    fp = plugins.get("fingerprints", fingerprint or defaults.FINGERPRINT)
    bank = open_bank(bank)
    base, rows = select_curves(bank, baseline)
    n_layers = len(base["layers"])
    keep = keep_mask(n_layers, drop_layers)
    dims = _layer_dims(bank, base)
    objs = fingerprint_matchers(fp, matchers, [d for d, k in zip(dims, keep, strict=True) if k])
    kw: dict[str, Any] = {"matchers": objs, "protocol": protocol, "n_boot": n_boot,
                          "seed": seed, "level": level}
    if fp.name == defaults.PAPER_FINGERPRINT:
        refuse_undefined_ct(fp, rows, f" of baseline {base['name']!r}")
        result = evaluate_curves(rows, drop_layers=drop_layers, **kw)
    else:
        vectors = _reference_vectors(fp, rows, np.empty((0, 0)), f" of baseline {base['name']!r}")
        mask = fpmod.entry_mask(fp, dims, keep)
        if mask.shape[0] != vectors.shape[1]:
            raise InputError(f"the stored {fp.name!r} vectors have {vectors.shape[1]} values "
                             f"but baseline {base['name']!r} gives {mask.shape[0]}; re-enroll")
        result = evaluate(vectors[:, mask], [r["family"] for r in rows],
                          [r.get("split") for r in rows], names=[r["model"] for r in rows],
                          drop_layers=(), **kw)
        result["drop_layers"] = [i for i in range(n_layers) if not keep[i]]
    names = list(result["matchers"])
    out: dict[str, Any] = {
        "baseline": {"name": base["name"], "baseline_id": base["baseline_id"],
                     "encoder": base["encoder"], "n_layers": n_layers},
        "fingerprint": fp.name,
        "method": ("C_T-layer curves" if fp.name == defaults.PAPER_FINGERPRINT
                   else f"fingerprint {fp.name}: {getattr(fp, 'description', '')}".rstrip(": ")),
        **result,
    }
    out["comparison"] = {
        SETSTATS: setstats_comparison(rows, names, protocol=protocol, n_boot=n_boot,
                                      seed=seed, level=level)
    }
    return out


#: Name of the fingerprint holding the paper's mean/std/FID baseline vector.
SETSTATS = defaults.SETSTATS_FINGERPRINT


def _unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def setstats_comparison(
    rows: Sequence[dict],
    matcher_names: Sequence[str],
    *,
    protocol: str = "split",
    n_boot: int = defaults.EVALUATE_N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """The paper's baseline method on the same curves: their stored ``setstats`` vectors.

    Each curve enrolled by ``fp`` stores, besides its C_T values, the set's per-layer
    feature mean, std and FID against T (``fingerprints_json``, see
    :mod:`forensics.stats.setstats`). They are matched with the authors' rule for ``l2`` /
    ``cosine`` / ``combined`` over every layer (the authors drop nothing here), with the
    same protocol, splits and bootstrap seed as the curves.

    Returns:
        ``{"available": True, "method", "matchers": {...}, "skipped_matchers"}`` (as in
        :func:`evaluate`), or ``{"available": False, "reason"}`` when some curve has no
        such vector (e.g. curves imported from files), or the vectors disagree in length.
    """
    from forensics.stats.setstats import BaselineMatcher, baseline_matchers
    from refbank.bank import curve_fingerprints

    vectors, missing = [], []
    for row in rows:
        vec = curve_fingerprints(row).get(SETSTATS)
        if vec is None:
            missing.append(row["model"])
        else:
            vectors.append(np.asarray(vec, dtype=np.float64))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        return _unavailable(
            f"{len(missing)} of {len(rows)} curves carry no {SETSTATS!r} vector ({shown}): "
            f"curves imported from files, or enrolled without it, have only their C_T "
            f"values; enroll image folders with fp enroll to compare with the paper's "
            f"mean/std/FID baseline"
        )
    widths = {v.size for v in vectors}
    n_layers = len(rows[0]["layers"])
    width = vectors[0].size
    if len(widths) != 1 or (width - n_layers) <= 0 or (width - n_layers) % 2:
        return _unavailable(
            f"the {SETSTATS!r} vectors have lengths {sorted(widths)}, which do not fit the "
            f"layout [means, stds, FIDs] of {n_layers} layers"
        )
    dim = (width - n_layers) // 2
    paper = {m.name: m for m in baseline_matchers([1])}
    objs = [BaselineMatcher(n, paper[n].alpha, dim, n_layers, paper[n].description)
            for n in matcher_names if n in paper]
    skipped = [n for n in matcher_names if n not in paper]
    if not objs:
        return _unavailable(
            f"the paper's baseline method is defined for the matchers "
            f"{', '.join(paper)}; none of them was asked for"
        )
    result = evaluate(
        np.stack(vectors), [r["family"] for r in rows], [r.get("split") for r in rows],
        names=[r["model"] for r in rows], matchers=objs, protocol=protocol, drop_layers=(),
        n_boot=n_boot, seed=seed, level=level,
    )
    return {
        "available": True,
        "method": "feature mean, std and FID against T per layer (the paper's baseline)",
        "vector_length": width,
        "skipped_matchers": skipped,
        "matchers": result["matchers"],
    }
