"""The belonging test: calibrated on a model's own curves, powerful against other models."""

from __future__ import annotations

import numpy as np
import pytest

from forensics.errors import InputError
from forensics.stats import belonging as bt
from forensics.stats.attribution import Match, decide_belonging


def _model(rng, shift=0.0, curves=2, n=120, dim=8, drift=0.0):
    """Curves of one 'model': Gaussian rows, each curve drifted a little (a checkpoint)."""
    return [rng.standard_normal((n, dim)) + shift + drift * i for i in range(curves)]


@pytest.mark.parametrize("kind", bt.KINDS)
def test_new_sets_of_the_model_pass_at_the_level_and_other_models_fail(kind):
    rng = np.random.default_rng(0)
    model = bt.ModelRows(_model(rng, drift=0.1))
    null = bt.null(model, 32, kind=kind, draws=100, seed=1)
    p_own, p_other = [], []
    for _ in range(40):
        own = rng.standard_normal((32, 8)) + 0.05 * rng.integers(0, 2)
        other = rng.standard_normal((32, 8)) + 0.8
        p_own.append(bt.test(model, own, name="m", family="f", kind=kind, null_values=null)
                     .p_value)
        p_other.append(bt.test(model, other, name="m", family="f", kind=kind,
                               null_values=null).p_value)
    # genuine sets: p roughly uniform, few below 0.05; another model: almost always below
    assert np.mean(np.array(p_own) < 0.05) <= 0.15
    assert np.mean(np.array(p_other) < 0.05) >= 0.9


def test_p_values_are_seeded_and_bounded():
    rng = np.random.default_rng(1)
    model = bt.ModelRows(_model(rng))
    s = rng.standard_normal((20, 8))
    a = bt.test(model, s, name="m", family="f", draws=50, seed=3)
    b = bt.test(model, s, name="m", family="f", draws=50, seed=3)
    assert a == b and 1 / 51 <= a.p_value <= 1.0 and a.draws == 50 and a.n_images == 20


def test_a_one_curve_model_is_untestable_and_never_consistent():
    rng = np.random.default_rng(2)
    t = bt.test(bt.ModelRows(_model(rng, curves=1)), rng.standard_normal((20, 8)),
                name="m", family="f")
    assert t.p_value is None and not t.consistent and t.draws == 0


def test_large_suspects_are_tested_on_a_seeded_subset():
    rng = np.random.default_rng(3)
    model = bt.ModelRows(_model(rng, n=300))
    t = bt.test(model, rng.standard_normal((400, 8)), name="m", family="f", draws=20)
    assert t.n_images == bt.MAX_TEST
    np.testing.assert_array_equal(bt.subset(400, 0), bt.subset(400, 0))


def test_rows_pack_to_float16_and_back():
    rows = np.random.default_rng(4).standard_normal((7, 5))
    packed = bt.pack_rows(rows)
    assert isinstance(packed, str) and packed.startswith(bt.PACKED)
    back = bt.unpack_rows(packed, 7)
    assert back.shape == (7, 5)
    # exactly the float16 values: 11 significant bits
    np.testing.assert_array_equal(back, rows.astype(np.float16).astype(np.float64))
    # base64 of 2 bytes per value: 4 characters per 3 bytes, and the prefix
    assert len(packed) == len(bt.PACKED) + 4 * -(-2 * rows.size // 3)
    with pytest.raises(InputError, match="rows of 6 images"):
        bt.unpack_rows(packed, 6)


def test_rows_stored_as_decimals_before_are_still_read():
    rows = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float16)
    decimals = [float(str(h)) for h in rows.ravel()]  # how banks stored projected rows
    np.testing.assert_array_equal(bt.unpack_rows(decimals, 3), rows.astype(np.float64))


@pytest.mark.parametrize("bad", ["float16le-base64:@@@", "float16le-base64:AA==",
                                 "float32:AAAA", ""])
def test_damaged_packed_rows_are_refused_in_words(bad):
    with pytest.raises(InputError, match="stored per-image rows"):
        bt.packed_values(bad)


def test_the_bank_and_the_packer_agree_on_the_prefix():
    from refbank.bank import PACKED_PREFIX

    assert bt.PACKED == PACKED_PREFIX


def test_projection_is_fixed_and_keeps_lengths_on_average():
    a, b = bt.projection(500, 32), bt.projection(500, 32)
    np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(5).standard_normal((200, 500))
    ratio = (bt.project(x) ** 2).sum(1) / (x**2).sum(1)
    assert 0.8 < ratio.mean() < 1.2


def test_refusals():
    rng = np.random.default_rng(6)
    model = bt.ModelRows(_model(rng))
    with pytest.raises(InputError, match="level"):
        bt.test(model, rng.standard_normal((5, 8)), name="m", family="f", alpha=1.5)
    with pytest.raises(InputError, match="do not fit"):
        bt.test(model, rng.standard_normal((5, 3)), name="m", family="f")
    with pytest.raises(InputError, match="choose one of"):
        bt.statistic(model, rng.standard_normal((5, 8)), kind="kl")


def _t(model, family, p):
    return bt.Belonging(model, family, p, p is not None and p >= 0.05, 0.0, 0.0, 10, 2, 100,
                        "mmd")


def test_the_answer_has_two_levels_and_unknown_shows_the_closest_family():
    ranking = [Match(1, "c1", "m1", "A", 0.9), Match(2, "c2", "m2", "B", 0.5)]
    named = decide_belonging(ranking, [_t("m1", "A", 0.4), _t("m2", "B", 0.2)], 0.05)
    assert (named.family, named.model, named.unknown, named.closest) == ("A", "m1", False, None)
    assert [c["model"] for c in named.consistent] == ["m1", "m2"]
    # of the consistent models, the one the ranking puts first names the family
    first = decide_belonging(ranking, [_t("m1", "A", 0.1), _t("m2", "B", 0.3)], 0.05)
    assert (first.family, first.model) == ("A", "m1")
    second = decide_belonging(ranking, [_t("m1", "A", 0.01), _t("m2", "B", 0.3)], 0.05)
    assert (second.family, second.model) == ("B", "m2")
    none = decide_belonging(ranking, [_t("m1", "A", 0.01), _t("m2", "B", None)], 0.05)
    assert none.unknown and none.family is None and none.closest == "A"
    assert none.consistent == [] and "no enrolled model is consistent" in none.reason


def test_the_answer_confidence_is_simulated_from_the_bank_at_the_suspect_size():
    from forensics.stats import answer_confidence as ac

    rng = np.random.default_rng(7)
    models = {f"m{i}": bt.ModelRows(_model(rng, shift=1.5 * i, n=60)) for i in range(4)}
    families = {k: f"f{k}" for k in models}
    nulls = {k: bt.null(m, 20, draws=60, seed=0) for k, m in models.items()}
    cal = ac.calibrate(models, families, 20, alpha=0.05, kind="mmd", nulls=nulls, seed=0,
                       draws=6)
    again = ac.calibrate(models, families, 20, alpha=0.05, kind="mmd", nulls=nulls, seed=0,
                         draws=6)
    assert cal == again and cal.n == 20
    # far-apart models: a set of a model left out is unknown, and unknown is then right
    assert cal.n_unknown > 0 and cal.unknown_right > 0.8
    assert cal.probability(True) == cal.unknown_right
    p_named = cal.probability(False, 0.5, 1)
    assert p_named is not None and 0.5 < p_named <= 1.0
    assert cal.to_dict()["prior_enrolled"] == 0.5


def test_the_simulated_answer_chooses_as_the_attributor_orders():
    from forensics.stats import answer_confidence as ac

    rng = np.random.default_rng(7)
    # overlapping models: most sets are consistent with several
    models = {f"m{i}": bt.ModelRows(_model(rng, shift=0.1 * i, n=60)) for i in range(4)}
    families = {k: f"f{k}" for k in models}
    nulls = {k: bt.null(m, 20, draws=60, seed=0) for k, m in models.items()}
    kw = dict(alpha=0.05, kind="mmd", nulls=nulls, seed=0, draws=6)
    seen = []

    def truthful(k, i, idx, enrolled):
        seen.append((k, i, len(idx), enrolled))
        return {m: (1.0 if m == k else 0.0) for m in models if enrolled or m != k}

    def liar(k, i, idx, enrolled):
        return {m: (0.0 if m == k else 1.0) for m in models if enrolled or m != k}

    right = ac.calibrate(models, families, 20, order=truthful, **kw)
    wrong = ac.calibrate(models, families, 20, order=liar, **kw)
    # the order changes which consistent model is named, never whether one is
    assert (right.n_named, right.n_unknown) == (wrong.n_named, wrong.n_unknown)
    assert right.named_right > wrong.named_right
    assert {(k, e) for k, _i, _n, e in seen} == {(k, e) for k in models for e in (True, False)}
    assert {i for _k, i, _n, _e in seen} == {0, 1} and {n for *_x, n, _e in seen} == {20}


def test_a_suspect_as_large_as_a_curve_still_gets_a_spread_null():
    rng = np.random.default_rng(8)
    model = bt.ModelRows(_model(rng, n=30))
    nv = bt.null(model, 30, draws=100, seed=0)
    assert len(np.unique(np.round(nv, 12))) > 50  # a bootstrap, not the same 30 images twice
    p = [bt.test(model, rng.standard_normal((30, 8)), name="m", family="f", null_values=nv)
         .p_value for _ in range(30)]
    assert np.mean(np.array(p) < 0.05) <= 0.15
