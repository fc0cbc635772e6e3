"""The per-image attributor: fitted on the bank's rows, calibrated on held-out curves."""

from __future__ import annotations

import numpy as np
import pytest

from forensics.errors import InputError
from forensics.stats import probe
from forensics.stats.answer_confidence import AnswerConfidence
from forensics.stats.attribution import Match, decide_belonging


def _bank(rng, k=4, curves=2, n=40, dim=6, sep=1.5):
    """``k`` models, each a Gaussian cloud around its own centre, ``curves`` curves each."""
    centres = rng.standard_normal((k, dim)) * sep
    models = {f"m{i}": [rng.standard_normal((n, dim)) + centres[i] for _ in range(curves)]
              for i in range(k)}
    return models, {f"m{i}": f"f{i // 2}" for i in range(k)}, centres


def test_the_attributor_names_the_model_whose_images_these_are():
    rng = np.random.default_rng(0)
    models, fam, centres = _bank(rng)
    f = probe.fit(models, fam)
    for i in range(4):
        s = f.scores(rng.standard_normal((20, 6)) + centres[i])
        assert f.models[int(np.argmax(s))] == f"m{i}"
        assert np.all(s <= 0.0)  # mean log-probabilities
    fs = f.family_scores(rng.standard_normal((20, 6)) + centres[3])
    assert max(fs, key=fs.get) == "f1" and set(fs) == {"f0", "f1"}
    # the family reading averages its models' probabilities: log of a mean, never below
    # the mean of the logs, nor above the better model's image by image
    x = rng.standard_normal((5, 6)) + centres[0]
    lp = f.log_proba(x)[:, :2]
    fs = f.family_scores(x)["f0"]
    assert lp.mean() - 1e-12 <= fs <= lp.max(axis=1).mean() + 1e-12


def test_fit_is_deterministic_and_its_provenance_names_the_rows():
    rng = np.random.default_rng(1)
    models, fam, _ = _bank(rng)
    a, b = probe.fit(models, fam, seed=3), probe.fit(models, fam, seed=3)
    np.testing.assert_array_equal(a.coef, b.coef)
    d = a.to_dict()
    assert d["rows_sha256"] == probe.rows_sha256(models) and d["seed"] == 3
    assert d["rows_per_model"] == {f"m{i}": 80 for i in range(4)}
    changed = {**models, "m0": [models["m0"][0] + 1e-3, models["m0"][1]]}
    assert probe.rows_sha256(changed) != d["rows_sha256"]


def test_two_models_give_two_columns_that_sum_to_one():
    rng = np.random.default_rng(2)
    models, fam, centres = _bank(rng, k=2)
    lp = probe.fit(models, fam).log_proba(rng.standard_normal((7, 6)) + centres[1])
    assert lp.shape == (7, 2)
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, rtol=1e-12)
    assert np.mean(lp[:, 1] > lp[:, 0]) > 0.5


def test_held_out_curves_pass_at_the_level_and_a_model_not_enrolled_is_unknown():
    rng = np.random.default_rng(3)
    models, fam, centres = _bank(rng, k=5, sep=2.5)
    bank = probe.ProbeBank({k: v for k, v in models.items() if k != "m4"}, fam)
    own_p, named_unknown = [], 0
    for _ in range(20):
        for i in range(4):
            t = {x.model: x for x in bank.tests(rng.standard_normal((16, 6)) + centres[i],
                                                0.05)}
            own_p.append(t[f"m{i}"].p_value)
        stranger = bank.tests(rng.standard_normal((16, 6)) + centres[4], 0.05)
        named_unknown += not any(x.consistent for x in stranger)
    assert np.mean(np.array(own_p) < 0.05) <= 0.15  # about the level
    # another model's images: unknown more often than not (a classifier only tells the
    # enrolled models apart: a stranger beyond one of them can still read as that one)
    assert named_unknown >= 10


def test_tests_are_seeded_bounded_and_fit_decide_belonging():
    rng = np.random.default_rng(4)
    models, fam, centres = _bank(rng)
    s = rng.standard_normal((12, 6)) + centres[2]
    a = probe.ProbeBank(models, fam, seed=5).tests(s, 0.05)
    b = probe.ProbeBank(models, fam, seed=5).tests(s, 0.05)
    assert a == b and a[0].model == "m2"
    assert all(1 / (1 + probe.DRAWS) <= t.p_value <= 1.0 for t in a)
    assert [t.statistic for t in a] == sorted((t.statistic for t in a), reverse=True)
    ranking = [Match(1, "c0", "m0", "f0", 0.9)]  # the fingerprint ranking says m0 ...
    d = decide_belonging(ranking, a, 0.05, order=[t.model for t in a])
    assert d.model == "m2" and d.family == "f1"  # ... the attributor's order chooses


def test_a_one_curve_model_is_untestable():
    rng = np.random.default_rng(5)
    models, fam, centres = _bank(rng)
    models["m3"] = models["m3"][:1]
    t = {x.model: x for x in probe.ProbeBank(models, fam).tests(
        rng.standard_normal((10, 6)) + centres[3], 0.05)}
    assert t["m3"].p_value is None and not t["m3"].consistent and t["m3"].draws == 0
    assert t["m0"].draws == probe.DRAWS


def test_the_confidence_is_simulated_from_held_out_and_left_out_models():
    rng = np.random.default_rng(6)
    models, fam, _ = _bank(rng, k=4, sep=2.5)
    ac = probe.ProbeBank(models, fam).calibrate(16, 0.05, draws=4)
    assert isinstance(ac, AnswerConfidence) and ac.n == 16
    assert ac.n_named + ac.n_unknown == 4 * 4 * 2  # every draw, enrolled and left out
    assert ac.unknown_right is not None and ac.unknown_right > 0.5
    p = ac.probability(False, 0.5, 1)
    assert p is not None and 0.0 <= p <= 1.0


def test_refusals():
    rng = np.random.default_rng(7)
    models, fam, _ = _bank(rng)
    with pytest.raises(InputError, match="at least two"):
        probe.fit({"m0": models["m0"]}, fam)
    with pytest.raises(InputError, match="one width"):
        probe.fit({"m0": [np.zeros((3, 2)), np.zeros((3, 4))], "m1": models["m1"]}, fam)
    with pytest.raises(InputError, match="different widths"):
        probe.fit({"m0": [np.zeros((3, 2))], "m1": models["m1"]}, fam)
    f = probe.fit(models, fam)
    with pytest.raises(InputError, match="entries per image"):
        f.log_proba(np.zeros((3, 5)))
    with pytest.raises(InputError, match="level"):
        probe.ProbeBank(models, fam).tests(np.zeros((3, 6)), 1.5)


def test_stored_arrays_give_the_fit_and_the_held_out_scores():
    rng = np.random.default_rng(8)
    models, fam, centres = _bank(rng, k=3, n=20)
    pb = probe.ProbeBank(models, fam, seed=2)
    from forensics.stats.answer_confidence import simulated_models

    sim = simulated_models(["m0", "m1", "m2"], seed=2, max_models=2)
    (rest,) = {"m0", "m1", "m2"} - set(sim)
    arrays = probe.export(pb, sim)
    # every testable model's null; the left-out fits of the simulated ones only
    assert {k for k in arrays if k.startswith("held.")} == {
        f"held.m{j}.{i}" for j in range(3) for i in range(2)}
    assert set(k for k in arrays if k.startswith("out.")) == {f"out.{k}" for k in sim}
    f = probe.stored_fit(arrays, fam, seed=2)
    x = rng.standard_normal((9, 6)) + centres[1]
    np.testing.assert_array_equal(f.scores(x), pb.fit.scores(x))
    assert f.to_dict() == pb.fit.to_dict()
    scores = probe.simulated_scores(arrays, f.models,
                                    {k: [len(c) for c in v] for k, v in models.items()})
    idx = np.array([3, 5, 5])
    k = sim[-1]
    got = scores(k, 1, idx, True)
    np.testing.assert_allclose([got[m] for m in f.models], pb.held_out(k, 1)[idx].mean(0),
                               rtol=0, atol=0)
    out = scores(k, 1, idx, False)  # the model left out: its rows after curve 0's
    others = [m for m in f.models if m != k]
    assert list(out) == others
    lo = pb.left_out(k).log_proba(models[k][1][idx]).mean(axis=0)
    np.testing.assert_allclose([out[m] for m in others], lo, rtol=1e-12, atol=1e-12)
    assert scores(rest, 0, idx, False) is None  # not simulated: its left-out fit not stored
    # the stored bank answers as the bank it was exported from, without the rows
    sizes = {k: [len(c) for c in v] for k, v in models.items()}
    back = probe.ProbeBank.from_arrays(arrays, fam, sizes, seed=2)
    x = rng.standard_normal((12, 6)) + centres[0]
    assert back.tests(x, 0.05) == pb.tests(x, 0.05)
    assert back.calibrate(12, 0.05, max_models=2) == pb.calibrate(12, 0.05, max_models=2)
    with pytest.raises(InputError, match="lacks a refit"):
        back.left_out(rest)


def test_models_told_apart_almost_surely_still_pass_their_own_new_sets():
    """Without the cap, nulls within 1e-5 of 0 reject a new set scored 0.9998 per image."""
    rng = np.random.default_rng(9)
    models, fam, centres = _bank(rng, k=3, sep=12.0)
    pb = probe.ProbeBank(models, fam)
    assert all(abs(np.median(pb.null(k, 20))) < 0.011 for k in pb.sizes)
    for i in range(3):
        x = rng.standard_normal((20, 6)) * 1.3 + centres[i]  # a little wider than enrolled
        t = {b.model: b for b in pb.tests(x, 0.05)}
        assert t[f"m{i}"].consistent, t[f"m{i}"]
        assert t[f"m{i}"].statistic == pytest.approx(probe.CEILING, abs=0.05)
    # the logs taken once, so that no other log routine's last bit enters the comparison
    lp = np.log(np.array([[0.999, 0.5], [0.2, 0.995]]))
    np.testing.assert_array_equal(probe.statistic(lp), [(probe.CEILING + lp[1, 0]) / 2,
                                                        (lp[0, 1] + probe.CEILING) / 2])
