"""Which enrolled generator made these images? Rank, calibrate, decide, bootstrap, report."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from forensics import defaults
from forensics.data.embed import DEFAULT_CACHE, Embeddings
from forensics.errors import BankError, InputError
from forensics.plugin import manager
from forensics.stats import fingerprints as fpmod
from forensics.stats.confidence import var_key
from forensics.steps.bank_access import (
    LoadedBaseline,
    PathLike,
    _absolute,
    _absolute_weights,
    load_baseline,
    open_bank,
)
from forensics.steps.curve import (
    _check_tau,
    _embed_suspect,
    _fingerprint_objects,
    _measure,
    _query,
    _vectors,
)
from forensics.threads import _one_thread

if TYPE_CHECKING:
    from forensics.stats.attribution import Attribution



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

    if fp.name == defaults.PAPER_FINGERPRINT:
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
    top: int = defaults.TOP,
    drop_layers: Sequence[int] = defaults.DROP_LAYERS,
    n_boot: int = defaults.N_BOOT,
    seed: int = defaults.SEED,
    quantile: float = defaults.QUANTILE,
    bank: Any = None,
    report: PathLike | None = None,
    tau: float | None = None,
    weights: str | None = None,
    device: str = defaults.DEVICE,
    batch_size: int = defaults.BATCH_SIZE,
    cache_dir: Any = DEFAULT_CACHE,
    progress: bool = False,
    skip_bad: bool = False,
    allow_unverified: bool = False,
) -> Attribution:
    """Which enrolled generator made these images? Answered at two levels, with confidence.

    Model level: every enrolled model (its curves grouped by ``model``) is tested for
    belonging (:mod:`forensics.stats.belonging`); ``decision.consistent`` lists those the
    suspects are consistent with. Family level: the family of the most consistent model,
    or ``unknown`` with the nearest family as ``decision.closest``. ``decision.confidence``
    is the probability that this answer is right (:mod:`forensics.stats.answer_confidence`).

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
        n_boot: bootstrap resamples of the suspect images behind ``stability`` (0: none).
        seed: seed of the resampling.
        quantile: share of genuine suspects accepted to be called unknown: the level of the
            belonging test of every enrolled model, and of the score/margin rule.
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

    # 1. resolve everything once: inputs, bank, baseline, fingerprint, matcher, the test
    seed = check_seed(seed)
    if int(top) < 1 or int(n_boot) < 0 or not 0.0 <= float(quantile) <= 1.0:
        raise InputError(f"need top >= 1, n_boot >= 0 and 0 <= quantile <= 1; got top {top}, "
                         f"n_boot {n_boot}, quantile {quantile}")
    _check_tau(tau)
    b = open_bank(bank)
    all_rows = b.curves()
    if not all_rows:
        raise BankError(f"the bank at {b.path} has no enrolled curves; enroll references "
                        f"first: fp enroll DIR --baseline NAME --model M --family F")
    fp = manager.get("fingerprints", fingerprint or defaults.FINGERPRINT)
    device = resolve_device(device)
    loaded = load_baseline(_pick_baseline(b, all_rows, baseline), bank=b, device=device,
                           allow_unverified=allow_unverified)
    same = [r for r in all_rows if r["baseline_id"] == loaded.row["baseline_id"]]
    forged = modified_rows("curves", same)
    if forged and not allow_unverified:
        raise BankError(unverified_message(forged, b.path))
    unverified = loaded.unverified + [dataclasses.asdict(p) for p in forged]
    _fingerprint_objects([fp.name], loaded, strict=True)
    belong_fps, _ = _fingerprint_objects([defaults.BELONG_FINGERPRINT], loaded, strict=False)
    drop = tuple(int(i) for i in drop_layers)
    keep = keep_mask(len(loaded.row["layers"]), drop)
    mname, mobj = manager.resolve_matcher(
        fp, matcher, [d for d, k in zip(loaded.dims, keep, strict=True) if k])
    weights = _absolute_weights(weights)
    # 2. embed
    emb = _embed_suspect(loaded, folder, weights=weights, device=device, batch_size=batch_size,
                         cache_dir=cache_dir, progress=progress, skip_bad=skip_bad)
    settings = {"tau": tau, "weights": weights, "device": device, "batch_size": int(batch_size),
                "skip_bad": bool(skip_bad), "allow_unverified": bool(allow_unverified)}
    plan = _Plan(b, all_rows, same, loaded, fp, mname, mobj, drop, keep,
                 belong_fps[0] if belong_fps else None)
    with _one_thread():
        return _attribute(plan, emb, folder, top=top, n_boot=n_boot, seed=seed,
                          quantile=quantile, report=report, tau=tau, settings=settings,
                          unverified=unverified)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one attribution was resolved to before any image is embedded."""

    bank: Any
    all_rows: list[dict[str, Any]]
    rows: list[dict[str, Any]]  # the curves of the suspect's baseline
    loaded: LoadedBaseline
    fp: Any
    matcher_name: str
    matcher: Any
    drop: tuple[int, ...]
    keep: np.ndarray
    belong_fp: Any  # whose per-image rows the belonging test reads (None: not available)


def _belonging(plan: _Plan, suspect_rows: np.ndarray | None, alpha: float,
               seed: int) -> tuple[list[Any], Any, str]:
    """One belonging test per enrolled model (curves grouped by model), the calibration of
    the answer's confidence at the suspect's size, and a note."""
    from forensics.stats import belonging as bt
    from refbank.bank import curve_fingerprints

    if plan.belong_fp is None or suspect_rows is None:
        return [], None, (f"the baseline has no {defaults.BELONG_FINGERPRINT!r} arrays: no "
                          f"belonging test (rebuild the baseline to enable it)")
    key = bt.rows_key(plan.belong_fp.name)
    by_model: dict[str, list[np.ndarray]] = {}
    family: dict[str, str] = {}
    lacking = 0
    for r in plan.rows:
        family.setdefault(r["model"], r["family"])
        stored = curve_fingerprints(r).get(key)
        if stored is None:
            lacking += 1
            by_model.setdefault(r["model"], [])
            continue
        by_model.setdefault(r["model"], []).append(bt.unpack_rows(stored, int(r["n_images"])))
    tests, models, nulls = [], {}, {}
    n = len(bt.subset(len(suspect_rows), seed))
    for model in sorted(by_model):
        curves = [c for c in by_model[model] if c.shape[1] == suspect_rows.shape[1]]
        if not curves:
            continue
        models[model] = bt.ModelRows(curves)
        nulls[model] = bt.null(models[model], n, kind=defaults.BELONG_KIND, seed=seed)
        tests.append(bt.test(models[model], suspect_rows, name=model, family=family[model],
                             alpha=alpha, kind=defaults.BELONG_KIND, seed=seed,
                             null_values=nulls[model]))
    calibration = None
    if any(v.size for v in nulls.values()):
        from forensics.stats.answer_confidence import calibrate

        calibration = calibrate(models, family, n, alpha=alpha, kind=defaults.BELONG_KIND,
                                nulls=nulls, seed=seed)
    tests.sort(key=lambda t: (-(t.p_value if t.p_value is not None else -1.0), t.model))
    note = (f"belonging: {defaults.BELONG_KIND} two-sample test of the suspect's "
            f"{plan.belong_fp.name} per-image rows against each enrolled model's, null from "
            f"its own curves (leave-one-curve-out) at the suspect's size, level {alpha:g}")
    if lacking:
        note += (f"; {lacking} curve(s) enrolled without per-image rows are left out of it "
                 f"(re-enroll them)")
    if not any(t.p_value is not None for t in tests):
        note += "; no model has two curves with rows (enroll --per-curve to split a folder)"
    return tests, calibration, note


def _attribute(plan: _Plan, emb: Embeddings, folder: Any, *, top: int, n_boot: int,
               seed: int, quantile: float, report: PathLike | None, tau: float | None,
               settings: dict[str, Any], unverified: list[dict[str, str]]) -> Attribution:
    from forensics.stats.attribution import (
        Attribution,
        bootstrap_confidence,
        calibrate_unknown,
        comparable_references,
        decide,
        decide_belonging,
        rank,
    )
    from forensics.steps.case import custody_record

    b, loaded, fp, mobj = plan.bank, plan.loaded, plan.fp, plan.matcher
    where = f" in the bank at {b.path}"
    folder_str = None if isinstance(folder, Embeddings) else str(_absolute(folder))
    # 3. vectors: the suspect's fingerprint and per-image rows, the bank's vectors
    fps = [fp] + ([plan.belong_fp] if plan.belong_fp is not None
                  and plan.belong_fp.name != fp.name else [])
    res = _measure(loaded, emb, np.arange(len(emb)), tau=tau, details=False, fps=fps,
                   what=folder_str or "the embeddings", folder=folder_str, spreads=True)
    names = {r["baseline_id"]: r["name"] for r in b.baselines()}
    refs, meta = comparable_references(res.curve, plan.all_rows, bank=str(b.path),
                                       baseline_names=names)
    ref_vecs = _reference_vectors(fp, plan.rows, refs, where)
    dims = loaded.dims
    mask = fpmod.entry_mask(fp, dims, plan.keep)
    if mask.shape[0] != ref_vecs.shape[1]:
        raise BankError(f"enrolled {fp.name!r} fingerprints have {ref_vecs.shape[1]} values "
                        f"but the suspect's has {mask.shape[0]}; re-enroll them with this fp")
    query, R = res.fingerprints[fp.name][mask], ref_vecs[:, mask]
    # 4. belonging: one calibrated test per enrolled model
    suspect_rows = (res.image_rows.get(plan.belong_fp.name)
                    if plan.belong_fp is not None else None)
    tests, answer_cal, belong_note = _belonging(plan, suspect_rows, quantile, seed)
    # 5. ranking, and the score/margin rule
    ranking = rank(query, R, meta, mobj, drop_layers=())
    calibration = calibrate_unknown(R, [m["family"] for m in meta], mobj, (), quantile)
    calibration = dataclasses.replace(calibration, matcher=plan.matcher_name,
                                      drop_layers=plan.drop)
    model = _confidence_model(fp, plan.rows, R, mask, meta, mobj, quantile, seed)
    if model is not None:
        calibration = dataclasses.replace(
            calibration, threshold=model.threshold(len(emb)), confidence=model.to_dict(),
            margin_threshold=model.margin_threshold(len(emb)),
            note=(f"threshold = {quantile:g}-quantile of the best scores of suspects of "
                  f"{len(emb)} images simulated from the bank ({model.note})"))
    # 6. decision: model level (belonging), family level, confidence
    rule = decide(ranking, calibration)
    testable = any(t.p_value is not None for t in tests)
    if testable:
        decision = decide_belonging(ranking, tests, quantile,
                                    gate=rule if defaults.BELONG_GATE else None)
    else:
        decision = dataclasses.replace(rule, closest=rule.nearest_family if rule.unknown
                                       else None, reason=f"{rule.reason} ({belong_note})")
    if answer_cal is not None:  # the two-level answer: calibrated on the bank's models
        decision = dataclasses.replace(decision, confidence=answer_cal.probability(
            decision.unknown, decision.consistent[0]["p_value"] if decision.consistent
            else None, len({c["family"] for c in decision.consistent})))
        calibration = dataclasses.replace(calibration, answer=answer_cal.to_dict())
    elif model is not None and not decision.unknown:
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
                                    calibration=calibration, decision=rule)
        decision = dataclasses.replace(decision, stability=boot.confidence,
                                       model_stability=boot.model_confidence)
    # 7. report
    parameters = {
        "fingerprint": fp.name, "matcher": plan.matcher_name, "drop_layers": list(plan.drop),
        "top": int(top), "quantile": quantile, "n_boot": n_boot if boot is not None else 0,
        "seed": int(seed), "bank": str(b.path), "baseline": loaded.name,
        "n_references": len(meta), "belonging": belong_note, **settings,
    }
    custody = custody_record(bank=b, loaded=loaded, manifest=emb.manifest, folder=folder_str,
                             rows=plan.rows, unverified=unverified)
    result = Attribution(decision, ranking[: max(int(top), 1)], calibration, res.curve, boot,
                         parameters, custody, belonging=tests)
    if report is not None:
        from forensics.steps.reports import Evidence, write_report

        evidence = Evidence(vector=query, bank_vectors=R,
                            bank_ids=[str(m["curve_id"]) for m in meta],
                            entry_layers=fpmod.entry_layers(fp, dims)[mask],
                            manifest=emb.manifest, baseline=loaded.row)
        write_report(report, result, plan.rows, evidence=evidence)
    return result
