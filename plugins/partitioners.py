"""Built-in partitioners: ``kmeans`` (the paper's cells) and ``given`` (caller's labels).

A partitioner's ``fit(T, *, seed, **params)`` returns a *fitted partition*: an object with

* ``n_cells`` (int) and ``params`` (a JSON-able dict of everything needed to rebuild it),
* ``transform(X) -> (len(X), d)`` float64: the space where cells and nearest-neighbour
  distances live,
* ``cells(Z) -> (len(Z),)`` int64 cell labels of samples already transformed, and
  ``assign(X)``, the same for raw samples,
* ``to_arrays() -> dict[str, np.ndarray]``: its numeric state, stored without pickle;

and the partitioner's ``from_arrays(arrays, params)`` rebuilds it.

``kmeans`` reproduces He et al.'s pipeline: PCA to ``pca_dim`` (64) dimensions fitted on T
(fewer when T has fewer samples or features), then KMeans with ``n_cells`` (10) clusters and
``n_init`` (10) restarts fitted on the projected T; both seeded. Samples are assigned to
the nearest centroid in the projected space, and distances are measured there too, as in the
paper's code. T is read a chunk of rows at a time (:mod:`forensics.stats.streaming`): the PCA
comes from T's streamed covariance where scikit-learn's own solver would use it (at least 10
samples per feature, at most 1,000 features), else from scikit-learn's solver on T read whole
(a small T, or a wide layer); KMeans is scikit-learn's up to
:data:`forensics.stats.kmeans.SKLEARN_MAX_ROWS` projected rows, FAISS's beyond.

``given`` uses cell labels supplied by the caller (the API of Meehan et al.'s test) and
leaves the space as it is; it cannot assign new samples, so every set needs its labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from forensics.plugin.hookspecs import hookimpl


def _input_error(message: str):
    from forensics.errors import InputError

    return InputError(message)


def _matrix(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise _input_error(f"{what} must be a 2-D array (samples, features), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def nearest_centroid(X: np.ndarray, centroids: np.ndarray, rows: int = 65536) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean) of each row of ``X``; first on ties."""
    c_sq = (centroids * centroids).sum(axis=1)
    out = np.empty(X.shape[0], dtype=np.int64)
    for s in range(0, X.shape[0], rows):
        block = c_sq[None, :] - 2.0 * (X[s : s + rows] @ centroids.T)
        out[s : s + rows] = block.argmin(axis=1)
    return out


@dataclass
class KMeansPartition:
    """A fitted ``kmeans`` partition: PCA projection plus KMeans centroids."""

    mean: np.ndarray
    components: np.ndarray
    centroids: np.ndarray
    params: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return int(self.centroids.shape[0])

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project raw samples (len, D) onto the PCA components: (len, d) float64.

        ``X`` is converted to float64 a chunk of rows at a time (it may be a memory map).
        """
        from forensics.stats.streaming import transform, transform_rows

        X = X if hasattr(X, "shape") and hasattr(X, "dtype") else np.asarray(X)
        if len(X.shape) != 2:
            raise _input_error(f"samples must be a 2-D array (samples, features), got shape "
                               f"{X.shape}")
        if X.shape[1] != self.mean.shape[0]:
            raise _input_error(
                f"samples have {X.shape[1]} features but the partition was fitted on "
                f"{self.mean.shape[0]}: use embeddings of the same layer"
            )
        return transform(X, self.mean, self.components, transform_rows(X.shape[1]))

    def cells(self, Z: np.ndarray) -> np.ndarray:
        """Cell labels (len,) int64 of projected samples: the nearest centroid."""
        return nearest_centroid(np.asarray(Z, dtype=np.float64), self.centroids)

    def assign(self, X: np.ndarray) -> np.ndarray:
        """Cell labels (len,) int64 of raw samples."""
        return self.cells(self.transform(X))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numeric state for storage without pickle."""
        return {"mean": self.mean, "components": self.components, "centroids": self.centroids}


@dataclass(frozen=True)
class KMeansPartitioner:
    """PCA (fitted on T) then KMeans (fitted on projected T), as in He et al.'s code."""

    name: str = "kmeans"
    description: str = "PCA to 64 dims then KMeans(10 cells, n_init=10), both fitted on T"

    def fit(
        self,
        T: np.ndarray,
        *,
        seed: int = 0,
        n_cells: int = 10,
        pca_dim: int = 64,
        n_init: int = 10,
        kmeans: str = "auto",
        chunk_rows: int | None = None,
        eigen=None,
        on_chunk=None,
    ) -> KMeansPartition:
        """Fit the projection and the cells on the training embeddings ``T`` (n_T, D).

        Args:
            T: training embeddings (an array or a memory map, read a chunk at a time).
            seed: seed of the PCA solver and of KMeans.
            n_cells: number of KMeans clusters.
            pca_dim: PCA dimensions (capped at the number of samples and of features).
            n_init: KMeans restarts.
            kmeans: ``auto`` (scikit-learn up to a size, then FAISS), ``sklearn`` or
                ``faiss``; a FAISS fit is recorded as ``kmeans: faiss`` in ``params``.
            chunk_rows: rows of T read at a time.
            eigen: T's covariance eigendecomposition, if the caller computed it already.
            on_chunk: called with the rows of each chunk read for the PCA (progress).

        Raises:
            InputError: a parameter is out of range.
            InsufficientDataError: T has fewer samples than cells.
        """
        from forensics.errors import InsufficientDataError
        from forensics.stats.kmeans import fit_centroids
        from forensics.stats.streaming import pca

        T = T if hasattr(T, "shape") and hasattr(T, "dtype") else _matrix(T, "T")
        if len(T.shape) != 2:
            raise _input_error(f"T must be a 2-D array (samples, features), got shape {T.shape}")
        for pname, value in (("n_cells", n_cells), ("pca_dim", pca_dim), ("n_init", n_init)):
            if int(value) != value or value < 1:
                raise _input_error(
                    f"kmeans parameter {pname} must be a positive integer, got {value}")
        if T.shape[0] < n_cells:
            raise InsufficientDataError(
                f"kmeans with {n_cells} cells needs at least {n_cells} training samples, "
                f"T has {T.shape[0]}: supply more training images or lower n_cells"
            )
        dim = int(min(T.shape[0], T.shape[1], pca_dim))
        fit = pca(T, dim, seed=seed, chunk_rows=chunk_rows, eigen=eigen, on_chunk=on_chunk)
        params = {"n_cells": int(n_cells), "pca_dim": int(pca_dim), "n_init": int(n_init),
                  "seed": int(seed)}
        partition = KMeansPartition(mean=fit.mean, components=fit.components,
                                    centroids=np.empty((0, dim)), params=params)
        centroids, used = fit_centroids(partition.transform(T), int(n_cells),
                                        n_init=int(n_init), seed=seed, backend=kmeans)
        partition.centroids = centroids
        if used != "sklearn":
            params["kmeans"] = used
        return partition

    def from_arrays(self, arrays: dict[str, np.ndarray], params: dict) -> KMeansPartition:
        """Rebuild a fitted partition from :meth:`KMeansPartition.to_arrays` and its params."""
        return KMeansPartition(
            mean=np.asarray(arrays["mean"], dtype=np.float64),
            components=np.asarray(arrays["components"], dtype=np.float64),
            centroids=np.asarray(arrays["centroids"], dtype=np.float64),
            params=dict(params),
        )


@dataclass
class GivenPartition:
    """Cells given by the caller; the space is left as it is."""

    n_cells: int
    params: dict = field(default_factory=dict)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """The identity (as float64)."""
        return _matrix(X, "samples")

    def cells(self, Z: np.ndarray) -> np.ndarray:
        """Not possible: the ``given`` partitioner has no rule for new samples."""
        raise _input_error(
            "the 'given' partitioner cannot assign cells to new samples: pass their cell "
            "labels (e.g. Q_cells), or use the 'kmeans' partitioner"
        )

    def assign(self, X: np.ndarray) -> np.ndarray:
        """Not possible: see :meth:`cells`."""
        return self.cells(X)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """No numeric state."""
        return {}


@dataclass(frozen=True)
class GivenPartitioner:
    """Cell labels supplied by the caller, as in Meehan et al.'s API."""

    name: str = "given"
    description: str = "cell labels supplied by the caller (T_cells, P_cells, Q_cells)"

    def fit(
        self, T: np.ndarray, *, seed: int = 0, labels: np.ndarray | None = None,
        n_cells: int | None = None,
    ) -> GivenPartition:
        """Take ``labels`` (n_T,) as T's cells; ``n_cells`` defaults to ``max(labels) + 1``."""
        from forensics.stats.ct import check_labels

        if labels is None:
            raise _input_error("the 'given' partitioner needs T's cell labels (T_cells)")
        labels = check_labels(labels, np.asarray(T).shape[0], "T_cells")
        k = int(labels.max()) + 1 if labels.size else 0
        if n_cells is not None:
            if n_cells < k:
                raise _input_error(f"n_cells={n_cells} but T_cells holds label {k - 1}")
            k = int(n_cells)
        return GivenPartition(n_cells=k, params={"n_cells": k})

    def from_arrays(self, arrays: dict[str, np.ndarray], params: dict) -> GivenPartition:
        """Rebuild from stored params."""
        return GivenPartition(n_cells=int(params["n_cells"]), params=dict(params))


PARTITIONERS = (KMeansPartitioner(), GivenPartitioner())


@hookimpl(trylast=True)
def register_partitioners(register):
    for partitioner in PARTITIONERS:
        register(partitioner)
