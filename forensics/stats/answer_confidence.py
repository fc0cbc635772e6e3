"""How likely is the two-level answer right? Calibrated on the bank, at the suspect's size.

The answer of :func:`forensics.stats.attribution.decide_belonging` is right when it names the
family of the model that made the images, or says unknown when no enrolled model made them.
The bank simulates both cases at the suspect's size ``n``, from its own models:

- for every model ``M`` (at most :data:`MAX_MODELS`, a seeded choice beyond it) and
  ``draws`` times, ``n`` images drawn from one of ``M``'s curves are tested against every
  *other* enrolled model; against ``M`` itself, the p-value of a genuine set is that of one of
  ``M``'s own null draws (:func:`forensics.stats.belonging.null`: a set of one curve measured
  against its other curves), so no set is ever tested against its own images;
- **as a suspect of an enrolled model**: all these p-values decide the answer (right: ``M``'s
  family): the consistent model the per-image attributor scores highest, as fp answers,
  read from the attributor refitted without the set's curve (``order``); without an
  attributor, the most consistent model;
- **as a suspect of a model not enrolled**: the same set with ``M`` left out of the bank
  (and of the attributor's fit; right: unknown).

Both cases count equally (a prior of one half that the suspect's model is enrolled: say so
when quoting a confidence). ``confidence`` of an ``unknown`` answer is the share of simulated
unknown answers that were right (Laplace's rule: one right and one wrong added); of a named
answer, a logistic fit of "right" on the log
p-value of the named model and the number of consistent families, over the simulated named
answers. A seeded, pure function of arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forensics.stats import belonging as bt

#: Most enrolled models drawn from (a seeded choice beyond it).
MAX_MODELS = 40
#: Simulated suspects per model.
DRAWS = 8


@dataclass(frozen=True)
class AnswerConfidence:
    """The calibration of one bank at one suspect size.

    Attributes:
        n: the suspect size.
        unknown_right: share of simulated ``unknown`` answers that were right (None: none).
        weights: logistic weights of a named answer (log p, consistent families, 1).
        n_named, n_unknown: simulated answers of each kind.
        named_right: share of simulated named answers that were right.
        seed: seed of the draws.
    """

    n: int
    unknown_right: float | None
    weights: tuple[float, float, float] | None
    n_named: int
    n_unknown: int
    named_right: float | None
    seed: int

    def probability(self, unknown: bool, p_value: float | None = None,
                    n_families: int = 1) -> float | None:
        """The probability that an answer is right (None: nothing simulated to say it)."""
        if unknown:
            return self.unknown_right
        if self.weights is None:
            return self.named_right
        x = np.array([np.log(max(float(p_value or 0.0), 1e-6)), float(n_families), 1.0])
        return float(1.0 / (1.0 + np.exp(-float(np.dot(self.weights, x)))))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"n": self.n, "unknown_right": self.unknown_right,
                "weights": None if self.weights is None else list(self.weights),
                "features": ["log_p", "consistent_families", "1"], "n_named": self.n_named,
                "n_unknown": self.n_unknown, "named_right": self.named_right,
                "seed": self.seed, "prior_enrolled": 0.5}


    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnswerConfidence:
        """The calibration :meth:`to_dict` wrote (bit-identical: JSON floats round-trip)."""
        w = d["weights"]
        return cls(int(d["n"]), d["unknown_right"],
                   None if w is None else (float(w[0]), float(w[1]), float(w[2])),
                   int(d["n_named"]), int(d["n_unknown"]), d["named_right"], int(d["seed"]))


def _share(right: Sequence[bool]) -> float | None:
    """Share right, with one right and one wrong pseudo-answer added (Laplace's rule):
    a few simulated answers, all right, do not make a certainty."""
    return None if not right else float((sum(right) + 1) / (len(right) + 2))


def _answer(ps: dict[str, float], families: dict[str, str], alpha: float,
            scores: dict[str, float] | None = None) -> tuple[str | None, float, int]:
    """(family or None, p of the chosen model, consistent families) from p-values: the
    consistent model with the highest ``scores`` (the attributor's), or the highest p."""
    ok = {k: p for k, p in ps.items() if p >= alpha}
    if not ok:
        return None, 0.0, 0
    if scores is not None:
        chosen = max(ok, key=lambda k: (scores.get(k, -np.inf), k))
    else:
        chosen = max(ok, key=lambda k: (ok[k], k))
    return families[chosen], ok[chosen], len({families[k] for k in ok})


def simulated_models(names: Sequence[str], seed: int = 0,
                     max_models: int = MAX_MODELS) -> list[str]:
    """The models :func:`calibrate` draws suspects from: all, or a seeded choice of
    ``max_models`` (the same at every suspect size)."""
    names = sorted(names)
    if len(names) > max_models:
        rng = np.random.default_rng([int(seed), 7])
        names = sorted(rng.choice(names, max_models, replace=False).tolist())
    return names


def calibrate(models: dict[str, bt.ModelRows], families: dict[str, str], n: int, *,
              alpha: float, kind: str, nulls: dict[str, np.ndarray], draws: int = DRAWS,
              seed: int = 0, max_models: int = MAX_MODELS,
              order: Callable[[str, int, np.ndarray, bool], dict[str, float] | None]
              | None = None) -> AnswerConfidence:
    """Simulate answers of suspects of ``n`` images drawn from the bank (module docstring).

    Args:
        models: every enrolled model's rows.
        families: each model's family.
        n: the suspect size.
        alpha: the level of the belonging tests.
        kind: their statistic.
        nulls: each testable model's null at this size (:func:`belonging.null`).
        draws: simulated suspects per model.
        seed: seed of the draws.
        max_models: most models drawn from (:func:`simulated_models`).
        order: the per-image attributor's scores of a simulated suspect, ``(model, curve,
            row indices, enrolled) -> {model: score}`` (:func:`forensics.stats.probe
            .simulated_scores`): the answer is then the consistent model it scores highest,
            as fp answers, instead of the most consistent one.
    """
    rng = np.random.default_rng([int(seed), int(n), 7])
    names = simulated_models([k for k in models if k in nulls and nulls[k].size], seed,
                             max_models)
    named: list[tuple[float, float, float, bool]] = []
    unknown: list[bool] = []
    m = min(int(n), bt.MAX_TEST)
    for k in names:
        mr, nv = models[k], nulls[k]
        for j in range(int(draws)):
            i = j % len(mr.raw)
            curve = mr.raw[i]
            idx = rng.choice(len(curve), m, replace=m > len(curve))
            rows = curve[idx]
            ps = {}
            for other, orow in models.items():
                if other == k or other not in nulls or not nulls[other].size:
                    continue
                stat = bt.statistic(orow, rows, kind)
                ps[other] = float((1 + np.sum(nulls[other] >= stat)) / (1 + nulls[other].size))
            b = int(rng.integers(nv.size))
            own = float((1 + np.sum(np.delete(nv, b) >= nv[b])) / nv.size)
            for enrolled in (True, False):
                these = {**ps, k: own} if enrolled else ps
                scores = order(k, i, idx, enrolled) if order is not None else None
                fam, p, nf = _answer(these, families, alpha, scores)
                if fam is None:
                    unknown.append(not enrolled)
                else:
                    named.append((p, float(nf), 1.0, enrolled and fam == families[k]))
    return from_simulated(int(n), [(p, nf, r) for p, nf, _c, r in named], unknown, int(seed))


def from_simulated(n: int, named: Sequence[tuple[float, float, bool]],
                   unknown: Sequence[bool], seed: int) -> AnswerConfidence:
    """The calibration of simulated answers at ``n`` images: ``named`` holds (p-value of
    the named model, consistent families, right) of each named answer, ``unknown`` whether
    each unknown answer was right."""
    unknown_right = _share(list(unknown))
    named_right = _share([r for *_x, r in named])
    weights = None
    if named:
        y = np.array([r for *_x, r in named], dtype=int)
        if 0 < y.sum() < len(y):
            from sklearn.linear_model import LogisticRegression

            X = np.array([[np.log(max(p, 1e-6)), nf] for p, nf, _r in named])
            lr = LogisticRegression(C=1.0, max_iter=2000).fit(X, y)
            w = lr.coef_.ravel()
            weights = (float(w[0]), float(w[1]), float(lr.intercept_[0]))
    return AnswerConfidence(int(n), unknown_right, weights, len(named), len(unknown),
                            named_right, int(seed))
