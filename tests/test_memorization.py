"""Memorization reports: copying layers, closest pairs, and the paper's Sec. 4 check.

The end-to-end part runs the real-weight FID Inception (``fid-inception@75``) on
scikit-learn's 8x8 digits: near copies of T must read as copying at every layer, heavy
noise as the opposite in the early layers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from forensics.cli.app import app
from forensics.errors import InputError
from forensics.paper.demo import _write_pngs, digit_images
from forensics.paper.synth import synth_folder
from forensics.stats.memorization import (
    closest_pairs,
    copying_layers,
    likely_copies,
    memorization_report,
    nearest_spread,
    pick_layer,
    sample_closeness,
)
from forensics.steps.bank_access import load_baseline, train_manifest
from forensics.steps.build_baseline import build_baseline
from forensics.steps.engine import build_engine
from forensics.steps.memorization import pair_labels
from refbank import Bank

runner = CliRunner()


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch and BLAS: on a shared CPU, thread pools cost more than the work."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


# -- copying layers -------------------------------------------------------------------------


def test_copying_layers_threshold_scope_and_nan():
    layers = [f"l{i}" for i in range(6)]  # early: l0-l2, late: l3-l5
    out = copying_layers(layers, [-5.0, -2.0, np.nan, 1.0, -2.5, 0.0])
    assert out["flagged"] == out["copying"] == ["l0", "l4"]  # -2.0 is not below -2; NaN: no
    assert out["early_layers"] == ["l0", "l1", "l2"] and out["late_layers"] == ["l3", "l4", "l5"]
    assert out["scope"] == "both" and "2 of 5 layers" in out["summary"]
    assert copying_layers(layers, [-3, -3, -3, 0, 0, 0])["scope"] == "low-level"
    assert copying_layers(layers, [0, 0, 0, 0, 0, -9])["scope"] == "high-level"
    none = copying_layers(layers, [-1.9] * 6)
    assert none["scope"] == "none" and none["flagged"] == [] and "No layer" in none["summary"]
    assert copying_layers(layers, [-1.9] * 6, threshold=-1.5)["scope"] == "both"
    odd = copying_layers(["a", "b", "c"], [0, 0, -4])  # 3 layers: a, b early (i < 1.5)
    assert odd["early_layers"] == ["a", "b"] and odd["scope"] == "high-level"
    crowd = copying_layers(layers, [-5, -5, 0, 0, -5, 0], collapsed=["l0", "l1"])
    assert crowd["flagged"] == ["l0", "l1", "l4"] and crowd["collapsed"] == ["l0", "l1"]
    assert crowd["copying"] == ["l4"] and crowd["scope"] == "high-level"
    assert "At l0, l1" in crowd["summary"] and "hubs" in crowd["summary"]
    with pytest.raises(InputError, match="one C_T value per layer"):
        copying_layers(layers, [0.0])
    with pytest.raises(InputError, match="finite"):
        copying_layers(layers, [0.0] * 6, threshold=float("nan"))


def test_pick_layer():
    assert pick_layer(["a", "b", "c"], [1.0, -4.0, np.nan]) == 1
    assert pick_layer(["a", "b", "c"], [1.0, -4.0, np.nan], "a") == 0
    with pytest.raises(InputError, match="layers: a, b, c"):
        pick_layer(["a", "b", "c"], [1.0, -4.0, 0.0], "z")
    with pytest.raises(InputError, match="no layer has a C_T"):
        pick_layer(["a"], [np.nan])


# -- closeness on synthetic embeddings ------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(one_thread):
    """T, P from one Gaussian; Q: the first 60 rows of T, slightly perturbed, in reverse."""
    rng = np.random.default_rng(3)
    T, P = rng.normal(size=(300, 8)), rng.normal(size=(200, 8))
    sources = np.arange(60)[::-1]
    Q = T[sources] + rng.normal(scale=1e-3, size=(60, 8))
    Q[0] = T[sources[0]]  # one exact copy
    base = build_engine([T, T[:, :4]], [P, P[:, :4]], ["full", "half"], distance="euclidean",
                        partitioner_params={"n_cells": 2})
    fresh = rng.normal(size=(60, 8))
    return {"base": base, "sources": sources, "Q": Q, "fresh": fresh}


def test_copies_are_flagged_and_pairs_find_their_sources(synthetic):
    base, Q = synthetic["base"], synthetic["Q"]
    results = base.query([Q, Q[:, :4]], details=True)
    assert all(r.ct < -4 for r in results)
    close = sample_closeness(results[0], base.layers[0])
    np.testing.assert_array_equal(close["nn_index"], synthetic["sources"])
    assert np.all(close["p_quantile"] == 0.0)  # every copy is closer than any fresh sample
    assert close["distance"][0] == 0.0 and close["relative_distance"][0] == 0.0
    pairs = closest_pairs(close, results, 0, top=5)
    assert [p["rank"] for p in pairs] == [1, 2, 3, 4, 5]
    assert pairs[0]["index"] == 0 and pairs[0]["train_index"] == synthetic["sources"][0]
    assert all(p["train_index"] == synthetic["sources"][p["index"]] for p in pairs)
    rel = [p["relative_distance"] for p in pairs]  # all quantiles 0: ranked by this
    assert rel == sorted(rel)
    assert all(p["same_nearest_layers"] == 2 for p in pairs)
    assert all(p["train_image_status"] == "unknown" and p["train_image"] is None for p in pairs)
    assert nearest_spread(results[0]) == {"distinct_nearest": 60, "top_nearest_share": 1 / 60}


def test_fresh_samples_sit_mid_distribution(synthetic):
    base = synthetic["base"]
    results = base.query([synthetic["fresh"], synthetic["fresh"][:, :4]], details=True)
    assert all(abs(r.ct) < 3 for r in results)
    q = sample_closeness(results[0], base.layers[0])["p_quantile"]
    assert 0.3 < np.nanmean(q) < 0.7  # uniform-ish, as a fresh sample's quantile should be
    report = memorization_report(["full", "half"], results, base.layers)
    assert report["copying"]["scope"] == "none" and report["copying"]["collapsed"] == []
    json.dumps(report, allow_nan=False)


def test_verdict_follows_the_images_when_c_t_is_diluted(synthetic):
    """10 exact copies among 150 fresh images: C_T stays above -2, the copies are named."""
    base, T_copies = synthetic["base"], synthetic["Q"][:10]
    rng = np.random.default_rng(8)
    Q = np.concatenate([T_copies, rng.normal(size=(150, 8))])
    results = base.query([Q, Q[:, :4]], details=True)
    assert all(r.ct > -2 for r in results), [r.ct for r in results]
    report = memorization_report(["full", "half"], results, base.layers, top=10)
    assert report["copying"]["scope"] == "none"
    v = report["verdict"]
    assert v["copying"] and not v["by_layers"] and not v["agree"]
    assert v["likely_copies"] == 10 and v["n_images"] == 160
    assert "10 of 160 images are likely copies" in v["summary"] and "averages" in v["summary"]
    flagged = [p["index"] for p in report["closest"]["pairs"] if p["likely_copy"]]
    assert sorted(flagged) == list(range(10))
    assert all(p["train_index"] == synthetic["sources"][p["index"]]
               for p in report["closest"]["pairs"] if p["likely_copy"])


def test_verdict_agrees_on_copies_fresh_images_and_hubs(synthetic):
    base = synthetic["base"]
    Q = synthetic["Q"]
    copies = memorization_report(["full", "half"], base.query([Q, Q[:, :4]], details=True),
                                 base.layers)["verdict"]
    assert copies["copying"] and copies["by_layers"] and copies["agree"]
    assert copies["likely_copies"] == 60 and copies["summary"].startswith("Copying:")
    fresh = synthetic["fresh"]
    res = base.query([fresh, fresh[:, :4]], details=True)
    none = memorization_report(["full", "half"], res, base.layers)["verdict"]
    assert not none["copying"] and none["agree"] and none["likely_copies"] == 0
    assert none["summary"].startswith("No sign of copying")
    rng = np.random.default_rng(5)
    T, P = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    hub_base = build_engine([T], [P], ["only"], distance="euclidean",
                            partitioner_params={"n_cells": 1})
    hub = hub_base.query([T[7] + rng.normal(scale=1e-3, size=(50, 4))], details=True)
    close = sample_closeness(hub[0], hub_base.layers[0])
    assert not likely_copies(close, hub, 0).any()  # 50 images on one training image: a hub


def test_pair_labels_name_files():
    pair = {"rank": 1, "image": "gen/digit-0210.png", "train_image": "/data/T/digit-0210.png",
            "train_index": 210, "p_quantile": 0.0, "distance": 0.5, "likely_copy": True}
    assert pair_labels(pair) == ("digit-0210.png\nq=0.00 copy", "digit-0210.png\nd=0.5")
    unknown = {**pair, "image": None, "train_image": None, "likely_copy": False}
    assert pair_labels(unknown) == ("#1\nq=0.00", "T[210]\nd=0.5")
    long = {**pair, "train_image": "/x/a-very-long-training-file-name.png"}
    assert pair_labels(long)[1].startswith("…") and len(pair_labels(long)[1].split()[0]) == 18


def test_closeness_needs_details(synthetic):
    base = synthetic["base"]
    (r, _) = base.query([synthetic["Q"], synthetic["Q"][:, :4]])
    with pytest.raises(InputError, match="details=True"):
        sample_closeness(r, base.layers[0])


def test_collapse_onto_a_hub_is_named():
    """Generated points all nearest to one training point: low C_T, but a hub, not copies."""
    rng = np.random.default_rng(5)
    T, P = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    hub = T[7] + rng.normal(scale=1e-3, size=(50, 4))
    base = build_engine([T], [P], ["only"], distance="euclidean",
                        partitioner_params={"n_cells": 1})
    results = base.query([hub], details=True)
    report = memorization_report(["only"], results, base.layers)
    assert report["copying"]["flagged"] == ["only"] and report["copying"]["copying"] == []
    assert report["copying"]["scope"] == "none" and report["layers"][0]["collapsed"]
    assert report["layers"][0]["distinct_nearest"] == 1
    assert report["layers"][0]["top_nearest_share"] == 1.0
    assert report["copying"]["collapsed"] == ["only"] and "hubs" in report["copying"]["summary"]


# -- end to end: the paper's Sec. 4 check on real weights and real images ---------------------


@pytest.fixture(scope="module")
def digits_world(tmp_path_factory, one_thread):
    """8x8 digits: T (300), P (150); noisy copies of 150 T images, light and heavy."""
    root = tmp_path_factory.mktemp("memorization")
    images = digit_images(8)
    order = np.random.default_rng(11).permutation(len(images))
    _write_pngs(images, order[:300], root / "T")
    _write_pngs(images, order[300:450], root / "P")
    _write_pngs(images, order[:150], root / "src")
    synth_folder("noise", root / "src", root / "copies", seed=1, sigma=2.0)
    synth_folder("noise", root / "src", root / "heavy", seed=1, sigma=100.0)
    synth_folder("noise", root / "src", root / "mid", seed=1, sigma=25.0)
    bank = Bank(root / "bank")
    build_baseline("digits75", root / "T", root / "P", encoder="fid-inception@75",
                            n_cells=3, bank=bank, device="cpu", cache_dir=root / "cache")
    return {"root": root, "bank": bank}


def _memorization(world, folder, *extra):
    args = ["memorization", str(world["root"] / folder), "--baseline", "digits75", "--json",
            "--bank", str(world["bank"].path), "--device", "cpu", *extra]
    result = runner.invoke(app, args, env={"FP_CACHE_DIR": str(world["root"] / "cache")})
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_noisy_copies_are_copying_at_every_layer(digits_world, tmp_path):
    report = _memorization(digits_world, "copies", "--report", str(tmp_path / "rep"))
    cts = [r["ct"] for r in report["layers"]]
    assert len(cts) == 18 and max(cts) < -3, cts
    assert report["copying"]["scope"] == "both" and len(report["copying"]["copying"]) == 18
    assert report["copying"]["collapsed"] == []
    assert all(r["distinct_nearest"] > 100 for r in report["layers"])
    pairs = report["closest"]["pairs"]
    assert len(pairs) == 8 and report["closest"]["train_manifest"]
    for p in pairs:  # fp synth keeps file names: each copy's nearest training image is its source
        assert p["train_image_status"] == "ok"
        assert p["train_image"].endswith("/T/" + p["image"])
        assert p["p_quantile"] == 0.0
    saved = json.loads((tmp_path / "rep" / "memorization.json").read_text())
    assert saved["copying"] == report["copying"]
    png = (tmp_path / "rep" / "memorization.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_heavy_noise_is_not_read_as_copying(digits_world):
    report = _memorization(digits_world, "heavy")
    cts = np.array([r["ct"] for r in report["layers"]])
    assert cts[0] > 2 and np.median(cts) > 2 and (cts > 0).sum() >= 12, cts
    # Where C_T does drop below -2, the noise images crowd onto a few hub training
    # images, and the report says so; none is nearest to its own source.
    assert report["copying"]["flagged"] == report["copying"]["collapsed"]
    assert report["copying"]["copying"] == [] and report["copying"]["scope"] == "none"
    pairs = report["closest"]["pairs"]
    assert len(pairs) == 8
    assert not any(p["train_image"].endswith("/T/" + p["image"]) for p in pairs)


def test_verdict_and_closest_pairs_agree_on_noisy_copies(digits_world):
    """sigma=25: C_T above -2 in most layers, yet the closest pairs are the exact sources."""
    report = _memorization(digits_world, "mid")
    cts = np.array([r["ct"] for r in report["layers"]])
    v = report["verdict"]
    assert v["copying"] and v["likely_copies"] >= 3, (cts, v)
    copies = [p for p in report["closest"]["pairs"] if p["likely_copy"]]
    assert copies and all(p["train_image"].endswith("/T/" + p["image"]) for p in copies)
    if not report["copying"]["copying"]:
        assert not v["agree"] and "although no layer" in v["summary"]
    heavy = _memorization(digits_world, "heavy")["verdict"]
    assert not heavy["copying"] and heavy["likely_copies"] == 0
    light = _memorization(digits_world, "copies")["verdict"]
    assert light["copying"] and light["agree"] and light["likely_copies"] > 100


def test_training_images_from_a_rescan_or_none(digits_world, tmp_path):
    loaded = load_baseline("digits75", bank=digits_world["bank"])
    stored = train_manifest(loaded)
    assert stored is not None and len(stored) == 300
    assert stored.sha256 == loaded.row["train_manifest_sha256"]
    bare = tmp_path / "bare"  # a baseline folder stored before train_manifest.json existed
    bare.mkdir()
    loaded.folder = bare
    rescanned = train_manifest(loaded)
    assert rescanned is not None and rescanned.entries == stored.entries
    moved = digits_world["root"] / "T-moved"
    shutil.copytree(digits_world["root"] / "T", moved)
    (moved / stored.entries[0].relpath).unlink()
    loaded.params["train_folder"] = str(moved)
    assert train_manifest(loaded) is None  # another T: never mislabel images


def test_cli_text_output_and_errors(digits_world):
    env = {"FP_CACHE_DIR": str(digits_world["root"] / "cache")}
    base = ["memorization", str(digits_world["root"] / "copies"), "--bank",
            str(digits_world["bank"].path), "--device", "cpu", "-q"]
    result = runner.invoke(app, [*base, "--layer", "mixed_10", "--top", "2"], env=env)
    assert result.exit_code == 0, result.output
    assert "COPYING" in result.output and "layer mixed_10, given" in result.output
    result = runner.invoke(app, [*base, "--layer", "nope"], env=env)
    assert result.exit_code == 1 and "--layer 'nope' is not a layer" in result.output
