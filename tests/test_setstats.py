"""The paper's mean/std/FID baseline: a correct FID and the baseline's matching rule."""

from __future__ import annotations

import numpy as np
import pytest

from forensics.errors import InputError, InsufficientDataError
from forensics.stats.setstats import (
    GaussianStats,
    baseline_matchers,
    baseline_vector,
    frechet_distance,
    gaussian_stats,
    mean_std_fid_features,
    set_features,
)
from forensics.steps.evaluate import evaluate


def _g(mu, cov):
    return GaussianStats(np.asarray(mu, float), np.asarray(cov, float), n=0)


def _psd_sqrt(c):
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_fid_closed_form_diagonal():
    # For diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # = 5 + 1 + 1 + 6.25
    assert expected == pytest.approx(13.25)
    assert frechet_distance(_g(mu1, np.diag(a)), _g(mu2, np.diag(b))) == pytest.approx(13.25)


def test_fid_closed_form_non_commuting():
    # tr sqrt(C1 C2) = tr sqrt(C2^1/2 C1 C2^1/2), a symmetric PSD root computed by eigh.
    t = 0.6
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c1 = rot @ np.diag([1.0, 4.0]) @ rot.T
    c2 = np.diag([9.0, 1.0])
    assert not np.allclose(c1 @ c2, c2 @ c1)
    s2 = _psd_sqrt(c2)
    expected = 1.0 + np.trace(c1) + np.trace(c2) - 2 * np.trace(_psd_sqrt(s2 @ c1 @ s2))
    got = frechet_distance(_g([1.0, 0.0], c1), _g([0.0, 0.0], c2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert got == pytest.approx(frechet_distance(_g([0.0, 0.0], c2), _g([1.0, 0.0], c1)))


def test_fid_of_samples_approaches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 0.0, 0.0]), np.array([1.0, -1.0, 0.5])
    c1 = np.diag([1.0, 2.0, 0.5])
    c2 = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    x = rng.multivariate_normal(mu1, c1, size=20000)
    t = rng.multivariate_normal(mu2, c2, size=20000)
    expected = frechet_distance(_g(mu1, c1), _g(mu2, c2))
    feats = mean_std_fid_features(x, t)
    assert feats["fid"] == pytest.approx(expected, rel=0.03)
    np.testing.assert_allclose(feats["mean"], mu1, atol=0.03)
    np.testing.assert_allclose(feats["std"], np.sqrt(np.diag(c1)), rtol=0.03)
    assert feats["std"] == pytest.approx(x.std(axis=0))  # population std, as the authors'
    # precomputed T statistics give the same number
    assert mean_std_fid_features(x, gaussian_stats(t))["fid"] == feats["fid"]


def test_fid_with_fewer_samples_than_dimensions():
    x = np.random.default_rng(1).normal(size=(6, 40))
    same = mean_std_fid_features(x, x)["fid"]
    assert np.isfinite(same) and 0.0 <= same < 1e-3 * np.trace(np.cov(x, rowvar=False))
    other = mean_std_fid_features(x + 3.0, x)["fid"]
    assert other == pytest.approx(40 * 9.0, rel=1e-3)  # shifted copy: |dmu|^2 only


def test_fid_errors():
    with pytest.raises(InsufficientDataError, match="at least 2"):
        mean_std_fid_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(InputError, match="dimension 3 with dimension 4"):
        mean_std_fid_features(np.ones((5, 3)) * np.arange(5)[:, None], np.eye(5, 4))
    with pytest.raises(InputError, match="NaN"):
        mean_std_fid_features(np.full((3, 2), np.nan), np.eye(3, 2))
    with pytest.raises(InputError, match="2-D"):
        mean_std_fid_features(np.zeros(4), np.eye(3))


def test_baseline_vector_layout_and_the_authors_rule():
    feats = {
        "b1": {"mean": np.array([1.0, 2.0]), "std": np.array([0.5, 0.5]), "fid": 10.0},
        "b2": {"mean": np.array([3.0]), "std": np.array([1.5]), "fid": 20.0},
    }
    v = baseline_vector(feats)
    np.testing.assert_array_equal(v, [1, 2, 3, 0.5, 0.5, 1.5, 10, 20])
    np.testing.assert_array_equal(baseline_vector(feats, ["b2", "b1"])[:3], [3, 1, 2])

    # One layer: exactly the authors' fingerprint_baseline.py similarity.
    rng = np.random.default_rng(2)
    q = np.concatenate([rng.normal(size=4), rng.random(4), [12.0]])
    refs = np.stack([np.concatenate([rng.normal(size=4), rng.random(4), [f]]) for f in (3, 14, 40)])

    def cos(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    for m in baseline_matchers([4]):
        expected = [
            m.alpha * (cos(r[:4], q[:4]) + cos(r[4:8], q[4:8]))
            + (1 - m.alpha) / (1 + abs(r[8] - 12))
            for r in refs
        ]
        np.testing.assert_allclose(m.score(q, refs), expected, rtol=1e-12)
    l2 = baseline_matchers([4])[0]
    assert l2.name == "l2" and int(np.argmax(l2.score(q, refs))) == 1  # nearest FID: 14
    with pytest.raises(InputError, match="must have 9 values"):
        l2.score(q[:8], refs)


def test_baseline_identifies_families_end_to_end():
    """Sets from three families of shifted/scaled Gaussians, two layers, leave-one-out."""
    rng = np.random.default_rng(5)
    t_layers = {"a": rng.normal(size=(300, 6)), "b": rng.normal(size=(300, 3))}
    t_stats = {k: gaussian_stats(v) for k, v in t_layers.items()}
    shifts = {"f0": 0.0, "f1": 1.5, "f2": -2.0}
    scales = {"f0": 1.0, "f1": 0.6, "f2": 2.0}
    vectors, families = [], []
    for fam in shifts:
        for _ in range(3):
            layers = {
                k: rng.normal(shifts[fam], scales[fam], size=(150, t.shape[1]))
                for k, t in t_layers.items()
            }
            vectors.append(baseline_vector(set_features(layers, t_stats)))
            families.append(fam)
    result = evaluate(
        np.stack(vectors),
        families,
        protocol="loo",
        matchers=baseline_matchers([6, 3]),
        drop_layers=(),
        n_boot=0,
    )
    for name in ("l2", "combined"):
        assert result["matchers"][name]["accuracy"] == 1.0
    with pytest.raises(InputError, match=r"no reference \(T\) features"):
        set_features({"c": np.zeros((3, 2))}, t_stats)


@pytest.mark.parametrize("n, d", [(40, 120), (300, 30)])
def test_fid_to_a_prerooted_reference_equals_the_sqrtm_formula(n, d):
    from forensics.stats.setstats import frechet_to_reference, psd_sqrt

    rng = np.random.default_rng(n)
    T = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) * 1.3 + 0.2
    ref = gaussian_stats(T)
    root = psd_sqrt(ref.cov)
    np.testing.assert_allclose(root @ root, ref.cov, atol=1e-10)
    fast = frechet_to_reference(x, ref, root)
    slow = frechet_distance(gaussian_stats(x), ref)
    assert fast == pytest.approx(slow, rel=1e-7)
    feats = mean_std_fid_features(x, ref, root)
    assert feats["fid"] == fast
    assert mean_std_fid_features(x, ref)["fid"] == pytest.approx(fast, rel=1e-7)
