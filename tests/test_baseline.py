"""The baseline: build once, query many, store by content hash, reload exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forensics.errors import FpError, InputError
from forensics.stats.baseline import Baseline, array_digest, baseline_key
from forensics.steps.baseline_files import load_engine, save_engine
from forensics.steps.engine import build_engine, ct_score, load_or_build


def blobs(n, dim=16, seed=0, layer=0):
    rng = np.random.default_rng(seed * 100 + layer)
    centers = np.random.default_rng(50 + layer).normal(scale=4.0, size=(5, dim))
    return (centers[rng.integers(0, 5, n)] + rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture
def layers():
    """Three layers of different widths; the middle one constant (a ViT CLS token)."""
    dims = (16, 8, 24)
    T = [blobs(400, d, 0, i) for i, d in enumerate(dims)]
    P = [blobs(150, d, 1, i) for i, d in enumerate(dims)]
    Q = [np.concatenate([T[i][:50] + 0.001, blobs(70, d, 2, i)]) for i, d in enumerate(dims)]
    const = np.random.default_rng(0).normal(size=8).astype(np.float32)
    T[1], P[1], Q[1] = (np.tile(const, (len(x), 1)) for x in (T[1], P[1], Q[1]))
    return T, P, Q, ["block0", "cls", "block2"]


PARAMS = {"n_cells": 3, "n_init": 2}


def test_query_equals_ct_score_per_layer(layers):
    T, P, Q, names = layers
    base = build_engine(T, P, names, partitioner_params=PARAMS, seed=1)
    results = base.query(Q)
    assert [r.layer for r in results] == names
    assert [r.status for r in results] == ["ok", "constant", "ok"]
    for i in (0, 2):
        single = ct_score(T[i], P[i], Q[i], seed=1, **PARAMS)
        assert results[i].ct == single.ct  # identical, not merely close
        assert [c.to_dict() for c in results[i].cells] == [c.to_dict() for c in single.cells]


def test_details_expose_cells_distances_and_nearest_training_sample(layers):
    T, P, Q, names = layers
    base = build_engine(T, P, names, partitioner_params=PARAMS, distance="euclidean")
    r = base.query(Q, details=True)[0]
    det = r.details
    assert det["cells"].shape == det["distance"].shape == det["nn_index"].shape == (120,)
    # The first 50 queries are near-copies of T[0][:50]: their nearest sample is the original.
    np.testing.assert_array_equal(det["nn_index"][:50], np.arange(50))
    part = base.layers[0].partition
    direct = np.linalg.norm(part.transform(Q[0]) - part.transform(T[0])[det["nn_index"]], axis=1)
    np.testing.assert_allclose(det["distance"], direct, rtol=1e-10, atol=1e-12)
    assert np.bincount(det["cells"], minlength=3).tolist() == [c.n_Q for c in r.cells]
    assert base.query(Q)[0].details is None
    json.dumps(r.to_dict())


def test_save_load_round_trip_is_exact(layers, tmp_path):
    T, P, Q, names = layers
    base = build_engine(T, P, names, partitioner_params=PARAMS)
    save_engine(base, tmp_path / "b")
    again = load_engine(tmp_path / "b")
    assert again.id == base.id and again.meta == json.loads((tmp_path / "b/meta.json").read_text())
    assert [r.to_dict() for r in again.query(Q, details=True)] == [
        r.to_dict() for r in base.query(Q, details=True)]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["arrays.npz", "meta.json"]


def test_meta_records_parameters_inputs_and_version(layers):
    from forensics import __version__

    T, P, _, names = layers
    base = build_engine(T, P, names, partitioner_params=PARAMS, seed=7, distance="cosine")
    meta = base.meta
    assert meta["seed"] == 7 and meta["distance"] == "cosine" and meta["partitioner"] == "kmeans"
    assert meta["partitioner_params"] == PARAMS and meta["fp_version"] == __version__
    assert meta["inputs"][0]["T"] == array_digest(T[0])
    assert meta["layers"][0]["partition"] == {"n_cells": 3, "pca_dim": 64, "n_init": 2, "seed": 7}
    assert meta["layers"][1]["status"] == "constant"


def test_id_is_a_content_hash(layers):
    T, P, _, names = layers
    key = baseline_key(T, P, names, partitioner_params=PARAMS)[0]
    assert build_engine(T, P, names, partitioner_params=PARAMS).id == key
    assert baseline_key([t.copy() for t in T], P, names, partitioner_params=PARAMS)[0] == key
    T2 = [t.copy() for t in T]
    T2[2][0, 0] += 1e-3
    others = {
        baseline_key(T2, P, names, partitioner_params=PARAMS)[0],
        baseline_key(T, P, names, partitioner_params=PARAMS, seed=1)[0],
        baseline_key(T, P, names, partitioner_params=PARAMS, distance="euclidean")[0],
        baseline_key(T, P, names, partitioner_params={"n_cells": 4})[0],
        baseline_key(T, P, ["a", "b", "c"], partitioner_params=PARAMS)[0],
    }
    assert key not in others and len(others) == 5


def test_load_or_build_builds_once_then_loads(layers, tmp_path, monkeypatch):
    T, P, Q, names = layers
    first = load_or_build(tmp_path, T, P, names, partitioner_params=PARAMS)
    assert (tmp_path / first.id / "meta.json").is_file()

    def no_build(*a, **k):
        raise AssertionError("a stored baseline must be reused")

    monkeypatch.setattr(Baseline, "build", no_build)
    second = load_or_build(tmp_path, T, P, names, partitioner_params=PARAMS)
    assert second.id == first.id
    assert [r.ct for r in second.query(Q)][::2] == [r.ct for r in first.query(Q)][::2]


def test_corrupt_baseline_is_detected_and_rebuilt(layers, tmp_path):
    T, P, Q, names = layers
    base = load_or_build(tmp_path, T, P, names, partitioner_params=PARAMS)
    folder = tmp_path / base.id
    with np.load(folder / "arrays.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["0.p_dist"] = arrays["0.p_dist"] + 1.0
    np.savez(folder / "arrays.npz", **arrays)
    with pytest.raises(InputError, match="does not match"):
        load_engine(folder)
    rebuilt = load_or_build(tmp_path, T, P, names, partitioner_params=PARAMS)
    assert rebuilt.query(Q)[0].ct == base.query(Q)[0].ct
    load_engine(folder)  # repaired on disk


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(InputError, match="holds no baseline"):
        load_engine(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": 999}))
    with pytest.raises(InputError, match="format 999"):
        load_engine(tmp_path)


def test_given_partitioner_baseline(layers):
    T, P, Q, names = layers
    rng = np.random.default_rng(0)
    Tc, Pc, Qc = (rng.integers(0, 3, len(x)) for x in (T[0], P[0], Q[0]))
    base = build_engine([T[0]], [P[0]], ["l"], partitioner="given", distance="euclidean",
                          T_cells=Tc, P_cells=Pc)
    r = base.query([Q[0]], Q_cells=Qc)[0]
    single = ct_score(T[0], P[0], Q[0], distance="euclidean", T_cells=Tc, P_cells=Pc, Q_cells=Qc)
    assert r.ct == single.ct and len(r.cells) == 3
    with pytest.raises(InputError, match="Q_cells"):
        base.query([Q[0]])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"partitioner": "given"}, "needs T_cells"),
     ({"T_cells": np.zeros(400, int), "P_cells": np.zeros(150, int)}, "'given' partitioner"),
     ({"distance": "nope"}, "valid names"),
     ({"partitioner": "nope"}, "valid names")],
)
def test_build_argument_errors(layers, kwargs, match):
    T, P, _, _ = layers
    with pytest.raises(FpError, match=match):
        build_engine(T[:1], P[:1], ["l"], **kwargs)


def test_input_errors_name_the_layer_and_array(layers):
    T, P, Q, names = layers
    with pytest.raises(InputError, match="need one T and one P array per layer"):
        build_engine(T, P[:2], names)
    with pytest.raises(InputError, match="distinct"):
        build_engine(T[:2], P[:2], ["x", "x"])
    bad = [t.copy() for t in T]
    bad[2][3, 1] = np.nan
    with pytest.raises(InputError, match="layer 'block2': T holds NaN"):
        build_engine(bad, P, names, partitioner_params=PARAMS)
    with pytest.raises(InputError, match="layer 'block0': P has 8 features but T has 16"):
        build_engine(T, [P[1], P[1], P[2]], names, partitioner_params=PARAMS)
    base = build_engine(T, P, names, partitioner_params=PARAMS)
    with pytest.raises(InputError, match="3 layers"):
        base.query(Q[:2])
    with pytest.raises(InputError, match="layer 'block2': Q has 16 features"):
        base.query([Q[0], Q[1], Q[0]])


def test_two_builds_are_bit_identical(layers):
    T, P, Q, names = layers
    a = build_engine(T, P, names, partitioner_params=PARAMS)
    b = build_engine(T, P, names, partitioner_params=PARAMS)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for k, v in la.arrays().items():
            assert v.tobytes() == lb.arrays()[k].tobytes(), k
    assert [r.to_dict() for r in a.query(Q, details=True)] == [
        r.to_dict() for r in b.query(Q, details=True)]
