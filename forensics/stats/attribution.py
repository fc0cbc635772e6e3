"""Curve vs bank: a ranked, calibrated answer to "which enrolled generator made this?".

Everything here is a pure function of arrays and small dicts; the pipeline supplies the
suspect curve, the bank's rows and, for the confidence, a function that recomputes the
curve on a subset of the suspect images::

    refs, meta = comparable_references(curve, bank.curves())      # refuse mismatches
    ranking = rank(curve.values, refs, meta, matcher, drop_layers=(0,))   # a Matcher object
    calib = calibrate_unknown(refs, [m["family"] for m in meta], matcher)
    decision = decide(ranking, calib)                              # nearest, or unknown
    boot = bootstrap_confidence(curve_fn, n_images, n_boot=100, seed=0, ...)

:func:`forensics.steps.attribute.attribute` runs these steps and returns an
:class:`Attribution` whose ``to_dict()`` is the JSON of ``fp attribute --json``.

**Unknown.** A new curve of an enrolled family resembles the other curves of its family;
the bank shows how much: for every enrolled curve whose family has at least two curves,
its *within-family score* is its best matcher score against the other curves of its own
family, ranked against the bank without it (leave-one-out). The threshold is the
``quantile`` (default 0.05) of these scores. A suspect whose best score is below it is
``unknown``: by construction about a ``quantile`` share of genuine new curves of enrolled
families would be called unknown too, while a generator unlike every enrolled family is
not forced onto the nearest one.

**Stability.** The suspect images are resampled ``n_boot`` times (with replacement, the
same number of images; seeded); each resample's curve is ranked and decided like the
original. ``stability`` is the share of resamples whose decision (family, or unknown)
equals the decision on all images; ``model_stability`` the same for the model. It
describes the images given, not the generator: a calibrated probability that the
decision is right (``confidence``) comes from :mod:`forensics.stats.confidence`, for
fingerprints with per-image vectors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from forensics import defaults
from forensics.errors import BankError, InputError

MIN_WITHIN = 3


@dataclass(frozen=True)
class Match:
    """One enrolled curve and its score against the suspect (higher is closer)."""

    rank: int
    curve_id: str
    model: str
    family: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Calibration:
    """The ``unknown`` threshold and the bank statistics behind it.

    ``threshold`` is None when no family has enough curves to calibrate (then nothing
    is called unknown and ``note`` says why). ``margin_threshold``, where set (by the
    bank's simulated suspects, :mod:`forensics.stats.confidence`), also calls unknown a
    suspect whose best family leads the next one by less.
    """

    matcher: str
    drop_layers: tuple[int, ...]
    quantile: float
    threshold: float | None
    n_within: int
    within_min: float | None = None
    within_median: float | None = None
    between_median: float | None = None
    between_above: float | None = None
    note: str = ""
    confidence: dict[str, Any] | None = None
    margin_threshold: float | None = None
    answer: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["drop_layers"] = list(self.drop_layers)
        return d


@dataclass(frozen=True)
class Decision:
    """The answer: a family and model, or ``unknown``; and how sure."""

    family: str | None
    model: str | None
    unknown: bool
    score: float
    threshold: float | None
    nearest_family: str
    nearest_model: str
    nearest_curve_id: str
    reason: str
    confidence: float | None = None
    model_confidence: float | None = None
    stability: float | None = None
    model_stability: float | None = None
    consistent: list[dict[str, Any]] = field(default_factory=list)
    closest: str | None = None
    alpha: float | None = None
    #: No like-with-like comparison was possible (the suspects' storage condition has no
    #: enrolled curves): unknown, with the reason, never a family.
    inconclusive: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def model_level(self) -> str:
        """The model level in words: the consistent models with their p-values, or none."""
        return ", ".join(f"{c['model']} (p {c['p_value']:.2f})" for c in self.consistent) \
            or "none consistent"

    def family_level(self) -> str:
        """The family level in words: the family, ``unknown (closest: F)`` or
        ``INCONCLUSIVE``."""
        if self.inconclusive:
            return "INCONCLUSIVE"
        if self.unknown:
            return f"unknown (closest: {self.closest or self.nearest_family})"
        return str(self.family)


@dataclass(frozen=True)
class Bootstrap:
    """How stable the decision is under resampling of the suspect images."""

    confidence: float
    model_confidence: float
    n_boot: int
    seed: int
    replace: bool
    fraction: float
    outcomes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class Attribution:
    """Everything ``fp attribute`` reports."""

    decision: Decision
    ranking: list[Match]
    calibration: Calibration
    curve: Any  # forensics.stats.curve.Curve
    bootstrap: Bootstrap | None
    parameters: dict[str, Any]
    custody: dict[str, Any] | None = None  # see forensics.steps.case.custody_record
    belonging: list[Any] = field(default_factory=list)  # forensics.stats.belonging.Belonging
    #: How the suspect images were stored (``suspect``, forensics.steps.storage), which
    #: curves they were compared with, and where their storage differs from those curves'
    #: (``mismatch``: sentences); None for embeddings.
    conditions: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``fp attribute --json``."""
        curve = self.curve.to_dict()
        provenance = dict(curve.pop("provenance"))
        provenance["attribution"] = self.parameters
        if self.custody is not None:
            provenance["custody"] = self.custody
        return {
            "decision": self.decision.to_dict(),
            "ranking": [m.to_dict() for m in self.ranking],
            "curve": curve,
            "calibration": self.calibration.to_dict(),
            "bootstrap": self.bootstrap.to_dict() if self.bootstrap else None,
            "belonging": [t.to_dict() for t in self.belonging],
            "conditions": self.conditions,
            "provenance": provenance,
        }


# -- layers and matchers -----------------------------------------------------------------


def keep_mask(n_layers: int, drop_layers: Sequence[int] = defaults.DROP_LAYERS) -> np.ndarray:
    """Boolean mask of the layers used for matching.

    Args:
        n_layers: number of layers in a curve.
        drop_layers: indices to leave out, counted from 0.

    Raises:
        InputError: an index is negative or out of range, or every layer would be dropped.
    """
    mask = np.ones(n_layers, dtype=bool)
    for i in drop_layers:
        if not 0 <= int(i) < n_layers:
            raise InputError(
                f"cannot drop layer {i}: curves have {n_layers} layers (indices 0..{n_layers - 1})"
            )
        mask[int(i)] = False
    if not mask.any():
        raise InputError(f"dropping layers {list(drop_layers)} leaves no layer to match on")
    return mask


def _matcher_name(matcher: Any) -> str:
    return getattr(matcher, "name", repr(matcher))


def _scores(m: Any, query: np.ndarray, refs: np.ndarray) -> np.ndarray:
    return np.asarray(m.score(query, refs), dtype=np.float64).reshape(-1)


def _check_finite(query: np.ndarray, refs: np.ndarray, meta: Sequence[dict]) -> None:
    if not np.isfinite(query).all():
        bad = np.flatnonzero(~np.isfinite(query)).tolist()
        raise InputError(
            f"the suspect curve has no finite value at matched layer position(s) {bad}; "
            f"leave those layers out with drop_layers"
        )
    rows = np.flatnonzero(~np.isfinite(refs).all(axis=1))
    if rows.size:
        ids = ", ".join(str(meta[i].get("curve_id")) for i in rows[:5])
        raise BankError(
            f"enrolled curve(s) {ids} have non-finite values at matched layers; remove them "
            f"(fp bank remove ID) or leave those layers out with drop_layers"
        )


# -- ranking, calibration, decision ------------------------------------------------------


def rank(
    query_vec: np.ndarray,
    bank_vectors: np.ndarray,
    meta: Sequence[dict[str, Any]],
    matcher: Any,
    drop_layers: Sequence[int] = defaults.DROP_LAYERS,
    top: int | None = None,
) -> list[Match]:
    """Rank enrolled curves by similarity to the suspect curve.

    Args:
        query_vec: suspect curve, shape ``(L,)``.
        bank_vectors: enrolled curves, shape ``(N, L)``.
        meta: one dict per enrolled curve with ``curve_id``, ``model``, ``family``.
        matcher: the matcher object (the caller resolves names: ``forensics.plugin.manager``).
        drop_layers: layer indices left out of matching (the paper drops layer 0).
        top: keep only the best ``top`` matches.

    Returns:
        Matches, best first; ties are broken by ``curve_id`` so the order is stable.

    Raises:
        BankError: no enrolled curves.
        InputError: shapes disagree, or a matched value is not finite.
    """
    q = np.asarray(query_vec, dtype=np.float64).reshape(-1)
    refs = np.asarray(bank_vectors, dtype=np.float64)
    if refs.size == 0 or len(meta) == 0:
        raise BankError("there are no enrolled curves to rank against; enroll some first")
    refs = refs.reshape(len(meta), -1)
    if refs.shape[1] != q.shape[0]:
        raise InputError(
            f"the suspect curve has {q.shape[0]} layers but enrolled curves have "
            f"{refs.shape[1]}; both must come from the same baseline"
        )
    mask = keep_mask(q.shape[0], drop_layers)
    _check_finite(q[mask], refs[:, mask], meta)
    scores = _scores(matcher, q[mask], refs[:, mask])
    order = sorted(range(len(meta)), key=lambda i: (-scores[i], str(meta[i]["curve_id"])))
    if top is not None:
        order = order[: max(int(top), 1)]
    return [
        Match(r + 1, str(meta[i]["curve_id"]), str(meta[i]["model"]), str(meta[i]["family"]),
              float(scores[i]))
        for r, i in enumerate(order)
    ]


def calibrate_unknown(
    bank_vectors: np.ndarray,
    families: Sequence[str],
    matcher: Any,
    drop_layers: Sequence[int] = defaults.DROP_LAYERS,
    quantile: float = defaults.QUANTILE,
    min_within: int = MIN_WITHIN,
) -> Calibration:
    """Calibrate the ``unknown`` threshold from the bank's own within-family scores.

    For each curve whose family has at least two curves, its within-family score is its
    best score against the *other* curves of its family, scored against the bank without
    that curve (leave-one-out, as a suspect is scored: a matcher such as ``zscore``
    estimates its spreads from the references, and a curve among them looks closer to its
    siblings than a new one would); the threshold is the ``quantile`` of those scores.
    Also reported, scored the same way: the median of each curve's best score against
    other families (``between_median``) and the share of those at or above the threshold
    (``between_above``: how often a curve would be taken for a close relative of another
    family; high values mean families overlap).

    Args:
        bank_vectors: enrolled curves, shape ``(N, L)``.
        families: family of each curve.
        matcher: the matcher object (the one used for ranking).
        drop_layers: layers left out (the ones left out in ranking).
        quantile: share of genuine curves one accepts to call unknown, in (0, 1).
        min_within: fewest within-family scores needed; with fewer, no threshold.

    Raises:
        InputError: shapes disagree or ``quantile`` is outside (0, 1).
    """
    if not 0.0 < quantile < 1.0:
        raise InputError(f"quantile must be within (0, 1), got {quantile}")
    refs = np.asarray(bank_vectors, dtype=np.float64)
    fam = [str(f) for f in families]
    name = _matcher_name(matcher)
    drop = tuple(int(i) for i in drop_layers)
    if refs.ndim != 2 or refs.shape[0] != len(fam):
        raise InputError(f"need one family per curve: {refs.shape} curves, {len(fam)} families")
    if refs.shape[0] == 0:
        return Calibration(name, drop, quantile, None, 0, note="the bank has no curves")
    mask = keep_mask(refs.shape[1], drop)
    refs = refs[:, mask]
    m = matcher
    labels = np.asarray(fam)
    within, between = [], []
    for i in range(refs.shape[0]):
        # Scored against the bank *without* curve i, as a suspect is: a matcher that
        # learns from the references (zscore's spreads) must not see the curve it scores.
        others = np.arange(refs.shape[0]) != i
        if not others.any():
            continue
        s = _scores(m, refs[i], refs[others])
        same = labels[others] == labels[i]
        if same.any():
            within.append(float(s[same].max()))
        if (~same).any():
            between.append(float(s[~same].max()))
    b_med = float(np.median(between)) if between else None
    if len(within) < min_within:
        return Calibration(
            name, drop, quantile, None, len(within), between_median=b_med,
            note=(f"only {len(within)} curve(s) have a sibling of the same family (need "
                  f"{min_within}); enroll at least two curves per family (fp enroll "
                  f"--per-curve N splits a folder into several) to enable 'unknown'"),
        )
    w = np.asarray(within)
    threshold = float(np.quantile(w, quantile))
    above = float(np.mean(np.asarray(between) >= threshold)) if between else None
    return Calibration(
        name, drop, quantile, threshold, len(within), within_min=float(w.min()),
        within_median=float(np.median(w)), between_median=b_med, between_above=above,
        note=f"threshold = {quantile:g}-quantile of {len(within)} within-family scores",
    )


def decide(ranking: Sequence[Match], calibration: Calibration | None = None) -> Decision:
    """Nearest enrolled curve's family and model, or ``unknown`` if it is too far.

    Unknown when the best score is below ``calibration.threshold``, or, where the
    calibration has a ``margin_threshold``, when the best family leads the next one by less.

    Args:
        ranking: output of :func:`rank`, best first (the whole ranking: the margin is taken
            over it).
        calibration: output of :func:`calibrate_unknown`; None or an uncalibrated one
            never yields ``unknown``.

    Raises:
        BankError: the ranking is empty.
    """
    if not ranking:
        raise BankError("there are no enrolled curves to decide from; enroll some first")
    best = ranking[0]
    threshold = calibration.threshold if calibration is not None else None
    margin_t = getattr(calibration, "margin_threshold", None) if threshold is not None else None
    margin = _margin(ranking)
    far = threshold is not None and best.score < threshold
    between = margin_t is not None and margin is not None and margin < margin_t
    unknown = far or between
    if threshold is None:
        why = calibration.note if calibration is not None else "no calibration given"
        reason = f"nearest curve {best.curve_id} (score {best.score:.4g}); unknown disabled: {why}"
    elif far:
        reason = (f"best score {best.score:.4g} ({best.curve_id}, family {best.family}) is below "
                  f"the threshold {threshold:.4g} calibrated on the bank's within-family "
                  f"scores: no enrolled family is close enough")
    elif between:
        reason = (f"family {best.family} leads the next family by {margin:.4g}, less than the "
                  f"{margin_t:.4g} genuine suspects of this size show: the suspect lies "
                  f"between enrolled families, like none of them")
    else:
        reason = (f"nearest curve {best.curve_id} scores {best.score:.4g}, at or above the "
                  f"threshold {threshold:.4g}")
    return Decision(
        family=None if unknown else best.family,
        model=None if unknown else best.model,
        unknown=unknown,
        score=best.score,
        threshold=threshold,
        nearest_family=best.family,
        nearest_model=best.model,
        nearest_curve_id=best.curve_id,
        reason=reason,
    )


def decide_belonging(ranking: Sequence[Match], tests: Sequence[Any], alpha: float,
                     gate: Decision | None = None,
                     order: Sequence[str] | None = None) -> Decision:
    """The two-level answer: the enrolled models the suspect is consistent with, and their
    family; or unknown, with the nearest family as ``closest``.

    Model level: every enrolled model whose belonging test
    (:func:`forensics.stats.belonging.test`) gives ``p >= alpha``, listed in
    ``consistent`` (highest p first). Family level: the family of the consistent model the
    ranking puts first (``family``, ``model``): a p-value says whether a model could have
    made the images, the fingerprint's ranking which of those it most resembles (choosing
    by the highest p named the right family less often on the development sets). When no
    model is consistent the answer is ``unknown`` (``family`` None) and the ranking's
    nearest family is ``closest``, never the decision. ``gate``, where given, is the
    score/margin rule's decision (:func:`decide`): its ``unknown`` also makes the answer
    unknown.

    Args:
        ranking: output of :func:`rank`, best first (the whole ranking).
        tests: one belonging test per enrolled model (``model``, ``family``, ``p_value``).
        alpha: the level of the tests.
        gate: the score/margin rule's decision, or None for none.
        order: models best first, choosing among the consistent ones (None: the ranking).

    Raises:
        BankError: the ranking is empty.
    """
    if not ranking:
        raise BankError("there are no enrolled curves to decide from; enroll some first")
    best = ranking[0]
    ok = sorted((t for t in tests if t.p_value is not None and t.p_value >= alpha),
                key=lambda t: (-t.p_value, t.model))
    consistent = [{"model": t.model, "family": t.family, "p_value": t.p_value} for t in ok]
    order_of = {m.model: i for i, m in reversed(list(enumerate(ranking)))} if order is None \
        else {k: i for i, k in reversed(list(enumerate(order)))}
    chosen = min(ok, key=lambda t: (order_of.get(t.model, len(order_of)), t.model)) \
        if ok else None
    gated = gate is not None and gate.unknown
    unknown = chosen is None or gated
    tested = [t for t in tests if t.p_value is not None]
    if chosen is None:
        top = max(tested, key=lambda t: t.p_value, default=None)
        reason = (f"no enrolled model is consistent with the suspect images at level {alpha:g}"
                  + (f" (highest p = {top.p_value:.3g}, model {top.model})" if top else
                     " (no model has two curves to test against)")
                  + f"; closest family {best.family}")
    elif gated:
        reason = (f"consistent with {len(ok)} enrolled model(s), but {gate.reason}")  # type: ignore[union-attr]
    else:
        names = ", ".join(f"{t.model} (p = {t.p_value:.3g})" for t in ok[:5])
        reason = (f"consistent at level {alpha:g} with {names}"
                  + (" ..." if len(ok) > 5 else "")
                  + f"; family {chosen.family} (of {chosen.model}, ranked first of them"
                  + (" by the per-image attributor)" if order is not None else ")"))
    return Decision(
        family=None if unknown else chosen.family,  # type: ignore[union-attr]
        model=None if unknown else chosen.model,  # type: ignore[union-attr]
        unknown=unknown,
        score=best.score,
        threshold=gate.threshold if gate is not None else None,
        nearest_family=best.family,
        nearest_model=best.model,
        nearest_curve_id=best.curve_id,
        reason=reason,
        consistent=consistent,
        closest=best.family if unknown else None,
        alpha=float(alpha),
    )


def _margin(ranking: Sequence[Match]) -> float | None:
    """Best score minus the best score of another family (None with one family)."""
    best = ranking[0]
    other = [m.score for m in ranking if m.family != best.family]
    return float(best.score - max(other)) if other else None


def _outcome(d: Decision) -> str:
    return "unknown" if d.unknown else str(d.family)


def _model_outcome(d: Decision) -> str:
    return "unknown" if d.unknown else f"{d.family}/{d.model}"


def bootstrap_confidence(
    curve_fn: Callable[[np.ndarray], np.ndarray],
    n_images: int,
    n_boot: int = defaults.N_BOOT,
    seed: int = 0,
    *,
    bank_vectors: np.ndarray,
    meta: Sequence[dict[str, Any]],
    matcher: Any,
    drop_layers: Sequence[int] = defaults.DROP_LAYERS,
    calibration: Calibration | None = None,
    decision: Decision | None = None,
    replace: bool = True,
    fraction: float = 1.0,
) -> Bootstrap:
    """Share of image resamples on which the decision stays the same.

    Args:
        curve_fn: ``curve_fn(indices) -> (L,)`` curve of the suspect images at
            ``indices`` (indices may repeat).
        n_images: number of suspect images.
        n_boot: number of resamples.
        seed: seed of the resampling.
        bank_vectors, meta, matcher, drop_layers, calibration: as for :func:`rank` and
            :func:`decide`.
        decision: the decision on all images (computed from ``curve_fn(arange)`` if None).
        replace: draw with replacement (the bootstrap) or without (subsampling).
        fraction: resample size as a share of ``n_images``.

    Raises:
        InputError: bad ``n_boot``, ``n_images`` or ``fraction``.
    """
    if n_boot < 1:
        raise InputError(f"n_boot must be at least 1, got {n_boot}")
    if n_images < 2:
        raise InputError(f"resampling needs at least 2 images, got {n_images}")
    if not 0.0 < fraction <= 1.0 or (not replace and fraction >= 1.0):
        raise InputError(
            f"fraction must be within (0, 1] (and below 1 without replacement), got {fraction}"
        )
    size = max(2, int(round(fraction * n_images)))

    def decide_on(indices: np.ndarray) -> Decision:
        vec = np.asarray(curve_fn(indices), dtype=np.float64)
        return decide(rank(vec, bank_vectors, meta, matcher, drop_layers, top=1), calibration)

    if decision is None:
        decision = decide_on(np.arange(n_images))
    rng = np.random.default_rng(seed)
    outcomes: Counter[str] = Counter()
    same_family = same_model = 0
    for _ in range(n_boot):
        idx = rng.choice(n_images, size=size, replace=replace)
        d = decide_on(idx)
        outcomes[_outcome(d)] += 1
        same_family += _outcome(d) == _outcome(decision)
        same_model += _model_outcome(d) == _model_outcome(decision)
    return Bootstrap(
        confidence=same_family / n_boot,
        model_confidence=same_model / n_boot,
        n_boot=n_boot,
        seed=seed,
        replace=replace,
        fraction=fraction,
        outcomes=dict(sorted(outcomes.items())),
    )


# -- the bank side -----------------------------------------------------------------------


def comparable_references(
    curve: Any,
    rows: Sequence[dict[str, Any]],
    *,
    bank: str | None = None,
    baseline_names: dict[str, str] | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The enrolled curves a suspect curve can be compared with, as a matrix.

    Keeps the rows measured against the suspect's baseline and checks that they share
    its encoder, weights and layers.

    Args:
        curve: the suspect :class:`~forensics.stats.curve.Curve` (provenance from
            :func:`~forensics.stats.curve.make_provenance`).
        rows: bank curve rows (:meth:`refbank.Bank.curves`).
        bank: the bank's location, for messages.
        baseline_names: ``{baseline_id: name}``, for messages.

    Returns:
        ``(vectors (N, L), meta)`` with meta dicts ``curve_id, model, family, checkpoint``.

    Raises:
        BankError: the bank has no curves, none against this baseline, or they disagree
            with the suspect's encoder, weights or layers.
    """
    where = f" at {bank}" if bank else ""
    names = baseline_names or {}
    if not rows:
        raise BankError(
            f"the bank{where} has no enrolled curves; enroll references first: "
            f"fp enroll DIR --baseline NAME --model M --family F"
        )
    prov = curve.provenance or {}
    try:
        bid = prov["baseline"]["id"]
        encoder = prov["encoder"]["name"]
        weights = prov["encoder"]["weights_sha256"]
    except (KeyError, TypeError):
        raise InputError(
            "the suspect curve's provenance lacks its baseline or encoder; "
            "build it with forensics.stats.curve.make_provenance"
        ) from None
    same = [r for r in rows if r["baseline_id"] == bid]
    if not same:
        counts = Counter(r["baseline_id"] for r in rows)
        listed = ", ".join(f"{names.get(b, b)} ({n} curves)" for b, n in sorted(counts.items()))
        raise BankError(
            f"no enrolled curve{where} was measured against the suspect's baseline "
            f"{names.get(bid, bid)!r}; the bank's curves use: {listed}. Attribute with "
            f"--baseline set to one of those, or enroll references against this baseline"
        )
    for r in same:
        for key, mine in (("encoder", encoder), ("weights_sha256", weights)):
            if r[key] != mine:
                raise BankError(
                    f"enrolled curve {r['curve_id']} has {key} {r[key]!r} but the suspect "
                    f"curve has {mine!r}, although both use baseline {names.get(bid, bid)!r}; "
                    f"run fp bank verify, and recompute the suspect with that baseline's encoder"
                )
        if list(r["layers"]) != list(curve.layers):
            raise BankError(
                f"enrolled curve {r['curve_id']} has layers {list(r['layers'])} but the suspect "
                f"curve has {list(curve.layers)}; both must come from baseline "
                f"{names.get(bid, bid)!r}"
            )
    vectors = np.asarray([r["values"] for r in same], dtype=np.float64)
    meta = [{k: r.get(k) for k in ("curve_id", "model", "family", "checkpoint")} for r in same]
    return vectors, meta
