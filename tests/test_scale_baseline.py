"""A baseline built from a store, a few hundred rows at a time, is the in-memory one."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from forensics.data.store import LayerStore, write_store
from forensics.stats.baseline import array_digest
from forensics.steps.engine import build_engine


def layers(n_t=1500, n_p=500, n_q=200, dim=24, n_layers=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_layers):
        centers = rng.normal(scale=3.0, size=(6, dim))
        draw = lambda n, c=centers: (c[rng.integers(0, 6, n)]  # noqa: E731
                                     + rng.normal(size=(n, dim))).astype(np.float32)
        T = draw(n_t)
        Q = np.concatenate([T[:n_q // 2] + 0.01, draw(n_q - n_q // 2)]).astype(np.float32)
        out.append((T, draw(n_p), Q))
    return out


@pytest.fixture(scope="module")
def data():
    return layers()


def build(T, P, **kw):
    return build_engine(T, P, [f"l{i}" for i in range(len(T))], partitioner_params={
        "n_cells": 5, "pca_dim": 8, "n_init": 3}, **kw)


def test_store_with_small_chunks_gives_the_same_baseline(data, tmp_path):
    T = [t for t, _, _ in data]
    P = [p for _, p, _ in data]
    names = [f"l{i}" for i in range(len(T))]
    ts = LayerStore.open(write_store(tmp_path / "T", names, T, chunk_rows=256).root)
    ps = LayerStore.open(write_store(tmp_path / "P", names, P, chunk_rows=256).root)
    memory = build(T, P)
    streamed = build(ts.arrays, ps.arrays, chunk_rows=300)
    assert streamed.id == memory.id
    for a, b in zip(memory.layers, streamed.layers, strict=True):
        for key, value in a.arrays().items():
            other = b.arrays()[key]
            if value.dtype.kind in "iu":
                np.testing.assert_array_equal(other, value)
            else:
                np.testing.assert_allclose(other, value, rtol=1e-10, atol=1e-10)
    Q = [q for _, _, q in data]
    for a, b in zip(memory.query(Q), streamed.query(Q), strict=True):
        assert a.ct == pytest.approx(b.ct, abs=1e-10)


def test_partition_equals_the_papers_sklearn_fit(data):
    T, P, _ = data[0]
    lb = build([T], [P], chunk_rows=200).layers[0]
    pca = PCA(n_components=8, random_state=0).fit(T.astype(np.float64))
    Zt = pca.transform(T.astype(np.float64))
    km = KMeans(n_clusters=5, n_init=3, random_state=0).fit(Zt)
    np.testing.assert_allclose(lb.partition.mean, pca.mean_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(lb.partition.components, pca.components_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(lb.partition.centroids, km.cluster_centers_, rtol=0, atol=1e-10)
    assert "kmeans" not in lb.partition.params  # scikit-learn's, as in the paper


def test_faiss_search_gives_the_same_baseline_and_curve(data):
    T = [t for t, _, _ in data]
    P = [p for _, p, _ in data]
    Q = [q for _, _, q in data]
    exact = build(T, P, search="never")
    faiss = build(T, P, search="always")
    for a, b in zip(exact.layers, faiss.layers, strict=True):
        np.testing.assert_allclose(b.p_dist, a.p_dist, rtol=0, atol=2e-15)
    for a, b in zip(exact.query(Q, details=True), faiss.query(Q, details=True), strict=True):
        assert a.ct == b.ct
        np.testing.assert_array_equal(a.details["nn_index"], b.details["nn_index"])


def test_digest_by_chunks_equals_the_whole(data, tmp_path):
    T = data[0][0]
    store = LayerStore.open(write_store(tmp_path / "s", ["a"], [T]).root)
    assert array_digest(store.layer(0), chunk_rows=100) == array_digest(T)
    assert array_digest(T, chunk_rows=7) == array_digest(T)


def test_kmeans_backend_is_recorded_when_faiss_runs(data):
    T, P, _ = data[0]
    base = build_engine([T], [P], ["l0"], partitioner_params={
        "n_cells": 5, "pca_dim": 8, "n_init": 3, "kmeans": "faiss"})
    assert base.layers[0].partition.params["kmeans"] == "faiss"
    assert base.meta["layers"][0]["partition"]["kmeans"] == "faiss"


def test_fingerprint_arrays_from_a_store_equal_the_in_memory_ones(data, tmp_path):
    from forensics.plugin import manager
    from forensics.stats import fingerprints as fpmod

    T = [t for t, _, _ in data] + [data[0][0][:, :20] * 2.0]  # 4 layers: resid has content
    P = [p for _, p, _ in data] + [data[0][1][:, :20]]
    names = [f"l{i}" for i in range(len(T))]
    ts = LayerStore.open(write_store(tmp_path / "T", names, T, chunk_rows=256).root)
    memory = fpmod.PrepareContext(names, T, P, None, chunk_rows=10**9)
    shared: dict = {}
    base = build_engine(ts.arrays, P, names, chunk_rows=250, shared=shared,
                        partitioner_params={"n_cells": 5, "pca_dim": 8, "n_init": 3})
    streamed = fpmod.PrepareContext(names, ts.arrays, P, base, shared, chunk_rows=250)
    assert ("covariance_eigen", "train", 0, False) in shared  # T read once for both
    fps = [fp for fp in (manager.get("fingerprints", n) for n in manager.names("fingerprints"))
           if fpmod.needs_extras(fp)]
    assert len(fps) >= 5
    for fp in fps:
        a, b = fp.prepare(memory), fp.prepare(streamed)
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-10, atol=1e-10, err_msg=key)


def test_a_store_is_never_read_whole(data, tmp_path, monkeypatch):
    from forensics.data.store import LayerRows

    def refuse(self, dtype=None, copy=None):
        raise AssertionError("a whole layer was read")

    T = [t for t, _, _ in data]
    P = [p for _, p, _ in data]
    names = [f"l{i}" for i in range(len(T))]
    ts = LayerStore.open(write_store(tmp_path / "T", names, T).root)
    ps = LayerStore.open(write_store(tmp_path / "P", names, P).root)
    monkeypatch.setattr(LayerRows, "__array__", refuse)
    streamed = build(ts.arrays, ps.arrays, chunk_rows=300)
    assert streamed.id == build(T, P).id
