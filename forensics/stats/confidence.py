"""Calibrated confidence and a size-aware ``unknown`` threshold, fitted on the bank itself.

A fingerprint whose set vector is the mean of per-image vectors (``per_image``, e.g.
``resid-early``) stores with every enrolled curve the per-entry variance of its images'
vectors (``fingerprints["NAME#var"]``). A suspect set of ``n`` images of that generator
then has a vector about the curve's own, each entry with variance ``var / n`` (times the
finite-population factor ``1 - n / N``). The bank simulates such suspects: for every
enrolled curve, at sizes 8 .. 512 (never above the curve's own size), ``draws`` vectors,
each ranked against the bank *without* that curve (leave-one-curve-out), with the
fingerprint's matcher. That gives, per simulated suspect, whether the nearest family was
right, its best score and the margin to the second family.

- **confidence**: a logistic regression of "right family" on the margin, the best score
  and ``log n`` (seeded, L2-regularised) maps a real suspect's margin, score and size to
  the probability that its decision is right. It describes the generator, not only the
  images given: a suspect of 8 images whose nearest family barely wins gets a low value
  where a 512-image one with the same margin would not.
- **unknown**: a suspect is unknown when its best score is too low *or* its margin over
  the second family too small, both judged against the simulated genuine suspects of its
  size: each is standardised by their mean and spread at that size, and the suspect is
  unknown when the larger of the two exceeds the ``1 - quantile`` quantile of the same
  maximum over the genuine draws (so about a ``quantile`` share of genuine suspects of any
  size is called unknown). As two thresholds: ``best < threshold(n)`` or
  ``margin < margin_threshold(n)`` (interpolated in ``log n``). A generator unlike every
  enrolled family scores low; one that falls between two enrolled families (a close
  relative of both) scores well but has no margin.

Everything is a pure function of arrays; the random draws are seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forensics.errors import InputError

#: Suspect sizes the bank simulates.
SIZES: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
#: Simulated suspects per enrolled curve and size.
DRAWS = 16
#: Most enrolled curves left out in turn (a seeded choice beyond it), so that a bank of
#: thousands of curves still calibrates in seconds.
MAX_CURVES = 100
#: Key suffix of the per-image variance stored beside a fingerprint's vector.
VAR_SUFFIX = "#var"


def var_key(fingerprint: str) -> str:
    """The ``fingerprints`` key of a fingerprint's per-image variance."""
    return fingerprint + VAR_SUFFIX


@dataclass(frozen=True)
class Simulation:
    """Leave-one-curve-out suspects simulated from the bank.

    Attributes:
        size: suspect size of each draw.
        best: best score of each draw.
        margin: best score minus the best score of another family.
        right: whether the nearest family was the curve's own.
    """

    size: np.ndarray
    best: np.ndarray
    margin: np.ndarray
    right: np.ndarray


@dataclass(frozen=True)
class ConfidenceModel:
    """The fitted calibration: ``p(right) = sigmoid(w . [margin, best, log n, 1])``.

    Attributes:
        weights: the four coefficients (margin, best score, log n, intercept).
        thresholds: ``{size: best-score threshold}``: below it, unknown.
        quantile: the share of simulated genuine suspects called unknown at each size.
        n_draws: simulated suspects behind the fit.
        sim_accuracy: share of them named right.
        seed: seed of the draws.
        note: how it was made, for the record.
    """

    weights: tuple[float, float, float, float]
    thresholds: dict[int, float]
    quantile: float
    n_draws: int
    sim_accuracy: float
    seed: int
    note: str = ""
    sizes: tuple[int, ...] = field(default=SIZES)
    margin_thresholds: dict[int, float] = field(default_factory=dict)

    def probability(self, margin: float, best: float, n: int) -> float:
        """The probability that a decision with this margin, score and size is right."""
        x = np.array([margin, best, np.log(max(int(n), 1)), 1.0])
        z = float(np.dot(np.asarray(self.weights), x))
        return float(1.0 / (1.0 + np.exp(-z)))

    def threshold(self, n: int) -> float | None:
        """The best-score threshold at suspect size ``n`` (log-interpolated between sizes)."""
        return _interp(self.thresholds, n)

    def margin_threshold(self, n: int) -> float | None:
        """The margin threshold at suspect size ``n`` (None for a model without one)."""
        return _interp(self.margin_thresholds, n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"weights": list(self.weights), "features": ["margin", "best", "log_n", "1"],
                "thresholds": {str(k): v for k, v in sorted(self.thresholds.items())},
                "margin_thresholds": {str(k): v for k, v in
                                      sorted(self.margin_thresholds.items())},
                "quantile": self.quantile, "n_draws": self.n_draws,
                "sim_accuracy": self.sim_accuracy, "seed": self.seed, "note": self.note}


    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConfidenceModel:
        """The model :meth:`to_dict` wrote (bit-identical: JSON floats round-trip)."""
        return cls(weights=tuple(float(w) for w in d["weights"]),  # type: ignore[arg-type]
                   thresholds={int(k): _num(v) for k, v in d["thresholds"].items()},
                   quantile=float(d["quantile"]), n_draws=int(d["n_draws"]),
                   sim_accuracy=float(d["sim_accuracy"]), seed=int(d["seed"]),
                   note=str(d["note"]),
                   margin_thresholds={int(k): _num(v)
                                      for k, v in d["margin_thresholds"].items()})


def _num(v: Any) -> Any:
    return None if v is None else float(v)


def _interp(table: dict[int, float], n: int) -> float | None:
    if not table:
        return None
    ks = sorted(table)
    x = np.log([float(k) for k in ks])
    y = np.array([table[k] for k in ks])
    return float(np.interp(np.log(max(int(n), 1)), x, y))


def _spreads(best: np.ndarray, margin: np.ndarray) -> tuple[float, float, float, float]:
    """Mean and standard deviation (at least 1e-12) of genuine best scores and margins."""
    b, m = np.asarray(best, dtype=np.float64), np.asarray(margin, dtype=np.float64)
    return float(b.mean()), max(float(b.std()), 1e-12), float(m.mean()), max(float(m.std()),
                                                                                1e-12)


def shortfall(best: np.ndarray, margin: np.ndarray, genuine_best: np.ndarray,
              genuine_margin: np.ndarray) -> np.ndarray:
    """How far each suspect falls short of genuine suspects of its size, in their spreads.

    The larger of ``(mean - best) / sd`` and ``(mean - margin) / sd``, the means and
    standard deviations taken over the genuine suspects' best scores and margins. The
    unknown rule calls a suspect unknown when this exceeds :func:`shortfall_cutoff`; it is
    the rule's continuous score (larger: more unlike every enrolled family).
    """
    mb, sb, mm, sm = _spreads(genuine_best, genuine_margin)
    return np.maximum((mb - np.asarray(best, dtype=np.float64)) / sb,
                      (mm - np.asarray(margin, dtype=np.float64)) / sm)


def shortfall_cutoff(best: np.ndarray, margin: np.ndarray, quantile: float) -> float:
    """``z*``: the ``1 - quantile`` quantile of the genuine suspects' own :func:`shortfall`;
    a suspect whose shortfall exceeds it is unknown."""
    return float(np.quantile(shortfall(best, margin, best, margin), 1.0 - quantile))


def unknown_thresholds(best: np.ndarray, margin: np.ndarray,
                       quantile: float) -> tuple[float, float]:
    """Best-score and margin thresholds that call a ``quantile`` share of genuine suspects
    unknown between them.

    Each of ``best`` and ``margin`` (of genuine suspects of one size) is standardised by
    its mean and standard deviation; ``z`` is the larger of the two shortfalls
    ``(mean - value) / sd`` (:func:`shortfall`), and its ``1 - quantile`` quantile ``z*``
    (:func:`shortfall_cutoff`) gives the thresholds ``mean - z* sd`` of each.
    """
    mb, sb, mm, sm = _spreads(best, margin)
    z = shortfall_cutoff(best, margin, quantile)
    return float(mb - z * sb), float(mm - z * sm)


def family_scores(scores: np.ndarray, families: Sequence[str]) -> dict[str, float]:
    """Best score of each family."""
    out: dict[str, float] = {}
    for s, f in zip(np.asarray(scores, dtype=np.float64), families, strict=True):
        if f not in out or s > out[f]:
            out[f] = float(s)
    return out


def margin_of(fam_scores: dict[str, float]) -> tuple[str, float, float]:
    """``(best family, its score, margin over the next family)``; margin 1 with one family."""
    order = sorted(fam_scores.items(), key=lambda kv: (-kv[1], kv[0]))
    best_f, best = order[0]
    margin = best - order[1][1] if len(order) > 1 else 1.0
    return best_f, best, float(margin)


def simulate(
    vectors: np.ndarray,
    variances: np.ndarray,
    n_images: Sequence[int],
    families: Sequence[str],
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    sizes: Sequence[int] = SIZES,
    draws: int = DRAWS,
    seed: int = 0,
    max_curves: int = MAX_CURVES,
) -> Simulation:
    """Leave-one-curve-out suspects of every enrolled curve (see the module docstring).

    Args:
        vectors: enrolled vectors, ``(N, K)``.
        variances: per-image variance of each entry, ``(N, K)``.
        n_images: images behind each curve.
        families: family of each curve.
        score: the matcher's ``score(query (K,), refs (M, K)) -> (M,)``.
        sizes: suspect sizes to simulate (sizes above a curve's own are skipped).
        draws: suspects per curve and size.
        seed: seed of the draws.
        max_curves: most curves left out in turn; beyond it a seeded choice of curves is
            (each still ranked against every other curve of the bank).

    Raises:
        InputError: shapes disagree, or fewer than two families.
    """
    V = np.asarray(vectors, dtype=np.float64)
    S2 = np.asarray(variances, dtype=np.float64)
    fam = [str(f) for f in families]
    if V.shape != S2.shape or V.ndim != 2 or len(fam) != len(V) or len(n_images) != len(V):
        raise InputError(f"need one vector, variance, size and family per curve: {V.shape}, "
                         f"{S2.shape}, {len(n_images)}, {len(fam)}")
    if len(set(fam)) < 2:
        raise InputError("calibrating confidence needs curves of at least two families")
    rng = np.random.default_rng(seed)
    size, best, margin, right = [], [], [], []
    idx = np.arange(len(V))
    left_out = idx if len(V) <= max_curves else np.sort(
        rng.choice(len(V), int(max_curves), replace=False))
    for c in left_out:
        keep = idx != c
        others = [fam[i] for i in idx[keep]]
        if fam[c] not in others:
            continue  # the family's only curve: nothing of its own to be named by
        N = int(n_images[c])
        sd = np.sqrt(np.clip(S2[c], 0.0, None))
        for n in sizes:
            if n > N:
                continue
            fpc = max(1.0 - n / N, 0.0)
            k = draws if fpc > 0 else 1
            noise = rng.standard_normal((k, V.shape[1])) * (sd * np.sqrt(fpc / n))
            for q in V[c] + noise:
                f, b, m = margin_of(family_scores(score(q, V[keep]), others))
                size.append(n)
                best.append(b)
                margin.append(m)
                right.append(f == fam[c])
    return Simulation(np.asarray(size), np.asarray(best), np.asarray(margin),
                      np.asarray(right, dtype=bool))


def fit(sim: Simulation, *, quantile: float = 0.05, seed: int = 0,
        C: float = 1.0) -> ConfidenceModel:
    """The calibration map and the size-wise unknown thresholds of a simulation.

    Raises:
        InputError: the simulation is empty.
    """
    if sim.size.size == 0:
        raise InputError("no simulated suspects: enroll at least two curves of a family")
    X = np.c_[sim.margin, sim.best, np.log(sim.size)]
    y = sim.right.astype(int)
    if y.min() == y.max():
        # one class only: a logistic fit has no finite optimum. Add one pseudo-draw of the
        # other class at the worst observed point, so the map stays below 1 (or above 0).
        worst = np.argmin(sim.margin) if y[0] == 1 else np.argmax(sim.margin)
        X, y = np.vstack([X, X[worst]]), np.append(y, 1 - y[0])
    from sklearn.linear_model import LogisticRegression

    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    lr = LogisticRegression(C=C, max_iter=2000).fit(X / scale, y)
    w = lr.coef_.ravel() / scale
    thresholds, margin_thresholds = {}, {}
    for n in sorted(set(sim.size.tolist())):
        k = sim.size == n
        thresholds[int(n)], margin_thresholds[int(n)] = unknown_thresholds(
            sim.best[k], sim.margin[k], quantile)
    return ConfidenceModel(
        weights=(float(w[0]), float(w[1]), float(w[2]), float(lr.intercept_[0])),
        thresholds=thresholds, quantile=quantile, n_draws=int(sim.size.size),
        sim_accuracy=float(sim.right.mean()), seed=seed, margin_thresholds=margin_thresholds,
        note=(f"logistic fit on {sim.size.size} leave-one-curve-out suspects simulated from "
              f"the bank's per-image variances (sizes {sorted(set(sim.size.tolist()))})"),
    )


def expected_calibration_error(p: np.ndarray, right: np.ndarray, bins: int = 10) -> float:
    """ECE: the share-weighted mean |confidence - accuracy| over ``bins`` equal-width bins."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(right, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum((which == b).mean() * abs(p[which == b].mean() - y[which == b].mean())
                     for b in range(bins) if (which == b).any()))
