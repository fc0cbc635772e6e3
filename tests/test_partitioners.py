"""Built-in partitioners: the paper's PCA + KMeans cells and caller-given cells."""

from __future__ import annotations

import numpy as np
import pytest

from forensics.errors import InputError, InsufficientDataError
from forensics.plugin import manager as plugins


def blobs(n: int, dim: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(scale=5.0, size=(4, dim))
    return centers[rng.integers(0, 4, n)] + rng.normal(size=(n, dim))


def test_builtin_partitioners_are_registered():
    assert {"kmeans", "given"} <= set(plugins.names("partitioners"))
    for name in ("kmeans", "given"):
        assert plugins.get("partitioners", name).description
        assert plugins.registry("partitioners")[name].plugin == "fp_plugins.partitioners"


def test_kmeans_matches_sklearn_pca_and_kmeans():
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    T, X = blobs(300), blobs(50, seed=1)
    part = plugins.get("partitioners", "kmeans").fit(T, seed=3, n_cells=4, pca_dim=5, n_init=2)
    pca = PCA(5, random_state=3).fit(T)
    km = KMeans(4, n_init=2, random_state=3).fit(pca.transform(T))
    assert part.n_cells == 4 and part.components.shape == (5, 12)
    np.testing.assert_allclose(part.transform(X), pca.transform(X), atol=1e-10)
    np.testing.assert_allclose(part.centroids, km.cluster_centers_, atol=1e-10)
    np.testing.assert_array_equal(part.assign(X), km.predict(pca.transform(X)))
    np.testing.assert_array_equal(part.cells(part.transform(X)), part.assign(X))
    assert part.params == {"n_cells": 4, "pca_dim": 5, "n_init": 2, "seed": 3}


def test_kmeans_defaults_are_the_papers():
    part = plugins.get("partitioners", "kmeans").fit(blobs(200, dim=80), seed=0)
    assert part.n_cells == 10 and part.components.shape == (64, 80)


def test_pca_dim_is_capped_by_samples_and_features():
    km = plugins.get("partitioners", "kmeans")
    assert km.fit(blobs(100, dim=7), n_cells=3).components.shape == (7, 7)
    assert km.fit(blobs(20, dim=30), n_cells=3).components.shape == (20, 30)


def test_kmeans_is_deterministic_and_seeded():
    km = plugins.get("partitioners", "kmeans")
    T = blobs(400, dim=20)
    a, b = km.fit(T, seed=5, n_cells=6), km.fit(T, seed=5, n_cells=6)
    for key in ("mean", "components", "centroids"):
        assert a.to_arrays()[key].tobytes() == b.to_arrays()[key].tobytes()
    c = km.fit(T, seed=6, n_cells=6)
    assert not np.array_equal(np.sort(c.centroids, axis=0), np.sort(a.centroids, axis=0)) or \
        np.array_equal(c.assign(T), a.assign(T))


def test_kmeans_round_trips_through_arrays():
    km = plugins.get("partitioners", "kmeans")
    T = blobs(150)
    part = km.fit(T, n_cells=3)
    again = km.from_arrays({k: v.copy() for k, v in part.to_arrays().items()}, part.params)
    np.testing.assert_array_equal(again.assign(T), part.assign(T))
    assert again.params == part.params


def test_kmeans_needs_as_many_samples_as_cells():
    with pytest.raises(InsufficientDataError, match="at least 10 training samples"):
        plugins.get("partitioners", "kmeans").fit(blobs(6))


@pytest.mark.parametrize("params", [{"n_cells": 0}, {"pca_dim": -1}, {"n_init": 1.5}])
def test_kmeans_rejects_bad_parameters(params):
    with pytest.raises(InputError, match=next(iter(params))):
        plugins.get("partitioners", "kmeans").fit(blobs(50), **params)


def test_kmeans_rejects_other_layers_features():
    part = plugins.get("partitioners", "kmeans").fit(blobs(50), n_cells=2)
    with pytest.raises(InputError, match="same layer"):
        part.assign(np.zeros((3, 5)))


def test_given_uses_the_labels_and_cannot_assign():
    given = plugins.get("partitioners", "given")
    T = blobs(10)
    part = given.fit(T, labels=np.array([0, 1, 2, 2, 1, 0, 0, 4, 4, 1]))
    assert part.n_cells == 5
    np.testing.assert_array_equal(part.transform(T), T)
    with pytest.raises(InputError, match="Q_cells"):
        part.assign(T)
    assert given.from_arrays(part.to_arrays(), part.params).n_cells == 5


@pytest.mark.parametrize(
    "labels, match",
    [(None, "T_cells"), (np.array([0, 1]), "one cell label per sample"),
     (np.array([0, -1, 1, 1, 0, 0, 1, 1, 0, 1]), ">= 0"),
     (np.full(10, 0.5), "integer")],
)
def test_given_rejects_bad_labels(labels, match):
    with pytest.raises(InputError, match=match):
        plugins.get("partitioners", "given").fit(blobs(10), labels=labels)
