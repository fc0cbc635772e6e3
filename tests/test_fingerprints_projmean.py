"""The projected-mean fingerprints and the zscore matchers, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from fp_plugins.fingerprints import (
    CURVE_WEIGHT,
    GroupedZScoreMatcher,
    ProjMeanCurveFingerprint,
    exact_pca,
)
from fp_plugins.matchers import ZScoreMatcher

from forensics.plugin import manager as plugins
from forensics.stats import fingerprints as fpmod
from forensics.stats.fingerprints import FingerprintContext, PrepareContext


def _layers(rng, dims, n):
    return [rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) for d in dims]


def test_exact_pca_is_the_covariance_eigenbasis_with_a_fixed_sign():
    rng = np.random.default_rng(0)
    T = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10))
    mean, axes = exact_pca(T, 4)
    np.testing.assert_allclose(mean, T.mean(0))
    np.testing.assert_allclose(axes @ axes.T, np.eye(4), atol=1e-12)
    var = np.var((T - mean) @ axes.T, axis=0, ddof=1)
    top = np.sort(np.linalg.eigvalsh(np.cov(T, rowvar=False)))[::-1][:4]
    np.testing.assert_allclose(var, top, rtol=1e-10)  # leading variances, in order
    assert np.all(axes[np.arange(4), np.argmax(np.abs(axes), axis=1)] > 0)
    m2, a2 = exact_pca(-T, 4)  # flipping the data cannot flip the stored orientation
    np.testing.assert_allclose(a2, axes, atol=1e-10)


@pytest.mark.parametrize("name, n_sel", [("proj-mean", 5), ("proj-mean-early", 3),
                                         ("proj-mean-ct", 3)])
def test_projected_means_of_the_selected_layers(name, n_sel):
    rng = np.random.default_rng(1)
    dims = [3, 70, 5, 8, 6]
    T, P, Q = _layers(rng, dims, 300), _layers(rng, dims, 100), _layers(rng, dims, 40)
    fp = plugins.get("fingerprints", name)
    extras = fp.prepare(PrepareContext([f"l{i}" for i in dims], T, P, None))
    assert sorted({int(k.split(".")[1]) for k in extras}) == list(range(n_sel))
    assert extras["axes.1"].shape == (64, 70) and extras["axes.0"].shape == (3, 3)
    values = rng.normal(size=len(dims))
    results = [type("R", (), {"ct": v})() for v in values]
    ctx = FingerprintContext([f"l{i}" for i in dims], results, Q, None, extras)
    vec = fpmod.compute(fp, ctx)
    layers = fpmod.entry_layers(fp, dims)
    assert vec.shape == layers.shape
    head = 0
    if name == "proj-mean-ct":
        np.testing.assert_array_equal(vec[: len(dims)], values)
        head = len(dims)
    means = vec[head:]
    expect = np.concatenate([(Q[i].mean(0) - T[i].mean(0)) @ exact_pca(T[i], min(64, d))[1].T
                             for i, d in enumerate(dims[:n_sel])])
    np.testing.assert_allclose(means, expect, atol=1e-9)
    assert list(layers[head:]) == [i for i in range(n_sel) for _ in range(min(64, dims[i]))]


def test_zscore_ignores_the_scale_of_each_entry_and_constant_entries():
    rng = np.random.default_rng(2)
    refs, q = rng.normal(size=(6, 4)), rng.normal(size=4)
    m = ZScoreMatcher()
    base = m.score(q, refs)
    scale = np.array([1.0, 1e3, 1e-3, 7.0])
    np.testing.assert_allclose(m.score(q * scale, refs * scale), base, rtol=1e-12)
    sd = refs.std(0)
    by_hand = 1 / (1 + np.sqrt((((refs - q) / sd) ** 2).mean(1)))
    np.testing.assert_allclose(base, by_hand, rtol=1e-12)
    with_const = np.c_[refs, np.full(6, 3.0)]
    np.testing.assert_allclose(m.score(np.r_[q, 100.0], with_const), base, rtol=1e-12)
    one = m.score(q, refs[:1])  # one reference: no spread to learn, plain RMS
    assert one[0] == pytest.approx(1 / (1 + np.sqrt(((refs[0] - q) ** 2).mean())))
    assert np.argmax(m.score(refs[3], refs)) == 3


def test_grouped_zscore_weighs_the_head_apart():
    rng = np.random.default_rng(3)
    refs, q = rng.normal(size=(5, 7)), rng.normal(size=7)
    g = GroupedZScoreMatcher("zscore", 2, 0.3)
    z = ((refs - q) / refs.std(0)) ** 2
    d = np.sqrt((0.3 * z[:, :2].mean(1) + z[:, 2:].mean(1)) / 1.3)
    np.testing.assert_allclose(g.score(q, refs), 1 / (1 + d), rtol=1e-12)
    fp = ProjMeanCurveFingerprint("x", True, "")
    name, obj = plugins.resolve_matcher(fp, None, [4, 4, 4])
    assert name == "zscore" and obj.n_head == 3 and obj.head_weight == CURVE_WEIGHT
    assert plugins.resolve_matcher(fp, "l2", [4])[1].name == "l2"  # other names: the plugins
