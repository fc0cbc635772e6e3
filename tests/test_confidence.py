"""Calibrated confidence and the size-aware unknown threshold (forensics.stats.confidence)."""

from __future__ import annotations

import numpy as np
import pytest
from fp_plugins.matchers import ZScoreMatcher

from forensics.errors import InputError
from forensics.stats import confidence as C

K = 16
SCORE = ZScoreMatcher().score


def _world(rng, n_fam=6, n_curves=4, per=512, spread=0.6, noise=6.0):
    """Families of curves: a family mean, a curve offset, per-image noise."""
    fams = rng.standard_normal((n_fam, K))
    curves, variances, labels = [], [], []
    for f in range(n_fam):
        for _ in range(n_curves):
            centre = fams[f] + spread * rng.standard_normal(K)
            images = centre + noise * rng.standard_normal((per, K))
            curves.append(images.mean(axis=0))
            variances.append(images.var(axis=0))
            labels.append(f"f{f}")
    return fams, np.array(curves), np.array(variances), labels


def _suspects(rng, fams, sizes, reps, spread=0.6, noise=6.0):
    """Genuine new suspects: a new curve offset of a family, n images of it."""
    for f in range(len(fams)):
        for n in sizes:
            for _ in range(reps):
                centre = fams[f] + spread * rng.standard_normal(K)
                yield f"f{f}", n, (centre + noise * rng.standard_normal((n, K))).mean(axis=0)


def test_confidence_is_calibrated_on_fresh_suspects():
    rng = np.random.default_rng(0)
    fams, V, S, labels = _world(rng)
    model = C.fit(C.simulate(V, S, [512] * len(V), labels, SCORE, seed=0))
    p, right, size = [], [], []
    for fam, n, q in _suspects(rng, fams, (8, 16, 32, 64, 128), reps=20):
        f, best, margin = C.margin_of(C.family_scores(SCORE(q, V), labels))
        p.append(model.probability(margin, best, n))
        right.append(f == fam)
        size.append(n)
    p, right, size = np.array(p), np.array(right), np.array(size)
    assert 0.3 < right.mean() < 0.95  # a task neither trivial nor hopeless
    assert C.expected_calibration_error(p, right) < 0.06
    assert p[size == 8].mean() < p[size == 128].mean()  # fewer images, less sure
    assert right[size == 8].mean() < right[size == 128].mean()


def test_unknown_threshold_grows_with_suspect_size():
    rng = np.random.default_rng(1)
    _, V, S, labels = _world(rng)
    model = C.fit(C.simulate(V, S, [512] * len(V), labels, SCORE, seed=0), quantile=0.05)
    t = [model.threshold(n) for n in (8, 64, 512)]
    assert t[0] < t[1] < t[2]
    assert model.threshold(24) == pytest.approx(np.interp(np.log(24), np.log([16, 32]),
                                                          [model.thresholds[16],
                                                           model.thresholds[32]]))


def test_simulation_is_seeded_and_skips_sizes_above_the_curve():
    rng = np.random.default_rng(2)
    _, V, S, labels = _world(rng, n_fam=3, n_curves=2, per=64)
    a = C.simulate(V, S, [64] * len(V), labels, SCORE, seed=5)
    b = C.simulate(V, S, [64] * len(V), labels, SCORE, seed=5)
    np.testing.assert_array_equal(a.best, b.best)
    assert set(a.size.tolist()) == {8, 16, 32, 64}
    assert (a.size == 64).sum() == len(V)  # the whole curve: one draw, no noise


def test_large_banks_leave_out_a_seeded_choice_of_curves():
    rng = np.random.default_rng(4)
    _, V, S, labels = _world(rng, n_fam=3, n_curves=4, per=64)
    sim = C.simulate(V, S, [64] * len(V), labels, SCORE, seed=1, max_curves=5)
    assert (sim.size == 64).sum() == 5  # one whole-curve draw per curve left out
    again = C.simulate(V, S, [64] * len(V), labels, SCORE, seed=1, max_curves=5)
    np.testing.assert_array_equal(sim.best, again.best)


def test_a_perfect_simulation_still_gives_probabilities_below_one():
    rng = np.random.default_rng(3)
    _, V, S, labels = _world(rng, n_fam=3, spread=0.01, noise=0.01)
    sim = C.simulate(V, S, [512] * len(V), labels, SCORE, seed=0)
    assert sim.right.all()
    model = C.fit(sim)
    assert model.probability(float(sim.margin.min()), float(sim.best.min()), 8) < 1.0


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="one vector, variance, size and family per curve"):
        C.simulate(np.ones((3, 2)), np.ones((2, 2)), [8, 8, 8], ["a", "b", "c"], SCORE)
    with pytest.raises(InputError, match="at least two families"):
        C.simulate(np.ones((2, 2)), np.ones((2, 2)), [8, 8], ["a", "a"], SCORE)
    with pytest.raises(InputError, match="no simulated suspects"):
        C.fit(C.simulate(np.eye(2), np.ones((2, 2)), [8, 8], ["a", "b"], SCORE))


def test_expected_calibration_error():
    assert C.expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True])) == 0.0
    assert C.expected_calibration_error(np.array([0.9] * 10),
                                        np.array([True] * 5 + [False] * 5)) == pytest.approx(0.4)


def test_unknown_thresholds_call_the_asked_share_of_genuine_suspects():
    rng = np.random.default_rng(4)
    best, margin = rng.normal(0.6, 0.05, 4000), rng.gamma(2.0, 0.02, 4000)
    tb, tm = C.unknown_thresholds(best, margin, 0.05)
    flagged = (best < tb) | (margin < tm)
    assert abs(flagged.mean() - 0.05) < 0.003
    # the shortfall in units of each one's spread is the same for both thresholds
    np.testing.assert_allclose((best.mean() - tb) / best.std(),
                               (margin.mean() - tm) / margin.std(), rtol=1e-12)


def test_a_suspect_between_two_families_is_unknown_by_its_margin():
    from forensics.stats.attribution import Calibration, Match, decide

    rng = np.random.default_rng(5)
    fams, V, S, labels = _world(rng)
    model = C.fit(C.simulate(V, S, [512] * len(V), labels, SCORE, seed=0))
    assert set(model.margin_thresholds) == set(model.thresholds)
    assert model.to_dict()["margin_thresholds"]
    cal = Calibration("zscore", (), 0.05, model.threshold(512), 0,
                      margin_threshold=model.margin_threshold(512))

    def decision(q):
        s = SCORE(q, V)
        order = np.argsort(-s)
        return decide([Match(r + 1, f"c{i}", labels[i], labels[i], float(s[i]))
                       for r, i in enumerate(order)], cal)

    genuine = [decision(q) for fam, n, q in _suspects(rng, fams, (512,), reps=5)]
    assert np.mean([d.unknown for d in genuine]) <= 0.15
    # a suspect on the segment between a curve of f0 and one of f1, where both families
    # score alike (bisection): close to both, the nearest to neither
    a, b = V[labels.index("f0")], V[labels.index("f1")]

    def lead(t):
        fs = C.family_scores(SCORE(a + t * (b - a), V), labels)
        return fs["f0"] - fs["f1"]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if lead(mid) > 0 else (lo, mid)
    d = decision(a + lo * (b - a))
    assert d.unknown and "between enrolled families" in d.reason
    assert d.score >= model.threshold(512)  # close enough: unknown by the margin alone


def test_small_bank_genuine_suspects_are_named_with_the_size_aware_rule():
    # 2 families x 2 curves: genuine suspects of any size are seldom called unknown.
    rng = np.random.default_rng(6)
    unknown = []
    for _ in range(40):
        fams, V, S, labels = _world(rng, n_fam=2, n_curves=2)
        model = C.fit(C.simulate(V, S, [512] * len(V), labels, SCORE, seed=0))
        for _fam, n, q in _suspects(rng, fams, (16, 128, 512), reps=1):
            _, best, margin = C.margin_of(C.family_scores(SCORE(q, V), labels))
            unknown.append(best < model.threshold(n) or margin < model.margin_threshold(n))
    assert np.mean(unknown) <= 0.15


def test_shortfall_is_the_rule_behind_the_two_thresholds():
    rng = np.random.default_rng(3)
    gb, gm = rng.normal(0.6, 0.05, 400), np.abs(rng.normal(0.1, 0.04, 400))
    tb, tm = C.unknown_thresholds(gb, gm, 0.05)
    zstar = C.shortfall_cutoff(gb, gm, 0.05)
    assert zstar == np.quantile(C.shortfall(gb, gm, gb, gm), 0.95)
    b, m = rng.normal(0.55, 0.1, 2000), np.abs(rng.normal(0.08, 0.06, 2000))
    z = C.shortfall(b, m, gb, gm)
    # away from the boundary (round-off), shortfall > z* is exactly "below a threshold"
    clear = np.abs(z - zstar) > 1e-9
    assert np.array_equal((z > zstar)[clear], ((b < tb) | (m < tm))[clear])
    assert 0.3 < np.mean(z > zstar) < 0.9  # both sides are exercised
    # larger shortfall for a lower score or a smaller margin, never for a better one
    assert C.shortfall([0.3], [0.1], gb, gm)[0] > C.shortfall([0.6], [0.1], gb, gm)[0]
    assert C.shortfall([0.6], [0.0], gb, gm)[0] > C.shortfall([0.6], [0.2], gb, gm)[0]
