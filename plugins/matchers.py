"""Built-in matchers: the paper's nearest-curve rules.

A matcher scores one suspect vector against a matrix of enrolled vectors; higher scores
are better matches. The paper's rule is ``alpha * cos + (1 - alpha) / (1 + L2)``:
``l2`` is alpha = 0, ``cosine`` alpha = 1, ``combined`` alpha = 0.5 by default.
``zscore`` is Euclidean after dividing every entry by its spread over the enrolled
vectors, so that entries that vary a lot between references (image content) count less
than stable ones (generator traits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forensics.plugin.hookspecs import hookimpl


def _as_2d(query: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    r = np.asarray(refs, dtype=np.float64)
    if r.ndim == 1:
        r = r.reshape(1, -1)
    if r.shape[1] != q.shape[0]:
        from forensics.errors import InputError

        raise InputError(
            f"cannot match a vector of length {q.shape[0]} against vectors of length "
            f"{r.shape[1]}: suspect and enrolled curves must use the same layers"
        )
    return q, r


def l2_distance(query: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Euclidean distance from ``query`` (L,) to each row of ``refs`` (N, L)."""
    q, r = _as_2d(query, refs)
    return np.sqrt(((r - q) ** 2).sum(axis=1))


def cosine_similarity(query: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``query`` (L,) with each row of ``refs`` (N, L); 0 for zero vectors."""
    q, r = _as_2d(query, refs)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(q)
    dots = r @ q
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


@dataclass(frozen=True)
class PaperMatcher:
    """``alpha * cos + (1 - alpha) / (1 + L2)``: the similarity of He et al. (2024)."""

    name: str
    alpha: float
    description: str

    def score(self, query: np.ndarray, refs: np.ndarray, alpha: float | None = None) -> np.ndarray:
        """Similarity of ``query`` (L,) to each row of ``refs`` (N, L); higher is closer."""
        a = self.alpha if alpha is None else float(alpha)
        if not 0.0 <= a <= 1.0:
            from forensics.errors import InputError

            raise InputError(f"alpha must be within [0, 1], got {a}")
        out = np.zeros(np.asarray(refs).reshape(-1, np.asarray(query).size).shape[0])
        if a > 0:
            out = out + a * cosine_similarity(query, refs)
        if a < 1:
            out = out + (1 - a) / (1 + l2_distance(query, refs))
        return out


@dataclass(frozen=True)
class ZScoreMatcher:
    """``1 / (1 + d)``, ``d`` the RMS difference of entries in units of their spread.

    Each entry is divided by its standard deviation over the enrolled vectors ``refs``;
    entries with no spread (constant over the references) are left out. With fewer than
    two references, or no entry with spread, it is the plain RMS difference.
    """

    name: str = "zscore"
    description: str = "RMS distance after scaling each entry by its spread over the bank"

    def score(self, query: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Similarity of ``query`` (L,) to each row of ``refs`` (N, L); higher is closer."""
        q, r = _as_2d(query, refs)
        sd = r.std(axis=0)
        scale = float(np.abs(r).max()) if r.size else 0.0
        keep = sd > 1e-12 * max(scale, 1.0)
        if r.shape[0] < 2 or not keep.any():
            d = np.sqrt(((r - q) ** 2).mean(axis=1))
        else:
            d = np.sqrt((((r[:, keep] - q[keep]) / sd[keep]) ** 2).mean(axis=1))
        return 1.0 / (1.0 + d)


MATCHERS = (
    PaperMatcher("l2", 0.0, "nearest curve by Euclidean distance (score 1/(1+L2))"),
    PaperMatcher("cosine", 1.0, "nearest curve by cosine similarity"),
    PaperMatcher("combined", 0.5, "alpha*cos + (1-alpha)/(1+L2), alpha=0.5 (the paper's rule)"),
    ZScoreMatcher(),
)


@hookimpl(trylast=True)
def register_matchers(register):
    for matcher in MATCHERS:
        register(matcher)
