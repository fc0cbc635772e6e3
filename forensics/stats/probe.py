"""Which enrolled model made these images? A per-image linear attributor on the bank's rows.

The bank stores every enrolled curve's per-image rows (projected, float16:
:func:`forensics.stats.belonging.pack_rows`). This module fits a classifier on them at
answer time and reads the suspect set through it:

- **the attributor**: a multinomial logistic regression (L2, ``C``; lbfgs, deterministic)
  on the rows standardised by their pooled spread, one class per enrolled model
  (:func:`fit`). Its answer for a set of images is, per model, the **mean log-probability**
  of that model over the images (:meth:`ProbeFit.scores`); per family, the mean log of the
  mean probability of its models (:meth:`ProbeFit.family_scores`). Classes are weighted
  alike, and so are families: no model or family is favoured for its number of rows;
- **open set, calibrated like the belonging null** (:class:`ProbeBank`): for a model with
  two or more curves, the attributor is refitted with one of its curves left out
  (leave-one-curve-out), and ``draws`` sets of the suspect's size drawn from that curve
  give the model's genuine scores. A suspect's p-value for the model is the share of those
  genuine sets that score as low or lower (plus one). The model is consistent at level
  ``alpha`` when ``p >= alpha``; the answer is the consistent model with the highest mean
  log-probability, or unknown when none is;
- **confidence** (:meth:`ProbeBank.calibrate`): the same simulation as
  :mod:`forensics.stats.answer_confidence` (sets of each model answered with the model
  enrolled, from its left-out curve, and with the model left out of the bank entirely),
  fitted by :func:`forensics.stats.answer_confidence.from_simulated`.

Every fit and draw is seeded; the rows that fed a fit are hashed (:attr:`ProbeFit.rows_sha256`)
so an answer can name what its attributor was trained on. Pure functions of arrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forensics.errors import InputError
from forensics.stats.belonging import Belonging

#: Inverse L2 strength of the attributor.
C = 1.0
#: Most lbfgs iterations.
MAX_ITER = 300
#: Genuine sets per model in the null.
DRAWS = 200
#: Simulated suspects per model for the confidence.
SIM_DRAWS = 8
#: The test's statistic counts an image's log-probability up to ``log(0.99)``: an image
#: the attributor gives its model with 99 % or more counts as certain. Without the cap,
#: models the attributor tells apart almost perfectly get nulls within 1e-5 of 0, and a
#: new set of the model scored 0.9998 instead of 0.99998 per image fails its own test.
CEILING = float(np.log(0.99))
#: Statistics closer than this count as equal (a mean of capped values summed in another
#: order differs in the last bits).
TIE = 1e-9


def statistic(log_proba: np.ndarray) -> np.ndarray:
    """The test's statistic per model: the mean over images of each image's
    log-probability, capped at :data:`CEILING` (rows: images; columns: models)."""
    return np.minimum(np.asarray(log_proba, dtype=np.float64), CEILING).mean(axis=0)


def _as_rows(curves: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(c, dtype=np.float64) for c in curves]
    if not out or any(c.ndim != 2 or len(c) < 1 for c in out) or \
            len({c.shape[1] for c in out}) != 1:
        raise InputError("an enrolled model needs curves of per-image rows of one width")
    return out


def rows_sha256(models: Mapping[str, Sequence[np.ndarray]]) -> str:
    """SHA-256 of the rows a fit reads (models in name order, curves in order, float64)."""
    h = hashlib.sha256()
    for k in sorted(models):
        h.update(k.encode() + b"\0")
        for c in models[k]:
            a = np.ascontiguousarray(np.asarray(c, dtype=np.float64))
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ProbeFit:
    """A fitted attributor: standardisation and the logistic weights.

    Attributes:
        models: the classes, in name order.
        families: each class's family.
        center, scale: the pooled standardisation of the rows.
        coef, intercept: the logistic weights, ``(len(models), dim)`` and ``(len(models),)``.
        n_rows: rows per model that fed the fit.
        rows_sha256: :func:`rows_sha256` of them.
        C, seed: the fit's settings.
    """

    models: tuple[str, ...]
    families: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_rows: tuple[int, ...]
    rows_sha256: str
    C: float
    seed: int

    def log_proba(self, rows: np.ndarray) -> np.ndarray:
        """``(m, len(models))`` log-probabilities of each image's model."""
        x = np.asarray(rows, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.coef.shape[1]:
            raise InputError(f"suspect rows {x.shape} do not fit the attributor's "
                             f"{self.coef.shape[1]} entries per image")
        z = ((x - self.center) / self.scale) @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Each model's mean log-probability over the images."""
        return self.log_proba(rows).mean(axis=0)

    def family_scores(self, rows: np.ndarray) -> dict[str, float]:
        """Each family's mean log of the mean probability of its models (every family
        counts alike, however many models it holds)."""
        lp = self.log_proba(rows)
        fam = np.asarray(self.families)
        out = {}
        for f in sorted(set(self.families)):
            cols = lp[:, fam == f]
            top = cols.max(axis=1, keepdims=True)
            out[f] = float((top[:, 0] + np.log(np.exp(cols - top).mean(axis=1))).mean())
        return out

    def to_dict(self) -> dict[str, Any]:
        """Provenance: what the attributor was fitted on and how (not its weights)."""
        return {"method": "multinomial logistic regression on standardised rows (lbfgs, "
                          "classes weighted alike)",
                "C": self.C, "max_iter": MAX_ITER, "seed": self.seed,
                "models": list(self.models),
                "rows_per_model": dict(zip(self.models, self.n_rows, strict=True)),
                "rows_sha256": self.rows_sha256}


def fit(models: Mapping[str, Sequence[np.ndarray]], families: Mapping[str, str], *,
        C: float = C, seed: int = 0) -> ProbeFit:
    """The attributor of ``models`` (name -> its curves' rows), one class per model.

    Raises:
        InputError: fewer than two models, or rows of different widths.
    """
    if len(models) < 2:
        raise InputError(f"an attributor needs at least two enrolled models, got {len(models)}")
    names = tuple(sorted(models))
    curves = {k: _as_rows(models[k]) for k in names}
    if len({c[0].shape[1] for c in curves.values()}) != 1:
        raise InputError("the enrolled models' rows have different widths; re-enroll them")
    X = np.concatenate([np.concatenate(curves[k]) for k in names])
    y = np.concatenate([np.full(sum(len(c) for c in curves[k]), i)
                        for i, k in enumerate(names)])
    center = X.mean(axis=0)
    sd = X.std(axis=0)
    scale = np.where(sd > 1e-12, sd, 1.0)
    from sklearn.linear_model import LogisticRegression

    # balanced: every model counts alike, however many images it enrolled (no prior that a
    # suspect came from the model with the most rows)
    lr = LogisticRegression(C=float(C), max_iter=MAX_ITER, class_weight="balanced",
                            random_state=int(seed))
    lr.fit((X - center) / scale, y)
    coef, intercept = lr.coef_, lr.intercept_
    if len(names) == 2:  # sklearn fits one logit for two classes: write it as two
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return ProbeFit(names, tuple(families[k] for k in names), center, scale,
                    np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64),
                    tuple(sum(len(c) for c in curves[k]) for k in names),
                    rows_sha256({k: curves[k] for k in names}), float(C), int(seed))


def _draw(n_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``n_rows`` indices: without replacement, or the bootstrap when the curve
    has fewer than ``2 n`` rows (as :func:`forensics.stats.belonging.null` draws)."""
    return rng.choice(n_rows, size=n, replace=2 * n > n_rows)


class ProbeBank:
    """The attributor of a bank, its leave-one-curve-out refits and its nulls.

    Args:
        models: each enrolled model's curves of rows.
        families: each model's family.
        C, seed: the attributor's settings.
    """

    def __init__(self, models: Mapping[str, Sequence[np.ndarray]],
                 families: Mapping[str, str], *, C: float = C, seed: int = 0):
        self.curves: dict[str, list[np.ndarray]] | None = {
            k: _as_rows(models[k]) for k in sorted(models)}
        self.sizes = {k: [len(c) for c in v] for k, v in self.curves.items()}
        self.families = {k: families[k] for k in self.sizes}
        self.C, self.seed = float(C), int(seed)
        self.fit = fit(self.curves, self.families, C=C, seed=seed)
        self.col = {k: i for i, k in enumerate(self.fit.models)}
        self._held: dict[tuple[str, int], np.ndarray] = {}
        self._out: dict[str, ProbeFit | None] = {}
        self._out_lp: dict[str, np.ndarray | None] = {}
        self._nulls: dict[tuple[str, int, int], np.ndarray] = {}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], families: Mapping[str, str],
                    sizes: Mapping[str, Sequence[int]], *, C: float = C,
                    seed: int = 0) -> ProbeBank:
        """The bank :func:`export` stored: its fit, refits' log-probabilities and nulls,
        without the rows (``sizes``: each model's curves' image counts)."""
        self = cls.__new__(cls)
        self.curves = None
        self.sizes = {k: [int(x) for x in sizes[k]] for k in sorted(sizes)}
        self.families = {k: families[k] for k in self.sizes}
        self.C, self.seed = float(C), int(seed)
        self.fit = stored_fit(arrays, self.families, C=C, seed=seed)
        self.col = {k: i for i, k in enumerate(self.fit.models)}
        self._held = {(k, i): arrays[f"held.{k}.{i}"] for k, v in self.sizes.items()
                      for i in range(len(v)) if f"held.{k}.{i}" in arrays}
        self._out = {}
        self._out_lp = {k: arrays.get(f"out.{k}") for k in self.sizes}
        self._nulls = {}
        return self

    def _rows(self) -> dict[str, list[np.ndarray]]:
        if self.curves is None:
            raise InputError("the stored attributor lacks a refit it needs; it is computed "
                             "again from the bank's rows")
        return self.curves

    def testable(self, model: str) -> bool:
        """Whether the model has two curves (a null)."""
        return len(self.sizes[model]) >= 2

    def held_out(self, model: str, i: int) -> np.ndarray:
        """Log-probabilities (all models' columns) of curve ``i`` of ``model`` under the
        attributor refitted without that curve."""
        key = (model, i)
        if key not in self._held:
            curves = self._rows()
            rest = {k: ([c for j, c in enumerate(v) if j != i] if k == model else v)
                    for k, v in curves.items()}
            f = fit(rest, self.families, C=self.C, seed=self.seed)
            self._held[key] = f.log_proba(curves[model][i])
        return self._held[key]

    def left_out(self, model: str) -> ProbeFit | None:
        """The attributor of the bank without ``model`` (None: fewer than two remain)."""
        if model not in self._out:
            rest = {k: v for k, v in self._rows().items() if k != model}
            self._out[model] = fit(rest, self.families, C=self.C, seed=self.seed) \
                if len(rest) >= 2 else None
        return self._out[model]

    def out_log_proba(self, model: str) -> np.ndarray | None:
        """Log-probabilities of all of ``model``'s rows (its curves in order) under
        :meth:`left_out` (columns: the other models, in name order; None: fewer than two
        remain)."""
        if model not in self._out_lp:
            lo = self.left_out(model)
            self._out_lp[model] = (None if lo is None
                                   else lo.log_proba(np.concatenate(self._rows()[model])))
        return self._out_lp[model]

    def null(self, model: str, n: int, draws: int = DRAWS) -> np.ndarray:
        """Mean log-probabilities of ``model`` over ``draws`` genuine sets of ``n`` images,
        each drawn from one left-out curve (in turn), seeded. Empty for a one-curve model."""
        key = (model, int(n), int(draws))
        if key not in self._nulls:
            if not self.testable(model):
                self._nulls[key] = np.zeros(0)
            else:
                k = len(self.sizes[model])
                rng = np.random.default_rng([self.seed, int(n), 11])
                out = np.empty(int(draws))
                for b in range(int(draws)):
                    lp = self.held_out(model, b % k)[:, self.col[model]]
                    out[b] = statistic(lp[_draw(len(lp), int(n), rng)][:, None])[0]
                self._nulls[key] = out
        return self._nulls[key]

    def p_values(self, scores: np.ndarray, n: int) -> dict[str, float | None]:
        """Each model's p-value for a set of ``n`` images with these mean log-probabilities."""
        out: dict[str, float | None] = {}
        for k, j in self.col.items():
            nv = self.null(k, n)
            out[k] = None if nv.size == 0 else float((1 + np.sum(nv <= scores[j] + TIE))
                                                     / (1 + nv.size))
        return out

    def tests(self, rows: np.ndarray, alpha: float) -> list[Belonging]:
        """One :class:`~forensics.stats.belonging.Belonging` per enrolled model (``kind``
        ``probe``, ``statistic`` the capped mean log-probability of the model,
        :func:`statistic`, higher is closer), highest first."""
        if not 0.0 < alpha < 1.0:
            raise InputError(f"the belonging level must be within (0, 1), got {alpha}")
        x = np.asarray(rows, dtype=np.float64)
        s = statistic(self.fit.log_proba(x))
        ps = self.p_values(s, len(x))
        out = []
        for k, j in self.col.items():
            nv = self.null(k, len(x))
            p = ps[k]
            out.append(Belonging(k, self.families[k], p, p is not None and p >= alpha,
                                 float(s[j]), float(np.median(nv)) if nv.size else None,
                                 len(x), len(self.sizes[k]), int(nv.size), "probe"))
        return sorted(out, key=lambda t: (-t.statistic, t.model))

    def calibrate(self, n: int, alpha: float, draws: int = SIM_DRAWS,
                  max_models: int = 40) -> Any:
        """The answer's confidence at ``n`` images, simulated from the bank (module
        docstring; at most ``max_models`` models, a seeded choice beyond):
        an :class:`forensics.stats.answer_confidence.AnswerConfidence`."""
        from forensics.stats.answer_confidence import from_simulated, simulated_models

        rng = np.random.default_rng([self.seed, int(n), 13])
        named: list[tuple[float, float, bool]] = []
        unknown: list[bool] = []
        for k in simulated_models(list(self.sizes), self.seed, max_models):
            if not self.testable(k):
                continue
            lp_out = self.out_log_proba(k)
            others = [m for m in self.fit.models if m != k]
            for b in range(int(draws)):
                i = b % len(self.sizes[k])
                held = self.held_out(k, i)
                idx = _draw(len(held), int(n), rng)
                # enrolled: the set's model in the bank, read by the fit without its curve
                self._answer(held[idx], self.fit.models, n, alpha, k, True, named, unknown)
                if lp_out is not None:  # not enrolled: the model left out
                    off = sum(self.sizes[k][:i])
                    self._answer(lp_out[off + idx], others, n, alpha, k, False, named,
                                 unknown)
        return from_simulated(int(n), [(p, nf, r) for p, nf, r in named], unknown,
                              self.seed)

    def _answer(self, lp: np.ndarray, names: Sequence[str], n: int, alpha: float,
                truth: str, enrolled: bool, named: list, unknown: list) -> None:
        """A simulated set's answer from its images' log-probabilities ``lp`` (columns:
        ``names``): tested by :func:`statistic`, the consistent model with the highest
        mean log-probability named, as fp answers."""
        stat, mean = statistic(lp), lp.mean(axis=0)
        ok = []
        for j, k in enumerate(names):
            nv = self.null(k, n)
            if nv.size:
                p = float((1 + np.sum(nv <= stat[j] + TIE)) / (1 + nv.size))
                if p >= alpha:
                    ok.append((mean[j], k, p))
        if not ok:
            unknown.append(not enrolled)
            return
        _s, chosen, p = max(ok)
        named.append((p, float(len({self.families[k] for _s2, k, _p in ok})),
                      enrolled and self.families[chosen] == self.families[truth]))


def export(bank: ProbeBank, simulated: Sequence[str]) -> dict[str, np.ndarray]:
    """What an answer needs of ``bank``, as arrays (stored once per bank state): the fit
    (``fit.*``), for every testable model the log-probabilities of its curves under the
    refits without each curve (``held.<model>.<i>``: its null), and for each model of
    ``simulated`` those of all its rows under the fit without the model (``out.<model>``;
    absent when fewer than two models remain)."""
    f = bank.fit
    out = {"fit.center": f.center, "fit.scale": f.scale, "fit.coef": f.coef,
           "fit.intercept": f.intercept, "fit.n_rows": np.asarray(f.n_rows, dtype=np.int64),
           "fit.rows_sha256": np.frombuffer(f.rows_sha256.encode("ascii"), dtype=np.uint8)}
    for k in bank.sizes:
        if not bank.testable(k):
            continue
        for i in range(len(bank.sizes[k])):
            out[f"held.{k}.{i}"] = bank.held_out(k, i)
        lp = bank.out_log_proba(k) if k in simulated else None
        if lp is not None:
            out[f"out.{k}"] = lp
    return out


def stored_fit(arrays: Mapping[str, np.ndarray], families: Mapping[str, str], *,
               C: float = C, seed: int = 0) -> ProbeFit:
    """The :class:`ProbeFit` stored by :func:`export` (``families``: each model's, the
    models in name order being the fit's)."""
    names = tuple(sorted(families))
    return ProbeFit(names, tuple(families[k] for k in names), arrays["fit.center"],
                    arrays["fit.scale"], arrays["fit.coef"], arrays["fit.intercept"],
                    tuple(int(x) for x in arrays["fit.n_rows"]),
                    arrays["fit.rows_sha256"].tobytes().decode("ascii"), float(C), int(seed))


def simulated_scores(arrays: Mapping[str, np.ndarray], names: Sequence[str],
                     sizes: Mapping[str, Sequence[int]]
                     ) -> Callable[[str, int, np.ndarray, bool], dict[str, float] | None]:
    """The attributor's scores of a simulated suspect, from :func:`export`'s arrays: for
    ``(model, curve i, row indices, enrolled)``, each model's mean log-probability under the
    fit without curve ``i`` (enrolled) or without the model (not enrolled); None where the
    arrays lack it. ``names``: the fit's models, in order; ``sizes``: each model's curves'
    image counts."""
    names = list(names)

    def scores(k: str, i: int, idx: np.ndarray, enrolled: bool) -> dict[str, float] | None:
        if enrolled:
            lp = arrays.get(f"held.{k}.{i}")
            cols = names
        else:
            lp = arrays.get(f"out.{k}")
            cols = [m for m in names if m != k]
            if lp is not None:
                idx = int(sum(sizes[k][:i])) + np.asarray(idx)
        if lp is None:
            return None
        return dict(zip(cols, lp[np.asarray(idx)].mean(axis=0).tolist(), strict=True))

    return scores
