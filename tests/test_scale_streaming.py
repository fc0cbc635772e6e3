"""Streamed moments, covariance and PCA equal the in-memory ones (1e-10), read by chunks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from forensics.data.store import LayerStore, StoreWriter, write_store
from forensics.errors import InputError
from forensics.stats import streaming
from forensics.stats.fingerprints import covariance_eigen as in_memory_eigen
from forensics.stats.kmeans import backend_for, fit_centroids


def layer(n, d=40, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(d, d)) * np.linspace(2.0, 0.1, d)[:, None]
    return (rng.normal(size=(n, d)) @ basis + offset).astype(np.float32)


@pytest.mark.parametrize("chunk_rows", [1, 97, 300, 10**6])
def test_moments_equal_numpy(chunk_rows):
    X = layer(900)
    mom = streaming.moments(X, chunk_rows=chunk_rows)
    X64 = X.astype(np.float64)
    np.testing.assert_array_equal(mom.mean, X64.mean(axis=0))  # bit for bit
    np.testing.assert_allclose(mom.covariance(), np.cov(X64, rowvar=False), rtol=1e-12,
                               atol=1e-12)
    assert mom.trace() == pytest.approx(np.trace(np.cov(X64, rowvar=False)), rel=1e-12)
    assert mom.n == 900


def old_covariance_eigen(T):
    """The in-memory (D, D) decomposition as fp computed it before it was streamed."""
    X = np.asarray(T, dtype=np.float64)
    n = X.shape[0]
    mean = X.mean(axis=0)
    Xc = X - mean
    cov = Xc.T @ Xc / max(n - 1, 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs, trace = vals[order], vecs[:, order], float(np.trace(cov))
    big = np.argmax(np.abs(vecs), axis=0)
    vecs *= np.where(vecs[big, np.arange(vecs.shape[1])] < 0, -1.0, 1.0)[None, :]
    return vals, vecs, mean, trace


def test_covariance_eigen_equals_in_memory():
    X = layer(2000)
    vals, vecs, mean, trace = old_covariance_eigen(X)
    for got in (streaming.covariance_eigen(X, chunk_rows=300), in_memory_eigen(X, thin=False)):
        np.testing.assert_allclose(got.values, vals, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got.vectors, vecs, rtol=0, atol=1e-10)
        np.testing.assert_allclose(got.mean, mean, rtol=0, atol=1e-10)
        assert got.trace == pytest.approx(trace, rel=1e-12) and got.n == 2000


def test_pca_equals_sklearn_in_its_covariance_regime():
    X = layer(3000, d=40)  # >= 10 samples per feature: sklearn's covariance_eigh
    ref = PCA(n_components=16, random_state=0).fit(X.astype(np.float64))
    got = streaming.pca(X, 16, chunk_rows=250)
    assert got.solver == "covariance"
    np.testing.assert_allclose(got.components, ref.components_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.mean, ref.mean_, rtol=0, atol=1e-10)


def test_small_pca_is_sklearns_own():
    X = layer(300, d=40)  # < 10 samples per feature: read whole, sklearn's solver
    ref = PCA(n_components=16, random_state=0).fit(X.astype(np.float64))
    got = streaming.pca(X, 16, chunk_rows=50)
    assert got.solver == "sklearn"
    np.testing.assert_array_equal(got.components, ref.components_)


def test_pca_from_a_memory_mapped_store(tmp_path):
    X = layer(3000)
    store = write_store(tmp_path / "s", ["a"], [X], chunk_rows=700)
    got = streaming.pca(LayerStore.open(store.root).layer(0), 8, chunk_rows=300)
    ref = streaming.pca(X, 8, chunk_rows=10**6)
    np.testing.assert_allclose(got.components, ref.components, rtol=0, atol=1e-10)


def test_transform_by_chunks_equals_one_product():
    X = layer(1000)
    fit = streaming.pca(X, 8)
    np.testing.assert_allclose(streaming.transform(X, fit.mean, fit.components, 77),
                               (X.astype(np.float64) - fit.mean) @ fit.components.T,
                               rtol=0, atol=1e-12)


def test_check_rows_names_the_array():
    X = layer(50)
    X[33, 2] = np.nan
    with pytest.raises(InputError, match="layer 'x': T holds NaN"):
        streaming.check_rows(X, "layer 'x': T", 1e100, chunk_rows=7)
    with pytest.raises(InputError, match="as large as"):
        streaming.check_rows(np.full((3, 2), 1e101), "T", 1e100)


def test_bad_chunk_rows():
    with pytest.raises(InputError, match="chunk_rows"):
        list(streaming.row_chunks(np.zeros((3, 2)), 0))


def test_store_round_trip_and_incomplete_store(tmp_path):
    A, B = layer(500, d=6), layer(500, d=3, seed=1)
    w = StoreWriter(tmp_path / "s", ["a", "b"], [6, 3], 500)
    w.write(0, [A[:200], B[:200]])
    with pytest.raises(InputError, match="never written"):
        w.close()
    with pytest.raises(InputError, match="no complete embedding store"):
        LayerStore.open(tmp_path / "s")
    w.write(200, [A[200:], B[200:]])
    store = w.close(hashes=[f"h{i}" for i in range(500)], encoder="e")
    again = LayerStore.open(tmp_path / "s")
    assert again.layers == ["a", "b"] and again.dims == [6, 3] and len(again) == 500
    np.testing.assert_array_equal(again.layer(0), A)
    np.testing.assert_array_equal(again.arrays[1], B)
    assert again.meta["encoder"] == "e" and store.nbytes() > A.nbytes + B.nbytes


def test_kmeans_backend_switch():
    assert backend_for(10) == "sklearn"
    assert backend_for(10**9) == "faiss"
    with pytest.raises(InputError, match="sklearn, faiss"):
        backend_for(10, "other")
    rng = np.random.default_rng(0)
    centers = 20.0 * np.eye(5)[:4]
    Z = centers[rng.integers(0, 4, 2000)] + rng.normal(size=(2000, 5))
    sk, used = fit_centroids(Z, 4, n_init=3, seed=0)
    fa, used_f = fit_centroids(Z, 4, n_init=3, seed=0, backend="faiss")
    assert (used, used_f) == ("sklearn", "faiss")
    # Well-separated clusters: both find the same centres (in some order).
    match = np.abs(sk[:, None, :] - fa[None, :, :]).max(axis=2).min(axis=1)
    assert match.max() < 0.2
