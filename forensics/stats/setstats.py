"""The paper's baseline: summarise an image set by feature mean, std and FID.

He et al. (2024) compare their C_T-layer curves with a simple set fingerprint (the
authors' ``fingerprint_baseline.py``): per image set, the mean and the standard deviation
over the set, and the set's FID against the reference data T. Two sets are compared by

    cos_part = cos(mean_a, mean_b) + cos(std_a, std_b)
    distance = || fid_a - fid_b ||
    score    = alpha * cos_part + (1 - alpha) / (1 + distance)

with the same three settings as the curve matchers: ``l2`` (alpha = 0: FID alone),
``cosine`` (alpha = 1: mean and std alone) and ``combined`` (alpha = 0.5); the nearest
set (highest score) names the family. The authors computed the statistics on pixels of a
single feature space; here they are computed per encoder layer and concatenated, so with
one layer this is exactly their rule. The set's vector (:func:`baseline_vector`) is

    [mean of layer 1, ..., mean of layer K, std of layer 1, ..., std of layer K,
     fid of layer 1, ..., fid of layer K]

and :func:`baseline_matchers` return matchers that read that layout; pass them to
:func:`forensics.steps.evaluate.evaluate` with ``drop_layers=()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from forensics import defaults
from forensics.errors import InputError, InsufficientDataError


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``mu`` (D,) and covariance ``cov`` (D, D) of a feature set, as FID uses them."""

    mu: np.ndarray
    cov: np.ndarray
    n: int


def _features(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"{what} must be a 2-D array (samples x features), got shape {x.shape}")
    if x.shape[0] < 2:
        raise InsufficientDataError(f"{what} has {x.shape[0]} sample(s); FID needs at least 2")
    if not np.isfinite(x).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return x


def gaussian_stats(x: np.ndarray, what: str = "features") -> GaussianStats:
    """Mean and unbiased covariance (``ddof=1``) of ``x`` (n, D), n >= 2."""
    x = _features(x, what)
    return GaussianStats(mu=x.mean(axis=0), cov=np.atleast_2d(np.cov(x, rowvar=False)), n=len(x))


def _sqrtm_product(cov1: np.ndarray, cov2: np.ndarray) -> tuple[np.ndarray, bool]:
    """sqrtm(cov1 @ cov2) as a real matrix, and whether it is trustworthy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ill-conditioned products are checked below
        root = linalg.sqrtm(cov1 @ cov2)
    if isinstance(root, tuple):  # older SciPy with disp=False semantics
        root = root[0]
    root = np.asarray(root)
    if not np.isfinite(root).all():
        return root.real, False
    if np.iscomplexobj(root):
        scale = max(1.0, float(np.abs(np.trace(cov1))), float(np.abs(np.trace(cov2))))
        if np.abs(root.imag).max() > 1e-6 * scale:
            return root.real, False
        root = root.real
    return root, True


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians: ``|mu_a - mu_b|^2 + tr(Ca + Cb - 2 sqrt(Ca Cb))``.

    The matrix square root comes from ``scipy.linalg.sqrtm``; tiny imaginary parts from
    round-off are discarded. When the product is singular (fewer samples than
    dimensions) and the root is not finite or has a non-negligible imaginary part, both
    covariances get ``eps`` (relative to their scale) added to the diagonal and the root
    is taken again. The result is clipped at 0 against round-off.

    Raises:
        InputError: the dimensions differ, or the root stays unusable.
    """
    if a.mu.shape != b.mu.shape:
        raise InputError(
            f"cannot compare features of dimension {a.mu.shape[0]} with dimension {b.mu.shape[0]}"
        )
    diff = a.mu - b.mu
    root, ok = _sqrtm_product(a.cov, b.cov)
    if not ok:
        dim = a.cov.shape[0]
        scale = max(np.trace(a.cov), np.trace(b.cov), 1.0) / dim
        offset = np.eye(dim) * eps * scale
        root, ok = _sqrtm_product(a.cov + offset, b.cov + offset)
        if not ok:
            raise InputError(
                "the FID matrix square root is not finite even after regularisation; "
                "use more samples or fewer feature dimensions"
            )
    value = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(root))
    return max(value, 0.0)


def psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix (eigenvalues clipped at 0)."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_to_reference(x: np.ndarray, ref: GaussianStats, ref_root: np.ndarray) -> float:
    """Fréchet distance of the samples ``x`` (n, D) to ``ref``, given ``psd_sqrt(ref.cov)``.

    ``tr sqrt(C_ref C_x)`` is the sum of the square roots of the eigenvalues of
    ``S C_x S`` (``S = ref_root``), which are those of ``Y Y^T / (n - 1)`` with
    ``Y = (x - mean) S``: an ``n x n`` symmetric eigenproblem when the set has fewer
    samples than dimensions, instead of a ``D x D`` general matrix square root. Exact
    (no regularisation needed for singular set covariances) and much faster; agrees with
    :func:`frechet_distance` to round-off.
    """
    x = _features(x, "set features")
    n = x.shape[0]
    mu = x.mean(axis=0)
    xc = x - mu
    y = xc @ np.asarray(ref_root, dtype=np.float64)
    gram = (y @ y.T if n < y.shape[1] else y.T @ y) / (n - 1)
    eig = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    diff = mu - ref.mu
    tr_x = float(np.einsum("ij,ij->", xc, xc) / (n - 1))
    value = float(diff @ diff + tr_x + np.trace(ref.cov) - 2.0 * np.sqrt(eig).sum())
    return max(value, 0.0)


@dataclass(frozen=True)
class CompactStats:
    """T's Gaussian statistics in compact form: what FID against T needs, nothing more.

    T's covariance (``ddof=1``) is given by ``rows`` (T's samples themselves, in their own
    precision, the covariance being that of ``rows - mu``) or by ``factor`` (D, r) with
    ``factor @ factor.T`` the covariance: whichever is smaller. Both are exact, and far
    smaller than the (D, D) covariance and its square root when T has fewer samples
    than dimensions.

    Attributes:
        mu: (D,) mean of T.
        trace: trace of T's covariance.
        n: number of samples in T.
        factor: (D, r), r the covariance's rank (at most ``min(n - 1, D)``), or None.
        rows: (n, D) T's samples, or None.
    """

    mu: np.ndarray
    trace: float
    n: int
    factor: np.ndarray | None = None
    rows: np.ndarray | None = None


def covariance_factor(values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``F`` (D, r) with ``F @ F.T`` the covariance of eigenvalues ``values`` and eigenvectors
    ``vectors`` (columns); eigenvalues at round-off level (numerically zero) are left out."""
    vals = np.asarray(values, dtype=np.float64)
    top = float(vals.max()) if vals.size else 0.0
    keep = vals > max(top, 0.0) * vals.size * np.finfo(np.float64).eps
    return np.ascontiguousarray(vectors[:, keep] * np.sqrt(vals[keep]))


def frechet_to_compact(x: np.ndarray, ref: CompactStats) -> float:
    """Fréchet distance of the samples ``x`` (n, D) to T given as :class:`CompactStats`.

    ``tr sqrt(C_T C_x)`` is the nuclear norm (sum of singular values) of
    ``Z = (x - mean) F / sqrt(n - 1)``, or of ``(x - mean)(T - mu)^T / sqrt((n - 1)(n_T - 1))``
    from T's rows: no D x D matrix at all. The singular values are the square roots of
    the eigenvalues of ``Z Z^T`` (or ``Z^T Z``, the smaller); eigenvalues at round-off
    level are zeros of a singular covariance and count as 0 (their square roots would
    add errors of ``sqrt(eps)``), so this is exact even then, where
    :func:`frechet_distance` and :func:`frechet_to_reference` are off by up to 1e-7.
    """
    x = _features(x, "set features")
    n = x.shape[0]
    mu = x.mean(axis=0)
    xc = x - mu
    if ref.rows is not None:
        z = xc @ (np.asarray(ref.rows, dtype=np.float64) - ref.mu).T
        scale = np.sqrt((n - 1) * (ref.n - 1))
    else:
        z = xc @ np.asarray(ref.factor, dtype=np.float64)
        scale = np.sqrt(n - 1)
    nuclear = 0.0
    if z.size:
        gram = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z
        eig = np.linalg.eigvalsh(gram)
        top = max(float(eig.max()), 0.0)
        eig[eig <= top * gram.shape[0] * np.finfo(np.float64).eps] = 0.0
        nuclear = float(np.sqrt(eig).sum())
    diff = mu - ref.mu
    tr_x = float(np.einsum("ij,ij->", xc, xc) / (n - 1))
    value = float(diff @ diff + tr_x + float(ref.trace) - 2.0 * nuclear / scale)
    return max(value, 0.0)


def mean_std_fid_features(X_layer: np.ndarray,
                          T_layer: np.ndarray | GaussianStats | CompactStats,
                          T_root: np.ndarray | None = None) -> dict:
    """The baseline's summary of one image set in one feature space.

    Args:
        X_layer: features of the set, ``(n, D)``, n >= 2.
        T_layer: features of the reference data T, ``(m, D)``, or their precomputed
            :func:`gaussian_stats` or :class:`CompactStats` (compute them once for many
            sets; :class:`CompactStats` is the form a baseline stores).
        T_root: ``psd_sqrt`` of T's covariance, if precomputed: the FID then comes from
            :func:`frechet_to_reference` (same value, far faster for wide layers).

    Returns:
        ``{"mean": (D,) array, "std": (D,) array (population std, ddof=0, like
        numpy's default the authors used), "fid": float}`` with ``fid`` the Fréchet
        distance between the set's and T's Gaussians.

    Raises:
        InputError: wrong shapes, NaN/inf values, or mismatched dimensions.
        InsufficientDataError: fewer than 2 samples in the set or in T.
    """
    x = _features(X_layer, "set features")
    if isinstance(T_layer, CompactStats):
        if T_layer.mu.shape != x.shape[1:]:
            raise InputError(f"cannot compare features of dimension {x.shape[1]} with "
                             f"dimension {T_layer.mu.shape[0]}")
        return {"mean": x.mean(axis=0), "std": x.std(axis=0),
                "fid": frechet_to_compact(x, T_layer)}
    ref = T_layer if isinstance(T_layer, GaussianStats) else gaussian_stats(T_layer, "T features")
    if T_root is not None and np.shape(T_root) == ref.cov.shape:
        fid = frechet_to_reference(x, ref, T_root)  # needs no set covariance
    else:
        fid = frechet_distance(gaussian_stats(x, "set features"), ref)
    return {"mean": x.mean(axis=0), "std": x.std(axis=0), "fid": fid}


def set_features(
    layers: Mapping[str, np.ndarray], T_layers: Mapping[str, np.ndarray | GaussianStats]
) -> dict[str, dict]:
    """:func:`mean_std_fid_features` for every layer of one image set.

    Raises:
        InputError: a layer of the set has no reference features in ``T_layers``.
    """
    missing = [name for name in layers if name not in T_layers]
    if missing:
        raise InputError(f"no reference (T) features for layers {missing}")
    return {name: mean_std_fid_features(x, T_layers[name]) for name, x in layers.items()}


def baseline_vector(
    features: Mapping[str, dict], layers: Sequence[str] | None = None
) -> np.ndarray:
    """The vector the baseline matches: all means, then all stds, then all FIDs.

    Args:
        features: ``{layer: {"mean", "std", "fid"}}`` as :func:`set_features` returns.
        layers: layer order (default: the mapping's order); every set must use the same.

    Returns:
        ``(2 * D + K,)`` float64 vector for K layers of total dimension D.
    """
    order = list(features) if layers is None else list(layers)
    if not order:
        raise InputError("no layers to build a baseline vector from")
    missing = [name for name in order if name not in features]
    if missing:
        raise InputError(f"layers {missing} are missing from the set's features")
    means = [np.asarray(features[n]["mean"], dtype=np.float64).reshape(-1) for n in order]
    stds = [np.asarray(features[n]["std"], dtype=np.float64).reshape(-1) for n in order]
    fids = np.array([float(features[n]["fid"]) for n in order])
    return np.concatenate([*means, *stds, fids])


def _cos_rows(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(q)
    dots = r @ q
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


@dataclass(frozen=True)
class BaselineMatcher:
    """The baseline's similarity on :func:`baseline_vector` layouts (higher = closer).

    ``alpha * (cos(means) + cos(stds)) + (1 - alpha) / (1 + ||fids_q - fids_r||)``.
    """

    name: str
    alpha: float
    dim: int
    n_layers: int
    description: str = "the paper's mean/std/FID baseline"

    def score(self, query: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Similarity of ``query`` to each row of ``refs``."""
        q = np.asarray(query, dtype=np.float64).reshape(-1)
        r = np.atleast_2d(np.asarray(refs, dtype=np.float64))
        width = 2 * self.dim + self.n_layers
        if q.size != width or r.shape[1] != width:
            raise InputError(
                f"baseline vectors must have {width} values (2 x {self.dim} + {self.n_layers}), "
                f"got {q.size} and {r.shape[1]}"
            )
        d = self.dim
        cos_part = _cos_rows(q[:d], r[:, :d]) + _cos_rows(q[d : 2 * d], r[:, d : 2 * d])
        distance = np.linalg.norm(r[:, 2 * d :] - q[2 * d :], axis=1)
        return self.alpha * cos_part + (1.0 - self.alpha) / (1.0 + distance)


def baseline_matchers(dims: Sequence[int]) -> list[BaselineMatcher]:
    """``l2`` / ``cosine`` / ``combined`` (alpha 0 / 1 / 0.5) for layers of dimensions ``dims``."""
    dims = [int(d) for d in dims]
    if not dims or min(dims) < 1:
        raise InputError(f"layer dimensions must be positive, got {dims}")
    total, k = sum(dims), len(dims)
    l2, cosine, combined = defaults.PAPER_MATCHERS
    return [
        BaselineMatcher(l2, 0.0, total, k, "baseline: nearest FID (1/(1+|dFID|))"),
        BaselineMatcher(cosine, 1.0, total, k, "baseline: cos(mean) + cos(std)"),
        BaselineMatcher(combined, 0.5, total, k, "baseline: both, alpha = 0.5"),
    ]
