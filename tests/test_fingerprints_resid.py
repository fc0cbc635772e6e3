"""The content-residual fingerprints (``resid-early``, ``resid-ct``), checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from fp_plugins.fingerprints import RESID_DIM, RESID_RIDGE, ResidMeanFingerprint, exact_pca

from forensics.errors import InputError
from forensics.plugin import manager as plugins
from forensics.stats import fingerprints as fpmod
from forensics.stats.fingerprints import FingerprintContext, PrepareContext

DIMS = [3, 300, 5, 8, 6, 4]  # L = 6: early layers 0..3, content layers 4 and 5


def _world(seed=0, n_t=600):
    """T, P and a set Q whose early layers are (noisy) linear functions of its content."""
    rng = np.random.default_rng(seed)

    mix = [rng.normal(size=(d, d)) for d in DIMS[4:]]

    def draw(n, shift=0.0, content_shift=0.0):
        content = [rng.normal(size=(n, d)) @ m + content_shift
                   for d, m in zip(DIMS[4:], mix, strict=True)]
        c = np.hstack(content)
        early = [c @ np.random.default_rng(100 + i).normal(size=(c.shape[1], d))
                 + 0.1 * rng.normal(size=(n, d)) + shift for i, d in enumerate(DIMS[:4])]
        return early + content

    return draw(n_t), draw(200), draw(80), draw


def _ctx(fp, T, P, Q, values=None):
    names = [f"l{i}" for i in range(len(DIMS))]
    extras = fp.prepare(PrepareContext(names, T, P, None))
    values = np.zeros(len(DIMS)) if values is None else values
    results = [type("R", (), {"ct": v})() for v in values]
    return FingerprintContext(names, results, Q, None, extras), extras


def _by_hand(T, Q):
    """The residual means, computed image by image with a ridge fitted on T by hand."""
    ax = {i: exact_pca(T[i], min(RESID_DIM, T[i].shape[1])) for i in range(6)}

    def proj(X, i):
        return (X[i] - ax[i][0]) @ ax[i][1].T

    A, Aq = np.hstack([proj(T, 4), proj(T, 5)]), np.hstack([proj(Q, 4), proj(Q, 5)])
    lam = RESID_RIDGE * np.trace(A.T @ A) / A.shape[1]
    parts = []
    for i in range(4):
        W = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ proj(T, i))
        parts.append((proj(Q, i) - Aq @ W).mean(axis=0))  # per image, then the mean
    return np.concatenate(parts)


def test_resid_early_is_the_mean_residual_of_a_ridge_fitted_on_T():
    T, P, Q, _ = _world()
    fp = plugins.get("fingerprints", "resid-early")
    ctx, extras = _ctx(fp, T, P, Q)
    assert sorted({k.split(".")[0] for k in extras}) == ["axes", "coef", "mean"]
    assert extras["axes.1"].shape == (min(RESID_DIM, 300), 300)
    assert extras["coef.1"].shape == (6 + 4, min(RESID_DIM, 300))  # content dims x targets
    vec = fpmod.compute(fp, ctx)
    np.testing.assert_allclose(vec, _by_hand(T, Q), atol=1e-9)
    layers = fpmod.entry_layers(fp, DIMS)
    assert vec.shape == layers.shape
    assert list(layers) == [i for i in range(4) for _ in range(min(RESID_DIM, DIMS[i]))]


def test_the_residual_removes_what_the_content_explains():
    """Sets of other content but the same generator agree; a low-level shift stands out."""
    T, P, Q, draw = _world()
    fp = plugins.get("fingerprints", "resid-early")
    ctx, extras = _ctx(fp, T, P, Q)
    other = draw(80, content_shift=1.0)  # other content, the same generator ...
    shifted = draw(80, shift=1.0)  # the same content, early layers shifted
    plain = plugins.get("fingerprints", "proj-mean-early")
    pe = plain.prepare(PrepareContext(ctx.layers, T, P, None))

    def resid(X):
        return fpmod.compute(fp, FingerprintContext(ctx.layers, ctx.results, X, None, extras))

    def mean(X):
        return fpmod.compute(plain, FingerprintContext(ctx.layers, ctx.results, X, None, pe))

    def moved(f, X):
        return np.linalg.norm(f(X) - f(Q))

    # ... moves the plain projected means a lot, the residuals little,
    assert moved(resid, other) < 0.2 * moved(mean, other)
    # while a low-level trait (the early layers shifted) moves the residuals as much as
    # the plain means, and more than the other content does.
    assert moved(resid, shifted) > 0.5 * moved(mean, shifted)
    assert moved(resid, shifted) > 1.5 * moved(resid, other)


def test_resid_ct_puts_the_curve_first_and_weighs_it_apart():
    T, P, Q, _ = _world()
    values = np.array([0.5, np.nan, -1.0, 2.0, 0.0, 3.0])
    fp = plugins.get("fingerprints", "resid-ct")
    ctx, _ = _ctx(fp, T, P, Q, values)
    vec = fpmod.compute(fp, ctx)
    np.testing.assert_array_equal(vec[:6], np.nan_to_num(values, nan=0.0))
    np.testing.assert_allclose(vec[6:], _by_hand(T, Q), atol=1e-9)
    assert fpmod.entry_layers(fp, DIMS).shape == vec.shape
    name, obj = plugins.resolve_matcher(fp, None, DIMS[1:])
    assert name == "zscore" and obj.n_head == 5


def test_a_shallow_encoder_gets_plain_projected_means():
    rng = np.random.default_rng(4)
    T = [rng.normal(size=(100, 3)), rng.normal(size=(100, 4))]  # L = 2: no content layer
    Q = [rng.normal(size=(30, 3)), rng.normal(size=(30, 4))]
    fp = ResidMeanFingerprint("x", "")
    extras = fp.prepare(PrepareContext(["a", "b"], T, T, None))
    assert not any(k.startswith("coef") for k in extras)
    vec = fp.compute(FingerprintContext(["a", "b"], [], Q, None, extras))
    expect = np.concatenate([(Q[i].mean(0) - T[i].mean(0)) @ exact_pca(T[i], 4)[1].T
                             for i in range(2)])
    np.testing.assert_allclose(vec, expect, atol=1e-12)


def test_missing_baseline_arrays_name_the_layer_and_the_fix():
    T, P, Q, _ = _world(n_t=300)
    fp = plugins.get("fingerprints", "resid-early")
    ctx, extras = _ctx(fp, T, P, Q)
    del extras["coef.2"]
    with pytest.raises(InputError, match=r"resid-early arrays lack layer 2 \(l2\).*rebuild"):
        fpmod.compute(fp, ctx)


@pytest.mark.parametrize("name", ["resid-early", "proj-mean-early", "proj-mean"])
def test_per_image_rows_average_to_the_set_vector(name):
    T, P, Q, _ = _world()
    fp = plugins.get("fingerprints", name)
    ctx, _ = _ctx(fp, T, P, Q)
    rows = fp.per_image(ctx)
    assert rows.shape == (80, fpmod.compute(fp, ctx).size)
    np.testing.assert_allclose(rows.mean(axis=0), fpmod.compute(fp, ctx), atol=1e-9)
    np.testing.assert_allclose(fpmod.per_image_variance(fp, ctx), rows.var(axis=0))


@pytest.mark.parametrize("name", ["paper", "resid-ct", "proj-mean-ct", "setstats"])
def test_fingerprints_that_are_no_mean_of_images_declare_no_per_image(name):
    fp = plugins.get("fingerprints", name)
    assert not hasattr(fp, "per_image")
    assert fpmod.per_image_variance(fp, None) is None
