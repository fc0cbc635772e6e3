"""Attribution: ranking with dropped layers, the unknown threshold, bootstrap confidence."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

from forensics.errors import BankError, InputError
from forensics.plugin.manager import get
from forensics.stats.attribution import (
    Attribution,
    Match,
    bootstrap_confidence,
    calibrate_unknown,
    comparable_references,
    decide,
    keep_mask,
    rank,
)
from forensics.stats.curve import Curve, make_provenance

L = 6
LAYERS = [f"layer{i}" for i in range(L)]


def matcher_of(name):
    """The registered matcher called ``name`` (stats receives objects, never names)."""
    return get("matchers", name)


COMBINED = matcher_of("combined")


def meta_for(families, models=None):
    models = models or [f"{f}-m{i}" for i, f in enumerate(families)]
    return [{"curve_id": f"c{i:02d}", "model": m, "family": f}
            for i, (f, m) in enumerate(zip(families, models, strict=True))]


def synthetic_bank(n_per=5, seed=0):
    """Three families, each a prototype curve plus small per-curve noise."""
    rng = np.random.default_rng(seed)
    protos = {"gan": np.linspace(0.2, 0.8, L), "diffusion": np.linspace(0.8, 0.1, L),
              "vae": 0.5 + 0.3 * np.sin(np.arange(L))}
    vecs, fams = [], []
    for fam, proto in protos.items():
        for _ in range(n_per):
            vecs.append(proto + rng.normal(0, 0.02, L))
            fams.append(fam)
    return np.asarray(vecs), fams, protos


# -- layers and ranking ---------------------------------------------------------------------


def test_keep_mask():
    np.testing.assert_array_equal(keep_mask(4), [False, True, True, True])
    np.testing.assert_array_equal(keep_mask(4, (0, 3)), [False, True, True, False])
    with pytest.raises(InputError, match=r"cannot drop layer -1: .* \(indices 0..3\)"):
        keep_mask(4, (0, -1))  # not Python's count from the end
    np.testing.assert_array_equal(keep_mask(3, ()), [True, True, True])
    with pytest.raises(InputError, match="cannot drop layer 5"):
        keep_mask(4, (5,))
    with pytest.raises(InputError, match="no layer"):
        keep_mask(2, (0, 1))


def test_rank_l2_scores_by_hand_and_layer_zero_dropped():
    query = np.array([100.0, 1.0, 2.0])
    refs = np.array([[0.0, 1.0, 2.0], [100.0, 1.0, 3.0], [5.0, 5.0, 5.0]])
    meta = meta_for(["a", "b", "c"])
    # Without layer 0: L2 distances 0, 1, 5 -> scores 1/(1+d) = 1, 1/2, 1/6.
    ranking = rank(query, refs, meta, matcher=matcher_of("l2"))
    assert [m.curve_id for m in ranking] == ["c00", "c01", "c02"]
    np.testing.assert_allclose([m.score for m in ranking], [1.0, 0.5, 1 / 6])
    assert [m.rank for m in ranking] == [1, 2, 3] and ranking[0].family == "a"
    # With every layer: distances 100, 1, sqrt(95^2 + 16 + 9).
    full = rank(query, refs, meta, matcher=matcher_of("l2"), drop_layers=())
    assert full[0].curve_id == "c01"
    np.testing.assert_allclose([m.score for m in full],
                               [0.5, 1 / (1 + np.sqrt(95**2 + 25)), 1 / 101])


def test_rank_cosine_combined_and_plugin_objects():
    query = np.array([0.0, 1.0, 0.0])
    refs = np.array([[9.0, 2.0, 0.0], [9.0, 1.0, 1.0]])
    meta = meta_for(["a", "b"])
    cos = rank(query, refs, meta, matcher=matcher_of("cosine"))
    np.testing.assert_allclose([m.score for m in cos], [1.0, np.sqrt(0.5)])
    comb = rank(query, refs, meta, matcher=matcher_of("combined"))
    np.testing.assert_allclose(comb[0].score, 0.5 * 1.0 + 0.5 / (1 + 1.0))

    class Negative:
        name = "neg"

        def score(self, q, r):
            return -np.abs(r - q).sum(axis=1)

    assert [m.curve_id for m in rank(query, refs, meta, matcher=Negative())] == ["c00", "c01"]


def test_rank_ties_top_and_refusals():
    refs = np.ones((3, 3))
    meta = [{"curve_id": cid, "model": "m", "family": "f"} for cid in ("z", "a", "m")]
    ranking = rank(np.ones(3), refs, meta, COMBINED, top=2)
    assert [m.curve_id for m in ranking] == ["a", "m"]
    with pytest.raises(BankError, match="no enrolled curves"):
        rank(np.ones(3), np.empty((0, 3)), [], COMBINED)
    with pytest.raises(InputError, match="3 layers"):
        rank(np.ones(3), np.ones((3, 4)), meta, COMBINED)
    with pytest.raises(InputError, match="suspect curve has no finite value"):
        rank(np.array([1.0, np.nan, 1.0]), refs, meta, COMBINED)
    assert rank(np.array([np.nan, 1.0, 1.0]), refs, meta, COMBINED)  # layer 0 is dropped
    bad = refs.copy()
    bad[1, 2] = np.inf
    with pytest.raises(BankError, match="enrolled curve.* a "):
        rank(np.ones(3), bad, meta, COMBINED)


# -- calibration and decision -----------------------------------------------------------------


def test_calibration_by_hand():
    # Family A at 0, 1, 3 and family B at 10, 12 (one matched layer): leave-one-out
    # nearest same-family distances are 1, 1, 2 (A) and 2, 2 (B).
    vecs = np.array([[0.0], [1.0], [3.0], [10.0], [12.0]])
    fams = ["A", "A", "A", "B", "B"]
    cal = calibrate_unknown(vecs, fams, matcher=matcher_of("l2"), drop_layers=(), quantile=0.25)
    within = 1 / (1 + np.array([1.0, 1.0, 2.0, 2.0, 2.0]))
    np.testing.assert_allclose(cal.threshold, np.quantile(within, 0.25))
    assert cal.n_within == 5 and cal.matcher == "l2" and cal.drop_layers == ()
    np.testing.assert_allclose(cal.within_min, 1 / 3)
    # nearest other-family distances: 10, 9, 7 (A) and 7, 9 (B)
    between = 1 / (1 + np.array([10.0, 9.0, 7.0, 7.0, 9.0]))
    np.testing.assert_allclose(cal.between_median, np.median(between))
    assert cal.between_above == 0.0


def test_calibration_needs_siblings():
    cal = calibrate_unknown(np.eye(3), ["a", "b", "c"], COMBINED, drop_layers=())
    assert cal.threshold is None and cal.n_within == 0 and "--per-curve" in cal.note
    with pytest.raises(InputError, match="quantile"):
        calibrate_unknown(np.eye(3), ["a", "a", "a"], COMBINED, quantile=1.0)
    with pytest.raises(InputError, match="one family per curve"):
        calibrate_unknown(np.eye(3), ["a", "a"], COMBINED)


def test_decide_known_unknown_and_uncalibrated():
    ranking = [Match(1, "c1", "sd15", "sd", 0.8), Match(2, "c2", "gan1", "gan", 0.3)]
    calibrated = types.SimpleNamespace(threshold=0.7, note="")
    d = decide(ranking, calibrated)
    assert (d.family, d.model, d.unknown) == ("sd", "sd15", False)
    far = decide(ranking, types.SimpleNamespace(threshold=0.9, note=""))
    assert far.unknown and far.family is None and far.model is None
    assert far.nearest_family == "sd" and "below the threshold" in far.reason
    loose = decide(ranking, types.SimpleNamespace(threshold=None, note="too few curves"))
    assert not loose.unknown and loose.family == "sd" and "too few curves" in loose.reason
    assert decide(ranking).family == "sd"
    with pytest.raises(BankError):
        decide([])


def test_unenrolled_generator_is_unknown_and_enrolled_one_is_found():
    vecs, fams, protos = synthetic_bank()
    meta = meta_for(fams)
    cal = calibrate_unknown(vecs, fams, COMBINED)
    assert cal.threshold is not None and cal.between_above == 0.0
    rng = np.random.default_rng(1)
    suspect = protos["diffusion"] + rng.normal(0, 0.02, L)
    d = decide(rank(suspect, vecs, meta, COMBINED), cal)
    assert d.family == "diffusion" and not d.unknown
    stranger = np.full(L, 0.5) + 0.25 * np.cos(3 * np.arange(L))  # no enrolled family
    d = decide(rank(stranger, vecs, meta, COMBINED), cal)
    assert d.unknown and d.nearest_family in protos


# -- bootstrap --------------------------------------------------------------------------------


def image_curve_fn(per_image: np.ndarray):
    """A stand-in for the engine: the curve of a set of images is their mean vector."""
    return lambda idx: per_image[np.asarray(idx)].mean(axis=0)


def test_bootstrap_confident_when_images_agree():
    vecs, fams, protos = synthetic_bank()
    meta = meta_for(fams)
    cal = calibrate_unknown(vecs, fams, COMBINED)
    rng = np.random.default_rng(2)
    images = protos["gan"] + rng.normal(0, 0.05, (40, L))
    boot = bootstrap_confidence(image_curve_fn(images), 40, n_boot=30, seed=3,
                                bank_vectors=vecs, meta=meta, calibration=cal,
                                matcher=COMBINED)
    assert boot.confidence == 1.0 and boot.outcomes == {"gan": 30}
    assert boot.n_boot == 30 and boot.seed == 3 and 0 < boot.model_confidence <= 1


def test_bootstrap_unsure_on_a_mixture():
    vecs, fams, protos = synthetic_bank()
    two = [i for i, f in enumerate(fams) if f != "vae"]
    vecs, fams = vecs[two], [fams[i] for i in two]
    meta = meta_for(fams)
    rng = np.random.default_rng(4)
    # Half the images from each of two families, placed so the mean lies near the midpoint.
    images = np.vstack([protos["gan"] + rng.normal(0, 0.3, (20, L)),
                        protos["diffusion"] + rng.normal(0, 0.3, (20, L))])
    fn = image_curve_fn(images)
    boot = bootstrap_confidence(fn, 40, n_boot=60, seed=5, bank_vectors=vecs, meta=meta,
                                matcher=COMBINED)
    assert sum(boot.outcomes.values()) == 60
    assert set(boot.outcomes) <= {"gan", "diffusion"} and len(boot.outcomes) == 2
    assert 0.05 < boot.confidence < 0.95
    again = bootstrap_confidence(fn, 40, n_boot=60, seed=5, bank_vectors=vecs, meta=meta,
                                 matcher=COMBINED)
    assert again == boot  # seeded
    sub = bootstrap_confidence(fn, 40, n_boot=10, seed=5, bank_vectors=vecs, meta=meta,
                               matcher=COMBINED, replace=False, fraction=0.5)
    assert sub.replace is False and sum(sub.outcomes.values()) == 10


def test_bootstrap_sees_the_indices():
    seen = []

    def fn(idx):
        seen.append(np.asarray(idx))
        return np.ones(3)

    meta = meta_for(["a"])
    bootstrap_confidence(fn, 10, n_boot=4, seed=0, bank_vectors=np.ones((1, 3)), meta=meta,
                         matcher=COMBINED)
    np.testing.assert_array_equal(seen[0], np.arange(10))  # the decision on all images
    assert len(seen) == 5 and all(s.shape == (10,) and s.max() < 10 for s in seen[1:])
    expected = np.random.default_rng(0).choice(10, size=10, replace=True)
    np.testing.assert_array_equal(seen[1], expected)


def test_bootstrap_refusals():
    kw = dict(bank_vectors=np.ones((1, 3)), meta=meta_for(["a"]), matcher=COMBINED)
    with pytest.raises(InputError, match="n_boot"):
        bootstrap_confidence(lambda i: np.ones(3), 10, n_boot=0, **kw)
    with pytest.raises(InputError, match="2 images"):
        bootstrap_confidence(lambda i: np.ones(3), 1, **kw)
    with pytest.raises(InputError, match="fraction"):
        bootstrap_confidence(lambda i: np.ones(3), 10, replace=False, **kw)


# -- the bank side ----------------------------------------------------------------------------


def suspect_curve(values, baseline_id="b_1", encoder="timm:tiny", weights="w" * 64, layers=None):
    prov = make_provenance(manifest_sha256="s" * 64, n_images=40, encoder=encoder,
                           weights_sha256=weights, baseline_id=baseline_id, params={"seed": 0})
    return Curve(layers or LAYERS, values, prov)


def bank_rows(vecs, fams, baseline_id="b_1"):
    return [{"curve_id": m["curve_id"], "model": m["model"], "family": m["family"],
             "checkpoint": None, "baseline_id": baseline_id, "encoder": "timm:tiny",
             "weights_sha256": "w" * 64, "layers": LAYERS, "values": list(v)}
            for m, v in zip(meta_for(fams), vecs, strict=True)]


def test_comparable_references_and_refusals():
    vecs, fams, _ = synthetic_bank(n_per=2)
    rows = bank_rows(vecs, fams) + bank_rows(vecs[:1], fams[:1], baseline_id="b_2")
    refs, meta = comparable_references(suspect_curve(vecs[0]), rows)
    assert refs.shape == (6, L) and [m["family"] for m in meta] == fams
    with pytest.raises(BankError, match="no enrolled curves.*fp enroll"):
        comparable_references(suspect_curve(vecs[0]), [], bank="/b")
    with pytest.raises(BankError, match=r"baseline 'other'.*base1 \(6 curves\)"):
        comparable_references(suspect_curve(vecs[0], baseline_id="b_9"), rows,
                              baseline_names={"b_9": "other", "b_1": "base1"})
    with pytest.raises(BankError, match="encoder"):
        comparable_references(suspect_curve(vecs[0], encoder="timm:big"), rows)
    with pytest.raises(BankError, match="weights_sha256"):
        comparable_references(suspect_curve(vecs[0], weights="x" * 64), rows)
    with pytest.raises(BankError, match="layers"):
        comparable_references(suspect_curve(vecs[0], layers=LAYERS[::-1]), rows)
    with pytest.raises(InputError, match="provenance"):
        comparable_references(Curve(LAYERS, vecs[0]), rows)


def answer(curve, rows, *, matcher="combined", top=5, curve_fn=None, n_boot=100, seed=0,
           bank=None):
    """Rank, calibrate, decide and (given ``curve_fn``) bootstrap, as the attribute step does."""
    refs, meta = comparable_references(curve, rows, bank=bank)
    m = matcher_of(matcher)
    ranking = rank(curve.values, refs, meta, m, (0,))
    calibration = calibrate_unknown(refs, [x["family"] for x in meta], m, (0,))
    decision = decide(ranking, calibration)
    boot = None
    if curve_fn is not None:
        boot = bootstrap_confidence(curve_fn, int(curve.provenance["inputs"]["n_images"]),
                                    n_boot, seed, bank_vectors=refs, meta=meta,
                                    matcher=m, calibration=calibration,
                                    decision=decision)
        decision = dataclasses.replace(decision, stability=boot.confidence,
                                       model_stability=boot.model_confidence)
    parameters = {"matcher": matcher, "drop_layers": [0], "top": top, "quantile": 0.05,
                  "n_boot": n_boot if boot is not None else 0, "seed": seed, "bank": bank,
                  "n_references": len(meta)}
    return Attribution(decision, ranking[:top], calibration, curve, boot, parameters)


def test_attribution_json():
    vecs, fams, protos = synthetic_bank()
    rng = np.random.default_rng(6)
    images = protos["vae"] + rng.normal(0, 0.05, (40, L))
    fn = image_curve_fn(images)
    curve = suspect_curve(fn(np.arange(40)))
    result = answer(curve, bank_rows(vecs, fams), top=3, curve_fn=fn, n_boot=20, seed=1,
                    bank="/bank")
    out = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    d = out["decision"]
    assert d["family"] == "vae" and d["unknown"] is False and d["stability"] == 1.0
    assert d["model"] in {m["model"] for m in meta_for(fams) if m["family"] == "vae"}
    assert len(out["ranking"]) == 3
    assert set(out["ranking"][0]) >= {"curve_id", "model", "family", "score"}
    assert out["curve"]["layers"] == LAYERS and len(out["curve"]["values"]) == L
    assert out["provenance"]["encoder"]["name"] == "timm:tiny"
    att = out["provenance"]["attribution"]
    assert att["matcher"] == "combined" and att["drop_layers"] == [0] and att["n_boot"] == 20
    assert att["n_references"] == 15 and out["bootstrap"]["outcomes"] == {"vae": 20}
    assert out["calibration"]["threshold"] is not None
    plain = answer(curve, bank_rows(vecs, fams), matcher="l2")
    assert plain.decision.stability is None and plain.bootstrap is None


def test_report_folder_has_json_and_png(tmp_path):
    from PIL import Image

    from forensics.steps.reports import write_report

    vecs, fams, protos = synthetic_bank()
    rows = bank_rows(vecs, fams)
    result = answer(suspect_curve(protos["gan"]), rows, top=3)
    paths = write_report(tmp_path / "report", result, rows)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(result.to_dict()))
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        write_report(tmp_path / "file", result, rows)


def test_small_bank_does_not_call_genuine_suspects_unknown():
    # 2 families x 2 curves, zscore: each curve's within-family score is taken against the
    # bank without it, as a suspect's is. Scored in-sample, the spreads include the curve
    # itself, siblings look closer than any new curve can, and about half of the genuine
    # suspects below were called unknown.
    from fp_plugins.matchers import ZScoreMatcher

    K, unknown, right = 16, [], []

    def curve(rng, centre, n=512):
        c = centre + 0.6 * rng.standard_normal(K)  # a training run of the family
        return (c + 6.0 * rng.standard_normal((n, K))).mean(axis=0)

    for seed in range(100):
        rng = np.random.default_rng(seed)
        a, b = rng.standard_normal((2, K))
        vecs = np.array([curve(rng, a), curve(rng, a), curve(rng, b), curve(rng, b)])
        fams = ["a", "a", "b", "b"]
        cal = calibrate_unknown(vecs, fams, ZScoreMatcher(), ())
        d = decide(rank(curve(rng, a), vecs, meta_for(fams), ZScoreMatcher(), ()), cal)
        unknown.append(d.unknown)
        right.append(d.family == "a")
    assert np.mean(unknown) <= 0.10  # about the 5% asked for (0.48 scored in-sample)
    assert np.mean(right) >= 0.85
