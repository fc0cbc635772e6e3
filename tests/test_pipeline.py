"""The pipeline end to end on real digits: baseline, curves, enrolment, attribution, refusals.

One small bank is built per module with the seeded random-init ``vit-tiny-demo`` encoder on
sklearn's handwritten digits (upscaled to 32x32); embeddings are cached across tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import forensics
from forensics.data.embed import embed_folder
from forensics.errors import BankError, InputError, InsufficientDataError, UnknownNameError
from forensics.paper.demo import _write_pngs, digit_images
from forensics.paper.synth import synth_folder
from forensics.plugin import manager as plugins
from forensics.stats.fingerprints import needs_extras
from forensics.steps.attribute import attribute
from forensics.steps.bank_access import load_baseline
from forensics.steps.baseline_files import save_extras
from forensics.steps.build_baseline import build_baseline
from forensics.steps.curve import compute_curve
from forensics.steps.enroll import enroll
from refbank import Bank
from refbank.bank import curve_fingerprints, curve_params

N = 60  # images per curve: with 2 cells a cell holds about 30 > 20 (the default tau)
COMMON = {"device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders of digits, a bank with a baseline and two enrolled generator families."""
    root = tmp_path_factory.mktemp("pipeline")
    images = digit_images()
    order = np.random.default_rng(7).permutation(len(images))
    T, P, fresh = order[:240], order[240:340], order[340:]
    folders = {}
    for name, ids in (("T", T), ("P", P), ("fresh", fresh[:N]), ("tiny", fresh[N : N + 8]),
                      ("enroll_src", T[:130]), ("query_src", T[130:130 + N]),
                      ("copy_src", T[200:200 + N])):
        _write_pngs(images, ids, root / name)
        folders[name] = root / name
    for kind, params in (("noise", {"sigma": 24.0}), ("shuffle", {"grid": 4})):
        folders[f"gen_{kind}"] = root / f"gen_{kind}"
        synth_folder(kind, folders["enroll_src"], folders[f"gen_{kind}"], seed=1, **params)
        folders[f"query_{kind}"] = root / f"query_{kind}"
        synth_folder(kind, folders["query_src"], folders[f"query_{kind}"], seed=2, **params)
    folders["near_copy"] = root / "near_copy"
    synth_folder("noise", folders["copy_src"], folders["near_copy"], seed=3, sigma=2.0)

    cache = root / "fpcache" / "embeddings"  # where FP_CACHE_DIR=root/fpcache points
    bank = Bank(root / "bank")
    kw = dict(COMMON, bank=bank, cache_dir=cache)
    row = build_baseline("digits", folders["T"], folders["P"], encoder="vit-tiny-demo",
                                  weights="random:0", n_cells=2, **kw)
    messages: list[str] = []
    ids = {}
    for kind in ("noise", "shuffle"):
        ids[kind] = enroll(folders[f"gen_{kind}"], baseline="digits", model=f"{kind}-m",
                                    family=kind, checkpoint="v1", per_curve=N, echo=messages.append,
                                    **kw)
    return {"root": root, "folders": folders, "bank": bank, "cache": cache, "row": row,
            "ids": ids, "messages": messages, "kw": kw}


def test_build_baseline_stores_row_engine_and_fingerprint_arrays(world):
    row, bank = world["row"], world["bank"]
    assert row["name"] == "digits" and row["encoder"] == "vit-tiny-demo"
    assert row["layers"] == [f"blocks.{i}" for i in range(8)]
    assert (row["n_train"], row["n_heldout"]) == (240, 100)
    params = json.loads(row["params_json"])
    assert params["n_cells"] == 2 and params["weights"] == "random:0"
    assert params["fingerprints"] == ["proj-mean", "proj-mean-ct", "proj-mean-early",
                                      "resid-ct", "resid-early", "setstats"]
    loaded = load_baseline("digits", bank=bank)
    assert loaded.engine.id == row["baseline_id"] and loaded.dims == [96] * 8
    extras = loaded.extras(plugins.get("fingerprints", "setstats"))
    T3 = embed_folder(world["folders"]["T"], "vit-tiny-demo", weights="random:0", **COMMON,
                      cache_dir=world["cache"]).arrays[3]
    np.testing.assert_allclose(extras["factor.3"] @ extras["factor.3"].T,
                               np.cov(T3, rowvar=False), rtol=1e-9, atol=1e-12)
    assert extras["mu.0"].shape == (96,) and int(extras["n.0"].reshape(-1)[0]) == 240
    # Arrays shared by fingerprints are stored once, beside the engine's files.
    files = sorted(p.name for p in loaded.folder.iterdir())
    assert files == ["arrays.npz", "fingerprint-arrays.json", "fingerprint-arrays.npz",
                     "meta.json", "train_manifest.json"]
    assert bank.verify().ok


def _store_the_old_way(bank_path, T_layers):
    """Rewrite a bank's baseline as fp stored it before arrays were shared: one file per
    fingerprint, and setstats' full covariance and its square root per layer."""
    from forensics.stats.setstats import gaussian_stats, psd_sqrt

    loaded = load_baseline("digits", bank=Bank(bank_path))
    for name in plugins.names("fingerprints"):
        fp = plugins.get("fingerprints", name)
        if not forensics.stats.fingerprints.needs_extras(fp):
            continue
        arrays = dict(loaded.extras(fp))
        if name == "setstats":
            arrays = {}
            for i, T in enumerate(T_layers):
                st = gaussian_stats(T)
                arrays.update({f"mu.{i}": st.mu, f"cov.{i}": st.cov, f"n.{i}": st.n,
                               f"root.{i}": psd_sqrt(st.cov)})
        save_extras(loaded.folder, name, arrays)
    for f in ("fingerprint-arrays.npz", "fingerprint-arrays.json"):
        (loaded.folder / f).unlink()


def test_a_baseline_stored_the_old_way_gives_the_same_vectors_and_answers(world, tmp_path):
    import shutil

    shutil.copytree(world["bank"].path, tmp_path / "bank")
    T = embed_folder(world["folders"]["T"], "vit-tiny-demo", weights="random:0", **COMMON,
                     cache_dir=world["cache"]).arrays
    _store_the_old_way(tmp_path / "bank", T)
    kw_old = dict(world["kw"], bank=Bank(tmp_path / "bank"))
    query = world["folders"]["query_noise"]
    new = compute_curve(query, baseline="digits", **world["kw"]).fingerprints
    # The files were rewritten after the bank hashed them: let them through on purpose.
    old_baseline = load_baseline("digits", bank=kw_old["bank"], allow_unverified=True)
    old = compute_curve(query, baseline=old_baseline, **kw_old).fingerprints
    assert sorted(new) == sorted(old) and len(new) >= 7
    for name in new:
        if name == "setstats":  # FIDs: the compact form is exact, the old root's round-off
            np.testing.assert_allclose(new[name], old[name], rtol=1e-7, atol=1e-9)
        else:
            np.testing.assert_array_equal(new[name], old[name])
    for fingerprint in new:
        a, b = (attribute(query, fingerprint=fingerprint, n_boot=2, **kw)
                for kw in (world["kw"], dict(kw_old, allow_unverified=True)))
        assert a.decision.to_dict() | {"score": 0, "reason": ""} == \
            b.decision.to_dict() | {"score": 0, "reason": ""}
        assert [m.curve_id for m in a.ranking] == [m.curve_id for m in b.ranking]
        np.testing.assert_allclose([m.score for m in a.ranking], [m.score for m in b.ranking],
                                   rtol=1e-7)


class _LegacyMean:
    """A third-party fingerprint written before shared arrays: it computes its own."""

    name = "legacy-mean"
    description = "set mean minus T's mean, every layer"
    default_matcher = "cosine"

    def prepare(self, ctx):
        return {f"mean.{i}": np.asarray(T, dtype=np.float64).mean(axis=0)
                for i, T in enumerate(ctx.train)}

    def compute(self, ctx):
        return np.concatenate([np.asarray(X, dtype=np.float64).mean(axis=0)
                               - ctx.extras[f"mean.{i}"] for i, X in enumerate(ctx.embeddings)])

    def entry_layers(self, dims):
        return np.repeat(np.arange(len(dims)), dims)


def test_a_fingerprint_preparing_its_arrays_the_old_way_still_works(world, tmp_path):
    import types

    from forensics.plugin import manager as plugins
    from forensics.plugin.hookspecs import hookimpl

    mod = types.ModuleType("legacy_fp")
    mod.register_fingerprints = hookimpl(lambda register: register(_LegacyMean()))
    plugins.get_plugin_manager().register(mod, name="legacy_fp")
    kw = dict(world["kw"], bank=Bank(tmp_path / "bank"))
    f = world["folders"]
    build_baseline("digits", f["T"], f["P"], encoder="vit-tiny-demo",
                            weights="random:0", n_cells=2, **kw)
    for kind in ("noise", "shuffle"):
        enroll(f[f"gen_{kind}"], baseline="digits", model=f"{kind}-m", family=kind,
                        per_curve=N, **kw)
    a = attribute(f["query_shuffle"], fingerprint="legacy-mean", n_boot=0, **kw)
    assert a.ranking[0].family == "shuffle"
    loaded = load_baseline("digits", bank=kw["bank"])
    mine = loaded.extras(_LegacyMean())
    T = embed_folder(f["T"], "vit-tiny-demo", weights="random:0", **COMMON,
                     cache_dir=world["cache"]).arrays
    np.testing.assert_array_equal(mine["mean.5"], T[5].astype(np.float64).mean(axis=0))
    # Its means are proj-mean's and setstats' too: stored once for all three.
    index = json.loads((loaded.folder / "fingerprint-arrays.json").read_text())["fingerprints"]
    assert index["legacy-mean"]["mean.5"] == index["proj-mean"]["mean.5"] == \
        index["setstats"]["mu.5"]


@pytest.mark.parametrize("progress", [True, False])
def test_baseline_build_shows_progress_for_every_long_step(world, tmp_path, capsys, progress):
    f = world["folders"]
    kw = dict(world["kw"], bank=Bank(tmp_path / "bank"), progress=progress)
    capsys.readouterr()
    build_baseline("digits", f["T"], f["P"], encoder="vit-tiny-demo",
                            weights="random:0", n_cells=2, **kw)
    err = capsys.readouterr().err
    stages = ("baseline layers", "fingerprint arrays", "storing in the bank")  # T, P cached
    if progress:
        assert all(s in err for s in stages), err
        n = sum(needs_extras(plugins.get("fingerprints", name))
                for name in plugins.names("fingerprints"))
        assert "8/8" in err and f"{n}/{n}" in err  # every layer, every fingerprint with arrays
    else:
        assert err == ""


def test_same_baseline_under_another_name_and_taken_name_are_refused(world):
    f, kw = world["folders"], world["kw"]
    with pytest.raises(BankError, match="already in the bank .* as 'digits'"):
        build_baseline("again", f["T"], f["P"], encoder="vit-tiny-demo",
                                weights="random:0", n_cells=2, **kw)
    with pytest.raises(BankError, match="named 'digits' is already"):
        build_baseline("digits", f["T"], f["P"], encoder="vit-tiny-demo", **kw)


def test_near_copies_of_training_images_are_far_below_zero_fresh_digits_near_it(world):
    f, kw = world["folders"], world["kw"]
    near = compute_curve(f["near_copy"], baseline="digits", **kw).curve.values
    fresh = compute_curve(f["fresh"], baseline="digits", **kw).curve.values
    assert np.all(near < -3.0), near       # closer to T than held-out data: copying
    assert np.all(np.abs(fresh) < 2.5), fresh  # unseen digits behave like P


def test_curve_provenance_records_inputs_encoder_baseline_and_parameters(world):
    from forensics.data.images import scan_folder

    f, kw, row = world["folders"], world["kw"], world["row"]
    res = compute_curve(f["query_noise"], **kw)  # the bank's only baseline
    p = res.curve.provenance
    assert p["inputs"]["manifest_sha256"] == scan_folder(f["query_noise"]).sha256
    assert p["inputs"]["n_images"] == N
    assert p["encoder"] == {"name": "vit-tiny-demo", "weights_sha256": row["weights_sha256"]}
    assert p["baseline"] == {"id": row["baseline_id"], "name": "digits"}
    assert p["params"] == {"partitioner": "kmeans", "distance": "abscosine", "tau": 20 / N,
                           "tau_rule": "20/m", "pooling": "cls", "seed": 0, "n_cells": 2,
                           "pca_dim": 64, "n_init": 10, "weights": "random:0"}
    assert p["tool_version"] == forensics.__version__ and p["created"]
    np.testing.assert_array_equal(res.fingerprints["paper"], res.curve.values)
    assert res.fingerprints["setstats"].shape == (2 * 8 * 96 + 8,)
    # Precomputed embeddings give the same curve as the folder.
    again = compute_curve(res.embeddings, **kw)
    np.testing.assert_array_equal(again.curve.values, res.curve.values)
    # A baseline loaded once measures many sets the same way.
    loaded = forensics.load_baseline("digits", bank=kw["bank"])
    third = compute_curve(res.embeddings, baseline=loaded, cache_dir=None, device="cpu")
    np.testing.assert_array_equal(third.curve.values, res.curve.values)
    for name, vec in res.fingerprints.items():
        np.testing.assert_array_equal(third.fingerprints[name], vec)
    assert again.curve.provenance["inputs"]["manifest_sha256"] == p["inputs"]["manifest_sha256"]


def test_enroll_splits_in_manifest_order_drops_the_remainder_and_stores_fingerprints(world):
    bank, ids = world["bank"], world["ids"]
    assert [len(ids["noise"]), len(ids["shuffle"])] == [2, 2]  # 130 images -> 2 x 60
    assert sum("the last 10 image(s)" in m for m in world["messages"]) == 2
    rows = bank.curves(curve_id=ids["noise"])
    assert [r["n_images"] for r in rows] == [N, N]
    assert rows[0]["manifest_sha256"] != rows[1]["manifest_sha256"]
    assert {r["checkpoint"] for r in rows} == {"v1"} and rows[0]["tau"] == pytest.approx(20 / N)
    for r in rows:
        fps = curve_fingerprints(r)
        assert sorted(fps) == ["paper", "proj-mean", "proj-mean#var", "proj-mean-ct",
                               "proj-mean-early", "proj-mean-early#var", "resid-ct",
                               "resid-early", "resid-early#rows", "resid-early#var",
                               "setstats"]
        assert fps["paper"] == r["values"]  # JSON floats round-trip exactly
        # the per-image rows: every entry, float16, in a file of their own named by its
        # SHA-256; the curve's vector their mean
        from refbank.bank import ROWS_REF_PREFIX

        ref = fps["resid-early#rows"]
        assert ref.startswith(ROWS_REF_PREFIX)
        path = bank.rows_path(ref)
        assert path.parent.name == "rows" and path.stat().st_size == 2 * N * len(fps["resid-early"])
        rows_ = bank.read_rows(ref).astype(np.float64).reshape(r["n_images"], -1)
        vec = np.asarray(fps["resid-early"])
        assert rows_.shape == (N, vec.size)
        np.testing.assert_array_equal(rows_, rows_.astype(np.float16).astype(np.float64))
        # float16 keeps 11 significant bits: each image's entry is off by at most 2^-11 of
        # its magnitude, and so is their mean
        bound = 2.0**-11 * np.abs(rows_).mean(axis=0) + 1e-7
        assert (np.abs(rows_.mean(axis=0) - vec) <= bound).all()
        for name in ("proj-mean", "proj-mean-early", "resid-early"):  # per-image variances
            var = np.asarray(fps[name + "#var"])
            assert var.shape == np.shape(fps[name]) and (var > 0).all()
    # The first chunk is exactly the first 60 images in path order.
    from forensics.data.images import Manifest, scan_folder

    m = scan_folder(world["folders"]["gen_noise"])
    assert rows[0]["manifest_sha256"] == Manifest(m.root, m.entries[:N]).sha256
    assert bank.verify().ok


def test_enroll_refuses_too_few_images(world):
    with pytest.raises(InsufficientDataError, match="fewer than --per-curve 500"):
        enroll(world["folders"]["query_noise"], baseline="digits", model="m",
                        family="f", **world["kw"])


@pytest.mark.parametrize("kind", ["noise", "shuffle"])
def test_the_default_fingerprint_ranks_the_enrolled_generator_first(world, kind):
    a = forensics.attribute(world["folders"][f"query_{kind}"], n_boot=0, **world["kw"])
    assert a.ranking[0].family == kind
    attr = a.to_dict()["provenance"]["attribution"]
    assert (attr["fingerprint"], attr["matcher"]) == ("resid-early", "zscore")
    # Two curves per family are too few for a spread-based threshold to be lenient here:
    # the decision may be unknown, but the nearest family is the generator's.
    assert a.decision.nearest_family == kind


@pytest.mark.parametrize("fingerprint", ["resid-ct", "proj-mean-ct"])
@pytest.mark.parametrize("kind", ["noise", "shuffle"])
def test_the_curve_variants_rank_both_curves_of_the_generator_first(world, kind, fingerprint):
    """With the C_T curve in front, noise added to real images is not taken for shuffling."""
    a = forensics.attribute(world["folders"][f"query_{kind}"], n_boot=0,
                            fingerprint=fingerprint, **world["kw"])
    assert [m.family for m in a.ranking[:2]] == [kind, kind]
    assert a.parameters["fingerprint"] == fingerprint and a.parameters["matcher"] == "zscore"


@pytest.mark.parametrize("kind", ["noise", "shuffle"])
def test_attribute_names_the_enrolled_generator(world, kind):
    a = forensics.attribute(world["folders"][f"query_{kind}"], n_boot=8, fingerprint="paper",
                            matcher="combined", **world["kw"])
    d = a.decision
    assert (d.family, d.model, d.unknown) == (kind, f"{kind}-m", False)
    # the two-level answer's confidence: simulated from the bank's models at the suspect's size
    assert 0.0 < d.confidence < 1.0 and a.calibration.answer["n"] == N
    assert d.consistent and d.consistent[0]["model"] == f"{kind}-m" and d.closest is None
    assert {t.model for t in a.belonging} == {"noise-m", "shuffle-m"}
    own = forensics.attribute(world["folders"][f"query_{kind}"], n_boot=0, **world["kw"])
    assert 0.0 < own.decision.confidence < 1.0  # resid-early: calibrated on the bank
    cal = own.to_dict()["calibration"]
    assert cal["confidence"]["n_draws"] > 0 and "simulated from the bank" in cal["note"]
    assert 0.0 <= d.stability <= 1.0 and a.bootstrap.n_boot == 8
    data = a.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["ranking"][0]["family"] == kind
    assert {"curve_id", "model", "family", "score"} <= set(data["ranking"][0])
    assert len(data["curve"]["values"]) == 8 and data["curve"]["layers"][0] == "blocks.0"
    assert data["provenance"]["attribution"]["fingerprint"] == "paper"
    assert data["provenance"]["attribution"]["matcher"] == "combined"
    assert data["provenance"]["attribution"]["drop_layers"] == [0]
    assert data["calibration"]["threshold"] is not None
    # the per-image attributor chose among the consistent models, and says what it read
    att = data["provenance"]["attribution"]["attributor"]
    assert att["models"] == ["noise-m", "shuffle-m"] and att["entries"] > 0
    assert max(att["scores"], key=att["scores"].get) == f"{kind}-m"
    assert len(att["rows_sha256"]) == 64 and att["rows_per_model"][f"{kind}-m"] == 2 * N
    assert "by the per-image attributor" in d.reason
    kinds = [c["kind"] for c in data["provenance"]["custody"]["calibrations"]]
    assert kinds == ["confidence", "attributor", "belonging"]


def test_the_attributors_own_test_decides_the_model_level(world):
    a = forensics.attribute(world["folders"]["query_noise"], n_boot=0, **world["kw"])
    d = a.decision
    assert {t.kind for t in a.belonging} == {"probe"} and len(a.belonging) == 2
    assert (d.family, d.model, d.unknown) == ("noise", "noise-m", False)
    own = next(t for t in a.belonging if t.model == "noise-m")
    assert own.consistent and own.draws == 200 and own.n_images == N
    assert "the per-image attributor's test" in a.parameters["belonging"]
    assert d.confidence is None or 0.0 <= d.confidence <= 1.0
    kinds = [c["kind"] for c in a.to_dict()["provenance"]["custody"]["calibrations"]]
    assert kinds == ["confidence", "attributor", "belonging"]
    again = forensics.attribute(world["folders"]["query_noise"], n_boot=0, **world["kw"])
    assert again.decision == d and again.belonging == a.belonging  # read back from the store


def test_the_mmd_test_decides_when_chosen_and_the_attributor_orders(world, monkeypatch):
    from forensics import defaults

    monkeypatch.setattr(defaults, "BELONG_KIND", "mmd")
    a = forensics.attribute(world["folders"]["query_shuffle"], n_boot=0, **world["kw"])
    assert {t.kind for t in a.belonging} == {"mmd"}
    assert (a.decision.family, a.decision.unknown) == ("shuffle", False)
    assert "mmd two-sample test" in a.parameters["belonging"]
    assert "by the per-image attributor" in a.decision.reason
    assert a.parameters["attributor"]["models"] == ["noise-m", "shuffle-m"]


def test_a_bank_enrolled_before_rows_were_stored_whole_is_still_tested(world, tmp_path):
    """Curves that store 32 projected entries as decimals (as fp stored them before) are
    tested by the MMD test on them, and the fingerprint ranking chooses among them."""
    from forensics.stats.belonging import project
    from refbank.bank import curve_fingerprints, curve_params

    bank = tmp_path / "bank"
    shutil.copytree(world["bank"].path, bank)
    shutil.rmtree(bank / "calibration", ignore_errors=True)
    b = Bank(bank)
    old = b.curves()
    rows = []
    for r in old:
        fps = curve_fingerprints(r)
        whole = b.read_rows(fps["resid-early#rows"]).reshape(r["n_images"], -1)
        fps["resid-early#rows"] = [float(str(h)) for h in
                                   project(whole).astype(np.float16).ravel()]
        row = {k: v for k, v in r.items() if k not in (
            "curve_id", "row_sha256", "params_json", "fingerprints_json", "created")}
        rows.append({**row, "params": curve_params(r), "fingerprints": fps})
    b.remove_curves([r["curve_id"] for r in old])
    assert not list((bank / "rows").iterdir())  # no curve names the rows files any more
    b.add_curves(rows)
    a = forensics.attribute(world["folders"]["query_noise"], n_boot=0,
                            **{**world["kw"], "bank": Bank(bank)})
    assert {t.kind for t in a.belonging} == {"mmd"} and a.parameters["attributor"] is None
    assert (a.decision.family, a.decision.unknown) == ("noise", False)
    assert "re-enroll them" in a.parameters["belonging"]
    assert all(t.p_value is not None for t in a.belonging)


def test_images_of_no_enrolled_model_are_unknown_with_the_closest_family_shown(world):
    a = forensics.attribute(world["folders"]["fresh"], n_boot=0, **world["kw"])
    d, data = a.decision, a.to_dict()
    assert d.unknown and d.family is None and d.model is None and d.consistent == []
    assert d.closest == d.nearest_family in ("noise", "shuffle")
    assert "no enrolled model is consistent" in d.reason
    assert data["decision"]["unknown"] is True and data["decision"]["family"] is None
    assert all(not t["consistent"] and t["p_value"] < 0.05 for t in data["belonging"])
    assert 0.0 < d.confidence < 1.0  # the probability that "unknown" is right


def test_attribute_on_the_setstats_fingerprint_with_a_report(world, tmp_path):
    a = attribute(world["folders"]["query_shuffle"], fingerprint="setstats",
                           matcher="cosine", n_boot=2, drop_layers=(), report=tmp_path / "rep",
                           **world["kw"])
    assert a.decision.nearest_family == "shuffle"
    assert a.parameters["fingerprint"] == "setstats" and a.parameters["drop_layers"] == []
    assert a.calibration.matcher == "cosine"
    saved = json.loads((tmp_path / "rep" / "attribution.json").read_text())
    assert saved["decision"] == a.to_dict()["decision"]
    assert (tmp_path / "rep" / "attribution.png").read_bytes()[:4] == b"\x89PNG"


def test_small_sets_work_with_fingerprints_that_need_no_ct(world):
    f, kw = world["folders"], world["kw"]
    for name in ("resid-early", "proj-mean-early", "setstats"):
        a = attribute(f["tiny"], fingerprint=name, n_boot=3, **kw)
        assert a.curve.provenance["inputs"]["n_images"] == 8
        assert a.decision.nearest_family in ("noise", "shuffle")
        assert np.isnan(a.curve.values).all()  # C_T is undefined at 8 images, and not needed
    for name in ("paper", "resid-ct", "proj-mean-ct"):
        with pytest.raises(InsufficientDataError, match="C_T is undefined"):
            attribute(f["tiny"], fingerprint=name, n_boot=0, **kw)


NASTY_MODEL = '<i>m</i>"&\'<script>alert(1)</script>'
NASTY_FILE = "<img src=x onerror=alert(1)>.png"


@pytest.fixture(scope="module")
def case_report(world, tmp_path_factory):
    """``attribute --report`` on a bank and a suspect folder whose names hold HTML."""
    import shutil

    root = tmp_path_factory.mktemp("case")
    shutil.copytree(world["bank"].path, root / "bank")
    kw = dict(world["kw"], bank=Bank(root / "bank"))
    f = world["folders"]
    enroll(f["gen_noise"], baseline="digits", model=NASTY_MODEL, family="x<y>",
                    per_curve=N, allow_duplicate=True, **kw)
    suspect = root / "suspect<b>"
    shutil.copytree(f["query_shuffle"], suspect)
    first = sorted(suspect.iterdir())[0]
    first.rename(suspect / NASTY_FILE)
    result = attribute(suspect, n_boot=3, top=6, report=root / "report", **kw)
    return {"result": result, "dir": root / "report", "suspect": suspect, "kw": kw}


def _verdict(result):
    d = result.decision
    return (f"Decision: UNKNOWN (closest family {d.closest}, not the decision)" if d.unknown
            else f"Decision: family {d.family}, model {d.model}")


def _links(text):
    """Every src and href attribute value of the page's tags."""
    from html.parser import HTMLParser

    found = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(v or "" for k, v in attrs if k in ("src", "href"))

    Parser().feed(text)
    return found


def test_the_case_report_is_one_self_contained_escaped_file(case_report):
    from forensics.data.images import scan_folder

    text = (case_report["dir"] / "report.html").read_text()
    result = case_report["result"]
    assert text.startswith("<!DOCTYPE html>") and _verdict(result) in text
    assert "<script" not in text.lower() and NASTY_FILE not in text and "<img src=x" not in text
    assert "&lt;i&gt;m&lt;/i&gt;&quot;&amp;&#x27;&lt;script&gt;" in text  # the model name
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in text and "suspect&lt;b&gt;" in text
    # Nothing is fetched: every image is inlined, no link leaves the file.
    links = _links(text)
    assert len(links) == len(scan_folder(case_report["suspect"])) + 1  # thumbnails + picture
    assert all(v.startswith("data:image/png;base64,") for v in links)
    assert "url(" not in text and "@import" not in text
    manifest = scan_folder(case_report["suspect"])
    assert text.count('<img src="data:image/png;base64,') == len(manifest)  # thumbnails
    assert 'class="picture" alt="attribution picture" src="data:image/png;base64,' in text
    assert all(e.sha256 in text for e in manifest.entries) and manifest.sha256 in text
    row = case_report["kw"]["bank"].get_baseline("digits")
    assert row["baseline_id"] in text and row["files_sha256"] in text
    d = result.decision
    assert f"{d.confidence:.6g}" in text and f"{result.calibration.threshold:.6g}" in text
    for m in result.ranking:
        assert m.curve_id in text
    prov = result.to_dict()["provenance"]
    assert prov["embedding"]["torch_version"] in text  # the provenance, rendered generically
    assert prov["attribution"]["fingerprint"] == "resid-early" and ">resid-early<" in text


def test_the_picture_of_a_vector_fingerprint_shows_scores_threshold_and_layers(case_report):
    from PIL import Image

    with Image.open(case_report["dir"] / "attribution.png") as im:
        assert im.size[0] >= 1400  # two panels: ranked scores, per-layer distances


def test_layer_distances_are_zscore_units_per_layer():
    from forensics.steps.reports import layer_distances

    bank = np.array([[0.0, 0.0, 0.0, 5.0], [2.0, 4.0, 2.0, 5.0], [1.0, 2.0, 1.0, 5.0]])
    q = np.array([1.0, 2.0, 3.0, 7.0])
    sd = bank.std(axis=0)
    out = layer_distances(q, bank[:1], bank, np.array([0, 0, 1, 1]), 3)
    np.testing.assert_allclose(out[0, 0], np.sqrt(((1 / sd[0]) ** 2 + (2 / sd[1]) ** 2) / 2))
    np.testing.assert_allclose(out[0, 1], 3 / sd[2])  # entry 3 has no spread: left out
    assert np.isnan(out[0, 2])


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)


def _open_in_chromium(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The page's DOM after loading in headless Chromium, and its console messages."""
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=3000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, [ln for ln in out.stderr.splitlines() if ":CONSOLE" in ln]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_the_case_report_opens_in_a_headless_browser_without_console_errors(case_report,
                                                                            tmp_path):
    # The check sees console errors: a page with a failing script and a missing image.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><p>x</p><img src="missing.png"><script>nope();</script>')
    assert len(_open_in_chromium(bad, tmp_path)[1]) >= 1
    dom, console = _open_in_chromium(case_report["dir"] / "report.html", tmp_path)
    assert console == []
    assert _verdict(case_report["result"]) in dom
    assert "&lt;i&gt;m&lt;/i&gt;" in dom and "<i>m</i>" not in dom  # shown as text


def test_bootstrap_is_seeded(world):
    runs = [attribute(world["folders"]["query_noise"], n_boot=5, seed=s,
                               **world["kw"]).bootstrap for s in (3, 3)]
    assert runs[0] == runs[1]


def test_refusals(world, tmp_path):
    f, kw = world["folders"], world["kw"]
    with pytest.raises(InsufficientDataError, match="C_T is undefined.*needs no C_T"):
        attribute(f["tiny"], fingerprint="paper", n_boot=0, **kw)
    with pytest.raises(UnknownNameError, match="paper, proj-mean, proj-mean-ct, proj-mean-early, "
                                               "resid-ct, resid-early, setstats"):
        attribute(f["query_noise"], fingerprint="nope", **kw)
    missing = dict(kw, bank=Bank(tmp_path / "missing"))
    for step in (attribute, compute_curve):  # a mistyped --bank is not an empty bank
        with pytest.raises(BankError, match="does not exist"):
            step(f["query_noise"], **missing)
    empty = dict(kw, bank=_empty_bank(tmp_path / "empty"))
    with pytest.raises(BankError, match="no enrolled curves"):
        attribute(f["query_noise"], **empty)
    with pytest.raises(BankError, match="no baselines"):
        compute_curve(f["query_noise"], **empty)


def _empty_bank(path: Path) -> Bank:
    """A bank that exists and holds nothing (its only baseline added, then removed)."""
    bank = Bank(path)
    bank.add_baseline({"name": "b", "encoder": "timm:tiny", "weights_sha256": "ab" * 32,
                       "layers": ["l0"], "train_manifest_sha256": "t" * 64,
                       "heldout_manifest_sha256": "p" * 64})
    bank.remove_baseline("b")
    return bank


def test_embeddings_of_another_encoder_are_refused(world):
    from forensics.data.embed import embed_folder

    other = embed_folder(world["folders"]["tiny"], "vit-tiny-demo", weights="random:1",
                         cache_dir=world["cache"], progress=False, device="cpu")
    with pytest.raises(InputError, match="weights .* but baseline 'digits' uses"):
        compute_curve(other, **world["kw"])


def test_a_baseline_without_enrolled_curves_is_refused(world, tmp_path):
    """A second baseline (other encoder weights) in the same bank: its curves are missing."""
    import shutil

    bank = Bank(tmp_path / "two")
    shutil.copytree(world["bank"].path, bank.path)
    kw = dict(world["kw"], bank=bank)
    f = world["folders"]
    build_baseline("other", f["T"], f["P"], encoder="vit-tiny-demo",
                            weights="random:1", n_cells=2, **kw)
    with pytest.raises(BankError, match="measured against the suspect's baseline 'other'"):
        attribute(f["query_noise"], baseline="other", n_boot=0, **kw)
    # Without --baseline, the one every enrolled curve uses is taken.
    assert attribute(f["query_noise"], n_boot=0, **kw).parameters["baseline"] == "digits"


def test_curves_without_the_fingerprint_are_refused_with_a_way_out(world, tmp_path):
    import shutil

    bank = Bank(tmp_path / "old")
    shutil.copytree(world["bank"].path, bank.path)
    old = bank.curves()[0]
    row = {k: old[k] for k in ("model", "family", "encoder", "weights_sha256", "baseline_id",
                               "layers", "values", "n_images", "manifest_sha256")}
    bank.add_curves([row], allow_duplicate=True)  # as if enrolled before setstats existed
    kw = dict(world["kw"], bank=bank)
    with pytest.raises(BankError, match="no 'setstats' fingerprint .*Re-enroll"):
        attribute(world["folders"]["query_noise"], fingerprint="setstats", **kw)
    assert attribute(world["folders"]["query_noise"], n_boot=0, fingerprint="paper",
                              **kw).ranking
    with pytest.raises(BankError, match="no 'resid-early' fingerprint .*--fingerprint paper"):
        attribute(world["folders"]["query_noise"], n_boot=0, **kw)


def test_tampered_fingerprints_fail_verification(world, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    bank = Bank(tmp_path / "tamper")
    shutil.copytree(world["bank"].path, bank.path)
    path = bank.path / "curves.parquet"
    table = pq.read_table(path)
    col = table.column("fingerprints_json").to_pylist()
    col[0] = col[0].replace("[", "[1.0,", 1)
    i = table.schema.get_field_index("fingerprints_json")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(col)), path)
    report = bank.verify()
    assert [p.id for p in report.problems] == [table.column("curve_id")[0].as_py()]


def test_lazy_api_loads_steps_on_first_use_and_attribute_is_the_attribute_step():
    code = ("import sys, forensics; f = forensics.enroll; a = forensics.attribute; "
            "import forensics.steps.attribute as p; "
            "print(a is p.attribute, f.__module__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.stdout.split() == ["True", "forensics.steps.enroll", "False"], out.stderr


# -- the commands -----------------------------------------------------------------------------


def _fp(*args: str, ok: bool = True):
    from typer.testing import CliRunner

    from forensics.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_cli_build_enroll_curve_attribute_with_json(world, tmp_path, monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(world["cache"].parent))
    monkeypatch.setenv("FP_BANK", str(tmp_path / "bank"))
    f = world["folders"]
    row = json.loads(_fp("baseline", "build", "dg", "--train", f["T"], "--heldout", f["P"],
                         "--encoder", "vit-tiny-demo", "--weights", "random:0", "--n-cells", "2",
                         "--device", "cpu", "--json").stdout)
    assert row["name"] == "dg" and row["baseline_id"] == world["row"]["baseline_id"]
    for kind in ("noise", "shuffle"):
        res = _fp("enroll", f[f"gen_{kind}"], "--baseline", "dg", "--model", kind,
                  "--family", kind, "--per-curve", N, "--device", "cpu", "--json")
        rows = json.loads(res.stdout)
        assert [r["family"] for r in rows] == [kind, kind] and "left out" in res.stderr
    curve = json.loads(_fp("curve", f["near_copy"], "--baseline", "dg", "--device", "cpu",
                           "--json", "--plot", tmp_path / "c.png").stdout)
    assert max(curve["values"]) < -3.0 and len(curve["results"]) == 8
    assert (tmp_path / "c.png").stat().st_size > 1000
    answer = json.loads(_fp("attribute", f["query_shuffle"], "--device", "cpu", "--n-boot", "3",
                            "--top", "2", "--json", "--report", tmp_path / "rep").stdout)
    assert answer["decision"]["family"] == "shuffle" and answer["decision"]["unknown"] is False
    assert len(answer["ranking"]) == 2 and set(answer) >= {"curve", "provenance"}
    # The command matches on the library's default method, and records it.
    attr = answer["provenance"]["attribution"]
    assert attr["fingerprint"] == forensics.defaults.FINGERPRINT
    assert attr["matcher"] == "zscore"
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "SHA256SUMS", "attribution.json", "attribution.png", "report.html"]
    text = _fp("attribute", f["query_noise"], "--device", "cpu", "--n-boot", "0",
               "--fingerprint", "paper", "--matcher", "l2", "--drop-layers", "none").stdout
    assert "Decision: family noise, model noise" in text


def test_cli_refusals_say_what_to_do(world, tmp_path):
    _empty_bank(tmp_path / "empty")
    res = _fp("attribute", world["folders"]["query_noise"], "--bank", tmp_path / "empty",
              ok=False)
    assert res.exit_code == 1 and "Error: the bank at" in res.stderr
    assert "fp enroll DIR --baseline NAME" in res.stderr
    res = _fp("attribute", world["folders"]["query_noise"], "--bank", tmp_path / "empty",
              "--drop-layers", "first", ok=False)
    assert res.exit_code == 1 and "--drop-layers 'first'" in res.stderr


def test_cli_lists_fingerprints():
    rows = json.loads(_fp("list", "fingerprints", "--json").stdout)
    assert [r["name"] for r in rows] == ["paper", "proj-mean", "proj-mean-ct",
                                         "proj-mean-early", "resid-ct", "resid-early",
                                         "setstats"]
    assert all(r["plugin"] == "fp_plugins.fingerprints" and r["description"] for r in rows)


def test_small_sets_enroll_without_ct_and_only_ct_matching_refuses_them(world, tmp_path):
    """A curator's 8 samples of a model enroll: the fingerprints that read C_T are left out
    (said once), the default fingerprint matches them, and C_T matching refuses them."""
    bank = Bank(tmp_path / "small")
    shutil.copytree(world["bank"].path, bank.path)
    kw = dict(world["kw"], bank=bank)
    small = tmp_path / "small_gen"
    synth_folder("noise", world["folders"]["tiny"], small, seed=5, sigma=24.0)
    messages: list[str] = []
    ids = enroll(small, baseline="digits", model="noise-small", family="noise", per_curve=4,
                 echo=messages.append, **kw)
    assert len(ids) == 2
    said = [m for m in messages if "C_T is undefined" in m]
    assert len(said) == 1 and "2 of 2 curve(s)" in said[0] and "paper" in said[0], messages
    rows = bank.curves(curve_id=ids)
    for row in rows:
        undefined = curve_params(row)["ct_undefined"]
        assert undefined["layers"] == row["layers"] and "C_T needs about" in undefined["reason"]
        stored = curve_fingerprints(row)
        assert "resid-early" in stored and "setstats" in stored
        assert not {"paper", "resid-ct", "proj-mean-ct"} & set(stored)
        assert np.isnan(row["values"]).all()
    a = attribute(world["folders"]["query_noise"], n_boot=0, **kw)  # the default: no C_T
    assert a.decision.nearest_family == "noise"
    assert set(ids) <= {m.curve_id for m in attribute(
        world["folders"]["query_noise"], n_boot=0, top=10, **kw).ranking}
    for name in ("paper", "resid-ct"):
        with pytest.raises(BankError, match=f"2 enrolled curve.* have no C_T, which {name!r}"
                                            f".*{ids[0]}.*the default, resid-early"):
            attribute(world["folders"]["query_noise"], n_boot=0, fingerprint=name, **kw)
    from forensics.steps.evaluate import evaluate_bank

    with pytest.raises(BankError, match="have no C_T"):
        evaluate_bank(bank=bank, fingerprint="paper", n_boot=0)


def test_enrolment_records_storage_and_the_answer_names_a_mismatch(world, tmp_path):
    from PIL import Image

    from refbank.bank import curve_params

    for row in world["bank"].curves(curve_id=world["ids"]["noise"]):
        cond = curve_params(row)["conditions"]
        assert cond["label"] == "lossless" and cond["formats"] == {"PNG": N}
    kw = dict(world["kw"], n_boot=0)
    a = attribute(world["folders"]["query_noise"], **kw)
    assert a.conditions["suspect"]["label"] == "lossless" and a.conditions["mismatch"] == []
    jpeg = tmp_path / "jpeg"
    jpeg.mkdir()
    for p in sorted(world["folders"]["query_noise"].glob("*.png")):
        Image.open(p).convert("RGB").save(jpeg / (p.stem + ".jpg"), quality=70)
    b = attribute(jpeg, **dict(kw, n_boot=3))
    assert b.conditions["suspect"]["label"] == "JPEG q70"
    assert any("stored as JPEG q70" in s for s in b.conditions["mismatch"])
    assert b.to_dict()["conditions"] == b.conditions
    # no enrolled curves stored like these: inconclusive, never a family
    d = b.decision
    assert d.inconclusive and d.unknown and d.family is None and d.confidence is None
    assert d.stability is None and b.bootstrap is None
    assert "no curves of a JPEG quality within 10" in d.reason and "--conditions jpeg75" in d.reason


def test_curves_enrolled_under_conditions_are_compared_like_with_like(world, tmp_path,
                                                                      monkeypatch):
    from PIL import Image

    from forensics import defaults
    from forensics.paper.conditions import enroll_conditions, parse_conditions
    from forensics.steps.storage import curve_condition

    supported = {"top1": 0.9, "set": "cifar zoo", "drop": 0.0, "drop_set": "cifar zoo",
                 "wrong_above_half": 0, "answers": 40, "measured": "2000-01-01"}
    monkeypatch.setattr(defaults, "CONDITION_FIGURES", {"jpeg75": supported})

    bank = Bank(tmp_path / "bank")
    shutil.copytree(world["bank"].path, bank.path)
    kw = dict(world["kw"], bank=bank)
    for kind in ("noise", "shuffle"):
        made = enroll_conditions(world["folders"][f"gen_{kind}"], ["jpeg75"], baseline="digits",
                                 model=f"{kind}-m", family=kind, per_curve=N, **kw)
        assert len(made["jpeg75"]) == 2
        assert {curve_condition(r) for r in bank.curves(curve_id=made["jpeg75"])} == {"jpeg75"}
    jpeg = tmp_path / "suspect"
    jpeg.mkdir()
    for p in sorted(world["folders"]["query_noise"].glob("*.png")):
        Image.open(p).convert("RGB").save(jpeg / (p.stem + ".jpg"), quality=72)
    a = attribute(jpeg, n_boot=0, **kw)
    used = a.conditions["compared_with"]
    assert used["condition"] == "jpeg75" and used["n_curves"] == 4 and not a.decision.inconclusive
    assert a.decision.nearest_family == "noise" and a.parameters["condition"] == "jpeg75"
    assert {m.curve_id for m in a.ranking} <= set(made["jpeg75"]) | {
        r["curve_id"] for r in bank.curves() if curve_condition(r) == "jpeg75"}
    clean = attribute(world["folders"]["query_noise"], n_boot=0, **kw)  # clean: clean curves
    assert clean.conditions["compared_with"]["condition"] == "clean"
    forced = attribute(jpeg, n_boot=0, condition="clean", **kw)  # asked: no confidence
    assert forced.parameters["condition"] == "clean" and forced.decision.confidence is None
    # a bank of clean curves only: JPEG suspects compared with them by request, no confidence
    only_clean = attribute(jpeg, n_boot=0, condition="clean", **world["kw"])
    assert only_clean.parameters["condition"] == "clean"
    assert only_clean.decision.confidence is None and not only_clean.decision.inconclusive
    # the development sets measured the condition as not attributable: inconclusive
    monkeypatch.setattr(defaults, "CONDITION_FIGURES", {"jpeg75": dict(supported,
                                                                       wrong_above_half=2)})
    refused = attribute(jpeg, n_boot=3, **kw)
    d = refused.decision
    assert d.inconclusive and d.family is None and d.confidence is None and d.stability is None
    assert "measured 'jpeg75' as not attributable" in d.reason
    assert "2 of 40 answers naming a wrong family with confidence above 0.5" in d.reason
    with pytest.raises(InputError, match="unknown condition 'jpeg7'"):
        attribute(jpeg, n_boot=0, condition="jpeg7", **kw)
    with pytest.raises(InputError, match="unknown condition 'blur'.*jpeg95"):
        parse_conditions("jpeg90,blur")


def test_cli_enrolls_only_the_condition_curves_of_an_enrolled_model(world, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(world["cache"].parent))
    bank = tmp_path / "bank"
    shutil.copytree(world["bank"].path, bank)
    gen = world["folders"]["gen_noise"]
    res = _fp("enroll", gen, "--bank", bank, "--model", "noise-m", "--family", "noise",
              "--per-curve", N, "--only-conditions", ok=False)
    assert res.exit_code == 1 and "--only-conditions needs --conditions" in res.stderr
    res = _fp("enroll", gen, "--bank", bank, "--model", "noise-m", "--family", "noise",
              "--conditions", "jpeg7", ok=False)
    assert res.exit_code == 1 and "unknown condition 'jpeg7'" in res.stderr
    res = _fp("enroll", gen, "--bank", bank, "--model", "noise-m", "--family", "noise",
              "--per-curve", N, "--conditions", "half", "--only-conditions", "--json", "-q")
    rows = json.loads(res.stdout)
    assert len(rows) == 2 and {json.loads(r["params_json"])["condition"] for r in rows} == {"half"}


def test_many_suspect_sets_in_one_call_with_reports_and_a_failed_set(world, tmp_path):
    from forensics.steps.attribute import attribute_many

    f = world["folders"]
    empty = tmp_path / "empty_set"
    empty.mkdir()
    seen = []
    answers = attribute_many([f["query_noise"], empty, f["query_shuffle"]], n_boot=0,
                             report=tmp_path / "reports", on_answer=seen.append,
                             **world["kw"])
    assert [a.folder for a in answers] == [str(f["query_noise"]), str(empty),
                                           str(f["query_shuffle"])] and seen == answers
    assert answers[0].result.decision.family == "noise"
    assert answers[2].result.decision.family == "shuffle"
    assert answers[1].result is None and answers[1].error["type"] == "InputError"
    one = attribute(f["query_noise"], n_boot=0, **world["kw"])  # the same answer as alone
    assert answers[0].result.decision == one.decision
    index = (tmp_path / "reports" / "index.html").read_text()
    assert "query_noise/report.html" in index and "failed:" in index
    assert (tmp_path / "reports" / "query_noise" / "report.html").exists()
    assert not (tmp_path / "reports" / "empty_set").exists()
    line = answers[0].to_dict()
    assert line["answer"]["decision"]["family"] == "noise" and line["report"].endswith(
        "query_noise")
    with pytest.raises(InputError, match="holds a report already"):  # evidence is kept
        attribute_many([f["query_noise"]], report=tmp_path / "reports", **world["kw"])


def test_cli_attributes_several_folders_and_each_sub_folder(world, tmp_path, monkeypatch):
    monkeypatch.setenv("FP_CACHE_DIR", str(world["cache"].parent))
    f, bank = world["folders"], world["bank"].path
    res = _fp("attribute", f["query_noise"], f["query_shuffle"], "--bank", bank, "--n-boot",
              "0", "--json")
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["answer"]["decision"]["family"] for x in lines] == ["noise", "shuffle"]
    case = tmp_path / "case"
    for name in ("a", "b"):
        shutil.copytree(f["query_noise" if name == "a" else "query_shuffle"], case / name)
    (case / "c").mkdir()  # a seizure with no images: reported, the others go on
    res = _fp("attribute", case, "--each", "--bank", bank, "--n-boot", "0", ok=False)
    assert res.exit_code == 1
    assert "3 suspect sets" in res.stdout and "noise" in res.stdout and "shuffle" in res.stdout
    assert "Error:" in res.stderr and "c:" in res.stderr
    res = _fp("attribute", f["query_noise"], "--each", "--bank", bank, ok=False)
    assert res.exit_code == 1 and "holds no sub-folder" in res.stderr


# -- the light path: cached suspects, stored calibration --------------------------------------


def test_a_cached_set_is_answered_without_torch_or_scikit_learn_and_alike(world):
    f = world["folders"]
    attribute(f["query_shuffle"], n_boot=0, **world["kw"])  # embeds, stores calibrations
    first = attribute(f["query_shuffle"], n_boot=0, **world["kw"])
    stored = sorted(p.name for p in (world["bank"].path / "calibration").rglob("*.*"))
    assert {n.rsplit("-", 1)[0] for n in stored} == {"confidence", "belonging", "vectors",
                                                     "attributor"}
    code = (
        "import json, sys, forensics\n"
        f"a = forensics.attribute({str(f['query_shuffle'])!r}, bank={str(world['bank'].path)!r},"
        f" cache_dir={str(world['cache'])!r}, n_boot=0, device='cpu')\n"
        "print(json.dumps({'answer': a.to_dict(), 'loaded': sorted(m for m in ('torch', "
        "'sklearn', 'scipy.stats') if m in sys.modules)}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout)
    assert got["loaded"] == []  # neither the encoder nor a fit: everything was stored
    light, full = got["answer"], json.loads(json.dumps(first.to_dict()))
    for a in (light, full):
        a["provenance"].pop("created")
    assert _differences(light, full) == []  # bit for bit, to the calibrations' hashes
    assert light["provenance"]["custody"]["calibrations"][0]["kind"] == "confidence"


def test_a_damaged_stored_calibration_is_set_aside_and_computed_again(world, tmp_path):
    from forensics.errors import FpWarning

    bank = tmp_path / "bank"
    shutil.copytree(world["bank"].path, bank)
    shutil.rmtree(bank / "calibration", ignore_errors=True)  # only this answer's files
    kw = {**world["kw"], "bank": Bank(bank)}
    f = world["folders"]
    first = attribute(f["query_noise"], n_boot=0, **kw)
    target = next((bank / "calibration").rglob("belonging-*.json"))
    doc = json.loads(target.read_text())
    doc["value"]["answer"]["n_named"] += 1  # a forged count of the calibration
    target.write_text(json.dumps(doc))
    with pytest.warns(FpWarning, match="SHA-256 does not match"):
        again = attribute(f["query_noise"], n_boot=0, **kw)
    assert (target.parent / f"damaged-{target.name}").exists() and target.exists()
    assert again.decision == first.decision and again.belonging == first.belonging


def test_cached_rows_are_read_without_the_encoder_and_only_when_all_are_there(world, tmp_path,
                                                                             monkeypatch):
    from forensics.data import embed as embed_mod
    from forensics.data.images import scan_folder
    from forensics.steps.curve import encoder_record

    f = world["folders"]
    loaded = load_baseline("digits", bank=world["bank"])
    full = embed_folder(f["query_noise"], "vit-tiny-demo", weights="random:0",
                        cache_dir=world["cache"], progress=False, device="cpu")
    monkeypatch.setattr(embed_mod, "_load_encoder", None)  # no encoder may be loaded
    light = embed_mod.cached_embeddings(scan_folder(f["query_noise"]), encoder_record(loaded),
                                        world["cache"])
    assert light is not None and light.layers == full.layers
    for a, b in zip(light.arrays, full.arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    assert light.encoder_info["weights_sha256"] == full.encoder_info["weights_sha256"]
    assert light.encoder_info["cache"] == {"hits": len(full), "computed": 0}
    mixed = tmp_path / "mixed"
    shutil.copytree(f["query_noise"], mixed)
    from PIL import Image

    Image.new("L", (32, 32), 7).save(mixed / "new.png")  # never embedded
    assert embed_mod.cached_embeddings(scan_folder(mixed), encoder_record(loaded),
                                       world["cache"]) is None
    other = {**encoder_record(loaded), "precision": "bfloat16"}  # another configuration
    assert embed_mod.cached_embeddings(scan_folder(f["query_noise"]), other,
                                       world["cache"]) is None


def test_a_sets_storage_conditions_are_described_once(world, tmp_path, monkeypatch):
    from forensics.data import images
    from forensics.data.images import scan_folder
    from forensics.steps.storage import manifest_conditions

    manifest = scan_folder(world["folders"]["query_noise"])
    first = manifest_conditions(manifest, cache_dir=tmp_path / "embeddings")
    assert list((tmp_path / "conditions").glob("*.json"))

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(images, "read_image_file", no_reading)
    assert manifest_conditions(manifest, cache_dir=tmp_path / "embeddings") == first
    with pytest.raises(AssertionError, match="read again"):  # without the store: read
        manifest_conditions(manifest)


def _differences(a, b, where=""):
    """The paths at which two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in (
            _differences(a[k], b[k], f"{where}.{k}") if k in a and k in b else [f"{where}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:60]} != {str(b)[:60]}"]
