"""Family identification accuracy: the paper's Table 1 and the protocols."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.data.curvefiles import read_layerchoice
from forensics.errors import InputError, InsufficientDataError, UnknownNameError
from forensics.steps.evaluate import bootstrap_ci, evaluate, evaluate_curves, truncate3
from refbank import Bank

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
    from forensics.plugin import manager as plugins

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
    assert set(a["matchers"]) == {"l2", "cosine", "combined", "zscore"}
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


# -- through the bank and the CLI --------------------------------------------------------------

runner = CliRunner()
PAPER_BASELINE = "layerchoice-vit-b16-cifar10"


def fp(*args, bank):
    return runner.invoke(app, [*map(str, args), "--bank", str(bank)])


@pytest.mark.parametrize(
    ("filename", "expected"),
    [("Fsmall_score.txt", {"l2": 0.666, "cosine": 0.666, "combined": 0.833}),
     ("Ffull_score.txt", {"l2": 1.000, "cosine": 0.833, "combined": 1.000})],
)
def test_table1_through_the_cli(shared_dir, tmp_path, filename, expected):
    bank = tmp_path / "bank"
    result = fp("bank", "import-curves", shared_dir / "paper" / filename, "--format",
                "layerchoice", bank=bank)
    assert result.exit_code == 0, result.output
    assert f"under baseline '{PAPER_BASELINE}' (created)" in result.output
    result = fp("evaluate", "--fingerprint", "paper", "--json", bank=bank)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {k: m["accuracy_3dp"] for k, m in data["matchers"].items()} == expected
    assert data["baseline"]["name"] == PAPER_BASELINE and data["n_queries"] == 6
    assert data["drop_layers"] == [0] and data["n_values_used"] == 11
    for m in data["matchers"].values():
        assert m["total"] == 6 and m["ci"]["low"] <= m["accuracy"] <= m["ci"]["high"]
        assert sum(map(sum, m["confusion"]["matrix"])) == 6
    setstats = data["comparison"]["setstats"]
    assert setstats["available"] is False and "no 'setstats' vector" in setstats["reason"]
    text = fp("evaluate", "--fingerprint", "paper", bank=bank).output
    assert "C_T-layer accuracy" in text and "not available" in text
    assert f"{expected['combined']:.3f}" in text and "Confusion matrix, combined" in text


def test_imported_rows_record_the_authors_settings(shared_dir, tmp_path):
    bank = Bank(tmp_path / "bank")
    path = shared_dir / "paper" / "Fsmall_score.txt"
    fp("bank", "import-curves", path, bank=bank.path)
    base = bank.get_baseline(PAPER_BASELINE)
    assert base["encoder"] == "google/vit-base-patch16-224-in21k"
    assert base["layers"] == [f"hidden_{i}" for i in range(12)]
    assert (base["partitioner"], base["distance"], base["tau"]) == ("kmeans", "abscosine", 0.04)
    assert json.loads(base["params_json"])["pca_dim"] == 64
    rows = bank.curves()
    assert [r["model"] for r in rows][:2] == ["ContraGAN_test_batch", "ContraGAN_train_batch"]
    assert rows[0]["split"] == "query" and rows[1]["split"] == "enroll"
    params = json.loads(rows[0]["params_json"])
    assert params["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert params["line"] == 1 and rows[0]["n_images"] == 500
    assert rows[0]["values"] == read_layerchoice(path)[0]["values"].tolist()
    assert bank.verify().ok


def test_both_paper_files_in_one_bank(shared_dir, tmp_path):
    bank = tmp_path / "bank"
    paper = shared_dir / "paper"
    assert fp("bank", "import-curves", paper / "Fsmall_score.txt", bank=bank).exit_code == 0
    again = fp("bank", "import-curves", paper / "Fsmall_score.txt", bank=bank)
    assert again.exit_code == 1 and "already imported" in again.output
    assert fp("bank", "import-curves", paper / "Ffull_score.txt", bank=bank).exit_code == 0
    rows = Bank(bank).curves()
    models = [r["model"] for r in rows]
    assert len(rows) == 30 and len(set(models)) == 30
    assert {"ContraGAN_train_batch", "ContraGAN_train_batch#2",
            "ContraGAN_train_batch#3"} <= set(models)
    # The full file again, in a baseline of its own: evaluation must then be told which.
    result = fp("bank", "import-curves", paper / "Ffull_score.txt", "--baseline", "paper-full",
                bank=bank)
    assert result.exit_code == 0, result.output
    result = fp("evaluate", bank=bank)
    assert result.exit_code == 1
    assert f"{PAPER_BASELINE} (30 curves), paper-full (18 curves)" in result.output
    data = json.loads(fp("evaluate", "--fingerprint", "paper", "--baseline", "paper-full",
                         "--json", "--matcher", "all", bank=bank).output)
    assert data["matchers"]["cosine"]["accuracy_3dp"] == 0.833
    loo = json.loads(fp("evaluate", "--fingerprint", "paper", "--baseline", "paper-full",
                        "--protocol", "loo", "--json", "--n-boot", "0", bank=bank).output)
    assert loo["n_queries"] == 18 and loo["matchers"]["l2"]["ci"] is None


def test_import_curves_errors(shared_dir, tmp_path):
    bank = tmp_path / "bank"
    plain = shared_dir / "paper" / "model_ct_scores_small.txt"
    result = fp("bank", "import-curves", plain, bank=bank)
    assert result.exit_code == 1 and "no '_train' or '_test' part" in result.output
    result = fp("bank", "import-curves", plain, "--split", "enroll", bank=bank)
    assert result.exit_code == 0 and ": 12 enroll, 0 query" in result.output.replace("\n", " ")
    bad = fp("bank", "import-curves", plain, "--format", "csv", bank=tmp_path / "b2")
    assert bad.exit_code == 1 and "choose one of: layerchoice" in bad.output
    split = json.loads(fp("evaluate", "--fingerprint", "paper", "--json", "--protocol", "loo",
                          "--n-boot", "0", bank=bank).output)
    assert split["n_queries"] == 12
    # every curve is enrolled: split has no queries
    none = fp("evaluate", "--fingerprint", "paper", bank=bank)
    assert none.exit_code == 1 and "use protocol 'loo'" in none.output
    empty = fp("evaluate", bank=tmp_path / "empty")
    assert empty.exit_code == 1 and "fp bank import-curves" in empty.output


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory):
    """A bank of fp-made curves: 3 pathological families of digits, seeded tiny ViT."""
    import torch
    from threadpoolctl import threadpool_limits

    from forensics.paper.demo import _write_pngs, digit_images
    from forensics.paper.synth import synth_folder
    from forensics.steps.build_baseline import build_baseline
    from forensics.steps.enroll import enroll

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # thread pools cost more than these small jobs on a shared CPU
    root = tmp_path_factory.mktemp("evaluate")
    images = digit_images()
    order = np.random.default_rng(2).permutation(len(images))
    _write_pngs(images, order[:200], root / "T")
    _write_pngs(images, order[200:300], root / "P")
    _write_pngs(images, order[:120], root / "src")
    bank = Bank(root / "bank")
    kw = {"bank": bank, "device": "cpu", "cache_dir": root / "cache", "progress": False}
    with threadpool_limits(limits=1):
        build_baseline("tiny", root / "T", root / "P", encoder="vit-tiny-demo",
                                weights="random:0", n_cells=2, **kw)
        for kind, params in (("noise", {"sigma": 24.0}), ("shuffle", {"grid": 4}),
                             ("rotate", {"angle": 90.0})):
            synth_folder(kind, root / "src", root / kind, seed=0, **params)
            for split, part in (("enroll", slice(0, 80)), ("query", slice(80, 120))):
                (root / f"{kind}-{split}").mkdir()
                for f in sorted((root / kind).glob("*.png"))[part]:
                    shutil.copy(f, root / f"{kind}-{split}" / f.name)
                enroll(root / f"{kind}-{split}", baseline="tiny", model=f"{kind}-gen",
                                family=kind, per_curve=40, split=split, tau=0.25, **kw)
    torch.set_num_threads(before)
    return bank


def test_evaluate_fp_curves_with_the_papers_baseline_side_by_side(enrolled):
    from forensics.stats.setstats import baseline_matchers
    from forensics.steps.bank_access import load_baseline
    from refbank.bank import curve_fingerprints

    result = fp("evaluate", "--fingerprint", "paper", "--json", "--seed", "3", bank=enrolled.path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["baseline"]["name"] == "tiny" and data["n_vectors"] == 9
    assert data["n_queries"] == 3 and data["n_enrolled"] == 6
    setstats = data["comparison"]["setstats"]
    assert setstats["available"] is True and setstats["skipped_matchers"] == []
    assert set(setstats["matchers"]) == set(data["matchers"]) == {"l2", "cosine", "combined"}
    # The same numbers as evaluating the stored vectors with the layer dimensions known.
    rows = enrolled.curves()
    dims = load_baseline("tiny", bank=enrolled).dims
    direct = evaluate(np.stack([curve_fingerprints(r)["setstats"] for r in rows]),
                      [r["family"] for r in rows], [r["split"] for r in rows],
                      names=[r["model"] for r in rows], matchers=baseline_matchers(dims),
                      drop_layers=(), seed=3)
    for name, m in setstats["matchers"].items():
        assert m["predictions"] == direct["matchers"][name]["predictions"]
        assert m["ci"] == direct["matchers"][name]["ci"]
    curves = evaluate(np.stack([r["values"] for r in rows]), [r["family"] for r in rows],
                      [r["split"] for r in rows], names=[r["model"] for r in rows], seed=3)
    assert data["matchers"]["combined"]["predictions"] == \
        curves["matchers"]["combined"]["predictions"]
    text = fp("evaluate", "--fingerprint", "paper", bank=enrolled.path).output
    assert "C_T-layer accuracy" in text and "mean/std/FID accuracy" in text


def test_evaluate_defaults_to_fps_own_fingerprint(enrolled):
    from forensics.defaults import FINGERPRINT as DEFAULT_FINGERPRINT
    from forensics.plugin.manager import get
    from forensics.steps.bank_access import load_baseline
    from refbank.bank import curve_fingerprints

    data = json.loads(fp("evaluate", "--json", "--n-boot", "0", bank=enrolled.path).output)
    fpo = get("fingerprints", DEFAULT_FINGERPRINT)
    assert data["fingerprint"] == DEFAULT_FINGERPRINT
    assert list(data["matchers"]) == [fpo.default_matcher]
    # The same predictions as the stored vectors of the kept layers, matched directly.
    rows = enrolled.curves()
    dims = load_baseline("tiny", bank=enrolled).dims
    keep = np.arange(len(dims)) != 0
    mask = np.where(fpo.entry_layers(dims) < 0, True, keep[np.clip(fpo.entry_layers(dims), 0,
                                                                    None)])
    x = np.stack([curve_fingerprints(r)[DEFAULT_FINGERPRINT] for r in rows])[:, mask]
    direct = evaluate(x, [r["family"] for r in rows], [r["split"] for r in rows],
                      names=[r["model"] for r in rows], matchers=[fpo.default_matcher],
                      drop_layers=(), n_boot=0)
    name = fpo.default_matcher
    assert data["matchers"][name]["predictions"] == direct["matchers"][name]["predictions"]
    assert data["drop_layers"] == [0] and data["n_values_used"] == int(mask.sum())
    text = fp("evaluate", "--n-boot", "0", bank=enrolled.path).output
    assert f"{DEFAULT_FINGERPRINT} accuracy" in text


def test_evaluate_every_fingerprint_with_every_matcher(enrolled):
    from forensics.plugin import manager as plugins

    for name in plugins.names("fingerprints"):
        result = fp("evaluate", "--fingerprint", name, "--matcher", "all", "--json",
                    "--n-boot", "0", bank=enrolled.path)
        assert result.exit_code == 0, (name, result.output)
        data = json.loads(result.output)
        assert data["fingerprint"] == name
        assert sorted(data["matchers"]) == plugins.names("matchers")
        for m in data["matchers"].values():
            assert m["total"] == 3 and 0 <= m["correct"] <= 3
    # setstats matched by its own rule is exactly the paper's baseline method beside it.
    data = json.loads(fp("evaluate", "--fingerprint", "setstats", "--json", "--n-boot", "0",
                         "--drop-layers", "none", bank=enrolled.path).output)
    side = data["comparison"]["setstats"]["matchers"]["combined"]["predictions"]
    assert data["matchers"]["combined"]["predictions"] == side


def test_evaluate_fingerprint_errors(shared_dir, tmp_path, enrolled):
    bad = fp("evaluate", "--fingerprint", "nope", bank=enrolled.path)
    assert bad.exit_code == 1 and "resid-early" in bad.output and "paper" in bad.output
    bank = tmp_path / "bank"
    fp("bank", "import-curves", shared_dir / "paper" / "Fsmall_score.txt", bank=bank)
    lacking = fp("evaluate", bank=bank)  # imported curves hold only their C_T values
    assert lacking.exit_code == 1
    assert "no 'resid-early' fingerprint" in lacking.output
    assert "--fingerprint paper" in lacking.output


def test_evaluate_with_a_plugin_matcher_skips_it_for_the_baseline_method(enrolled):
    from forensics.stats.setstats import _cos_rows

    class Dot:
        name = "dot"
        description = "dot product"

        def score(self, query, refs):
            return _cos_rows(query, refs)

    from forensics.steps.evaluate import evaluate_bank

    out = evaluate_bank(enrolled, matchers=[Dot(), "l2"], n_boot=0)
    assert set(out["matchers"]) == {"dot", "l2"}
    assert out["comparison"]["setstats"]["skipped_matchers"] == ["dot"]
    assert set(out["comparison"]["setstats"]["matchers"]) == {"l2"}
