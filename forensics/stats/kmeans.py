"""KMeans of a partition's projected training rows: scikit-learn's, or FAISS's beyond a size.

Up to :data:`SKLEARN_MAX_ROWS` rows the paper's scikit-learn ``KMeans`` runs (Lloyd,
k-means++ seeding, ``n_init`` restarts, seeded), so baselines of that size are He et
al.'s cells exactly. Beyond it ``faiss.Kmeans`` runs on the same projections in float32
(``n_init`` restarts, the best kept; every row used, no subsample), which needs half the
memory and none of scikit-learn's copies; the baseline records ``kmeans: faiss`` in its
layers' partition parameters. ``docs/benchmarks.md`` measures what the switch does to
C_T on a size both can run.
"""

from __future__ import annotations

import numpy as np

#: Most rows clustered by scikit-learn's KMeans (n x pca_dim float64 plus its copy: 2 GiB
#: at 64 dimensions); beyond, FAISS.
SKLEARN_MAX_ROWS = 2_000_000
#: Lloyd iterations of each FAISS restart.
FAISS_ITERATIONS = 50
BACKENDS = ("auto", "sklearn", "faiss")


def backend_for(n: int, backend: str = "auto") -> str:
    """``sklearn`` or ``faiss`` for ``n`` rows (``auto``: by :data:`SKLEARN_MAX_ROWS`)."""
    from forensics.errors import InputError

    if backend not in BACKENDS:
        raise InputError(f"unknown KMeans backend {backend!r}; choose one of "
                         f"{', '.join(BACKENDS)}")
    if backend == "auto":
        return "sklearn" if n <= SKLEARN_MAX_ROWS else "faiss"
    return backend


def fit_centroids(Z: np.ndarray, n_cells: int, *, n_init: int, seed: int,
                  backend: str = "auto") -> tuple[np.ndarray, str]:
    """Centroids (n_cells, d) float64 of the rows ``Z`` (n, d), and the backend used."""
    used = backend_for(Z.shape[0], backend)
    if used == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=int(n_cells), n_init=int(n_init), random_state=seed).fit(Z)
        return np.ascontiguousarray(km.cluster_centers_, dtype=np.float64), used
    import faiss

    z32 = np.ascontiguousarray(Z, dtype=np.float32)
    km = faiss.Kmeans(z32.shape[1], int(n_cells), niter=FAISS_ITERATIONS, nredo=int(n_init),
                      seed=int(seed), max_points_per_centroid=max(z32.shape[0], 1),
                      verbose=False)
    km.train(z32)
    return np.ascontiguousarray(km.centroids, dtype=np.float64), used
