"""Exact moments of a layer's rows, accumulated a chunk of rows at a time.

Every function here reads its rows as ``X[s:e]``, ``chunk_rows`` at a time, converted to
float64 one chunk at a time: ``X`` may be an in-memory array or a memory map of a store
(:mod:`forensics.data.store`), and the working memory beyond the (D, D) sums is one chunk.
An in-memory array is the same code path with one large chunk.

* :class:`Moments`: the count, sum and sum of outer products of the rows, in float64,
  about a shift (the first chunk's mean) so that a large common offset does not cancel.
* :func:`covariance_eigen`: T's mean and covariance eigendecomposition from the moments,
  largest variance first, each axis signed so that its largest-magnitude entry is
  positive (scikit-learn's ``svd_flip`` rule, so its PCA components are these axes).
* :func:`pca`: the mean and leading axes of the partition's PCA. Where scikit-learn's
  ``PCA(svd_solver="auto")`` takes its ``covariance_eigh`` solver (at most 1,000 features
  and at least 10 samples per feature) the streamed covariance gives the same axes to
  rounding. Otherwise scikit-learn's own solver runs on T read whole, as before: T is
  then small (fewer than ``10 D`` rows), or the layer is wider than 1,000 features (read
  whole: a streamed form of scikit-learn's randomized solver is not written yet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

#: Rows per chunk when none is given: 16,384 rows of 768 float64 features are 96 MiB.
DEFAULT_CHUNK_ROWS = 16384
#: scikit-learn's ``covariance_eigh`` rule: at most this many features ...
COVARIANCE_MAX_FEATURES = 1000
#: ... and at least this many samples per feature.
COVARIANCE_MIN_RATIO = 10


def check_chunk_rows(chunk_rows: int | None) -> int:
    """``chunk_rows`` as a positive int (default :data:`DEFAULT_CHUNK_ROWS`)."""
    from forensics.errors import InputError

    if chunk_rows is None:
        return DEFAULT_CHUNK_ROWS
    if int(chunk_rows) != chunk_rows or chunk_rows < 1:
        raise InputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    return int(chunk_rows)


def row_chunks(X, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` for consecutive chunks of ``X``, each as a float64 array."""
    step = check_chunk_rows(chunk_rows)
    for s in range(0, X.shape[0], step):
        yield s, np.asarray(X[s : s + step], dtype=np.float64)


@dataclass
class Moments:
    """Count, sum and sum of outer products of rows about ``shift``, in float64.

    Attributes:
        n: rows added.
        total: (D,) sum of the rows, added row after row in order: the same sum, bit for
            bit, as ``X.sum(axis=0)`` of the whole array (so :attr:`mean` is ``X.mean(0)``).
        shift: (D,) subtracted from every row before summing (the first chunk's mean).
        s1: (D,) sum of the shifted rows.
        s2: (D, D) sum of the shifted rows' outer products.
    """

    n: int = 0
    total: np.ndarray | None = None
    shift: np.ndarray | None = None
    s1: np.ndarray | None = None
    s2: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> Moments:
        """Add a (b, D) chunk of rows."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape[0] == 0:
            return self
        if self.shift is None:
            d = rows.shape[1]
            self.shift = rows.mean(axis=0)
            self.s1, self.s2 = np.zeros(d), np.zeros((d, d))
        # numpy sums axis 0 row after row: carrying the running sum in as the first row
        # keeps that order across chunks.
        self.total = (np.add.reduce(rows, axis=0) if self.total is None
                      else np.add.reduce(np.vstack([self.total[None, :], rows]), axis=0))
        c = rows - self.shift
        self.n += rows.shape[0]
        self.s1 += c.sum(axis=0)
        self.s2 += c.T @ c
        return self

    @property
    def mean(self) -> np.ndarray:
        """(D,) mean of the rows (equal to ``X.mean(axis=0)`` of the whole array)."""
        assert self.total is not None, "no rows added"
        return np.asarray(self.total / self.n)

    def _sums(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.s1 is not None and self.s2 is not None, "no rows added"
        return self.s1, self.s2

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """(D, D) covariance of the rows (``ddof=1``: the unbiased one)."""
        s1, s2 = self._sums()
        m = s1 / self.n
        cov = s2 - self.n * np.outer(m, m)
        cov /= max(self.n - ddof, 1)
        return (cov + cov.T) / 2.0

    def trace(self, ddof: int = 1) -> float:
        """Trace of :meth:`covariance` (the sum of the per-feature variances)."""
        s1, s2 = self._sums()
        m = s1 / self.n
        return float((np.diag(s2) - self.n * m * m).sum() / max(self.n - ddof, 1))


def moments(X, chunk_rows: int | None = None,
            on_chunk: Callable[[int], None] | None = None) -> Moments:
    """:class:`Moments` of the rows of ``X`` (n, D), read a chunk at a time.

    Args:
        X: array-like with ``shape`` and row slicing (an array or a memory map).
        chunk_rows: rows per chunk.
        on_chunk: called with the number of rows of each chunk once it is added
            (e.g. to advance a progress bar).
    """
    out = Moments()
    for _s, rows in row_chunks(X, chunk_rows):
        out.add(rows)
        if on_chunk is not None:
            on_chunk(rows.shape[0])
    return out


@dataclass(frozen=True)
class CovarianceEigen:
    """T's mean and covariance eigendecomposition of one layer, largest variance first.

    Attributes:
        mean: (D,) mean of T.
        values: (r,) eigenvalues of T's covariance (``ddof=1``), in decreasing order.
        vectors: (D, r) the matching eigenvectors as columns, each signed so that its
            largest-magnitude entry is positive (a deterministic orientation). ``r = D``,
            or, when *thin*, ``r = n``: the leading ones only (the rest have no variance).
        trace: the covariance's trace (the sum of T's per-feature variances).
        n: number of samples in T.
    """

    mean: np.ndarray
    values: np.ndarray
    vectors: np.ndarray
    trace: float
    n: int


def orient(vectors: np.ndarray) -> np.ndarray:
    """Columns signed so that each one's largest-magnitude entry is positive (in place)."""
    big = np.argmax(np.abs(vectors), axis=0)
    vectors *= np.where(vectors[big, np.arange(vectors.shape[1])] < 0, -1.0, 1.0)[None, :]
    return vectors


def eigen_of(mom: Moments) -> CovarianceEigen:
    """:class:`CovarianceEigen` (all D axes) from accumulated :class:`Moments`."""
    cov = mom.covariance()
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    return CovarianceEigen(mom.mean, vals[order], orient(vecs[:, order]), float(np.trace(cov)),
                           mom.n)


def covariance_eigen(X, chunk_rows: int | None = None,
                     on_chunk: Callable[[int], None] | None = None) -> CovarianceEigen:
    """T's exact mean and covariance eigendecomposition (all D axes), streamed over rows."""
    return eigen_of(moments(X, chunk_rows, on_chunk))


def covariance_solver(n: int, d: int) -> bool:
    """Whether scikit-learn's ``PCA(svd_solver="auto")`` solves an (n, d) fit from the
    covariance (``covariance_eigh``), as the streamed PCA does."""
    return d <= COVARIANCE_MAX_FEATURES and n >= COVARIANCE_MIN_RATIO * d


@dataclass(frozen=True)
class PCAFit:
    """A PCA fitted on T: ``mean`` (D,), ``components`` (k, D), and the ``solver`` used."""

    mean: np.ndarray
    components: np.ndarray
    solver: str


def pca(X, k: int, *, seed: int = 0, chunk_rows: int | None = None,
        eigen: CovarianceEigen | None = None,
        on_chunk: Callable[[int], None] | None = None) -> PCAFit:
    """The partition's PCA of ``X`` (n, D) to ``k`` axes, as scikit-learn's auto solver fits it.

    ``solver`` is ``covariance`` (streamed, scikit-learn's ``covariance_eigh`` rule: at most
    1,000 features, at least 10 samples per feature) or ``sklearn`` (scikit-learn's own
    ``full`` or seeded ``randomized`` solver on T read whole: T has fewer than ``10 D`` rows,
    or more than 1,000 features). ``eigen``: the covariance eigendecomposition of the same
    rows, if already computed (it is shared with the fingerprints).
    """
    n, d = X.shape
    if not covariance_solver(n, d):
        from sklearn.decomposition import PCA

        fit = PCA(n_components=int(k), random_state=seed).fit(np.asarray(X, dtype=np.float64))
        return PCAFit(np.ascontiguousarray(fit.mean_, dtype=np.float64),
                      np.ascontiguousarray(fit.components_, dtype=np.float64), "sklearn")
    eig = eigen if eigen is not None else covariance_eigen(X, chunk_rows, on_chunk)
    return PCAFit(np.ascontiguousarray(eig.mean),
                  np.ascontiguousarray(eig.vectors[:, : int(k)].T), "covariance")


#: Bytes of float64 rows one projection step converts at a time.
TRANSFORM_BYTES = 256 * 2**20


def transform_rows(d: int) -> int:
    """Rows of ``d`` features converted per step of :func:`transform` (256 MiB of float64)."""
    return max(1, TRANSFORM_BYTES // (8 * max(int(d), 1)))


def transform(X, mean: np.ndarray, components: np.ndarray,
              chunk_rows: int | None = None) -> np.ndarray:
    """``(X - mean) @ components.T`` for every row, a chunk at a time: (n, k) float64."""
    out = np.empty((X.shape[0], components.shape[0]), dtype=np.float64)
    for s, rows in row_chunks(X, chunk_rows):
        out[s : s + rows.shape[0]] = (rows - mean) @ components.T
    return out


def check_rows(X, what: str, max_abs: float, chunk_rows: int | None = None) -> None:
    """Refuse ``X`` holding NaN, infinities or values beyond ``max_abs``, read by chunks.

    Raises:
        InputError: the message names ``what`` and says what to do.
    """
    from forensics.errors import InputError

    largest = 0.0
    for _s, rows in row_chunks(X, chunk_rows):
        if not np.all(np.isfinite(rows)):
            raise InputError(f"{what} holds NaN or infinite values")
        if rows.size:
            largest = max(largest, float(np.abs(rows).max()))
    if largest > max_abs:
        raise InputError(f"{what} holds values as large as {largest:.3g}; PCA, KMeans and "
                         f"distances need values below {max_abs:g} in magnitude (their "
                         f"squares must stay finite): scale the embeddings down")
