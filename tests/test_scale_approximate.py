"""The approximate (IVF) search: on request only, recorded, and measured against exact."""

from __future__ import annotations

import numpy as np
import pytest

from forensics.errors import InputError
from forensics.plugin import manager as plugins
from forensics.stats.baseline import baseline_key
from forensics.stats.neighbours import IVF, CellSearch, parse_search
from forensics.steps.baseline_files import load_engine, save_engine
from forensics.steps.engine import build_engine


def clustered(n, d=16, centres=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * 4
    return c[rng.integers(0, centres, n)] + rng.normal(size=(n, d))


def one_cell(metric, spec, n=4000, m=300):
    dist = plugins.get("distances", metric)
    T, Z = clustered(n), clustered(m, seed=1)
    offsets = np.array([0, n])
    search = CellSearch(dist, T, offsets, faiss=spec)
    exact = CellSearch(dist, T, offsets, faiss="never")
    labels = np.zeros(m, dtype=np.int64)
    return search.search(Z, labels), exact.search(Z, labels), search


def test_search_specs_parse_and_bad_ones_are_named():
    assert parse_search("auto") is None and parse_search("never") is None
    assert parse_search("ivf") == IVF()
    assert parse_search("ivf:nprobe=4,nlist=64,min_rows=0") == IVF(64, 4, 0)
    assert parse_search("ivf:nlist=auto").spec == IVF().spec
    for bad, says in (("fast", "must be one of"), ("ivf:nprobe=0", "nprobe"),
                      ("ivf:k=3", "unknown or repeated key 'k'"),
                      ("ivf:nprobe=2,nprobe=3", "repeated"), ("ivf:nlist=x", "nlist")):
        with pytest.raises(InputError, match=says):
            parse_search(bad)


@pytest.mark.parametrize("metric", ["abscosine", "euclidean"])
def test_probing_every_list_is_exact_and_few_lists_only_ever_overestimate(metric):
    (d, i), (de, ie), search = one_cell(metric, "ivf:nlist=32,nprobe=32,min_rows=0")
    assert search.approximate == 300
    np.testing.assert_array_equal(i, ie)
    np.testing.assert_allclose(d, de, rtol=1e-12, atol=1e-12)
    (d, i), (de, ie), search = one_cell(metric, "ivf:nlist=64,nprobe=1,min_rows=0")
    recall = np.mean(i == ie)
    assert 0.3 < recall < 1.0  # one list of 64 misses some nearest rows here
    assert np.all(d >= de - 1e-12)  # a missed neighbour is a farther one, never nearer
    np.testing.assert_allclose(d[i == ie], de[i == ie], rtol=1e-12, atol=1e-12)


def test_cells_below_min_rows_stay_exact_and_runs_are_identical():
    (d, i), (de, ie), search = one_cell("euclidean", "ivf:nprobe=1,min_rows=5000")
    assert search.approximate == 0
    np.testing.assert_array_equal(i, ie)
    a = one_cell("euclidean", "ivf:nlist=64,nprobe=2,min_rows=0")[0]
    b = one_cell("euclidean", "ivf:nlist=64,nprobe=2,min_rows=0")[0]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_a_distance_faiss_cannot_search_is_refused():
    class Odd:
        name = "odd"
        metric = "manhattan"

    with pytest.raises(InputError, match="approximate search needs a distance"):
        CellSearch(Odd(), np.zeros((3, 2)), np.array([0, 3]), faiss="ivf")


def test_baseline_records_the_approximate_search_and_queries_with_it(tmp_path,
                                                                    monkeypatch):
    T = [clustered(3000, seed=2)]
    P, Q = [clustered(800, seed=3)], [clustered(300, seed=4)]
    params = {"n_cells": 2, "n_init": 1}
    exact = build_engine(T, P, ["l"], partitioner_params=params)
    same = build_engine(T, P, ["l"], partitioner_params=params, search="always")
    assert exact.id == same.id and "search" not in exact.meta  # exact modes: one baseline
    approx = build_engine(T, P, ["l"], partitioner_params=params,
                          search="ivf:nlist=16,nprobe=1,min_rows=0")
    assert approx.meta["search"] == "ivf:nlist=16,nprobe=1,min_rows=0"
    assert approx.id != exact.id
    assert approx.id == baseline_key(T, P, ["l"], partitioner_params=params,
                                     search="ivf:nprobe=1,nlist=16,min_rows=0")[0]
    assert not np.array_equal(approx.layers[0].p_dist, exact.layers[0].p_dist)
    assert np.all(np.sort(approx.layers[0].p_dist) >= np.sort(exact.layers[0].p_dist) - 1e-12)
    loaded = load_engine(save_engine(approx, tmp_path / "b"))
    assert loaded.search == approx.meta["search"]
    built = approx.layers[0].ivf_centroids
    assert built and loaded.layers[0].ivf_centroids.keys() == built.keys()
    for c, v in built.items():
        assert v.shape == (16, approx.layers[0].t_points.shape[1])
        np.testing.assert_array_equal(loaded.layers[0].ivf_centroids[c], v)
    import faiss

    def no_training(*_a, **_k):
        raise AssertionError("a stored baseline's lists were trained again")

    monkeypatch.setattr(faiss.IndexIVFFlat, "train", no_training)
    assert loaded.query(Q, details=True)[0].ct == approx.query(Q)[0].ct
    np.testing.assert_array_equal(loaded.query(Q, details=True)[0].details["nn_index"],
                                  approx.query(Q, details=True)[0].details["nn_index"])
    assert "ivf.0" not in "".join(exact.layers[0].arrays())  # exact baselines store none
    with pytest.raises(InputError, match="must be one of"):
        build_engine(T, P, ["l"], search="approximate")
