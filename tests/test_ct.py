"""The C_T statistic: golden values of both reference codes, Z_U, edge cases, determinism."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from forensics.errors import InputError, InsufficientDataError
from forensics.plugin import manager as plugins
from forensics.stats.ct import (
    CellStat,
    CTResult,
    ct_from_distances,
    default_tau,
    needed_count,
    zu,
)
from forensics.steps.engine import ct_score

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "golden" / "ct"
CASES = json.loads((GOLDEN / "index.json").read_text())
#: fp distance -> the reference code whose value it must reproduce.
REFERENCES = {"euclidean": "l2_meehan", "abscosine": "abscos_layerchoice"}


def golden(case: dict) -> dict:
    with np.load(GOLDEN / case["file"], allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def given_ct(d: dict, distance: str, **kw) -> CTResult:
    return ct_score(d["T"], d["P"], d["Q"], distance=distance, tau=float(d["tau"]),
                    T_cells=d["T_cells"], P_cells=d["P_cells"], Q_cells=d["Q_cells"], **kw)


@pytest.mark.parametrize("distance", sorted(REFERENCES))
@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_reproduces_reference_codes(case, distance):
    d = golden(case)
    result = given_ct(d, distance)
    assert result.status == "ok"
    np.testing.assert_allclose(result.ct, case["expected"][REFERENCES[distance]], rtol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_per_cell_z_reproduces_meehan(case):
    d = golden(case)
    result = given_ct(d, "euclidean")
    ours = np.array([c.z if c.n_Q else 0.0 for c in result.cells])  # reference: 0 when no Q
    np.testing.assert_allclose(ours, d["zu_cells_l2"], rtol=1e-9, atol=1e-12)
    assert [c.n_T for c in result.cells] == np.bincount(d["T_cells"]).tolist()
    assert [c.kept for c in result.cells] == [
        c.n_Q / len(d["Q"]) > d["tau"] for c in result.cells
    ]


def test_golden_copy_is_the_papers_data(shared_dir):
    shared = shared_dir / "golden" / "ct"
    for case in CASES:
        assert (shared / case["file"]).read_bytes() == (GOLDEN / case["file"]).read_bytes()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zu_matches_scipy_with_ties(seed):
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(seed)
    dq = rng.integers(0, 6, 40).astype(float)  # many ties, within and across samples
    dp = rng.integers(0, 6, 70).astype(float)
    u, _ = mannwhitneyu(dq, dp, alternative="less")
    n, m = 70, 40
    expected = (u - (n * m / 2 - 0.5)) / np.sqrt(n * m * (n + m + 1) / 12)
    assert zu(dq, dp) == pytest.approx(expected, rel=1e-12)


def test_zu_sign_copying_is_negative():
    assert zu(np.zeros(30), np.ones(30)) < -5
    assert zu(np.ones(30), np.zeros(30)) > 5


# ---------------------------------------------------------------- edge cases


def _dist(counts, value=1.0):
    return np.full(sum(counts), value), np.repeat(np.arange(len(counts)), counts)


def test_cell_without_p_samples_is_left_out_with_a_note():
    dQ, Qc = _dist([30, 30])
    dP = np.linspace(0.5, 1.5, 40)
    Pc = np.zeros(40, dtype=int)  # cell 1 has no held-out sample
    r = ct_from_distances(dQ, Qc, dP, Pc, T_counts=[10, 10])
    assert r.status == "ok"
    assert math.isnan(r.cells[1].z) and not r.cells[1].kept and r.cells[1].n_P == 0
    assert r.ct == pytest.approx(r.cells[0].z)
    assert "cell 1" in r.message and "held-out" in r.message


def test_cell_without_t_samples_is_left_out_with_a_note():
    dQ, Qc = _dist([30, 30])
    dP, Pc = _dist([20, 20], 0.5)
    r = ct_from_distances(dQ, Qc, dP, Pc, T_counts=[10])  # cell 1: no training sample
    assert r.status == "ok" and r.cells[1].n_T == 0 and not r.cells[1].kept
    assert "cell 1" in r.message and "training" in r.message


def test_no_cell_passing_tau_says_how_many_images_are_needed():
    dQ, Qc = _dist([8, 7, 5])
    dP, Pc = _dist([20, 20, 20], 0.5)
    r = ct_from_distances(dQ, Qc, dP, Pc, T_counts=[5, 5, 5])
    assert r.status == "no_cells" and math.isnan(r.ct)
    assert r.tau == default_tau(20) == 1.0
    assert "at least 21 generated samples" in r.message
    assert r.to_dict()["ct"] is None
    json.dumps(r.to_dict())  # valid JSON, no NaN


def test_needed_count():
    assert needed_count(20 / 500, 500) == 21
    assert needed_count(0.02, 120) == 3
    assert needed_count(0.0, 50) == 1


def test_constant_embeddings_are_reported_not_crashed():
    rng = np.random.default_rng(0)
    cls_token = rng.normal(size=16)
    T, P, Q = (np.tile(cls_token, (n, 1)) for n in (200, 100, 60))
    for distance in ("abscosine", "euclidean"):
        r = ct_score(T, P, Q, distance=distance, n_cells=4)
        assert r.status == "constant" and math.isnan(r.ct) and r.cells == []
        assert "same embedding" in r.message


def test_fewer_than_two_generated_samples_is_an_error():
    rng = np.random.default_rng(0)
    T, P = rng.normal(size=(50, 4)), rng.normal(size=(20, 4))
    with pytest.raises(InsufficientDataError, match="at least 2 generated samples"):
        ct_score(T, P, rng.normal(size=(1, 4)), n_cells=2)
    with pytest.raises(InsufficientDataError, match="got 0"):
        ct_from_distances(np.zeros(0), np.zeros(0, int), np.ones(3), np.zeros(3, int), [1])


def test_small_generated_set_gives_no_cells_not_a_crash():
    rng = np.random.default_rng(0)
    T, P, Q = rng.normal(size=(100, 4)), rng.normal(size=(40, 4)), rng.normal(size=(15, 4))
    r = ct_score(T, P, Q, n_cells=3)
    assert r.status == "no_cells" and "21" in r.message


@pytest.mark.parametrize("tau", [-0.1, float("inf"), float("nan")])
def test_bad_tau_is_an_input_error(tau):
    dQ, Qc = _dist([30])
    with pytest.raises(InputError, match="tau"):
        ct_from_distances(dQ, Qc, np.ones(5), np.zeros(5, int), [3], tau=tau)


def test_bad_labels_are_input_errors():
    dQ, Qc = _dist([30])
    with pytest.raises(InputError, match="Q_cells"):
        ct_from_distances(dQ, Qc[:-1], np.ones(5), np.zeros(5, int), [3])
    with pytest.raises(InputError, match="P_cells"):
        ct_from_distances(dQ, Qc, np.ones(5), -np.ones(5, int), [3])


def test_partial_cell_labels_are_an_error():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    with pytest.raises(InputError, match="all of T_cells"):
        ct_score(X, X, X, T_cells=np.zeros(30, int))


def test_tau_is_strict():
    dQ, Qc = _dist([20, 20])  # each cell holds exactly tau * m = 20 with the default tau
    dP, Pc = _dist([5, 5], 0.5)
    assert ct_from_distances(dQ, Qc, dP, Pc, [5, 5]).status == "no_cells"
    assert ct_from_distances(dQ, Qc, dP, Pc, [5, 5], tau=0.49).status == "ok"


# ---------------------------------------------------------------- kmeans path, determinism


def blobs(n, dim=24, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).normal(scale=4.0, size=(5, dim))
    return centers[rng.integers(0, 5, n)] + rng.normal(size=(n, dim)) * (1 + shift)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_ct", REPO / "benchmarks" / "bench_ct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kmeans_path_equals_the_papers_pipeline():
    """The paper's code (PCA-64 + KMeans on T, abscos NN in projected cells, scipy MWU)."""
    T, P = blobs(600), blobs(200, seed=1)
    Q = np.concatenate([T[:60] + 0.01, blobs(90, seed=2)])
    paper = _bench_module().paper_layer(T, P, Q, seed=4)
    ours = ct_score(T, P, Q, seed=4)
    assert ours.status == "ok" and len(ours.cells) == 10
    np.testing.assert_allclose(ours.ct, paper, rtol=1e-9)


def test_copying_and_underfitting_have_the_expected_sign():
    T, P = blobs(600), blobs(200, seed=1)
    copies = T[:150] + 0.001
    assert ct_score(T, P, copies, n_cells=3).ct < -3
    assert ct_score(T, P, blobs(150, seed=3, shift=1.0), n_cells=3).ct > 3


def test_two_runs_are_bit_identical():
    T, P, Q = blobs(500), blobs(200, seed=1), blobs(150, seed=2)
    a = ct_score(T, P, Q, n_cells=4)
    b = ct_score(T, P, Q, n_cells=4)
    assert a.to_dict() == b.to_dict()
    assert np.float64(a.ct).tobytes() == np.float64(b.ct).tobytes()


def test_every_distance_plugin_runs_through_ct_score():
    T, P, Q = blobs(300), blobs(100, seed=1), blobs(120, seed=2)
    for name in plugins.names("distances"):
        r = ct_score(T, P, Q, distance=name, n_cells=3)
        assert r.status == "ok" and math.isfinite(r.ct)


def test_result_to_dict_shape():
    r = CTResult(1.5, [CellStat(0, 3, 4, 5, float("nan"), False)], 0.1, 5)
    d = r.to_dict()
    assert d["ct"] == 1.5 and d["cells"] == [
        {"cell": 0, "n_T": 3, "n_P": 4, "n_Q": 5, "z": None, "kept": False}]


def test_is_constant():
    from forensics.stats.ct import is_constant

    row = np.array([1.0, -2.0, 3.0])
    X = np.tile(row, (10000, 1))
    assert is_constant(X) and is_constant(X[:1]) and is_constant(np.zeros((5, 3)))
    X[9000, 1] += 1e-9  # float noise of a batch-size-dependent kernel
    assert is_constant(X)
    X[9500, 2] += 1e-3
    assert not is_constant(X)
    assert not is_constant(np.vstack([np.zeros(3), row]))
