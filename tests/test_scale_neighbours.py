"""Float32 candidates + float64 re-rank: the exact nearest neighbour, golden C_T to 1e-9."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forensics.plugin import manager as plugins
from forensics.stats.ct import ct_from_distances
from forensics.stats.neighbours import MAX_TIES, CellSearch, searchable
from forensics.steps.engine import ct_score

GOLDEN = Path(__file__).parent / "data" / "golden" / "ct"
CASES = json.loads((GOLDEN / "index.json").read_text())
REFERENCES = {"euclidean": "l2_meehan", "abscosine": "abscos_layerchoice"}
METRICS = ("abscosine", "cosine", "euclidean", "sqeuclidean")


def grouped(X, labels, k):
    order = np.argsort(labels, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))])
    return np.ascontiguousarray(X[order], dtype=np.float64), order, offsets


def numpy_path(dist, Z, labels, points, offsets):
    """Today's per-cell exact search (the plugin's numpy path)."""
    d = np.full(Z.shape[0], np.nan)
    i = np.full(Z.shape[0], -1)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        d[rows], j = dist._search_numpy(Z[rows], points[offsets[c] : offsets[c + 1]])
        i[rows] = j + offsets[c]
    return d, i


def faiss_ct(d, distance, candidates=8):
    dist = plugins.get("distances", distance)
    k = int(max(d["T_cells"].max(), d["P_cells"].max(), d["Q_cells"].max())) + 1
    points, _order, offsets = grouped(d["T"], d["T_cells"], k)
    search = CellSearch(dist, points, offsets, candidates=candidates, faiss="always")
    dP, _ = search.search(np.asarray(d["P"], dtype=np.float64), d["P_cells"])
    dQ, _ = search.search(np.asarray(d["Q"], dtype=np.float64), d["Q_cells"])
    return ct_from_distances(dQ, d["Q_cells"], dP, d["P_cells"], np.diff(offsets),
                             float(d["tau"])), search


def golden(case):
    with np.load(GOLDEN / case["file"], allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("distance", sorted(REFERENCES))
@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_faiss_path_reproduces_reference_codes(case, distance):
    d = golden(case)
    result, search = faiss_ct(d, distance)
    np.testing.assert_allclose(result.ct, case["expected"][REFERENCES[distance]], rtol=1e-9)
    today = ct_score(d["T"], d["P"], d["Q"], distance=distance, tau=float(d["tau"]),
                     T_cells=d["T_cells"], P_cells=d["P_cells"], Q_cells=d["Q_cells"])
    assert result.ct == today.ct  # the same ranks, so the same C_T exactly
    np.testing.assert_array_equal([c.z for c in result.cells], [c.z for c in today.cells])


def cells_data(seed=0, n=6000, d=32, k=4, dup=True):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(n, d)) + 0.3
    if dup:
        T[100:110] = T[5]  # exact duplicates: ties go to the lowest row
    labels = rng.integers(0, k, n)
    points, order, offsets = grouped(T, labels, k)
    picks = rng.integers(0, n, 200)
    Q = np.concatenate([T[picks] + 1e-3 * rng.normal(size=(200, d)), T[[5, 5]],
                        rng.normal(size=(300, d)), np.zeros((1, d))])
    return points, offsets, Q, rng.integers(0, k, Q.shape[0])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("candidates", [1, 2, 32])
def test_equals_the_exact_numpy_search(metric, candidates):
    dist = plugins.get("distances", metric)
    points, offsets, Q, labels = cells_data()
    search = CellSearch(dist, points, offsets, candidates=candidates, faiss="always")
    d, i = search.search(Q, labels)
    d_ref, i_ref = numpy_path(dist, Q, labels, points, offsets)
    np.testing.assert_array_equal(i, i_ref)
    if metric in ("euclidean", "sqeuclidean"):
        np.testing.assert_array_equal(d, d_ref)  # the same final formula, bit for bit
    else:  # the numpy path's cosine comes from a matrix product: rounding differs by ulps
        np.testing.assert_allclose(d, d_ref, rtol=0, atol=2e-15)


@pytest.mark.parametrize("metric", METRICS)
def test_rows_too_many_to_tell_apart_go_to_the_exact_search(metric):
    dist = plugins.get("distances", metric)
    rng = np.random.default_rng(3)
    T = rng.normal(size=(3000, 16)) + 0.3
    T[200:200 + MAX_TIES + 36] = T[7]  # more copies of row 7 than the product may keep
    T[1000:1010] = T[9]  # a few copies: told apart in float64, lowest row first
    points, _, offsets = grouped(T, np.zeros(3000, dtype=np.int64), 1)
    Q = np.concatenate([T[[7, 7, 9, 9]], rng.normal(size=(50, 16))])
    labels = np.zeros(Q.shape[0], dtype=np.int64)
    search = CellSearch(dist, points, offsets, faiss="always")
    d, i = search.search(Q, labels)
    d_ref, i_ref = numpy_path(dist, Q, labels, points, offsets)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=2e-15)
    assert search.fallbacks == 2  # the two queries on row 7's copies, nothing else


def test_a_query_with_nan_is_left_to_the_exact_search():
    dist = plugins.get("distances", "euclidean")
    points, offsets, Q, labels = cells_data(dup=False)
    Q = Q.copy()
    Q[3, 0] = np.nan
    search = CellSearch(dist, points, offsets, faiss="always")
    d, i = search.search(Q, labels)
    d_ref, i_ref = numpy_path(dist, Q, labels, points, offsets)
    assert search.fallbacks == 1
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(d, d_ref)


def test_two_runs_are_bit_identical():
    dist = plugins.get("distances", "abscosine")
    points, offsets, Q, labels = cells_data(dup=False)
    a = CellSearch(dist, points, offsets, faiss="always").search(Q, labels)
    b = CellSearch(dist, points, offsets, faiss="always").search(Q, labels)
    for x, y in zip(a, b, strict=True):
        assert x.tobytes() == y.tobytes()


def test_empty_cell_gives_nan_and_no_row():
    dist = plugins.get("distances", "euclidean")
    points = np.random.default_rng(0).normal(size=(50, 4))
    offsets = np.array([0, 50, 50])  # cell 1 is empty
    d, i = CellSearch(dist, points, offsets, faiss="always").search(points[:3],
                                                            np.array([0, 1, 2]))
    assert d[0] == 0 and np.isnan(d[1:]).all() and (i[1:] == -1).all()


def test_only_known_metrics_are_searched_by_faiss():
    calls = []

    class Other:
        name, description = "other", "no metric"

        def nn(self, query, ref, *, device="cpu", return_index=False):
            calls.append(len(query))
            return np.zeros(len(query)), np.zeros(len(query), dtype=np.int64)

    assert not searchable(Other())
    assert all(searchable(plugins.get("distances", m)) for m in METRICS)
    points = np.random.default_rng(0).normal(size=(100, 3))
    search = CellSearch(Other(), points, np.array([0, 100]), faiss="always")
    search.search(points[:7], np.zeros(7, dtype=np.int64))
    assert calls == [7]  # the plugin's own search, never FAISS


def test_auto_leaves_small_searches_to_the_plugin():
    dist = plugins.get("distances", "abscosine")
    points, offsets, Q, labels = cells_data(dup=False)
    d, i = CellSearch(dist, points, offsets).search(Q, labels)
    d_ref, i_ref = numpy_path(dist, Q, labels, points, offsets)
    assert d.tobytes() == d_ref.tobytes() and (i == i_ref).all()


@pytest.mark.parametrize("distance", sorted(REFERENCES))
@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_baseline_with_faiss_reproduces_reference_codes(case, distance):
    d = golden(case)
    kw = dict(distance=distance, tau=float(d["tau"]), T_cells=d["T_cells"],
              P_cells=d["P_cells"], Q_cells=d["Q_cells"])
    faiss = ct_score(d["T"], d["P"], d["Q"], search="always", **kw)
    np.testing.assert_allclose(faiss.ct, case["expected"][REFERENCES[distance]], rtol=1e-9)
    assert faiss.ct == ct_score(d["T"], d["P"], d["Q"], search="never", **kw).ct


def test_readme_states_the_search_constants():
    from forensics.stats.neighbours import FAISS_MIN_WORK

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"a query with more than {MAX_TIES} candidates" in readme
    assert f"exceeds 2^{FAISS_MIN_WORK.bit_length() - 1}\nmultiply-adds" in readme
