"""Family identification accuracy: the paper's Table 1 and the protocols."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forensics.curvefiles import read_layerchoice
from forensics.errors import InputError, InsufficientDataError, UnknownNameError
from forensics.evaluate import bootstrap_ci, evaluate, evaluate_curves, truncate3

# Table 1 of He et al. (2024), C_T-layer rows: (file, matcher, printed accuracy, correct of 6).
TABLE1 = [
    ("Fsmall_score.txt", "l2", 0.666, 4),
    ("Fsmall_score.txt", "cosine", 0.666, 4),
    ("Fsmall_score.txt", "combined", 0.833, 5),
    ("Ffull_score.txt", "l2", 1.000, 6),
    ("Ffull_score.txt", "cosine", 0.833, 5),
    ("Ffull_score.txt", "combined", 1.000, 6),
]


@pytest.mark.parametrize(("filename", "matcher", "printed", "correct"), TABLE1)
def test_table1_exactly(shared_dir, filename, matcher, printed, correct):
    curves = read_layerchoice(shared_dir / "paper" / filename)
    result = evaluate_curves(curves, matchers=[matcher], n_boot=200)
    m = result["matchers"][matcher]
    assert (m["correct"], m["total"]) == (correct, 6)
    assert m["accuracy_3dp"] == printed
    assert m["accuracy"] == correct / 6
    assert result["n_queries"] == 6 and result["n_values_used"] == 11
    assert m["ci"]["low"] <= m["accuracy"] <= m["ci"]["high"]
    json.dumps(result)  # JSON-ready as returned


def test_table1_needs_the_first_value_dropped(shared_dir):
    """Keeping value 0 changes the full cosine result: the drop is part of the rule."""
    curves = read_layerchoice(shared_dir / "paper" / "Ffull_score.txt")
    kept = evaluate_curves(curves, matchers=["cosine"], drop_layers=(), n_boot=0)
    assert kept["matchers"]["cosine"]["correct"] == 4


def test_table1_small_misses(shared_dir):
    curves = read_layerchoice(shared_dir / "paper" / "Fsmall_score.txt")
    result = evaluate_curves(curves, n_boot=0)
    wrong = {
        name: sorted((p["query"], p["predicted"]) for p in m["predictions"] if not p["correct"])
        for name, m in result["matchers"].items()
    }
    assert wrong["combined"] == [("ddim_test_batch", "pndm")]
    conf = result["matchers"]["combined"]["confusion"]
    labels = conf["labels"]
    assert labels == sorted(["BigGAN", "ContraGAN", "SNGAN", "ddim", "ddpm", "pndm"])
    assert conf["matrix"][labels.index("ddim")][labels.index("pndm")] == 1
    assert sum(map(sum, conf["matrix"])) == 6


def test_builtin_matchers_follow_the_papers_formula():
    from forensics import plugins

    rng = np.random.default_rng(3)
    q, refs = rng.normal(size=11), rng.normal(size=(7, 11))
    cos = refs @ q / (np.linalg.norm(refs, axis=1) * np.linalg.norm(q))
    l2 = np.linalg.norm(refs - q, axis=1)
    for name, alpha in (("l2", 0.0), ("cosine", 1.0), ("combined", 0.5)):
        expected = alpha * cos + (1 - alpha) * (1 / (1 + l2))
        got = plugins.get("matchers", name).score(q, refs)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


# Synthetic curves: families a and b are clusters, c is a lone curve next to a.
SYN = np.array(
    [[0.0, 0, 0], [0, 0, 1], [10, 10, 10], [10, 10, 11], [0, 0, 2]],
)
SYN_FAM = ["a", "a", "b", "b", "c"]


def test_leave_one_out():
    result = evaluate(SYN, SYN_FAM, protocol="loo", matchers=["l2"], drop_layers=(), n_boot=0)
    m = result["matchers"]["l2"]
    assert (m["correct"], m["total"]) == (4, 5)
    matched = {p["query"]: p["matched"] for p in m["predictions"]}
    # never matched to itself; curve 1 ties with 0 and 4 (distance 1): the first wins
    assert matched == {"0": "1", "1": "0", "2": "3", "3": "2", "4": "1"}
    assert m["confusion"] == {
        "labels": ["a", "b", "c"],
        "matrix": [[2, 0, 0], [0, 2, 0], [1, 0, 0]],
    }
    assert m["ci"] is None
    assert result["n_enrolled"] == 5


def test_confusion_matrix_split_protocol():
    vectors = np.array(
        [[0.0, 0], [5, 5], [9, 0], [0.2, 0.1], [4.8, 5.1], [8.9, 0.2], [4.0, 4.0], [9.5, 0.5]]
    )
    families = ["x", "y", "z", "x", "y", "z", "x", "y"]
    splits = ["enroll"] * 3 + ["query"] * 5
    result = evaluate(vectors, families, splits, matchers=["l2"], drop_layers=(), n_boot=0)
    m = result["matchers"]["l2"]
    assert [p["predicted"] for p in m["predictions"]] == ["x", "y", "z", "y", "z"]
    assert m["confusion"] == {
        "labels": ["x", "y", "z"],
        "matrix": [[1, 1, 0], [0, 1, 1], [0, 0, 1]],
    }
    assert (m["correct"], m["accuracy_3dp"]) == (3, 0.6)


def test_nan_counts_as_zero_and_custom_matcher():
    vectors = np.array([[9.0, 1, np.nan], [9.0, 1, 0], [9.0, 5, 5], [9.0, 1, 0.1]])

    class Negative:
        name = "neg-l1"

        def score(self, query, refs):
            return -np.abs(refs - query).sum(axis=1)

    result = evaluate(
        vectors,
        ["a", "a", "b", "a"],
        ["enroll", "query", "enroll", "query"],
        matchers=[Negative(), "l2"],
        n_boot=0,
    )
    assert set(result["matchers"]) == {"neg-l1", "l2"}
    assert [m["correct"] for m in result["matchers"].values()] == [2, 2]
    assert result["matchers"]["neg-l1"]["predictions"][0]["score"] == 0.0  # nan became 0


def test_all_matchers_and_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 5))
    families = [f"f{i % 3}" for i in range(30)]
    splits = ["enroll"] * 9 + ["query"] * 21
    a = evaluate(vectors, families, splits, matchers="all", seed=7, n_boot=300)
    b = evaluate(vectors, families, splits, matchers="all", seed=7, n_boot=300)
    assert set(a["matchers"]) == {"l2", "cosine", "combined"}
    assert a == b
    assert a["bootstrap"]["seed"] == 7 and a["bootstrap"]["n_boot"] == 300


def test_bootstrap_interval_matches_binomial_spread():
    correct = np.array([1.0] * 70 + [0.0] * 30)
    resamples = np.random.default_rng(1).integers(0, 100, size=(4000, 100))
    ci = bootstrap_ci(correct, resamples)
    half = 1.96 * np.sqrt(0.7 * 0.3 / 100)  # normal approximation, 0.0898
    assert ci["low"] == pytest.approx(0.7 - half, abs=0.02)
    assert ci["high"] == pytest.approx(0.7 + half, abs=0.02)
    assert bootstrap_ci(np.ones(5), resamples[:, :5] % 5) == {
        "low": 1.0,
        "high": 1.0,
        "level": 0.95,
    }


def test_truncate3():
    assert truncate3(4, 6) == 0.666
    assert truncate3(5, 6) == 0.833
    assert truncate3(29, 100) == 0.29
    assert truncate3(6, 6) == 1.0


def test_errors():
    with pytest.raises(InsufficientDataError, match="query and enroll"):
        evaluate(SYN, SYN_FAM, ["enroll"] * 5)
    with pytest.raises(InputError, match="needs a split tag"):
        evaluate(SYN, SYN_FAM)
    with pytest.raises(InputError, match="unknown split tags 'train'"):
        evaluate(SYN, SYN_FAM, ["train"] * 5)
    with pytest.raises(InputError, match="unknown protocol 'kfold'; choose one of: split, loo"):
        evaluate(SYN, SYN_FAM, protocol="kfold")
    with pytest.raises(UnknownNameError, match="valid names: combined, cosine, l2"):
        evaluate(SYN, SYN_FAM, protocol="loo", matchers=["hamming"])
    with pytest.raises(InputError, match="drop_layers index 3 is out of range"):
        evaluate(SYN, SYN_FAM, protocol="loo", drop_layers=(3,))
    with pytest.raises(InputError, match="families has 4 entries but there are 5"):
        evaluate(SYN, SYN_FAM[:4], protocol="loo")
    with pytest.raises(InputError, match="different numbers of values"):
        evaluate_curves([{"values": [1, 2], "family": "a"}, {"values": [1], "family": "b"}])


def test_nan_scores_never_win_and_output_is_strict_json():
    class Picky:
        name = "picky"

        def score(self, query, refs):
            return np.where(refs[:, 0] > 5, np.nan, -refs[:, 0])  # rows 2, 3 unscorable

    result = evaluate(SYN, SYN_FAM, protocol="loo", matchers=[Picky()], drop_layers=(), n_boot=0)
    matched = {p["query"]: p["matched"] for p in result["matchers"]["picky"]["predictions"]}
    assert matched["2"] == "0" and matched["3"] == "0"  # the first scorable row, not b
    json.dumps(result, allow_nan=False)

    class Blind:
        name = "blind"

        def score(self, query, refs):
            return np.full(len(refs), np.nan)

    blind = evaluate(SYN, SYN_FAM, protocol="loo", matchers=[Blind()], drop_layers=(), n_boot=0)
    assert all(p["score"] is None for p in blind["matchers"]["blind"]["predictions"])
    json.dumps(blind, allow_nan=False)
